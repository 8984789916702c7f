#!/usr/bin/env bash
# Set up and run the main job on the built-in demo data, offline:
#   install the requirements, extract 4 synthetic volumes with a random-weight DINOv3
#   (local processes), audit and verify the cache, and load it as training batches.
# Usage: bash demo.sh [OUTPUT_DIR]   (default ./demo_cache)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-demo_cache}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: where none is installed, take 2.13.0 (keep your own build if you have one)
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -r requirements.txt

echo "== extracting volumes 0-3 into $OUT (synthetic EM data, random-weight model: not real features)"
$PY submit_preprocessing_jobs.py --output-dir "$OUT" --num-volumes 4 --scheduler local --no-gpu \
    --source synthetic --organelles cell nuc mito --model-id random:tiny --output-image-dim 64
echo "== auditing and verifying the cache"
$PY check_preprocessing.py --output-dir "$OUT" --verify-all
echo "== loading it for training"
$PY preprocessed_dataloader.py --preprocessed-dir "$OUT" --batch-size 2 --num-batches 4 --num-threads 8
