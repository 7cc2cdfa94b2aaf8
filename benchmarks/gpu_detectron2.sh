#!/usr/bin/env bash
# Run here before a GPU check that should include the VOC part (tests/test_cuda_voc.py): copies detectron2's Python
# package from a detectron2 checkout into .gpu_detectron2/detectron2 (ignored by git; carry it along with
# .gpu_wheels), which gpu_check.sh puts on PYTHONPATH. Only the Python sources: no compiled ops (the GPU machine's
# Python differs, and R50-C4 training and the VOC evaluator run without them), no C++/CUDA sources, no caches, no
# model_zoo config link. Its pure-Python needs come from gpu_wheels.sh. See docs/voc.md, "GPU check".
#   bash benchmarks/gpu_detectron2.sh /path/to/detectron2     # the folder that holds detectron2/__init__.py's parent
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:?usage: bash benchmarks/gpu_detectron2.sh DETECTRON2_CHECKOUT}"
if [ ! -f "$src/detectron2/__init__.py" ]; then
    echo "gpu_detectron2: $src/detectron2/__init__.py not found (pass the checkout, the parent of detectron2/)" >&2
    exit 1
fi
rm -rf .gpu_detectron2
mkdir -p .gpu_detectron2
tar -C "$src" --exclude='__pycache__' --exclude='*.pyc' --exclude='*.so' --exclude='detectron2/layers/csrc' \
    --exclude='detectron2/model_zoo/configs' -cf - detectron2 | tar -C .gpu_detectron2 -xf -
du -sh .gpu_detectron2
