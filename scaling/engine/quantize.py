"""`--quantize=int8`: a transformer served with int8 kernels and one scale per output channel.

Weight-only and symmetric (`scaling.models.quantized`): activations, norms, biases and the KV
cache keep their dtypes (`--kv_cache_dtype=int8` quantizes the cache, separately). These
kernels become int8: the query, key, value and output projections of every attention layer,
the three kernels of every MLP, the untied output projection, and the embedding table, with
one scale per vocabulary row, which is the logits' output channel when the table is tied and
costs its rows' lookup one multiply. Left in float, the table alone would keep a small
model's weights over a third of their float bytes.

The params are quantized once, on the devices, after loading and before the engine compiles
anything. The int8 values are placed exactly as the float kernel was (the model's logical
axis names through the mesh rules), and each scale is split like its kernel's output axes and
whole along the contracted ones, so tensor-parallel serving splits values and scales alike
and no step gathers either.

Why not Qwix (Google's JAX quantization library; 0.1.8 tried with this jax and flax): its
post-training mode intercepts `jax.lax.dot_general`, `jnp.einsum` and `jnp.dot` inside
`__call__` and traces each operand back to the param it came from. On this model's modules
that fails three ways, each checked on a one-kernel Linen module. A kernel used as `x @ w`
(the dense layers here, `transformer.dense`) is left float without a word: `jnp.matmul` is
not intercepted. A kernel reshaped before its matmul (the attention's (D, H, Dh) as
(D, H·Dh)) is quantized and stored in the compute shape, so the param no longer has the
checkpoint's shape or the logical axis names its sharding comes from. And a kernel cast
before use, as `transformer._param` casts every kernel to the compute dtype, fails inside
Qwix (`update_boxed: Unsupported type QArray`). On the whole transformer it quantized the
untied output projection and no other kernel before failing in that cast. Making it fit would
mean rewriting every matmul of the model for the library; the form here needs two
duck-typed methods (`astype`, `take`) and changes nothing of the model's matmuls, param
layout or sharding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from scaling.errors import UserError
from scaling.models.axes import LAYERS
from scaling.models.quantized import Int8Weight, quantize_int8

METHODS = ("none", "int8")

# The transformer's kernels by param name, each with the axes its matmul contracts (counted
# after a scanned model's leading `layers` axis). Query, key and value (D, N, Dh) contract D;
# the attention output (H, Dh, D) contracts H and Dh; the MLP kernels and the untied output
# projection are (in, out); the embedding table (V, D) meets the final states over D. A
# param not named here (norm scales, biases) stays float.
CONTRACTED_AXES = {"query": (0,), "key": (0,), "value": (0,), "out": (0, 1),
                   "gate": (0,), "up": (0,), "down": (0,), "output": (0,), "embedding": (1,)}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"--quantize={method}: expected one of {', '.join(METHODS)} "
                        "(int8: weight-only, a scale per output channel)")


def quantize_params(model: nn.Module, params: Any, mesh: jax.sharding.Mesh, rules: tuple,
                    method: str) -> Any:
    """`params` (of `model`, without adapters) with the kernels of `CONTRACTED_AXES` as
    `Int8Weight`s, placed on `mesh` by `rules`; "none" returns them as they are.

    The float tree is not donated: it stays valid until the caller drops it."""
    check_method(method)
    if method == "none":
        return params
    params = nn.meta.unbox(params)
    names = _logical_names(model)
    contracted, shardings = {}, {}
    for path, leaf in flax.traverse_util.flatten_dict(params).items():
        if path not in names:
            raise ValueError(f"param {'/'.join(map(str, path))} is not one of the model's")
        axes = names[path]
        sharding = nn.logical_to_mesh_sharding(PartitionSpec(*axes), mesh, rules)
        if path[-1] in CONTRACTED_AXES and jnp.issubdtype(leaf.dtype, jnp.floating):
            first = 1 if axes and axes[0] == LAYERS else 0
            contracted[path] = tuple(first + axis for axis in CONTRACTED_AXES[path[-1]])
            scale_axes = [None if i in contracted[path] else a for i, a in enumerate(axes)]
            sharding = Int8Weight(sharding, nn.logical_to_mesh_sharding(
                PartitionSpec(*scale_axes), mesh, rules))
        shardings[path] = sharding

    def convert(params):
        flat = flax.traverse_util.flatten_dict(params)
        return flax.traverse_util.unflatten_dict({
            path: quantize_int8(w, contracted[path]) if path in contracted else w
            for path, w in flat.items()})

    return jax.jit(convert, out_shardings=flax.traverse_util.unflatten_dict(shardings))(params)


def _logical_names(model: nn.Module) -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """Each param's logical axis names, by path, from an abstract init of the model. The
    init runs plain einsum attention: the params are the same for every attention form, and
    a kernel such as splash refuses the one-token sequence traced here."""
    plain = model.clone(config=dataclasses.replace(model.config, attention="grouped_einsum"))
    boxed = jax.eval_shape(lambda: plain.init(jax.random.key(0),
                                              jnp.zeros((1, 1), jnp.int32))["params"])
    specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    return {path: tuple(spec) for path, spec in specs.items()}


def weight_bytes(params: Any) -> int:
    """Bytes of a params tree over all its devices' shards counted once: float or int8
    values with their scales."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(nn.meta.unbox(params)))


def describe(method: str, held: int, loaded: int) -> str:
    """The start-up line: the bytes the engine holds, against the bytes loaded."""
    kind = ("float, as loaded" if method == "none"
            else f"{method} kernels with a scale per output channel")
    return (f"weights: {held:,} bytes ({kind}; {held / loaded:.3f}x the {loaded:,} bytes "
            "loaded)")
