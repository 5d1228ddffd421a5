"""Attention over a paged KV cache: keys and values live in a pool of fixed-size blocks.

A serving engine keeps one pool per layer, (N, P, K, Dh): N blocks of P positions each. A
sequence owns a list of blocks, its block table, in the order of its positions, so position p
of a sequence lives at slot `table[p // P] * P + p % P` of the pool flattened to (N·P, K, Dh).
Memory is then taken a block at a time as a sequence grows, never for the whole context, and
sequences that start with the same tokens can share those blocks.

One call handles L new tokens for each of B rows: a decode step (L = 1 for every running
sequence) or a chunk of a prompt (the tokens of one sequence from some position on). The new
keys and values are written at their slots first, then every row gathers its blocks through
its table and attends to the positions up to each query's own. Blocks past a row's length
(the table is padded to a width shared by the batch) hold anything: the mask hides them.

This is the gather form, portable to every platform; it reads M·P keys per row, where M is
the table's width, so the engine buckets M to the longest sequence it serves at the moment.

The letters are those of `scaling.models.transformer`, plus N (blocks in the pool), P
(positions per block) and M (blocks in a row's table).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class PagedBatch:
    """Where the new tokens of a batch sit in their sequences and in the pool."""

    positions_BL: jax.Array  # int32: each new token's position in its sequence
    slots_BL: jax.Array  # int32: the flat pool slot its key and value are written to
    block_table_BM: jax.Array  # int32: the blocks holding each row's positions, in order
    logit_index_B: jax.Array  # int32: the one token of each row whose logits are returned
    num_blocks: int = flax.struct.field(pytree_node=False)
    block_size: int = flax.struct.field(pytree_node=False)


def write(pool_NPKDh: jax.Array, slots_BL: jax.Array, new_BLKDh: jax.Array) -> jax.Array:
    """The pool with the new keys (or values) stored at their slots."""
    N, P, K, Dh = pool_NPKDh.shape
    flat = pool_NPKDh.reshape(N * P, K, Dh)
    flat = flat.at[slots_BL.reshape(-1)].set(
        new_BLKDh.reshape(-1, K, Dh).astype(flat.dtype), mode="drop")
    return flat.reshape(N, P, K, Dh)


def gather(pool_NPKDh: jax.Array, block_table_BM: jax.Array) -> jax.Array:
    """Each row's keys (or values) in position order, (B, M·P, K, Dh)."""
    B, M = block_table_BM.shape
    _, P, K, Dh = pool_NPKDh.shape
    return pool_NPKDh[block_table_BM].reshape(B, M * P, K, Dh)


def visible(positions_BL: jax.Array, num_keys: int) -> jax.Array:
    """The keys each query may see (B, L, S): the positions up to its own."""
    return jnp.arange(num_keys)[None, None, :] <= positions_BL[:, :, None]
