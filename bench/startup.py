"""Time to the first training step, with a cold and with a warm compilation cache.

    python bench/startup.py [--experiment=fashion_mnist_mlp] [--repeats=3] [--json=PATH]

Each run is a fresh `python -m scaling.main --experiment=E` process with a fresh workdir and
`--config.log_every_steps=1`, timed from its launch to the first progress line, `step 1/...`:
that line is printed once the first compiled call (`steps_per_call` steps) has finished on the
device. The process is then killed. A cold run gets a new, empty `--compilation_cache_dir`;
the warm run after it reuses that directory. One untimed run first warms the OS file cache
and Python's bytecode cache, so only the compilation cache differs between the two.

Each run is also split at the lines it prints on the way: the `experiment ...` line (Python
and JAX imports, flags, config) and the `data: ...` line (data, mesh, jit wrappers,
initialisation). The rest, to the first step, is mostly tracing, lowering and compiling (or
loading from the cache) the train step, and running its first call.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_load import cpu_seconds, print_load
from results import Check, Contender, write_results

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 2.0  # cold time to first step over warm, at least
# The lines a run prints on its way to the first step, in order, and the phases they end.
MILESTONES = (("experiment ", "imports"), ("data: ", "setup"), ("step ", "first step"))


def time_run(experiment: str, cache_dir: Path, workdir: Path, timeout: float) -> dict:
    """Seconds from launch to each milestone line of one `scaling.main` process."""
    command = [sys.executable, "-u", "-m", "scaling.main", f"--experiment={experiment}",
               f"--workdir={workdir}", f"--compilation_cache_dir={cache_dir}",
               "--config.log_every_steps=1"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    entries_before = count_entries(cache_dir)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    seconds, pending = {}, list(MILESTONES)
    try:
        for line in process.stdout:
            if line.startswith(pending[0][0]):
                seconds[pending.pop(0)[1]] = time.perf_counter() - start
                if not pending:
                    break
            if time.perf_counter() - start > timeout:
                break
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if pending:
        raise RuntimeError(f"{' '.join(command)} printed no {pending[0][0]!r} line "
                           f"(exit code {process.returncode})")
    return {"seconds": seconds, "new_cache_entries": count_entries(cache_dir) - entries_before}


def count_entries(cache_dir: Path) -> int:
    return len(list(cache_dir.glob("*-cache"))) if cache_dir.is_dir() else 0


def phase_medians(runs: list[dict]) -> dict[str, float]:
    """Median seconds of each phase alone and of the whole time to the first step."""
    out, previous = {}, None
    for _, phase in MILESTONES:
        ends = [run["seconds"][phase] for run in runs]
        starts = [run["seconds"][previous] for run in runs] if previous else [0.0] * len(runs)
        out[phase] = statistics.median(e - s for e, s in zip(ends, starts, strict=True))
        previous = phase
    out["total"] = statistics.median(run["seconds"][previous] for run in runs)
    return out


def pair_ratios(runs: dict[str, list[dict]]) -> list[float]:
    """Cold over warm time to the first step for each pair that shared a cache directory."""
    return [cold["seconds"]["first step"] / warm["seconds"]["first step"]
            for cold, warm in zip(runs["cold"], runs["warm"], strict=True)]


def report(cold: dict[str, float], warm: dict[str, float], pairs: list[float]) -> Check:
    print(f"{'phase (median s)':<18} {'cold':>7} {'warm':>7} {'cold/warm':>10}")
    for phase in [p for _, p in MILESTONES] + ["total"]:
        print(f"{phase:<18} {cold[phase]:>7.2f} {warm[phase]:>7.2f} "
              f"{cold[phase] / warm[phase]:>9.2f}x")
    print(f"each pair's cold/warm: {', '.join(f'{r:.2f}x' for r in pairs)}")
    check = Check("time to first step, cold / warm cache", cold["total"] / warm["total"],
                  at_least=TARGET_RATIO)
    print(check.line())
    return check


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="fashion_mnist_mlp")
    parser.add_argument("--repeats", type=int, default=3, help="cold/warm pairs (>= 1)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a run may take")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    start = cpu_seconds()
    root = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    try:
        time_run(args.experiment, root / "warmup-cache", root / "warmup", args.timeout)
        runs: dict[str, list[dict]] = {"cold": [], "warm": []}
        for repeat in range(args.repeats):
            cache_dir = root / f"cache-{repeat}"
            for kind in ("cold", "warm"):
                result = time_run(args.experiment, cache_dir, root / f"{kind}-{repeat}",
                                  args.timeout)
                runs[kind].append(result)
                print(f"{kind} {repeat}: " + ", ".join(
                    f"{phase} at {s:.2f} s" for phase, s in result["seconds"].items())
                    + f"; {result['new_cache_entries']} new cache entries", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {kind: phase_medians(kind_runs) for kind, kind_runs in runs.items()}
    pairs = pair_ratios(runs)
    check = report(medians["cold"], medians["warm"], pairs)
    share = print_load(start)

    if args.json:
        cold = Contender("cold cache", [r["seconds"]["first step"] for r in runs["cold"]])
        warm = Contender("warm cache", [r["seconds"]["first step"] for r in runs["warm"]],
                         baseline=cold)
        write_results(args.json, "startup", "seconds to the first training step",
                      higher_is_better=False, contenders=[cold, warm], others_cpu_share=share,
                      checks=[check], details={"experiment": args.experiment,
                                               "median_phase_seconds": medians,
                                               "pair_ratios": pairs, "runs": runs})


if __name__ == "__main__":
    sys.exit(main())
