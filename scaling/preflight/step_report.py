"""`--mode=preflight`: compile the real train step for the target hardware, without running it.

The target is the local devices, or a TPU slice named by `--topology` (compiled here through
libtpu's ahead-of-time path, see `scaling.preflight.topology`). From the compiled step come
the memory each chip needs (XLA's buffer assignment), the matmul FLOPs and the collectives
(read from the optimised HLO by `scaling.preflight.hlo`, loop trip counts included). FLOPs and
collectives are set beside the formulas that the model itself provides (see
`scaling.models.formulas`: the transformer's and the MLP's in their modules, an experiment's
in its file); for a model without them the report says "no formula for this model" and gives
no verdict. The chip's spec-sheet numbers give an estimated step time and an MFU bound.

The estimate is max(matmul FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth) + ring bytes /
interconnect bandwidth: compute and memory traffic overlap, communication is assumed not to
overlap with either, and the interconnect is credited with all its links at once (collectives
across slices too, though DCN is far slower). So it is a rough bound, good for comparing
meshes and batch sizes, not a promise. `preflight.json` in the workdir holds every number.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import jax
import ml_collections

from scaling.errors import DoesNotFit
from scaling.models import collective_bytes
from scaling.models.formulas import GRADIENTS, GROUPS, ParamLayout, StepLayout
from scaling.preflight import hlo, topology
from scaling.runtime import chips
from scaling.runtime.workdir import write_json_atomically
from scaling.sharding import mesh as mesh_lib
from scaling.training import run as run_lib
from scaling.training.state_summary import bytes_per_device, format_bytes

NO_FORMULA = "no formula for this model"
# Measured and analytic bytes of each group agree within this fraction of the analytic total.
TOLERANCE = 0.05


@dataclasses.dataclass
class Target:
    label: str
    devices: list
    chip: chips.Chip | None
    platform: str


def make_target(topology_name: str | None, config: ml_collections.ConfigDict) -> Target:
    """The devices to compile for: a named TPU slice (or several, as the mesh's DCN axes ask),
    or this machine's own devices."""
    if topology_name:
        slice_ = topology.parse_slice(topology_name)
        num_slices = math.prod(mesh_lib.dcn_sizes(config.mesh).values())
        devices = topology.compile_only_devices(slice_, num_slices)
        slices = f"{num_slices} slices of " if num_slices > 1 else ""
        label = (f"{slices}{slice_.name} ({slice_.topology_name}, "
                 f"{_count(slice_.num_chips, 'chip')})")
    else:
        devices = jax.devices()
        label = _count(len(devices), f"local {devices[0].platform} device")
    return Target(label, devices, chips.chip_for(devices[0].device_kind),
                  devices[0].platform)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + "s" * (number != 1)


def compile_step(run: run_lib.Run):
    """One training step (a chunk of one batch), lowered and compiled as training runs it."""
    return run_lib.lower_train_step(run).compile()


def memory_per_device(compiled) -> dict[str, float]:
    """XLA's buffer assignment for one device; the peak counts donated buffers once."""
    stats = compiled.memory_analysis()
    memory = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "generated_code": stats.generated_code_size_in_bytes,
    }
    memory["peak"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                      + memory["temporaries"] + memory["generated_code"])
    # The most bytes in use at one point of the schedule, by XLA's own reckoning. The peak
    # above adds every allocation whole; some libtpu releases report temporaries beyond
    # their own buffer assignment, which shows as a gap between the two.
    live = getattr(stats, "peak_memory_in_bytes", 0)
    if live:
        memory["live_at_once"] = live
    return {k: float(v) for k, v in memory.items()}


def step_layout(run: run_lib.Run, platform: str) -> StepLayout:
    """The step as a model's collective formula sees it: mesh sizes and, for every param, its
    shape and the mesh axes (of size > 1) that its sharding splits it over."""
    mesh_shape = dict(run.mesh.shape)
    params = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(run.abstract_state.params):
        split = {a for entry in leaf.sharding.spec if entry is not None
                 for a in ((entry,) if isinstance(entry, str) else entry) if mesh_shape[a] > 1}
        params.append(ParamLayout(tuple(str(getattr(k, "key", k)) for k in path),
                                  tuple(leaf.shape), leaf.dtype.itemsize, frozenset(split)))
    return StepLayout(mesh_shape, mesh_lib.data_parallel_size(run.mesh, run.rules),
                      tuple(params), platform,
                      mesh_lib.sequence_parallel_size(run.mesh, run.rules))


def analytic_collectives(run: run_lib.Run, platform: str,
                         experiment=None) -> dict[str, float] | None:
    """Per-device buffer bytes per step by group, as the model's own formula predicts them;
    None where the model provides none."""
    return collective_bytes(run.model, run.config, step_layout(run, platform), experiment)


def estimate(counts: hlo.StepCounts, model_flops: float | None, chip: chips.Chip) -> dict:
    compute = counts.matmul_flops / chip.peak_flops
    memory = counts.bytes_accessed / chip.hbm_bandwidth
    communication = counts.wire_bytes() / chip.ici_bandwidth
    step = max(compute, memory) + communication
    known = model_flops is not None and step
    return {"compute_seconds": compute, "memory_seconds": memory,
            "communication_seconds": communication, "step_seconds": step,
            "mfu_bound": model_flops / chip.peak_flops / step if known else None}


def measured_groups(counts: hlo.StepCounts) -> dict[str, float]:
    """Measured bytes by group, windowed matmuls' permutes counted as what they implement."""
    by_kind = counts.bytes_by_kind(implemented=True)
    return {"all-gather": by_kind["all-gather"],
            GRADIENTS: by_kind["all-reduce"] + by_kind["reduce-scatter"],
            "all-to-all": by_kind["all-to-all"],
            "collective-permute": by_kind["collective-permute"]}


def agrees(measured: dict[str, float], analytic: dict[str, float]) -> bool:
    """Every group within TOLERANCE of the analytic total (ask only where there is a
    formula: without one there is nothing to agree with)."""
    allowed = TOLERANCE * max(sum(analytic.values()), 1.0)
    return all(abs(measured[g] - analytic[g]) <= allowed for g in GROUPS)


# How XLA on TPU refuses a program whose temporaries alone exceed the chip's memory.
_REFUSAL = re.compile(r"RESOURCE_EXHAUSTED.*?temporaries \(([\d.]+)([KMGT]?)\) exceeds "
                      r"available HBM \(([\d.]+)([KMGT]?)\)", re.S)


def _refusal_bytes(number: str, unit: str) -> float:
    return float(number) * 1024 ** " KMGT".index(unit or " ")


def preflight(config: ml_collections.ConfigDict, target: Target, experiment=None) -> dict:
    """Compile the step for `target` and report on it, as one JSON-ready dictionary."""
    mesh = mesh_lib.make_mesh(config.mesh, target.devices)
    run = run_lib.build_run_from_shapes(config, mesh, experiment)
    report = {
        "experiment": config.experiment,
        "target": target.label,
        "platform": target.platform,
        "chip": dataclasses.asdict(target.chip) if target.chip else None,
        "mesh": dict(mesh.shape),
        "batch_size": config.batch_size,
    }
    start = time.perf_counter()
    try:
        compiled = compile_step(run)
    except jax.errors.JaxRuntimeError as e:
        refusal = _REFUSAL.search(str(e))
        if refusal is None:
            raise
        # Nothing but the temporaries is known; the state comes on top of them.
        temporaries = _refusal_bytes(*refusal.group(1, 2))
        state = bytes_per_device(run.abstract_state)
        return {**report, "compile_seconds": time.perf_counter() - start, "fits": False,
                "compiler_refused": str(e).strip().splitlines()[-1],
                "memory_per_device": {"state": float(state), "temporaries": temporaries,
                                      "usable_hbm": _refusal_bytes(*refusal.group(3, 4)),
                                      "peak": state + temporaries}}
    report["compile_seconds"] = time.perf_counter() - start
    counts = hlo.count_step(compiled.as_text())
    model_flops = (None if run.flops_per_example is None
                   else run.flops_per_example * config.batch_size / mesh.size)
    memory = memory_per_device(compiled)
    return {
        **report,
        "memory_per_device": memory,
        "flops_per_device": {"compiled_matmuls": counts.matmul_flops, "model": model_flops},
        "hbm_bytes_per_device": counts.bytes_accessed,
        "loops_without_trip_count": counts.unknown_trip_counts,
        "collectives_per_device": collectives_by_kind(counts),
        "collective_groups": {"measured": measured_groups(counts),
                              "analytic": analytic_collectives(run, target.platform,
                                                               experiment),
                              "tolerance": TOLERANCE},
        "estimate": estimate(counts, model_flops, target.chip) if target.chip else None,
        "fits": memory["peak"] <= target.chip.hbm_bytes if target.chip else None,
    }


def collectives_by_kind(counts: hlo.StepCounts) -> dict[str, dict[str, float]]:
    out = {kind: {"count": 0.0, "bytes": 0.0, "wire_bytes": 0.0} for kind in hlo.COLLECTIVES}
    for c in counts.collectives:
        out[c.kind]["count"] += c.count
        out[c.kind]["bytes"] += c.bytes * c.count
        out[c.kind]["wire_bytes"] += c.wire_bytes * c.count
    return out


def does_not_fit_message(report: dict, config: ml_collections.ConfigDict) -> str:
    memory, chip = report["memory_per_device"], report["chip"]
    peak = memory["peak"]
    hbm = chip["hbm_bytes"] if chip else memory["usable_hbm"]   # XLA refused an unknown chip
    name = chip["name"] if chip else report["platform"]
    over = peak - hbm
    tries = ["a larger slice with --topology", "more FSDP (--config.mesh.fsdp)",
             "a smaller --config.batch_size or more --config.grad_accum_steps"]
    if config.model.get("remat_policy", "full") != "full":
        tries.append("--config.model.remat_policy=full")
    needs = "at least " if "compiler_refused" in report else ""
    return (f"does not fit: needs {needs}{format_bytes(peak)} per chip, "
            f"{format_bytes(over)} ({over / hbm:.0%}) over the "
            f"{format_bytes(hbm)} of {name} HBM; "
            f"try {', '.join(tries[:-1])} or {tries[-1]}")


def _row(label: str, value: str, note: str = "") -> str:
    return f"  {label:<28} {value:>12}  {note}".rstrip()


MEMORY_NOTES = {"aliased": "(donated: counted once)", "state": "(params and optimizer)",
                "usable_hbm": "(what XLA may use)",
                "live_at_once": "(XLA's own estimate of the most in use at once)"}


def _memory_lines(report: dict) -> list[str]:
    memory, chip = report["memory_per_device"], report["chip"]
    lines = ["memory per device (XLA's buffer assignment)"]
    for key, value in memory.items():
        if key not in ("peak", "live_at_once"):
            lines.append(_row(key.replace("_", " "), format_bytes(value),
                              MEMORY_NOTES.get(key, "")))
    if chip:
        hbm = chip["hbm_bytes"]
        note = (f"{memory['peak'] / hbm:.0%} of {format_bytes(hbm)} HBM, "
                + (f"{format_bytes(hbm - memory['peak'])} headroom" if report["fits"]
                   else f"{format_bytes(memory['peak'] - hbm)} over"))
    else:
        note = "(unknown chip: no HBM to compare with)"
    if "live_at_once" in memory:
        lines.append(_row("live at once", format_bytes(memory["live_at_once"]),
                          MEMORY_NOTES["live_at_once"]))
    return lines + [_row("peak", format_bytes(memory["peak"]), note)]


def _collective_lines(report: dict) -> list[str]:
    groups = report["collective_groups"]
    analytic = groups["analytic"]
    if not any(groups["measured"].values()) and analytic is not None \
            and not any(analytic.values()):
        return ["collectives per device per step: none"]
    lines = ["collectives per device per step (buffer bytes, ring traffic)",
             f"  {'kind':<28} {'ops':>8} {'bytes':>12} {'ring traffic':>14}"]
    for kind, values in report["collectives_per_device"].items():
        if values["count"]:
            lines.append(f"  {kind:<28} {values['count']:>8g} "
                         f"{format_bytes(values['bytes']):>12} "
                         f"{format_bytes(values['wire_bytes']):>14}")
    if analytic is None:
        return lines + [f"  against the model's formulas: {NO_FORMULA}"]
    lines += ["  against the model's DP, FSDP and TP formulas",
              f"  {'group':<28} {'measured':>12} {'analytic':>12}"]
    for group in GROUPS:
        measured, analytic = groups["measured"][group], groups["analytic"][group]
        if measured or analytic:
            lines.append(f"  {group:<28} {format_bytes(measured):>12} "
                         f"{format_bytes(analytic):>12}")
    lines.append(f"  {'total':<28} {format_bytes(sum(groups['measured'].values())):>12} "
                 f"{format_bytes(sum(groups['analytic'].values())):>12}")
    verdict = "agree within" if agrees(groups["measured"], groups["analytic"]) else \
        "differ by more than"
    lines.append(f"  they {verdict} {groups['tolerance']:.0%} of the analytic total")
    return lines


def _compute_lines(report: dict) -> list[str]:
    flops = report["flops_per_device"]
    if flops["model"] is None:
        note = f"the model's: {NO_FORMULA}"
    else:
        ratio = flops["compiled_matmuls"] / flops["model"]
        note = (f"{ratio:.2f}x the model's {flops['model']:.3e}"
                + ("; the excess is recomputation" if ratio > 1.02 else ""))
    lines = ["compute per device per step",
             _row("matmul FLOPs, compiled", f"{flops['compiled_matmuls']:.3e}", note),
             _row("HBM bytes accessed", format_bytes(report["hbm_bytes_per_device"]))]
    if report["loops_without_trip_count"]:
        lines.append(f"  ({report['loops_without_trip_count']} loops of unknown trip count "
                     "counted once)")
    return lines


def _estimate_lines(e: dict) -> list[str]:
    return ["estimated step time (spec-sheet peaks; communication not overlapped)",
            _row("compute", f"{e['compute_seconds']:.3g} s"),
            _row("HBM traffic", f"{e['memory_seconds']:.3g} s"),
            _row("communication", f"{e['communication_seconds']:.3g} s"),
            _row("step", f"{e['step_seconds']:.3g} s",
                 f"MFU bound {e['mfu_bound']:.0%}" if e["mfu_bound"] else "")]


def format_report(report: dict) -> str:
    chip = report["chip"]
    mesh = ", ".join(f"{k}={v}" for k, v in report["mesh"].items())
    lines = [f"preflight {report['experiment']} on {report['target']}"
             + (f" of {chip['name']}" if chip else "")
             + f"; mesh {mesh}; batch {report['batch_size']}; compiled in "
             f"{report['compile_seconds']:.1f} s", *_memory_lines(report)]
    if "compiler_refused" in report:
        lines.append(f"XLA refused to compile: {report['compiler_refused']}")
    else:
        lines += _compute_lines(report) + _collective_lines(report)
        if report["estimate"]:
            lines += _estimate_lines(report["estimate"])
    if report["fits"] is not None:
        lines.append("fits" if report["fits"] else "does not fit")
    return "\n".join(lines)


def run_preflight(config: ml_collections.ConfigDict, topology_name: str | None,
                  workdir: Path, experiment=None) -> dict:
    """`--mode=preflight`: print the report, write preflight.json, and raise DoesNotFit
    (exit code 4) when the step needs more memory than the chip has."""
    target = make_target(topology_name, config)
    report = preflight(config, target, experiment)
    print(format_report(report), flush=True)
    write_json_atomically(workdir / "preflight.json", report)
    print(f"wrote {workdir / 'preflight.json'}", flush=True)
    if report["fits"] is False:
        raise DoesNotFit(does_not_fit_message(report, config))
    return report
