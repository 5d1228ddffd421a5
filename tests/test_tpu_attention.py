"""Splash attention: numbers against einsum attention through the Pallas interpreter on CPU,
and the kernels XLA:TPU compiles for a v5e 2x2 slice, which needs libtpu but no TPU."""

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scaling.config.schema import DEFAULT_SHARDING_RULES
from scaling.errors import UserError
from scaling.models import tpu_attention
from scaling.models.attention import segment_mask
from scaling.models.transformer import TransformerConfig
from scaling.preflight import topology
from scaling.sharding import mesh as mesh_lib

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for a TPU needs libtpu: "
                                         "pip install -e '.[tpu]'")

B, L, H, K, Dh = 2, 256, 4, 2, 64


def reference_attention(q_BLHDh, k_BSKDh, v_BSKDh, mask_BLS):
    """Plain softmax attention in float32 with each key/value head repeated for its group."""
    G = q_BLHDh.shape[2] // k_BSKDh.shape[2]
    k_BSHDh, v_BSHDh = (jnp.repeat(x, G, axis=2) for x in (k_BSKDh, v_BSKDh))
    logits_BHLS = jnp.einsum("blhd,bshd->bhls", q_BLHDh, k_BSHDh) * q_BLHDh.shape[-1] ** -0.5
    logits_BHLS = jnp.where(mask_BLS[:, None], logits_BHLS, -jnp.inf)
    return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(logits_BHLS, axis=-1), v_BSHDh)


def packed_segment_ids() -> jax.Array:
    """Two rows of documents that cross the 128-slot block boundary, ending in padding."""
    ids = np.zeros((B, L), np.int32)
    ids[0, :100], ids[0, 100:230] = 1, 2
    ids[1, :50], ids[1, 50:240] = 1, 2
    return jnp.asarray(ids)


def inputs(batch: int = B, heads: int = H, kv_heads: int = K):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, L, heads, Dh))
    k = jax.random.normal(keys[1], (batch, L, kv_heads, Dh))
    v = jax.random.normal(keys[2], (batch, L, kv_heads, Dh))
    cotangent = jax.random.normal(keys[3], (batch, L, heads, Dh))
    return q, k, v, cotangent


def value_and_grads(attention, q, k, v, cotangent):
    """The output, and the gradients of a random projection of it for q, k and v."""
    out = attention(q, k, v)
    grads = jax.grad(lambda *qkv: jnp.sum(attention(*qkv) * cotangent), argnums=(0, 1, 2))
    return out, grads(q, k, v)


def assert_same_attention(actual, expected):
    # The interpreter runs the kernel's float32 arithmetic on CPU; what differs from the
    # reference is only the order of float32 sums (blockwise online softmax), about 1e-6 of
    # values of order 1-5 here.
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len, block", [(4096, 512), (1536, 512), (768, 256),
                                            (384, 128), (128, 128)])
def test_default_blocks_are_the_largest_of_512_256_128_that_divide_the_length(seq_len, block):
    sizes = tpu_attention.default_block_sizes(seq_len)
    assert {sizes.block_q, sizes.block_kv, sizes.block_kv_compute, sizes.block_q_dkv,
            sizes.block_kv_dkv, sizes.block_kv_dkv_compute, sizes.block_q_dq,
            sizes.block_kv_dq} == {block}
    assert not sizes.use_fused_bwd_kernel


def test_a_length_off_the_lane_width_is_refused():
    q = jax.ShapeDtypeStruct((1, 200, H, Dh), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 200, K, Dh), jnp.float32)
    with pytest.raises(UserError, match="multiple of 128, got 200"):
        jax.eval_shape(tpu_attention.splash_attention, q, kv, kv)


def test_heads_that_do_not_split_over_the_tensor_axis_are_refused():
    mesh = AbstractMesh((1, 1, 1, 4), mesh_lib.MESH_AXES)
    q = jax.ShapeDtypeStruct((B, L, H, Dh), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, L, K, Dh), jnp.float32)
    with pytest.raises(UserError, match="4 query and 2 key/value heads must both split"):
        tpu_attention.sharded_splash_attention(q, kv, kv, mesh=mesh, batch_axes=(),
                                               head_axes="tensor")


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "documents"])
def test_splash_equals_einsum_attention_in_the_interpreter(packed):
    q, k, v, cotangent = inputs()
    segment_ids = packed_segment_ids() if packed else None
    if packed:
        mask_BLS = segment_mask(segment_ids)  # padding sees only itself, as in the model
    else:
        mask_BLS = jnp.tril(jnp.ones((L, L), bool))[None]
    # 128-slot blocks: of the 2x2 blocks one is skipped, one is full and two are cut by the
    # diagonal, so every path through the kernel runs.
    blocks = tpu_attention.default_block_sizes(128)
    splash_jit = jax.jit(lambda q, k, v: tpu_attention.splash_attention(
        q, k, v, segment_ids, block_sizes=blocks, interpret=True))
    actual = value_and_grads(splash_jit, q, k, v, cotangent)
    expected = value_and_grads(lambda *qkv: reference_attention(*qkv, mask_BLS),
                               q, k, v, cotangent)
    assert_same_attention(actual, expected)
    if packed:  # a padding slot returns its own value; a document start, its first value
        np.testing.assert_allclose(actual[0][0, 240], jnp.repeat(v[0, 240], H // K, axis=0),
                                   rtol=1e-6)
        np.testing.assert_allclose(actual[0][1, 50], jnp.repeat(v[1, 50], H // K, axis=0),
                                   rtol=1e-6)


def test_sharded_splash_under_the_training_rules_equals_einsum_attention():
    """Batch over (data, fsdp) and heads over tensor on 8 CPU devices, with the axes read from
    the default logical rules as the model would see them in a training step."""
    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 1, 2)
    mesh = Mesh(devices, mesh_lib.MESH_AXES)
    q, k, v, cotangent = inputs(batch=4)
    segment_ids = jnp.concatenate([packed_segment_ids()] * 2)

    def attention(q, k, v):
        return tpu_attention.sharded_splash_attention(q, k, v, segment_ids, interpret=True)

    # As the training step runs: jitted, called with the mesh and the rules in scope.
    step = jax.jit(functools.partial(value_and_grads, attention))
    actual = mesh_lib.with_mesh_rules(step, mesh, DEFAULT_SHARDING_RULES)(q, k, v, cotangent)
    expected = value_and_grads(
        lambda *qkv: reference_attention(*qkv, segment_mask(segment_ids)), q, k, v, cotangent)
    assert_same_attention(actual, expected)
    out = actual[0]
    assert out.sharding.shard_shape(out.shape) == (1, L, H // 2, Dh)


def kernels(compiled_text: str) -> dict[str, str]:
    """Each Mosaic custom call of a compiled TPU program, by kernel name: its HLO line."""
    calls = [line for line in compiled_text.splitlines()
             if 'custom_call_target="tpu_custom_call"' in line]
    named = {re.match(r"\s*%?([a-z_]+)", line).group(1): line for line in calls}
    assert len(named) == len(calls) == compiled_text.count("tpu_custom_call")
    return named


@needs_libtpu
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "documents"])
def test_compiles_to_splash_kernels_per_shard_on_a_v5e_2x2_slice(packed):
    devices = topology.compile_only_devices(topology.parse_slice("v5e-4"))
    mesh = Mesh(np.asarray(devices).reshape(2, 1, 1, 2), mesh_lib.MESH_AXES)
    batch, seq, heads, kv_heads, head_dim = 4, 1024, 8, 4, 128  # two 512-slot blocks a row
    qkv_sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))

    def spec(*shape, dtype=jnp.bfloat16, sharding=qkv_sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    args = (spec(batch, seq, heads, head_dim), spec(batch, seq, kv_heads, head_dim),
            spec(batch, seq, kv_heads, head_dim),
            spec(batch, seq, dtype=jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp")))))

    def attention(q, k, v, segment_ids):
        return tpu_attention.sharded_splash_attention(
            q, k, v, segment_ids if packed else None, mesh=mesh, batch_axes=("data", "fsdp"),
            head_axes="tensor")

    def loss(q, k, v, segment_ids):
        return jnp.sum(attention(q, k, v, segment_ids).astype(jnp.float32))

    forward = jax.jit(attention).lower(*args).compile().as_text()
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()

    seg = "_segmented" if packed else ""
    assert set(kernels(forward)) == {f"splash_mha_fwd{seg}_no_residuals"}
    backward_kernels = kernels(backward)
    assert set(backward_kernels) == {f"splash_mha_fwd{seg}_residuals",
                                     f"splash_mha_dq{seg}_no_residuals",
                                     f"splash_mha_dkv{seg}_no_residuals"}
    # Each chip runs its 2 examples and its 4 query (2 key/value) heads of the 4 and 8 (4),
    # and the inputs arrive in that layout: no collective moves any of them.
    assert "bf16[2,4,1024,128]" in kernels(forward)[f"splash_mha_fwd{seg}_no_residuals"]
    assert "bf16[2,2,1024,128]" in backward_kernels[f"splash_mha_dkv{seg}_no_residuals"]
    for text in (forward, backward):
        assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", text)


def training_step_text(*overrides, topology_name="v5e-8"):
    from scaling.config import experiments as config_lib
    from scaling.preflight import step_report
    from scaling.training import run as run_lib

    config, module = config_lib.load_config("shakespeare_char_lm", [
        "batch_size=16", "steps_per_call=1", "model.num_layers=2", "model.embed_dim=64",
        "model.mlp_dim=128", "model.num_heads=8", "model.num_kv_heads=4", "model.head_dim=64",
        "model.scan_unroll=1", "mesh.data=4", "mesh.fsdp=1", "mesh.tensor=2",
        "model.dtype=bfloat16", *overrides])
    target = step_report.make_target(topology_name, config)
    mesh = mesh_lib.make_mesh(config.mesh, target.devices)
    run = run_lib.build_run_from_shapes(config, mesh, module)
    return run.model.config.attention, run_lib.lower_train_step(run).compile().as_text()


@needs_libtpu
@pytest.mark.parametrize("packing", ["concat", "documents"])
def test_auto_attention_trains_through_splash_on_a_tpu_slice(packing):
    """The real training step for a v5e-8: the kernel's forward, dq and dk/dv once each in
    the scanned layer's loops (forward and backward), segmented with packed documents."""
    attention, text = training_step_text("model.attention=auto", "data.seq_len=256",
                                         "model.max_seq_len=256", f"data.packing={packing}")
    found = kernels(text)
    assert attention == "splash" and len(found) == 3, found
    assert all(("segmented" in name) == (packing == "documents") for name in found.values())


def test_auto_attention_keeps_a_written_form_off_tpu_or_off_the_lane_width():
    from scaling.models.attention_choice import choose_attention

    assert choose_attention("auto", "cpu", 256) == "grouped_einsum"
    assert choose_attention("auto", "gpu", 256) == "grouped_einsum"  # float32: no cuDNN
    assert choose_attention("auto", "tpu", 96) == "grouped_einsum"
    assert choose_attention("auto", None, 256) == "grouped_einsum"
    assert choose_attention("batched_matmul", "tpu", 256) == "batched_matmul"
    with pytest.raises(UserError, match="attention=splash runs on TPU only; these devices "
                                        "are cpu"):
        choose_attention("splash", "cpu", 256)
    with pytest.raises(UserError, match="seq_len to be a multiple of 128, not 96"):
        choose_attention("splash", "tpu", 96)


@pytest.mark.parametrize("kernel, platform", [("splash", "TPU"), ("cudnn", "GPU")])
def test_an_explicit_kernel_on_this_cpu_exits_2_naming_the_option(tmp_path, kernel, platform):
    from conftest import run_cli

    result = run_cli("--experiment=shakespeare_char_lm", f"--workdir={tmp_path}",
                     f"--config.data.manual_dir={tmp_path / 'no_corpus_needed'}",
                     f"--config.model.attention={kernel}", "--config.model.dtype=bfloat16",
                     "--config.num_steps=2", "--config.optimizer.warmup_steps=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (f"error: --config.model.attention={kernel} runs on {platform} only"
            in result.stderr)


def test_the_splash_block_is_configurable_and_checked():
    q, k, v, cotangent = inputs()
    mask_BLS = jnp.tril(jnp.ones((L, L), bool))[None]
    expected = value_and_grads(lambda *qkv: reference_attention(*qkv, mask_BLS),
                               q, k, v, cotangent)
    actual = value_and_grads(jax.jit(lambda q, k, v: tpu_attention.sharded_splash_attention(
        q, k, v, block=128, interpret=True)), q, k, v, cotangent)  # 2x2 blocks, not one
    assert_same_attention(actual, expected)
    assert tpu_attention.block_sizes_for(1024, 256).block_q_dkv == 256
    with pytest.raises(UserError, match="splash_block=384: must be a multiple of 128 that "
                                        "divides 256"):
        tpu_attention.block_sizes_for(256, 384)
    with pytest.raises(UserError, match="splash_block=100: positions per block"):
        TransformerConfig(vocab_size=8, num_layers=1, embed_dim=8, num_heads=1, num_kv_heads=1,
                          head_dim=8, mlp_dim=8, max_seq_len=256, splash_block=100)
