#!/usr/bin/env bash
# Set up and run the main job on the built-in demo data, offline:
#   install the requirements, extract 4 synthetic volumes with a random-weight DINOv3
#   (local processes), audit and verify the cache with a preview PNG, load it as training
#   batches, say what it made and where to go next, and end with a linear probe of its features.
# Usage: bash demo.sh [OUTPUT_DIR]   (default ./demo_cache)
#   DEMO_SKIP_INSTALL=1 skips the pip step (the requirements are already installed, as in CI).
# Demo-sized: 32^3 label voxels per volume (real runs: 128^3, --output-image-dim) and a tiny
# random-weight model with 192 channels (ViT-L: 1024), so it runs in about a minute on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-demo_cache}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu

install_torch() {
    # keep a torch that imports (your own build); a CUDA build only where there is a GPU
    if $PY -c "import torch" 2>/dev/null; then return; fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        $PY -m pip install -q torch==2.13.0
    elif $PY -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/', timeout=5)" "$CPU_TORCH_INDEX" 2>/dev/null; then
        echo "== no GPU here: installing a CPU build of torch (the default one is a multi-GB CUDA build)"
        $PY -m pip install -q torch --index-url "$CPU_TORCH_INDEX"
    else
        echo "== no GPU here, but $CPU_TORCH_INDEX is unreachable: installing torch from the default index"
        $PY -m pip install -q torch==2.13.0
    fi
}

if [ "${DEMO_SKIP_INSTALL:-0}" != 1 ]; then
    install_torch
    $PY -m pip install -q -r requirements.txt
fi
OUT_ABS=$($PY -c 'import sys, pathlib; print(pathlib.Path(sys.argv[1]).absolute())' "$OUT")
PREVIEWS="$OUT_ABS/previews"

echo "== extracting volumes 0-3 into $OUT_ABS (synthetic EM data, random-weight model: not real features)"
echo "   demo-sized: 32^3 label voxels per volume, 2 volumes at a time on 1 core each"
$PY submit_preprocessing_jobs.py --output-dir "$OUT_ABS" --num-volumes 4 --scheduler local --no-gpu \
    --max-concurrent 2 --num-processors 1 \
    --source synthetic --organelles cell nuc mito --model-id random:tiny --output-image-dim 32
echo "== auditing and verifying the cache, with a preview PNG per volume"
$PY check_preprocessing.py --output-dir "$OUT_ABS" --verify-all --preview "$PREVIEWS"

# the three lines printed at the end, run here as they are printed
TRAINING_LINES="from preprocessed_dataloader import create_preprocessed_dataloader
loader = create_preprocessed_dataloader(\"$OUT_ABS\", batch_size=2, shuffle=True)
for features, gt, mask in loader:"
echo "== loading it for training"
$PY -c "$TRAINING_LINES
    print('batch: features', tuple(features.shape), features.dtype, '| gt', tuple(gt.shape), gt.dtype,
          '| mask', None if mask is None else tuple(mask.shape))"

cat <<EOF

== what you have now
cache:    $OUT_ABS  (4 volumes; files per volume: docs/cache-format.md)
preview:  $PREVIEWS/volume_000000_preview.png  (a slice of volume 0: features, labels, mask)
viewer:   $PY check_preprocessing.py --output-dir $OUT_ABS --view 0
training: (from this directory, $(pwd))
    $(echo "$TRAINING_LINES" | sed -n 1p)
    $(echo "$TRAINING_LINES" | sed -n 2p)
    $(echo "$TRAINING_LINES" | sed -n 3p) ...
next:     real data and a real model: README.md, "Real data: quick start"
EOF

echo
echo "== what the features are worth: a linear probe per class, trained on volumes 0-2, tested on volume 3"
echo "   (random weights: expect little; real features should beat both baselines, see docs/probe.md)"
$PY probe_features.py --cache "$OUT_ABS" --steps 100 --png "$OUT_ABS/probe.png"
