"""A tiny PASCAL VOC tree written by tests: VOC2007 (trainval, test) and VOC2012 (trainval), every XML field.

Also what the detectron2 tests share: a random-weight MoCo ResNet-50 checkpoint and the config overrides that
keep a trial to CPU seconds (64-pixel images, 16 sampled RoIs per image pooled to 8x8, 2 images per batch, 4
iterations with a checkpoint every 2).
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "16", "TEST.DETECTIONS_PER_IMAGE", "20",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "8",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.002", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)",
    "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.PRECISE_BN.NUM_ITER", "1",
    "DATALOADER.NUM_WORKERS", "0",
]


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """One intra-op thread in the detectron2 tests: on a busy 2-core machine two OpenMP threads wait on each other
    (measured: a 4-iteration trial took 140 s and 28 s of CPU with 2 threads, 8-53 s and 7.5 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_moco_checkpoint(path: Path) -> Path:
    """A MoCo v2 ResNet-50 checkpoint of this project's layout with random weights (seed 0)."""
    import torch

    from moco_transfer.backbone import build_resnet
    from moco_transfer.builder import MoCo
    from moco_transfer.checkpoint import with_module_prefix

    torch.manual_seed(0)
    model = MoCo(partial(build_resnet, "resnet50"), dim=128, K=256, mlp=True)
    torch.save({"epoch": 1, "arch": "resnet50", "state_dict": with_module_prefix(model.state_dict()),
                "optimizer": {}, "config": {}}, path)
    return path

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def _xml(folder: str, image_id: str, w: int, h: int, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1), difficult in objects)
    return (f"<annotation><folder>{folder}</folder><filename>{image_id}.jpg</filename>"
            f"<source><database>synthetic</database></source>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>0</segmented>"
            f"{objs}</annotation>")


def write_voc(root: Path, n_trainval07: int = 4, n_test07: int = 4, n_trainval12: int = 2, size: int = 64,
              seed: int = 0, width: int | None = None, height: int | None = None) -> Path:
    """Write the tree under `root` (root/VOC2007, root/VOC2012); every class appears in the 2007 test split.

    Images are `size` pixels square, or `width` x `height` (e.g. 1333 x 800, the largest training input).
    """
    w, h = width or size, height or size
    rng = random.Random(seed)
    splits = {("VOC2007", "trainval"): n_trainval07, ("VOC2007", "test"): n_test07,
              ("VOC2012", "trainval"): n_trainval12}
    counter = 0
    for (folder, split), n in splits.items():
        base = root / folder
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        ids = []
        for i in range(n):
            counter += 1
            image_id = f"{2007 if folder == 'VOC2007' else 2012}_{counter:06d}"
            img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            objects = []
            per_image = 5 if split == "test" else 3
            for j in range(per_image):
                cls = CLASSES[(i * per_image + j) % len(CLASSES)]
                x0, y0 = rng.randrange(1, w // 2), rng.randrange(1, h // 2)
                x1, y1 = min(w, x0 + rng.randrange(12, w // 2)), min(h, y0 + rng.randrange(12, h // 2))
                draw.rectangle([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
                objects.append((cls, (x0, y0, x1, y1), int(j == per_image - 1 and split == "trainval")))
            img.save(base / "JPEGImages" / f"{image_id}.jpg", quality=90)
            (base / "Annotations" / f"{image_id}.xml").write_text(_xml(folder, image_id, w, h, objects))
            ids.append(image_id)
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def _spawned_rank(index: int, url: str, world: int, out: str) -> None:
    _rendezvous_rank(index + 1, url, world, out)


def _rendezvous_rank(rank: int, url: str, world: int, out: str) -> None:
    """One rank of a stand-in trial: joins the process group at `url` as detectron2's launch does, all-reduces."""
    import datetime
    import json
    import os

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "url": url, "sum": t.item()}))
    dist.destroy_process_group()


def rendezvous_trial(out: str, world: int = 2) -> None:
    """A trial process of `world` ranks that rendezvous at $MOCO_TRIAL_DIST_URL, as detectron2's launch makes them
    (spawned processes, init_process_group at the URL); this process is rank 0, to start one interpreter less."""
    import os

    import torch.multiprocessing as mp

    from moco_transfer.eval.detection.schedule import DIST_URL_ENV

    Path(out).mkdir(parents=True, exist_ok=True)
    url = os.environ[DIST_URL_ENV]
    others = mp.start_processes(_spawned_rank, args=(url, world, out), nprocs=world - 1, join=False,
                                start_method="spawn")
    _rendezvous_rank(0, url, world, out)
    while not others.join():
        pass
