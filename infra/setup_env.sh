#!/usr/bin/env bash
# Create .venv inside the checkout and install tempflow with its test extras.
#
# torch is installed first and pinned: a loose `torch` requirement would pull a multi-GB
# CUDA build on machines that hold the CPU wheel locally. For a CUDA machine pick the build:
#   TEMPFLOW_TORCH="torch==2.13.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash infra/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
TORCH_SPEC="${TEMPFLOW_TORCH:-torch==2.13.0}"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
.venv/bin/pip install -q -e ".[test]"
.venv/bin/python -c "import torch, diffusers, tempflow_core; print('tempflow env ready: torch', torch.__version__, '| diffusers', diffusers.__version__, '| cuda', torch.cuda.is_available())"
