"""Flax Linen models, named by `config.model.name`, and the formulas each one provides.

Models use the logical axis names of `scaling.models.axes` only. Each model also says what a
training step should cost: FLOPs per example and collective bytes per step (the protocol is
in `scaling.models.formulas`). The built-in models define them beside their code (`mlp`,
`transformer_formulas`); an experiment file that defines `make_model(config)` may define
`flops_per_example(model, config, params)` and `collective_bytes(model, config, layout)`
beside it. A model class with neither gets no formula, and preflight says so rather than
guessing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from scaling.errors import UserError
from scaling.models import formulas

MODELS = ("mlp", "transformer")


def make_model(config: ml_collections.ConfigDict, experiment=None,
               platform: str | None = None) -> nn.Module:
    """The experiment's own `make_model(config)` if it defines one, else a built-in model.

    `platform` (cpu, gpu, tpu; None for a mesh that is only a shape) settles choices made
    per platform, such as `model.attention=auto`."""
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

        return Transformer(transformer_config(model_config, platform,
                                              config.get("data", {}).get("seq_len")))
    raise UserError(f"--config.model.name={model_config.name}: unknown model; expected one of "
                    f"{', '.join(MODELS)}, or define make_model(config) in the experiment file")


def init_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(params key, state key) of a run: its params at step 0 are `model.init(params key)`,
    in training and wherever inference makes them again."""
    return tuple(jax.random.split(jax.random.PRNGKey(seed)))


def transformer_config(model_config: ml_collections.ConfigDict, platform: str | None = None,
                       seq_len: int | None = None):
    """The model's config with `attention=auto` resolved for `platform` (see
    `attention_choice.choose_attention`)."""
    from scaling.models.attention_choice import choose_attention
    from scaling.models.transformer import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(model_config.keys()) - fields - {"name"})
    if unknown:
        raise UserError(f"--config.model: unknown transformer fields {', '.join(unknown)}; "
                        f"expected some of {', '.join(sorted(fields))}")
    values = {k: v for k, v in model_config.items() if k in fields}
    if "attention" in values:
        values["attention"] = choose_attention(
            values["attention"], platform, seq_len, values.get("dtype", "float32"),
            values.get("head_dim"))
    chunk = values.get("loss_chunk", 0)
    if chunk and seq_len and seq_len % chunk:  # known here, before any data is read
        raise UserError(f"--config.model.loss_chunk={chunk}: must divide the sequence length "
                        f"{seq_len} (--config.data.seq_len)")
    try:
        return TransformerConfig(**values)
    except UserError as e:  # its messages start with the field: name the flag that sets it
        raise UserError(f"--config.model.{e}") from None


def _model_formulas(model: nn.Module, experiment) -> tuple[Callable | None, Callable | None]:
    """(flops_per_example, collective_bytes) for this model: the experiment's own functions
    where its file defines them, else those of the built-in model class, else None."""
    from scaling.models import mlp, transformer, transformer_formulas

    builtin = {mlp.MLP: mlp, transformer.Transformer: transformer_formulas}.get(type(model))
    found = []
    for name in ("flops_per_example", "collective_bytes"):
        hook = getattr(experiment, name, None)
        found.append(hook if callable(hook) else getattr(builtin, name, None))
    return found[0], found[1]


def training_flops_per_example(model: nn.Module, config: ml_collections.ConfigDict, params,
                               experiment=None) -> float | None:
    """Analytic FLOPs of one forward and backward pass over one example, as the model counts
    them (see `scaling.models.formulas`); None for a model that provides no formula, since a
    guess would make every MFU figure quietly wrong."""
    flops, _ = _model_formulas(model, experiment)
    return None if flops is None else float(flops(model, config, params))


def collective_bytes(model: nn.Module, config: ml_collections.ConfigDict,
                     layout: formulas.StepLayout, experiment=None) -> dict[str, float] | None:
    """The collective bytes per device per step that the model expects, by
    `formulas.GROUPS`; None for a model with no formula (for this layout)."""
    _, collectives = _model_formulas(model, experiment)
    if collectives is None:
        return None
    totals = collectives(model, config, layout)
    if totals is None:
        return None
    unknown = set(totals) - set(formulas.GROUPS)
    if unknown:
        raise UserError(f"collective_bytes returned unknown groups {', '.join(sorted(unknown))}; "
                        f"expected some of {', '.join(formulas.GROUPS)}")
    return {group: float(totals.get(group, 0.0)) for group in formulas.GROUPS}
