#!/usr/bin/env bash
# The course's GPU check, one command (benchmarks/gpu_check.py says what it measures):
#   benchmarks/gpu_check.sh            one CUDA GPU (8-min budget on H100/H200): GPU_CHECK.md
#   benchmarks/gpu_check.sh --dry-run  a CPU, tiny configs, seconds (CI): build/gpu-check-dry.md
# Nothing is downloaded: models are built from their configs with random weights. $PYTHON
# (default: .venv/bin/python if present, else python3) needs dpo_minimal's dependencies (torch,
# transformers, peft, datasets, tqdm); dpo_minimal itself is taken from this checkout.
set -euo pipefail
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
if [ "${1:-}" != "--dry-run" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# 8 minutes is the budget on one H100/H200; a slower GPU may need more (TIMEOUT=...).
exec timeout "${TIMEOUT:-480}" env HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  "$PYTHON" benchmarks/gpu_check.py "$@"
