#!/usr/bin/env bash
# The default run as a new user meets it: a fresh clone of this commit, `python train.py` timed (the built-in
# data prepared on the way, the final whole-val score and sample included), then `python sample.py`. Keeps
# the log, the metrics and the sample in docs/results/default_run$SUFFIX/ (README's figures). Arguments go to
# train.py (not --out_dir: sample.py reads out-shakespeare):
#   scripts/default_run.sh                                  # docs/results/default_run/
#   SUFFIX=_fp32 scripts/default_run.sh --dtype=float32     # docs/results/default_run_fp32/
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
keep="$repo/docs/results/default_run${SUFFIX:-}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
cd "$work/clone"
start=$(date +%s)
rc=0
python train.py "$@" > train.log 2>&1 || rc=$?
echo "rc=$rc wall_s=$(( $(date +%s) - start )) commit=$(git rev-parse --short HEAD)" \
     "machine=$(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')" >> train.log
python sample.py > sample.txt 2> sample.stderr.txt
mkdir -p "$keep"
cp train.log out-shakespeare/metrics.jsonl sample.txt sample.stderr.txt "$keep/"
tail -3 train.log
