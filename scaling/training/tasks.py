"""What a model is trained to do: how a batch becomes inputs, a loss and eval metrics.

The train loop is the same for every task; only these few pure functions differ. Eval
functions return sums (never means) over the real examples, so padded batches and any number
of hosts add up to the exact figure.

A language-modelling batch holds `tokens` (B, L+1), inputs and targets in one window, and
optionally, aligned with it, `segment_ids` (the document of each token within the window,
1, 2, ...; 0 for padding) and `positions` (each token's position within its document) when
the window packs several documents. The model then sees them for the inputs, and a target
counts only when it continues its input's document.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from scaling.errors import UserError
from scaling.models.tiled_loss import Projection


def _no_model_inputs(batch: dict) -> dict:
    return {}


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
    model_inputs: Callable[[dict], dict] = _no_model_inputs


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


# Batch keys of packed windows, and the model's keyword arguments that take them.
PACKING_INPUTS = {"segment_ids": "segment_ids_BL", "positions": "positions_BL"}


def _next_token_model_inputs(batch: dict) -> dict:
    """The documents and in-document positions of the inputs, when the window packs several;
    nothing otherwise, so unpacked batches run the model exactly as before."""
    return {arg: batch[key][:, :-1] for key, arg in PACKING_INPUTS.items() if key in batch}


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


LANGUAGE_MODELING = Task(
    name="language_modeling", preprocess=_next_token_inputs, loss=_lm_loss,
    eval_sums=_lm_sums, summarize=_lm_summary,
    items_per_example=lambda spec: spec["tokens"].shape[0] - 1,
    model_inputs=_next_token_model_inputs)

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
LANGUAGE_TASKS = ("language_modeling", "sft")  # sampled from, with a tokenizer


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"--config.task={name}: expected one of {', '.join(TASKS)}")
    return TASKS[name]


def sum_metrics(tree):
    """Adds per-batch sums stacked along the leading axis."""
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), tree)
