#!/usr/bin/env bash
# The serving venv .venv-triton: the tritonserver bundled in nvidia-pytriton (Python backend only),
# numpy 1.x (BLS calls break under numpy 2 inside the Python stub) and the same onnxruntime as
# .venv, so the CPU harness (examples/triton_cpu.py) computes what the in-process runtime does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-triton/bin/python ]; then
  "$PY" -m venv .venv-triton
fi
ORT=$(.venv/bin/python -c "import onnxruntime; print(onnxruntime.__version__)" 2>/dev/null || true)
.venv-triton/bin/python -m pip install -q --upgrade pip
.venv-triton/bin/python -m pip install -q "numpy<2" "onnxruntime${ORT:+==$ORT}" "nvidia-pytriton==0.7.0"
