"""Choosing each row's next token inside the compiled step, with settings per row.

Every request brings its own temperature, top-k, top-p and seed, and rows of one decode step
belong to different requests, so the settings are arrays, not static arguments: one program
serves any mix. Each row draws from its own key, `fold_in(key(seed), n)` for its n-th new
token, so a request's text depends on its seed alone, never on what else shares the batch.

Temperature 0 is greedy. Filtering (top-k, then top-p over what is left) needs the logits
sorted; a batch of greedy rows skips the sort entirely.

The log-probabilities reported are those of the model's own distribution (the logits before
temperature and filtering), as the OpenAI API reports them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

TOP_LOGPROBS = 5  # the most alternatives a request may ask for (the OpenAI API's limit)


@flax.struct.dataclass
class RowSettings:
    """The sampling settings of each row of a step."""

    temperature_B: jax.Array  # float32; 0 is greedy
    top_k_B: jax.Array  # int32; 0 keeps every token
    top_p_B: jax.Array  # float32; 1 keeps every token
    seed_B: jax.Array  # uint32: the request's seed
    index_B: jax.Array  # int32: which new token of its request this row draws


@flax.struct.dataclass
class Choice:
    """The chosen token of each row and what the model thought of it."""

    token_B: jax.Array
    logprob_B: jax.Array
    top_tokens_BT: jax.Array
    top_logprobs_BT: jax.Array


def _filtered_draw(logits_BV: jax.Array, settings: RowSettings) -> jax.Array:
    """A token per row from its temperature-scaled, top-k and top-p filtered softmax."""
    V = logits_BV.shape[-1]
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    temperature_B1 = jnp.maximum(settings.temperature_B, 1e-6)[:, None]
    scaled_BV = sorted_BV / temperature_B1
    rank_V = jnp.arange(V)
    k_B1 = jnp.where(settings.top_k_B > 0, settings.top_k_B, V)[:, None]
    keep_BV = rank_V[None, :] < k_B1
    probs_BV = jax.nn.softmax(jnp.where(keep_BV, scaled_BV, -jnp.inf), axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the tokens ranked above
    keep_BV &= before_BV < settings.top_p_B[:, None]
    keep_BV = keep_BV.at[:, 0].set(True)  # the most likely token always survives
    filtered_BV = jnp.where(keep_BV, scaled_BV, -jnp.inf)

    def draw(seed, index, row_V):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.categorical(key, row_V)

    rank_B = jax.vmap(draw)(settings.seed_B, settings.index_B, filtered_BV)
    return jnp.take_along_axis(order_BV, rank_B[:, None], axis=-1)[:, 0]


def choose(logits_BV: jax.Array, settings: RowSettings, vocab_limit: int) -> Choice:
    """Each row's next token (ids at or past `vocab_limit`, the padding of the embedding
    table, never win) and its log-probabilities."""
    logits_BV = logits_BV.astype(jnp.float32)
    ids_V = jnp.arange(logits_BV.shape[-1])
    logits_BV = jnp.where(ids_V[None, :] < vocab_limit, logits_BV, -jnp.inf)
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    sampled_B = jax.lax.cond(jnp.any(settings.temperature_B > 0),
                             lambda: _filtered_draw(logits_BV, settings),
                             lambda: greedy_B)
    token_B = jnp.where(settings.temperature_B > 0, sampled_B, greedy_B).astype(jnp.int32)
    logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    logprob_B = jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0]
    top_logprobs_BT, top_tokens_BT = jax.lax.top_k(logprobs_BV, TOP_LOGPROBS)
    return Choice(token_B=token_B, logprob_B=logprob_B,
                  top_tokens_BT=top_tokens_BT.astype(jnp.int32),
                  top_logprobs_BT=top_logprobs_BT)
