#!/usr/bin/env bash
# Every study of experiments/ at --scale full into OUTDIR: the GPU run behind experiments/results/.
#   experiments/run_full.sh OUTDIR [--checkpoint DIR] [--seed S] [--dtype float32|bfloat16]
# All studies run in one process, so the model loads once and programs compiled for one study are reused
# by the others. Resumable: after an interruption, the same command loads the finished cells and goes on.
# Extra arguments go to `python -m experiments.run` (e.g. --checkpoint where the default model cannot be
# downloaded). Progress goes to the terminal and to OUTDIR/run_full.log.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [--checkpoint DIR] [--seed S] [--dtype float32|bfloat16]" >&2
  exit 2
fi
out=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
"${PYTHON:-python3}" -m experiments.run all --scale full --out "$out" "$@" 2>&1 | tee -a "$out/run_full.log"
echo "run_full: all studies in $(( $(date +%s) - start )) s" | tee -a "$out/run_full.log"
