"""Context parallelism: the sequence split over a `context` mesh axis in a load-balanced
order trains exactly as one device does, packed documents included, and splash attention
runs on the split queries (in the Pallas interpreter here; compiled for a TPU slice)."""

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_tpu_attention import (
    assert_same_attention,
    reference_attention,
    value_and_grads,
)

from scaling.config import experiments as config_lib
from scaling.config.schema import DEFAULT_SHARDING_RULES
from scaling.errors import UserError
from scaling.models import context, tpu_attention
from scaling.models.attention import segment_mask
from scaling.preflight import topology
from scaling.runtime.metrics import read_metrics
from scaling.sharding import mesh as mesh_lib
from scaling.training import loop
from scaling.training import run as run_lib

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for a TPU needs libtpu")


def test_the_balanced_order_pairs_an_early_and_a_late_chunk_on_each_device():
    order = context.balanced_order(16, 4)
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    assert context.inverse_order(16, 4)[order].tolist() == list(range(16))
    assert context.balanced_order(6, 1).tolist() == list(range(6))
    # Each device's queries see the same number of keys under the causal mask.
    work = [(order.reshape(4, 4)[d] + 1).sum() for d in range(4)]
    assert len(set(work)) == 1
    with pytest.raises(UserError, match="seq_len=12 must be a multiple of 8"):
        context.balanced_order(12, 4)


def short_documents(directory, count=120, seed=0):
    """Text files of 2-30 bytes: windows of 32 tokens pack several documents each."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    for i in range(count):
        text = "".join(rng.choice(list("abcdefgh ij\n"), int(rng.integers(2, 31))))
        (directory / f"doc{i:03d}.txt").write_text(text)


TINY = ["model.embed_dim=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.head_dim=8", "model.mlp_dim=64", "model.max_seq_len=32", "data.seq_len=32",
        "model.scan_unroll=1", "batch_size=8", "eval_batch_size=8", "num_steps=8",
        "steps_per_call=4", "log_every_steps=1", "eval_every_steps=8",
        "checkpoint_every_steps=8", "optimizer.warmup_steps=2", "data.validation_fraction=0.1"]


def train_losses(tmp_path, corpus, name, *overrides, devices=None):
    config, module = config_lib.load_config("python_code_lm", [
        f"data.sources=('text:{corpus}/*.txt',)", f"data.prepared_dir={tmp_path / 'data'}",
        "data.prepare_if_missing=True", *TINY, *overrides])
    workdir = tmp_path / name
    loop.train_and_evaluate(config, workdir, module, devices=devices)
    return [r["loss"] for r in read_metrics(workdir) if r["split"] == "train"]


def test_context_parallel_training_matches_one_device(tmp_path):
    """The experiment's own attention form (batched_matmul); the next test runs
    grouped_einsum with the tiled loss."""
    corpus = tmp_path / "docs"
    short_documents(corpus)
    one = train_losses(tmp_path, corpus, "one", "mesh.data=1", devices=jax.devices()[:1])
    assert len(one) == 8 and one[-1] < one[0]
    for name, mesh in {"context=4": ["mesh.data=2", "mesh.context=4"],
                       "fsdp=2,context=4": ["mesh.data=1", "mesh.fsdp=2", "mesh.context=4"]
                       }.items():
        losses = train_losses(tmp_path, corpus, name, *mesh)
        assert losses == pytest.approx(one, rel=1e-4), name


def test_the_tiled_loss_and_eval_under_context_parallelism_match_one_device(tmp_path):
    corpus = tmp_path / "docs"
    short_documents(corpus)
    tiled = ("model.loss_chunk=8", "model.attention=grouped_einsum")
    one = train_losses(tmp_path, corpus, "one", *tiled, "mesh.data=1", devices=jax.devices()[:1])
    split = train_losses(tmp_path, corpus, "split", *tiled, "mesh.data=2", "mesh.context=4")
    assert split == pytest.approx(one, rel=1e-4)
    # Params split over fsdp and context together, as lm_8b_32k has them.
    rules = [list(rule) for rule in DEFAULT_SHARDING_RULES]
    rules[[name for name, _ in rules].index("embed")][1] = ("fsdp", "context")
    both = train_losses(tmp_path, corpus, "both", *tiled, "mesh.data=1", "mesh.fsdp=2",
                        "mesh.context=4", f"sharding_rules={tuple(map(tuple, rules))}")
    assert both == pytest.approx(one, rel=1e-4)
    evals = {name: [r["loss"] for r in read_metrics(tmp_path / name) if r["split"] != "train"]
             for name in ("one", "split", "both")}
    assert evals["split"] == pytest.approx(evals["one"], rel=1e-4) and evals["one"]
    assert evals["both"] == pytest.approx(evals["one"], rel=1e-4)


def test_each_device_holds_its_share_of_the_sequence_and_gathers_only_keys_and_values(
        tmp_path):
    """data=2 x context=4: a layer's activations are 4 rows x 8 of the 32 positions on each
    device; what is gathered whole is the keys and values (and the dense logits, to put
    them back in order), never the hidden states."""
    short_documents(tmp_path / "docs")
    config, module = config_lib.load_config("python_code_lm", [
        f"data.sources=('text:{tmp_path}/docs/*.txt',)", *TINY, "mesh.data=2", "mesh.context=4",
        "model.attention=grouped_einsum"])
    run = run_lib.build_run_from_shapes(config, mesh_lib.make_mesh(config.mesh), module)
    text = run_lib.lower_train_step(run).compile().as_text()
    gathered = set(re.findall(r"= (f32\[[\d,]+\])\S* all-gather\(", text))
    assert gathered == {"f32[4,32,2,8]", "f32[4,32,264]"}  # (rows, L, K, Dh), (rows, L, V)
    assert "f32[4,8,32]" in text and "f32[4,32,32]" not in text


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "documents"])
def test_splash_on_split_queries_equals_einsum_attention_in_the_interpreter(packed):
    """data=2 x context=2 x tensor=2 on 8 CPU devices: queries reordered and split over
    context, keys and values whole, as the model calls the kernel. 512 positions make chunks
    of 128, the kernel's smallest block."""
    devices = np.asarray(jax.devices()[:8]).reshape(2, 1, 2, 2)
    mesh = Mesh(devices, mesh_lib.MESH_AXES)
    B, L, H, K, Dh = 2, 512, 4, 2, 32
    keys = jax.random.split(jax.random.key(1), 4)
    q, cotangent = (jax.random.normal(key, (B, L, H, Dh)) for key in keys[:2])
    k, v = (jax.random.normal(key, (B, L, K, Dh)) for key in keys[2:])
    ids = np.zeros((B, L), np.int32)
    ids[0, :200], ids[0, 200:470] = 1, 2  # documents across chunks and devices, then padding
    ids[1, :90], ids[1, 90:300], ids[1, 300:] = 1, 2, 3
    segment_ids = jnp.asarray(ids) if packed else None
    order = context.balanced_order(L, 2)
    mask = segment_mask(segment_ids) if packed else jnp.tril(jnp.ones((L, L), bool))[None]

    def attention(q_reordered, k, v):
        q_ids = None if segment_ids is None else segment_ids[:, order]
        return tpu_attention.sharded_splash_attention(
            q_reordered, k, v, q_ids, segment_ids, seq_shards=2, interpret=True)

    step = jax.jit(functools.partial(value_and_grads, attention))
    out, (dq, dk, dv) = mesh_lib.with_mesh_rules(step, mesh, DEFAULT_SHARDING_RULES)(
        q[:, order], k, v, cotangent[:, order])
    want_out, (want_dq, want_dk, want_dv) = value_and_grads(
        lambda *qkv: reference_attention(*qkv, mask)[:, order], q, k, v, cotangent[:, order])
    assert_same_attention((out, dq[:, context.inverse_order(L, 2)], dk, dv),
                          (want_out, want_dq, want_dk, want_dv))


@needs_libtpu
def test_context_parallel_splash_compiles_to_one_kernel_per_shard_on_a_v5e_slice():
    devices = topology.compile_only_devices(topology.parse_slice("v5e-8"))
    mesh = Mesh(np.asarray(devices).reshape(2, 1, 4, 1), mesh_lib.MESH_AXES)
    batch, seq, heads, kv_heads, head_dim = 2, 8192, 8, 4, 128
    q_sharding = NamedSharding(mesh, P(("data", "fsdp"), "context", "tensor", None))
    kv_sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.bfloat16, sharding=q_sharding)
    kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), jnp.bfloat16,
                              sharding=kv_sharding)

    def loss(q, k, v):
        return jnp.sum(tpu_attention.sharded_splash_attention(q, k, v, seq_shards=4)
                       .astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = mesh_lib.with_mesh_rules(step.lower, mesh, DEFAULT_SHARDING_RULES)(
        q, kv, kv).compile()
    text = compiled.as_text()
    calls = [line for line in text.splitlines() if "tpu_custom_call" in line
             and "custom_call_target" in line]
    assert len(calls) == 3, calls
    # Each device runs its 2048 queries against all 8192 keys.
    assert any("bf16[1,8,2048,128]" in line or "bf16[8,2048,128]" in line for line in calls)
