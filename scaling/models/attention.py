"""Masks and the written (einsum) forms of attention, which every attention path shares.

The transformer's training pass and the kernels' reference checks build the same masks, and
`scaling.models.gpu_attention` hands them to cuDNN; keeping them here, below both, lets the
model import the kernels and the kernels the masks without either importing the other.
Shape suffixes as in `scaling.models.transformer`.

The written forms take a boolean mask (B or 1, L, S) of the keys each query may see: one
causal mask broadcast over the batch, or with segment ids one per row. `ATTENTION_FORMS`
names them for `model.attention`; `batched_matmul` is the CPU-only form of
`scaling.models.cpu_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scaling.errors import UserError
from scaling.models import cpu_attention


def masked_softmax(logits_LS: jax.Array, mask_LS: jax.Array) -> jax.Array:
    """Float32 softmax over the last axis, with the keys `mask_LS` hides at probability 0."""
    return jax.nn.softmax(jnp.where(mask_LS, logits_LS, jnp.finfo(jnp.float32).min), axis=-1)


def causal_mask(q_slot_L: jax.Array, S: int) -> jax.Array:
    """The keys each query may see (1, L, S), queries at slots `q_slot_L` of S keys in order."""
    return (jnp.arange(S)[None, :] <= q_slot_L[:, None])[None]


def segment_mask(segment_ids_BL: jax.Array, kv_segment_ids_BS: jax.Array | None = None,
                 q_slot_L: jax.Array | None = None) -> jax.Array:
    """The keys each query of a packed row may see (B, L, S): earlier tokens of its document.

    Keys are the row's tokens in order (`kv_segment_ids_BS`, by default the queries' own
    ids); queries sit at slots `q_slot_L` (by default 0..L-1; a sequence reordered for
    context parallelism passes each query's original slot).

    Padding (segment 0) is seen by no real token. A padding query sees only itself: every
    softmax row then keeps one key, where an empty row would give NaN with -inf logits, or,
    with the finite minimum used here, a uniform mix of keys it must not see.
    """
    kv_ids_BS = segment_ids_BL if kv_segment_ids_BS is None else kv_segment_ids_BS
    L, S = segment_ids_BL.shape[1], kv_ids_BS.shape[1]
    q_slot_L = jnp.arange(L) if q_slot_L is None else q_slot_L
    slot_S = jnp.arange(S)
    causal_1LS = causal_mask(q_slot_L, S)
    same_BLS = segment_ids_BL[:, :, None] == kv_ids_BS[:, None, :]
    real_B1S = (kv_ids_BS != 0)[:, None, :]
    itself_1LS = (slot_S[None, :] == q_slot_L[:, None])[None]
    return (causal_1LS & same_BLS & real_B1S) | itself_1LS


def grouped_einsum_attention(q_BLHDh: jax.Array, k_BSKDh: jax.Array, v_BSKDh: jax.Array,
                             mask_BLS: jax.Array) -> jax.Array:
    """Attention as two einsums over (kv head, group) axes, differentiated by JAX.

    `mask_BLS` holds the keys each query may see; its first axis is 1 when every row shares
    one mask (causal only), so that case never materialises a mask per row.

    The default: on TPU and GPU, XLA fuses and lays this out best. For `lm_8b` on a v5p-128,
    preflight measures a 32.8 GiB peak a chip, against 36.9 GiB for the batched layout of
    `scaling.models.cpu_attention` with autodiff and 46.9 GiB with its hand-written backward,
    whose saved float32 probabilities outlive the layer's recomputation.
    """
    B, L, H, Dh = q_BLHDh.shape
    K = k_BSKDh.shape[2]
    q_BLKGDh = q_BLHDh.reshape(B, L, K, H // K, Dh)
    logits_BKGLS = jnp.einsum("blkgd,bskd->bkgls", q_BLKGDh, k_BSKDh,
                              preferred_element_type=jnp.float32) * Dh**-0.5
    mask_B11LS = mask_BLS[:, None, None]
    probs_BKGLS = masked_softmax(logits_BKGLS, mask_B11LS).astype(q_BLHDh.dtype)
    out_BLKGDh = jnp.einsum("bkgls,bskd->blkgd", probs_BKGLS, v_BSKDh)
    return out_BLKGDh.reshape(B, L, H, Dh)


def chunked_einsum_attention(q_BLHDh: jax.Array, k_BSKDh: jax.Array, v_BSKDh: jax.Array,
                             mask_BLS: jax.Array, chunk: int) -> jax.Array:
    """`grouped_einsum_attention` for `chunk` queries at a time, so that its float32 scores
    exist for one block of queries only, in the forward pass and, each block recomputed, in
    the backward. Blocks take every N-th query (strided, as the tiled loss does), so a
    sequence split over devices gives each device its share of every block."""
    B, L, H, Dh = q_BLHDh.shape
    if L % chunk:
        raise UserError(f"--config.model.query_chunk={chunk}: must divide the sequence "
                        f"length {L}")
    N = L // chunk
    q_NBCHDh = jnp.moveaxis(q_BLHDh.reshape(B, chunk, N, H, Dh), 2, 0)
    mask_NBCS = jnp.moveaxis(mask_BLS.reshape(mask_BLS.shape[0], chunk, N, -1), 2, 0)

    @jax.checkpoint
    def block(inputs):
        q_BCHDh, mask_BCS = inputs
        return grouped_einsum_attention(q_BCHDh, k_BSKDh, v_BSKDh, mask_BCS)

    out_NBCHDh = jax.lax.map(block, (q_NBCHDh, mask_NBCS))
    return jnp.moveaxis(out_NBCHDh, 0, 2).reshape(B, L, H, Dh)


ATTENTION_FORMS = {"grouped_einsum": grouped_einsum_attention,
                   "batched_matmul": cpu_attention.batched_matmul_attention}
