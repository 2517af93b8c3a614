#!/usr/bin/env bash
# The main job on a fresh machine: install, export + build the shipped digits family with the best
# backend present, sample a guided grid (base 16x16 -> upsampler 32x32) through the torch-free
# runtime, and print where the images are and the parity figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh
export OMP_WAIT_POLICY=PASSIVE
BUILD=${BUILD:-out/digits}
OUT=${OUT:-out/samples}

# Export (fp32 ONNX + parity check), then build the engines: TensorRT plans where TensorRT and a
# GPU exist, ONNX Runtime artefacts otherwise.
.venv/bin/gdexport build --fp32 --set digits -o "$BUILD"

# Guided DDIM, two samples of each digit, through the runtime (ONNX Runtime on a CPU machine).
.venv/bin/python -m runtime.sample --engine "$BUILD" \
    --classes 0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9 --steps ddim25 --upsampler-steps ddim25 \
    --seed 0 --out "$OUT"

# Whole-trajectory parity of the runtime against the PyTorch reference, recorded in the manifest.
.venv/bin/gdexport check "$BUILD" --trajectory --steps 25
echo
echo "images: $OUT/grid.png (32x32 cascade), $OUT/base_grid.png (16x16 base), $OUT/sample_*.png"
echo "build:  $BUILD (manifest.json; \`gdexport info $BUILD\` prints it)"
