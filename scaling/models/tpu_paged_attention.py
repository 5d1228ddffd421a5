"""Decode attention over the paged KV cache through the Pallas paged-attention kernel, for TPU.

Shape suffixes follow `scaling.models.paged`:

    B  rows (one new token each)   H   query heads
    K  key/value heads (K | H)     Dh  width of one head
    N  pages in the pool           P   positions per page (the engine's block size)
    M  pages in a row's block table

Each row's query attends to positions 0 .. lengths[b] - 1 of its sequence, where position p
lives at offset p % P of page `block_table[b, p // P]` of the pool. The new token's key and
value are written into the pool before this is called, so its length counts it.

The gather form in `scaling.models.paged` copies every row's pages into one array per chunk
of keys and masks them; the kernel instead DMAs the pages it needs straight from the pool in
HBM into VMEM, a compute block of `pages_per_compute_block` pages at a time with the next
block's copy in flight, and stops at each row's length: a row reads ceil(length / (ppcb·P))
blocks whatever the table's width. Rows of length 0 (empty decode slots) read nothing and
return zeros.

What the kernel does and does not do (jax 0.10, `jax.experimental.pallas.ops.tpu
.paged_attention`), and what that asks of the caller:

- It takes one query per row, (B, H, Dh): decode steps. A prompt chunk (several new tokens
  a row) stays with the gather form.
- It does not scale the logits, so the queries are multiplied by Dh**-0.5 first, in their
  own dtype, as the gather form does.
- Grouped-query attention is native: query head h reads key/value head h // (H // K).
- Its arithmetic is float32, but every key and value page is rounded to bfloat16 on its way
  out of VMEM (its dequantisation step casts to bfloat16 whether or not the pages are
  quantised). A bfloat16 pool loses nothing; a float32 pool agrees with the gather form to
  bfloat16 rounding of the keys and values, not exactly.
- Int8 pages come as `quantization_utils.QuantizedTensor(weight int8[K, N, P, Dh],
  scales[K, N, P, 1])`, dequantised as weight · scales / 127.5. Before the call the kernel
  broadcasts the scales to the weight's full shape in the scales' dtype, so every call holds
  a temporary the size of the pool at that dtype (four times the int8 pages for float32
  scales).
- Dh must be a multiple of 128 (the TPU's lane width): the kernel's running-max outputs share
  the queries' block shape, which Mosaic accepts only then. Any P compiles; multiples of the
  native tile's rows (8 for float32, 16 for bfloat16, 32 for int8) keep the VMEM buffers
  unpadded.
- Only the pages of the blocks a row reaches are read, but all of them, so table entries
  past the length inside the last block must still name pages of the pool (the engine pads
  tables with page 0). Lengths are clipped to M·P, the most a table can name, since beyond
  it the kernel would read the next row's entries.

The pages may be any (K, N, P, Dh) pool, including one shared by several layers with the
layer's pages offset in the table: the kernel reads the pool where it lies, so passing the
whole pool costs nothing, whereas slicing one layer's pages out of a stacked pool would copy
them before every call (an opaque call's operands are materialised).

Pallas TPU kernels also run in the TPU interpreter on CPU (`interpret=True`), which simulates
the DMAs and semaphores; that is how the tests check numbers without a TPU. On TPU devices,
including compile-only ones from `scaling.preflight.topology`, the kernel lowers to one Mosaic
custom call (`tpu_custom_call`) per device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
from jax.experimental.pallas.ops.tpu.paged_attention.quantization_utils import QuantizedTensor
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from scaling.errors import UserError
from scaling.models.tpu_attention import batch_and_head_axes

LANES = 128
KEYS_PER_COMPUTE_BLOCK = 512

Pages = jax.Array | QuantizedTensor


def pages_per_compute_block(table_width: int, page_size: int,
                            keys: int = KEYS_PER_COMPUTE_BLOCK) -> int:
    """The largest divisor of the table's width M whose pages hold at most `keys` positions
    (at least one page).

    The kernel needs a divisor of M. Within that, the block trades two costs. Each block is
    one step of the kernel's loop with a fixed overhead (a fraction of a microsecond), so
    small blocks make that overhead rival the copy: 512 bfloat16 keys and values of width 128
    are 256 KiB, about 0.3 µs of v5e's HBM bandwidth. But a row reads whole blocks, so the
    last one wastes up to a block's keys; and the engine buckets M to the longest row
    running, so the block never outgrows the table. 512 keys also leave VMEM to spare: double
    buffers of keys and values at Dh = 128 are 512 KiB in bfloat16 and 1.25 MiB in int8 with
    float32 scales, against v5e's 16 MiB of scoped VMEM. Reasoned from the hardware, not
    measured: no TPU was at hand to sweep it.
    """
    if table_width < 1 or page_size < 1:
        raise ValueError(f"a block table of {table_width} pages of {page_size} positions")
    most = max(1, keys // page_size)
    return max(d for d in range(1, min(most, table_width) + 1) if table_width % d == 0)


def unsupported_reason(head_dim: int) -> str | None:
    """Why the kernel cannot serve heads of this width, or None where it can."""
    if head_dim % LANES:
        return (f"the TPU paged-attention kernel needs a head width that is a multiple of "
                f"{LANES}, got {head_dim}")
    return None


def _pages_shape(pages: Pages) -> tuple[int, ...]:
    return (pages.weight if isinstance(pages, QuantizedTensor) else pages).shape


def paged_attention_local(q_BHDh: jax.Array, k_pages_KNPDh: Pages, v_pages_KNPDh: Pages,
                          lengths_B: jax.Array, block_table_BM: jax.Array, *,
                          pages_per_block: int = 0, megacore_mode: str | None = None,
                          interpret: bool = False) -> jax.Array:
    """The kernel on the arrays of one device, (B, H, Dh) in the queries' dtype.

    `pages_per_block` of 0 takes `pages_per_compute_block`. `megacore_mode` ("kv_head" or
    "batch") splits the work over the two TensorCores of a megacore chip (v4, v5p); leave it
    None on v5e and v6e, which have one, since the kernel may hang otherwise.
    Inside `jax.jit` on several devices use `paged_decode_attention`.
    """
    B, H, Dh = q_BHDh.shape
    K, _, P, Dh_pages = _pages_shape(k_pages_KNPDh)
    M = block_table_BM.shape[1]
    if _pages_shape(v_pages_KNPDh) != _pages_shape(k_pages_KNPDh):
        raise ValueError(f"key pages {_pages_shape(k_pages_KNPDh)} and value pages "
                         f"{_pages_shape(v_pages_KNPDh)} differ")
    if Dh_pages != Dh or H % K:
        raise ValueError(f"queries {q_BHDh.shape} do not fit pages {_pages_shape(k_pages_KNPDh)}:"
                         f" the head widths must agree and {K} key/value heads divide {H}")
    if lengths_B.shape != (B,) or block_table_BM.shape[0] != B:
        raise ValueError(f"{B} rows of queries, lengths {lengths_B.shape} and block table "
                         f"{block_table_BM.shape}")
    if (reason := unsupported_reason(Dh)) is not None:
        raise UserError(reason)
    block = pages_per_block or pages_per_compute_block(M, P)
    if M % block:
        raise UserError(f"{block} pages per compute block must divide the block table's "
                        f"{M} pages")
    q_BHDh = q_BHDh * jnp.asarray(Dh**-0.5, q_BHDh.dtype)
    lengths_B = jnp.minimum(lengths_B.astype(jnp.int32), M * P)
    mode = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
    with mode:
        return paged_attention(q_BHDh, k_pages_KNPDh, v_pages_KNPDh, lengths_B,
                               block_table_BM.astype(jnp.int32), pages_per_compute_block=block,
                               megacore_mode=megacore_mode)


def paged_decode_attention(q_BHDh: jax.Array, k_pages_KNPDh: Pages, v_pages_KNPDh: Pages,
                           lengths_B: jax.Array, block_table_BM: jax.Array, *,
                           mesh: Mesh | AbstractMesh | None = None,
                           batch_axes: str | Sequence[str] | None = None,
                           head_axes: str | Sequence[str] | None = None,
                           pages_per_block: int = 0, megacore_mode: str | None = None,
                           interpret: bool = False) -> jax.Array:
    """`paged_attention_local` run once per device under `jax.shard_map`, inside a GSPMD
    program: each row's attention to its first `lengths_B[b]` positions, (B, H, Dh).

    Rows (queries, lengths, block table) are split over `batch_axes`, and heads over
    `head_axes`: query heads on H, pages on K, so a shard holds query heads
    [i·H/n, (i+1)·H/n) and the key/value heads [i·K/n, (i+1)·K/n) they read. Pages are
    replicated over the batch axes, since any row may name any page, and P, Dh and the
    table's width stay whole. GSPMD reshards the inputs to this layout if they arrive
    otherwise, and the output leaves in it.

    Left as None, the mesh is the one set by `jax.set_mesh` and the axes are those the
    logical rules in scope (`nn.logical_axis_rules`) give `batch` and `heads`, as for
    `tpu_attention.sharded_splash_attention`; with no mesh set it runs the kernel as is.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    kwargs = dict(pages_per_block=pages_per_block, megacore_mode=megacore_mode,
                  interpret=interpret)
    if mesh.empty:
        return paged_attention_local(q_BHDh, k_pages_KNPDh, v_pages_KNPDh, lengths_B,
                                     block_table_BM, **kwargs)
    batch_axes, head_axes = batch_and_head_axes(
        mesh, q_BHDh.shape[0], q_BHDh.shape[1], _pages_shape(k_pages_KNPDh)[0], batch_axes,
        head_axes, "paged attention")
    rows, heads = batch_axes or None, head_axes or None
    q_spec = PartitionSpec(rows, heads, None)
    pages_spec = PartitionSpec(heads)  # a prefix: the weight and scales of int8 pages alike

    def local(q_BHDh, k_pages_KNPDh, v_pages_KNPDh, lengths_B, block_table_BM):
        return paged_attention_local(q_BHDh, k_pages_KNPDh, v_pages_KNPDh, lengths_B,
                                     block_table_BM, **kwargs)

    # check_vma=False: the kernel's output shapes carry no record of which mesh axes they vary
    # over, which jax's varying-axes check requires of every pallas_call under shard_map.
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(q_spec, pages_spec, pages_spec, PartitionSpec(rows),
                                   PartitionSpec(rows, None)),
                         out_specs=q_spec, check_vma=False)(
        q_BHDh, k_pages_KNPDh, v_pages_KNPDh, lengths_B, block_table_BM)
