"""Attention on NVIDIA GPUs: cuDNN's fused flash attention through `jax.nn.dot_product_attention`.

The fused kernel never writes the (B, H, L, S) scores to memory, and with a causal mask it
skips the blocks above the diagonal, so it does about half the written forms' attention work
and holds none of their float32 probabilities for the backward pass.

cuDNN runs bfloat16 or float16 inputs with heads of at most 128 (a multiple of 8); `usable`
says whether a config qualifies, and `auto` falls back to `grouped_einsum` where it does not.
Packed documents reach the kernel as a boolean mask, which JAX turns into an additive bias of
(B, 1, L, S) in the compute dtype: memory that grows with L², but no float32 scores and no
probabilities, and the causal flag still lets the kernel skip the upper triangle.

`implementation="xla"` runs the same call through XLA's portable path, which is how the CPU
tests check the masks and layout of this form against the written ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scaling.models.attention import causal_mask, segment_mask

CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128


def usable(dtype, head_dim: int | None) -> bool:
    """Whether cuDNN's fused kernel takes this compute dtype and head width (None: any)."""
    fits_head = head_dim is None or (head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM)
    return jnp.dtype(dtype) in CUDNN_DTYPES and fits_head


def cudnn_attention(q_BLHDh: jax.Array, k_BSKDh: jax.Array, v_BSKDh: jax.Array,
                    segment_ids_BL: jax.Array | None,
                    kv_segment_ids_BS: jax.Array | None = None,
                    q_slot_L: jax.Array | None = None, implementation: str = "cudnn"
                    ) -> jax.Array:
    """Causal grouped-query attention of a training pass, kept within each packed document
    when `segment_ids_BL` is given; the result is (B, L, H, Dh) like the query.

    Keys and values are the whole sequence in order. Queries are too, unless `q_slot_L`
    gives each query's slot (a sequence reordered for context parallelism): the causal flag
    then no longer describes the mask, so the mask goes to the kernel whole.
    """
    if q_slot_L is None and segment_ids_BL is None:
        mask_B1LS = None
    elif segment_ids_BL is None:
        mask_B1LS = causal_mask(q_slot_L, k_BSKDh.shape[1])[:, None]
    else:
        mask_B1LS = segment_mask(segment_ids_BL, kv_segment_ids_BS, q_slot_L)[:, None]
    return jax.nn.dot_product_attention(q_BLHDh, k_BSKDh, v_BSKDh, mask=mask_B1LS,
                                        is_causal=q_slot_L is None,
                                        implementation=implementation)
