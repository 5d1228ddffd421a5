"""What each model says about its own cost: FLOPs per example and collective bytes per step.

Only the model knows how its matmuls are laid out, which of its params are scanned layers,
and which activations tensor parallelism must all-reduce, so the formulas live with the
models and preflight only compares them with what XLA compiled. A model provides two
functions (the MLP's in its module, the transformer's in `transformer_formulas`, an
experiment's in its file, beside `make_model`):

    flops_per_example(model, config, params) -> float
        analytic FLOPs of one forward and backward pass over one example; `params` is the
        abstract params tree (shapes and dtypes only).
    collective_bytes(model, config, layout: StepLayout) -> dict[str, float] | None
        per-device buffer bytes per step that the model's collectives should move, keyed by
        `GROUPS`; None where the model has no formula for this layout.

Where a model provides neither, preflight says "no formula for this model" rather than
guessing. `parameter_collectives` holds the textbook data-parallel and FSDP part that any
model may build on.

This module holds plain numbers and dataclasses: no mesh, no jax.sharding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax

ALL_GATHER = "all-gather"
GRADIENTS = "all-reduce + reduce-scatter"   # gradient and activation reductions, one group
ALL_TO_ALL = "all-to-all"
PERMUTE = "collective-permute"
GROUPS = (ALL_GATHER, GRADIENTS, ALL_TO_ALL, PERMUTE)


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """One parameter as the compiled step holds it."""
    path: tuple[str, ...]        # keys in the params tree
    shape: tuple[int, ...]
    itemsize: int                # bytes per element in the param dtype
    mesh_axes: frozenset[str]    # mesh axes of size > 1 it is split over

    def gathered_elements(self, mesh_shape: dict[str, int]) -> float:
        """Elements on one device once gathered over fsdp, still split over the other axes."""
        split = math.prod(mesh_shape[a] for a in self.mesh_axes if a != "fsdp")
        return math.prod(self.shape) / split


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """What a collective formula may know about one step, without touching a mesh."""
    mesh_shape: dict[str, int]
    data_parallel: int           # devices the batch is split over
    params: tuple[ParamLayout, ...]
    platform: str                # cpu, gpu or tpu
    sequence_parallel: int = 1   # devices each sequence's activations are split over

    @property
    def narrow(self) -> bool:
        """Whether XLA moves weight matrices in low precision: on TPU (and, untested, GPU)
        float32 matmuls run on bfloat16 operands; XLA on CPU computes in float32."""
        return self.platform != "cpu"


def zero_groups() -> dict[str, float]:
    return dict.fromkeys(GROUPS, 0.0)


def parameter_collectives(layout: StepLayout, *, compute_itemsize: int, microbatches: int,
                          scanned: Callable[[ParamLayout], bool] = lambda p: False
                          ) -> dict[str, float]:
    """The data-parallel and FSDP collectives of a model's params, by group.

    - Data parallelism (and FSDP): the gradient of every parameter is reduced over the batch
      axes, a buffer of the parameter's size after tensor sharding; with data × fsdp both > 1
      the FSDP shard is all-reduced over `data` as well.
    - Context parallelism: devices that hold the same params for different positions of a
      sequence all-reduce each gradient (its FSDP shard) over the sequence's axes too, a
      collective of its own: XLA reduces over the positions inside the weight gradient's
      matmul, before the batch reduction.
    - FSDP: each parameter split over fsdp is all-gathered where it is used: params that
      `scanned` picks (layers in a loop) in the forward pass and again in the backward pass,
      the rest once.
    - Gradient accumulation repeats both for every microbatch: XLA reduces each microbatch's
      gradients where they are computed, inside the accumulation loop.

    Dtypes follow what XLA does. Where `layout.narrow`, weight matrices are gathered in
    bfloat16 (or the compute dtype, if narrower) and scanned matrices' gradients are reduced
    in the compute dtype; otherwise everything moves in the param dtype.
    """
    totals = zero_groups()
    mesh_shape = layout.mesh_shape
    for p in layout.params:
        is_scanned = scanned(p)
        fsdp_split = "fsdp" in p.mesh_axes
        matrix = len(p.shape) - is_scanned >= 2
        gathered = (min(p.itemsize, compute_itemsize, 2) if layout.narrow and matrix
                    else p.itemsize)
        reduced = compute_itemsize if layout.narrow and matrix and is_scanned else p.itemsize
        elements = p.gathered_elements(mesh_shape) * microbatches
        shard = elements / mesh_shape["fsdp"] if fsdp_split else elements
        if fsdp_split or layout.data_parallel > 1:
            totals[GRADIENTS] += elements * reduced
        if fsdp_split and layout.data_parallel > mesh_shape["fsdp"]:
            totals[GRADIENTS] += shard * reduced
        if layout.sequence_parallel > 1:
            totals[GRADIENTS] += shard * reduced
        if fsdp_split:
            totals[ALL_GATHER] += (2 if is_scanned else 1) * elements * gathered
    return totals


def dense_flops_per_example(params) -> float:
    """6 FLOPs per weight-matrix entry (2 forward, 4 backward): exact for a stack of dense
    layers applied once per example, and for nothing else."""
    return 6.0 * sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)
                     if len(p.shape) > 1)
