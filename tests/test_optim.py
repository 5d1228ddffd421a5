"""Optimizers, schedules, clipping and the L2 term."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from scaling.config import experiments as config_lib
from scaling.errors import UserError
from scaling.training import optimizer
from scaling.training.steps import l2_penalty, objective
from scaling.training.tasks import CLASSIFICATION


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    config, _ = config_lib.load_config("mnist_mlp", [f"optimizer.{k}={v}"
                                                     for k, v in overrides.items()])
    return config.optimizer


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_each_optimizer_reduces_a_quadratic(name):
    tx, _ = optimizer.make_optimizer(optimizer_config(name=name, learning_rate=0.1), 100)
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(20):
        grads = jax.grad(lambda p: sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(p)))(
            params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert float(jnp.sum(params["w"] ** 2)) < 9 * 0.5


def test_adamw_decays_matrices_but_not_biases():
    tx, _ = optimizer.make_optimizer(optimizer_config(name="adamw", weight_decay=0.5,
                                                  learning_rate=0.1), 10)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], 0.0)


def test_warmup_cosine_schedule_shape():
    _, schedule = optimizer.make_optimizer(
        optimizer_config(schedule="warmup_cosine", warmup_steps=10, learning_rate=1.0), 110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def test_warmup_longer_than_training_is_a_user_error():
    with pytest.raises(UserError, match="--config.optimizer.warmup_steps=50"):
        optimizer.make_optimizer(optimizer_config(schedule="warmup_cosine", warmup_steps=50), 20)


def test_global_norm_clipping_bounds_the_update():
    tx, _ = optimizer.make_optimizer(optimizer_config(name="sgd", momentum=0.0, learning_rate=1.0,
                                                  clip_norm=1.0), 10)
    params = {"w": jnp.zeros(4)}
    updates, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_l2_term_is_half_lambda_sum_of_squared_weights():
    from scaling.models.mlp import MLP

    model = MLP(hidden_sizes=(4,), num_classes=3)
    batch = {"image": np.ones((2, 2, 2, 1), np.uint8), "label": np.array([0, 1])}
    params = jax.tree_util.tree_map(
        lambda x: x + 0.5, model.init(jax.random.PRNGKey(0), np.ones((1, 4)))["params"])
    params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                    is_leaf=lambda x: hasattr(x, "value"))
    rng = jax.random.PRNGKey(1)
    plain, _ = objective(params, batch, rng, model=model, task=CLASSIFICATION, l2=0.0)
    with_l2, aux = objective(params, batch, rng, model=model, task=CLASSIFICATION, l2=0.3)
    assert float(aux["data_loss"]) == pytest.approx(float(plain))
    squares = sum(float(jnp.sum(params[layer]["kernel"] ** 2)) for layer in params)
    assert float(l2_penalty(params)) == pytest.approx(squares, rel=1e-6)
    assert float(with_l2 - plain) == pytest.approx(0.15 * squares, rel=1e-5)


def test_adamw_never_decays_stacked_norm_scales():
    params = {"layers": {"norm": {"scale": jnp.ones((4, 8))}, "mlp": {"up": jnp.ones((4, 8, 8))}}}
    mask = optimizer.decay_mask(params)
    assert mask["layers"]["norm"]["scale"] is False and mask["layers"]["mlp"]["up"] is True
