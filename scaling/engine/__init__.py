"""The language-model serving engine: paged KV cache, compiled programs, scheduler.

It takes a model with its params already on a mesh and a tokenizer, and knows nothing of
checkpoints, training or HTTP: `scaling.serving` loads the model and speaks the API; this
package turns requests into tokens as fast as the devices allow.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from scaling.data.tokenizer import Tokenizer
from scaling.engine import quantize
from scaling.engine.programs import Layout, Programs
from scaling.engine.requests import Event, Request, SamplingParams, TokenLogprob
from scaling.engine.scheduler import Engine, QueueFull
from scaling.errors import UserError
from scaling.models.transformer import unrolled
from scaling.sharding import mesh as mesh_lib

__all__ = ["Engine", "EngineOptions", "Event", "QueueFull", "Request", "SamplingParams",
           "TokenLogprob", "check_options", "make_engine"]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    max_num_seqs: int = 16  # decode slots
    kv_block_size: int = 16  # positions per cache block
    num_kv_blocks: int = 0  # blocks in the pool; 0: from kv_cache_gib
    kv_cache_gib: float = 0.0  # the pool's size; 0 with num_kv_blocks 0: every slot's context
    prefill_chunk: int = 512  # prompt tokens computed per prefill step
    max_queue: int = 1024  # waiting requests beyond this are refused
    kv_cache_dtype: str = "auto"  # auto: the model's compute dtype; int8: scaled int8
    quantize: str = "none"  # none: the weights as loaded; int8: int8 kernels (engine.quantize)


def serving_model(model: nn.Module) -> nn.Module:
    """The model as serving runs it: no remat, whole logits, no adapters (merged first)."""
    config = dataclasses.replace(model.config, remat_policy="none", loss_chunk=0, lora_rank=0)
    return type(model)(config)


KV_CACHE_DTYPES = ("auto", "int8")


def block_bytes(model_config, block_size: int, kv_int8: bool = False) -> int:
    """Bytes of one cache block: keys and values of every layer (and their scales)."""
    c = model_config
    per_vector = c.head_dim + 4 if kv_int8 else c.head_dim * jnp.dtype(c.dtype).itemsize
    return 2 * c.num_layers * block_size * c.num_kv_heads * per_vector


def check_options(options: EngineOptions) -> None:
    """The options that need no model, checked: a server calls this before loading one."""
    for name in ("max_num_seqs", "kv_block_size", "prefill_chunk", "max_queue"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name}={getattr(options, name)}: must be at least 1")
    if options.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise UserError(f"--kv_cache_dtype={options.kv_cache_dtype}: must be one of "
                        f"{', '.join(KV_CACHE_DTYPES)}")
    quantize.check_method(options.quantize)


def make_layout(model_config, options: EngineOptions, data_parallel: int) -> Layout:
    """The engine's sizes, checked; the pool is sized from the flags."""
    c = model_config
    check_options(options)
    kv_int8 = options.kv_cache_dtype == "int8"
    if options.num_kv_blocks < 0 or options.kv_cache_gib < 0:
        raise UserError("--num_kv_blocks and --kv_cache_gib must not be negative")
    if options.max_num_seqs % data_parallel:
        raise UserError(f"--max_num_seqs={options.max_num_seqs}: must be a multiple of the "
                        f"data-parallel size {data_parallel}, so every replica has slots")
    per_seq = math.ceil(c.max_seq_len / options.kv_block_size)
    if options.num_kv_blocks:
        num_blocks = options.num_kv_blocks
    elif options.kv_cache_gib:
        num_blocks = int(options.kv_cache_gib * 2**30
                         // block_bytes(c, options.kv_block_size, kv_int8))
    else:
        num_blocks = options.max_num_seqs * per_seq
    if num_blocks < per_seq:
        raise UserError(f"the KV cache holds {num_blocks} blocks of {options.kv_block_size} "
                        f"positions, fewer than one full context ({per_seq} blocks for "
                        f"{c.max_seq_len} positions); raise --num_kv_blocks or --kv_cache_gib")
    return Layout(num_blocks=num_blocks, block_size=options.kv_block_size,
                  max_num_seqs=options.max_num_seqs, prefill_rows=data_parallel,
                  prefill_chunk=min(options.prefill_chunk, c.max_seq_len),
                  max_seq_len=c.max_seq_len, kv_int8=kv_int8)


def make_engine(model: nn.Module, params, mesh: jax.sharding.Mesh, rules: tuple,
                tokenizer: Tokenizer, options: EngineOptions, warm_up: bool = True,
                stop_ids: frozenset[int] | None = None) -> Engine:
    """An engine over `params` (on `mesh`, without adapters), compiled and not yet started.

    `stop_ids`: the model's end-of-sequence ids (its generation_config.json's), which end
    every request that does not ignore them; by default the tokenizer's end id.

    With `options.quantize`, the kernels are quantized here, once, on the devices
    (`scaling.engine.quantize`); the caller's float params are not kept."""
    model, params = unrolled(serving_model(model), params)
    layout = make_layout(model.config, options, mesh_lib.data_parallel_size(mesh, rules))
    params = quantize.quantize_params(model, params, mesh, rules, options.quantize)
    programs = Programs(model, params, mesh, rules, layout, vocab_limit=tokenizer.vocab_size)
    engine = Engine(programs, tokenizer, options.max_queue, stop_ids)
    if warm_up:
        programs.warm_up()
    return engine
