#!/usr/bin/env bash
# One-shot check on a CUDA machine that has PyTorch and this repository but no network:
#   scripts/gpu_check.sh OUTDIR
# runs the CUDA tests (tests/gpu), then the GPU benchmarks of docs/BENCHMARKS.md, all within 8 minutes,
# and writes OUTDIR/log.txt (everything) and OUTDIR/results.md (a table of the steps and the benchmark tables).
# Without CUDA it runs the same steps at CPU size (the GPU tests skip), so the script itself can be checked.
# It installs nothing and downloads nothing, and needs no install of nanoPALM (it runs from the checkout).
# The machine must have: Python 3.10+ as $PYTHON (default python3) with torch (CUDA build, 2.6 or newer),
# numpy, safetensors, sentencepiece, matplotlib, tqdm and pytest. The tests make their own data (no corpus
# package, no tokenizer download). The script checks these first and names what is missing in one line.
set -u -o pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/log.txt
RESULTS=$OUT/results.md
BENCH_OUT=$OUT/bench_tables.md
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
missing=$("$PYTHON" -c 'import importlib.util as u; print(" ".join(n for n in ("torch", "numpy", "safetensors", "sentencepiece", "matplotlib", "tqdm", "pytest") if u.find_spec(n) is None))' 2>&1) || missing="python ($PYTHON does not run)"
if [[ -n $missing ]]; then
    echo "error: the GPU check needs these, missing here: $missing (install them, or carry wheels)" >&2
    exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NANOPALM_GPU_RESULTS=$OUT
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled  # stay off the network
export PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + 470))  # 8 minutes less a margin for writing the results
: > "$LOG"
: > "$BENCH_OUT"
STEPS=""
FAILED=0

# run NAME LIMIT_S COMMAND...: log everything, time it, stop it at LIMIT_S or at the deadline.
run() {
    local name=$1 limit=$2 rc start result
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        STEPS+="| $name | skipped: out of time | 0 |"$'\n'
        FAILED=1
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) result="ok" ;;
        124 | 137) result="TIMED OUT after ${limit}s"; FAILED=1 ;;
        *) result="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    echo "=== $name: $result in $((SECONDS - start))s" | tee -a "$LOG"
    STEPS+="| $name | $result | $((SECONDS - start)) |"$'\n'
}

# bench NAME LIMIT_S ARGS...: a bench.py run whose tables also go to results.md.
bench() {
    local name=$1 limit=$2
    shift 2
    local before
    before=$(wc -l < "$LOG")
    run "$name" "$limit" "$PYTHON" bench.py "$@"
    { echo "### $name"; echo; tail -n +"$((before + 2))" "$LOG" | grep -v '^=== '; echo; } >> "$BENCH_OUT"
}

GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>>"$LOG")
run "CUDA tests (tests/gpu)" 150 "$PYTHON" -m pytest tests/gpu -o addopts= -q -rs -p no:cacheprovider  # one process: no xdist needed
# Medium scale on one device (a GPU, or the CPU in the fallback): meta-device init, selective activation
# checkpointing, sharded checkpoints through torch.distributed.checkpoint, resume, consolidation into one file,
# sampling from it, on synthetic data.
SCALE="--dataset=$OUT/synthetic --vocab_size=32 --block_size=256 --eval_interval=10 --eval_iters=2
       --sample_tokens=0 --compile=False --activation_checkpointing=selective --checkpoint_format=sharded
       --out_dir=$OUT/scale"
run "medium scale: meta init, selective AC, sharded save, resume, consolidate, sample" "$([[ -n $GPU ]] && echo 80 || echo 240)" bash -c "
    $PYTHON tests/gpu/synthetic.py $OUT/synthetic && $PYTHON train.py $SCALE --max_iters=20 &&
    $PYTHON train.py $SCALE --max_iters=30 --resume &&
    $PYTHON -m nanopalm.convert consolidate $OUT/scale --out $OUT/scale-single &&
    $PYTHON sample.py --out_dir=$OUT/scale-single --max_new_tokens=20"
if [[ -n $GPU ]]; then
    bench "memory planner against the CUDA allocator, default model, batch 8" 30 \
        memory shakespeare --world_size 1 --measure 8 --device cuda
    bench "seed 213M, block 512, batch 16 (target: 300k tokens/s)" 90 \
        --preset seed_213m --batch_size 16 --device cuda --compile false true --steps 10 --repeats 3 --warmup 3
    bench "PaLM-shaped 350M, 2048 tokens, batch 8 (target: 45% MFU)" 110 \
        --preset palm_350m --batch_size 8 --device cuda --compile false true --steps 5 --repeats 3 --warmup 3
    bench "PaLM vs GPT-2-style, palm_125m at 1024 tokens, eager" 40 \
        --preset palm_125m --block_size=1024 --batch_size 8 --device cuda --compare --steps 5 --repeats 3
    bench "generation, palm_20m, bf16 autocast" 30 generation --device cuda --new_tokens 32
    bench "Adafactor and fused AdamW steps, seed 213M" 30 optimizer --preset seed_213m --device cuda
else
    bench "CPU fallback: PaLM vs GPT-2-style, tiny" 60 --preset tiny --compare --device cpu --steps 2 --repeats 2
    bench "CPU fallback: generation, tiny" 30 generation --preset tiny --block_size 64 --contexts 16 32 \
        --new_tokens 4 --repeats 1 --device cpu
fi

{
    echo "# nanoPALM GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- device: ${GPU:-no CUDA GPU visible (CPU fallback: the GPU tests skip, the benchmarks run at CPU size)}"
    echo "- $("$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
    echo "- targets (docs/BENCHMARKS.md): seed 213M at block 512 >= 300,000 tokens/s on one H200;"
    echo "  PaLM-shaped 350M at 2048 tokens >= 45% MFU; compile on and off"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---:|"
    printf '%s' "$STEPS"
    echo
    if [[ -f $OUT/gpu_facts.json ]]; then
        echo "### What the CUDA tests found (attention kernels by the profiler)"
        echo
        echo '```'
        cat "$OUT/gpu_facts.json"
        echo '```'
        echo
    fi
    cat "$BENCH_OUT"
} > "$RESULTS"
rm -f "$BENCH_OUT"
echo "wrote $RESULTS and $LOG"
exit $FAILED
