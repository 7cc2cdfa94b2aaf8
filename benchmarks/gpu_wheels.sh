#!/usr/bin/env bash
# Run here (a machine with a registry) before a GPU check: wheels of the pure-Python packages that
# benchmarks/gpu_check.sh needs and the GPU machine lacks (pytest and pytest-xdist, whose options
# pyproject.toml's addopts name; detectron2's needs for the VOC part),
# for its Python (3.12), into .gpu_wheels/
# (ignored by git; pass it along, e.g. the device tool's `carry: [".gpu_wheels"]`).
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p .gpu_wheels
python -m pip download --quiet --disable-pip-version-check --python-version "$python_version" --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform any -d .gpu_wheels pytest pytest-xdist
# detectron2's pure-Python needs, for the VOC part of the suite (its sources: gpu_detectron2.sh; docs/voc.md).
# Without their dependencies: numpy and pyyaml are there. pycocotools is compiled: the wheel for the GPU machine's
# Python. fvcore, iopath and antlr4 (omegaconf 2.3 imports it) have sdists: built here into pure-Python wheels.
python -m pip download --quiet --disable-pip-version-check --python-version "$python_version" --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform any --no-deps -d .gpu_wheels \
    pycocotools termcolor yacs tabulate portalocker cloudpickle "omegaconf>=2.1,<2.4"
python -m pip wheel --quiet --disable-pip-version-check --no-deps -w .gpu_wheels fvcore iopath \
    "antlr4-python3-runtime==4.9.*"
ls .gpu_wheels
