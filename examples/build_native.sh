#!/usr/bin/env bash
# Build the native runtime (runtime/native) into build/native/ against the openvino wheel:
# creates or reuses .venv, installs openvino there, configures and builds with CMake.
#   bash examples/build_native.sh [extra cmake -D options]
# Env: PYTHON (interpreter to use instead of .venv's), BUILD_DIR (default build/native), JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON3:-python3}" -m venv .venv
  fi
  PYTHON=.venv/bin/python
fi
if ! "$PYTHON" -c "import openvino" 2>/dev/null; then
  "$PYTHON" -m pip install -q "openvino>=2024.0"
fi
OV_CMAKE=$("$PYTHON" -c "import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), 'cmake'))")
BUILD_DIR=${BUILD_DIR:-build/native}
cmake -S runtime/native -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DOpenVINO_DIR="$OV_CMAKE" "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "${JOBS:-2}"
echo "built $BUILD_DIR/libgdexport_rt.so and $BUILD_DIR/gdexport-sample"
