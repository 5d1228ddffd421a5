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
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from scaling.errors import UserError
from scaling.models import context
from scaling.models.axes import BATCH, HEADS, SEQ

LANES = 128  # the kernel's blocks are whole multiples of the TPU's lane width
BLOCK_CHOICES = (512, 256, LANES)


def block_sizes_for(seq_len: int, block: int = 0) -> splash.BlockSizes:
    """`default_block_sizes`, or square blocks of `block` positions
    (`--config.model.splash_block`), which must divide the queries' run of positions."""
    if not block:
        return default_block_sizes(seq_len)
    if block % LANES or seq_len % block:
        raise UserError(f"--config.model.splash_block={block}: must be a multiple of {LANES} "
                        f"that divides {seq_len}, the positions the kernel's blocks tile")
    return _square(block)


def _square(block: int) -> splash.BlockSizes:
    return splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)


def default_block_sizes(seq_len: int) -> splash.BlockSizes:
    """The same square block for every kernel: the largest of 512, 256, 128 that divides L.

    512 is what MaxText ships for all eight splash block sizes and it leaves VMEM to spare: a
    512x512 float32 logits block is 1 MiB, against 16 MiB of scoped VMEM on v5e. The kernel's
    own default, 128, is four times as many grid steps, each paying a fixed per-step overhead,
    and fills v6e's 256-wide MXU only halfway. Blocks must divide L, so shorter or odd
    lengths fall back to 256, then 128. These are reasoned from the hardware, not measured: no
    TPU was at hand to sweep them, so set `--config.model.splash_block` to tune a model.
    The backward stays as two kernels (dq, then dk/dv), as MaxText's default; the kernel's
    fused option writes a float32 dq per key block, which costs memory that grows with L.
    """
    _check_seq_len(seq_len)
    return _square(next(b for b in BLOCK_CHOICES if seq_len % b == 0))


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
    ids_BL = None if segment_ids_BL is None else _padding_apart(segment_ids_BL, jnp.arange(L))
    return _apply(kernel, q_BLHDh, k_BSKDh, v_BSKDh, ids_BL, ids_BL)


def _padding_apart(segment_ids_BL: jax.Array, slot_L: jax.Array) -> jax.Array:
    """Segment ids with each padding slot given its own negative id (-1 - slot), so that
    "same id and causal" lets padding see only itself, as `transformer.segment_mask` does."""
    ids_BL = segment_ids_BL.astype(jnp.int32)
    return jnp.where(ids_BL == 0, -1 - slot_L.astype(jnp.int32), ids_BL)


def _apply(kernel, q_BLHDh, k_BSKDh, v_BSKDh, q_ids_BL, kv_ids_BS) -> jax.Array:
    """The kernel over a batch: queries scaled, heads moved in front of the sequence, the
    batch vmapped (one grid axis of one launch)."""
    Dh = q_BLHDh.shape[-1]
    q_BHLDh = jnp.swapaxes(q_BLHDh * jnp.asarray(Dh**-0.5, q_BLHDh.dtype), 1, 2)
    k_BKSDh = jnp.swapaxes(k_BSKDh, 1, 2)
    v_BKSDh = jnp.swapaxes(v_BSKDh, 1, 2)
    if q_ids_BL is None:
        out_BHLDh = jax.vmap(kernel)(q_BHLDh, k_BKSDh, v_BKSDh)
    else:
        def one_example(q_HLDh, k_KSDh, v_KSDh, q_ids_L, kv_ids_S):
            return kernel(q_HLDh, k_KSDh, v_KSDh,
                          segment_ids=splash.SegmentIds(q=q_ids_L, kv=kv_ids_S))

        out_BHLDh = jax.vmap(one_example)(q_BHLDh, k_BKSDh, v_BKSDh, q_ids_BL, kv_ids_BS)
    return jnp.swapaxes(out_BHLDh, 1, 2)


def _context_kernel(L: int, H: int, seq_shards: int, block_sizes: splash.BlockSizes | None,
                    block: int, interpret: bool):
    """The kernel for queries reordered and split over `seq_shards` devices
    (`scaling.models.context`), against all L keys in order.

    The causal mask compares each query's original slot (the mask's `q_sequence`, which the
    kernel also reads to mask inside partial blocks) with the key's; its block tables are
    built for the whole sequence and split over the devices with the queries. A block of
    queries must not straddle two of the order's chunks, so blocks divide the chunk length.
    """
    chunk = L // (2 * seq_shards)
    if chunk % LANES:
        raise UserError(f"splash attention with the sequence split over {seq_shards} devices "
                        f"needs --config.data.seq_len to be a multiple of 2 x {seq_shards} x "
                        f"{LANES} = {2 * seq_shards * LANES}, not {L}")
    block_sizes = block_sizes_for(chunk, block) if block_sizes is None else block_sizes
    causal = splash.CausalMask((L, L), shard_count=seq_shards)
    causal.q_sequence = np.asarray(context.balanced_order(L, seq_shards))
    return splash.make_splash_mha(splash.MultiHeadMask([causal] * H), block_sizes=block_sizes,
                                  head_shards=1, q_seq_shards=seq_shards, interpret=interpret)


def batch_and_head_axes(mesh: Mesh | AbstractMesh, batch: int, heads: int, kv_heads: int,
                        batch_axes: str | Sequence[str] | None,
                        head_axes: str | Sequence[str] | None,
                        kernel: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The mesh axes a kernel under `jax.shard_map` splits examples and heads over: those
    given, or where None those the logical rules in scope give `batch` and `heads`; checked
    to divide `batch` examples and both `heads` query and `kv_heads` key/value heads."""
    logical = nn.logical_to_mesh_axes((BATCH, HEADS))
    batch_axes = context.axis_names(logical[0] if batch_axes is None else batch_axes)
    head_axes = context.axis_names(logical[1] if head_axes is None else head_axes)
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    head_shards = math.prod(mesh.shape[a] for a in head_axes)
    if batch % batch_shards:
        raise UserError(f"{kernel}: batch {batch} does not split over the mesh axes "
                        f"{batch_axes} of {batch_shards} devices")
    if heads % head_shards or kv_heads % head_shards:
        raise UserError(f"{kernel}: {heads} query and {kv_heads} key/value heads must both "
                        f"split over the mesh axes {head_axes} of {head_shards} devices")
    return batch_axes, head_axes


def sharded_splash_attention(q_BLHDh: jax.Array, k_BSKDh: jax.Array, v_BSKDh: jax.Array,
                             segment_ids_BL: jax.Array | None = None,
                             kv_segment_ids_BS: jax.Array | None = None, *,
                             seq_shards: int = 1,
                             mesh: Mesh | AbstractMesh | None = None,
                             batch_axes: str | Sequence[str] | None = None,
                             head_axes: str | Sequence[str] | None = None,
                             block_sizes: splash.BlockSizes | None = None, block: int = 0,
                             interpret: bool = False) -> jax.Array:
    """`splash_attention` run once per device under `jax.shard_map`, inside a GSPMD program.

    `block` (`--config.model.splash_block`) sets square blocks of that many positions where
    `block_sizes` is not given; 0 takes `default_block_sizes`.

    Examples are split over `batch_axes` and heads over `head_axes`. Splitting query and
    key/value heads alike keeps each group together: a shard holds query heads
    [i·H/n, (i+1)·H/n) and key/value heads [i·K/n, (i+1)·K/n), the ones they read.
    With `seq_shards` > 1 (context parallelism) the queries arrive reordered by
    `context.balanced_order` and split over the mesh axes of `seq`, with their segment ids;
    keys, values and `kv_segment_ids_BS` are the whole sequence in order on every device.
    Otherwise sequence and head width stay whole. GSPMD reshards the inputs to this layout
    if they arrive otherwise, and the output leaves in it.

    Left as None, the mesh is the one set by `jax.set_mesh` and the axes are those the
    logical rules in scope (`nn.logical_axis_rules`) give `batch`, `seq` and `heads`, which is
    how the training step traces the model; with no mesh set it runs `splash_attention` as is.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    B, L, H = q_BLHDh.shape[:3]
    if block_sizes is None and block and seq_shards == 1:
        block_sizes = block_sizes_for(L, block)
    if mesh.empty:
        return splash_attention(q_BLHDh, k_BSKDh, v_BSKDh, segment_ids_BL,
                                block_sizes=block_sizes, interpret=interpret)
    batch_axes, head_axes = batch_and_head_axes(mesh, B, H, k_BSKDh.shape[2], batch_axes,
                                                head_axes, "splash attention")
    seq_axes = context.axis_names(nn.logical_to_mesh_axes((SEQ,))[0]) if seq_shards > 1 else ()
    if math.prod(mesh.shape[a] for a in seq_axes) != (seq_shards if seq_axes else 1):
        raise ValueError(f"seq_shards={seq_shards} is not the size of the sequence's mesh "
                         f"axes {seq_axes}")

    batch_spec, head_spec, seq_spec = batch_axes or None, head_axes or None, seq_axes or None
    q_spec = PartitionSpec(batch_spec, seq_spec, head_spec, None)
    kv_spec = PartitionSpec(batch_spec, None, head_spec, None)
    if seq_shards == 1:
        q_ids = kv_ids = segment_ids_BL

        def local(q_BLHDh, k_BSKDh, v_BSKDh, q_ids_BL, kv_ids_BS):
            return splash_attention(q_BLHDh, k_BSKDh, v_BSKDh, q_ids_BL,
                                    block_sizes=block_sizes, interpret=interpret)

        kernel, kernel_spec = None, None
    else:
        kernel = _context_kernel(L, H, seq_shards, block_sizes, block, interpret)
        kernel_spec = kernel.manual_sharding_spec(
            NamedSharding(mesh, PartitionSpec(None, seq_spec)))
        if segment_ids_BL is None:
            q_ids = kv_ids = None
        else:
            q_ids = _padding_apart(segment_ids_BL,
                                   jnp.asarray(context.balanced_order(L, seq_shards)))
            kv_ids = _padding_apart(kv_segment_ids_BS, jnp.arange(L))

        def local(q_BLHDh, k_BSKDh, v_BSKDh, q_ids_BL, kv_ids_BS, kernel):
            return _apply(kernel, q_BLHDh, k_BSKDh, v_BSKDh, q_ids_BL, kv_ids_BS)

    args = [q_BLHDh, k_BSKDh, v_BSKDh, q_ids, kv_ids]
    specs = [q_spec, kv_spec, kv_spec, PartitionSpec(batch_spec, seq_spec),
             PartitionSpec(batch_spec, None)]
    if kernel is not None:
        args.append(kernel)
        specs.append(kernel_spec)
    # check_vma=False: the kernel's output shapes carry no record of which mesh axes they vary
    # over, which jax's varying-axes check requires of every pallas_call under shard_map.
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec,
                         check_vma=False)(*args)
