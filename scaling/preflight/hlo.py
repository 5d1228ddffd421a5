"""What a compiled step does, read from its optimised HLO text: collectives and matmul FLOPs.

XLA's own cost analysis counts the body of a `while` loop once, but the layers scanned with
`nn.scan` (and gradient accumulation) run their body many times, so the numbers here walk the
call graph and multiply each loop body by its trip count (XLA's `known_trip_count`, else the
start, bound and step of the loop's counter). Conditional branches all count, an upper bound.
Fusion bodies count once per fusion. A loop whose trip count cannot be found counts once and
is reported.

Collective bytes follow one convention, per device and per step: the size of the buffer the
collective works on, the full one. An all-reduce counts its operand, an all-gather its
gathered result, a reduce-scatter its operand before the scatter. Asynchronous pairs count
once, at `-start` (on TPU, in the fusion that starts them). `wire_bytes` is what a ring
implementation sends per device: 2(n-1)/n of the buffer for an all-reduce over n devices,
(n-1)/n for the others, all of it for a permute.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16}

# Instructions that move no data of their own: views, tuples and control flow.
NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while",
              "conditional", "call", "after-all", "partition-id", "replica-id", "copy-done",
              "all-reduce-done", "all-gather-done", "collective-permute-done", "async-done",
              "slice-done",
              "async-update", "add-dependency", "opt-barrier", "domain"}

_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
# An array with its layout, if written, and the memory space the layout names, if any.
_ARRAY_SPACE = re.compile(r"(\b[a-z]+\d*(?:e\d+m\d+\w*)?\[[\d,]*\])(\{[^{}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str        # the result type, e.g. `f32[8,128]{1,0}` or a tuple of them
    opcode: str
    arguments: str    # the text between the opcode's parentheses
    attributes: str   # everything after them

    @property
    def operands(self) -> list[str]:
        return _NAME.findall(self.arguments)


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instruction]]
    entry: str
    instructions: dict[str, Instruction]   # by name: names are unique in a module
    roots: dict[str, Instruction]          # each computation's result
    num_partitions: int

    def shape(self, name: str) -> str:
        instruction = self.instructions.get(name)
        return instruction.shape if instruction else ""


@dataclasses.dataclass
class Collective:
    kind: str           # one of COLLECTIVES
    bytes: float        # buffer bytes per device, per execution
    wire_bytes: float   # ring-model bytes sent per device, per execution
    group_size: int
    count: float        # executions per step (loop trip counts multiplied in)
    implements: str = ""   # for a permute inside a windowed matmul: the collective it replaces


@dataclasses.dataclass
class StepCounts:
    """Per device, per step."""
    collectives: list[Collective]
    matmul_flops: float
    bytes_accessed: float
    unknown_trip_counts: int   # loops counted once because no trip count was found

    def bytes_by_kind(self, implemented: bool = False) -> dict[str, float]:
        """Buffer bytes of each kind of op, or of each collective the ops implement."""
        totals = dict.fromkeys(COLLECTIVES, 0.0)
        for c in self.collectives:
            totals[(c.implements or c.kind) if implemented else c.kind] += c.bytes * c.count
        return totals

    def wire_bytes(self) -> float:
        return sum(c.wire_bytes * c.count for c in self.collectives)


def array_bytes(shape: str) -> float:
    """Bytes of every array in a type, tuples included (`(f32[2,3], bf16[4])` is 32)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = DTYPE_BYTES.get(dtype, 1 if dtype.startswith(("f8", "f4")) else 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def hbm_bytes(shape: str) -> float:
    """`array_bytes` of the arrays that live in HBM: those whose layout names another memory
    space (`S(1)`, TPU's VMEM, where the compiler prefetches weights and keeps small
    temporaries) cost no HBM traffic to read or write; moving them there is counted where
    the asynchronous copy or slice starts."""
    total = 0.0
    for array, layout in _ARRAY_SPACE.findall(shape):
        space = _MEMORY_SPACE.search(layout)
        total += array_bytes(array) if space is None or space.group(1) == "0" else 0.0
    return total


def array_dims(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group that opens at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instruction(name: str, rest: str) -> Instruction | None:
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    shape, tail = rest[:end], rest[end:].lstrip()
    match = re.match(r"([\w\-]+)\(", tail)
    if not match:
        return None
    close = _balanced(tail, match.end() - 1)
    return Instruction(name, shape, match.group(1), tail[match.end():close - 1], tail[close:])


def parse_module(text: str) -> Module:
    computations: dict[str, list[Instruction]] = {}
    instructions: dict[str, Instruction] = {}
    roots: dict[str, Instruction] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None and (match := _INSTRUCTION.match(line)):
            instruction = _parse_instruction(match.group(2), match.group(3))
            if instruction is not None:
                computations[current].append(instruction)
                instructions[instruction.name] = instruction
                if match.group(1):
                    roots[current] = instruction
    partitions = re.search(r"num_partitions=(\d+)", text)
    return Module(computations, entry, instructions, roots,
                  int(partitions.group(1)) if partitions else 1)


def _called(attributes: str, key: str) -> list[str]:
    match = re.search(rf"\b{key}=(\{{[^}}]*\}}|%[\w.\-]+)", attributes)
    return _NAME.findall(match.group(1)) if match else []


def trip_count(module: Module, instruction: Instruction) -> int | None:
    """A while loop's trip count: XLA's annotation where it wrote one, else worked out from
    the loop itself, `i = start; while i < bound: i += step`, all three constants (TPU's
    windowed matmul loops are unrolled by two, so the step matters)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attributes)
    if known:
        return int(known.group(1))
    condition = (_called(instruction.attributes, "condition") or [""])[0]
    body = (_called(instruction.attributes, "body") or [""])[0]
    for compare in module.computations.get(condition, []):
        direction = re.search(r"direction=(LT|LE|GT|GE)", compare.attributes)
        if compare.opcode != "compare" or not direction or len(compare.operands) != 2:
            continue
        index = _tuple_index(module, compare.operands[0])
        bound = _constant(module, compare.operands[1])
        start = _loop_value(module, instruction, index, at_start=True)
        step = _loop_value(module, instruction, index, at_start=False, body=body)
        if None in (index, bound, start, step) or step == 0:
            return None
        span = bound - start + (direction.group(1) in ("LE", "GE")) * (1 if step > 0 else -1)
        return max(0, math.ceil(span / step))
    return None


def _source(module: Module, name: str) -> Instruction | None:
    """The instruction behind `name`, looking through copies and conversions."""
    instruction = module.instructions.get(name)
    while instruction is not None and instruction.opcode in ("copy", "bitcast", "convert"):
        instruction = module.instructions.get(instruction.operands[0])
    return instruction


def _constant(module: Module, name: str) -> int | None:
    """The integer a scalar constant holds."""
    instruction = _source(module, name)
    if instruction is None or instruction.opcode != "constant":
        return None
    return int(instruction.arguments) if re.fullmatch(r"-?\d+", instruction.arguments) else None


def _tuple_index(module: Module, name: str) -> int | None:
    instruction = _source(module, name)
    if instruction is None or instruction.opcode != "get-tuple-element":
        return None
    index = re.search(r"index=(\d+)", instruction.attributes)
    return int(index.group(1)) if index else None


def _loop_value(module: Module, loop: Instruction, index: int | None, *, at_start: bool,
                body: str = "") -> int | None:
    """The induction variable's start (from the loop's initial tuple) or its step (what the
    body adds to it)."""
    if index is None:
        return None
    if at_start:
        init = module.instructions.get(loop.operands[0]) if loop.operands else None
        if init is None or init.opcode != "tuple" or index >= len(init.operands):
            return None
        return _constant(module, init.operands[index])
    root = module.roots.get(body)
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return None
    update = _source(module, root.operands[index])
    if update is None or update.opcode not in ("add", "subtract") or len(update.operands) != 2:
        return None
    for own, other in (update.operands, update.operands[::-1]):
        if _tuple_index(module, own) == index:
            step = _constant(module, other)
            return None if step is None else (step if update.opcode == "add" else -step)
    return None


def group_size(instruction: Instruction, num_partitions: int) -> int:
    """Devices in each replica group, from any of XLA's three ways of writing them."""
    attributes = instruction.attributes
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    if explicit:
        return len(explicit.group(1).split(","))
    iota = re.search(r"replica_groups=\[\d+,(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(1))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes.get(axis, 1)) for axis in re.findall(r"'(\w+)'",
                                                                          mesh.group(2)))
    return num_partitions


def collective(module: Module, instruction: Instruction,
               computation: str = "") -> Collective | None:
    kind = instruction.opcode.removesuffix("-start")
    if kind not in COLLECTIVES:
        return None
    operand_bytes = [array_bytes(module.shape(o)) for o in instruction.operands]
    n = group_size(instruction, module.num_partitions)
    if kind == "collective-permute":
        buffer = operand_bytes[0] if operand_bytes else 0.0
        return Collective(kind, buffer, buffer, n, 1, _windowed(computation) or kind)
    buffer = sum(operand_bytes) * (n if kind == "all-gather" else 1)
    ring = (2 if kind == "all-reduce" else 1) * (n - 1) / n
    return Collective(kind, buffer, buffer * ring, n, 1, kind)


def _windowed(computation: str) -> str | None:
    """TPU can turn an all-gather or reduce-scatter that feeds a matmul into a loop that
    passes one shard around a ring per step and multiplies as it goes (a windowed einsum).
    Its permutes then carry what the collective would have; the loop body's name says which.
    The loop's first step is often peeled out of the body, and its permute stays a permute."""
    match = re.search(r"windowed_dot_general_body_(ag|rs)", computation)
    return {"ag": "all-gather", "rs": "reduce-scatter"}[match.group(1)] if match else None


# The Pallas splash-attention kernels (`scaling.models.tpu_attention`) are custom calls whose
# matmuls XLA's own count cannot see; Pallas names each call after its kernel. Each runs
# (B, H, Lq, Dh) queries against S keys with this many matmuls of B·H·Lq·S·Dh multiply-adds:
# forward QKᵀ and PV; dq recomputes QKᵀ, then dP and dQ; dk/dv recomputes QKᵀ, then dV, dP,
# dK. Under a causal mask the kernel skips the blocks above the diagonal, about half.
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH_KERNEL = re.compile(r"splash_mha_(fwd|dq|dkv)_")
CAUSAL_SHARE = 0.5


def splash_flops(module: Module, instruction: Instruction) -> float:
    """FLOPs of one splash kernel call, from its operands' shapes; 0 for anything else."""
    kernel = _SPLASH_KERNEL.match(instruction.name)
    if instruction.opcode != "custom-call" or kernel is None:
        return 0.0
    arrays = [array_dims(module.shape(o)) for o in instruction.operands]
    arrays = [dims for dims in arrays if len(dims) == 4]
    if not arrays:
        return 0.0
    B, H, Lq, Dh = max(arrays, key=lambda dims: dims[1])  # queries have the most heads
    S = max(dims[2] for dims in arrays)
    return SPLASH_MATMULS[kernel.group(1)] * 2.0 * B * H * Lq * S * Dh * CAUSAL_SHARE


# The Pallas paged-attention kernel (`scaling.models.tpu_paged_attention`) takes the whole
# pool of pages as operands, (K, N, P, Dh) for keys and for values, and its rows' block tables
# flattened, (B·M,); it copies only the pages the tables name into VMEM, and of those only as
# far as each row's length, which the program does not know. Counted here: every page the
# tables name, keys and values, which is what rows at the tables' full width read.
_PAGED_KERNEL = re.compile(r"paged_attention\b")


def paged_attention_bytes(module: Module, instruction: Instruction) -> float:
    """HBM bytes of one paged-attention kernel call: its result, its small operands (queries,
    lengths, tables) whole, and of each pool the pages its block tables name."""
    shapes = [module.shape(o) for o in instruction.operands]
    dims = [array_dims(shape) for shape in shapes]
    pages = max((d for d in dims if len(d) == 4), key=math.prod, default=None)
    tables = [math.prod(d) for d, shape in zip(dims, shapes, strict=True)
              if len(d) == 1 and shape.startswith("s32")]
    total = array_bytes(instruction.shape)
    for d, shape in zip(dims, shapes, strict=True):
        if pages is not None and d == pages:
            K, _, P, Dh = pages
            total += max(tables, default=0) * K * P * Dh * array_bytes(shape) / math.prod(d)
        else:
            total += array_bytes(shape)
    return total


def matmul_flops(module: Module, instruction: Instruction) -> float:
    """2 per multiply-add of a dot, a convolution or a splash-attention kernel; everything
    else is cheap beside them."""
    if instruction.opcode == "custom-call":
        return splash_flops(module, instruction)
    out = math.prod(array_dims(instruction.shape))
    if instruction.opcode == "dot":
        lhs = array_dims(module.shape(instruction.operands[0]))
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
        contracted = [int(d) for d in dims.group(1).split(",") if d] if dims else []
        return 2.0 * out * math.prod(lhs[d] for d in contracted if d < len(lhs))
    if instruction.opcode == "convolution" and len(instruction.operands) > 1:
        return _convolution_flops(module, instruction, out)
    return 0.0


def _window_taps(out_size: int, in_size: int, window: dict) -> int:
    """Pairs (output position, kernel tap) that land on a real input element, not on padding
    or a dilation hole: TPU writes batched matmuls as convolutions with such windows."""
    lhs_dilated = (in_size - 1) * window["lhs_dilate"] + 1
    starts = np.arange(out_size) * window["stride"] - window["pad_low"]
    taps = 0
    for k in range(window["size"]):
        position = starts + k * window["rhs_dilate"]
        taps += int(np.count_nonzero((position >= 0) & (position < lhs_dilated)
                                     & (position % window["lhs_dilate"] == 0)))
    return taps


def _convolution_flops(module: Module, instruction: Instruction, out_elements: int) -> float:
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes)
    lhs = array_dims(module.shape(instruction.operands[0]))
    kernel = array_dims(module.shape(instruction.operands[1]))
    out = array_dims(instruction.shape)
    if not labels or not lhs or not kernel:
        return 0.0
    lhs_labels, kernel_labels, out_labels = labels.groups()
    spatial = sorted(c for c in out_labels if c.isdigit())
    fields = {}
    window_text = re.search(r"window=\{([^}]*)\}", instruction.attributes)
    for item in (window_text.group(1).split() if window_text else []):
        key, _, value = item.partition("=")
        fields[key] = value.split("x")
    taps = 1
    for i, axis in enumerate(spatial):
        def field(key, default, i=i):
            values = fields.get(key)
            return values[i] if values and i < len(values) else default
        window = {"size": kernel[kernel_labels.index(axis)],
                  "stride": int(field("stride", "1")),
                  "lhs_dilate": int(field("lhs_dilate", "1")),
                  "rhs_dilate": int(field("rhs_dilate", "1")),
                  "pad_low": int(field("pad", "0_0").split("_")[0])}
        taps *= _window_taps(out[out_labels.index(axis)], lhs[lhs_labels.index(axis)], window)
    non_spatial = out_elements / max(1, math.prod(out[out_labels.index(a)] for a in spatial))
    return 2.0 * non_spatial * kernel[kernel_labels.index("i")] * taps


def _in_place_updates(instruction: Instruction) -> str | None:
    """The operand holding what an in-place update writes into its first operand (the
    buffer it updates, which is not read or written whole): a dynamic-update-slice's update,
    a scatter's updates. None for any other instruction."""
    operands = instruction.operands
    if instruction.opcode == "dynamic-update-slice" and len(operands) > 1:
        return operands[1]
    if instruction.opcode == "scatter" and len(operands) == 3:
        return operands[2]
    return None


def _fusion_bytes(module: Module, instruction: Instruction, body: str) -> float:
    """Bytes a fusion reads and writes, where slicing or gathering from a buffer (a scanned
    layer's weights, saved activations, a paged KV cache) counts what is taken, not the
    buffer, and updating one in place counts the update."""
    fused = module.computations.get(body, [])
    params = {i.name: int(i.arguments) for i in fused
              if i.opcode == "parameter" and i.arguments.isdigit()}
    users = collections.defaultdict(list)
    for i in fused:
        for position, operand in enumerate(i.operands):
            users[operand].append((i, position))
    root = module.roots.get(body)
    outputs = [] if root is None else [root] if root.opcode != "tuple" else [
        module.instructions[name] for name in root.operands if name in module.instructions]
    written = hbm_bytes(instruction.shape)
    in_place = set()
    for r in outputs:
        updates = _in_place_updates(r)
        if updates is not None and r.operands[0] in params:
            in_place.add(r.operands[0])
            written -= array_bytes(r.shape) - array_bytes(module.shape(updates))
    read = 0.0
    for name, index in params.items():
        if name in in_place or index >= len(instruction.operands):
            continue
        outside = module.shape(instruction.operands[index])
        uses = users.get(name, [])
        if uses and all(u.opcode in ("dynamic-slice", "gather") and p == 0 for u, p in uses):
            read += sum(array_bytes(u.shape) for u, _ in uses) * (hbm_bytes(outside) > 0)
        else:
            read += hbm_bytes(outside)
    return read + max(written, 0.0)


def instruction_bytes(module: Module, instruction: Instruction) -> float:
    """HBM bytes one execution reads and writes, as XLA's cost model would roughly count."""
    opcode = instruction.opcode
    if opcode in NO_TRAFFIC or 'custom_call_target="ConcatBitcast"' in instruction.attributes:
        return 0.0
    operand_shapes = [module.shape(o) for o in instruction.operands]
    if opcode in ("copy-start", "slice-start"):
        # Moves one buffer between memory spaces (a prefetch into VMEM or an eviction):
        # the copy's operand, or the slice taken, crosses HBM once.
        moved = sum(array_bytes(shape) for shape in operand_shapes)
        if opcode == "slice-start":
            moved = array_bytes(instruction.shape) - moved  # the tuple repeats the operand
        return max(moved, 0.0)
    if opcode == "fusion":
        body = _called(instruction.attributes, "calls")
        if body:
            return _fusion_bytes(module, instruction, body[0])
    if opcode in ("dynamic-slice", "gather"):
        indices = operand_shapes[1:] if opcode == "gather" else []
        return 2 * hbm_bytes(instruction.shape) + sum(map(hbm_bytes, indices))
    updates = _in_place_updates(instruction)
    if updates is not None:
        indices = operand_shapes[1:-1] if opcode == "scatter" else []
        return 2 * hbm_bytes(module.shape(updates)) + sum(map(hbm_bytes, indices))
    if opcode == "custom-call" and _PAGED_KERNEL.match(instruction.name):
        return paged_attention_bytes(module, instruction)
    return hbm_bytes(instruction.shape) + sum(map(hbm_bytes, operand_shapes))


def _callees(module: Module, instruction: Instruction) -> list[tuple[str, float, bool]]:
    """(computation, executions per execution of `instruction`, counts HBM traffic)."""
    attributes, opcode = instruction.attributes, instruction.opcode
    if opcode == "while":
        trips = trip_count(module, instruction)
        return [(body, float(trips) if trips is not None else math.nan, True)
                for body in _called(attributes, "body")]
    if opcode == "conditional":
        branches = (_called(attributes, "branch_computations")
                    + _called(attributes, "true_computation")
                    + _called(attributes, "false_computation"))
        return [(branch, 1.0, True) for branch in branches]
    if opcode == "call":
        return [(c, 1.0, True) for c in _called(attributes, "to_apply")]
    if opcode in ("fusion", "async-start") or opcode.endswith("-start"):
        return [(c, 1.0, False) for c in _called(attributes, "calls")]
    return []


def _async_echo(name: str, instructions: list[Instruction]) -> bool:
    """True for the fusions in which TPU repeats an asynchronous collective after starting
    it (its continuation and its done half), so that each collective counts once."""
    return name.startswith("async_collective_fusion") or any(
        'custom_call_target="AsyncCollectiveDone"' in i.attributes for i in instructions)


def count_step(hlo_text: str) -> StepCounts:
    """Collectives, matmul FLOPs and HBM bytes of one execution of the module's entry."""
    module = parse_module(hlo_text)
    memo: dict[tuple[str, bool], tuple[dict, float, float, int]] = {}

    def visit(name: str, traffic: bool) -> tuple[dict, float, float, int]:
        if (name, traffic) in memo:
            return memo[name, traffic]
        counts: dict[tuple, float] = collections.defaultdict(float)
        flops = hbm = 0.0
        unknown = 0
        instructions = module.computations.get(name, [])
        echoes = _async_echo(name, instructions)
        for instruction in instructions:
            found = None if echoes else collective(module, instruction, name)
            if found is not None:
                counts[found.kind, found.bytes, found.wire_bytes, found.group_size,
                       found.implements] += 1
            flops += matmul_flops(module, instruction)
            if traffic:
                hbm += instruction_bytes(module, instruction)
            for callee, times, callee_traffic in _callees(module, instruction):
                if math.isnan(times):
                    unknown, times = unknown + 1, 1.0
                sub_counts, sub_flops, sub_hbm, sub_unknown = visit(
                    callee, traffic and callee_traffic)
                for key, count in sub_counts.items():
                    counts[key] += times * count
                flops += times * sub_flops
                hbm += times * sub_hbm
                unknown += sub_unknown
        memo[name, traffic] = (dict(counts), flops, hbm, unknown)
        return memo[name, traffic]

    counts, flops, hbm, unknown = visit(module.entry, True)
    collectives = [Collective(kind, size, wire, n, count, implements)
                   for (kind, size, wire, n, implements), count in counts.items()]
    return StepCounts(collectives, flops, hbm, unknown)
