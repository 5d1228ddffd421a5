"""The cuDNN attention form: its masks and layout checked on CPU through the same
`jax.nn.dot_product_attention` call with XLA's implementation, and when `auto` picks it.
The kernel itself runs only on an NVIDIA GPU (`bench/gpu_lm.py` checks it there)."""

import jax
import jax.numpy as jnp
import pytest
from test_tpu_attention import (
    assert_same_attention,
    inputs,
    packed_segment_ids,
    reference_attention,
    value_and_grads,
)

from scaling.errors import UserError
from scaling.models import context, gpu_attention
from scaling.models.attention import causal_mask, segment_mask
from scaling.models.attention_choice import choose_attention


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("reordered", [False, True], ids=["in_order", "reordered"])
def test_the_cudnn_call_equals_einsum_attention_through_xla(packed, reordered):
    """Queries in order, or reordered as context parallelism has them (the mask then goes to
    the kernel whole, since the causal flag no longer describes it)."""
    q, k, v, cotangent = inputs()
    segment_ids = packed_segment_ids() if packed else None
    L = q.shape[1]
    order = jnp.asarray(context.balanced_order(L, 2)) if reordered else None
    slots = jnp.arange(L) if order is None else order
    q_ids = None if segment_ids is None else segment_ids[:, slots]
    mask_BLS = (segment_mask(q_ids, segment_ids, slots) if packed
                else causal_mask(slots, L))
    actual = value_and_grads(jax.jit(lambda q, k, v: gpu_attention.cudnn_attention(
        q, k, v, q_ids, segment_ids, order, implementation="xla")), q, k, v, cotangent)
    expected = value_and_grads(lambda *qkv: reference_attention(*qkv, mask_BLS),
                               q, k, v, cotangent)
    assert_same_attention(actual, expected)


def test_auto_takes_cudnn_on_gpu_only_where_the_kernel_runs():
    assert choose_attention("auto", "gpu", 2048, "bfloat16", 128) == "cudnn"
    assert choose_attention("auto", "gpu", 2048, "float16", 64) == "cudnn"
    assert choose_attention("auto", "gpu", 2048, "float32", 128) == "grouped_einsum"
    assert choose_attention("auto", "gpu", 2048, "bfloat16", 256) == "grouped_einsum"
    assert choose_attention("auto", "cpu", 2048, "bfloat16", 128) == "grouped_einsum"
    assert choose_attention("auto", "tpu", 2048, "bfloat16", 128) == "splash"
    assert choose_attention("cudnn", None, 2048, "bfloat16", 128) == "grouped_einsum"
    with pytest.raises(UserError, match="attention=cudnn runs on GPU only; these devices "
                                        "are cpu"):
        choose_attention("cudnn", "cpu", 2048, "bfloat16", 128)
    with pytest.raises(UserError, match="dtype bfloat16 or float16 \\(not float32\\)"):
        choose_attention("cudnn", "gpu", 2048, "float32", 128)
    with pytest.raises(UserError, match="head_dim a multiple of 8 up to 128 \\(not 100\\)"):
        choose_attention("cudnn", "gpu", 2048, "bfloat16", 100)

