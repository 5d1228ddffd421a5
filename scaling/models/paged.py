"""Attention over a paged KV cache: keys and values live in a pool of fixed-size blocks.

A serving engine keeps one pool for keys and one for values, each (K, Lr·N, P, Dh): for every
key/value head, N blocks of P positions for each of the Lr layers, layer l's block b at page
l·N + b. A sequence owns a list of blocks, its block table, in the order of its positions, so
position p of a sequence lives in block `table[p // P]` at offset `p % P`, in every layer.
Memory is then taken a block at a time as a sequence grows, never for the whole context, and
sequences that start with the same tokens can share those blocks.

The layers share one array rather than one each, and each layer reads and writes it through
its layer number: a loop over the layers then carries the pool and updates it in place, where
slicing a layer's pool out (as a scan over stacked variables does) would copy the whole cache
every step. Heads lead, so one head's pages are contiguous as TPU paged-attention kernels
want them.

One call handles L new tokens for each of B rows: a decode step (L = 1 for every running
sequence) or a chunk of a prompt (the tokens of one sequence from some position on). The new
keys and values are written at their slots first, then every row gathers its blocks through
its table and attends to the positions up to each query's own (`attend`). Blocks past a row's length
(the table is padded to a width shared by the batch) hold anything: the mask hides them.

This is the gather form, portable to every platform; it reads M·P keys per row, where M is
the table's width, so the engine buckets M to the longest sequence it serves at the moment.

The letters are those of `scaling.models.transformer`, plus N (blocks in the pool), P
(positions per block), M (blocks in a row's table) and Lr (layers).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class PagedBatch:
    """Where the new tokens of a batch sit in their sequences and in the pool."""

    positions_BL: jax.Array  # int32: each new token's position in its sequence
    slots_BL: jax.Array  # int32: block·P + offset where its key and value go; N·P: nowhere
    block_table_BM: jax.Array  # int32: the blocks holding each row's positions, in order
    logit_index_B: jax.Array  # int32: the one token of each row whose logits are returned
    num_blocks: int = flax.struct.field(pytree_node=False)
    block_size: int = flax.struct.field(pytree_node=False)
    # True: one token a row, attended by the Pallas paged-attention kernel (TPU only,
    # `scaling.models.tpu_paged_attention`); False: the gather form below.
    tpu_kernel: bool = flax.struct.field(pytree_node=False, default=False)
    kv_int8: bool = flax.struct.field(pytree_node=False, default=False)  # see `Pool`


@flax.struct.dataclass
class Pool:
    """The keys and values of every layer, (K, Lr·N, P, Dh) each.

    An int8 pool (`PagedBatch.kv_int8`) keeps one float scale per position and head beside
    it, (K, Lr·N, P, 1): each key or value vector is stored as round(x / s) with
    s = max|x| / 127, a quarter of float32's bytes plus 4 per 64-wide head.
    """

    key: jax.Array
    value: jax.Array
    key_scale: jax.Array | None = None
    value_scale: jax.Array | None = None


def quantize(x_TDh: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per vector (last axis), with its scale."""
    scale = jnp.max(jnp.abs(x_TDh), axis=-1, keepdims=True).astype(jnp.float32) / 127
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.round(x_TDh / scale).astype(jnp.int8), scale


def pool_shape(num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
               block_size: int) -> tuple[int, int, int, int]:
    return (num_kv_heads, num_layers * num_blocks, block_size, head_dim)


def pool_variables(config, num_blocks: int, block_size: int) -> dict:
    """An empty pool of `num_blocks` blocks for a `TransformerConfig`'s model, as the "cache"
    collection that a step with a `paged_batch` applies with."""
    shape = pool_shape(config.num_layers, config.num_kv_heads, config.head_dim, num_blocks,
                       block_size)
    return {"paged_key": jnp.zeros(shape, config.dtype),
            "paged_value": jnp.zeros(shape, config.dtype)}


def locate(block_table, positions, width: int, block_size: int):
    """(slots, table): where each position's key and value go in the pool, block·P + offset
    read through its row's block table, and that table cut or zero-padded to `width` blocks,
    the width the batch is compiled for. `write` undoes the slot arithmetic.

    The table is (..., M) and the positions (..., L) with the same leading axes: one
    sequence's blocks and new positions, or a batch's rows. numpy in, numpy out, for a
    scheduler building a step on the host; jax arrays in (traced too), jax arrays out.
    """
    xp = jnp if isinstance(block_table, jax.Array) or isinstance(positions, jax.Array) else np
    slots = (xp.take_along_axis(block_table, positions // block_size, axis=-1) * block_size
             + positions % block_size)
    M = block_table.shape[-1]
    if M >= width:
        return slots, block_table[..., :width]
    padding = [(0, 0)] * (block_table.ndim - 1) + [(0, width - M)]
    return slots, xp.pad(block_table, padding)


def write(pool: Pool, layer, batch: PagedBatch, key_BLKDh: jax.Array,
          value_BLKDh: jax.Array) -> Pool:
    """The pool with one layer's new keys and values stored at the batch's slots (as
    `locate` made them); slots past the pool (padding) are dropped."""
    N, P = batch.num_blocks, batch.block_size
    slots = batch.slots_BL.reshape(-1)
    pages = jnp.where(slots < N * P, layer * N + slots // P, pool.key.shape[1])
    offsets = slots % P

    def store(pool_KnPDh, new_KTDh):
        return pool_KnPDh.at[:, pages, offsets].set(new_KTDh.astype(pool_KnPDh.dtype),
                                                     mode="drop")

    written = {}
    for name, new_BLKDh in (("key", key_BLKDh), ("value", value_BLKDh)):
        K, Dh = new_BLKDh.shape[2:]
        # Indexed by (:, pages, offsets), the written elements are (K, B·L, Dh).
        new_KTDh = new_BLKDh.reshape(-1, K, Dh).transpose(1, 0, 2)
        scale = getattr(pool, f"{name}_scale")
        if scale is not None:
            new_KTDh, new_scale_KT1 = quantize(new_KTDh)
            written[f"{name}_scale"] = store(scale, new_scale_KT1)
        written[name] = store(getattr(pool, name), new_KTDh)
    return Pool(**written)


def gather(pool_KnPDh: jax.Array, layer, batch: PagedBatch) -> jax.Array:
    """One layer's keys (or values) of each row in position order, (K, B, M·P, Dh): heads
    stay first, as the pool keeps them, so reading costs no transpose."""
    K, _, P, Dh = pool_KnPDh.shape
    B, M = batch.block_table_BM.shape
    return pool_KnPDh[:, layer * batch.num_blocks + batch.block_table_BM].reshape(
        K, B, M * P, Dh)


def attend(q_BLHDh: jax.Array, pool: Pool, layer, batch: PagedBatch,
           chunk_positions: int = 32) -> jax.Array:
    """Grouped-query attention of the new tokens to their rows' cached positions up to
    their own (the new ones written first), (B, L, H, Dh).

    The table is read a few blocks at a time (about `chunk_positions` keys) under a running
    softmax, so each chunk of keys is gathered into cache-sized pieces and used at once:
    gathering every row's keys whole first costs a second pass over memory, which a
    memory-bound decode step pays in full (on this form's CPU, 1.7x slower per layer at
    256 keys a row, 3.3x at 512).
    """
    B, L, H, Dh = q_BLHDh.shape
    K, _, P, _ = pool.key.shape
    M = batch.block_table_BM.shape[1]
    c = math.gcd(M, max(1, chunk_positions // P))  # blocks per chunk
    pages_CBc = (layer * batch.num_blocks + batch.block_table_BM).reshape(B, M // c, c)
    pages_CBc = pages_CBc.transpose(1, 0, 2)
    # Batch axes (kv head, row) lead every operand in the same order, as the pool lies.
    q_KBGLDh = q_BLHDh.reshape(B, L, K, H // K, Dh).transpose(2, 0, 3, 1, 4) * Dh**-0.5
    query_position_1B1L1 = batch.positions_BL[None, :, None, :, None]
    lowest = jnp.finfo(jnp.float32).min

    def read(name, pages_Bc):
        values = getattr(pool, name)[:, pages_Bc].reshape(K, B, c * P, -1).astype(
            q_BLHDh.dtype)
        scale = getattr(pool, f"{name}_scale")
        if scale is not None:
            values = values * scale[:, pages_Bc].reshape(K, B, c * P, 1).astype(values.dtype)
        return values

    def step(carry, chunk):
        top_KBGL1, total_KBGL1, out_KBGLDh = carry
        pages_Bc, first = chunk
        logits_KBGLS = jnp.einsum("kbgld,kbsd->kbgls", q_KBGLDh, read("key", pages_Bc),
                                  preferred_element_type=jnp.float32)
        key_position_S = first + jnp.arange(c * P)
        logits_KBGLS = jnp.where(key_position_S <= query_position_1B1L1, logits_KBGLS,
                                 lowest)
        new_top = jnp.maximum(top_KBGL1, logits_KBGLS.max(-1, keepdims=True))
        weights_KBGLS = jnp.exp(logits_KBGLS - new_top)
        rescale = jnp.exp(top_KBGL1 - new_top)
        total_KBGL1 = total_KBGL1 * rescale + weights_KBGLS.sum(-1, keepdims=True)
        out_KBGLDh = out_KBGLDh * rescale + jnp.einsum(
            "kbgls,kbsd->kbgld", weights_KBGLS.astype(q_BLHDh.dtype),
            read("value", pages_Bc), preferred_element_type=jnp.float32)
        return (new_top, total_KBGL1, out_KBGLDh), None

    shape = (K, B, H // K, L)
    start = (jnp.full((*shape, 1), lowest), jnp.zeros((*shape, 1)), jnp.zeros((*shape, Dh)))
    # Position 0 is in the first chunk and every query sees it, so `top` is real from then.
    (_, total, out), _ = jax.lax.scan(step, start,
                                      (pages_CBc, jnp.arange(M // c) * c * P))
    out_KBGLDh = (out / total).astype(q_BLHDh.dtype)
    return out_KBGLDh.transpose(1, 3, 0, 2, 4).reshape(B, L, H, Dh)
