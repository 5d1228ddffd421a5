"""Paged decode attention: numbers against einsum attention over gathered pages through the
TPU interpreter on CPU, and the kernel XLA:TPU compiles for a v5e 2x2 slice, which needs
libtpu but no TPU."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.paged_attention.quantization_utils import QuantizedTensor
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scaling.config.schema import DEFAULT_SHARDING_RULES
from scaling.errors import UserError
from scaling.models import tpu_paged_attention as tpa
from scaling.preflight import topology
from scaling.sharding import mesh as mesh_lib

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for a TPU needs libtpu: "
                                         "pip install -e '.[tpu]'")

Dh, N, PAGE, M = 128, 80, 16, 8  # 8 pages of 16: a table names up to 128 positions
# One position, a page exactly, one past it, one short of the table, the table, and past it
# (clipped to the table); 0 is an empty slot.
LENGTHS = (1, 16, 17, 127, 128, 200, 0, 45)
ROWS = len(LENGTHS)


def bf16_exact(x):
    """Float32 values that bfloat16 holds exactly, so the kernel's rounding of pages to
    bfloat16 changes nothing and float32 results differ only in the order of sums."""
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def inputs(rows=ROWS, heads=8, kv_heads=2, pages=N, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (rows, heads, Dh))
    k_pages = bf16_exact(jax.random.normal(keys[1], (kv_heads, pages, PAGE, Dh)))
    v_pages = bf16_exact(jax.random.normal(keys[2], (kv_heads, pages, PAGE, Dh)))
    # Each row's pages scattered over the pool in no order; pages no row names stay unread.
    order = np.random.default_rng(seed).permutation(pages)[:rows * M]
    table = jnp.asarray(order.reshape(rows, M), jnp.int32)
    lengths = jnp.asarray((LENGTHS * rows)[:rows], jnp.int32)
    return q, k_pages, v_pages, lengths, table


def reference(q_BHDh, k_pages_KNPDh, v_pages_KNPDh, lengths_B, table_BM):
    """Softmax attention in float32 over each row's pages gathered in order, its query
    seeing positions below its length (at most the table's), grouped by key/value head."""
    B, H, _ = q_BHDh.shape
    K = k_pages_KNPDh.shape[0]
    k_KBSDh, v_KBSDh = (x[:, table_BM].reshape(K, B, -1, Dh).astype(jnp.float32)
                        for x in (k_pages_KNPDh, v_pages_KNPDh))
    q_BKGDh = q_BHDh.astype(jnp.float32).reshape(B, K, H // K, Dh)
    logits_BKGS = jnp.einsum("bkgd,kbsd->bkgs", q_BKGDh, k_KBSDh) * Dh**-0.5
    visible_BS = jnp.arange(k_KBSDh.shape[2]) < lengths_B[:, None]
    logits_BKGS = jnp.where(visible_BS[:, None, None], logits_BKGS, -jnp.inf)
    out_BKGDh = jnp.einsum("bkgs,kbsd->bkgd", jax.nn.softmax(logits_BKGS, axis=-1), v_KBSDh)
    # A row that sees nothing (an empty slot) comes back as zeros from the kernel.
    return jnp.where((lengths_B > 0)[:, None, None], out_BKGDh.reshape(B, H, Dh), 0.0)


def run_kernel(*args, **kwargs):
    return jax.jit(lambda *a: tpa.paged_decode_attention(*a, interpret=True, **kwargs))(*args)


@pytest.mark.parametrize("table_width, page_size, block", [
    (64, 16, 32), (8, 16, 8), (125, 16, 25), (7, 16, 7), (12, 64, 6), (16, 1024, 1),
    (1, 16, 1)])
def test_a_compute_block_is_the_largest_divisor_of_the_table_within_512_keys(
        table_width, page_size, block):
    assert tpa.pages_per_compute_block(table_width, page_size) == block


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4), (8, 1)],
                         ids=["groups_of_4", "multi_head", "one_kv_head"])
@pytest.mark.parametrize("pages_per_block", [0, 2], ids=["one_block", "blocks_of_2"])
def test_the_kernel_equals_einsum_attention_over_gathered_pages(heads, kv_heads,
                                                                pages_per_block):
    args = inputs(heads=heads, kv_heads=kv_heads)
    actual = run_kernel(*args, pages_per_block=pages_per_block)
    # Float32 throughout (bfloat16-exact pages): only the order of sums differs.
    np.testing.assert_allclose(actual, reference(*args), rtol=1e-5, atol=1e-5)
    assert not np.asarray(actual[LENGTHS.index(0)]).any()


def test_bfloat16_queries_and_pages_agree_to_bfloat16_rounding():
    q, k_pages, v_pages, lengths, table = inputs()
    args = (q.astype(jnp.bfloat16), k_pages.astype(jnp.bfloat16),
            v_pages.astype(jnp.bfloat16), lengths, table)
    actual = run_kernel(*args)
    assert actual.dtype == jnp.bfloat16
    np.testing.assert_allclose(actual.astype(jnp.float32), reference(*args),
                               rtol=2e-2, atol=2e-2)


def test_a_float32_pool_is_read_at_bfloat16():
    q, k_pages, v_pages, lengths, table = inputs()
    noise = jax.random.normal(jax.random.key(1), k_pages.shape) * 1e-3  # off bfloat16's grid
    k_pages, v_pages = k_pages + noise, v_pages - noise
    actual = run_kernel(q, k_pages, v_pages, lengths, table)
    np.testing.assert_allclose(
        actual, reference(q, bf16_exact(k_pages), bf16_exact(v_pages), lengths, table),
        rtol=1e-5, atol=1e-5)


def test_int8_pages_are_dequantised_as_weight_times_scale_over_127_5():
    q, k_pages, v_pages, lengths, table = inputs()

    def quantised(pages_KNPDh):
        scales_KNP1 = jnp.max(jnp.abs(pages_KNPDh), axis=-1, keepdims=True)
        weight = jnp.clip(jnp.rint(pages_KNPDh * 127 / scales_KNP1), -127, 127)
        return QuantizedTensor(weight.astype(jnp.int8), scales_KNP1 * 127.5 / 127)

    k_int8, v_int8 = quantised(k_pages), quantised(v_pages)
    actual = run_kernel(q, k_int8, v_int8, lengths, table)

    def dequantised(pages):
        return pages.weight.astype(jnp.float32) * pages.scales / 127.5

    np.testing.assert_allclose(
        actual, reference(q, dequantised(k_int8), dequantised(v_int8), lengths, table),
        rtol=1e-5, atol=1e-5)


def test_sharded_under_the_rules_over_a_pool_of_two_layers_equals_einsum_attention():
    """Rows over (data, fsdp) and heads over tensor on 4 CPU devices, the axes read from the
    default logical rules; the pool holds two layers and the table names the second's pages.

    Four, not eight: the interpreter holds every device at a barrier before the kernel runs,
    which deadlocks where the CPU runtime cannot run all the devices' programs at once (eight
    on two cores)."""
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 1, 1, 2), mesh_lib.MESH_AXES)
    q, k_pages, v_pages, lengths, table = inputs(heads=8, kv_heads=2, pages=2 * N)
    table = N + table % N  # layer 1's pages: N .. 2N - 1

    def attention(*args):
        return tpa.paged_decode_attention(*args, pages_per_block=2, interpret=True)

    step = mesh_lib.with_mesh_rules(jax.jit(attention), mesh, DEFAULT_SHARDING_RULES)
    actual = step(q, k_pages, v_pages, lengths, table)
    np.testing.assert_allclose(actual, reference(q, k_pages, v_pages, lengths, table),
                               rtol=1e-5, atol=1e-5)
    assert actual.sharding.shard_shape(actual.shape) == (ROWS // 2, 4, Dh)


def test_shapes_the_kernel_cannot_take_are_refused():
    def shapes(rows=4, heads=8, kv_heads=2, head_dim=Dh, width=M):
        return (jax.ShapeDtypeStruct((rows, heads, head_dim), jnp.bfloat16),
                *[jax.ShapeDtypeStruct((kv_heads, N, PAGE, head_dim), jnp.bfloat16)] * 2,
                jax.ShapeDtypeStruct((rows,), jnp.int32),
                jax.ShapeDtypeStruct((rows, width), jnp.int32))

    with pytest.raises(UserError, match="multiple of 128, got 64"):
        jax.eval_shape(tpa.paged_decode_attention, *shapes(head_dim=64))
    with pytest.raises(UserError, match="3 pages per compute block must divide the block "
                                        "table's 8 pages"):
        jax.eval_shape(lambda *a: tpa.paged_decode_attention(*a, pages_per_block=3), *shapes())
    mesh = AbstractMesh((2, 1, 1, 4), mesh_lib.MESH_AXES)
    with pytest.raises(UserError, match="8 query and 2 key/value heads must both split over "
                                        r"the mesh axes \('tensor',\) of 4 devices"):
        tpa.paged_decode_attention(*shapes(), mesh=mesh, batch_axes="data", head_axes="tensor")
    with pytest.raises(UserError, match="paged attention: batch 3 does not split"):
        tpa.paged_decode_attention(*shapes(rows=3, kv_heads=4), mesh=mesh, batch_axes="data",
                                   head_axes="tensor")


def kernel_calls(compiled_text: str) -> list[str]:
    """The HLO line of each Mosaic custom call of a compiled TPU program."""
    calls = [line for line in compiled_text.splitlines()
             if 'custom_call_target="tpu_custom_call"' in line]
    assert len(calls) == compiled_text.count("tpu_custom_call")
    return calls


def compile_for_v5e(data, tensor, pages_dtype, num_pages=1024):
    """The sharded call compiled for a v5e 2x2 slice: 8 rows of 16 query heads reading 8
    key/value heads' pages of 16 positions through tables of 32 pages, bfloat16 queries."""
    devices = topology.compile_only_devices(topology.parse_slice("v5e-4"))
    mesh = Mesh(np.asarray(devices).reshape(data, 1, 1, tensor), mesh_lib.MESH_AXES)
    rows, heads, kv_heads, width = 8, 16, 8, 32

    def spec(shape, dtype, *partition):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*partition)))

    pages_shape = (kv_heads, num_pages, PAGE, Dh)
    if pages_dtype == jnp.int8:
        pages = QuantizedTensor(spec(pages_shape, jnp.int8, "tensor"),
                                spec((*pages_shape[:3], 1), jnp.float32, "tensor"))
    else:
        pages = spec(pages_shape, pages_dtype, "tensor")
    args = (spec((rows, heads, Dh), jnp.bfloat16, "data", "tensor"), pages, pages,
            spec((rows,), jnp.int32, "data"), spec((rows, width), jnp.int32, "data"))

    def attention(*args):
        return tpa.paged_decode_attention(*args, mesh=mesh, batch_axes="data",
                                          head_axes="tensor")

    return jax.jit(attention).lower(*args).compile()


@needs_libtpu
@pytest.mark.parametrize("data, tensor", [(1, 4), (2, 2)], ids=["tensor4", "data2_tensor2"])
@pytest.mark.parametrize("pages_dtype", [jnp.bfloat16, jnp.int8], ids=["bfloat16", "int8"])
def test_compiles_to_one_paged_attention_kernel_per_shard_on_a_v5e_2x2_slice(
        data, tensor, pages_dtype):
    text = compile_for_v5e(data, tensor, pages_dtype).as_text()
    [call] = kernel_calls(text)
    # Each chip runs its rows and its query heads against its key/value heads' pages, which
    # arrive in that layout: no collective moves any of them. Groups of 2 query heads (not a
    # multiple of 8) make the kernel take its queries as float32 (rows, heads, 1, Dh).
    assert re.match(r"\s*%?([a-z_]+)", call).group(1) == "paged_attention"
    assert f"f32[{8 // data},{16 // tensor},1,{Dh}]" in call
    pages = "s8" if pages_dtype == jnp.int8 else "bf16"
    assert f"{pages}[{8 // tensor},1024,{PAGE},{Dh}]" in call
    assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", text)


@needs_libtpu
def test_int8_pages_cost_a_temporary_of_float32_scales_the_pool_s_full_shape():
    """The kernel broadcasts the scales to the pages' shape before it starts, so a call over
    int8 pages holds four bytes per cached value besides the one of the pages themselves."""
    num_pages = 8192
    per_chip = 2 * (8 // 4) * num_pages * PAGE * Dh  # keys and values, 2 heads of 8 a chip
    memory = compile_for_v5e(1, 4, jnp.int8, num_pages).memory_analysis()
    assert memory.temp_size_in_bytes >= 4 * per_chip
    bf16 = compile_for_v5e(1, 4, jnp.bfloat16, num_pages).memory_analysis()
    assert bf16.temp_size_in_bytes < per_chip / 100
