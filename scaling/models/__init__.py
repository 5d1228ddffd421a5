"""Flax Linen models, named by `config.model.name`. Models use logical axis names only."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from scaling.errors import UserError

MODELS = ("mlp", "transformer")


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
    if model_config.name == "transformer":
        from scaling.models.transformer import Transformer

        return Transformer(transformer_config(model_config))
    raise UserError(f"--config.model.name={model_config.name}: unknown model; expected one of "
                    f"{', '.join(MODELS)}, or define make_model(config) in the experiment file")


def transformer_config(model_config: ml_collections.ConfigDict):
    from scaling.models.transformer import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(model_config.keys()) - fields - {"name"})
    if unknown:
        raise UserError(f"--config.model: unknown transformer fields {', '.join(unknown)}; "
                        f"expected some of {', '.join(sorted(fields))}")
    try:
        return TransformerConfig(**{k: v for k, v in model_config.items() if k in fields})
    except UserError as e:  # its messages start with the field: name the flag that sets it
        raise UserError(f"--config.model.{e}") from None


def training_flops_per_example(model: nn.Module, params, element_spec: dict) -> float:
    """Analytic FLOPs of one forward and backward pass over one example.

    Transformers use their own count (see `transformer.flops_per_token`); any other model is
    taken as a stack of dense layers, 6 FLOPs per weight-matrix entry.
    """
    from scaling.models.transformer import Transformer, flops_per_token

    if isinstance(model, Transformer):
        seq_len = element_spec["tokens"].shape[0] - 1
        return flops_per_token(model.config, seq_len) * seq_len
    return 6.0 * sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)
                     if len(p.shape) > 1)
