"""What a model is trained to do: how a batch becomes inputs, a loss and eval metrics.

The train loop is the same for every task; only these few pure functions differ. Eval
functions return sums (never means) over the real examples, so padded batches and any number
of hosts add up to the exact figure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from scaling.errors import UserError


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    preprocess: Callable      # batch -> model inputs; shared by training and prediction
    loss: Callable            # (logits, batch) -> (mean loss, aux metrics)
    eval_sums: Callable       # (logits, batch) -> dict of sums over unmasked examples
    summarize: Callable       # host dict of sums -> reported metrics
    items_per_example: Callable[[dict], int]  # element spec -> tokens (or images) per example


def _scale_pixels(batch):
    return batch["image"].astype(jnp.float32) / 255.0


def _classification_loss(logits, batch):
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def weighted_sums(logits, labels, weights):
    """Cross-entropy and correct predictions summed with per-label weights (0 = padding)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return {"loss_sum": jnp.sum(losses * weights), "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}


def _classification_sums(logits, batch):
    return weighted_sums(logits, batch["label"], batch["mask"])


def _classification_summary(sums):
    count = float(sums["count"])
    return {"loss": float(sums["loss_sum"]) / count,
            "accuracy": float(sums["correct"]) / count, "num_examples": int(count)}


CLASSIFICATION = Task(
    name="classification", preprocess=_scale_pixels, loss=_classification_loss,
    eval_sums=_classification_sums, summarize=_classification_summary,
    items_per_example=lambda spec: 1)


def _next_token_inputs(batch):
    return batch["tokens"][:, :-1]


def _lm_loss(logits, batch):
    targets = batch["tokens"][:, 1:]
    weights = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
    sums = weighted_sums(logits, targets, weights)
    total = jnp.maximum(sums["count"], 1.0)
    return sums["loss_sum"] / total, {"accuracy": sums["correct"] / total}


def _lm_sums(logits, batch):
    weights = batch["weights"] * batch["mask"][:, None]
    return weighted_sums(logits, batch["tokens"][:, 1:], weights)


def _lm_summary(sums):
    count = float(sums["count"])
    loss = float(sums["loss_sum"]) / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": float(sums["correct"]) / count, "num_tokens": int(count)}


LANGUAGE_MODELING = Task(
    name="language_modeling", preprocess=_next_token_inputs, loss=_lm_loss,
    eval_sums=_lm_sums, summarize=_lm_summary,
    items_per_example=lambda spec: spec["tokens"].shape[0] - 1)

TASKS = {task.name: task for task in (CLASSIFICATION, LANGUAGE_MODELING)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"--config.task={name}: expected one of {', '.join(TASKS)}")
    return TASKS[name]


def sum_metrics(tree):
    """Adds per-batch sums stacked along the leading axis."""
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), tree)
