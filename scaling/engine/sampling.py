"""Choosing each row's next token inside the compiled step, with settings per row.

Every request brings its own temperature, top-k, top-p and seed, and rows of one decode step
belong to different requests, so the settings are arrays, not static arguments: one program
serves any mix. Each row draws from its own key, `fold_in(key(seed), n)` for its n-th new
token, so a request's text depends on its seed alone, never on what else shares the batch.

Before choosing, as vLLM does: the `min_tokens` mask (a request's stop ids cannot be drawn
yet), its logit bias, then the repetition, frequency and presence penalties. What they need
beyond a row's scalars lives on the device in `SlotState`, one row per engine slot, written
once when a request is admitted (its bias, stop ids, prompt tokens) and, for output counts,
by every step; a batch where no row asks for any of it skips the work.

Temperature 0 is greedy. Filtering (top-k, then top-p over what is left) needs the logits
sorted; a batch of greedy rows skips the sort entirely.

The log-probabilities reported are those of the model's own distribution (the logits before
bias, penalties, temperature and filtering): vLLM's default `raw_logprobs`.

S is the number of slots, V the vocabulary, T the alternatives reported.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

TOP_LOGPROBS = 20  # the most alternatives a request may ask for (vLLM's default limit)


@flax.struct.dataclass
class RowSettings:
    """The sampling settings of each row of a step."""

    temperature_B: jax.Array  # float32; 0 is greedy
    top_k_B: jax.Array  # int32; 0 keeps every token
    top_p_B: jax.Array  # float32; 1 keeps every token
    min_p_B: jax.Array  # float32; tokens below this share of the likeliest one's are dropped
    seed_B: jax.Array  # uint32: the request's seed
    index_B: jax.Array  # int32: which new token of its request this row draws
    slot_B: jax.Array  # int32: the row's slot in `SlotState`; S (past it) for none
    adjust_B: jax.Array  # bool: bias, penalties or the stop mask apply to this row
    mask_stops_B: jax.Array  # bool: min_tokens not reached, its stop ids are masked
    presence_B: jax.Array  # float32
    frequency_B: jax.Array  # float32
    repetition_B: jax.Array  # float32; 1 is none


@flax.struct.dataclass
class SlotState:
    """What a request's logit adjustments need across steps, one row per engine slot."""

    output_counts_SV: jax.Array  # int32: times each token was chosen so far
    prompt_seen_SV: jax.Array  # bool: tokens of the prompt (for the repetition penalty)
    bias_SV: jax.Array  # float32: the request's logit bias
    stop_SV: jax.Array  # bool: ids masked until min_tokens

    @classmethod
    def zeros(cls, slots: int, vocab: int) -> SlotState:
        return cls(output_counts_SV=jnp.zeros((slots, vocab), jnp.int32),
                   prompt_seen_SV=jnp.zeros((slots, vocab), bool),
                   bias_SV=jnp.zeros((slots, vocab), jnp.float32),
                   stop_SV=jnp.zeros((slots, vocab), bool))


def admit(state: SlotState, slot: jax.Array, prompt_seen_V: jax.Array, bias_V: jax.Array,
          stop_V: jax.Array, output_counts_V: jax.Array) -> SlotState:
    """The state with one slot made ready for a request: no output yet, or, for a request
    resumed after preemption, the counts of what it had generated, so its penalties go on
    as if it had never stopped."""
    return SlotState(output_counts_SV=state.output_counts_SV.at[slot].set(output_counts_V),
                     prompt_seen_SV=state.prompt_seen_SV.at[slot].set(prompt_seen_V),
                     bias_SV=state.bias_SV.at[slot].set(bias_V),
                     stop_SV=state.stop_SV.at[slot].set(stop_V))


def adjust(logits_BV: jax.Array, settings: RowSettings, state: SlotState) -> jax.Array:
    """vLLM's order: stop ids masked under min_tokens, logit bias, then the repetition
    penalty (tokens of prompt or output), frequency and presence (tokens of the output)."""
    counts_BV = state.output_counts_SV[settings.slot_B]
    masked_BV = settings.mask_stops_B[:, None] & state.stop_SV[settings.slot_B]
    logits_BV = jnp.where(masked_BV, -jnp.inf, logits_BV + state.bias_SV[settings.slot_B])
    in_output_BV = counts_BV > 0
    seen_BV = in_output_BV | state.prompt_seen_SV[settings.slot_B]
    penalty_BV = jnp.where(seen_BV, settings.repetition_B[:, None], 1.0)
    logits_BV = jnp.where(logits_BV > 0, logits_BV / penalty_BV, logits_BV * penalty_BV)
    logits_BV -= settings.frequency_B[:, None] * counts_BV
    logits_BV -= settings.presence_B[:, None] * in_output_BV
    return logits_BV


@flax.struct.dataclass
class Choice:
    """The chosen token of each row and what the model thought of it."""

    token_B: jax.Array
    logprob_B: jax.Array
    top_tokens_BT: jax.Array
    top_logprobs_BT: jax.Array


def _filtered_draw(logits_BV: jax.Array, settings: RowSettings) -> jax.Array:
    """A token per row from its temperature-scaled, min-p, top-k and top-p filtered softmax."""
    V = logits_BV.shape[-1]
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    temperature_B1 = jnp.maximum(settings.temperature_B, 1e-6)[:, None]
    scaled_BV = sorted_BV / temperature_B1
    rank_V = jnp.arange(V)
    k_B1 = jnp.where(settings.top_k_B > 0, settings.top_k_B, V)[:, None]
    keep_BV = rank_V[None, :] < k_B1
    # min_p on the temperature-scaled distribution, before top-k and top-p, as vLLM orders
    # them: a token's probability over the likeliest one's is its logit gap, exponentiated.
    keep_BV &= jnp.exp(scaled_BV - scaled_BV[:, :1]) >= settings.min_p_B[:, None]
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


def choose(logits_BV: jax.Array, settings: RowSettings, state: SlotState,
           vocab_limit: int) -> tuple[Choice, SlotState]:
    """Each row's next token (ids at or past `vocab_limit`, the padding of the embedding
    table, never win) and its log-probabilities; the state counts the chosen tokens."""
    logits_BV = logits_BV.astype(jnp.float32)
    ids_V = jnp.arange(logits_BV.shape[-1])
    logits_BV = jnp.where(ids_V[None, :] < vocab_limit, logits_BV, -jnp.inf)
    adjusted_BV = jax.lax.cond(jnp.any(settings.adjust_B),
                               lambda: jnp.where(settings.adjust_B[:, None],
                                                 adjust(logits_BV, settings, state),
                                                 logits_BV),
                               lambda: logits_BV)
    greedy_B = jnp.argmax(adjusted_BV, axis=-1)
    sampled_B = jax.lax.cond(jnp.any(settings.temperature_B > 0),
                             lambda: _filtered_draw(adjusted_BV, settings),
                             lambda: greedy_B)
    token_B = jnp.where(settings.temperature_B > 0, sampled_B, greedy_B).astype(jnp.int32)
    state = state.replace(output_counts_SV=state.output_counts_SV.at[
        settings.slot_B, token_B].add(1, mode="drop"))
    logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    logprob_B = jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0]
    top_logprobs_BT, top_tokens_BT = jax.lax.top_k(logprobs_BV,
                                                   min(TOP_LOGPROBS, logits_BV.shape[-1]))
    return Choice(token_B=token_B, logprob_B=logprob_B,
                  top_tokens_BT=top_tokens_BT.astype(jnp.int32),
                  top_logprobs_BT=top_logprobs_BT), state
