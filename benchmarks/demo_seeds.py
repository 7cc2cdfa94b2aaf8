"""The README's first command at several seeds: how far the embedded default beats random weights.

Runs `moco pretrain --seed S -o TMP/seed_S` (the embedded default, nothing else set) once per seed, on the CPU
(CUDA hidden, so `--data-pipeline auto` picks the CPU pipeline, as on the 2-core box the README's figures come
from), and prints per seed the pretrained and random-weights kNN top-1 from its pretrain.json, the margin and
the wall time, then a summary line. Not part of CI: about 4 minutes per seed on 2 cores.

    python benchmarks/demo_seeds.py                    # seeds 0 1 2, one after another, all cores each
    python benchmarks/demo_seeds.py --seeds 0 1 --jobs 2   # two at a time, cores / 2 torch threads each
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SeedResult:
    """One seed's run: the figures its pretrain.json holds, and how long the command took."""

    seed: int
    pretrained: float
    random_init: float
    wall_s: float

    @property
    def margin(self) -> float:
        return self.pretrained - self.random_init


def run_seed(seed: int, out: Path, threads: int) -> SeedResult:
    """One `moco pretrain` in a fresh process with `threads` torch threads; its output goes to out/log.txt.

    CUDA is hidden from the child so the run is the CPU pipeline on the CPU wherever the script runs.
    """
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "moco_transfer.cli", "pretrain", "--seed", str(seed), "-o", str(out / "run")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"seed {seed}: `{' '.join(cmd)}` failed (exit {result.returncode}); see {out / 'log.txt'}")
    summary = json.loads((out / "run" / "pretrain.json").read_text())
    return SeedResult(seed, float(summary["knn_top1"]), float(summary["knn_top1_random_init"]), wall)


def format_result(r: SeedResult) -> str:
    minutes, seconds = divmod(round(r.wall_s), 60)
    return (f"seed {r.seed}: kNN top-1 pretrained {r.pretrained:.2f}%  random weights {r.random_init:.2f}%  "
            f"margin {r.margin:+.2f} points  wall {minutes} min {seconds:02d} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1,
                        help="Runs at once, each with (CPU cores / jobs) torch threads.")
    parser.add_argument("--output", default=None, help="Keep the runs here (default: a temporary folder).")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    jobs = max(1, min(args.jobs, len(args.seeds)))
    threads = max(1, cores // jobs)
    import torch  # only for the version line; the runs are child processes

    print(f"moco pretrain --seed S (embedded default, CPU pipeline), seeds {args.seeds}, {jobs} at a time, "
          f"{threads} torch thread(s) each; {cores} CPU cores, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="demo_seeds_") as tmp:
        root = Path(args.output or tmp)
        results: list[SeedResult] = []
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(run_seed, seed, root / f"seed_{seed}", threads) for seed in args.seeds]
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
                print(format_result(results[-1]), flush=True)
    results.sort(key=lambda r: r.seed)
    margins = [r.margin for r in results]
    print(f"summary: {len(results)} seeds, margin min {min(margins):+.2f} / mean {statistics.mean(margins):+.2f} / "
          f"max {max(margins):+.2f} points; pretrained mean {statistics.mean(r.pretrained for r in results):.2f}%, "
          f"random weights mean {statistics.mean(r.random_init for r in results):.2f}%", flush=True)


if __name__ == "__main__":
    main()
