#!/usr/bin/env bash
# The course's GPU check, one command (benchmarks/gpu_check.py says what it measures):
#   benchmarks/gpu_check.sh            one CUDA GPU: first every notebook in full mode against the
#                                      fake Hub with the tiny models on the GPU
#                                      (scripts/rehearse.py --cuda, build/rehearsal-cuda/REPORT.md;
#                                      aim: under 4 min), then the measurements (8-min budget on
#                                      H100/H200): GPU_CHECK.md
#   benchmarks/gpu_check.sh --dry-run  a CPU, tiny configs, seconds (CI): the CUDA rehearsal's
#                                      wiring, build/gpu-check-dry.md, and
#                                      bench_vs_trl.py --device cuda --dry-run
# Nothing is downloaded: models are built from their configs with random weights. $PYTHON
# (default: .venv/bin/python if present, else python3) needs dpo_minimal's dependencies (torch,
# transformers, peft, datasets, tqdm; the rehearsal also nbclient and ipykernel, and trl for
# notebook 07 and bench_vs_trl.py); dpo_minimal itself is taken from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import dpo_minimal" 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import dpo_minimal's dependencies:" >&2
  "$PYTHON" -c "import dpo_minimal" 2>&1 | tail -1 >&2 || true
  echo "Install them first (pip install -e . keeps the machine's CUDA torch if it is >= 2.4)," >&2
  echo "or point PYTHON at an environment that has them." >&2
  exit 2
fi
status=0
if [ "${1:-}" = "--dry-run" ]; then
  "$PYTHON" scripts/rehearse.py --cuda --dry-run || status=1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # The notebooks' CUDA path first: a failure is reported, and the measurements still run.
  timeout "${REHEARSE_TIMEOUT:-600}" "$PYTHON" scripts/rehearse.py --cuda || status=1
fi
# 8 minutes is the budget on one H100/H200; a slower GPU may need more (TIMEOUT=...).
timeout "${TIMEOUT:-480}" env HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  "$PYTHON" benchmarks/gpu_check.py "$@" || status=1
if [ "${1:-}" = "--dry-run" ]; then
  timeout "${TIMEOUT:-480}" env HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    "$PYTHON" benchmarks/bench_vs_trl.py --device cuda --dry-run || status=1
fi
exit $status
