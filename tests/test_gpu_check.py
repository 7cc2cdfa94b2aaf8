"""benchmarks/gpu_check.sh and gpu_check.py without a GPU: one line and exit 1, and the whole report on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_the_check_says_so_in_one_line_and_fails():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [f"gpu_check: no CUDA device is visible to {sys.executable} "
                                        "(torch.cuda.is_available() is False); nothing to check"]


@pytest.mark.slow
def test_the_report_on_the_cpu_has_every_part(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--tests",
                           "tests/test_cuda.py", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    tests, bench = report["tests"], report["bench"]
    assert tests["failed"] == tests["error"] == 0 and tests["skipped"] >= 10 and tests["exit_code"] == 0
    assert bench["c_model_only_step"] > 0 and bench["d_gpu_over_c"] > 0 and bench["b_over_c"] > 0
    targets = report["targets"]
    assert targets["race test: 0 corrupted victims"][0] is None  # the suite skipped: not measured, not "met"
    assert targets["end to end, device pipeline >= 0.90 of the model-only step"][0] in (True, False)
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# GPU check: CPU (smoke run)") and "| (c) model-only step |" in md
    assert "race test: 0 corrupted victims: not measured" in md
