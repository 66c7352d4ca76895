#!/usr/bin/env bash
# The bundled demo, end to end on CPU: digits -> HDF5 cache -> tiny DiT -> PNG grid -> 1,000 digits scored
# (FD / precision / recall / accuracy in the features of a digit classifier trained here).
# Re-running continues where it stopped (finished phases return at once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CONFIG=configs/demo/digits.yaml
$PY main.py -c $CONFIG -p extract "$@"
$PY main.py -c $CONFIG -p train "$@"
$PY main.py -c $CONFIG -p sample "$@"
$PY scripts/train_digits_classifier.py           # evaluate's feature network for the digits (seconds)
$PY scripts/reference_batch.py -c $CONFIG "$@"   # the reference batch: the cache's images
$PY main.py -c $CONFIG -p inference inference.evaluate=true "$@"
echo "grid: runs/demo_digits/samples/grid.png; scores: runs/demo_digits/eval/samples.json"
