"""Context parallelism: a sequence split over devices, in an order that balances causal work.

The rules map the logical `seq` axis of activations onto mesh axes (by default `context`);
every positionwise layer then runs on its own slice of each sequence, and attention gathers
the keys and values of the whole sequence (the simplest correct strategy). Under a causal
mask, cutting the sequence into C consecutive slices would leave the first device almost
nothing to attend to and the last the most, and fused kernels, which skip masked blocks,
would wait on the last. So a model whose sequence is split reorders its positions first:
the sequence is cut into 2C chunks and device i holds chunks i and 2C-1-i, one early and one
late, which gives every device the same share of the causal triangle.

Only attention looks across positions, so the order is invisible elsewhere: it masks by each
position's original slot, rotary embeddings take the reordered positions, and the loss (a sum
over positions) meets the targets reordered the same way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from scaling.errors import UserError
from scaling.models.axes import SEQ


def axis_names(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axes of one entry of a partition spec (None, a name, or several)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def sequence_shards() -> int:
    """How many devices the rules in scope split the `seq` axis over, on the mesh set by
    `jax.set_mesh`; 1 outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    names = axis_names(nn.logical_to_mesh_axes((SEQ,))[0])
    return math.prod(mesh.shape[name] for name in names)


@functools.cache
def balanced_order(length: int, shards: int) -> np.ndarray:
    """The original slot of each position once reordered for `shards` devices: 2·shards
    chunks, device i holding chunks i and 2·shards-1-i. The identity for one shard."""
    if shards == 1:
        return np.arange(length, dtype=np.int32)
    if length % (2 * shards):
        raise UserError(f"context parallelism over {shards} devices cuts each sequence into "
                        f"{2 * shards} equal chunks: --config.data.seq_len={length} must be a "
                        f"multiple of {2 * shards}")
    chunks = np.arange(length, dtype=np.int32).reshape(2 * shards, length // (2 * shards))
    pairs = [np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)]
    order = np.concatenate(pairs)
    order.flags.writeable = False  # cached and shared
    return order


@functools.cache
def inverse_order(length: int, shards: int) -> np.ndarray:
    """The position of each original slot in `balanced_order`."""
    inverse = np.argsort(balanced_order(length, shards)).astype(np.int32)
    inverse.flags.writeable = False
    return inverse
