"""Smoke test of benchmarks/bench_pipeline.py --quick, in process: every measurement runs, prints a positive rate
and lands in the --json file."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pipeline.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # its JPEG writers are pickled by module name
    return importlib.import_module("bench_pipeline")


@pytest.mark.slow
def test_bench_pipeline_quick_prints_every_rate_and_ratio(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    threads = torch.get_num_threads()
    out_json = tmp_path / "figures.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--quick", "--device", "cpu", "--json", str(out_json)])
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)  # --quick runs the step on one thread
    captured = capsys.readouterr()
    out = captured.out
    assert "\r" not in captured.err  # train_one_epoch's bars: plain lines when not on a terminal
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\(\w\)|    end-to-end)[^\n]*?([\d.]+) img/s", out,
                                                                 re.M)}
    assert set(rates) == {"(o)", "(a)", "(b)", "(c)", "(d)", "    end-to-end"}, out
    assert all(math.isfinite(r) and r > 0 for r in rates.values()), out
    ratios = [float(r) for r in re.findall(r"([\d.]+) of the model-only step", out)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios), out
    figures = json.loads(out_json.read_text())
    assert figures["d_gpu_over_c"] == pytest.approx(ratios[1], abs=0.006)
    assert figures["b_over_c"] == pytest.approx(figures["b_device_pipeline"] / figures["c_model_only_step"])
    assert figures["o_ratio_one_thread"] > 0 and figures["o_ratio_all_cores"] > 0
    assert "e_compile" not in figures  # (e) runs on CUDA only unless --compile
    assert list(tmp_path.glob("bench_pipeline_*")) == []  # the synthetic folder is removed afterwards


def test_loader_rate_times_only_the_asked_batches_after_start_up(bench):
    pulled: list[int] = []

    def batches():
        for i in range(100):
            pulled.append(i)
            yield i

    # batch 1 starts the clock (0 and 1: start-up), 3 more are timed, nothing is drawn after them
    assert bench.loader_rate(batches(), torch.device("cpu"), batch=4, skip=1, batches=3) > 0
    assert pulled == [0, 1, 2, 3, 4]
