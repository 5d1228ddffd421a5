"""LoRA: which params are adapters, keeping the rest frozen, and folding adapters in.

With `model.lora_rank` > 0 the transformer adds two small params beside each attention and
MLP kernel, `NAME_lora_a` (in, r) and `NAME_lora_b` (r, out) (`transformer.lora_delta`).
Training then updates those alone: the others pass through `stop_gradient`, so XLA never
computes their weight gradients, and the optimizer keeps no moments for them
(`optimizer_labels` with optax.multi_transform). Checkpoints hold the adapters alone
(`adapters_only`): the frozen params are the run's starting point, read again from
`init_from` (or made again from the seed) on resume and for inference. Exported models hold
the merged kernels, W + (alpha/r)·A B, and no adapters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from scaling.models.transformer import LORA_SUFFIXES

ADAPTER, FROZEN = "adapter", "frozen"


def _name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def is_adapter(path) -> bool:
    return _name(path).endswith(LORA_SUFFIXES)


def optimizer_labels(params):
    """ADAPTER or FROZEN for every param, for `optax.multi_transform`; params still boxed
    with their logical names (an abstract init) get a label per box."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ADAPTER if is_adapter(path) else FROZEN, params,
        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def freeze_base(params):
    """Every param but the adapters behind `stop_gradient`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p if is_adapter(path) else jax.lax.stop_gradient(p), params)


def without_adapters(params):
    """The params tree (nested dicts) with the adapter leaves left out."""
    if not isinstance(params, dict):
        return params
    return {k: without_adapters(v) for k, v in params.items()
            if not k.endswith(LORA_SUFFIXES)}


def adapters_only(params):
    """The adapter leaves alone, in their nesting (what a LoRA run's checkpoints hold)."""
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if key.endswith(LORA_SUFFIXES):
            out[key] = value
        elif isinstance(value, dict):
            inner = adapters_only(value)
            if inner:
                out[key] = inner
    return out


def overlay(params, given):
    """`params` with every leaf of `given` (a tree of the same nesting) laid over them: the
    adapters over the frozen params, or init_from's params over a fresh init."""
    if not isinstance(given, dict):
        return given
    return {**params, **{k: overlay(params.get(k, {}), v) for k, v in given.items()}}


def merged(params, lora_rank: int, lora_alpha: float):
    """The params of the model without adapters: each adapted kernel W becomes
    W + (alpha/r)·A B (in float32, cast back to W's dtype)."""
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if key.endswith(LORA_SUFFIXES):
            continue
        a, b = (params.get(key + suffix) for suffix in LORA_SUFFIXES)
        if a is None:
            out[key] = merged(value, lora_rank, lora_alpha)
            continue
        # A (*layers, *in, r), B (*layers, r, *out) and W (*layers, *in, *out): A and B
        # hold the layer axes twice and r twice beyond W's axes.
        layers = a.ndim + b.ndim - value.ndim - 2
        lead = value.shape[:layers]
        delta = jnp.matmul(a.reshape(*lead, -1, lora_rank).astype(jnp.float32),
                           b.reshape(*lead, lora_rank, -1).astype(jnp.float32))
        out[key] = (value.astype(jnp.float32) + delta.reshape(value.shape)
                    * (lora_alpha / lora_rank)).astype(value.dtype)
    return out
