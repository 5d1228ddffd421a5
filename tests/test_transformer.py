"""Invariants of the transformer LM: shapes, causality, GQA, tying, scan, remat, KV cache."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from scaling.errors import UserError
from scaling.models import cpu_attention, paged
from scaling.models.attention import ATTENTION_FORMS
from scaling.models.transformer import (
    Attention,
    Transformer,
    TransformerConfig,
    apply_rope,
)
from scaling.models.transformer_formulas import flops_per_token
from scaling.training.state_summary import parameter_count

TINY = TransformerConfig(vocab_size=37, num_layers=2, embed_dim=16, num_heads=4,
                         num_kv_heads=2, head_dim=8, mlp_dim=24, max_seq_len=16)
B, L = 2, 10


def tokens(seed: int = 1, length: int = L) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, length), 0, TINY.vocab_size)


@functools.cache  # configs are frozen and hashable; each distinct one is built once
def init_boxed(config: TransformerConfig):
    return jax.jit(Transformer(config).init)(jax.random.key(0), tokens())["params"]


def init_params(config: TransformerConfig):
    return nn.meta.unbox(init_boxed(config))


def forward(config: TransformerConfig, params, tokens_BL):
    return jax.jit(Transformer(config).apply)({"params": params}, tokens_BL)


def loss(config: TransformerConfig, params, tokens_BL):
    logits = Transformer(config).apply({"params": params}, tokens_BL[:, :-1])
    labels = jax.nn.one_hot(tokens_BL[:, 1:], config.vocab_size)
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))


def test_logits_shape_and_dtype():
    logits = forward(TINY, init_params(TINY), tokens())
    assert logits.shape == (B, L, TINY.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    config = dataclasses.replace(TINY, dtype="bfloat16")
    params = init_params(config)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = forward(config, params, tokens())
    assert logits.dtype == jnp.float32
    reference = forward(TINY, params, tokens())
    np.testing.assert_allclose(logits, reference, atol=0.1)


def test_changing_a_token_leaves_earlier_logits_unchanged():
    params = init_params(TINY)
    t = 6
    original = tokens()
    changed = original.at[:, t].set((original[:, t] + 1) % TINY.vocab_size)
    before, after = forward(TINY, params, original), forward(TINY, params, changed)
    np.testing.assert_array_equal(before[:, :t], after[:, :t])
    assert not np.allclose(before[:, t:], after[:, t:])


def test_grouped_query_attention_has_smaller_key_value_kernels():
    params = init_params(TINY)["layers"]["attention"]
    n, D, Dh = TINY.num_layers, TINY.embed_dim, TINY.head_dim
    assert params["query"].shape == (n, D, TINY.num_heads, Dh)
    assert params["key"].shape == params["value"].shape == (n, D, TINY.num_kv_heads, Dh)
    multi_head = dataclasses.replace(TINY, num_kv_heads=TINY.num_heads)
    assert parameter_count(init_params(multi_head)) > parameter_count(init_params(TINY))


def test_num_kv_heads_must_divide_num_heads():
    with pytest.raises(UserError, match="num_kv_heads=3"):
        dataclasses.replace(TINY, num_kv_heads=3)


def test_tied_embeddings_have_no_output_kernel():
    tied = init_params(TINY)
    untied = init_params(dataclasses.replace(TINY, tie_embeddings=False))
    assert "output" not in tied
    assert untied["output"].shape == (TINY.embed_dim, TINY.vocab_size)
    assert set(untied) - set(tied) == {"output"}
    assert parameter_count(untied) - parameter_count(tied) == TINY.embed_dim * TINY.vocab_size


def test_scanned_layers_have_leading_layers_axis_and_name():
    boxed = init_boxed(TINY)
    specs = nn.get_partition_spec(boxed)
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed)):
        spec = specs
        for key in path:
            spec = spec[key.key]
        is_layer = path[0].key == "layers"
        if is_layer:
            assert leaf.shape[0] == TINY.num_layers, path
        assert (spec[0] == "layers") == is_layer, (path, spec)
        assert len(spec) == leaf.ndim, (path, spec)
        assert set(spec) <= {"layers", "embed", "heads", "kv", "mlp", "vocab"}


def test_scanned_and_unrolled_layers_compute_the_same_function():
    scanned = init_params(TINY)
    unrolled_config = dataclasses.replace(TINY, scan_layers=False)
    unrolled = {k: v for k, v in scanned.items() if k != "layers"}
    for i in range(TINY.num_layers):
        unrolled[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], scanned["layers"])
    assert jax.tree.structure(unrolled) == jax.tree.structure(init_params(unrolled_config))
    np.testing.assert_allclose(forward(unrolled_config, unrolled, tokens()),
                               forward(TINY, scanned, tokens()), rtol=1e-5, atol=1e-5)


def test_unrolled_scan_keeps_the_parameters_and_the_function():
    unrolled = dataclasses.replace(TINY, scan_unroll=TINY.num_layers)
    params = init_params(TINY)
    assert jax.tree.map(jnp.shape, init_params(unrolled)) == jax.tree.map(jnp.shape, params)
    assert nn.get_partition_spec(init_boxed(unrolled)) == nn.get_partition_spec(
        init_boxed(TINY))
    assert "while" not in jax.jit(Transformer(unrolled).apply).lower(
        {"params": params}, tokens()).as_text()
    np.testing.assert_allclose(forward(unrolled, params, tokens()),
                               forward(TINY, params, tokens()), rtol=1e-5, atol=1e-5)


def test_scan_unroll_must_be_positive():
    with pytest.raises(UserError, match="scan_unroll=0"):
        dataclasses.replace(TINY, scan_unroll=0)


def test_unknown_attention_form_is_a_user_error():
    with pytest.raises(UserError, match="attention='flash'.*grouped_einsum, batched_matmul"):
        dataclasses.replace(TINY, attention="flash")


def per_head_attention(config: TransformerConfig, params, x_BLD):
    """Causal attention one query head at a time, autodiff's backward: the reference."""
    positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
    q = apply_rope(jnp.einsum("bld,dhk->blhk", x_BLD, params["query"]), positions_BL,
                   config.rope_theta)
    k = apply_rope(jnp.einsum("bld,dhk->blhk", x_BLD, params["key"]), positions_BL,
                   config.rope_theta)
    v = jnp.einsum("bld,dhk->blhk", x_BLD, params["value"])
    causal = np.tril(np.ones((x_BLD.shape[1],) * 2, bool))
    heads = []
    for h in range(config.num_heads):
        kv = h // (config.num_heads // config.num_kv_heads)  # query head h reads this kv head
        logits = q[:, :, h] @ jnp.swapaxes(k[:, :, kv], 1, 2) / np.sqrt(config.head_dim)
        probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
        heads.append(probs @ v[:, :, kv])
    return jnp.einsum("blhk,hkd->bld", jnp.stack(heads, axis=2), params["out"])


@pytest.mark.parametrize("attention", ATTENTION_FORMS)
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_attention_and_its_gradients_match_a_per_head_reference(num_kv_heads, attention):
    config = dataclasses.replace(TINY, num_kv_heads=num_kv_heads, attention=attention)
    x_BLD = jax.random.normal(jax.random.key(3), (B, L, config.embed_dim))
    cotangent_BLD = jax.random.normal(jax.random.key(5), x_BLD.shape)
    module = Attention(config)
    params = nn.meta.unbox(module.init(jax.random.key(4), x_BLD, None)["params"])

    def weighted(apply):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(apply(p, x) * cotangent_BLD),
                                          argnums=(0, 1)))(params, x_BLD)

    got = weighted(lambda p, x: module.apply({"params": p}, x, None))
    want = weighted(lambda p, x: per_head_attention(config, p, x))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
                 got, want)


@pytest.mark.parametrize("policy,scan_layers,scan_unroll",
                         [("full", True, 1), ("dots", True, 1),
                          ("dots_with_no_batch_dims", True, 1), ("full", False, 1),
                          ("full", True, 2)])
def test_remat_changes_neither_loss_nor_gradients(policy, scan_layers, scan_unroll):
    base = dataclasses.replace(TINY, scan_layers=scan_layers, scan_unroll=scan_unroll)
    params = init_params(base)
    value_and_grad = lambda c: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: loss(c, p, tokens())))(params)
    want_loss, want_grads = value_and_grad(base)
    remat = dataclasses.replace(base, remat_policy=policy)
    got_loss, got_grads = value_and_grad(remat)
    assert "remat" in str(jax.make_jaxpr(lambda p: loss(remat, p, tokens()))(params))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7),
                 got_grads, want_grads)


@pytest.mark.parametrize("num_kv_heads,prefill,scan_layers,scan_unroll,attention",
                         [(2, 1, True, 1, "grouped_einsum"), (4, 4, True, 1, "grouped_einsum"),
                          (1, 3, True, 1, "grouped_einsum"), (2, 2, False, 1, "grouped_einsum"),
                          (2, 3, True, 2, "batched_matmul"), (1, 1, True, 1, "batched_matmul")])
def test_kv_cache_decoding_matches_full_forward(num_kv_heads, prefill, scan_layers,
                                                scan_unroll, attention):
    config = dataclasses.replace(TINY, num_kv_heads=num_kv_heads, scan_layers=scan_layers,
                                 scan_unroll=scan_unroll, attention=attention)
    """The paged cache (`scaling.models.paged`), as `--mode=sample` and the engine use it:
    a prompt of several tokens, then one token a step, give the logits of one whole pass,
    and the pool holds keys at the positions written and nowhere else."""
    model = Transformer(config)
    params = init_params(config)
    sequence = tokens(seed=2)
    want = forward(config, params, sequence)
    P = 4  # positions per block: rows span several blocks, the last one part full
    per_row = config.max_seq_len // P
    num_blocks = B * per_row
    table_BM = jnp.arange(num_blocks, dtype=jnp.int32)[::-1].reshape(B, per_row)

    @jax.jit
    def step(cache, tokens_BL, start):
        n = tokens_BL.shape[1]
        positions_BL = jnp.broadcast_to(start + jnp.arange(n, dtype=jnp.int32), (B, n))
        slots_BL, table_BW = paged.locate(table_BM, positions_BL, per_row, P)
        batch = paged.PagedBatch(positions_BL=positions_BL, slots_BL=slots_BL,
                                 block_table_BM=table_BW,
                                 logit_index_B=jnp.broadcast_to(jnp.arange(n), (B, n)),
                                 num_blocks=num_blocks, block_size=P)
        logits, variables = model.apply({"params": params, "cache": cache}, tokens_BL,
                                        paged_batch=batch, mutable=["cache"])
        return variables["cache"], logits

    cache = paged.pool_variables(config, num_blocks, P)
    assert cache["paged_key"].shape == (num_kv_heads, config.num_layers * num_blocks, P,
                                        config.head_dim)
    cache, first = step(cache, sequence[:, :prefill], 0)  # several tokens at once
    pieces = [first]
    for t in range(prefill, L):
        cache, logits = step(cache, sequence[:, t:t + 1], t)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), want, rtol=1e-5, atol=1e-5)
    written = np.zeros((config.num_layers * num_blocks, P), bool)
    for row in range(B):
        slots, _ = paged.locate(np.asarray(table_BM[row]), np.arange(L), per_row, P)
        for layer in range(config.num_layers):
            written[layer * num_blocks + slots // P, slots % P] = True
    for name in ("paged_key", "paged_value"):
        stored = np.abs(np.asarray(cache[name])).sum(axis=(0, 3)) > 0
        np.testing.assert_array_equal(stored, written)


def test_flops_per_token_by_hand():
    # Per layer: q and out 16·4·8 each, k and v 16·2·8 each, MLP 3·16·24.
    per_layer = 2 * 512 + 2 * 256 + 1152
    matmul_params = 2 * per_layer + 16 * 37  # plus the output projection
    want = 6 * matmul_params + 12 * 2 * 4 * 8 * 10
    assert flops_per_token(TINY, seq_len=10) == want == 43488


def test_count_params_accepts_abstract_and_boxed_trees():
    abstract = jax.eval_shape(lambda: Transformer(TINY).init(jax.random.key(0), tokens()))
    n = parameter_count(abstract)
    assert n == parameter_count(init_params(TINY))
    norms = (2 * TINY.num_layers + 1) * TINY.embed_dim
    embedding = TINY.vocab_size * TINY.embed_dim
    matmuls = (flops_per_token(TINY, 0) / 6) - embedding  # output projection is tied
    assert n == matmuls + embedding + norms


def test_logical_constraints_shard_on_a_mesh():
    devices = np.asarray(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.sharding.Mesh(devices.reshape(4, 2), ("data", "tensor"))
    rules = (("batch", "data"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
    config = dataclasses.replace(TINY, vocab_size=40)  # divisible by the tensor axis
    params = init_params(config)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(init_boxed(config)), mesh,
                                            rules)
    sharded = jax.device_put(params, shardings)
    tokens_BL = jnp.tile(tokens(), (2, 1))
    apply = jax.jit(Transformer(config).apply)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = apply.lower({"params": sharded}, tokens_BL).as_text()
        logits = apply({"params": sharded}, tokens_BL)
    assert "sharding_constraint" in lowered  # the model's logical constraints took effect
    assert sharded["layers"]["mlp"]["gate"].sharding.spec == P(None, None, "tensor")
    assert logits.sharding.spec[0] == "data"
    np.testing.assert_allclose(logits, forward(config, params, tokens_BL), rtol=1e-5,
                               atol=1e-5)


def test_the_cpu_attention_trick_lives_in_its_own_module():
    """The hand-written backward is a CPU-only speed trick: the general path only names it."""
    assert ATTENTION_FORMS["batched_matmul"] is cpu_attention.batched_matmul_attention
    assert not hasattr(Transformer, "attend")
    import scaling.models.transformer as transformer

    assert not hasattr(transformer, "attend") and not hasattr(transformer, "_attend_backward")


def test_query_chunks_give_the_same_logits_and_gradients_with_documents():
    """`query_chunk` makes grouped_einsum's scores a block of queries at a time (strided
    blocks, each recomputed in the backward pass): the same function, in float32."""
    ids = jnp.asarray([[1] * 9 + [2] * 13 + [0] * 10, [1] * 20 + [2] * 12])
    positions = jnp.concatenate([jnp.arange(9), jnp.arange(13), jnp.zeros(10, int)])
    positions = jnp.stack([positions, jnp.concatenate([jnp.arange(20), jnp.arange(12)])])
    config = dataclasses.replace(TINY, max_seq_len=32)
    batch = tokens(1, 32)
    params = init_params(config)

    def loss(params, config):
        logits = Transformer(config).apply({"params": params}, batch, segment_ids_BL=ids,
                                           positions_BL=positions)
        return jnp.sum(logits * jnp.cos(jnp.arange(logits.size).reshape(logits.shape)))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    whole = value_and_grad(params, config)
    chunked = value_and_grad(params, dataclasses.replace(config, query_chunk=8))
    for got, want in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole), strict=True):
        # Entries up to about 10: float32 sums in another order differ by about 1e-5.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(UserError, match="query_chunk=5: must divide the sequence length 32"):
        jax.eval_shape(functools.partial(loss, config=dataclasses.replace(config,
                                                                          query_chunk=5)),
                       params)
