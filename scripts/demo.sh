#!/usr/bin/env bash
# The bundled demo, end to end on CPU: digits -> HDF5 cache -> tiny DiT -> PNG grid.
# Re-running continues where it stopped (finished phases return at once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CONFIG=configs/demo/digits.yaml
$PY main.py -c $CONFIG -p extract "$@"
$PY main.py -c $CONFIG -p train "$@"
$PY main.py -c $CONFIG -p sample "$@"
echo "grid: runs/demo_digits/samples/grid.png"
