#!/usr/bin/env bash
# fsapp on one GPU (issue 5): images/s of WRN-28-10 training at batch 60 (standard and
# feature-scatter; fp32, bf16, bf16+channels_last, bf16+channels_last+compile), images/s of PGD-20
# evaluation, peak GPU memory, and the projected wall time of the paper-cifar10 preset.
#
#   benchmarks/gpu.sh            # on a GPU machine: under 8 minutes on one H100
#   benchmarks/gpu.sh --tiny     # a small model for a few steps: checks the script on a CPU
#
# Needs only torch, pluggy and safetensors (and numpy, which torch brings) besides this checkout:
# it never imports typer, rich or textual. Each section runs in its own process under a time
# limit, so a slow compile cannot take the whole budget; results go to $OUT (default
# benchmarks/out) as JSON, and the summary is printed at the end.
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-benchmarks/out}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ARGS=(--out "$OUT" "$@")
TRAIN_LIMIT="${TRAIN_LIMIT:-150}"
EVAL_LIMIT="${EVAL_LIMIT:-90}"
COMPILE_LIMIT="${COMPILE_LIMIT:-210}"
mkdir -p "$OUT"
rm -f "$OUT"/train.json "$OUT"/eval.json "$OUT"/compile.json "$OUT"/summary.json

start=$(date +%s)
"$PY" - <<'PY' || exit 1
import sys
import torch
import fsapp.bench, fsapp.bench.evaluation, fsapp.engine.train  # noqa: F401  the core alone
ui = sorted(m for m in ("textual", "typer", "rich") if m in sys.modules)
assert not ui, f"the core imported {ui}"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (CPU)"
print(f"fsapp GPU benchmark: torch {torch.__version__}, {gpu}", flush=True)
PY

run() {  # run <seconds> <section>
    local limit=$1 section=$2
    echo "== $section (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_bench.py --section "$section" "${ARGS[@]}"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "  $section: stopped at its ${limit}s limit"; fi
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ]; then echo "  $section: failed (exit $rc)"; fi
    return 0
}

run "$TRAIN_LIMIT" train
run "$EVAL_LIMIT" eval
run "$COMPILE_LIMIT" compile
echo "== summary"
"$PY" benchmarks/gpu_bench.py --section summary "${ARGS[@]}"
echo "total $(( $(date +%s) - start )) s"
