"""A decoder-only transformer language model: pre-norm, RoPE, grouped-query attention, SwiGLU.

Shape suffixes name the axes of every array, nanodo style, so a reader can check each einsum
without running it:

    B  batch                     H   query heads
    L  sequence length (queries) K   key/value heads (K divides H)
    S  key/value length          G   query heads per key/value head (H // K)
    D  embedding width           Dh  width of one head
    F  MLP hidden width          V   vocabulary
                                 M   the queries of one key/value head (G·L)

S is L in a training pass and `max_seq_len` when decoding against the KV cache.

T is B·L, the tokens of a batch flattened. Dense layers run as (T, in) @ (in, out) matmuls so
that their weight gradients contract a single axis: XLA:CPU lowers the two-axis ("bl")
contraction of an einsum's weight gradient through a strided transpose that cost 40% of a
training step, for the same arithmetic. A sequence split over devices (context parallelism)
keeps the einsum instead: B·L is not one sharded axis when both B and L are split, so the
flattening would gather every layer's activations whole (2 GiB of them per matmul for a
32k-token `lm_8b`).

Only logical axis names appear here (batch, seq, embed, residual, heads, kv, mlp, vocab,
layers, from `scaling.models.axes`); the config's rules map them to mesh axes. Key and value
projections name their head axis `heads` too, so a rule that splits `heads` over a mesh axis
must divide K as well as H.

The layers are one `Block` scanned `num_layers` times, so the compiled program holds one
layer body whatever the depth, and every layer parameter has a leading `layers` axis.
`scan_unroll` layers run per loop iteration; unrolling all of them keeps that parameter layout
but drops the loop, whose per-layer stacking of saved activations (a dynamic-update-slice per
residual, and zeroed buffers for them every step) made a small model's training step on
XLA:CPU 1.3x slower. Unrolled, compile time grows with depth and, under FSDP, XLA may keep
every layer's gathered parameters from the forward pass to the backward instead of gathering
them again, so large models keep the loop.

The attention core (`attention`) is the Pallas splash kernel on TPU (`splash`, in
`scaling.models.tpu_attention`), cuDNN's fused kernel on GPU (`cudnn`, in
`scaling.models.gpu_attention`), both of which `auto` picks on their platform, or one of two
written forms:
`grouped_einsum`, which XLA lays out best on GPU, and `batched_matmul` with a hand-written
backward, which keeps XLA:CPU's products in its fast matmul library; that CPU-only trick lives
in `scaling.models.cpu_attention`. Decoding with the KV cache always uses a written form.
The written forms and their masks live in `scaling.models.attention`.

A row may pack several documents (`segment_ids_BL` numbers them 1, 2, ... from the row's start;
0 is padding). Each token then attends only to earlier tokens of its own document and takes its
rotary position from `positions_BL`, which restarts at 0 with each document, so every
document's logits are those it would have alone.

Parameters live in `param_dtype`; matmuls run in `dtype`; norms, rotary angles, softmax and
logits run in float32 because they lose the most precision in bfloat16.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scaling.errors import UserError
from scaling.models import context, formulas, gpu_attention, paged
from scaling.models.attention import (
    ATTENTION_FORMS,
    causal_mask,
    chunked_einsum_attention,
    segment_mask,
)
from scaling.models.axes import (
    BATCH,
    EMBED,
    HEADS,
    KV,
    LAYERS,
    MLP,
    RESIDUAL,
    SEQ,
    VOCAB,
    constrain,
)
from scaling.models.tiled_loss import Projection

REMAT_POLICIES = {
    "none": None,  # no remat at all
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Hyperparameters of `Transformer`; frozen so a module holding it stays hashable."""

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    rope_theta: float = 10_000.0
    rope_scaling: str = "none"  # ROPE_SCALINGS: how long-context checkpoints stretch RoPE
    rope_scaling_factor: float = 8.0  # llama3: the factor the low frequencies are divided by
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths past original/low are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths under original/high are kept
    rope_original_max_len: int = 8192  # llama3: the context the model was first trained at
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    lora_rank: int = 0  # > 0: low-rank adapters beside every attention and MLP kernel
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    tie_embeddings: bool = True
    dtype: Any = jnp.float32  # compute dtype of matmuls and activations
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"
    norm_eps: float = 1e-6
    scan_layers: bool = True
    scan_unroll: int = 1  # layers per iteration of the scanned loop; num_layers removes it
    attention: str = "auto"  # ATTENTION_CHOICES; auto unresolved (no platform) is grouped_einsum
    loss_chunk: int = 0  # > 0: return a tiled_loss.Projection, logits made this many at a time
    query_chunk: int = 0  # > 0: grouped_einsum makes the scores of this many queries at a time
    splash_block: int = 0  # > 0: the splash kernel's square block; 0: its default

    def __post_init__(self):
        # Experiment files may spell dtypes as strings; normalise so equal configs hash equal.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if self.remat_policy not in REMAT_POLICIES:
            raise UserError(f"remat_policy={self.remat_policy!r}: expected one of "
                            f"{', '.join(REMAT_POLICIES)}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise UserError(f"num_kv_heads={self.num_kv_heads} must divide "
                            f"num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise UserError(f"rope_scaling={self.rope_scaling!r}: expected one of "
                            f"{', '.join(ROPE_SCALINGS)}")
        if self.rope_scaling == "llama3" and not (
                self.rope_scaling_factor > 0 and self.rope_original_max_len > 0
                and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise UserError("rope_scaling=llama3 needs rope_scaling_factor > 0, "
                            "rope_original_max_len > 0 and 0 < rope_low_freq_factor < "
                            "rope_high_freq_factor")
        if self.attention not in ATTENTION_CHOICES:
            raise UserError(f"attention={self.attention!r}: expected one of "
                            f"{', '.join(ATTENTION_CHOICES)}")
        if self.loss_chunk < 0 or self.loss_chunk > self.max_seq_len:
            raise UserError(f"loss_chunk={self.loss_chunk}: positions per chunk of the tiled "
                            f"loss, from 1 to max_seq_len={self.max_seq_len}; 0 turns it off")
        if self.query_chunk < 0 or self.query_chunk > self.max_seq_len:
            raise UserError(f"query_chunk={self.query_chunk}: queries per block of the "
                            f"grouped_einsum attention, from 1 to max_seq_len="
                            f"{self.max_seq_len}; 0 makes every score at once")
        if self.splash_block < 0 or self.splash_block % SPLASH_LANES:
            raise UserError(f"splash_block={self.splash_block}: positions per block of the "
                            f"splash kernel, a multiple of {SPLASH_LANES}; 0 picks one")
        if self.lora_rank < 0:
            raise UserError(f"lora_rank={self.lora_rank}: the adapters' rank; 0 turns them off")
        if self.scan_unroll < 1:
            raise UserError(f"scan_unroll={self.scan_unroll}: must be at least 1 (layers per "
                            f"loop iteration; {self.num_layers} unrolls every layer)")


def _param(module: nn.Module, name: str, init: nn.initializers.Initializer,
           shape: tuple[int, ...], names: tuple[str, ...]) -> jax.Array:
    """A parameter in param_dtype, named logically, cast to the compute dtype for use."""
    config = module.config
    value = module.param(name, nn.with_logical_partitioning(init, names), shape,
                         config.param_dtype)
    return value.astype(config.dtype)


def dense(x_BLN: jax.Array, w_NM: jax.Array, flatten: bool) -> jax.Array:
    """x (B, L, N) @ w (N, M) over the last axis: as one (B·L, N) matmul when `flatten` (the
    CPU's fast path, see the module docstring), else as an einsum that keeps L's sharding."""
    B, L, N = x_BLN.shape
    if flatten:
        return (x_BLN.reshape(B * L, N) @ w_NM).reshape(B, L, w_NM.shape[1])
    return jnp.einsum("bln,nm->blm", x_BLN, w_NM)


LORA_SUFFIXES = ("_lora_a", "_lora_b")  # the adapter params of a kernel named `name`


def lora_delta(module: nn.Module, name: str, x_BLN: jax.Array,
               a_shape: tuple[int, ...], a_names: tuple[str | None, ...],
               b_shape: tuple[int, ...], b_names: tuple[str | None, ...],
               flatten: bool) -> jax.Array:
    """LoRA's update to the output of kernel `name`: (alpha/r)·(x A) B, with A (in, r) of
    fan-in init and B (r, out) of zeros, so training starts from the kernel's own output.
    The kernel is never changed; `scaling.models.lora` folds A B into it on export."""
    c = module.config
    a = _param(module, name + LORA_SUFFIXES[0],
               _fan_in_init(tuple(range(len(a_shape) - 1)), len(a_shape) - 1), a_shape, a_names)
    b = _param(module, name + LORA_SUFFIXES[1], nn.initializers.zeros, b_shape, b_names)
    low_BLr = dense(x_BLN, a.reshape(-1, c.lora_rank), flatten)
    return dense(low_BLr, b.reshape(c.lora_rank, -1), flatten) * (c.lora_alpha / c.lora_rank)


def _fan_in_init(in_axis: int | tuple[int, ...],
                 out_axis: int | tuple[int, ...]) -> nn.initializers.Initializer:
    # LeCun normal over multi-axis kernels: fan-in is the contracted axes (D, or H·Dh).
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
                             (x_BLD.shape[-1],), self.config.param_dtype)
        x = x_BLD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.config.norm_eps)
        return (x * scale_D.astype(jnp.float32)).astype(self.config.dtype)


ROPE_SCALINGS = ("none", "llama3")


def rope_frequencies(config: TransformerConfig) -> np.ndarray:
    """The rotation rate of each pair (Dh/2 of them, float32), theta^(-i/(Dh/2)) for pair i.

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


class Attention(nn.Module):
    """Causal grouped-query attention with an optional KV cache (the flax lm1b pattern),
    kept within each packed document when given segment ids.

    With `seq_shards` > 1 the sequence arrives reordered and split for context parallelism
    (`scaling.models.context`): keys and values are gathered whole and put back in order,
    and each query is masked by its original slot.
    """

    config: TransformerConfig
    decode: bool = False
    seq_shards: int = 1

    @nn.compact
    def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array | None,
                 segment_ids_BL: jax.Array | None = None,
                 paged_batch: paged.PagedBatch | None = None,
                 pool: paged.Pool | None = None, layer=None):
        """(B, L, D) outputs; with a paged batch, the outputs and the pool with this layer's
        new keys and values written (`layer` numbers this layer in the pool)."""
        c = self.config
        B, L, D = x_BLD.shape
        H, K, Dh = c.num_heads, c.num_kv_heads, c.head_dim
        qkv_init = _fan_in_init(0, (1, 2))
        w_DHDh = _param(self, "query", qkv_init, (D, H, Dh), (EMBED, HEADS, KV))
        wk_DKDh = _param(self, "key", qkv_init, (D, K, Dh), (EMBED, HEADS, KV))
        wv_DKDh = _param(self, "value", qkv_init, (D, K, Dh), (EMBED, HEADS, KV))
        w_HDhD = _param(self, "out", _fan_in_init((0, 1), 2), (H, Dh, D),
                        (HEADS, KV, EMBED))

        names = (BATCH, SEQ, HEADS, KV)
        flatten = self.seq_shards == 1

        def project(w_DNDh, name):
            N = w_DNDh.shape[1]
            y_BLNe = dense(x_BLD, w_DNDh.reshape(D, N * Dh), flatten)
            if c.lora_rank:
                y_BLNe = y_BLNe + lora_delta(self, name, x_BLD, (D, c.lora_rank),
                                             (EMBED, None), (c.lora_rank, N, Dh),
                                             (None, HEADS, KV), flatten)
            y_BLNDh = y_BLNe.reshape(B, L, N, Dh)
            if c.qkv_bias:
                y_BLNDh = y_BLNDh + _param(self, f"{name}_bias", nn.initializers.zeros,
                                           (N, Dh), (HEADS, KV))
            return constrain(y_BLNDh, names)

        q_BLHDh = project(w_DHDh, "query")
        k_BLKDh, v_BLKDh = project(wk_DKDh, "key"), project(wv_DKDh, "value")
        if paged_batch is not None:
            out_BLHDh, pool = self._paged_attention(q_BLHDh, k_BLKDh, v_BLKDh, paged_batch,
                                                    pool, layer)
            return self._output(out_BLHDh, w_HDhD, flatten), pool

        # Slots index the key/value sequence: causality compares slots, RoPE uses positions.
        cache = self._cache_variables(B) if self.decode else None
        initialized = cache is not None and cache.initialized
        start = cache.index.value if initialized else 0
        q_slot_L = start + jnp.arange(L)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(q_slot_L, (B, L))
        inv_freq = rope_frequencies(c)
        q_BLHDh = apply_rope(q_BLHDh, positions_BL, inv_freq)
        k_BLKDh = apply_rope(k_BLKDh, positions_BL, inv_freq)

        if initialized:
            # The cache holds rotated keys, so each key keeps the position it was written at.
            # Slots past the new tokens hold zeros and are masked out below. Writing past
            # max_seq_len cannot raise under jit: dynamic_update_slice clamps the start.
            for variable, new_BLKDh in ((cache.key, k_BLKDh), (cache.value, v_BLKDh)):
                variable.value = jax.lax.dynamic_update_slice(
                    variable.value, new_BLKDh.astype(variable.value.dtype), (0, start, 0, 0))
            cache.index.value = start + L
            k_BSKDh, v_BSKDh = cache.key.value, cache.value.value
        else:
            # A training pass, or the init that creates the cache (which must not write it).
            k_BSKDh, v_BSKDh = k_BLKDh, v_BLKDh
        kv_segment_ids_BS = segment_ids_BL
        if self.seq_shards > 1:  # a training pass, reordered: S is L
            q_slot_L = jnp.asarray(context.balanced_order(L, self.seq_shards))
            inverse = context.inverse_order(L, self.seq_shards)
            whole = (BATCH, None, HEADS, KV)  # all-gathered over the sequence's devices
            k_BSKDh = constrain(k_BSKDh, whole)[:, inverse]
            v_BSKDh = constrain(v_BSKDh, whole)[:, inverse]
            if segment_ids_BL is not None:
                kv_segment_ids_BS = segment_ids_BL[:, inverse]

        if c.attention == "splash" and not self.decode:  # a training pass: S is L
            from scaling.models import tpu_attention  # Pallas: 0.35 s to import, TPU only

            out_BLHDh = tpu_attention.sharded_splash_attention(
                q_BLHDh, k_BSKDh, v_BSKDh, segment_ids_BL, kv_segment_ids_BS,
                seq_shards=self.seq_shards, block=c.splash_block)
        elif c.attention == "cudnn" and not self.decode:
            out_BLHDh = gpu_attention.cudnn_attention(
                q_BLHDh, k_BSKDh, v_BSKDh, segment_ids_BL, kv_segment_ids_BS,
                q_slot_L if self.seq_shards > 1 else None)
        else:
            if segment_ids_BL is None:  # one mask shared by every row
                mask_BLS = causal_mask(q_slot_L, k_BSKDh.shape[1])
            else:  # a training pass: S is L
                mask_BLS = segment_mask(segment_ids_BL, kv_segment_ids_BS, q_slot_L)
            # The KV cache keeps the portable form, whatever trains.
            form = c.attention if c.attention in ATTENTION_FORMS else "grouped_einsum"
            if form == "grouped_einsum" and c.query_chunk and L > c.query_chunk:
                out_BLHDh = chunked_einsum_attention(q_BLHDh, k_BSKDh, v_BSKDh, mask_BLS,
                                                     c.query_chunk)
            else:
                out_BLHDh = ATTENTION_FORMS[form](q_BLHDh, k_BSKDh, v_BSKDh, mask_BLS)
        return self._output(out_BLHDh, w_HDhD, flatten)

    def _output(self, out_BLHDh: jax.Array, w_HDhD: jax.Array, flatten: bool) -> jax.Array:
        """The heads' outputs projected back to the model width."""
        c = self.config
        B, L, H, Dh = out_BLHDh.shape
        D = w_HDhD.shape[-1]
        out_BLHDh = constrain(out_BLHDh, (BATCH, SEQ, HEADS, KV))
        out_BLe = out_BLHDh.reshape(B, L, H * Dh)
        y_BLD = dense(out_BLe, w_HDhD.reshape(H * Dh, D), flatten)
        if c.lora_rank:
            y_BLD = y_BLD + lora_delta(self, "out", out_BLe, (H, Dh, c.lora_rank),
                                       (HEADS, KV, None), (c.lora_rank, D), (None, EMBED),
                                       flatten)
        return y_BLD

    def _paged_attention(self, q_BLHDh: jax.Array, k_BLKDh: jax.Array, v_BLKDh: jax.Array,
                         batch: paged.PagedBatch, pool: paged.Pool, layer):
        """Attention against a paged KV cache (`scaling.models.paged`): the new keys and
        values are written into the pool at this layer's pages, then each row reads its
        blocks back."""
        c = self.config
        inv_freq = rope_frequencies(c)
        q_BLHDh = apply_rope(q_BLHDh, batch.positions_BL, inv_freq)
        k_BLKDh = apply_rope(k_BLKDh, batch.positions_BL, inv_freq)
        pool = paged.write(pool, layer, batch, k_BLKDh, v_BLKDh)
        if batch.tpu_kernel and not batch.kv_int8:
            from scaling.models import tpu_paged_attention  # Pallas: TPU only

            out_BHDh = tpu_paged_attention.paged_decode_attention(
                q_BLHDh[:, 0], pool.key, pool.value, batch.positions_BL[:, 0] + 1,
                layer * batch.num_blocks + batch.block_table_BM)
            return out_BHDh[:, None], pool
        return paged.attend(q_BLHDh, pool, layer, batch), pool

    def _cache_variables(self, B: int) -> _Cache:
        c = self.config
        initialized = self.has_variable("cache", "cached_key")
        shape = (B, c.max_seq_len, c.num_kv_heads, c.head_dim)
        zeros = nn.with_logical_partitioning(jnp.zeros, (BATCH, SEQ, HEADS, KV))
        return _Cache(
            initialized=initialized,
            key=self.variable("cache", "cached_key", zeros, shape, c.dtype),
            value=self.variable("cache", "cached_value", zeros, shape, c.dtype),
            index=self.variable("cache", "cache_index",
                                nn.with_logical_partitioning(jnp.zeros, ()), (), jnp.int32))


@dataclasses.dataclass
class _Cache:
    initialized: bool  # False during the init that creates the variables
    key: nn.Variable
    value: nn.Variable
    index: nn.Variable


class Mlp(nn.Module):
    """SwiGLU: a gated hidden layer, which beats a plain GELU MLP at equal FLOPs."""

    config: TransformerConfig
    seq_shards: int = 1  # devices the sequence is split over: see `dense`

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        c = self.config
        D, F = x_BLD.shape[-1], c.mlp_dim
        init = _fan_in_init(0, 1)
        gate_DF = _param(self, "gate", init, (D, F), (EMBED, MLP))
        up_DF = _param(self, "up", init, (D, F), (EMBED, MLP))
        down_FD = _param(self, "down", init, (F, D), (MLP, EMBED))
        names = (BATCH, SEQ, MLP)
        flatten = self.seq_shards == 1
        r = c.lora_rank

        def project(x_BLN, w_NM, name, in_name, out_name):
            y_BLM = dense(x_BLN, w_NM, flatten)
            if r:
                y_BLM = y_BLM + lora_delta(self, name, x_BLN, (w_NM.shape[0], r),
                                           (in_name, None), (r, w_NM.shape[1]),
                                           (None, out_name), flatten)
            return y_BLM

        gate_BLF = constrain(project(x_BLD, gate_DF, "gate", EMBED, MLP), names)
        up_BLF = constrain(project(x_BLD, up_DF, "up", EMBED, MLP), names)
        return project(nn.silu(gate_BLF) * up_BLF, down_FD, "down", MLP, EMBED)


class Block(nn.Module):
    """One pre-norm layer; its (carry, None) signature is what nn.scan needs.

    The residual stream it carries is named (batch, seq, residual). Splitting `residual` (over
    tensor, say) keeps the stream between layers, which full remat saves for every layer,
    at 1/n of its size a device; each layer gathers it where a matmul needs the whole width,
    and its output all-reduces become reduce-scatters.
    """

    config: TransformerConfig
    decode: bool = False
    seq_shards: int = 1  # devices the sequence is split over (context parallelism)

    @nn.compact
    def __call__(self, carry, positions_BL: jax.Array | None, segment_ids_BL: jax.Array | None,
                 paged_batch: paged.PagedBatch | None = None, layer=None) -> tuple[Any, None]:
        """The carry is the stream x_BLD, or (x_BLD, pool) with a paged batch: the pool
        travels with the stream so each layer updates it in place."""
        names = (BATCH, SEQ, RESIDUAL)
        x_BLD, pool = carry if paged_batch is not None else (carry, None)
        h_BLD = RMSNorm(self.config, name="attention_norm")(x_BLD)
        attention = Attention(self.config, self.decode, self.seq_shards, name="attention")
        if paged_batch is not None:
            y_BLD, pool = attention(h_BLD, positions_BL, segment_ids_BL, paged_batch, pool,
                                    layer)
        else:
            y_BLD = attention(h_BLD, positions_BL, segment_ids_BL)
        x_BLD = constrain(x_BLD + y_BLD, names)
        h_BLD = RMSNorm(self.config, name="mlp_norm")(x_BLD)
        x_BLD = constrain(x_BLD + Mlp(self.config, self.seq_shards, name="mlp")(h_BLD), names)
        return ((x_BLD, pool) if paged_batch is not None else x_BLD), None


class Transformer(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens_BL: jax.Array, *, train: bool = False, decode: bool = False,
                 positions_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None,
                 paged_batch: paged.PagedBatch | None = None) -> jax.Array:
        """Float32 logits (B, L, V) for next-token prediction.

        With `decode=True`, apply with `mutable=["cache"]` and a cache from `init_cache`: the
        L new tokens are attended against everything cached so far, written at the cache
        index, and the index advances by L. `positions_BL` overrides the rotary positions
        (they default to the tokens' slots, 0..L-1, or index..index+L-1 when decoding);
        causal masking always follows the slots.

        `segment_ids_BL` marks the documents packed into each row (1, 2, ... ; 0 is padding)
        and keeps attention within each document (see `segment_mask`); pass the positions
        within each document as `positions_BL` too, or later documents are rotated as if
        they continued the earlier ones. Decoding serves one sequence per row, so the KV
        cache does not take segments.

        With `paged_batch` (a serving engine's step, `scaling.models.paged`), apply with
        `mutable=["cache"]` and the engine's pools: the tokens are written into the paged
        cache at the batch's slots, rotated by its positions, and only the logits of each
        row's `logit_index_B` token are made, (B, 1, V) (or of its L' tokens when the index
        is (B, L'), (B, L', V)).
        """
        del train  # no dropout in this model
        if decode and segment_ids_BL is not None:
            raise ValueError("segment_ids_BL with decode=True: the KV cache holds one "
                             "sequence per row, so decode without segment ids")
        c = self.config
        # Context parallelism: a split sequence is reordered to balance causal attention
        # (`scaling.models.context`); the outputs come back in the callers' order.
        L = tokens_BL.shape[1]
        seq_shards = 1 if decode or paged_batch is not None else context.sequence_shards()
        if paged_batch is not None:
            positions_BL = paged_batch.positions_BL
        if seq_shards > 1:
            order = context.balanced_order(L, seq_shards)
            if positions_BL is None:
                positions_BL = jnp.broadcast_to(jnp.arange(L), tokens_BL.shape)
            tokens_BL, positions_BL = tokens_BL[:, order], positions_BL[:, order]
            if segment_ids_BL is not None:
                segment_ids_BL = segment_ids_BL[:, order]
        embedding_VD = self.param(
            "embedding", nn.with_logical_partitioning(nn.linear.default_embed_init,
                                                      (VOCAB, EMBED)),
            (c.vocab_size, c.embed_dim), c.param_dtype)
        # Gather before casting, so bfloat16 compute never copies the whole table.
        x_BLD = jnp.take(embedding_VD, tokens_BL, axis=0).astype(c.dtype)
        x_BLD = constrain(x_BLD, (BATCH, SEQ, RESIDUAL))

        layer = Block
        policy = REMAT_POLICIES[c.remat_policy]
        unroll = min(c.scan_unroll, c.num_layers)
        if c.remat_policy != "none":
            # A rolled loop already stops XLA from merging the recomputation away.
            layer = nn.remat(Block, policy=policy,
                             prevent_cse=not c.scan_layers or unroll > 1)
        pool = self._paged_pool(paged_batch) if paged_batch is not None else None
        carry = x_BLD if pool is None else (x_BLD, jax.tree.map(
            lambda variable: variable.value, pool, is_leaf=_is_variable))
        if c.scan_layers:
            stack = nn.scan(layer, variable_axes={"params": 0, "cache": 0},
                            split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                            length=c.num_layers, unroll=unroll,
                            metadata_params={nn.PARTITION_NAME: LAYERS})
            layer_numbers = None if pool is None else jnp.arange(c.num_layers)
            carry, _ = stack(c, decode, seq_shards, name="layers")(
                carry, positions_BL, segment_ids_BL, paged_batch, layer_numbers)
        else:
            for i in range(c.num_layers):
                carry, _ = layer(c, decode, seq_shards, name=f"layers_{i}")(
                    carry, positions_BL, segment_ids_BL, paged_batch, i)
        x_BLD = carry
        if pool is not None:
            x_BLD, written = carry
            jax.tree.map(lambda variable, value: setattr(variable, "value", value), pool,
                         written, is_leaf=_is_variable)

        if paged_batch is not None:  # a serving step needs one token's logits per row
            index = paged_batch.logit_index_B  # (B,), or (B, L') for several tokens a row
            index_BL = index[:, None] if index.ndim == 1 else index
            x_BLD = jnp.take_along_axis(x_BLD, index_BL[:, :, None], axis=1)
        x_BLD = RMSNorm(c, name="final_norm")(x_BLD)
        if c.loss_chunk and not decode and paged_batch is None:
            return self._projection(x_BLD, embedding_VD, seq_shards)
        if c.tie_embeddings:
            logits_BLV = jnp.einsum("bld,vd->blv", x_BLD, embedding_VD.astype(c.dtype),
                                    preferred_element_type=jnp.float32)
        else:
            output_DV = _param(self, "output", _fan_in_init(0, 1), (c.embed_dim, c.vocab_size),
                               (EMBED, VOCAB))
            logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, output_DV,
                                    preferred_element_type=jnp.float32)
        if seq_shards > 1:
            logits_BLV = logits_BLV[:, context.inverse_order(L, seq_shards)]
        return constrain(logits_BLV, (BATCH, SEQ, VOCAB))


    def _paged_pool(self, batch: paged.PagedBatch) -> paged.Pool:
        """The paged KV cache of every layer, as variables at the top (see `paged`): a Pool
        of the variables themselves, whose values the layers read and replace."""
        c = self.config
        shape = paged.pool_shape(c.num_layers, c.num_kv_heads, c.head_dim, batch.num_blocks,
                                 batch.block_size)
        names = (HEADS, None, None, KV)
        zeros = nn.with_logical_partitioning(jnp.zeros, names)
        ones = nn.with_logical_partitioning(jnp.ones, names)
        dtype = jnp.int8 if batch.kv_int8 else c.dtype
        fields = {name: self.variable("cache", f"paged_{name}", zeros, shape, dtype)
                  for name in ("key", "value")}
        if batch.kv_int8:
            fields |= {f"{name}_scale": self.variable("cache", f"paged_{name}_scale", ones,
                                                      (*shape[:3], 1), jnp.float32)
                       for name in ("key", "value")}
        return paged.Pool(**fields)

    def _projection(self, x_BLD: jax.Array, embedding_VD: jax.Array,
                    seq_shards: int) -> Projection:
        """The final hidden states and the output projection, for the tiled loss to meet
        chunk by chunk (`loss_chunk`), in place of the (B, L, V) float32 logits. The hidden
        states stay in the model's order; the loss reorders the targets to meet them."""
        c = self.config
        if x_BLD.shape[1] % c.loss_chunk:
            raise UserError(f"--config.model.loss_chunk={c.loss_chunk}: must divide the "
                            f"sequence length {x_BLD.shape[1]}")
        if c.tie_embeddings:
            w_DV = embedding_VD.astype(c.dtype).T
        else:
            w_DV = _param(self, "output", _fan_in_init(0, 1), (c.embed_dim, c.vocab_size),
                          (EMBED, VOCAB))
        return Projection(constrain(x_BLD, (BATCH, SEQ, EMBED)), w_DV, c.loss_chunk,
                          seq_shards)


def init_cache(model: Transformer, batch_size: int) -> dict:
    """An empty KV cache (zeros, index 0) for `batch_size` sequences, as plain arrays.

    Shapes come from an abstract init, so no parameters are computed. For shardings, take
    `nn.get_partition_spec` of the same `jax.eval_shape` output: the cache is named
    (layers, batch, seq, heads, kv).
    """
    tokens = jax.ShapeDtypeStruct((batch_size, 1), jnp.int32)
    abstract = jax.eval_shape(
        lambda t: model.init(jax.random.key(0), t, decode=True)["cache"], tokens)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(abstract))


def _is_variable(x) -> bool:
    return isinstance(x, nn.Variable)


def unrolled(model: Transformer, params) -> tuple[Transformer, Any]:
    """The model with its layers unrolled and its params split per layer, for decoding: a
    scan over stacked layers slices (copies) each layer's weights out every step, which a
    memory-bound decode step pays in full; unrolled, each layer reads its weights in place."""
    c = model.config
    if not c.scan_layers:
        return model, params
    params = nn.meta.unbox(params)  # the layer axis leaves the names with the slicing
    stacked = params["layers"]
    split = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked)
             for i in range(c.num_layers)}
    rest = {name: value for name, value in params.items() if name != "layers"}
    return type(model)(dataclasses.replace(c, scan_layers=False)), {**rest, **split}


def pool_variables(config: TransformerConfig, num_blocks: int, block_size: int) -> dict:
    """An empty paged KV cache (`paged`) of `num_blocks` blocks, as the "cache" collection
    that a step with a `paged_batch` applies with."""
    shape = paged.pool_shape(config.num_layers, config.num_kv_heads, config.head_dim,
                             num_blocks, block_size)
    return {"paged_key": jnp.zeros(shape, config.dtype),
            "paged_value": jnp.zeros(shape, config.dtype)}


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs (forward and backward) per token, by the PaLM appendix B convention.

    6·N + 12·num_layers·num_heads·head_dim·seq_len, where N counts the matmul parameters:
    the attention and MLP kernels of every layer plus the D·V output projection (counted
    whether or not it is tied to the embedding, since the logits matmul runs either way).
    N leaves out the input embedding (a gather, no FLOPs) and the norm scales (elementwise).
    The attention term counts QKᵀ and AV over the full L×L square, ignoring the causal mask,
    as PaLM does; MFU computed from it is comparable to published numbers.
    """
    c = config
    attention = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.embed_dim * c.mlp_dim
    matmul_params = c.num_layers * (attention + mlp) + c.embed_dim * c.vocab_size
    return 6.0 * matmul_params + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len


def flops_per_example(model: Transformer, config: ml_collections.ConfigDict, params) -> float:
    """Training FLOPs of one sequence: `flops_per_token` times the tokens that are predicted
    (`data.seq_len`; each example holds one more, the last target)."""
    del params  # the count follows from the config, tied or not
    seq_len = config.data.seq_len
    return flops_per_token(model.config, seq_len) * seq_len


def _scanned(param: formulas.ParamLayout) -> bool:
    return param.path[0] == "layers"


def collective_bytes(model: Transformer, config: ml_collections.ConfigDict,
                     layout: formulas.StepLayout) -> dict[str, float]:
    """Per-device buffer bytes per step by group: `formulas.parameter_collectives` for data
    parallelism and FSDP (the scanned `layers` gathered forward and again backward), plus
    tensor parallelism's activation all-reduces.

    Tensor parallelism: one all-reduce of the layer's activations (tokens × width, compute
    dtype) per matmul whose contraction is split: per layer two in the forward pass
    (attention output, MLP down), two in the backward pass where XLA sums the partial input
    gradients first (TPU) or five where it does not (CPU: query, key, value, gate, up), one
    more when full remat recomputes the attention output; plus, for a vocabulary split over
    `tensor`, the embedding lookup (in the table's dtype) and the input gradient of the
    float32 logits.

    Context parallelism (the sequence split over `layout.sequence_parallel` devices): each
    layer gathers its keys and values whole (a buffer of the local rows' full sequence, local
    key/value heads, compute dtype), again when full remat recomputes the layer, and reduces
    their gradients in the backward pass; the tensor all-reduces above then carry only the
    device's share of the sequence. Whole logits (no `loss_chunk`) are gathered once to put
    them back in order, and their gradient reduced back; the tiled loss reorders the targets
    instead, which costs nothing.

    XLA is free to do otherwise, and preflight's comparison shows where it did: for a small
    embedding table split over fsdp it sends the looked-up rows by all-to-all instead of
    gathering the table and reducing its gradient; under full remat on TPU it may gather a
    layer's weights a third time for the recomputed forward pass; for small batches it may
    move activations rather than weights.
    """
    c = model.config
    compute_itemsize = c.dtype.itemsize
    totals = formulas.parameter_collectives(layout, compute_itemsize=compute_itemsize,
                                            microbatches=config.grad_accum_steps,
                                            scanned=_scanned)
    recompute = 1 if c.remat_policy == "full" else 0
    rows = config.batch_size // layout.data_parallel
    if layout.sequence_parallel > 1:
        kv_bytes = (rows * config.data.seq_len * c.num_kv_heads // layout.mesh_shape["tensor"]
                    * c.head_dim * compute_itemsize)
        totals[formulas.ALL_GATHER] += 2 * (1 + recompute) * kv_bytes * c.num_layers
        totals[formulas.GRADIENTS] += 2 * kv_bytes * c.num_layers
        if not c.loss_chunk:  # whole float32 logits, put back in order for the caller
            vocab_split = max((layout.mesh_shape["tensor"] for p in layout.params
                               if p.path[0] in ("embedding", "output")
                               and "tensor" in p.mesh_axes), default=1)
            logits_bytes = rows * config.data.seq_len * c.vocab_size // vocab_split * 4
            totals[formulas.ALL_GATHER] += logits_bytes
            totals[formulas.GRADIENTS] += logits_bytes  # and their gradient scattered back
    if layout.mesh_shape["tensor"] > 1:
        tokens = rows * config.data.seq_len // layout.sequence_parallel
        backward = 2 if layout.narrow else 5
        per_layer = 2 + backward + recompute
        totals[formulas.GRADIENTS] += (tokens * c.embed_dim * compute_itemsize * per_layer
                                       * c.num_layers)
        for p in layout.params:
            if p.path == ("embedding",) and "tensor" in p.mesh_axes:
                totals[formulas.GRADIENTS] += tokens * c.embed_dim * (p.itemsize + 4)
    return totals
