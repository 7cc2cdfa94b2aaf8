"""kNN search benchmark: FAISS IndexFlatIP vs exact torch matmul + top-k on the same synthetic features.

Each method runs in its own subprocess so that its peak resident memory can be read (ru_maxrss); neighbours
are compared query by query, differences counted as ties when the similarities at the differing places
agree within 1e-5. Time is projected to ImageNet (1.28M gallery, 50k queries) linearly in gallery x queries.

    python benchmarks/bench_knn.py                       # 100k gallery, 10k queries, d = 128 and 2048
    python benchmarks/bench_knn.py --queries 2000 --dims 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

IMAGENET_GALLERY, IMAGENET_QUERIES = 1_281_167, 50_000


def make_features(n: int, q: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered, L2-normalised features (1000 centres), like class-structured embeddings."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(1000, dim, generator=g)
    gallery = centres[torch.randint(0, 1000, (n,), generator=g)] + 1.5 * torch.randn(n, dim, generator=g)
    queries = centres[torch.randint(0, 1000, (q,), generator=g)] + 1.5 * torch.randn(q, dim, generator=g)
    return torch.nn.functional.normalize(gallery, dim=1), torch.nn.functional.normalize(queries, dim=1)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: peak since start (KiB)


def reset_peak() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so generating the data is not counted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def worker(args: argparse.Namespace) -> None:
    """One method on one dimension; writes neighbours (.npz) and prints a JSON line of figures."""
    from moco_transfer.faiss_index import FaissGallery
    from moco_transfer.knn import torch_search

    gallery, queries = make_features(args.gallery, args.queries, args.dim, args.seed)
    reset_peak()
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if args.worker == "faiss":
        index = FaissGallery(gallery, threads=args.threads)
        t_build = time.perf_counter() - t0
        sims, idx = index.search(queries, args.k, args.query_batch)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        t_build = 0.0
        sims, idx = torch_search(gallery, queries, args.k, args.query_batch)
    seconds = time.perf_counter() - t0
    np.savez(args.out, sims=sims.numpy(), idx=idx.numpy())
    print(json.dumps({"seconds": seconds, "build_seconds": t_build, "peak_rss_mb": peak_rss_mb(),
                      "data_rss_mb": base, "extra_mb": peak_rss_mb() - base}))


def run_worker(method: str, dim: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--dim", str(dim), "--gallery", str(args.gallery),
           "--queries", str(args.queries), "--k", str(args.k), "--query-batch", str(args.query_batch),
           "--seed", str(args.seed), "--out", str(out)] + (["--threads", str(args.threads)] if args.threads else [])
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> dict:
    """Identical neighbour lists, ties aside: a difference counts as a tie when the similarities agree."""
    fa, fb = np.load(a), np.load(b)
    same = (fa["idx"] == fb["idx"]).all(axis=1)
    tie_only = np.ones_like(same)
    for q in np.flatnonzero(~same):
        diff = fa["idx"][q] != fb["idx"][q]
        tie_only[q] = np.allclose(fa["sims"][q][diff], fb["sims"][q][diff], atol=1e-5)
    return {"identical_rows": float(same.mean()), "identical_ties_aside": float(tie_only.mean()),
            "max_sim_diff": float(np.abs(fa["sims"] - fb["sims"]).max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dims", type=str, default="128,2048")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--query-batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="threads for both methods (0: library default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["faiss", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=str, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import faiss

    print(f"faiss {faiss.__version__} (GPUs seen: {faiss.get_num_gpus()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; gallery {args.gallery}, queries {args.queries}, k {args.k}, "
          f"query batch {args.query_batch}")
    scale = (IMAGENET_GALLERY / args.gallery) * (IMAGENET_QUERIES / args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        for dim in (int(d) for d in args.dims.split(",")):
            f = run_worker("faiss", dim, args, Path(tmp) / "faiss.npz")
            t = run_worker("torch", dim, args, Path(tmp) / "torch.npz")
            agree = compare(Path(tmp) / "faiss.npz", Path(tmp) / "torch.npz")
            print(f"\n{args.gallery} x {dim} gallery, {args.queries} queries, k={args.k}")
            for name, r in (("faiss", f), ("torch", t)):
                print(f"  {name:5s}: {r['seconds']:8.2f} s  ({args.queries / r['seconds']:8.0f} queries/s)  "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MB (+{r['extra_mb']:5.0f} MB over the loaded features)  "
                      f"ImageNet projection {r['seconds'] * scale / 60:7.1f} min")
            print(f"  FAISS time / torch time = {f['seconds'] / t['seconds']:.3f}")
            print(f"  neighbours identical: {100 * agree['identical_rows']:.2f}% of queries, "
                  f"{100 * agree['identical_ties_aside']:.2f}% ties aside; max |sim diff| {agree['max_sim_diff']:.2e}")


if __name__ == "__main__":
    main()
