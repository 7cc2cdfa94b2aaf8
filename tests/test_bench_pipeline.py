"""Smoke test of benchmarks/bench_pipeline.py --quick: every measurement runs and prints a positive rate."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pipeline.py"


@pytest.mark.slow
def test_bench_pipeline_quick_prints_every_rate_and_ratio(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\(\w\)|    end-to-end)[^\n]*?([\d.]+) img/s", out,
                                                                 re.M)}
    assert set(rates) == {"(a)", "(b)", "(c)", "(d)", "    end-to-end"}, out
    assert all(math.isfinite(r) and r > 0 for r in rates.values()), out
    ratios = [float(r) for r in re.findall(r"([\d.]+) of the model-only step", out)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios), out
    assert "\r" not in done.stderr  # train_one_epoch's bars: plain lines when not on a terminal
    assert list(tmp_path.glob("bench_pipeline_*")) == []  # the synthetic folder is removed afterwards
