"""`--mode=sample`: text from a language-model checkpoint, decoded with a KV cache.

The prompt is encoded with the tokenizer that training saved in the workdir (so the corpus is
not needed) and prefilled in one pass; new tokens are then chosen one at a time inside a
compiled `lax.scan` by the serving engine's sampler (`scaling.engine.sampling`), the n-th from
`fold_in(key(seed), n)`, so a fixed seed always gives the same text, and the text the server
gives a request with that seed. When the text
outgrows the model's context, decoding restarts from the last half-context of tokens.
Only the model and its params are restored (`scaling.inference.restore`): no dataset, no
optimizer. With `--quantize=int8` the params (adapters merged first) are quantized once, as
the server quantizes them (`scaling.engine.quantize`), so greedy text matches the server's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scaling.data import workdir_tokenizer
from scaling.data.preprocess import LANGUAGE_TASKS
from scaling.engine import quantize as quantize_lib
from scaling.engine import sampling, serving_model
from scaling.engine.programs import buckets
from scaling.errors import UserError
from scaling.inference import restore
from scaling.models import lora, paged
from scaling.models.transformer import unrolled
from scaling.runtime import checkpoint


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    quantize: str = "none"  # scaling.engine.quantize.METHODS

    def validate(self) -> None:
        quantize_lib.check_method(self.quantize)
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens={self.max_new_tokens}: must be positive")
        if self.temperature < 0:
            raise UserError(f"--temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise UserError(f"--top_k={self.top_k}: must be >= 0 (0 keeps every token)")
        if not self.prompt:
            raise UserError("--prompt: must not be empty")


BLOCK_SIZE = 16  # positions per block of the paged cache


def _paged_batch(table_BM: jax.Array, positions_BL: jax.Array, width: int,
                 num_blocks: int) -> paged.PagedBatch:
    """The tokens at `positions_BL` of every row, read through the first `width` blocks of
    its table."""
    slots_BL, table_BW = paged.locate(table_BM, positions_BL, width, BLOCK_SIZE)
    return paged.PagedBatch(positions_BL=positions_BL, slots_BL=slots_BL,
                            block_table_BM=table_BW,
                            logit_index_B=jnp.full(positions_BL.shape[:1],
                                                   positions_BL.shape[1] - 1, jnp.int32),
                            num_blocks=num_blocks, block_size=BLOCK_SIZE)


def _settings(rows: int, temperature: float, top_k: int, seed: jax.Array,
              index: jax.Array) -> sampling.RowSettings:
    """Every row drawing with the same settings from key(seed) and its token `index`, as
    the engine draws for a request, and adjusting nothing."""
    return sampling.RowSettings(
        temperature_B=jnp.full((rows,), temperature, jnp.float32),
        top_k_B=jnp.full((rows,), top_k, jnp.int32), top_p_B=jnp.ones((rows,), jnp.float32),
        min_p_B=jnp.zeros((rows,), jnp.float32),
        seed_B=jnp.full((rows,), seed, jnp.uint32), index_B=jnp.full((rows,), index, jnp.int32),
        slot_B=jnp.ones((rows,), jnp.int32),  # past the one slot of state: none is touched
        adjust_B=jnp.zeros((rows,), bool), mask_stops_B=jnp.zeros((rows,), bool),
        presence_B=jnp.zeros((rows,), jnp.float32), frequency_B=jnp.zeros((rows,), jnp.float32),
        repetition_B=jnp.ones((rows,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("model", "num_new", "temperature", "top_k",
                                             "vocab_limit"))
def generate(model, params, prompt_BL: jax.Array, seed: jax.Array, first_index: jax.Array, *,
             num_new: int, temperature: float, top_k: int, vocab_limit: int) -> jax.Array:
    """`num_new` tokens after the prompt; `first_index` numbers them for the draws.

    Tokens are chosen by the serving engine's `scaling.engine.sampling.choose`, so a token
    drawn here with a seed is the one the server draws for a request with that seed: greedy
    at temperature 0, else from key(seed) folded with the token's number.

    The cache is the serving engine's paged form (`scaling.models.paged`) with each row
    owning the blocks for its prompt and new tokens, and decoding runs in stretches, one
    compiled loop per power of two of blocks read: a step reads the keys written so far,
    rounded up, never the whole context.
    """
    model, params = unrolled(model, params)  # sliced once a call, not once a step
    B, L = prompt_BL.shape
    P = BLOCK_SIZE
    per_row = math.ceil((L + num_new) / P)
    table_BM = jnp.arange(B * per_row, dtype=jnp.int32).reshape(B, per_row)
    cache = paged.pool_variables(model.config, B * per_row, P)
    state = sampling.SlotState.zeros(1, model.config.vocab_size)

    def forward(cache, tokens_BL, positions_BL, width):
        batch = _paged_batch(table_BM, positions_BL, width, B * per_row)
        logits_B1V, variables = model.apply({"params": params, "cache": cache}, tokens_BL,
                                            paged_batch=batch, mutable=["cache"])
        return variables["cache"], logits_B1V[:, 0]

    widths = buckets(per_row)
    positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    carry = forward(cache, prompt_BL, positions_BL, min(w for w in widths if w * P >= L))

    def stretch(width):
        def step(carry, index):
            cache, logits_BV = carry
            settings = _settings(B, temperature, top_k, seed, first_index + index)
            choice, _ = sampling.choose(logits_BV, settings, state, vocab_limit)
            token_B = choice.token_B
            position_B1 = jnp.full((B, 1), L + index, jnp.int32)
            return forward(cache, token_B[:, None], position_B1, width), token_B
        return step

    pieces, done = [], 0
    for width in widths:  # step i feeds position L + i, which needs (L + i) // P + 1 blocks
        end = min(num_new, width * P - L)
        if end > done:
            carry, tokens_NB = jax.lax.scan(stretch(width), carry,
                                            jnp.arange(done, end, dtype=jnp.int32))
            pieces.append(tokens_NB)
            done = end
    return jnp.concatenate(pieces).T


def sample_text(model, params, tokenizer, options: SampleOptions) -> str:
    """The prompt followed by up to `max_new_tokens` sampled tokens, decoded to text; the
    text ends where the model ends its document (the tokenizer's end-of-document id)."""
    options.validate()
    context = model.config.max_seq_len
    # Training puts the begin-of-document id before every document (where the vocabulary
    # has one), and so do Hugging Face tokenizers of imported models: a prompt starts one.
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    tokens = bos + [int(t) for t in tokenizer.encode(options.prompt)]
    if len(tokens) >= context:
        raise UserError(f"--prompt: {len(tokens)} tokens, but the model's context is "
                        f"{context}; shorten the prompt")
    produced = 0
    while produced < options.max_new_tokens:
        window = tokens if produced == 0 else tokens[-(context // 2):]
        num_new = min(options.max_new_tokens - produced, context - len(window))
        new = generate(model, params, jnp.asarray([window], jnp.int32),
                       np.uint32(options.seed % (1 << 32)),
                       jnp.asarray(produced), num_new=num_new,
                       temperature=float(options.temperature), top_k=int(options.top_k),
                       vocab_limit=tokenizer.vocab_size)
        new_tokens = [int(t) for t in np.asarray(new)[0]]
        if tokenizer.eos_id in new_tokens:
            tokens.extend(new_tokens[:new_tokens.index(tokenizer.eos_id)])
            break
        tokens.extend(new_tokens)
        produced += num_new
    return tokenizer.decode(tokens)


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir, options: SampleOptions,
                           experiment=None) -> str:
    """Everything `--mode=sample` does: restore the params, load the tokenizer, write text."""
    if config.task not in LANGUAGE_TASKS:
        raise UserError(f"--mode=sample needs a language model; {config.experiment} is a "
                        f"{config.task} experiment")
    options.validate()
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    if manager.latest_step() is None:
        raise UserError(f"--workdir={workdir}: no checkpoint to sample from; train first")
    tokenizer = workdir_tokenizer(config, workdir)
    vocab = config.model.get("vocab_size")
    if vocab is not None and vocab < tokenizer.vocab_size:
        raise UserError(f"--config.model.vocab_size={vocab}: the tokenizer has "
                        f"{tokenizer.vocab_size} tokens; raise it to at least that")
    restored = restore.load(config, workdir, experiment=experiment)
    model, params = restored.model, restored.params
    if options.quantize != "none":
        model_config = model.config
        if model_config.lora_rank:
            params = lora.merged(params, model_config.lora_rank, model_config.lora_alpha)
        model, params = unrolled(serving_model(model), params)
        params = quantize_lib.quantize_params(model, params, restored.mesh, restored.rules,
                                              options.quantize)
    return sample_text(model, params, tokenizer, options)
