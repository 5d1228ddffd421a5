"""`--mode=sample`: text from a language-model checkpoint, decoded with a KV cache.

The prompt is encoded with the dataset's tokenizer and prefilled in one pass; new tokens are
then drawn one at a time inside a compiled `lax.scan`, each from
`fold_in(key(seed), position)`, so a fixed seed always gives the same text. When the text
outgrows the model's context, decoding restarts from the last half-context of tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scaling.errors import UserError
from scaling.runtime import checkpoint


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens={self.max_new_tokens}: must be positive")
        if self.temperature < 0:
            raise UserError(f"--temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise UserError(f"--top_k={self.top_k}: must be >= 0 (0 keeps every token)")
        if not self.prompt:
            raise UserError("--prompt: must not be empty")


def sample_token(logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int,
                 vocab_limit: int) -> jax.Array:
    """One token per row: greedy at temperature 0, else from the top-k softmax."""
    ids = jnp.arange(logits_BV.shape[-1])
    logits_BV = jnp.where(ids < vocab_limit, logits_BV, -jnp.inf)  # padding ids never win
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV / temperature).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "num_new", "temperature", "top_k",
                                             "vocab_limit"))
def generate(model, params, prompt_BL: jax.Array, rng: jax.Array, first_index: jax.Array, *,
             num_new: int, temperature: float, top_k: int, vocab_limit: int) -> jax.Array:
    """`num_new` tokens after the prompt; `first_index` numbers them for the rng."""
    from scaling.models.transformer import init_cache

    cache = init_cache(model, prompt_BL.shape[0])
    logits_BLV, variables = model.apply({"params": params, "cache": cache}, prompt_BL,
                                        decode=True, mutable=["cache"])

    def step(carry, index):
        cache, logits_BV = carry
        token_B = sample_token(logits_BV, jax.random.fold_in(rng, index), temperature, top_k,
                               vocab_limit)
        logits_BLV, variables = model.apply({"params": params, "cache": cache},
                                            token_B[:, None], decode=True, mutable=["cache"])
        return (variables["cache"], logits_BLV[:, -1]), token_B

    _, tokens_NB = jax.lax.scan(step, (variables["cache"], logits_BLV[:, -1]),
                                first_index + jnp.arange(num_new))
    return tokens_NB.T


def sample_text(model, params, tokenizer, options: SampleOptions) -> str:
    """The prompt followed by `max_new_tokens` sampled tokens, decoded to text."""
    options.validate()
    context = model.config.max_seq_len
    tokens = [int(t) for t in tokenizer.encode(options.prompt)]
    if len(tokens) >= context:
        raise UserError(f"--prompt: {len(tokens)} tokens, but the model's context is "
                        f"{context}; shorten the prompt")
    rng = jax.random.PRNGKey(options.seed)
    produced = 0
    while produced < options.max_new_tokens:
        window = tokens if produced == 0 else tokens[-(context // 2):]
        num_new = min(options.max_new_tokens - produced, context - len(window))
        new = generate(model, params, jnp.asarray([window], jnp.int32), rng,
                       jnp.asarray(produced), num_new=num_new,
                       temperature=float(options.temperature), top_k=int(options.top_k),
                       vocab_limit=tokenizer.vocab_size)
        tokens.extend(int(t) for t in np.asarray(new)[0])
        produced += num_new
    return tokenizer.decode(tokens)


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir, options: SampleOptions,
                           experiment=None) -> str:
    from scaling.training import run as run_lib

    if config.task != "language_modeling":
        raise UserError(f"--mode=sample needs a language model; {config.experiment} is a "
                        f"{config.task} experiment")
    options.validate()
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    if manager.latest_step() is None:
        raise UserError(f"--workdir={workdir}: no checkpoint to sample from; train first")
    run, dataset = run_lib.setup(config, experiment)
    state = checkpoint.restore(manager, run.abstract_state)
    manager.close()
    return sample_text(run.model, state.params, dataset.tokenizer, options)
