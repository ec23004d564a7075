#!/usr/bin/env bash
# The figures of docs/EVAL.md for a default Shakespeare run, offline:
#   scripts/eval_shakespeare.sh [RUN]          (RUN: a `python train.py` run directory; default out-shakespeare)
# writes docs/results/shakespeare_*.json (each holds the exact eval.py command that wrote it) and the run's
# end-of-training val_bpb_full row. Needs the eval extra: pip install -e ".[eval]".
set -euo pipefail
RUN=${1:-out-shakespeare}
cd "$(dirname "$0")/.."
OUT=docs/results
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # the local tasks need no hub
mkdir -p "$OUT"
python eval.py --out_dir="$RUN" --output="$OUT/shakespeare_val.json"
python eval.py --out_dir="$RUN" --stride=128 --output="$OUT/shakespeare_val_stride128.json"
TASKS=$(mktemp -d)
trap 'rm -rf "$TASKS"' EXIT
python -m nanopalm.shakespeare_tasks "$TASKS" --docs 500
python eval.py --out_dir="$RUN" --tasks=shakespeare_next_line,shakespeare_speaker --include_path="$TASKS" \
    --output "$OUT/shakespeare_tasks.json"
grep '"val_bpb_full"' "$RUN/metrics.jsonl" > "$OUT/shakespeare_val_bpb_full.jsonl"
