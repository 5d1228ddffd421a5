"""The engine's compiled programs: prefill and decode over the paged KV cache.

Both run the model on new tokens against the pool (`scaling.models.paged`), and a third
program chooses one next token per row from the logits (`scaling.engine.sampling`); prefill
and decode differ in shape. Decode runs every decoding sequence, one token each: (rows, 1),
rows bucketed by powers of four up to `max_num_seqs`. Prefill runs a chunk of a prompt for
as many sequences as there are data-parallel replicas, one row each, so that every replica
has work: (rows, L).

A prefill that must report its prompt's logprobs (an echo) runs a variant that makes logits
at every position of the chunk and returns, per position, the logprob of the next prompt
token and the best alternatives; it is compiled on first use, so a server whose clients never
ask pays nothing for it.

Shapes are bucketed so that a handful of programs serve every request, all compiled at
warm-up: prompt chunks are padded up to a power of two (at most `prefill_chunk`), and block
tables to a power of two blocks (decode) or of four (prefill, whose matmuls over the chunk
outweigh its attention), up to the context's worth. A decode step therefore reads keys for the
longest sequence running, rounded up, rather than for the whole context.

A decode step may take its input tokens from the previous step's choices while they are still
on the device (`follow`): the next step is dispatched before the previous one's tokens reach
the host, so the host's bookkeeping runs beside the device instead of between its steps.

The pool is donated to each program and comes back written, so the cache is never copied.
Params and pool keep the shardings the mesh rules give them: key/value heads split like the
model's heads (tensor parallelism), rows split over the batch axes (data parallelism).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from scaling.engine import quantize, sampling
from scaling.models import paged
from scaling.sharding import mesh as mesh_lib


def buckets(limit: int, start: int = 1, growth: int = 2) -> tuple[int, ...]:
    """start, start·growth, ... below `limit`, then `limit` itself."""
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= growth
    return (*sizes, limit)


def bucket(size: int, sizes: tuple[int, ...]) -> int:
    """The smallest bucket that holds `size`."""
    for candidate in sizes:
        if candidate >= size:
            return candidate
    raise ValueError(f"{size} exceeds the largest bucket {sizes[-1]}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The sizes every program is compiled for."""

    num_blocks: int
    block_size: int
    max_num_seqs: int
    prefill_rows: int  # the data-parallel size: the rows of the smallest step
    prefill_chunk: int
    max_seq_len: int
    kv_int8: bool = False  # the pool holds int8 keys and values with per-vector scales

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_seq_len / self.block_size)

    @property
    def decode_rows(self) -> tuple[int, ...]:
        """Row counts of the decode step: each a multiple of the data-parallel size."""
        return buckets(self.max_num_seqs, start=self.prefill_rows, growth=4)

    @property
    def decode_widths(self) -> tuple[int, ...]:
        return buckets(self.max_blocks_per_seq)

    @property
    def prefill_widths(self) -> tuple[int, ...]:
        return buckets(self.max_blocks_per_seq, growth=4)

    @property
    def prefill_lengths(self) -> tuple[int, ...]:
        return buckets(self.prefill_chunk, start=min(16, self.prefill_chunk))

    def prefill_row_counts(self, length: int) -> tuple[int, ...]:
        """Row counts of a prefill step `length` tokens long: short prompts go several to a
        step, up to a chunk's tokens (and the slots) in all, so that a burst of requests is
        prefilled in a step or two rather than one step each. Counts double, so that a
        step pads at most as many rows as it fills: padding rows cost as much as full ones."""
        dp = self.prefill_rows
        most = min(self.max_num_seqs, self.prefill_chunk // length) // dp * dp
        return buckets(max(dp, most), start=dp, growth=2)

    @property
    def dropped_slot(self) -> int:
        """A slot past the pool: writes there are dropped (padding tokens, empty rows)."""
        return self.num_blocks * self.block_size


def _forward(model: nn.Module, params, cache, tokens_BL: jax.Array, batch: paged.PagedBatch):
    logits_B1V, variables = model.apply({"params": params, "cache": cache}, tokens_BL,
                                        paged_batch=batch, mutable=["cache"])
    return logits_B1V[:, 0], variables["cache"]


@flax.struct.dataclass
class PromptLogprobs:
    """Per position of a prompt chunk: the logprob of the token after it and the best
    alternatives (the model's own distribution over the vocabulary it may emit)."""

    next_logprob_BL: jax.Array
    top_tokens_BLT: jax.Array
    top_logprobs_BLT: jax.Array


def _forward_echo(model: nn.Module, vocab_limit: int, params, cache, tokens_BL: jax.Array,
                  batch: paged.PagedBatch, next_BL: jax.Array):
    """`_forward` with every position's logits made (the batch's `logit_index_B` is (B, L)),
    reduced to the next tokens' logprobs; the logits of each row's last token for sampling
    are those at `last_B`, passed as the batch's index of the plain step would be."""
    B, L = tokens_BL.shape
    last_B = batch.logit_index_B
    every = batch.replace(logit_index_B=jnp.broadcast_to(jnp.arange(L), (B, L)))
    logits_BLV, variables = model.apply({"params": params, "cache": cache}, tokens_BL,
                                        paged_batch=every, mutable=["cache"])
    ids_V = jnp.arange(logits_BLV.shape[-1])
    masked_BLV = jnp.where(ids_V < vocab_limit, logits_BLV.astype(jnp.float32), -jnp.inf)
    logprobs_BLV = jax.nn.log_softmax(masked_BLV, axis=-1)
    next_logprob_BL = jnp.take_along_axis(logprobs_BLV, next_BL[..., None], axis=-1)[..., 0]
    top_logprobs_BLT, top_tokens_BLT = jax.lax.top_k(
        logprobs_BLV, min(sampling.TOP_LOGPROBS, logprobs_BLV.shape[-1]))
    logits_BV = jnp.take_along_axis(logits_BLV, last_B[:, None, None], axis=1)[:, 0]
    return logits_BV, PromptLogprobs(next_logprob_BL, top_tokens_BLT.astype(jnp.int32),
                                     top_logprobs_BLT), variables["cache"]


def uses_tpu_kernel(model: nn.Module, mesh: jax.sharding.Mesh) -> bool:
    """Whether decode steps attend through the Pallas paged-attention kernel: on TPU, where
    the head width allows it. Prompt chunks, and other platforms, use the gather form."""
    return mesh_lib.platform(mesh) == "tpu" and model.config.head_dim % 128 == 0


def empty_batch(layout: Layout, rows: int, length: int, width: int,
                tpu_kernel: bool) -> paged.PagedBatch:
    """A batch that writes nothing and reads block 0: the padding of every step."""
    return paged.PagedBatch(
        positions_BL=np.zeros((rows, length), np.int32),
        slots_BL=np.full((rows, length), layout.dropped_slot, np.int32),
        block_table_BM=np.zeros((rows, width), np.int32),
        logit_index_B=np.zeros((rows,), np.int32),
        num_blocks=layout.num_blocks, block_size=layout.block_size,
        tpu_kernel=tpu_kernel and length == 1, kv_int8=layout.kv_int8)


def cache_layout(model: nn.Module, mesh: jax.sharding.Mesh, rules: tuple, layout: Layout):
    """The pools' shardings and abstract arrays, from an abstract init of the model."""
    batch = empty_batch(layout, 1, 1, 1, tpu_kernel=False)
    boxed = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32), paged_batch=batch)["cache"])
    return mesh_lib.logical_shardings(boxed, mesh, rules), nn.meta.unbox(boxed)


def step_lowering(model: nn.Module, mesh: jax.sharding.Mesh, rules: tuple, param_shardings,
                  cache_shardings):
    """`lower(params, cache, tokens_BL, batch)` of the forward step, the pool donated; the
    arguments may be arrays or shape structs (an ahead-of-time compile for another slice)."""
    replicated = mesh_lib.replicated(mesh)
    rows = mesh_lib.batch_sharding(mesh, rules)
    forward = jax.jit(
        functools.partial(_forward, model), donate_argnums=(1,),
        in_shardings=(param_shardings, cache_shardings, rows, replicated),
        out_shardings=(replicated, cache_shardings))
    return mesh_lib.with_mesh_rules(forward.lower, mesh, rules)


def echo_lowering(model: nn.Module, vocab_limit: int, mesh: jax.sharding.Mesh, rules: tuple,
                  param_shardings, cache_shardings):
    """`lower(params, cache, tokens_BL, batch, next_BL)` of the prompt-logprobs step."""
    replicated = mesh_lib.replicated(mesh)
    rows = mesh_lib.batch_sharding(mesh, rules)
    forward = jax.jit(
        functools.partial(_forward_echo, model, vocab_limit), donate_argnums=(1,),
        in_shardings=(param_shardings, cache_shardings, rows, replicated, replicated),
        out_shardings=(replicated, replicated, cache_shardings))
    return mesh_lib.with_mesh_rules(forward.lower, mesh, rules)


class Programs:
    """The pool on the devices and the compiled steps that read and write it."""

    def __init__(self, model: nn.Module, params: Any, mesh: jax.sharding.Mesh, rules: tuple,
                 layout: Layout, vocab_limit: int):
        self.model = model
        self.params = params
        self.mesh = mesh
        self.rules = rules
        self.layout = layout
        self.tpu_decode_kernel = uses_tpu_kernel(model, mesh)
        self.weight_bytes = quantize.weight_bytes(params)  # int8 values and scales, or floats
        cache_shardings, abstract = cache_layout(model, mesh, rules, layout)
        self.cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
        self.block_bytes = self.cache_bytes // layout.num_blocks
        self.cache = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                  abstract),
                             out_shardings=cache_shardings)()
        param_shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
        self._lower_forward = step_lowering(model, mesh, rules, param_shardings,
                                            cache_shardings)
        self._lower_echo = echo_lowering(model, vocab_limit, mesh, rules, param_shardings,
                                         cache_shardings)
        replicated = mesh_lib.replicated(mesh)
        vocab = model.config.vocab_size
        self.slot_state = jax.jit(lambda: sampling.SlotState.zeros(layout.max_num_seqs, vocab),
                                  out_shardings=replicated)()
        # Sampling depends only on the rows and the vocabulary: compiled once per row count,
        # not once per bucket (its random draws take longer to compile than a small model).
        self._choose = jax.jit(functools.partial(sampling.choose, vocab_limit=vocab_limit),
                               in_shardings=(replicated, replicated, replicated),
                               out_shardings=(replicated, replicated), donate_argnums=(2,))
        self._admit_slot = jax.jit(sampling.admit, donate_argnums=(0,),
                                   out_shardings=replicated)
        self._compiled: dict[tuple[int, int, int], Any] = {}  # (rows, length, width)
        self._compiled_echo: dict[tuple[int, int, int], Any] = {}
        self._compiled_choose: dict[int, Any] = {}
        self._compiled_admit = None
        num_layers, num_blocks = model.config.num_layers, layout.num_blocks

        def copy_block(cache, source, target):
            """The pool with block `target` holding what block `source` holds, every layer."""
            layers = jnp.arange(num_layers) * num_blocks
            return jax.tree.map(lambda pool: pool.at[:, layers + target].set(
                pool[:, layers + source]), cache)

        self._copy_block = jax.jit(copy_block, donate_argnums=(0,),
                                   out_shardings=cache_shardings)
        self._compiled_copy = None

        def follow(previous_B, source_B, host_B1):
            """Each row's input token: the previous step's choice in row `source`, or, where
            that is negative (a sequence new to decoding), the token from the host."""
            taken_B = previous_B[jnp.clip(source_B, 0, previous_B.shape[0] - 1)]
            return jnp.where(source_B >= 0, taken_B, host_B1[:, 0])[:, None]

        self._follow = jax.jit(follow, in_shardings=(replicated, replicated, replicated),
                               out_shardings=mesh_lib.batch_sharding(mesh, rules))
        self._compiled_follow: dict[tuple[int, int], Any] = {}
        self.compiles = 0  # programs compiled so far, warm-up included

    def empty_batch(self, rows: int, length: int, width: int) -> paged.PagedBatch:
        return empty_batch(self.layout, rows, length, width, self.tpu_decode_kernel)

    def greedy_settings(self, rows: int) -> sampling.RowSettings:
        """Settings of `rows` plain greedy rows, which no slot state touches."""
        return sampling.RowSettings(
            temperature_B=np.zeros((rows,), np.float32), top_k_B=np.zeros((rows,), np.int32),
            top_p_B=np.ones((rows,), np.float32), min_p_B=np.zeros((rows,), np.float32),
            seed_B=np.zeros((rows,), np.uint32),
            index_B=np.zeros((rows,), np.int32),
            slot_B=np.full((rows,), self.layout.max_num_seqs, np.int32),
            adjust_B=np.zeros((rows,), bool), mask_stops_B=np.zeros((rows,), bool),
            presence_B=np.zeros((rows,), np.float32), frequency_B=np.zeros((rows,), np.float32),
            repetition_B=np.ones((rows,), np.float32))

    def admit_slot(self, slot: int, prompt_seen_V: np.ndarray, bias_V: np.ndarray,
                   stop_V: np.ndarray, output_counts_V: np.ndarray) -> None:
        """Readies a slot's state for a request that adjusts its logits."""
        self.slot_state = self._slot_admitter()(self.slot_state, np.int32(slot), prompt_seen_V,
                                                bias_V, stop_V, output_counts_V)

    def copy_block(self, source: int, target: int) -> None:
        """Copies one block's keys and values (a shared prompt's last, partial block)."""
        if self._compiled_copy is None:
            self._compiled_copy = self._copy_block.lower(self.cache, np.int32(0),
                                                         np.int32(0)).compile()
            self.compiles += 1
        self.cache = self._compiled_copy(self.cache, np.int32(source), np.int32(target))

    def follow(self, previous_B: jax.Array, source_B: np.ndarray,
               host_B1: np.ndarray) -> jax.Array:
        """A decode step's input tokens, (rows, 1) on the device, taken from the previous
        step's choices (`previous_B`, still on the device) where `source_B` names a row."""
        shape = (previous_B.shape[0], source_B.shape[0])
        if shape not in self._compiled_follow:
            self._compiled_follow[shape] = self._follow.lower(
                jax.ShapeDtypeStruct(shape[:1], jnp.int32),
                jax.ShapeDtypeStruct(shape[1:], jnp.int32),
                jax.ShapeDtypeStruct((shape[1], 1), jnp.int32)).compile()
            self.compiles += 1
        return self._compiled_follow[shape](previous_B, source_B, host_B1)

    def _slot_admitter(self):
        if self._compiled_admit is None:
            V = self.model.config.vocab_size
            self._compiled_admit = self._admit_slot.lower(
                self.slot_state, np.int32(0), np.zeros((V,), bool), np.zeros((V,), np.float32),
                np.zeros((V,), bool), np.zeros((V,), np.int32)).compile()
            self.compiles += 1
        return self._compiled_admit

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every (rows, length, table width) the engine runs."""
        layout = self.layout
        decode = [(rows, 1, width) for rows in layout.decode_rows
                  for width in layout.decode_widths]
        prefill = [(rows, length, width) for length in layout.prefill_lengths
                   for rows in layout.prefill_row_counts(length)
                   for width in layout.prefill_widths]
        return decode + prefill

    def _lower(self, rows: int, length: int, width: int):
        tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        return self._lower_forward(self.params, self.cache, tokens,
                                   self.empty_batch(rows, length, width))

    def _program(self, rows: int, length: int, width: int):
        """The compiled forward pass for one shape (compiled now if it is new)."""
        shape = (rows, length, width)
        if shape not in self._compiled:
            self._compiled[shape] = self._lower(*shape).compile()
            self.compiles += 1
        return self._compiled[shape]

    def _echo_program(self, rows: int, length: int, width: int):
        """The prompt-logprobs forward pass for one shape, compiled on first use."""
        shape = (rows, length, width)
        if shape not in self._compiled_echo:
            tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
            self._compiled_echo[shape] = self._lower_echo(
                self.params, self.cache, tokens, self.empty_batch(rows, length, width),
                tokens).compile()
            self.compiles += 1
        return self._compiled_echo[shape]

    def _chooser(self, rows: int):
        if rows not in self._compiled_choose:
            logits = jax.ShapeDtypeStruct((rows, self.model.config.vocab_size), jnp.float32)
            self._compiled_choose[rows] = self._choose.lower(
                logits, self.greedy_settings(rows), self.slot_state).compile()
            self.compiles += 1
        return self._compiled_choose[rows]

    def warm_up(self, threads: int = 2) -> int:
        """Compiles every program, a few at a time (XLA compiles outside Python's lock);
        returns how many there are."""
        shapes = [shape for shape in self.shapes() if shape not in self._compiled]
        lowered = [self._lower(*shape) for shape in shapes]  # tracing stays on this thread
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            compiled = list(pool.map(lambda program: program.compile(), lowered))
        self._compiled.update(zip(shapes, compiled, strict=True))
        self.compiles += len(compiled)
        for rows in sorted({rows for rows, _, _ in self.shapes()}):
            self._chooser(rows)
        self._slot_admitter()
        self.copy_block(0, 0)
        for previous in self.layout.decode_rows:
            for rows in self.layout.decode_rows:
                self.follow(jnp.zeros((previous,), jnp.int32), np.zeros((rows,), np.int32),
                            np.zeros((rows, 1), np.int32))
        return self.compiles

    def run(self, tokens_BL: np.ndarray, batch: paged.PagedBatch,
            settings: sampling.RowSettings) -> sampling.Choice:
        """One step; the pool is updated in place and the choices come back to the host."""
        return jax.tree.map(np.asarray, self.dispatch(tokens_BL, batch, settings))

    def dispatch(self, tokens_BL: np.ndarray | jax.Array, batch: paged.PagedBatch,
                 settings: sampling.RowSettings) -> sampling.Choice:
        """One step, queued on the device; its choices stay there until read (JAX's
        asynchronous dispatch returns before the device has run it)."""
        rows, length = tokens_BL.shape
        program = self._program(rows, length, batch.block_table_BM.shape[1])
        logits_BV, self.cache = program(self.params, self.cache, tokens_BL, batch)
        choice, self.slot_state = self._chooser(rows)(logits_BV, settings, self.slot_state)
        return choice

    def run_echo(self, tokens_BL: np.ndarray, batch: paged.PagedBatch,
                 settings: sampling.RowSettings,
                 next_BL: np.ndarray) -> tuple[sampling.Choice, PromptLogprobs]:
        """A prefill step that also reports, per position, the logprob of `next_BL` there."""
        rows, length = tokens_BL.shape
        program = self._echo_program(rows, length, batch.block_table_BM.shape[1])
        logits_BV, prompt, self.cache = program(self.params, self.cache, tokens_BL, batch,
                                                next_BL)
        choice, self.slot_state = self._chooser(rows)(logits_BV, settings, self.slot_state)
        return jax.tree.map(np.asarray, (choice, prompt))
