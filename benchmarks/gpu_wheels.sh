#!/usr/bin/env bash
# Run here (a machine with a registry) before a GPU check: wheels of the pure-Python packages that
# benchmarks/gpu_check.sh needs and the GPU machine lacks, for its Python (3.12), into .gpu_wheels/
# (ignored by git; pass it along, e.g. the device tool's `carry: [".gpu_wheels"]`).
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p .gpu_wheels
python -m pip download --quiet --disable-pip-version-check --python-version "$python_version" --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform any -d .gpu_wheels pytest
ls .gpu_wheels
