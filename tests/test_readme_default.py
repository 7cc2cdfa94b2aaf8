"""The README's first command, run whole: `moco pretrain` on the embedded default beats random weights.

It is the longest test (about 10 minutes on one thread of this project's 2-core box), so tests/conftest.py
schedules it first: under `pytest -n 2` (the README's test command) it runs beside the rest of the suite.
"""

from __future__ import annotations

import pytest

from moco_transfer.pretrain.config import resolve_config
from moco_transfer.pretrain.engine import run_pretraining

from .test_pretrain_engine import read_log


@pytest.mark.slow
def test_embedded_default_beats_random_weights_at_a_fixed_seed(tmp_path, one_thread):
    """The README's first command (all 30 epochs) must beat random weights by at least 10 kNN points.

    Pinned to the setting that was measured: CPU, CPU pipeline (the preset's one loader worker), one torch
    thread (float reductions, and so the result, change with the thread count). Measured on this project's
    2-core box (seed 0, `OMP_NUM_THREADS=1 moco pretrain --device cpu --data-pipeline cpu`, 2026-11-30):
    55.56% against 28.06% for random weights. Shortened to 15 epochs the same run gave 37.2% (+9.2): the
    cosine schedule then ends before the features have formed, so the test runs the whole schedule.
    """
    cfg = resolve_config(overrides={"knn_every": 0, "device": "cpu", "data_pipeline": "cpu",
                                    "output": str(tmp_path / "run")})
    assert cfg.preset == "scattered-digits" and cfg.head_bn and not cfg.flip and cfg.seed == 0 and cfg.epochs == 30
    summary = run_pretraining(cfg)
    assert summary["knn_top1"] >= summary["knn_top1_random_init"] + 10.0, summary
    losses = [r["loss"] for r in read_log(tmp_path / "run")]
    assert losses[-1] < losses[0] - 1.0 and summary["last"]["acc1"] > 3.0  # loss falls, acc1 does not collapse
