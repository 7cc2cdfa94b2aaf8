"""The GPU check behind benchmarks/gpu_check.sh: the `cuda` test suite, then the pipeline benchmark, one report.

    bash benchmarks/gpu_check.sh                 # on a machine with an NVIDIA GPU
    bash benchmarks/gpu_check.sh --out $OUT      # write gpu_check.md and gpu_check.json there

Targets (issue "The GPU path every real run takes"): 0 corrupted victims in the race test, 0 sync errors inside
steps, end to end with the device pipeline >= 0.90 of the model-only bf16 step, the device pipeline alone >= 2x
the model-only step. A failed test or benchmark exits non-zero; a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

from moco_transfer.fileio import write_json_atomic
from moco_transfer.markdown import table

ROOT = Path(__file__).resolve().parents[1]
TESTS_SECONDS = 240 + 120  # + the VOC part (tests/test_cuda_voc.py), about 2 minutes on one H200
BENCH_SECONDS = 300


def run(label: str, command: list[str], timeout: int, env: dict[str, str]) -> tuple[int, str, float]:
    """Run a step, echo its output as it comes, return (exit code, output, seconds)."""
    print(f"== {label}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                if "\r" not in line:
                    print(line, end="", flush=True)
                lines.append(line)
                if time.perf_counter() - started > timeout:
                    proc.kill()
                    lines.append(f"gpu_check: {label} killed after {timeout} s\n")
                    break
        finally:
            code = proc.wait()
    return code, "".join(lines), time.perf_counter() - started


def pytest_summary(output: str) -> dict[str, int]:
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail):
        counts["error" if word.startswith("error") else word] += int(number)
    return counts


def markdown(report: dict[str, Any]) -> str:
    b, t, tests = report.get("bench", {}), report["targets"], report["tests"]
    lines = [f"# GPU check: {report['gpu']}", "",
             f"torch {report['torch']}, torchvision {report['torchvision']}, CUDA {report['cuda']}, "
             f"{report['cpu_cores']} CPU cores; {report['date']}; {report['seconds']:.0f} s in all.", "",
             f"## `pytest -m cuda`: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped, "
             f"{tests['error']} errors ({tests['seconds']:.0f} s)", ""]
    for key, value in tests.get("figures", {}).items():
        lines.append(f"- {key}: `{json.dumps(value, default=str)}`")
    if b:
        lines += ["", f"## bench_pipeline.py: {b.get('arch')}, {b.get('image_size')} px, batch {b.get('batch')}, "
                      f"amp {b.get('amp')}, channels_last {b.get('channels_last')}, {b.get('workers')} workers, "
                      f"{b.get('jpeg')} JPEGs", ""]
        rows = [("(a) CPU loader alone", "a_cpu_loader", None),
                ("(b) device pipeline alone", "b_device_pipeline", ("b_over_c", "x the model-only step")),
                ("(c) model-only step", "c_model_only_step", None),
                ("(d) end to end, CPU pipeline", "d_cpu_pipeline", ("d_cpu_over_c", "of the model-only step")),
                ("(d) end to end, device pipeline", "d_gpu_pipeline", ("d_gpu_over_c", "of the model-only step")),
                ("(e) end to end, device pipeline, --compile", "e_compile", ("e_over_d_gpu", "x eager end to end"))]
        lines += table(["what", "images/s", "ratio"], (
            [label, f"{b[key]:,.0f}", f"{b[ratio[0]]:.2f} {ratio[1]}" if ratio and b.get(ratio[0]) is not None else ""]
            for label, key, ratio in rows if b.get(key) is not None))
        if b.get("compile_seconds") is not None:
            lines.append(f"\n--compile: about {b['compile_seconds']:.0f} s of compilation; loss of the compiled model "
                         f"on one batch {b['compile_loss_relative_gap']:.1e} (relative) from eager.")
    voc = tests.get("figures", {}).get("voc", {})
    if voc.get("fp32") or voc.get("amp"):
        keys = ("images_per_gpu", "predicted_reserved_gib", "real_peak_reserved_gib", "ratio", "warmup_steps",
                "s_per_iter")
        lines += ["", "## VOC memory pre-flight: probe prediction vs peak reserved over 40 real iterations", "",
                  *table(["precision", "images/GPU", "predicted GiB", "real peak GiB", "ratio", "warm-up steps",
                          "s/iter"], ([p, *(voc[p][k] for k in keys)] for p in ("fp32", "amp") if voc.get(p)))]
    lines += ["", "## Targets", ""]
    lines += [f"- {name}: {'met' if ok else 'MISSED' if ok is False else 'not measured'} ({detail})"
              for name, (ok, detail) in t.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    parser.add_argument("--bench-args", default="", help="extra arguments for bench_pipeline.py")
    parser.add_argument("--tests", default="tests", help="where pytest looks for the `cuda` tests")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="without a GPU: the same steps on the CPU (the suite skips, the benchmark runs --quick); "
                             "how CI checks this script")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.bench_args = f"--quick --device cpu {args.bench_args}"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); nothing to check")
        sys.exit(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpu = "CPU (smoke run)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    report: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "torchvision": torchvision.__version__,
                              "cuda": torch.version.cuda, "cpu_cores": cores,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        env = {**os.environ, "MOCO_GPU_CHECK_JSON": str(Path(scratch) / "tests.json"), "PYTHONUNBUFFERED": "1"}
        tests: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "error": 0, "seconds": 0.0}
        if not args.skip_tests:
            code, output, seconds = run("GPU suite", [sys.executable, "-m", "pytest", args.tests, "-m", "cuda", "-q",
                                                      "-rfEs", "-p", "no:cacheprovider"], TESTS_SECONDS, env)
            tests.update(pytest_summary(output), seconds=seconds, exit_code=code)
            figures_file = Path(env["MOCO_GPU_CHECK_JSON"])
            tests["figures"] = json.loads(figures_file.read_text()) if figures_file.exists() else {}
            failed |= code != 0
        report["tests"] = tests
        bench_json = Path(scratch) / "bench.json"
        code, output, seconds = run("pipeline benchmark", [sys.executable, "benchmarks/bench_pipeline.py",
                                                           "--json", str(bench_json), *args.bench_args.split()],
                                    BENCH_SECONDS, env)
        report["bench"] = json.loads(bench_json.read_text()) if bench_json.exists() else {}
        report["bench_output"] = [line for line in output.splitlines() if line.startswith(("(", "    end"))]
        failed |= code != 0
    figures, b = report["tests"].get("figures", {}), report["bench"]
    race = figures.get("race", {})
    report["targets"] = {
        "race test: 0 corrupted victims": (
            None if "race" not in figures else race.get("guarded_corrupted") == 0
            and figures.get("pipeline_race_corrupted") == 0,
            f"guarded {race.get('guarded_corrupted')}, pipeline thread {figures.get('pipeline_race_corrupted')}, "
            f"bare decode_jpeg {race.get('bare_decode_jpeg_corrupted')} of {race.get('iterations')}"),
        "0 sync errors inside steps": (None if "sync_errors_inside_steps" not in figures
                                       else figures["sync_errors_inside_steps"] == 0, "set_sync_debug_mode('error')"),
        "end to end, device pipeline >= 0.90 of the model-only step": (
            None if b.get("d_gpu_over_c") is None else b["d_gpu_over_c"] >= 0.90, f"{b.get('d_gpu_over_c')}"),
        "device pipeline alone >= 2x the model-only step": (
            None if b.get("b_over_c") is None else b["b_over_c"] >= 2.0, f"{b.get('b_over_c')}"),
    }
    voc = figures.get("voc", {})
    for label, key in (("fp32", "fp32"), ("--amp", "amp")):
        v = voc.get(key, {})
        report["targets"][f"VOC probe prediction >= real peak and <= 1.15x ({label})"] = (
            None if v.get("ratio") is None else 1.0 <= v["ratio"] <= 1.15,
            f"{v.get('ratio')}: {v.get('predicted_reserved_gib')} GiB predicted, {v.get('real_peak_reserved_gib')} "
            "GiB peak over 40 iterations")
    report["seconds"] = time.perf_counter() - started
    write_json_atomic(report, out / "gpu_check.json", default=str)
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu_check: wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
