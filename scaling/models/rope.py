"""Rotary position embeddings (RoPE), with the llama3 stretch for long-context checkpoints.

Queries and keys are rotated by angles that grow with position, so their dot product sees
only the offset between them. Split out of `scaling.models.transformer` so the model file
holds the model; the paged cache (`scaling.models.paged`) stores keys already rotated, each
at the position it was written at. Shape suffixes as in `scaling.models.transformer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALINGS = ("none", "llama3")


def rope_frequencies(config) -> np.ndarray:
    """The rotation rate of each pair (Dh/2 of them, float32), theta^(-i/(Dh/2)) for pair i,
    from a `TransformerConfig`'s rope fields.

    `rope_scaling=llama3` (Llama 3.1 and 3.2) stretches them for a longer context than the
    model was first trained at: pairs whose wavelength exceeds original/low_freq_factor turn
    `rope_scaling_factor` times slower, those under original/high_freq_factor are kept, and
    the band between moves smoothly from one to the other.
    """
    c = config
    half = c.head_dim // 2
    inv_freq = c.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
    if c.rope_scaling == "llama3":
        wavelength = 2 * np.pi / inv_freq
        original = c.rope_original_max_len
        low, high = c.rope_low_freq_factor, c.rope_high_freq_factor
        slowed = inv_freq / c.rope_scaling_factor
        blend = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
        inv_freq = (1 - blend) * slowed + blend * inv_freq
    return inv_freq.astype(np.float32)


def apply_rope(x_BLHDh: jax.Array, positions_BL: jax.Array,
               inv_freq: float | np.ndarray) -> jax.Array:
    """Rotates pairs (i, i + Dh/2) by position-dependent angles, so q·k sees only offsets.

    `inv_freq` is each pair's rate (`rope_frequencies`), or a bare theta for the unscaled
    rates."""
    half = x_BLHDh.shape[-1] // 2
    if np.ndim(inv_freq) == 0:
        inv_freq = float(inv_freq) ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BL1h = (positions_BL.astype(jnp.float32)[:, :, None] * inv_freq)[:, :, None, :]
    sin, cos = jnp.sin(angle_BL1h), jnp.cos(angle_BL1h)
    x1, x2 = jnp.split(x_BLHDh.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BLHDh.dtype)
