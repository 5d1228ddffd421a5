"""The model's eval-mode forward pass from a raw batch.

Evaluation, prediction and export all run the model through `eval_logits`, so they feed it
exactly as training does: `task` is anything with the `preprocess` and `model_inputs` of a
task (`scaling.data.preprocess.Preprocessing`, or training's `Task`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from scaling.models.tiled_loss import Projection


def eval_logits(params, batch, *, model: nn.Module, task) -> jax.Array:
    """Float32 logits of the model in eval mode from a raw batch: the one forward pass that
    evaluation, prediction and export all share, so they preprocess exactly as training."""
    outputs = model.apply({"params": params}, task.preprocess(batch), train=False,
                          **task.model_inputs(batch))
    return outputs if isinstance(outputs, Projection) else outputs.astype(jnp.float32)
