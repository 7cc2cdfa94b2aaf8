"""The one writer of result files: atomic, strict JSON (a non-finite number is null); readers take null as missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moco_transfer.eval.report import read_knn
from moco_transfer.fileio import write_json_atomic


def strict_loads(text: str) -> object:
    """json.loads as a strict reader (JavaScript, jq, Go) does it: NaN and Infinity are not JSON."""
    def reject(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=reject)


def test_non_finite_numbers_are_written_as_null_at_any_depth(tmp_path: Path) -> None:
    report = {"train_loss": float("nan"), "history": [{"loss": 1.5}, {"loss": float("inf")}],
              "retrieval": {"mAP": float("-inf"), "queries_scored": 0}, "pair": (1.0, float("nan")), "ok": 2}
    write_json_atomic(report, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    assert strict_loads(text) == {"train_loss": None, "history": [{"loss": 1.5}, {"loss": None}],
                                  "retrieval": {"mAP": None, "queries_scored": 0}, "pair": [1.0, None], "ok": 2}
    with pytest.raises(ValueError, match="NaN is not JSON"):
        strict_loads(json.dumps({"x": float("nan")}))  # what Path.write_text(json.dumps(...)) used to write


def test_an_interrupted_write_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "linear.json"
    write_json_atomic({"final": {"top1": 71.5}}, path)
    before = path.read_bytes()

    def fail(obj: object) -> object:  # json.dump has already written the keys before this one when it raises
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_json_atomic({"final": {"top1": 72.0}, "history": ["x"] * 1000, "later": object()}, path, default=fail)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["linear.json"]  # no temporary file left beside it


def test_the_report_reads_null_as_missing(tmp_path: Path) -> None:
    path = tmp_path / "knn.json"
    write_json_atomic({"knn": {"10": {"top1": float("nan")}, "20": {"top1": 80.0}}, "data": "d", "checkpoint": "c"},
                      path)
    (found,) = read_knn(path, knn_ks=(10, 20))
    assert [m.values for m in found.measurements] == [[80.0]]  # k=10's null is no measurement, not a zero
