"""`.txt` file lists and flat image folders: parsing, errors with line numbers, labels, one scan per run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from moco_transfer import file_lists
from moco_transfer.data import DataError, make_datasets
from moco_transfer.file_lists import pretrain_samples, read_file_list, scan_once
from moco_transfer.pretrain.config import resolve_config
from moco_transfer.pretrain.data import SeededItems, build_pretrain_dataset, build_pretrain_loader, seed_epoch
from moco_transfer.pretrain.gpu_pipeline import ImageBytesDataset

CPU = torch.device("cpu")


def write_images(folder: Path, names: list[str], size: int = 20) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        pixels = np.full((size, size, 3), (10 * i) % 256, np.uint8)
        pixels[:, : size // 2, i % 3] = 200
        Image.fromarray(pixels).save(folder / name)
        paths.append(folder / name)
    return paths


def test_a_list_takes_paths_from_its_own_folder_and_orders_integer_labels_numerically(tmp_path):
    images = write_images(tmp_path / "images", ["a.png", "b.png", "c d.png", "e.jpg"])
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text("# path label\n"
                       "../images/a.png 10\n"
                       "\n"
                       "../images/b.png\t2\n"
                       "../images/c d.png 2\n"                      # a path with a space, then its label
                       f"{images[3]} 10\n")                         # absolute paths stay as they are
    found = read_file_list(listing)
    assert found.labelled and found.classes == ["2", "10"]          # 2 before 10, not as strings
    assert found.samples == [(str(tmp_path / "lists" / "../images/a.png"), 1),
                             (str(tmp_path / "lists" / "../images/b.png"), 0),
                             (str(tmp_path / "lists" / "../images/c d.png"), 0), (str(images[3]), 1)]
    unlabelled = tmp_path / "images" / "all.txt"
    unlabelled.write_text("a.png\nc d.png\n")                       # a whole line naming a file: no label
    found = read_file_list(unlabelled)
    assert not found.labelled and [t for _, t in found.samples] == [-1, -1]
    assert found.samples[1][0] == str(tmp_path / "images" / "c d.png")


def test_a_line_naming_a_missing_file_is_an_error_with_its_line_number(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0\n# comment\nmissing.png 1\nb.png 1\n")
    with pytest.raises(DataError, match=r"list\.txt: no such file at line 3: missing\.png; relative paths are taken "
                                        r"from " + str(tmp_path)):
        read_file_list(listing)
    listing.write_text("a.png 0\nb.png\n")
    with pytest.raises(DataError, match="line 1 is labelled but line 2 is unlabelled; label all lines or none"):
        read_file_list(listing)
    listing.write_text("# nothing\n")
    with pytest.raises(DataError, match="names no files"):
        read_file_list(listing)


def test_a_flat_folder_and_a_list_pretrain_as_unlabelled_sets_on_both_pipelines(tmp_path):
    flat = tmp_path / "flat"
    write_images(flat, [f"img_{i:02d}.png" for i in range(8)])
    (flat / "notes.txt").write_text("not an image")  # skipped: not an image extension
    listing = tmp_path / "pretrain.txt"
    listing.write_text("".join(f"flat/img_{i:02d}.png\n" for i in range(8)))
    for data in (flat, listing):
        cfg = resolve_config(overrides={"data": str(data), "image_size": 16, "batch_size": 4, "moco_k": 8,
                                        "workers": 0, "data_pipeline": "cpu", "device": "cpu"})
        assert cfg.preset == "mocov2"
        dataset = build_pretrain_dataset(cfg, CPU)
        assert isinstance(dataset, SeededItems) and len(dataset) == 8 and set(dataset.targets) == {-1}
        loader = build_pretrain_loader(cfg, dataset, CPU)
        seed_epoch(loader, 0, 0)
        views, targets, bad = next(iter(loader))
        assert views[0].shape == views[1].shape == (4, 3, 16, 16) and targets.tolist() == [-1] * 4 and bad == []
        device_set = build_pretrain_dataset(resolve_config(overrides={**cfg.to_dict(), "data_pipeline": "gpu"}), CPU)
        assert isinstance(device_set, ImageBytesDataset) and len(device_set) == 8


def test_the_evaluators_need_labels_and_say_so(tmp_path):
    write_images(tmp_path / "flat", ["a.png", "b.png"])
    with pytest.raises(DataError, match="images without class subfolders; the evaluators need labels"):
        make_datasets(tmp_path / "flat", None, None, 16)
    write_images(tmp_path / "split" / "train", ["a.png", "b.png"])
    write_images(tmp_path / "split" / "val" / "cat", ["a.png"])
    with pytest.raises(DataError, match=r"train: 2 images without class subfolders; the evaluators need labels"):
        make_datasets(tmp_path / "split", None, None, 16)
    (tmp_path / "flat" / "train.txt").write_text("a.png\n")
    (tmp_path / "flat" / "val.txt").write_text("b.png\n")
    with pytest.raises(DataError, match="the list has no labels .*the evaluators need labels"):
        make_datasets(tmp_path / "flat" / "train.txt", None, None, 16)


def test_the_evaluators_pair_train_txt_with_val_txt(tmp_path):
    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "my_train.txt").write_text("a.png cat\nb.png dog\n")
    with pytest.raises(DataError, match=r"a second list .*expected my_val\.txt or my_test\.txt beside it"):
        make_datasets(tmp_path / "my_train.txt", None, None, 16)
    (tmp_path / "my_test.txt").write_text("c.png dog\nb.png cat\n")
    pair = make_datasets(tmp_path / "my_train.txt", None, None, 16)
    assert pair.classes == ["cat", "dog"] and pair.train.targets == [0, 1] and pair.val.targets == [1, 0]
    assert [Path(p).name for p, _ in pair.val.samples] == ["c.png", "b.png"]
    (tmp_path / "my_val.txt").write_text("c.png bird\n")  # val wins over test; its classes must match
    with pytest.raises(DataError, match=r"the train and val lists must have the same labels "
                                        r"\(only in train: \['cat', 'dog'\], only in val: \['bird'\]\)"):
        make_datasets(tmp_path / "my_train.txt", None, None, 16)


def _rank_scans(rank: int, store_path: str, data: str, out: str) -> None:
    """One of two gloo ranks: build the pretraining set from a list, count the list reads, record the samples."""
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        reads = []
        real = file_lists.read_file_list
        file_lists.read_file_list = lambda path: reads.append(path) or real(path)
        cfg = resolve_config(overrides={"data": data, "image_size": 16, "batch_size": 4, "moco_k": 8, "workers": 0,
                                        "data_pipeline": "cpu", "device": "cpu"})
        dataset = build_pretrain_dataset(cfg, CPU)
        try:
            scan_once(lambda: (_ for _ in ()).throw(DataError("nothing here")), all_ranks=True)
            error = None
        except DataError as exc:
            error = str(exc)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"reads": len(reads), "samples": dataset.samples,
                                                             "error": error}))
    finally:
        dist.destroy_process_group()


def test_under_a_process_group_rank_0_alone_scans_and_the_others_get_its_list(tmp_path):
    write_images(tmp_path, [f"{i}.png" for i in range(6)])
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{i}.png {i % 2}\n" for i in range(6)))
    env = {"OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.start_processes(_rank_scans, args=(str(tmp_path / "store"), str(listing), str(tmp_path)), nprocs=2,
                           join=True, start_method="fork")  # fork: no second torch import
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["reads"] for r in ranks] == [1, 0]
    expected = [[p, t] for p, t in pretrain_samples(listing).samples]
    assert ranks[0]["samples"] == ranks[1]["samples"] == expected
    assert ranks[0]["error"] == "nothing here" and ranks[1]["error"] == "rank 0: nothing here"
