"""`--mode=preflight --serve`: compile the serving engine's programs for a target, unrun.

The engine (`scaling.engine`) runs two forward programs over its paged KV cache: decode, one
new token for each of `max_num_seqs` rows, and prefill, a chunk of `prefill_chunk` prompt
tokens for one row per data-parallel replica. Here both are lowered with the engine's own
functions (`scaling.engine.programs`) from abstract params and an abstract pool, on the mesh
the server would make from the same config and flags, and compiled for the target (a TPU
slice through libtpu's ahead-of-time path, `scaling.preflight.topology`); on TPU decode
attends through the Pallas paged-attention kernel, as the server's does.

Both programs are compiled at `--context`: every row holding that many positions, its block
table as wide as the server's bucket for them. From each compiled program come its memory per
chip (XLA's buffer assignment: the params and the pool are its arguments, the pool donated)
and its HBM traffic (`scaling.preflight.hlo`, which counts the kernel's reads as the pages its
tables name), so an estimated time as the training preflight makes it. Decode is memory-bound:
each step must read the chip's weights and its rows' cached keys and values at least once, so
those bytes over the HBM bandwidth bound the step from below, and the estimate's share of that
bound says how near the compiled step comes to it.

The largest batch is the most sequences of `--context` positions that fit beside the weights:
a pool of that many full contexts and the decode program for that many rows, whose peak is
compiled, not extrapolated; one more (one more per replica) does not fit. A configuration
whose programs need more than the chip's HBM exits with code 4, naming the excess.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from scaling.engine import EngineOptions, check_options, make_layout, serving_model
from scaling.engine import programs as programs_lib
from scaling.engine import quantize as quantize_lib
from scaling.errors import DoesNotFit, UserError
from scaling.models import make_model
from scaling.models.transformer import Transformer
from scaling.preflight import hlo, step_report
from scaling.runtime.workdir import write_json_atomically
from scaling.sharding import mesh as mesh_lib
from scaling.training.state_summary import bytes_per_device, format_bytes

REPORT_FILE = "serve_preflight.json"
# Compiles spent looking for the largest batch, beyond the configuration's own.
MAX_SEARCH_COMPILES = 8


@dataclasses.dataclass(frozen=True)
class Serving:
    """The model as the engine runs it, placed on the target's mesh, with abstract params."""

    model: nn.Module
    mesh: jax.sharding.Mesh
    rules: tuple
    params: Any  # ShapeDtypeStructs carrying the shardings the server gives them
    data_parallel: int

    @property
    def tpu_kernel(self) -> bool:
        return programs_lib.uses_tpu_kernel(self.model, self.mesh)


def check_context(config: ml_collections.ConfigDict, context: int | None) -> int:
    """`--context`, checked against the model's longest sequence; by default that length."""
    longest = config.model.get("max_seq_len")
    if config.model.get("name") != "transformer" or longest is None:
        raise UserError(f"--serve: {config.experiment} is not a language model; the engine "
                        "serves transformer LMs")
    if context is None:
        return longest
    if not 1 <= context <= longest:
        raise UserError(f"--context={context}: must be between 1 and the model's max_seq_len "
                        f"{longest}; raise --config.model.max_seq_len to serve longer")
    return context


def make_serving(config: ml_collections.ConfigDict, target: step_report.Target,
                 experiment=None, quantize: str = "none") -> Serving:
    """The server's model and mesh for `target`. Its params are those of the layers unrolled
    (`scaling.models.transformer.unrolled`): made by initialising the unrolled model
    abstractly, which names the same axes as the scanned one's slices. With `quantize`
    they pass through the engine's own quantization (`scaling.engine.quantize`), compiled
    for the target to learn where it places the int8 kernels and their scales."""
    mesh = mesh_lib.make_mesh(config.mesh, target.devices)
    rules = mesh_lib.rules_from_config(config)
    model = make_model(config, experiment, mesh_lib.platform(mesh))
    if not isinstance(model, Transformer):
        raise UserError(f"--serve: {config.experiment}'s model is not the transformer the "
                        "engine serves")
    model = serving_model(model)
    model = type(model)(dataclasses.replace(model.config, scan_layers=False))
    data_parallel = mesh_lib.data_parallel_size(mesh, rules)
    probe = make_layout(model.config, EngineOptions(max_num_seqs=data_parallel),
                        data_parallel)
    batch = programs_lib.empty_batch(probe, 1, 1, 1, tpu_kernel=False)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
                                              paged_batch=batch)["params"])
    params = _placed(nn.meta.unbox(boxed), mesh_lib.logical_shardings(boxed, mesh, rules))
    if quantize != "none":
        def convert(params):
            return quantize_lib.quantize_params(model, params, mesh, rules, quantize)

        shardings = jax.jit(convert).lower(params).compile().output_shardings
        params = _placed(jax.eval_shape(convert, params), shardings)
    return Serving(model, mesh, rules, params, data_parallel)


def _placed(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def pool(serving: Serving, layout: programs_lib.Layout):
    """The engine's pool for `layout`, as (shardings, abstract arrays placed by them)."""
    shardings, abstract = programs_lib.cache_layout(serving.model, serving.mesh,
                                                    serving.rules, layout)
    return shardings, _placed(abstract, shardings)


def compile_program(serving: Serving, layout: programs_lib.Layout, rows: int, length: int,
                    width: int):
    """The engine's forward program for one (rows, length, table width), compiled."""
    shardings, cache = pool(serving, layout)
    param_shardings = jax.tree.map(lambda leaf: leaf.sharding, serving.params)
    lower = programs_lib.step_lowering(serving.model, serving.mesh, serving.rules,
                                       param_shardings, shardings)
    batch = programs_lib.empty_batch(layout, rows, length, width, serving.tpu_kernel)
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    return lower(serving.params, cache, tokens, batch).compile()


def context_blocks(layout: programs_lib.Layout, context: int) -> int:
    return math.ceil(context / layout.block_size)


def program_shapes(layout: programs_lib.Layout, context: int) -> dict[str, tuple[int, ...]]:
    """(rows, length, table width) of each program with every row at `context` positions:
    the widths the server's buckets give them."""
    blocks = context_blocks(layout, context)
    return {"decode": (layout.max_num_seqs, 1,
                       programs_lib.bucket(blocks, layout.decode_widths)),
            "prefill": (layout.prefill_rows, layout.prefill_chunk,
                        programs_lib.bucket(blocks, layout.prefill_widths))}


def measure(compiled, chip) -> dict:
    """Memory, HBM traffic and estimated time of one compiled program, per chip."""
    counts = hlo.count_step(compiled.as_text())
    return {"memory_per_device": step_report.memory_per_device(compiled),
            "hbm_bytes_per_device": counts.bytes_accessed,
            "matmul_flops_per_device": counts.matmul_flops,
            "estimate": step_report.estimate(counts, None, chip) if chip else None}


def peak(program: dict) -> float:
    return math.inf if program.get("refused") else program["memory_per_device"]["peak"]


def compile_programs(serving: Serving, layout: programs_lib.Layout, context: int,
                     chip) -> dict[str, dict]:
    """Decode and prefill at `context`, compiled and measured; a program that XLA refuses
    for lack of memory is reported as refused."""
    programs = {}
    for name, shape in program_shapes(layout, context).items():
        compiled = _compile_or_none(serving, layout, *shape)
        programs[name] = ({"shape": shape, "refused": True} if compiled is None
                          else {"shape": shape, **measure(compiled, chip)})
    return programs


@dataclasses.dataclass
class Search:
    """The programs' peak compiled at several batch sizes, the pool sized for each to hold
    that many sequences at the context (inf where XLA refuses a program)."""

    serving: Serving
    layout: programs_lib.Layout
    context: int
    hbm: float
    block_bytes: float  # one block of the pool, a chip
    weights: float      # the params, a chip
    peaks: dict[int, float] = dataclasses.field(default_factory=dict)

    def layout_for(self, n: int) -> programs_lib.Layout:
        blocks = max(n * context_blocks(self.layout, self.context),
                     self.layout.max_blocks_per_seq)
        return dataclasses.replace(self.layout, num_blocks=blocks, max_num_seqs=n)

    def fits(self, n: int) -> bool:
        """Whether both programs fit beside a pool of n sequences (prefill is compiled only
        where decode fits)."""
        if n not in self.peaks:
            layout = self.layout_for(n)
            self.peaks[n] = 0.0
            for shape in program_shapes(layout, self.context).values():
                compiled = _compile_or_none(self.serving, layout, *shape)
                self.peaks[n] = max(self.peaks[n], math.inf if compiled is None
                                    else step_report.memory_per_device(compiled)["peak"])
                if self.peaks[n] > self.hbm:
                    break
        return self.peaks[n] <= self.hbm

    def estimate(self, n: int, m: int | None = None) -> int:
        """The largest batch that fits if the decode peak grows linearly in the batch:
        through the peaks compiled at n and m, else as if all of n's peak but the weights
        grew with it (the pool does, and temporaries may hold copies of it)."""
        step = self.serving.data_parallel
        if not math.isfinite(self.peaks[n]):
            return -1  # refused: no line through it; the search halves its bracket instead
        per_seq = context_blocks(self.layout, self.context) * self.block_bytes
        slope = max(per_seq, (self.peaks[n] - self.weights) / n)
        if m is not None and m != n and math.isfinite(self.peaks[m]):
            slope = max(per_seq, (self.peaks[m] - self.peaks[n]) / (m - n))
        base = self.peaks[n] - slope * n
        return max(0, int((self.hbm - base) // slope) // step * step)


def _compile_or_none(serving, layout, rows, length, width):
    """The compiled program, or None where XLA refuses it for lack of memory."""
    try:
        return compile_program(serving, layout, rows, length, width)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None


def largest_batch(search: Search, start: int) -> tuple[int, bool]:
    """The most sequences (a multiple of the data-parallel size) whose pool and decode
    program fit, found by compiling: from the configuration's batch `start`, estimate,
    compile, refine, until a batch that fits and the next one up, which does not, are both
    compiled. Returns (that batch, 0 where not one fits; whether the next was compiled)."""
    step = search.serving.data_parallel
    fitting, failing = 0, math.inf
    if search.fits(start):
        fitting = start
    else:
        failing = start
    previous, guess = start, search.estimate(start)
    for _ in range(MAX_SEARCH_COMPILES):
        low, high = fitting + step, failing - step
        if low > high:
            break
        if not low <= guess <= high and failing < math.inf:  # refused, or a poor line
            guess = (fitting + failing) // 2 // step * step
        guess = min(max(guess, low), high)
        if search.fits(guess):
            fitting = guess
        else:
            failing = guess
        guess, previous = search.estimate(guess, previous), guess
    return fitting, failing == fitting + step


def decode_bound(report: dict, chip) -> dict:
    """The decode step's memory-bandwidth bound: each chip reads its weights and, for its
    rows, the cached keys and values of every position, once a step."""
    layout = report["layout"]
    rows_per_chip = layout["max_num_seqs"] / report["data_parallel"]
    cache = rows_per_chip * report["context"] * report["pool"]["position_bytes_per_device"]
    read = report["weights_per_device"] + cache
    bound = read / chip.hbm_bandwidth
    step = report["programs"]["decode"]["estimate"]["step_seconds"]
    return {"bytes_read": read, "weights": report["weights_per_device"], "cache": cache,
            "seconds": bound, "share": bound / step if step else None,
            "tokens_per_second": layout["max_num_seqs"] / step if step else None,
            "tokens_per_second_at_bound": layout["max_num_seqs"] / bound}


def serve_preflight(config: ml_collections.ConfigDict, target: step_report.Target,
                    options: EngineOptions, context: int | None = None,
                    experiment=None) -> dict:
    """Compile the engine's programs for `target` and report on them, JSON-ready."""
    context = check_context(config, context)
    serving = make_serving(config, target, experiment, options.quantize)
    layout = make_layout(serving.model.config, options, serving.data_parallel)
    _, cache = pool(serving, layout)
    cache_bytes = bytes_per_device(cache)
    chip = target.chip
    report = {
        "experiment": config.experiment, "target": target.label, "platform": target.platform,
        "chip": dataclasses.asdict(chip) if chip else None, "mesh": dict(serving.mesh.shape),
        "data_parallel": serving.data_parallel, "options": dataclasses.asdict(options),
        "layout": dataclasses.asdict(layout), "context": context,
        "decode_attention": ("TPU paged-attention kernel"
                             if serving.tpu_kernel and not layout.kv_int8 else "gather form"),
        "weights_per_device": float(bytes_per_device(serving.params)),
        "pool": {"bytes_per_device": float(cache_bytes),
                 "block_bytes_per_device": cache_bytes / layout.num_blocks,
                 "position_bytes_per_device": cache_bytes / layout.num_blocks
                 / layout.block_size},
        "programs": {},
    }
    start = time.perf_counter()
    report["programs"] = compile_programs(serving, layout, context, chip)
    report["peak_per_device"] = max(peak(p) for p in report["programs"].values())
    if chip is None:
        report.update(fits=None, largest_batch=None, compile_seconds=time.perf_counter() - start)
        return report
    report["fits"] = report["peak_per_device"] <= chip.hbm_bytes
    if not report["programs"]["decode"].get("refused"):
        report["decode_bound"] = decode_bound(report, chip)
    search = Search(serving, layout, context, chip.hbm_bytes, cache_bytes / layout.num_blocks,
                    report["weights_per_device"])
    if search.layout_for(layout.max_num_seqs).num_blocks == layout.num_blocks:
        search.peaks[layout.max_num_seqs] = report["peak_per_device"]  # the same programs
    report["largest_batch"], report["largest_batch_checked"] = largest_batch(
        search, layout.max_num_seqs)
    report["largest_batch_blocks"] = search.layout_for(
        max(report["largest_batch"], serving.data_parallel)).num_blocks
    report["search_peaks"] = {str(n): p for n, p in sorted(search.peaks.items())}
    n = report["largest_batch"]
    read = (report["weights_per_device"] + n / serving.data_parallel * context
            * report["pool"]["position_bytes_per_device"])
    report["largest_batch_bound"] = {"bytes_read": read,
                                     "seconds": read / chip.hbm_bandwidth,
                                     "tokens_per_second": n * chip.hbm_bandwidth / read}
    report["compile_seconds"] = time.perf_counter() - start
    return report


def _row(label: str, value: str, note: str = "") -> str:
    return f"  {label:<30} {value:>12}  {note}".rstrip()


def _seconds(value: float) -> str:
    return f"{value * 1e3:.3g} ms"


def _program_lines(name: str, program: dict, tokens: int) -> list[str]:
    rows, length, width = program["shape"]
    title = f"{name}: {rows} rows x {length} tokens, tables of {width} blocks"
    if program.get("refused"):
        return [title, "  XLA refused to compile it: its temporaries alone exceed the HBM"]
    memory, e = program["memory_per_device"], program["estimate"]
    lines = [title,
             _row("temporaries", format_bytes(memory["temporaries"])),
             _row("peak", format_bytes(memory["peak"]), "(weights, pool, temporaries, code)"),
             _row("HBM traffic", format_bytes(program["hbm_bytes_per_device"])),
             _row("matmul FLOPs", f"{program['matmul_flops_per_device']:.3e}")]
    if e:
        lines += [_row("estimated time", _seconds(e["step_seconds"]),
                       f"compute {_seconds(e['compute_seconds'])}, HBM "
                       f"{_seconds(e['memory_seconds'])}, communication "
                       f"{_seconds(e['communication_seconds'])}"),
                  _row("tokens/s", f"{tokens / e['step_seconds']:,.0f}" if e["step_seconds"]
                       else "-")]
    return lines


def format_report(report: dict) -> str:
    chip, layout, options = report["chip"], report["layout"], report["options"]
    mesh = ", ".join(f"{k}={v}" for k, v in report["mesh"].items())
    cache_dtype = "int8" if layout["kv_int8"] else "the model's dtype"
    lines = [f"serving preflight {report['experiment']} on {report['target']}"
             + (f" of {chip['name']}" if chip else "")
             + f"; mesh {mesh}; compiled in {report['compile_seconds']:.1f} s",
             f"  --max_num_seqs={layout['max_num_seqs']} --kv_block_size={layout['block_size']}"
             f" ({layout['num_blocks']} blocks) --prefill_chunk={layout['prefill_chunk']} "
             f"--kv_cache_dtype={options['kv_cache_dtype']} ({cache_dtype}) "
             f"--quantize={options['quantize']}; "
             f"--context={report['context']}; decode attends through the "
             f"{report['decode_attention']}",
             "memory per chip",
             _row("weights", format_bytes(report["weights_per_device"])),
             _row("KV cache", format_bytes(report["pool"]["bytes_per_device"]),
                  f"{format_bytes(report['pool']['position_bytes_per_device'])} a position"),
             _row("peak of the programs", format_bytes(report["peak_per_device"])
                  if math.isfinite(report["peak_per_device"]) else "refused",
                  _verdict(report))]
    decode = report["programs"]["decode"]
    lines += _program_lines("decode", decode, decode["shape"][0])
    prefill = report["programs"]["prefill"]
    lines += _program_lines("prefill", prefill, prefill["shape"][0] * prefill["shape"][1])
    bound = report.get("decode_bound")
    if bound:
        lines += ["decode step against its memory-bandwidth bound (bytes read / HBM bandwidth)",
                  _row("bytes read a step", format_bytes(bound["bytes_read"]),
                       f"weights {format_bytes(bound['weights'])}, KV cache "
                       f"{format_bytes(bound['cache'])}"),
                  _row("bound", _seconds(bound["seconds"]),
                       f"{bound['tokens_per_second_at_bound']:,.0f} tokens/s"),
                  _row("expected share of the bound", f"{bound['share']:.0%}",
                       f"estimated step {_seconds(decode['estimate']['step_seconds'])}")]
    if report.get("largest_batch") is not None:
        n = report["largest_batch"]
        lines.append(f"largest batch at --context={report['context']}: {n} sequences "
                     f"(--max_num_seqs={n} --num_kv_blocks={report['largest_batch_blocks']})"
                     if n else f"largest batch at --context={report['context']}: none fits")
        if n:
            bound = report["largest_batch_bound"]
            lines.append(_row("its decode bound", _seconds(bound["seconds"]),
                              f"{bound['tokens_per_second']:,.0f} tokens/s (reading "
                              f"{format_bytes(bound['bytes_read'])} a chip a step)"))
        if not report["largest_batch_checked"]:
            above = min((int(k) for k, v in report["search_peaks"].items()
                         if int(k) > n and not v <= report["chip"]["hbm_bytes"]), default=None)
            lines.append(f"  (a lower bound: the search stopped after {MAX_SEARCH_COMPILES} "
                         "compiles" + (f"; {above} does not fit)" if above else ")"))
    return "\n".join(lines)


def _verdict(report: dict) -> str:
    chip = report["chip"]
    if chip is None:
        return "(unknown chip: no HBM to compare with)"
    hbm, used = chip["hbm_bytes"], report["peak_per_device"]
    if not math.isfinite(used):
        return "XLA refused a program for lack of memory"
    return (f"{used / hbm:.0%} of {format_bytes(hbm)} HBM, "
            + (f"{format_bytes(hbm - used)} headroom" if report["fits"]
               else f"{format_bytes(used - hbm)} over"))


def does_not_fit_message(report: dict) -> str:
    chip, layout = report["chip"], report["layout"]
    hbm, used = chip["hbm_bytes"], report["peak_per_device"]
    over = used - hbm
    n = report["largest_batch"]
    fix = (f"at --context={report['context']} at most {n} sequences fit: try "
           f"--max_num_seqs={n} --num_kv_blocks={report['largest_batch_blocks']}" if n else
           "not even one sequence fits beside the weights: try a larger slice with "
           "--topology or more tensor parallelism (--mesh.tensor)")
    if not math.isfinite(used):
        refused = [name for name, p in report["programs"].items() if p.get("refused")]
        return (f"does not fit: XLA refused to compile the {' and '.join(refused)} "
                f"program{'s' * (len(refused) > 1)} with a KV cache of {layout['num_blocks']} "
                f"blocks ({format_bytes(report['pool']['bytes_per_device'])} a chip) beside "
                f"{format_bytes(report['weights_per_device'])} of weights: the temporaries "
                f"alone exceed the {format_bytes(hbm)} of {chip['name']} HBM; {fix}")
    return (f"does not fit: the serving programs need {format_bytes(used)} per chip "
            f"(weights {format_bytes(report['weights_per_device'])}, KV cache of "
            f"{layout['num_blocks']} blocks {format_bytes(report['pool']['bytes_per_device'])}"
            f"), {format_bytes(over)} ({over / hbm:.0%}) over the {format_bytes(hbm)} of "
            f"{chip['name']} HBM; {fix}")


def run_serve_preflight(config: ml_collections.ConfigDict, topology_name: str | None,
                        workdir: Path, options: EngineOptions, context: int | None = None,
                        experiment=None) -> dict:
    """`--mode=preflight --serve`: print the report, write serve_preflight.json, and raise
    DoesNotFit (exit code 4) when the programs need more memory than the chip has."""
    check_context(config, context)  # a bad flag fails before any compile
    check_options(options)
    target = step_report.make_target(topology_name, config)
    report = serve_preflight(config, target, options, context, experiment)
    print(format_report(report), flush=True)
    write_json_atomically(workdir / REPORT_FILE, report)
    print(f"wrote {workdir / REPORT_FILE}", flush=True)
    if report["fits"] is False:
        raise DoesNotFit(does_not_fit_message(report))
    return report
