"""Where an experiment's compiled training step spends its time, by model part and pass.

A `jax.profiler` trace of a few `Run.train_steps` calls records every XLA operation the CPU
ran; each operation's `op_name` metadata names the Flax module it came from and whether it
belongs to the forward pass (`jvp(...)`) or the backward pass (`transpose(jvp(...))`). Summing
durations over those names gives a per-part table that survives XLA's fusion:

    python bench/step_profile.py [--experiment=shakespeare_char_lm] [--calls=3]
        [--config.KEY=VALUE ...] [--json=PATH]

The profiler slows every operation down, so the shares matter, not the absolute times.
Operations on both of XLA's worker threads are summed, so the total can exceed wall time.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
from jax.profiler import ProfileData
from lm_tokens import DATA_DIR as SHAKESPEARE_DIR
from machine_load import cpu_seconds, print_load
from results import Contender, write_results

import scaling.config.experiments
import scaling.training.loop
import scaling.training.run
from scaling.runtime import platforms

PARTS = ("attention_norm", "mlp_norm", "final_norm", "attention", "mlp", "embedding",
         "hidden_0", "hidden_1", "hidden_2", "logits")  # first match wins
RUNTIME_EVENTS = ("ThunkExecutor", "end:", "Threadpool", "SlinkyThreadPool", "while")


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name to the `op_name` metadata of the JAX operation it came from."""
    names = {}
    for line in hlo_text.splitlines():
        match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
        if match:
            names.setdefault(match.group(1), match.group(2))
    return names


def part_of(op_name: str) -> str:
    """`backward attention`, `forward mlp`, `optimizer and loss`, ... for one op_name."""
    phase = ("backward" if "transpose(jvp(" in op_name else
             "forward" if "jvp(" in op_name else "")
    part = next((p for p in PARTS if f"/{p}/" in op_name or op_name.endswith(f"/{p}")), "")
    if not phase:
        return "optimizer, metrics"
    return f"{phase} {part or 'other (logits, loss, embedding)'}"


def profile(config, module, calls: int) -> tuple[dict[str, float], float]:
    """Milliseconds per step of each part, and the untraced wall milliseconds per step."""
    run, dataset = scaling.training.run.setup(config, module)
    state = run.init()
    k = config.steps_per_call
    chunks = [scaling.training.run.put_train_chunk(run, dataset, i * k, k)
              for i in range(calls + 1)]
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        names = op_names(run.train_steps.inner.lower(state, chunks[0]).compile().as_text())
    state = jax.block_until_ready(run.train_steps(state, chunks[0]))[0]  # compiles
    start = time.perf_counter()
    for chunk in chunks[1:]:
        state = jax.block_until_ready(run.train_steps(state, chunk))[0]
    wall_ms = (time.perf_counter() - start) * 1e3 / (calls * k)

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for chunk in chunks[1:]:
                state = jax.block_until_ready(run.train_steps(state, chunk))[0]
        trace = ProfileData.from_file(str(next(Path(trace_dir).rglob("*.xplane.pb"))))
    parts: collections.Counter[str] = collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # XLA:CPU's worker threads
                continue
            for event in line.events:
                if not event.name.startswith(RUNTIME_EVENTS):
                    part = part_of(names.get(event.name, ""))
                    parts[part] += event.duration_ns / 1e6 / (calls * k)
    return dict(parts), wall_ms


def main(argv: list[str] | None = None) -> None:
    platforms.skip_absent_tpu()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="shakespeare_char_lm")
    parser.add_argument("--calls", type=int, default=3, help="traced calls of steps_per_call")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.calls < 1:
        parser.error("--calls must be positive")
    overrides = [a.removeprefix("--config.") for a in argv if a.startswith("--config.")]
    if args.experiment == "shakespeare_char_lm" and not any(
            o.startswith("data.manual_dir=") for o in overrides):
        overrides.append(f"data.manual_dir={SHAKESPEARE_DIR}")
    config, module = scaling.config.experiments.load_config(args.experiment, overrides)

    start = cpu_seconds()
    parts, wall_ms = profile(config, module, args.calls)
    total = Contender("all operations", [sum(parts.values())])
    contenders = [total] + [Contender(name, [ms], baseline=total)
                            for name, ms in sorted(parts.items(), key=lambda kv: -kv[1])]
    print(f"{args.experiment}: {wall_ms:.2f} ms per step untraced; traced operation time "
          f"per step by part (both worker threads):")
    for c in contenders:
        print(f"  {c.name:<40} {c.median:>9.3f} ms {c.ratio:>7.1%}")
    share = print_load(start)
    if args.json:
        write_results(args.json, "step_profile", "traced milliseconds per step",
                      higher_is_better=False, contenders=contenders, others_cpu_share=share,
                      details={"experiment": args.experiment, "overrides": overrides,
                               "untraced_ms_per_step": wall_ms,
                               "steps_per_call": config.steps_per_call})


if __name__ == "__main__":
    sys.exit(main())
