"""A decoder-only transformer language model: pre-norm, RoPE, grouped-query attention, SwiGLU.

Shape suffixes name the axes of every array, nanodo style, so a reader can check each einsum
without running it:

    B  batch                     H   query heads
    L  sequence length (queries) K   key/value heads (K divides H)
    S  key/value length          G   query heads per key/value head (H // K)
    D  embedding width           Dh  width of one head
    F  MLP hidden width          V   vocabulary
                                 M   the queries of one key/value head (G·L)

S is L in a whole pass (training, evaluation); a serving step reads its keys from the
paged cache instead (`scaling.models.paged`).

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

The attention core (`attention`) is the Pallas splash kernel on TPU (`splash`), cuDNN's fused
kernel on GPU (`cudnn`), or a written form (`grouped_einsum`, or the CPU-only
`batched_matmul`), chosen in `scaling.models.attention_choice`; the written forms and their
masks live in `scaling.models.attention`, RoPE in `scaling.models.rope`. Decoding with the
paged KV cache uses the gather form of `scaling.models.paged`, or on TPU its Pallas kernel.
The cost formulas are in `scaling.models.transformer_formulas`.

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

from scaling.errors import UserError
from scaling.models import context, gpu_attention, paged
from scaling.models.attention import (
    ATTENTION_FORMS,
    causal_mask,
    chunked_einsum_attention,
    segment_mask,
)
from scaling.models.attention_choice import ATTENTION_CHOICES, SPLASH_LANES
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
from scaling.models.rope import ROPE_SCALINGS, apply_rope, rope_frequencies
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


class Attention(nn.Module):
    """Causal grouped-query attention, kept within each packed document when given segment
    ids; with a paged batch, against the serving engine's paged KV cache.

    With `seq_shards` > 1 the sequence arrives reordered and split for context parallelism
    (`scaling.models.context`): keys and values are gathered whole and put back in order,
    and each query is masked by its original slot.
    """

    config: TransformerConfig
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
        q_slot_L = jnp.arange(L)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(q_slot_L, (B, L))
        inv_freq = rope_frequencies(c)
        q_BLHDh = apply_rope(q_BLHDh, positions_BL, inv_freq)
        k_BLKDh = apply_rope(k_BLKDh, positions_BL, inv_freq)

        k_BSKDh, v_BSKDh = k_BLKDh, v_BLKDh  # a whole pass: S is L
        kv_segment_ids_BS = segment_ids_BL
        if self.seq_shards > 1:  # reordered for context parallelism
            q_slot_L = jnp.asarray(context.balanced_order(L, self.seq_shards))
            inverse = context.inverse_order(L, self.seq_shards)
            whole = (BATCH, None, HEADS, KV)  # all-gathered over the sequence's devices
            k_BSKDh = constrain(k_BSKDh, whole)[:, inverse]
            v_BSKDh = constrain(v_BSKDh, whole)[:, inverse]
            if segment_ids_BL is not None:
                kv_segment_ids_BS = segment_ids_BL[:, inverse]

        if c.attention == "splash":
            from scaling.models import tpu_attention  # Pallas: 0.35 s to import, TPU only

            out_BLHDh = tpu_attention.sharded_splash_attention(
                q_BLHDh, k_BSKDh, v_BSKDh, segment_ids_BL, kv_segment_ids_BS,
                seq_shards=self.seq_shards, block=c.splash_block)
        elif c.attention == "cudnn":
            out_BLHDh = gpu_attention.cudnn_attention(
                q_BLHDh, k_BSKDh, v_BSKDh, segment_ids_BL, kv_segment_ids_BS,
                q_slot_L if self.seq_shards > 1 else None)
        else:
            if segment_ids_BL is None:  # one mask shared by every row
                mask_BLS = causal_mask(q_slot_L, k_BSKDh.shape[1])
            else:
                mask_BLS = segment_mask(segment_ids_BL, kv_segment_ids_BS, q_slot_L)
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
    seq_shards: int = 1  # devices the sequence is split over (context parallelism)

    @nn.compact
    def __call__(self, carry, positions_BL: jax.Array | None, segment_ids_BL: jax.Array | None,
                 paged_batch: paged.PagedBatch | None = None, layer=None) -> tuple[Any, None]:
        """The carry is the stream x_BLD, or (x_BLD, pool) with a paged batch: the pool
        travels with the stream so each layer updates it in place."""
        names = (BATCH, SEQ, RESIDUAL)
        x_BLD, pool = carry if paged_batch is not None else (carry, None)
        h_BLD = RMSNorm(self.config, name="attention_norm")(x_BLD)
        attention = Attention(self.config, self.seq_shards, name="attention")
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
    def __call__(self, tokens_BL: jax.Array, *, train: bool = False,
                 positions_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None,
                 paged_batch: paged.PagedBatch | None = None) -> jax.Array:
        """Float32 logits (B, L, V) for next-token prediction.

        `positions_BL` overrides the rotary positions (they default to the tokens' slots,
        0..L-1); causal masking always follows the slots.

        `segment_ids_BL` marks the documents packed into each row (1, 2, ... ; 0 is padding)
        and keeps attention within each document (see `segment_mask`); pass the positions
        within each document as `positions_BL` too, or later documents are rotated as if
        they continued the earlier ones.

        With `paged_batch` (a serving engine's step, `scaling.models.paged`), apply with
        `mutable=["cache"]` and the engine's pools: the tokens are written into the paged
        cache at the batch's slots, rotated by its positions, and only the logits of each
        row's `logit_index_B` token are made, (B, 1, V) (or of its L' tokens when the index
        is (B, L'), (B, L', V)). The cache serves one sequence per row, so a paged batch
        takes no segments.
        """
        del train  # no dropout in this model
        if paged_batch is not None and segment_ids_BL is not None:
            raise ValueError("segment_ids_BL with a paged batch: the KV cache holds one "
                             "sequence per row, so decode without segment ids")
        c = self.config
        # Context parallelism: a split sequence is reordered to balance causal attention
        # (`scaling.models.context`); the outputs come back in the callers' order.
        L = tokens_BL.shape[1]
        seq_shards = 1 if paged_batch is not None else context.sequence_shards()
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
        # Gather before casting, so bfloat16 compute never copies the whole table; through
        # the method, so an int8 table (`scaling.models.quantized`) dequantizes its rows only.
        x_BLD = embedding_VD.take(tokens_BL, axis=0).astype(c.dtype)
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
            carry, _ = stack(c, seq_shards, name="layers")(
                carry, positions_BL, segment_ids_BL, paged_batch, layer_numbers)
        else:
            for i in range(c.num_layers):
                carry, _ = layer(c, seq_shards, name=f"layers_{i}")(
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
        if c.loss_chunk and paged_batch is None:
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
