"""Kernels held as int8 values with one float scale per output channel (weight-only, symmetric).

`Int8Weight` is how a quantized kernel sits in a Linen params tree. The transformer reads
every kernel through `.astype(compute dtype)` (`transformer._param`) and its embedding table
through `.take(ids, axis=0)`; an `Int8Weight` answers both with float values, so a quantized
tree goes into `model.apply` where the float tree went and the model code does not branch on
it. Each layer dequantizes its own kernels just before the matmul that reads them. Where XLA
fuses the int8-to-float conversion into the matmul's operand read (its GPU and TPU backends
can), a decode step, which is bound by the bytes of weights it reads, reads a quarter of
float32's. On a CPU the conversion is expected to run apart from the matmul, so int8 weights
save memory there rather than time (neither measured on an accelerator here).

Which axes a scale spans is the caller's choice (`scaling.engine.quantize` holds the
transformer's table): a channel is one index of the axes the kernel's matmul does not
contract, so every output unit (a head's unit, a hidden unit, a vocabulary entry) keeps its
own resolution however small its weights are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

INT8_MAX = 127  # symmetric: -127..127, so 0 is exact and no code is spent on -128


def quantize_int8(w: jax.Array, contracted_axes: Sequence[int]) -> Int8Weight:
    """`w` as int8 values and a scale that keeps size 1 on `contracted_axes`.

    Each channel's largest magnitude maps to 127, so rounding moves a weight by at most half
    a step, 1/254 of its channel's largest magnitude. The scale is stored in `w`'s dtype and
    the values are rounded against that stored scale, so a bfloat16 scale's own rounding is
    not added to the values'. An all-zero channel gets scale 1."""
    w32 = w.astype(jnp.float32)
    largest = jnp.abs(w32).max(axis=tuple(contracted_axes), keepdims=True)
    scale = jnp.where(largest > 0, largest / INT8_MAX, 1.0).astype(w.dtype)
    values = jnp.clip(jnp.round(w32 / scale.astype(jnp.float32)), -INT8_MAX, INT8_MAX)
    return Int8Weight(values.astype(jnp.int8), scale)


@flax.struct.dataclass
class Int8Weight:
    """A kernel as int8 `values` (the kernel's shape) and a float `scale` (size 1 on the
    contracted axes). The values come first among the leaves, so Flax's check of a param's
    shape against its initializer sees the kernel's shape."""

    values: Any
    scale: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self):
        """The float dtype the kernel stands for."""
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scale.nbytes

    def astype(self, dtype) -> jax.Array:
        """The float kernel in `dtype`."""
        return self.values.astype(dtype) * self.scale.astype(dtype)

    def take(self, indices: jax.Array, axis: int = 0) -> jax.Array:
        """Rows of a table whose scale is per row (the embedding's): only the rows gathered
        are dequantized, in the scale's dtype, as `jnp.take` of the float table gives."""
        if self.scale.shape[axis] != self.values.shape[axis]:
            raise ValueError(f"take along axis {axis}: the scale {self.scale.shape} is not "
                             f"per index of that axis of {self.values.shape}")
        values = jnp.take(self.values, indices, axis=axis)
        scale = jnp.take(self.scale, indices, axis=axis)
        return values.astype(self.dtype) * scale
