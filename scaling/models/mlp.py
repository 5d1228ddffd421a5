"""A multilayer perceptron classifier: the founding document's model.

Kernels alternate between (embed, mlp) and (mlp, embed) so tensor parallelism splits the
hidden units of one layer and the inputs of the next, Megatron style, with no resharding in
between. Only logical axis names appear here; the config's rules map them to the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    hidden_sizes: Sequence[int]
    num_classes: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train  # no dropout or batch statistics in this model
        x = x.reshape((x.shape[0], -1))
        axes = ("embed", "mlp")
        for i, width in enumerate(self.hidden_sizes):
            x = self._dense(width, axes, f"hidden_{i}")(x)
            x = nn.relu(x)
            axes = axes[::-1]
        return self._dense(self.num_classes, (axes[0], "classes"), "logits")(x)

    def _dense(self, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
        return nn.Dense(
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))
