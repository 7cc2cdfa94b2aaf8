"""kNN vote arithmetic, retrieval metrics, FAISS vs brute force, and `moco eval knn` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from moco_transfer.cli import main
from moco_transfer.faiss_index import FaissGallery
from moco_transfer.knn import (
    average_precision,
    knn_classification,
    knn_vote,
    mean_average_precision,
    recall_at_k,
    search_neighbours,
    topk_accuracy,
    torch_search,
    weighted_knn_predict,
)

from .eval_helpers import make_checkpoint, make_image_folder


def test_weighted_vote_hand_computed() -> None:
    sims = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.2, 0.1]])
    labels = torch.tensor([[1, 0, 1], [2, 2, 0]])
    scores = knn_vote(sims, labels, num_classes=3, temperature=0.1)
    expected = torch.tensor([[math.exp(5), math.exp(9) + math.exp(1), 0.0],
                             [math.exp(1), 0.0, 2 * math.exp(2)]])
    assert torch.allclose(scores, expected, rtol=1e-5)
    # two close neighbours of class 0 outvote one slightly closer neighbour of class 1 at T=0.07 ...
    s = knn_vote(torch.tensor([[0.80, 0.79, 0.78]]), torch.tensor([[1, 0, 0]]), 2, 0.07)
    assert s.argmax().item() == 0
    # ... but not one much closer neighbour: exp((0.9 - 0.6) / 0.07) = 72.9 > 2
    s = knn_vote(torch.tensor([[0.90, 0.60, 0.60]]), torch.tensor([[1, 0, 0]]), 2, 0.07)
    assert s.argmax().item() == 1


def test_topk_accuracy_and_weighted_predict() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 2, 0]), ks=(1, 2))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(100 / 3)
    gallery = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    query = F.normalize(torch.tensor([[1.0, 0.05]]), dim=1)
    scores = weighted_knn_predict(gallery, torch.tensor([0, 0, 1]), query, 2, k=2, temperature=0.5)
    sims = query @ gallery.T
    assert torch.allclose(scores[0], torch.tensor([(sims[0, 0] / 0.5).exp() + (sims[0, 1] / 0.5).exp(), 0.0]))


def test_several_k_from_one_search_match_separate_predictions() -> None:
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    train_l = torch.randint(0, 5, (300,), generator=g)
    query = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    query_l = torch.randint(0, 5, (40,), generator=g)
    sims, idx = torch_search(train, query, 50)
    res = knn_classification(sims, train_l[idx], query_l, 5, ks=(1, 10, 50), temperature=0.07)
    for k in (1, 10, 50):
        acc = topk_accuracy(weighted_knn_predict(train, train_l, query, 5, k, 0.07, chunk_size=7), query_l)
        assert res[k] == {"top1": pytest.approx(acc[1]), "top5": pytest.approx(acc[5])}
    with pytest.raises(ValueError, match="k=60"):
        knn_classification(sims, train_l[idx], query_l, 5, ks=(60,))


def test_recall_and_average_precision_hand_computed() -> None:
    neighbour_labels = torch.tensor([[2, 1, 1], [0, 0, 1], [2, 2, 2]])
    recall = recall_at_k(neighbour_labels, torch.tensor([1, 0, 1]), ks=(1, 2, 3))
    assert recall == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 3: pytest.approx(200 / 3)}
    ap = average_precision(torch.tensor([[True, False, True, False], [False, True, False, False],
                                         [False, False, False, False]]))
    assert ap[0].item() == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert ap[1].item() == pytest.approx(1 / 2)
    assert math.isnan(ap[2].item())


def test_mean_average_precision_over_a_ranked_gallery() -> None:
    angles = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])  # radians from the first query: ranking is this order
    gallery = torch.stack([angles.cos(), angles.sin()], dim=1)
    gallery_l = torch.tensor([0, 1, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.0], [math.cos(0.4), math.sin(0.4)]])
    # query 0 (class 0): ranking 0 1 2 3 4 -> relevant at 1, 3 -> AP (1 + 2/3) / 2
    # query 1 (class 1): ranking 4 3 2 1 0 -> relevant at 1, 2, 4 -> AP (1 + 1 + 3/4) / 3
    m, n = mean_average_precision(gallery, gallery_l, queries, torch.tensor([0, 1]), chunk_size=1)
    assert n == 2
    assert m == pytest.approx(100 * ((1 + 2 / 3) / 2 + (1 + 1 + 3 / 4) / 3) / 2, rel=1e-6)
    # depth 2: query 0 has hits [1, 0] over min(2, 2) relevant -> 1/2; query 1 hits [1, 1] -> 1
    m2, _ = mean_average_precision(gallery, gallery_l, queries, torch.tensor([0, 1]), depth=2)
    assert m2 == pytest.approx(100 * (0.5 + 1.0) / 2, rel=1e-6)
    # a query whose class is absent from the gallery is left out, not scored 0
    m3, n3 = mean_average_precision(gallery, gallery_l, queries, torch.tensor([0, 7]))
    assert n3 == 1 and m3 == pytest.approx(100 * (1 + 2 / 3) / 2, rel=1e-6)


def test_faiss_agrees_with_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    gallery = F.normalize(torch.randn(3000, 64, generator=g), dim=1)
    queries = F.normalize(torch.randn(257, 64, generator=g), dim=1)
    ref_s, ref_i = torch_search(gallery, queries, 30, chunk_size=100)
    index = FaissGallery(gallery)
    assert not index.on_gpu
    s, i = index.search(queries, 30, batch_size=64)
    assert torch.allclose(s, ref_s, atol=1e-5)
    assert (i == ref_i).float().mean().item() == 1.0
    s2, i2, backend = search_neighbours(gallery, queries, 30, "faiss", 100)
    assert backend == "faiss-cpu" and torch.equal(i2, i)
    s3, i3, backend = search_neighbours(gallery, queries, 30, "torch", 100)
    assert backend == "torch" and torch.equal(i3, ref_i)
    assert index.search(queries[:2], 5000)[1].shape == (2, 3000)  # k capped at the gallery size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("knn")
    return make_checkpoint(root / "ck.pth.tar", image_size=16), make_image_folder(root / "data", per_class=6)


def test_moco_eval_knn_end_to_end(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    ckpt, data = tiny
    args = ["eval", "knn", str(ckpt), "--data", str(data), "-o", str(tmp_path / "out"), "--k", "1,3,20",
            "--cache-dir", str(tmp_path / "cache"), "-j", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "kNN k=   3" in result.output and "recall@1" in result.output
    report = json.loads((tmp_path / "out" / "knn.json").read_text())
    assert set(report["knn"]) == {"1", "3", "20"} and report["search_backend"] == "faiss-cpu"
    assert report["num_train"] == report["num_val"] == 18 and report["feature_dim"] == 512
    # three solid-colour classes: even a random network separates them
    assert report["knn"]["3"]["top1"] > 90 and report["retrieval"]["recall@1"] > 90
    assert report["knn"]["20"]["top5"] == 100.0  # 3 classes, so top-5 is always right
    assert report["warnings"] == ["k=20 exceeds the 18 gallery images: every gallery image votes"]
    assert 0 < report["retrieval"]["mAP"] <= 100 and report["retrieval"]["queries_scored"] == 18
    assert report["features_from_cache"] == {"train": False, "val": False}
    assert (tmp_path / "out" / "knn_gallery.png").stat().st_size > 1000
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    report2 = json.loads((tmp_path / "out" / "knn.json").read_text())
    assert report2["features_from_cache"] == {"train": True, "val": True}
    assert report2["knn"] == report["knn"]


def test_no_scored_query_writes_map_null_with_the_reason(tmp_path: Path, tiny: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """mAP is NaN when no query has a same-class gallery image: knn.json holds null, strict JSON, and says why."""
    from moco_transfer.eval import knn as knn_module

    monkeypatch.setattr(knn_module, "mean_average_precision", lambda *a, **k: (float("nan"), 0))
    ckpt, data = tiny
    result = CliRunner().invoke(main, ["eval", "knn", str(ckpt), "--data", str(data), "-o", str(tmp_path), "--k", "3",
                                       "--no-cache", "-j", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "knn.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert report["retrieval"]["mAP"] is None and report["retrieval"]["queries_scored"] == 0
    assert any("mAP" in w and "queries_scored 0" in w for w in report["warnings"])


def test_moco_eval_knn_bad_inputs(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    ckpt, data = tiny
    run = lambda *a: CliRunner().invoke(main, ["eval", "knn", "-o", str(tmp_path / "o"), "--no-cache", *a])  # noqa: E731
    r = run(str(ckpt), "--data", str(data / "train"))
    assert r.exit_code == 2 and "no train/ folder" in r.output
    mismatch = make_image_folder(tmp_path / "mm", {"train": ["a", "b"], "val": ["a", "d"]}, per_class=1)
    r = run(str(ckpt), "--data", str(mismatch))
    assert r.exit_code == 2 and ("same class folders" in r.output or "same classes" in r.output)
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    r = run(str(tmp_path / "other.pth"), "--data", str(data))
    assert r.exit_code == 2 and "no query-encoder keys" in r.output and "other.pth" in r.output
    r = run(str(ckpt), "--k", "0,5")
    assert r.exit_code == 2 and "--k" in r.output
