"""Causal grouped-query attention through the Pallas splash-attention kernel, for TPU.

Shape suffixes follow `scaling.models.transformer`:

    B  batch                     H   query heads
    L  sequence length (queries) K   key/value heads (K divides H)
    S  key/value length          Dh  width of one head

The einsum forms in `transformer` write the (L, S) logits of every head to memory; the kernel
keeps one block of them in VMEM at a time and skips the blocks above the causal diagonal, so
attention memory grows with L rather than L² and about half the blocks are never computed.

What the kernel does and does not do (jax 0.10, `jax.experimental.pallas.ops.tpu
.splash_attention`), and what that costs here:

- It does not scale the logits, so the queries are multiplied by Dh**-0.5 before the call, in
  their own dtype, as the einsum forms do to the logits. The gradient of that product is left
  to autodiff outside the kernel.
- Its multi-head kernel takes grouped-query attention as it is: query head h reads key/value
  head h // (H // K) through the kernel's block index maps, and the key/value backward kernel
  sums over each group. Repeating keys and values to H heads would copy them in HBM and then
  sum their gradients back; the MQA kernel would need one launch per key/value head.
- It works on one example laid out (heads, seq, head_dim), so the batch is vmapped (the
  vmap becomes a grid axis of one kernel launch) and heads are moved in front of the sequence.
- It computes in float32 inside: probabilities are never rounded to bfloat16, unlike the einsum
  forms, so in bfloat16 the two agree to bfloat16 rounding, not exactly.
- Segment ids select the keys of the same document. Padding is segment 0 in this project and
  `transformer.segment_mask` lets a padding token see only itself (a softmax row must keep one
  key). Each padding slot here gets its own negative id, so the kernel's "same id and causal"
  reproduces exactly that mask, with no extra kernel input.
- The mask is a static `CausalMask`, turned into block tables while tracing; documents only
  refine it inside the blocks. Both need L == S and L a multiple of 128 (the kernel's lane
  width), so the kernel serves training and prefill-from-empty, not decoding against a cache.

Pallas TPU kernels also run in the Pallas interpreter (`interpret=True`) on CPU in this jax
version, which is how the tests check numbers against einsum attention without a TPU; the
interpreter is slow and is for tests only. On TPU devices, including compile-only ones from
`scaling.preflight.topology`, the kernel lowers to Mosaic custom calls (`tpu_custom_call`):
one for the forward pass, and with a gradient three (forward keeping residuals, dq, dk/dv).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from scaling.errors import UserError
from scaling.models.axes import BATCH, HEADS

LANES = 128  # the kernel's blocks are whole multiples of the TPU's lane width
BLOCK_CHOICES = (512, 256, LANES)


def default_block_sizes(seq_len: int) -> splash.BlockSizes:
    """The same square block for every kernel: the largest of 512, 256, 128 that divides L.

    512 is what MaxText ships for all eight splash block sizes and it leaves VMEM to spare: a
    512x512 float32 logits block is 1 MiB, against 16 MiB of scoped VMEM on v5e. The kernel's
    own default, 128, is four times as many grid steps, each paying a fixed per-step overhead,
    and fills v6e's 256-wide MXU only halfway. Blocks must divide L, so shorter or odd
    lengths fall back to 256, then 128. These are reasoned from the hardware, not measured: no
    TPU was at hand to sweep them, so pass `block_sizes` to tune for a given model.
    The backward stays as two kernels (dq, then dk/dv), as MaxText's default; the kernel's
    fused option writes a float32 dq per key block, which costs memory that grows with L.
    """
    _check_seq_len(seq_len)
    block = next(b for b in BLOCK_CHOICES if seq_len % b == 0)
    return splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)


def _check_seq_len(seq_len: int) -> None:
    if seq_len % LANES:
        raise UserError(f"splash attention needs a sequence length that is a multiple of "
                        f"{LANES}, got {seq_len}; pad the sequence or use another attention form")


def splash_attention(q_BLHDh: jax.Array, k_BSKDh: jax.Array, v_BSKDh: jax.Array,
                     segment_ids_BL: jax.Array | None = None, *,
                     block_sizes: splash.BlockSizes | None = None,
                     interpret: bool = False) -> jax.Array:
    """Causal attention within each document, on the arrays of one device.

    Inside `jax.jit` on several devices use `sharded_splash_attention`: a Pallas kernel is one
    opaque call that GSPMD cannot split, so it would gather every array onto each device.
    `interpret` runs the kernel through the Pallas interpreter, which works on CPU.
    """
    B, L, H, Dh = q_BLHDh.shape
    S, K = k_BSKDh.shape[1], k_BSKDh.shape[2]
    if S != L:
        raise ValueError(f"splash attention is self-attention over one sequence: got {L} "
                         f"queries and {S} keys (decoding against a cache needs another form)")
    if H % K:
        raise ValueError(f"{K} key/value heads must divide {H} query heads")
    _check_seq_len(L)
    block_sizes = default_block_sizes(L) if block_sizes is None else block_sizes

    # The block tables depend only on the static mask, so they are worked out while tracing
    # (and cached by the kernel module); heads share one table.
    mask = splash.MultiHeadMask([splash.CausalMask((L, S)) for _ in range(H)])
    kernel = splash.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)

    q_BHLDh = jnp.swapaxes(q_BLHDh * jnp.asarray(Dh**-0.5, q_BLHDh.dtype), 1, 2)
    k_BKSDh = jnp.swapaxes(k_BSKDh, 1, 2)
    v_BKSDh = jnp.swapaxes(v_BSKDh, 1, 2)
    if segment_ids_BL is None:
        out_BHLDh = jax.vmap(kernel)(q_BHLDh, k_BKSDh, v_BKSDh)
    else:
        ids_BL = segment_ids_BL.astype(jnp.int32)
        ids_BL = jnp.where(ids_BL == 0, -1 - jnp.arange(L, dtype=jnp.int32), ids_BL)

        def one_example(q_HLDh, k_KSDh, v_KSDh, ids_L):
            return kernel(q_HLDh, k_KSDh, v_KSDh,
                          segment_ids=splash.SegmentIds(q=ids_L, kv=ids_L))

        out_BHLDh = jax.vmap(one_example)(q_BHLDh, k_BKSDh, v_BKSDh, ids_BL)
    return jnp.swapaxes(out_BHLDh, 1, 2)


def _axis_names(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def sharded_splash_attention(q_BLHDh: jax.Array, k_BSKDh: jax.Array, v_BSKDh: jax.Array,
                             segment_ids_BL: jax.Array | None = None, *,
                             mesh: Mesh | AbstractMesh | None = None,
                             batch_axes: str | Sequence[str] | None = None,
                             head_axes: str | Sequence[str] | None = None,
                             block_sizes: splash.BlockSizes | None = None,
                             interpret: bool = False) -> jax.Array:
    """`splash_attention` run once per device under `jax.shard_map`, inside a GSPMD program.

    Examples are split over `batch_axes` and heads over `head_axes`; sequence and head width
    stay whole, since the kernel needs every key of a query's row. Splitting query and
    key/value heads alike keeps each group together: a shard holds query heads
    [i·H/n, (i+1)·H/n) and key/value heads [i·K/n, (i+1)·K/n), the ones they read.
    GSPMD reshards the inputs to this layout if they arrive otherwise (with the project's
    default rules they already do), and the output leaves in it.

    Left as None, the mesh is the one set by `jax.set_mesh` and the axes are those the
    logical rules in scope (`nn.logical_axis_rules`) give `batch` and `heads`, which is how
    the training step traces the model; with no mesh set it runs `splash_attention` as is.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return splash_attention(q_BLHDh, k_BSKDh, v_BSKDh, segment_ids_BL,
                                block_sizes=block_sizes, interpret=interpret)
    if batch_axes is None or head_axes is None:
        logical = nn.logical_to_mesh_axes((BATCH, HEADS))
        batch_axes = logical[0] if batch_axes is None else batch_axes
        head_axes = logical[1] if head_axes is None else head_axes
    batch_axes, head_axes = _axis_names(batch_axes), _axis_names(head_axes)

    B, H, K = q_BLHDh.shape[0], q_BLHDh.shape[2], k_BSKDh.shape[2]
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    head_shards = math.prod(mesh.shape[a] for a in head_axes)
    if B % batch_shards:
        raise UserError(f"splash attention: batch {B} does not split over the mesh axes "
                        f"{batch_axes} of {batch_shards} devices")
    if H % head_shards or K % head_shards:
        raise UserError(f"splash attention: {H} query and {K} key/value heads must both split "
                        f"over the mesh axes {head_axes} of {head_shards} devices")

    batch_spec, head_spec = batch_axes or None, head_axes or None
    qkv_spec = PartitionSpec(batch_spec, None, head_spec, None)
    ids_spec = PartitionSpec(batch_spec, None)

    def local(q_BLHDh, k_BSKDh, v_BSKDh, *segment_ids):
        return splash_attention(q_BLHDh, k_BSKDh, v_BSKDh, *segment_ids,
                                block_sizes=block_sizes, interpret=interpret)

    args = (q_BLHDh, k_BSKDh, v_BSKDh)
    specs = (qkv_spec,) * 3
    if segment_ids_BL is not None:
        args, specs = args + (segment_ids_BL,), specs + (ids_spec,)
    # check_vma=False: the kernel's output shapes carry no record of which mesh axes they vary
    # over, which jax's varying-axes check requires of every pallas_call under shard_map.
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec,
                         check_vma=False)(*args)
