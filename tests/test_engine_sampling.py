"""The engine's request semantics, as vLLM defines them: stop ids, min_tokens, stop strings,
the final text, logit bias, penalties, logprobs of the output and of the prompt, and requests
submitted together.

Every expectation is computed independently: a plain forward pass over the whole padded
context for every token (no cache), with vLLM's formulas applied to its logits in numpy.
"""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling import engine as engine_lib
from scaling.data.tokenizer import ByteTokenizer
from scaling.engine.requests import TextStream
from scaling.models.transformer import Transformer, TransformerConfig

# The tests share a module fixture that is costly to build: one worker builds it once.
pytestmark = pytest.mark.xdist_group("engine_sampling")

CONFIG = TransformerConfig(vocab_size=260, num_layers=2, embed_dim=64, num_heads=4,
                           num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=128)
TOKENIZER = ByteTokenizer()
V = TOKENIZER.vocab_size  # ids past it are the embedding table's padding


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(CONFIG)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


@pytest.fixture(scope="module")
def full_logits(model_and_params):
    """`full_logits(tokens)`: float32 logits (len(tokens), V) of every position, no cache."""
    model, params = model_and_params
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))

    def logits(tokens):
        padded = np.zeros((1, CONFIG.max_seq_len), np.int32)
        padded[0, :len(tokens)] = tokens
        return np.asarray(forward(padded), np.float32)[0, :len(tokens), :V]
    return logits


def log_softmax(logits_V):
    shifted = logits_V - logits_V.max()
    return shifted - np.log(np.exp(shifted).sum())


def reference(full_logits, prompt, max_tokens, stop_ids=(), min_tokens=0, bias=(),
              presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy tokens with vLLM's processing of the logits: the min_tokens mask, logit bias,
    then repetition (prompt or output), frequency and presence (output) penalties. Returns
    the tokens (a stop id included) and each one's raw logprobs (V,)."""
    tokens, out, raw = list(prompt), [], []
    for _ in range(max_tokens):
        logits = full_logits(tokens)[-1].astype(np.float64)
        raw.append(log_softmax(logits))
        if len(out) < min_tokens:
            logits[list(stop_ids)] = -np.inf
        for token, value in bias:
            logits[token] += value
        counts = np.bincount(out, minlength=V)[:V]
        seen = (counts > 0) | (np.bincount(prompt, minlength=V)[:V] > 0)
        penalty = np.where(seen, repetition, 1.0)
        logits = np.where(logits > 0, logits / penalty, logits * penalty)
        logits -= frequency * counts + presence * (counts > 0)
        token = int(np.argmax(logits))
        out.append(token)
        tokens.append(token)
        if token in stop_ids and len(out) > min_tokens:
            break
    return out, raw


def make(model_and_params, warm_up=False, stop_ids=None, **options):
    model, params = model_and_params
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    options = {"max_num_seqs": 4, "kv_block_size": 8, "prefill_chunk": 16} | options
    return engine_lib.make_engine(model, params, mesh, (("batch", "data"),), TOKENIZER,
                                  engine_lib.EngineOptions(**options), warm_up,
                                  stop_ids=stop_ids)


def run_all(engine, requests, together=False):
    """Submits (prompt ids, SamplingParams) pairs, one by one or in one `submit_many`;
    returns each request's events, in order."""
    events = {i: [] for i in range(len(requests))}
    finished, done = set(), threading.Event()

    def collect(i):
        def on_event(event):
            events[i].append(event)
            if event.finish_reason:
                finished.add(i)
                if len(finished) == len(requests):
                    done.set()
        return on_event

    made = [engine_lib.Request(str(i), list(prompt), params, collect(i))
            for i, (prompt, params) in enumerate(requests)]
    if together:
        engine.submit_many(made)
    else:
        for request in made:
            engine.submit(request)
    assert done.wait(120), f"only {len(finished)} of {len(requests)} requests finished"
    return [events[i] for i in range(len(requests))]


def served(engine, requests, together=False):
    engine.start()
    try:
        return run_all(engine, requests, together)
    finally:
        engine.stop()


def token_ids(events):
    return [t for event in events for t in event.token_ids]


def text(events):
    return "".join(event.text for event in events)


PROMPT = list(b"Hello world, how are you")


def greedy(max_tokens, **fields):
    return engine_lib.SamplingParams(max_tokens=max_tokens, temperature=0.0, **fields)


@pytest.fixture(scope="module")
def plain(full_logits):
    """The prompt's plain greedy continuation, and an id it first picks at its 4th token."""
    tokens, _ = reference(full_logits, PROMPT, 24)
    stop = next(t for i, t in enumerate(tokens) if i >= 3 and t not in tokens[:i])
    return tokens, stop


def test_stop_ids_of_the_model_and_of_the_request_end_it_with_the_id_in_token_ids(
        model_and_params, plain):
    tokens, stop = plain
    at = tokens.index(stop)
    engine = make(model_and_params, stop_ids=frozenset({stop}))
    by_model, ignored, by_request_too = served(engine, [
        (PROMPT, greedy(24)),
        (PROMPT, greedy(24, ignore_eos=True)),
        (PROMPT, greedy(24, ignore_eos=True, stop_token_ids=(stop,)))])
    # The stop id is reported (vLLM keeps it in token_ids and counts it) but has no text.
    assert token_ids(by_model) == tokens[:at + 1]
    # As in vLLM, only the tokenizer's own end id is reported as stop_reason None.
    assert by_model[-1].finish_reason == "stop" and by_model[-1].stop_reason == stop
    assert by_model[-1].completion_tokens == at + 1
    assert text(by_model) == TOKENIZER.decode(tokens[:at])
    # ignore_eos ignores the model's end ids, never the request's own stop ids.
    assert token_ids(ignored) == tokens and ignored[-1].finish_reason == "length"
    assert token_ids(by_request_too) == tokens[:at + 1]
    assert by_request_too[-1].stop_reason == stop
    (default,) = served(make(model_and_params), [(PROMPT, greedy(24, stop_token_ids=(stop,)))])
    assert token_ids(default) == tokens[:at + 1] and default[-1].finish_reason == "stop"


def test_min_tokens_masks_the_stop_ids_until_then(model_and_params, full_logits, plain):
    tokens, stop = plain
    min_tokens = tokens.index(stop) + 2
    want, _ = reference(full_logits, PROMPT, 40, stop_ids=(stop, TOKENIZER.eos_id),
                        min_tokens=min_tokens)
    (events,) = served(make(model_and_params), [
        (PROMPT, greedy(40, stop_token_ids=(stop,), min_tokens=min_tokens))])
    assert token_ids(events) == want
    assert stop not in want[:min_tokens] and want != tokens[:len(want)]


def test_a_stop_string_is_not_matched_in_the_text_of_the_first_min_tokens():
    stream = TextStream(TOKENIZER, stop=("a",), min_tokens=2)
    assert [stream.add(ord(c)) for c in "aab"] == [False, False, False]
    assert stream.add(ord("a"))
    assert stream.take(final=True) == "aab" and stream.matched == "a"


def test_include_stop_str_in_output_keeps_the_stop_string_and_cuts_after_it():
    for include, want in ((True, "abcd"), (False, "ab")):
        stream = TextStream(TOKENIZER, stop=("cd", "zz"), include_stop=include)
        assert [stream.add(ord(c)) for c in "abcd"] == [False] * 3 + [True]
        assert stream.take(final=True) == want and stream.matched == "cd"
    # A piece that runs past the stop string is cut after it.
    stream = TextStream(_MarkedSpecials(), stop=("cd",), include_stop=True)
    assert stream.add(_MarkedSpecials.PIECE)
    assert stream.take(final=True) == "xcd"


class _MarkedSpecials:
    """Bytes, with the end id spelt <eos> when special pieces are kept."""

    eos_id = 256
    PIECE = 257  # decodes to "xcdy"

    def decode(self, ids, skip_special_tokens=True):
        pieces = {self.eos_id: "" if skip_special_tokens else "<eos>", self.PIECE: "xcdy"}
        return "".join(pieces.get(i, chr(i) if i < 256 else "") for i in ids)


def test_text_is_decoded_with_the_requests_skip_special_tokens():
    for skip, want in ((True, "ab"), (False, "a<eos>b")):
        stream = TextStream(_MarkedSpecials(), stop=(), skip_special_tokens=skip)
        for token in (ord("a"), 256, ord("b")):
            stream.add(token)
        assert stream.take(final=True) == want


def test_the_last_text_is_the_decode_of_every_token_an_unfinished_character_included(
        model_and_params):
    # Bias forces 0xC3, the lead byte of a two-byte character, at every step.
    (events,) = served(make(model_and_params), [
        (PROMPT, greedy(3, logit_bias=((0xC3, 100.0),), ignore_eos=True))])
    assert token_ids(events) == [0xC3] * 3
    assert events[-1].finish_reason == "length"
    assert text(events) == TOKENIZER.decode([0xC3] * 3) == "\ufffd" * 3


def test_logit_bias_forces_a_token_and_logprobs_stay_the_models(model_and_params, full_logits):
    forced = ord("Z")
    sampled = engine_lib.SamplingParams(max_tokens=4, temperature=1.0, seed=3, logprobs=20,
                                        logit_bias=((forced, 50.0),), ignore_eos=True)
    (events,) = served(make(model_and_params), [(PROMPT, sampled)])
    assert token_ids(events) == [forced] * 4
    _, raw = reference(full_logits, PROMPT, 4, bias=((forced, 50.0),))
    for event, raw_V in zip(events, raw, strict=True):
        (logprob,) = event.logprobs
        assert logprob.logprob == pytest.approx(raw_V[forced], abs=1e-4)
        assert logprob.logprob < -1  # the model's own, not the biased distribution's ~0
        assert len(logprob.top) == 20
        best = np.argsort(-raw_V)[:20]
        assert [t for t, _ in logprob.top] == best.tolist()
        np.testing.assert_allclose([lp for _, lp in logprob.top], raw_V[best], atol=1e-4)


@pytest.mark.parametrize("penalties", [
    {"repetition": 1.5},
    {"presence": 1.5, "frequency": 0.5},
    {"repetition": 0.7, "frequency": 0.3, "bias": ((ord("e"), 3.0), (ord(" "), -2.0))},
], ids=["repetition", "presence_frequency", "all_with_bias"])
def test_penalties_follow_vllms_formula(model_and_params, full_logits, plain, penalties):
    fields = {"repetition_penalty": penalties.get("repetition", 1.0),
              "presence_penalty": penalties.get("presence", 0.0),
              "frequency_penalty": penalties.get("frequency", 0.0),
              "logit_bias": penalties.get("bias", ())}
    want, _ = reference(full_logits, PROMPT, 30, **penalties)
    assert want != plain[0][:30]  # the penalties change the text, so the test can fail
    # Beside plain requests in the same steps, which the penalties must not touch.
    penalized, other = served(make(model_and_params), [
        (PROMPT, greedy(30, ignore_eos=True, **fields)), (PROMPT, greedy(24, ignore_eos=True))])
    assert token_ids(penalized) == want
    assert token_ids(other) == plain[0]


def test_prompt_logprobs_equal_a_full_forward_over_several_chunks_and_past_the_prefix_cache(
        model_and_params, full_logits):
    prompt = np.random.default_rng(4).integers(0, 256, 45).tolist()
    raw = np.stack([log_softmax(row.astype(np.float64)) for row in full_logits(prompt)])
    engine = make(model_and_params, prefill_chunk=16, kv_block_size=8)
    engine.start()
    try:
        (first,) = run_all(engine, [(prompt, greedy(2))])  # its blocks fill the prefix cache
        echo, alone = run_all(engine, [(prompt, greedy(2, prompt_logprobs=3)),
                                       (prompt, greedy(0, prompt_logprobs=0))])
    finally:
        engine.stop()
    assert first[0].prompt_logprobs == ()
    for events in (echo, alone):
        entries = events[0].prompt_logprobs
        assert events[-1].cached_tokens == 0  # the prefix cache would have skipped them
        assert len(entries) == len(prompt) and entries[0] is None
        assert [e.token for e in entries[1:]] == prompt[1:]
        np.testing.assert_allclose([e.logprob for e in entries[1:]],
                                   raw[np.arange(44), prompt[1:]], atol=1e-4)
        assert all(len(e.top) == events[0].prompt_logprobs[1].top.__len__()
                   for e in entries[1:])
        assert all(event.prompt_logprobs == () for event in events[1:])
    for i, entry in enumerate(echo[0].prompt_logprobs[1:]):
        best = np.argsort(-raw[i])[:3]
        assert [t for t, _ in entry.top] == best.tolist()
        np.testing.assert_allclose([lp for _, lp in entry.top], raw[i, best], atol=1e-4)
    assert token_ids(echo) == token_ids(first)
    assert alone[0].prompt_logprobs[1].top == ()
    assert alone[-1].finish_reason == "length" and alone[-1].completion_tokens == 0
    assert token_ids(alone) == [] and text(alone) == ""
    assert engine.pool.in_use == 0 and engine._promised == 0


def test_submit_many_prefills_a_shared_prompt_once_and_each_seed_draws_its_own(
        model_and_params):
    prompt = np.random.default_rng(5).integers(0, 256, 45).tolist()
    other = prompt[20:40]  # no prefix in common

    def params(seed):
        return engine_lib.SamplingParams(max_tokens=12, temperature=1.0, seed=seed,
                                         ignore_eos=True)

    engine = make(model_and_params, kv_block_size=8, prefill_chunk=16)
    together = served(engine, [(prompt, params(s)) for s in range(4)] + [(other, params(9))],
                      together=True)
    # The first computes all 45 prompt tokens; the three others find its 5 full blocks of 8
    # cached, copy its partial one and compute only the last token; `other` computes 20.
    assert engine.stats.prefill_tokens == 45 + 3 * 1 + 20
    assert [events[-1].cached_tokens for events in together] == [0, 44, 44, 44, 0]
    draws = [token_ids(events) for events in together]
    assert len({tuple(d) for d in draws[:4]}) == 4  # seed + i: each its own text
    alone = served(make(model_and_params), [(prompt, params(s)) for s in range(4)])
    assert [token_ids(events) for events in alone] == draws[:4]


def test_submit_many_queues_all_or_none(model_and_params):
    engine = make(model_and_params, max_queue=3)
    requests = [engine_lib.Request(str(i), [1, 2], greedy(2), lambda e: None)
                for i in range(4)]
    with pytest.raises(engine_lib.QueueFull):
        engine.submit_many(requests)
    assert engine.queue_depth == 0
    engine.submit_many(requests[:3])
    assert engine.queue_depth == 3


def test_a_sibling_whose_leader_has_finished_computes_the_partial_block_itself(
        model_and_params, full_logits):
    prompt = np.random.default_rng(6).integers(0, 256, 45).tolist()
    want, _ = reference(full_logits, prompt, 6)
    engine = make(model_and_params, kv_block_size=8, prefill_chunk=16)
    leader, sibling = served(engine, [(prompt, greedy(1, ignore_eos=True)),
                                      (prompt, greedy(6, ignore_eos=True))], together=True)
    assert token_ids(leader) == want[:1] and token_ids(sibling) == want
    assert sibling[-1].cached_tokens == 40  # the full blocks only: the leader let go of its last
    assert engine.stats.prefill_tokens == 45 + 5


def test_the_tokenizers_end_id_stops_with_no_stop_reason_after_min_tokens(
        model_and_params, full_logits):
    eos = TOKENIZER.eos_id
    forced = ((eos, 100.0),)
    want, _ = reference(full_logits, PROMPT, 10, stop_ids=(eos,), min_tokens=2, bias=forced)
    at_once, held = served(make(model_and_params), [
        (PROMPT, greedy(10, logit_bias=forced)),
        (PROMPT, greedy(10, logit_bias=forced, min_tokens=2))])
    assert token_ids(at_once) == [eos] and text(at_once) == ""
    assert at_once[-1].finish_reason == "stop" and at_once[-1].stop_reason is None
    assert token_ids(held) == want and want[2] == eos and eos not in want[:2]
    assert text(held) == TOKENIZER.decode(want[:2]) and held[-1].completion_tokens == 3


def test_min_p_keeps_only_tokens_near_the_likeliest(model_and_params, plain):
    """min_p 1 leaves the likeliest token alone at any temperature; min_p 0 does not."""
    hot = {"max_tokens": 16, "temperature": 2.0, "ignore_eos": True}
    kept, free = served(make(model_and_params), [
        (PROMPT, engine_lib.SamplingParams(seed=4, min_p=1.0, **hot)),
        (PROMPT, engine_lib.SamplingParams(seed=4, min_p=0.0, **hot))])
    assert token_ids(kept) == plain[0][:16]
    assert token_ids(free) != plain[0][:16]
