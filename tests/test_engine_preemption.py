"""Cache blocks taken as positions fill: many requests share a small pool, and when it runs
dry the most recently admitted one is preempted and later recomputed, without changing any
request's tokens, text or draws.

The pool is two full contexts (32 blocks of 16 positions, contexts of 256); requests that each
reach 220 positions would fit two at a time if their worst case were reserved at admission.
"""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling import engine as engine_lib
from scaling.data.tokenizer import ByteTokenizer
from scaling.models.transformer import Transformer, TransformerConfig

CONFIG = TransformerConfig(vocab_size=260, num_layers=2, embed_dim=64, num_heads=4,
                           num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=256)
TOKENIZER = ByteTokenizer()
POOL = {"max_num_seqs": 16, "kv_block_size": 16, "num_kv_blocks": 32, "prefill_chunk": 64}


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(CONFIG)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


def make(model_and_params, **options):
    model, params = model_and_params
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    return engine_lib.make_engine(model, params, mesh, (("batch", "data"),), TOKENIZER,
                                  engine_lib.EngineOptions(**options), warm_up=False)


def run(engine, groups):
    """Submits groups of (prompt, params) at once (a group of several through `submit_many`);
    returns each request's (tokens, text, events), in order."""
    flat = [item for group in groups for item in group]
    out = [([], [], []) for _ in flat]
    done, finished = threading.Event(), []

    def collect(i):
        def on_event(event):
            out[i][0].extend(event.token_ids)
            out[i][1].append(event.text)
            out[i][2].append(event)
            if event.finish_reason:
                finished.append(i)
                if len(finished) == len(flat):
                    done.set()
        return on_event

    i = 0
    for group in groups:
        requests = []
        for prompt, params in group:
            requests.append(engine_lib.Request(str(i), list(prompt), params, collect(i)))
            i += 1
        if len(requests) == 1:
            engine.submit(requests[0])
        else:
            engine.submit_many(requests)
    assert done.wait(600), f"only {len(finished)} of {len(flat)} requests finished"
    return [(tokens, "".join(texts), events) for tokens, texts, events in out]


def alone(model_and_params, requests):
    """Each request's output with the engine to itself: never preempted."""
    engine = make(model_and_params, **POOL)
    engine.start()
    try:
        outputs = [run(engine, [[request]])[0] for request in requests]
    finally:
        engine.stop()
    assert engine.stats.preemptions == 0
    return outputs


def greedy(max_tokens, **fields):
    return engine_lib.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                     **fields)


def test_16_requests_of_200_tokens_run_8_at_once_on_two_contexts_of_blocks(model_and_params):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 256, n).tolist() for n in rng.integers(5, 40, 16)]
    requests = [(prompt, greedy(200)) for prompt in prompts]
    engine = make(model_and_params, **POOL)
    engine.start()
    try:
        together = run(engine, [[request] for request in requests])
    finally:
        engine.stop()
    assert engine.stats.peak_running >= 8
    assert engine.stats.preemptions > 0
    assert engine.pool.in_use == 0 and engine.queue_depth == 0 and engine._promised == 0
    expected = alone(model_and_params, requests)
    for (tokens, text, events), (want_tokens, want_text, _) in zip(together, expected,
                                                                   strict=True):
        assert len(tokens) == 200 and events[-1].completion_tokens == 200
        assert (tokens, text) == (want_tokens, want_text)  # nothing sent twice or lost
        assert events[-1].finish_reason == "length"


def test_preempted_draws_penalties_and_siblings_go_on_as_if_never_stopped(model_and_params):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, n).tolist() for n in (20, 33, 24, 18)]
    sampled = dict(max_tokens=200, temperature=1.0, top_k=40, top_p=0.95, ignore_eos=True)
    groups = [
        [(prompts[0], greedy(200))],
        [(prompts[1], greedy(200))],
        # Siblings: they share their leader's prompt blocks, each draws with its own seed.
        [(prompts[2], engine_lib.SamplingParams(seed=3, **sampled)),
         (prompts[2], engine_lib.SamplingParams(seed=4, **sampled))],
        # Penalties live in the request's slot on the device, which preemption gives back.
        [(prompts[3], greedy(200, presence_penalty=0.4, frequency_penalty=0.3,
                             repetition_penalty=1.3, logit_bias=((65, 2.0),),
                             min_tokens=150, stop_token_ids=(66,)))],
    ]
    engine = make(model_and_params, **POOL)
    preempted = []
    preempt = engine._preempt

    def record(seq):
        preempted.append((seq.request.request_id, seq.generated))
        preempt(seq)

    engine._preempt = record
    engine.start()
    try:
        together = run(engine, groups)
    finally:
        engine.stop()
    expected = alone(model_and_params, [item for group in groups for item in group])
    # The youngest requests were preempted after drawing some of their tokens.
    assert {"2", "3", "4"} <= {rid for rid, generated in preempted if 0 < generated < 200}
    assert engine.pool.in_use == 0
    for (tokens, text, events), (want_tokens, want_text, want_events) in zip(
            together, expected, strict=True):
        assert (tokens, text) == (want_tokens, want_text)
        assert events[-1].completion_tokens == want_events[-1].completion_tokens
    assert together[2][0] != together[3][0]  # the siblings drew differently
