"""What a model is trained to do: how a batch becomes a loss and eval metrics.

The train loop is the same for every task; only these few pure functions differ. Eval
functions return sums (never means) over the real examples, so padded batches and any number
of hosts add up to the exact figure. How a batch becomes the model's inputs is shared with
inference and lives in `scaling.data.preprocess`.

With packed windows (`segment_ids` beside `tokens`, see `scaling.data.preprocess`), a
language-modelling target counts only when it continues its input's document.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from scaling.data import preprocess as preprocessing
from scaling.errors import UserError
from scaling.models.tiled_loss import Projection


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    preprocess: Callable      # batch -> model inputs; shared by training and prediction
    loss: Callable            # (logits, batch) -> (mean loss, aux metrics)
    eval_sums: Callable       # (logits, batch) -> dict of sums over unmasked examples
    summarize: Callable       # host dict of sums -> reported metrics
    items_per_example: Callable[[dict], int]  # element spec -> tokens (or images) per example
    # batch -> keyword arguments of the model beside the preprocessed input; whatever a
    # batch carries that the model needs but a plain input cannot hold (packed documents).
    model_inputs: Callable[[dict], dict]


def _task(inputs: preprocessing.Preprocessing, **fields) -> Task:
    """The task of `inputs.name`: its model inputs as inference makes them, and `fields`."""
    return Task(name=inputs.name, preprocess=inputs.preprocess,
                model_inputs=inputs.model_inputs, **fields)


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


CLASSIFICATION = _task(
    preprocessing.CLASSIFICATION, loss=_classification_loss, eval_sums=_classification_sums,
    summarize=_classification_summary, items_per_example=lambda spec: 1)


def document_weights(batch: dict, weights: jax.Array) -> jax.Array:
    """`weights` (B, L) of the targets, zeroed where a target is padding or starts another
    document than its input's: nothing in the input's document predicts that token."""
    if "segment_ids" not in batch:
        return weights
    segment_ids = batch["segment_ids"]
    inputs, targets = segment_ids[:, :-1], segment_ids[:, 1:]
    return weights * ((targets == inputs) & (targets != 0))


def _token_sums(outputs, targets, weights):
    """`weighted_sums` of logits, or of a tiled projection (`model.loss_chunk`), which never
    makes the whole logits."""
    if isinstance(outputs, Projection):
        loss_sum, correct = outputs.cross_entropy(targets, weights)
        return {"loss_sum": loss_sum, "correct": correct, "count": jnp.sum(weights)}
    return weighted_sums(outputs, targets, weights)


def _lm_loss(logits, batch):
    targets = batch["tokens"][:, 1:]
    weights = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
    sums = _token_sums(logits, targets, document_weights(batch, weights))
    total = jnp.maximum(sums["count"], 1.0)
    return sums["loss_sum"] / total, {"accuracy": sums["correct"] / total}


def _lm_sums(logits, batch):
    weights = document_weights(batch, batch["weights"] * batch["mask"][:, None])
    return _token_sums(logits, batch["tokens"][:, 1:], weights)


def _lm_summary(sums):
    count = float(sums["count"])
    loss = float(sums["loss_sum"]) / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": float(sums["correct"]) / count, "num_tokens": int(count)}


LANGUAGE_MODELING = _task(
    preprocessing.LANGUAGE_MODELING, loss=_lm_loss, eval_sums=_lm_sums, summarize=_lm_summary,
    items_per_example=lambda spec: spec["tokens"].shape[0] - 1)

def _sft_sums(outputs, batch):
    """The language model's sums, plus exact matches: pairs whose every response token is
    the argmax given the tokens before it, which is exactly when greedy decoding reproduces
    the response. A tiled projection (`model.loss_chunk`) makes no argmax, so it has none."""
    sums = _lm_sums(outputs, batch)
    if isinstance(outputs, Projection):
        return sums
    targets = batch["tokens"][:, 1:]
    weights = document_weights(batch, batch["weights"] * batch["mask"][:, None])
    wrong = weights * (jnp.argmax(outputs, -1) != targets)
    B, L = targets.shape
    pair = (jnp.arange(B)[:, None] * (L + 1) + batch["segment_ids"][:, 1:]).reshape(-1)
    wrong_per_pair = jax.ops.segment_sum(wrong.reshape(-1), pair, B * (L + 1))
    answered = jax.ops.segment_sum(weights.reshape(-1), pair, B * (L + 1)) > 0
    return {**sums, "pairs": jnp.sum(answered),
            "exact": jnp.sum(answered & (wrong_per_pair == 0))}


def _sft_summary(sums):
    summary = _lm_summary(sums)
    if "pairs" in sums:
        summary.update(exact_match=float(sums["exact"]) / max(float(sums["pairs"]), 1.0),
                       num_pairs=int(sums["pairs"]))
    return summary


SUPERVISED_FINETUNING = dataclasses.replace(
    LANGUAGE_MODELING, name="sft", eval_sums=_sft_sums, summarize=_sft_summary)

TASKS = {task.name: task for task in (CLASSIFICATION, LANGUAGE_MODELING, SUPERVISED_FINETUNING)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"--config.task={name}: expected one of {', '.join(TASKS)}")
    return TASKS[name]


def sum_metrics(tree):
    """Adds per-batch sums stacked along the leading axis."""
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), tree)
