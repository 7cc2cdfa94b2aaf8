"""The MoCo v2 tech report's ablation in miniature, on the embedded default set, N seeds per row.

Every row starts from the embedded preset (`scattered-digits`) and changes only the switches of the report's
table: v1; +MLP; +aug+; +MLP+aug+; +MLP+aug+ +cos (= v2); plus v2 at T 0.07 against T 0.2. Each checkpoint
is evaluated with `moco eval knn` and the fast linear probe (`moco eval linear --cached`), then
`moco report --group-by recipe` writes the table, to which this script adds the command, the machine and the
wall time.

    python benchmarks/ablation.py                          # 3 seeds, the preset's epochs -> docs/ablation.md
    python benchmarks/ablation.py --seeds 1 --epochs 4 --output /tmp/ablation --page /tmp/ablation.md
    python benchmarks/ablation.py --quick --output /tmp/abl --page /tmp/abl.md   # seconds: a smoke test

Finished runs are skipped when the script is started again (their pretrain.json, knn.json, linear.json exist).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

# (name, the report's ImageNet linear top-1, switches on top of the embedded preset). The v1 rows use the step
# schedule at 60% and 80% of the epochs, as 120 and 160 of 200 officially.
ROWS: list[tuple[str, str, list[str]]] = [
    ("v1", "60.6", ["--no-mlp", "--no-aug-plus", "--no-cos", "--moco-t", "0.07"]),
    ("v1+MLP (T 0.07)", "62.9", ["--mlp", "--no-aug-plus", "--no-cos", "--moco-t", "0.07"]),
    ("v1+MLP (T 0.2)", "66.2", ["--mlp", "--no-aug-plus", "--no-cos", "--moco-t", "0.2"]),
    ("v1+aug+", "63.4", ["--no-mlp", "--aug-plus", "--no-cos", "--moco-t", "0.07"]),
    ("v1+MLP+aug+", "67.3", ["--mlp", "--aug-plus", "--no-cos", "--moco-t", "0.2"]),
    ("v2 = MLP+aug+cos (T 0.2)", "67.5", ["--mlp", "--aug-plus", "--cos", "--moco-t", "0.2"]),
    ("v2 at T 0.07", "–", ["--mlp", "--aug-plus", "--cos", "--moco-t", "0.07"]),
]


def moco(*args: str, log: Path | None = None, threads: int | None = None) -> None:
    """One `moco` command in a fresh process, so every run starts from the same interpreter state.

    With `log` its output goes to that file (parallel jobs), with `threads` it gets that many torch threads.
    """
    cmd = [sys.executable, "-m", "moco_transfer.cli", *args]
    print("$ moco " + shlex.join(args), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    if log is None:
        subprocess.run(cmd, check=True, env=env)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        raise RuntimeError(f"moco {shlex.join(args)} failed (exit {result.returncode}); see {log}")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="Pretraining epochs (default: the preset's).")
    parser.add_argument("--linear-epochs", type=int, default=30)
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--output", default="runs/ablation", help="Folder of the runs and their evaluations.")
    parser.add_argument("--page", default="docs/ablation.md", help="The Markdown page to write.")
    parser.add_argument("--quick", action="store_true", help="Tiny runs (2 rows, 1 seed, 1 epoch): smoke test.")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Runs in parallel, each with (CPU cores / jobs) torch threads and its output in "
                             "<run>/log.txt.")
    parser.add_argument("--report-only", action="store_true",
                        help="Train nothing: write the page from the runs already finished under --output.")
    args = parser.parse_args()

    rows = ROWS[::5] if args.quick else ROWS
    seeds = 1 if args.quick else args.seeds
    epochs = 1 if args.quick else args.epochs
    linear_epochs = 2 if args.quick else args.linear_epochs
    extra = ["--image-size", "16", "--batch-size", "32", "--moco-k", "256", "--bn-splits", "2", "--workers", "0",
             "--knn-every", "0"] if args.quick else []
    out = Path(args.output)
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

    def run_one(run: Path, seed: int, switches: list[str], schedule: list[str]) -> None:
        log = run / "log.txt" if jobs > 1 else None
        if not (run / "pretrain.json").is_file():
            moco("pretrain", "-o", str(run), "--seed", str(seed), *switches, *schedule, *extra,
                 *(["--epochs", str(epochs)] if epochs else []), log=log, threads=threads)
        ckpt = max(run.glob("checkpoint_*.pth.tar"))
        if not (run / "knn" / "knn.json").is_file():
            moco("eval", "knn", str(ckpt), "-o", str(run / "knn"), "--k", str(args.knn_k), "--no-cache",
                 "--workers", "0", log=log, threads=threads)
        if not (run / "linear" / "linear.json").is_file():
            moco("eval", "linear", str(ckpt), "--cached", "--epochs", str(linear_epochs), "-o",
                 str(run / "linear"), "--no-cache", "--workers", "0", "--seed", str(seed), log=log, threads=threads)

    tasks = []
    for name, _, switches in rows:
        for seed in range(seeds):
            run = out / f"{slug(name)}_seed{seed}"
            schedule = []
            if "--no-cos" in switches:
                total = epochs or 20
                schedule = [x for frac in (0.6, 0.8) for x in ("--schedule", str(max(1, round(frac * total))))]
            if args.report_only and not (run / "linear" / "linear.json").is_file():
                continue
            if not args.report_only:
                tasks.append((run, seed, switches, schedule))
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in concurrent.futures.as_completed([pool.submit(run_one, *task) for task in tasks]):
            future.result()
    wall = time.perf_counter() - start

    table_md = Path(args.page).with_suffix(".table.md")
    moco("report", str(out), "--group-by", "recipe", "--knn-k", str(args.knn_k), "-o", str(table_md))
    command = "python benchmarks/ablation.py " + shlex.join(sys.argv[1:])
    lines = [
        "# The MoCo v2 ablation in miniature (embedded scattered digits)",
        "",
        f"Command: `{command}`; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.system()}, Python {platform.python_version()}; "
        + ("the runs finished before the page was written (--report-only); " if args.report_only
           else f"wall time {wall / 60:.1f} min; ")
        + f"{len(rows)} rows x {seeds} seeds, pretraining plus kNN (k={args.knn_k}) and cached linear probe "
        f"({linear_epochs} epochs).",
        "",
        "The tech report's ImageNet linear top-1 for each row (ResNet-50, 200 epochs):",
        "",
        "| row | switches | report |",
        "|---|---|---|",
        *[f"| {name} | `{' '.join(sw)}` | {ref} |" for name, ref, sw in rows],
        "",
        "Measured here (mean ± std over seeds, from `moco report --group-by recipe`):",
        "",
        table_md.read_text(),
    ]
    Path(args.page).parent.mkdir(parents=True, exist_ok=True)
    Path(args.page).write_text("\n".join(lines))
    table_md.unlink()
    print(f"wrote {args.page} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
