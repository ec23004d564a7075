#!/usr/bin/env bash
# The figures of docs/FINETUNE.md: the default run's model (out-shakespeare, from `python train.py`) asked
# "Who speaks next?" after two speeches of a val scene, before finetuning, after a full finetune and after a LoRA
# finetune, each within 10 minutes on 2 CPU cores:
#   scripts/finetune_speaker.sh [BASE_RUN]
# writes docs/logs/finetune_speaker_{data,full,lora}.txt and docs/results/finetune_speaker_{none,full,lora}.json
# (each JSON holds the eval.py command that wrote it and every answer).
set -euo pipefail
BASE=${1:-out-shakespeare}
cd "$(dirname "$0")/.."
LOGS=docs/logs
OUT=docs/results
mkdir -p "$LOGS" "$OUT"
{ python -m nanopalm.shakespeare_tasks data/speaker --instructions
  python data/instruct/prepare.py --train_file=data/speaker/speaker.train.jsonl \
      --val_file=data/speaker/speaker.val.jsonl --tokenizer_from="$BASE" --out_dir=data/speaker; } \
    2>&1 | tee "$LOGS/finetune_speaker_data.txt"
python eval.py --out_dir="$BASE" --instructions=data/speaker/speaker.val.jsonl --output="$OUT/finetune_speaker_none.json"
for way in full lora; do
    preset=finetune_speaker$([ "$way" = lora ] && echo _lora || true)
    rm -rf "out-speaker-$way"
    python train.py "$preset" --init_from="$BASE" 2>&1 | grep -v "batch/s\]" | tee "$LOGS/finetune_speaker_$way.txt"
    python eval.py --out_dir="out-speaker-$way" --instructions=data/speaker/speaker.val.jsonl \
        --output="$OUT/finetune_speaker_$way.json"
    du -b "out-speaker-$way"/checkpoints/step_*/* | tee -a "$LOGS/finetune_speaker_$way.txt"
done
