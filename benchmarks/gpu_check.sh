#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU: `bash benchmarks/gpu_check.sh [--out DIR]`.
# Runs the GPU suite (`pytest -m cuda`), then bench_pipeline.py at ResNet-50, 224 px, batch 256, bf16 +
# channels_last, and writes DIR/gpu_check.md and DIR/gpu_check.json (default DIR: the current folder).
# Generates its own data and downloads nothing; at most about 6 minutes on one H200 (+2 for the VOC part, which
# runs when .gpu_detectron2/ is there: see benchmarks/gpu_detectron2.sh and docs/voc.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device is visible to $PYTHON (torch.cuda.is_available() is False); nothing to check"
    exit 1
fi
if ! "$PYTHON" -c "import pytest, xdist" 2>/dev/null; then  # no registry there: wheels from gpu_wheels.sh
    "$PYTHON" -m pip install --quiet --no-index --find-links .gpu_wheels pytest pytest-xdist
fi
if [ -d .gpu_detectron2/detectron2 ]; then  # detectron2's Python sources (gpu_detectron2.sh): the VOC part runs
    export PYTHONPATH="$PWD/.gpu_detectron2${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PYTHON" -c "import detectron2.engine, detectron2.evaluation" 2>/dev/null; then  # its needs: gpu_wheels.sh
        "$PYTHON" -m pip install --quiet --no-index --find-links .gpu_wheels fvcore iopath omegaconf pycocotools \
            termcolor yacs tabulate portalocker cloudpickle
    fi
fi
if ! "$PYTHON" -c "import moco_transfer.pretrain" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
