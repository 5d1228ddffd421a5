"""Packed windows: documents sharing a row never see each other, padding is inert, and the
language-modelling task weighs only targets that continue their input's document."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling.models import cpu_attention, paged
from scaling.models.attention import grouped_einsum_attention, segment_mask
from scaling.models.transformer import Transformer, TransformerConfig
from scaling.training import steps
from scaling.training.tasks import LANGUAGE_MODELING, document_weights

TINY = TransformerConfig(vocab_size=37, num_layers=2, embed_dim=16, num_heads=4,
                         num_kv_heads=2, head_dim=8, mlp_dim=24, max_seq_len=32)
# Two windows of 19 tokens: three documents each, in different places, then padding.
DOCUMENT_LENGTHS = ((5, 7, 4), (9, 3, 4))
PADDING = 3

CONFIGS = {
    "grouped_einsum": TINY,
    "batched_matmul": dataclasses.replace(TINY, attention="batched_matmul"),
    "batched_matmul, unscanned, remat": dataclasses.replace(
        TINY, attention="batched_matmul", scan_layers=False, remat_policy="full"),
}


def documents(row: int) -> list[np.ndarray]:
    rng = np.random.default_rng(row)
    return [rng.integers(1, TINY.vocab_size, n).astype(np.int32)
            for n in DOCUMENT_LENGTHS[row]]


def packed_batch() -> dict[str, jax.Array]:
    """`tokens`, `segment_ids` and `positions` as the data pipeline lays out a window."""
    rows = {"tokens": [], "segment_ids": [], "positions": []}
    for row in range(len(DOCUMENT_LENGTHS)):
        docs = documents(row)
        pad = np.zeros(PADDING, np.int32)
        rows["tokens"].append(np.concatenate([*docs, pad]))
        rows["segment_ids"].append(np.concatenate(
            [np.full(len(d), i + 1, np.int32) for i, d in enumerate(docs)] + [pad]))
        rows["positions"].append(np.concatenate([np.arange(len(d)) for d in docs] + [pad]))
    return {key: jnp.asarray(np.stack(value), jnp.int32) for key, value in rows.items()}


@functools.cache
def init_params(config: TransformerConfig):
    tokens_BL = jnp.zeros((1, 4), jnp.int32)
    return nn.meta.unbox(jax.jit(Transformer(config).init)(jax.random.key(0),
                                                           tokens_BL)["params"])


def packed_logits(config: TransformerConfig, params, batch) -> jax.Array:
    return Transformer(config).apply({"params": params}, batch["tokens"],
                                     positions_BL=batch["positions"],
                                     segment_ids_BL=batch["segment_ids"])


# Documents alone are right-padded to one length, so one program serves them all: causal
# attention keeps the padding out of every real position's logits, and a zero cotangent on
# the padding keeps it out of the gradients.
ALONE = max(max(lengths) for lengths in DOCUMENT_LENGTHS)


def padded(array: np.ndarray) -> np.ndarray:
    return np.pad(array, [(0, ALONE - len(array))] + [(0, 0)] * (np.ndim(array) - 1))


@functools.partial(jax.jit, static_argnums=0)
def alone_logits(config: TransformerConfig, params, document: jax.Array) -> jax.Array:
    """One document as its own batch of one: no segments, rotary positions from 0."""
    return Transformer(config).apply({"params": params}, document[None])[0]


@functools.partial(jax.jit, static_argnums=0)
def alone_grads(config: TransformerConfig, params, document: jax.Array, cotangent_LV):
    return jax.grad(lambda p: jnp.sum(alone_logits(config, p, document) * cotangent_LV))(
        params)


def document_slices(row: int) -> list[slice]:
    starts = np.cumsum((0,) + DOCUMENT_LENGTHS[row])
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


@pytest.mark.parametrize("name", CONFIGS)
def test_each_packed_document_has_the_logits_it_has_alone(name):
    config = CONFIGS[name]
    params = init_params(config)
    batch = packed_batch()
    logits_BLV = jax.jit(packed_logits, static_argnums=0)(config, params, batch)
    for row in range(len(DOCUMENT_LENGTHS)):
        for doc, where in zip(documents(row), document_slices(row), strict=True):
            alone = alone_logits(config, params, padded(doc))[:len(doc)]
            np.testing.assert_allclose(logits_BLV[row, where], alone, rtol=1e-5, atol=1e-5)
    # Without the masks the later documents would see the earlier ones.
    unmasked_BLV = Transformer(config).apply({"params": params}, batch["tokens"],
                                             positions_BL=batch["positions"])
    second = document_slices(0)[1]
    assert np.abs(unmasked_BLV[0, second] - logits_BLV[0, second]).max() > 1e-2


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_gradients_are_the_sum_of_each_documents_gradients(name):
    """Through the whole model, so the batched_matmul form's hand-written backward meets a
    different mask in each row."""
    config = CONFIGS[name]
    params = init_params(config)
    batch = packed_batch()
    cotangent_BLV = jax.random.normal(jax.random.key(7), (*batch["tokens"].shape,
                                                          config.vocab_size))
    cotangent_BLV = cotangent_BLV * (batch["segment_ids"] != 0)[:, :, None]

    packed = jax.jit(jax.grad(lambda p: jnp.sum(packed_logits(config, p, batch)
                                                * cotangent_BLV)))(params)
    total = jax.tree.map(jnp.zeros_like, params)
    for row in range(len(DOCUMENT_LENGTHS)):
        for doc, where in zip(documents(row), document_slices(row), strict=True):
            grads = alone_grads(config, params, padded(doc),
                                padded(np.asarray(cotangent_BLV[row, where])))
            total = jax.tree.map(jnp.add, total, grads)
    # Gradients reach ~25 here, summed over six documents: float32 rounding is ~1e-5.
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4),
                 packed, total)


def test_hand_written_backward_matches_autodiff_with_a_mask_per_row():
    """`attend` against autodiff of its own forward, on rows with padding queries too."""
    B, K, G, L, Dh = 3, 2, 2, 9, 8
    keys = jax.random.split(jax.random.key(11), 4)
    q_BKMDh = jax.random.normal(keys[0], (B, K, G * L, Dh))
    k_BKSDh, v_BKSDh = (jax.random.normal(key, (B, K, L, Dh)) for key in keys[1:3])
    cotangent_BKMDh = jax.random.normal(keys[3], q_BKMDh.shape)
    segment_ids_BL = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0],
                                [1, 2, 2, 2, 3, 3, 3, 3, 3],
                                [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    mask_BLS = segment_mask(segment_ids_BL)

    def vjp(attend):
        out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, mask_BLS),
                                q_BKMDh, k_BKSDh, v_BKSDh)
        return out, pullback(cotangent_BKMDh)

    got, want = vjp(cpu_attention.attend), vjp(cpu_attention.attend.fun)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5),
                 got, want)
    # The third row is one document: the same as the causal mask shared by every row.
    causal_1LS = jnp.tril(jnp.ones((1, L, L), bool))
    np.testing.assert_array_equal(mask_BLS[2], causal_1LS[0])
    np.testing.assert_allclose(
        got[0][2], cpu_attention.attend(q_BKMDh, k_BKSDh, v_BKSDh, causal_1LS)[2],
        rtol=1e-6, atol=1e-6)


def test_both_attention_forms_agree_on_outputs_and_gradients_with_segments():
    B, L, H, K, Dh = 2, 7, 4, 2, 8
    keys = jax.random.split(jax.random.key(12), 4)
    q_BLHDh = jax.random.normal(keys[0], (B, L, H, Dh))
    k_BLKDh, v_BLKDh = (jax.random.normal(key, (B, L, K, Dh)) for key in keys[1:3])
    cotangent_BLHDh = jax.random.normal(keys[3], q_BLHDh.shape)
    mask_BLS = segment_mask(jnp.array([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 2, 3, 3]]))

    def value_and_grads(attention):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(attention(q, k, v, mask_BLS) * cotangent_BLHDh),
            argnums=(0, 1, 2)))(q_BLHDh, k_BLKDh, v_BLKDh)

    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5),
                 value_and_grads(cpu_attention.batched_matmul_attention),
                 value_and_grads(grouped_einsum_attention))


def test_segment_mask_by_hand():
    mask = segment_mask(jnp.array([[1, 1, 2, 0]]))
    want = np.array([[1, 0, 0, 0],
                     [1, 1, 0, 0],
                     [0, 0, 1, 0],
                     [0, 0, 0, 1]], bool)  # padding sees only itself; nobody sees padding
    np.testing.assert_array_equal(mask[0], want)


@pytest.mark.parametrize("name", ["grouped_einsum", "batched_matmul"])
def test_padding_gives_finite_logits_and_gradients(name):
    config = CONFIGS[name]
    params = init_params(config)
    batch = packed_batch()
    logits_BLV = jax.jit(packed_logits, static_argnums=0)(config, params, batch)
    assert bool(jnp.all(jnp.isfinite(logits_BLV[:, -PADDING:])))
    # A row of padding only: every query sees nothing but itself.
    padding = {key: jnp.zeros((1, 6), jnp.int32) for key in batch}
    grads = jax.jit(jax.grad(lambda p: jnp.sum(packed_logits(config, p, padding) ** 2)))(
        params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_targets_across_documents_or_on_padding_weigh_nothing():
    batch = {"segment_ids": jnp.array([[1, 1, 1, 2, 2, 0, 0], [0, 3, 3, 3, 3, 3, 3]])}
    weights = jnp.array([[1.0, 0.5, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(document_weights(batch, weights),
                                  [[1.0, 0.5, 0.0, 1.0, 0.0, 0.0],
                                   [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]])


def document_losses(config: TransformerConfig, params) -> list[tuple[int, float]]:
    """(targets, mean cross-entropy) of every document run alone."""
    out = []
    for row in range(len(DOCUMENT_LENGTHS)):
        for doc in documents(row):
            logits = alone_logits(config, params, padded(doc[:-1]))[:len(doc) - 1]
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, doc[1:])
            out.append((len(doc) - 1, float(jnp.mean(losses))))
    return out


@pytest.mark.parametrize("name", ["grouped_einsum", "batched_matmul"])
def test_task_loss_is_the_token_weighted_mean_of_document_losses(name):
    config = CONFIGS[name]
    params = init_params(config)
    model = Transformer(config)
    batch = packed_batch()
    per_document = document_losses(config, params)
    count = sum(n for n, _ in per_document)
    assert count == 2 * 16 - 6  # each document's first token is no target
    want = sum(n * loss for n, loss in per_document) / count

    objective = jax.jit(functools.partial(steps.objective, model=model,
                                          task=LANGUAGE_MODELING, l2=0.0))
    loss, _ = objective(params, batch, jax.random.key(0))
    np.testing.assert_allclose(loss, want, rtol=1e-5)

    # Evaluation: the same sums, times the existing weights and example mask.
    eval_batch = {**batch, "weights": jnp.ones(batch["tokens"][:, 1:].shape),
                  "mask": jnp.array([1.0, 0.0])}
    evaluate = jax.jit(functools.partial(steps.eval_step, model=model, task=LANGUAGE_MODELING))
    sums = evaluate(params, eval_batch)
    first_row = per_document[:len(DOCUMENT_LENGTHS[0])]
    assert float(sums["count"]) == sum(n for n, _ in first_row) == 13
    np.testing.assert_allclose(sums["loss_sum"], sum(n * loss for n, loss in first_row),
                               rtol=1e-5)


def test_unpacked_batches_run_the_model_as_before():
    """No segment keys: no model keyword arguments, weights untouched, and a model given one
    segment and positions from 0 computes what the plain causal model computes."""
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, TINY.vocab_size)
    batch = {"tokens": tokens}
    assert LANGUAGE_MODELING.model_inputs(batch) == {}
    weights = jnp.ones((2, 10))
    assert document_weights(batch, weights) is weights
    model_inputs = LANGUAGE_MODELING.model_inputs(
        {**batch, "segment_ids": jnp.ones_like(tokens),
         "positions": jnp.broadcast_to(jnp.arange(11), tokens.shape)})
    assert sorted(model_inputs) == ["positions_BL", "segment_ids_BL"]
    assert model_inputs["segment_ids_BL"].shape == (2, 10)
    for name in ("grouped_einsum", "batched_matmul"):
        config = CONFIGS[name]
        params = init_params(config)
        plain = Transformer(config).apply({"params": params}, tokens[:, :-1])
        one_segment = Transformer(config).apply({"params": params}, tokens[:, :-1],
                                                **model_inputs)
        np.testing.assert_allclose(one_segment, plain, rtol=1e-6, atol=1e-6)


def test_the_shared_causal_mask_is_never_made_per_row():
    params = init_params(TINY)
    tokens_BL = jnp.zeros((2, 18), jnp.int32)
    apply = jax.jit(Transformer(TINY).apply)
    plain = apply.lower({"params": params}, tokens_BL).as_text()
    packed = apply.lower({"params": params}, tokens_BL,
                         segment_ids_BL=jnp.ones_like(tokens_BL)).as_text()
    assert "tensor<2x18x18xi1>" in packed
    assert "tensor<2x18x18xi1>" not in plain


def test_decoding_takes_no_segments():
    batch = paged.PagedBatch(positions_BL=jnp.zeros((1, 4), jnp.int32),
                             slots_BL=jnp.arange(4, dtype=jnp.int32)[None],
                             block_table_BM=jnp.zeros((1, 1), jnp.int32),
                             logit_index_B=jnp.zeros((1,), jnp.int32), num_blocks=1,
                             block_size=4)
    with pytest.raises(ValueError, match="segment_ids_BL with a paged batch"):
        Transformer(TINY).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                               paged_batch=batch, segment_ids_BL=jnp.ones((1, 4), jnp.int32))
