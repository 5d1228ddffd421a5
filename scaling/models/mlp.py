"""A multilayer perceptron classifier: the founding document's model.

Kernels alternate between (embed, mlp) and (mlp, embed) so tensor parallelism splits the
hidden units of one layer and the inputs of the next, Megatron style, with no resharding in
between. Only logical axis names appear here; the config's rules map them to the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from scaling.models import axes, formulas


class MLP(nn.Module):
    hidden_sizes: Sequence[int]
    num_classes: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train  # no dropout or batch statistics in this model
        x = x.reshape((x.shape[0], -1))
        names = (axes.EMBED, axes.MLP)
        for i, width in enumerate(self.hidden_sizes):
            x = self._dense(width, names, f"hidden_{i}")(x)
            x = nn.relu(x)
            names = names[::-1]
        return self._dense(self.num_classes, (names[0], axes.CLASSES), "logits")(x)

    def _dense(self, features: int, names: tuple[str, str], name: str) -> nn.Dense:
        return nn.Dense(
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]))


def flops_per_example(model: MLP, config: ml_collections.ConfigDict, params) -> float:
    """Every kernel is applied once per example, so the dense-layer count is exact."""
    del model, config
    return formulas.dense_flops_per_example(params)


def collective_bytes(model: MLP, config: ml_collections.ConfigDict,
                     layout: formulas.StepLayout) -> dict[str, float] | None:
    """Data parallelism and FSDP by the textbook formulas (no scanned layers).

    Under tensor parallelism the hidden activations are reduced too, and that term has not
    been measured against XLA for this model, so there is no formula rather than a guess.
    """
    if any("tensor" in p.mesh_axes for p in layout.params):
        return None
    return formulas.parameter_collectives(
        layout, compute_itemsize=jnp.dtype(model.dtype).itemsize,
        microbatches=config.grad_accum_steps)
