"""Smoke test of benchmarks/real_data.py on a tiny Fashion-MNIST written here: every phase runs, the report has
every row, and the raw-pixel kNN figures equal scikit-learn's KNeighborsClassifier on the same standardised
pixels (the published table's protocol)."""

from __future__ import annotations

import gzip
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from .named_set_files import idx_bytes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_data.py"
TRAIN, TEST, MAX_TRAIN = 72, 40, 64
TINY_PRETRAIN = {"batch_size": 32, "moco_k": 64, "bn_splits": 2, "workers": 0, "data_pipeline": "cpu", "image_size": 16}


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module("real_data")


def fake_fashion_mnist(root: Path, seed: int = 2) -> dict[str, np.ndarray]:
    """Gzipped IDX files where a torchvision root keeps them. Each class is a bright block at its own place on
    noise whose spread differs from pixel to pixel, so that standardising, the metric and the 1 / distance weights
    all change which neighbours win (checked in the test)."""
    rng = np.random.default_rng(seed)
    spread = np.linspace(5, 90, 28 * 28).reshape(28, 28)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        pixels = 100 + rng.normal(0, 1, (n, 28, 28)) * spread
        for i, c in enumerate(labels):
            pixels[i, 2 * c:2 * c + 8, 4:14] += 40
        return np.clip(pixels, 0, 255).astype(np.uint8), labels

    (train_x, train_y), (test_x, test_y) = draw(TRAIN), draw(TEST)
    folder = root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for name, array in (("train-images-idx3-ubyte", train_x), ("train-labels-idx1-ubyte", train_y),
                        ("t10k-images-idx3-ubyte", test_x), ("t10k-labels-idx1-ubyte", test_y)):
        (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def sklearn_knn(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, p: int,
                weights: str = "distance", scale: bool = True) -> float:
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    x, xt = train_x.reshape(len(train_x), -1).astype(np.float64), test_x.reshape(len(test_x), -1).astype(np.float64)
    if scale:
        scaler = StandardScaler().fit(x)
        x, xt = scaler.transform(x), scaler.transform(xt)
    clf = KNeighborsClassifier(n_neighbors=5, weights=weights, p=p).fit(x, train_y)
    return 100.0 * float((clf.predict(xt) == test_y).mean())


@pytest.mark.slow
def test_benchmark_report_has_every_row_and_the_published_pixel_knn(bench, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = fake_fashion_mnist(tmp_path / "data")
    threads = torch.get_num_threads()
    opts = bench.BenchOptions(output=tmp_path / "out", data_root=str(tmp_path / "data"), epochs=1,
                              max_train=MAX_TRAIN, workers=0, pretrain_overrides=TINY_PRETRAIN, linear_epochs=5,
                              command="pytest")
    try:
        report = bench.run_benchmark(opts)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out

    train_x, train_y = data["train_x"][:MAX_TRAIN], data["train_y"][:MAX_TRAIN]
    reference = {metric: sklearn_knn(train_x, train_y, data["test_x"], data["test_y"], p)
                 for metric, p in (("L1", 1), ("L2", 2))}
    assert report["figures"]["raw_pixels"] == pytest.approx(reference, abs=1e-4), reference
    # The data tells the protocol apart from its near misses, so the equality above means something.
    for metric, p in (("L1", 1), ("L2", 2)):
        assert reference[metric] != sklearn_knn(train_x, train_y, data["test_x"], data["test_y"], p, scale=False)
        assert reference[metric] != sklearn_knn(train_x, train_y, data["test_x"], data["test_y"], p, "uniform")
    assert reference["L1"] != reference["L2"]

    figures = report["figures"]
    assert (figures["num_train"], figures["num_test"], figures["epochs"]) == (MAX_TRAIN, TEST, 1)
    methods = [r["method"] for r in report["rows"]]
    expected = ["MoCo, `fashion-mnist` preset, kNN k 20", "MoCo, `fashion-mnist` preset, kNN k 200",
                "MoCo, `fashion-mnist` preset, linear probe", "same encoder, random weights, kNN k 20",
                "same encoder, random weights, kNN k 200", "raw pixels, kNN k 5, distance-weighted, L1",
                "raw pixels, kNN k 5, distance-weighted, L2"]
    assert methods[:len(expected)] == expected
    published = {r["method"]: (r["top1"], r["source"]) for r in report["rows"][len(expected):]}
    assert [v[0] for v in published.values()] == [85.4, 85.2, 84.2, 87.1, 89.7, 94.9]
    assert all("1708.07747" in source for top1, source in published.values() if top1 != 94.9)
    for row in report["rows"]:
        assert 0.0 <= row["top1"] <= 100.0 and f"| {row['method']} | {row['top1']:.2f} |" in out
    assert report["rows"][len(expected) - 1]["top1"] == pytest.approx(reference["L2"], abs=1e-4)

    saved = json.loads((tmp_path / "out" / "real_data.json").read_text())
    assert saved["rows"] == report["rows"] and saved["command"] == "pytest"
    assert saved["machine"]["cpu_count"] >= 1 and saved["machine"]["torch"] == torch.__version__
    assert set(saved["seconds"]) == {"subset", "raw-pixel kNN", "random-weights kNN", "pretrain", "kNN",
                                     "linear probe", "total"}
    assert saved["preset"]["preset"] == "fashion-mnist" and saved["preset"]["data"] == "fashion-mnist"
    assert figures["linear"]["features_from_cache"] == {"train": True, "val": True}  # the kNN phase's features
    assert len(saved["pretrain_epochs"]) == 1
    assert Path(saved["files"]["curves_png"]).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "real_data.md").read_text().startswith("| method | top-1 (%) |")
