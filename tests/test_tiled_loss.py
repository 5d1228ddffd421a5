"""The tiled cross-entropy: the dense loss and gradients, in a fraction of the memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling.models.tiled_loss import tiled_cross_entropy


def dense(x_BLD, w_DV, targets_BL, weights_BL):
    logits = jnp.einsum("bld,dv->blv", x_BLD, w_DV, preferred_element_type=jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BL)
    correct = (jnp.argmax(logits, -1) == targets_BL).astype(jnp.float32)
    return jnp.sum(losses * weights_BL), jnp.sum(correct * weights_BL)


def inputs(B=3, L=32, D=16, V=1000, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(keys[0], (B, L, D), jnp.float32)
    w = jax.random.normal(keys[1], (D, V), jnp.float32) * 0.3
    targets = jax.random.randint(keys[2], (B, L), 0, V)
    weights = (jax.random.uniform(keys[3], (B, L)) > 0.2).astype(jnp.float32)
    return x, w, targets, weights


@pytest.mark.parametrize("chunk", [1, 8, 32])
def test_loss_count_and_gradients_equal_the_dense_ones(chunk):
    x, w, targets, weights = inputs()
    tiled = tiled_cross_entropy(x, w, targets, weights, chunk)
    want = dense(x, w, targets, weights)
    np.testing.assert_allclose(tiled[0], want[0], rtol=1e-5)
    assert float(tiled[1]) == float(want[1])

    def loss(fn, x, w):
        return fn(x, w, targets, weights)[0] / jnp.sum(weights)

    got = jax.jit(jax.grad(lambda x, w: loss(lambda *a: tiled_cross_entropy(*a, chunk), x, w),
                           argnums=(0, 1)))(x, w)
    expected = jax.jit(jax.grad(lambda x, w: loss(dense, x, w), argnums=(0, 1)))(x, w)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)


def test_the_logits_never_exist_whole():
    """A 32k vocabulary: the compiled gradient's temporaries are a fraction of the dense."""
    x, w, targets, weights = (jax.ShapeDtypeStruct(s.shape, s.dtype) for s in
                              inputs(B=4, L=512, D=64, V=32768))

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda x, w: fn(x, w, targets_, weights_)[0], argnums=(0, 1)))
        return grad.lower(x, w).compile().memory_analysis().temp_size_in_bytes

    targets_ = jnp.zeros(targets.shape, jnp.int32)
    weights_ = jnp.ones(weights.shape, jnp.float32)
    logits_bytes = 4 * 512 * 32768 * 4
    block_bytes = 4 * 64 * 32768 * 4                # one chunk of 64 positions
    dense_bytes = temp_bytes(dense)
    tiled_bytes = temp_bytes(lambda *a: tiled_cross_entropy(*a, 64))
    assert dense_bytes >= logits_bytes              # at least the whole float32 logits
    assert tiled_bytes <= 2.5 * block_bytes         # a block and its gradient at a time
    assert tiled_bytes < dense_bytes / 3


def lm(loss_chunk, tie, vocab=61, seq_len=16):
    from scaling.models.transformer import Transformer, TransformerConfig

    return Transformer(TransformerConfig(
        vocab_size=vocab, num_layers=2, embed_dim=16, num_heads=4, num_kv_heads=2,
        head_dim=8, mlp_dim=24, max_seq_len=seq_len, tie_embeddings=tie,
        loss_chunk=loss_chunk))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_language_model_trains_and_evaluates_alike_with_the_tiled_loss(tie):
    import functools

    import flax.linen as nn

    from scaling.training import steps
    from scaling.training.tasks import LANGUAGE_MODELING

    rng = jax.random.PRNGKey(0)
    tokens = jax.random.randint(rng, (2, 17), 0, 61)
    dense_model, tiled_model = lm(0, tie), lm(4, tie)
    params = nn.meta.unbox(dense_model.init(rng, tokens[:, :-1])["params"])
    tiled_params = nn.meta.unbox(tiled_model.init(rng, tokens[:, :-1])["params"])
    assert jax.tree.structure(params) == jax.tree.structure(tiled_params)
    batch = {"tokens": tokens}
    results = []
    for model in (dense_model, tiled_model):
        objective = functools.partial(steps.objective, model=model, task=LANGUAGE_MODELING,
                                      l2=0.0)
        (loss, aux), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
            params, batch, rng)
        evaluate = jax.jit(functools.partial(steps.eval_step, model=model,
                                             task=LANGUAGE_MODELING))
        sums = evaluate(params, {**batch, "weights": jnp.ones((2, 16)),
                                 "mask": jnp.array([True, False])})
        results.append((loss, aux["accuracy"], grads, sums))
    (loss, accuracy, grads, sums), (tiled_loss, tiled_accuracy, tiled_grads, tiled_sums) = results
    np.testing.assert_allclose(tiled_loss, loss, rtol=1e-5)
    assert float(tiled_accuracy) == float(accuracy)
    for got, want in zip(jax.tree.leaves(tiled_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tiled_sums["loss_sum"], sums["loss_sum"], rtol=1e-5)
    assert float(tiled_sums["count"]) == float(sums["count"]) == 16


def test_the_training_step_with_a_32k_vocabulary_holds_less_with_the_tiled_loss():
    import functools

    import flax.linen as nn

    from scaling.training import steps
    from scaling.training.tasks import LANGUAGE_MODELING

    tokens = jax.ShapeDtypeStruct((4, 257), jnp.int32)

    def temp_bytes(model):
        params = jax.eval_shape(
            lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((4, 256), jnp.int32))["params"]))
        objective = functools.partial(steps.objective, model=model, task=LANGUAGE_MODELING,
                                      l2=0.0)
        grad = jax.jit(jax.grad(lambda p, b: objective(p, b, jax.random.PRNGKey(0))[0]))
        compiled = grad.lower(params, {"tokens": tokens}).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = 4 * 256 * 32768 * 4
    dense = temp_bytes(lm(0, True, vocab=32768, seq_len=256))
    tiled = temp_bytes(lm(32, True, vocab=32768, seq_len=256))
    assert dense >= logits_bytes and tiled < dense / 3, (dense, tiled)
