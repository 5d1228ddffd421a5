"""The pure train and eval steps: TrainState, the objective, microbatching, one update.

Everything here is a pure function of arrays, so it can be scanned, jitted and sharded; the
apply function and the optax transformation arrive through closures, so TrainState (and so
every checkpoint) holds arrays only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from scaling.models.forward import eval_logits
from scaling.models.tiled_loss import Projection
from scaling.training.tasks import Task


@flax.struct.dataclass
class TrainState:
    """Arrays only, so a checkpoint is nothing but arrays."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def l2_penalty(params) -> jax.Array:
    """λ/2·Σw² is applied with λ outside; this is Σw² over weight matrices (not biases)."""
    leaves = [p for p in jax.tree_util.tree_leaves(params) if p.ndim > 1]
    return sum(jnp.sum(jnp.square(p.astype(jnp.float32))) for p in leaves)


def objective(params, batch, rng, *, model: nn.Module, task: Task, l2: float):
    """The task loss plus the optional L2 term λ/2·Σw²; what the optimizer descends."""
    outputs = model.apply({"params": params}, task.preprocess(batch), train=True,
                          rngs={"dropout": rng}, **task.model_inputs(batch))
    if not isinstance(outputs, Projection):  # a tiled loss makes its float32 logits itself
        outputs = outputs.astype(jnp.float32)
    loss, aux = task.loss(outputs, batch)
    if l2:
        aux["data_loss"] = loss
        loss = loss + 0.5 * l2 * l2_penalty(params)
    return loss, aux


def split_microbatches(batch, num_microbatches: int, sharding=None):
    """(B, ...) to (k, B/k, ...), taking every k-th example so each device's rows stay local."""
    def split(x):
        x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
    return jax.tree_util.tree_map(split, batch)


def loss_and_grads(loss_fn: Callable, params, batch, rng, num_microbatches: int = 1,
                   microbatch_sharding=None):
    """Mean loss and gradient over the batch, optionally accumulated over microbatches.

    With equal-sized microbatches the mean of their gradients is the full-batch gradient, so
    accumulation changes memory, not the update.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        return grad_fn(params, batch, rng)

    def accumulate(carry, indexed):
        index, microbatch = indexed
        out = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
        return jax.tree_util.tree_map(jnp.add, carry, out), None

    microbatches = split_microbatches(batch, num_microbatches, microbatch_sharding)
    first = jax.tree_util.tree_map(lambda x: x[0], microbatches)
    zeros = jax.tree_util.tree_map(
        jnp.zeros_like, jax.eval_shape(grad_fn, params, first, rng))
    total, _ = jax.lax.scan(accumulate, zeros,
                            (jnp.arange(num_microbatches), microbatches))
    return jax.tree_util.tree_map(lambda x: x / num_microbatches, total)


def train_step(state: TrainState, batch, *, loss_fn: Callable,
               tx: optax.GradientTransformation, num_microbatches: int = 1,
               microbatch_sharding=None, skip_nonfinite: bool = False):
    """One optimizer update; pure, so it can be scanned, jitted and sharded.

    With `skip_nonfinite`, a step whose loss or gradients are not finite leaves params and
    optimizer state exactly as they were (the batch is still consumed).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = loss_and_grads(loss_fn, state.params, batch, rng, num_microbatches,
                                        microbatch_sharding)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
    if skip_nonfinite:
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree_util.tree_map,
                                 lambda new, old: jnp.where(finite, new, old))
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model: nn.Module, task: Task):
    """Sums, not means, over the real (unmasked) examples, so padding never counts."""
    return task.eval_sums(eval_logits(params, batch, model=model, task=task), batch)
