"""Flax Linen models, named by `config.model.name`. Models use logical axis names only."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from scaling.errors import UserError


def make_model(config: ml_collections.ConfigDict, experiment=None) -> nn.Module:
    """The experiment's own `make_model(config)` if it defines one, else a built-in model."""
    hook = getattr(experiment, "make_model", None)
    if callable(hook):
        return hook(config)
    model_config = config.model
    if model_config.name == "mlp":
        from scaling.models.mlp import MLP

        return MLP(hidden_sizes=tuple(model_config.hidden_sizes),
                   num_classes=model_config.num_classes,
                   dtype=jnp.dtype(model_config.dtype))
    raise UserError(f"--config.model.name={model_config.name}: unknown model; expected mlp, "
                    "or define make_model(config) in the experiment file")
