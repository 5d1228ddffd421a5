"""Which attention runs where: `model.attention` resolved for the platform and the config.

`auto` picks the fused kernel a platform has (Pallas splash on TPU, in
`scaling.models.tpu_attention`; cuDNN on GPU, in `scaling.models.gpu_attention`) where the
config suits it, else the portable `grouped_einsum`; an explicit kernel the platform or
config cannot run is a user error, found before anything compiles. The choice sits in its own
module, above the kernels and the written forms of `scaling.models.attention` and below the
model, because it asks `gpu_attention` what cuDNN takes while `gpu_attention` uses the masks.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from scaling.errors import UserError
from scaling.models import gpu_attention
from scaling.models.attention import ATTENTION_FORMS

# `model.attention`: a written form (`ATTENTION_FORMS`), the TPU kernel, or auto (one per platform).
ATTENTION_CHOICES = ("auto", *ATTENTION_FORMS, "splash", "cudnn")
SPLASH_LANES = 128  # the splash kernel's sequence lengths are multiples of this


def choose_attention(choice: str, platform: str | None, seq_len: int | None,
                     dtype: Any = jnp.float32, head_dim: int | None = None) -> str:
    """`model.attention` for the devices the model runs on.

    `auto` takes a fused kernel where the platform has one and the config suits it: Pallas
    splash on TPU (a training length that is a multiple of 128), cuDNN on GPU (bfloat16 or
    float16, heads of at most 128); elsewhere `grouped_einsum`. `batched_matmul`, faster on a
    CPU, is chosen by the CPU experiments themselves. An explicit kernel that the platform or
    config cannot run is a user error. A mesh that is only a shape (`platform` None) keeps
    the portable form.
    """
    fits_splash = seq_len is None or seq_len % SPLASH_LANES == 0
    fits_cudnn = gpu_attention.usable(dtype, head_dim)
    if choice == "auto":
        if platform == "tpu" and fits_splash:
            return "splash"
        if platform == "gpu" and fits_cudnn:
            return "cudnn"
        return "grouped_einsum"
    kernel_platform = {"splash": "tpu", "cudnn": "gpu"}.get(choice)
    if kernel_platform is None:
        return choice
    if platform not in (kernel_platform, None):
        raise UserError(f"--config.model.attention={choice} runs on {kernel_platform.upper()} "
                        f"only; these devices are {platform}: use auto, grouped_einsum or "
                        f"batched_matmul")
    if choice == "splash" and not fits_splash:
        raise UserError(f"--config.model.attention=splash needs --config.data.seq_len "
                        f"to be a multiple of {SPLASH_LANES}, not {seq_len}")
    if choice == "cudnn" and not fits_cudnn:
        raise UserError(f"--config.model.attention=cudnn needs --config.model.dtype bfloat16 "
                        f"or float16 (not {jnp.dtype(dtype).name}) and --config.model.head_dim "
                        f"a multiple of 8 up to {gpu_attention.CUDNN_MAX_HEAD_DIM} "
                        f"(not {head_dim})")
    return "grouped_einsum" if platform is None else choice
