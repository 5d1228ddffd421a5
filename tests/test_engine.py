"""The serving engine: continuous batching over a paged KV cache gives `--mode=sample`'s tokens.

A random small transformer stands in for a trained one: greedy equality holds token for token
whatever the weights, and random weights make ties (where float rounding could pick either
token) as rare as trained ones do.
"""

import collections
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling import engine as engine_lib
from scaling.data.tokenizer import ByteTokenizer
from scaling.engine.blocks import BlockPool
from scaling.engine.requests import TextStream
from scaling.errors import UserError
from scaling.inference import sample
from scaling.models.transformer import Transformer, TransformerConfig

CONFIG = TransformerConfig(vocab_size=260, num_layers=2, embed_dim=64, num_heads=4,
                           num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=128)
TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(CONFIG)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


def one_device_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def make(model_and_params, warm_up=True, **options):
    model, params = model_and_params
    return engine_lib.make_engine(model, params, one_device_mesh(), (("batch", "data"),),
                                  TOKENIZER, engine_lib.EngineOptions(**options), warm_up)


def run_all(engine, requests):
    """Submits (prompt ids, SamplingParams) pairs at once; returns each request's tokens and
    last event, in order."""
    tokens = {i: [] for i in range(len(requests))}
    last, done = {}, threading.Event()

    def collect(i):
        def on_event(event):
            tokens[i].extend(event.token_ids)
            if event.finish_reason:
                last[i] = event
                if len(last) == len(requests):
                    done.set()
        return on_event

    for i, (prompt, params) in enumerate(requests):
        engine.submit(engine_lib.Request(str(i), list(prompt), params, collect(i)))
    assert done.wait(120), f"only {len(last)} of {len(requests)} requests finished"
    return [tokens[i] for i in range(len(requests))], [last[i] for i in range(len(requests))]


def reference(model_and_params, prompt, num_new):
    """`--mode=sample`'s greedy tokens (one prompt at a time)."""
    model, params = model_and_params
    out = sample.generate(model, params, jnp.asarray([prompt], jnp.int32),
                          0, jnp.asarray(0), num_new=num_new,
                          temperature=0.0, top_k=0, vocab_limit=TOKENIZER.vocab_size)
    return np.asarray(out)[0].tolist()


def recomputed(model_and_params, prompts, max_tokens):
    """Greedy tokens with no cache at all: the whole padded context through the model for
    every token (causal, so the padding after the text changes nothing). One program."""
    model, params = model_and_params
    context = model.config.max_seq_len
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    out = []
    for prompt, num_new in zip(prompts, max_tokens, strict=True):
        tokens = list(prompt)
        for _ in range(num_new):
            padded = np.zeros((1, context), np.int32)
            padded[0, :len(tokens)] = tokens
            logits = np.asarray(forward(padded))[0, len(tokens) - 1, :TOKENIZER.vocab_size]
            tokens.append(int(np.argmax(logits)))
        out.append(tokens[len(prompt):])
    return out


def teacher_forced(model_and_params, prompts, outputs):
    """The model's greedy choice at every generated position, given the tokens before it, with
    no cache: one full-context forward per request. Equal to `outputs` exactly when each output
    is the greedy continuation, as `recomputed` checks with a forward per token."""
    model, params = model_and_params
    context = model.config.max_seq_len
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    out = []
    for prompt, generated in zip(prompts, outputs, strict=True):
        tokens = list(prompt) + list(generated)
        padded = np.zeros((1, context), np.int32)
        padded[0, :len(tokens)] = tokens
        logits = np.asarray(forward(padded))[0, :, :TOKENIZER.vocab_size]
        positions = range(len(prompt) - 1, len(tokens) - 1)
        out.append([int(np.argmax(logits[i])) for i in positions])
    return out


def greedy(max_tokens):
    return engine_lib.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


PROMPT_LENGTHS = (1, 2, 7, 8, 9, 31, 64, 100, 3, 17, 45, 5)
MAX_TOKENS = (20, 5, 27, 11, 3, 40, 30, 27, 1, 16, 9, 33)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def references(model_and_params, prompts):
    tokens = recomputed(model_and_params, prompts, MAX_TOKENS)
    for i in (0, 7):  # and --mode=sample agrees
        assert reference(model_and_params, prompts[i], MAX_TOKENS[i]) == tokens[i]
    return tokens


def test_32_concurrent_prompts_of_1_to_2000_tokens_give_the_uncached_tokens():
    """Long prompts prefilled in chunks beside running streams: every request's greedy
    tokens equal the model's without any cache."""
    import dataclasses

    config = dataclasses.replace(CONFIG, max_seq_len=2048, num_layers=1)
    model = Transformer(config)
    params = model.init(jax.random.PRNGKey(5), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(7)
    lengths = np.linspace(1, 2000, 32).astype(int)
    prompts = [rng.integers(0, 256, n).tolist() for n in lengths]
    max_tokens = [int(m) for m in rng.integers(1, 9, 32)]
    engine = make((model, params), warm_up=False, max_num_seqs=8, kv_block_size=16,
                  prefill_chunk=256)
    engine.start()
    try:
        tokens, _ = run_all(engine, [(p, greedy(m)) for p, m in
                                     zip(prompts, max_tokens, strict=True)])
    finally:
        engine.stop()
    assert [len(t) for t in tokens] == max_tokens
    assert tokens == teacher_forced((model, params), prompts, tokens)
    assert engine.pool.in_use == 0


@pytest.mark.parametrize("options", [
    {"max_num_seqs": 4, "kv_block_size": 8, "prefill_chunk": 16},
    {"max_num_seqs": 16, "kv_block_size": 32, "prefill_chunk": 128, "warm_up": False},
    {"max_num_seqs": 2, "kv_block_size": 4, "prefill_chunk": 32, "num_kv_blocks": 40,
     "warm_up": False},
], ids=["chunked", "one_batch", "few_blocks"])
def test_concurrent_greedy_requests_equal_sample_mode(model_and_params, prompts, references,
                                                      options):
    engine = make(model_and_params, **options)
    engine.start()
    try:
        tokens, last = run_all(engine, [(p, greedy(m)) for p, m in
                                        zip(prompts, MAX_TOKENS, strict=True)])
    finally:
        engine.stop()
    assert tokens == references
    assert [e.finish_reason for e in last] == ["length"] * len(prompts)
    assert [e.completion_tokens for e in last] == list(MAX_TOKENS)
    assert engine.pool.in_use == 0 and engine._promised == 0  # every block came back
    if options.get("num_kv_blocks"):
        # 40 blocks of 4 cannot hold two of the longest requests at once: some waited.
        assert engine.stats.decode_steps > max(MAX_TOKENS)


def test_a_burst_of_short_prompts_is_prefilled_in_one_step(model_and_params, prompts,
                                                           references):
    """Seven prompts of up to 16 tokens arrive together: one prefill step of eight rows of
    16 holds them all (a chunk of 128 tokens), and each still gets its own greedy tokens."""
    engine = make(model_and_params, warm_up=False, max_num_seqs=8, kv_block_size=8,
                  prefill_chunk=128)
    short = [i for i, p in enumerate(prompts) if len(p) <= 16]
    assert len(short) == 7
    tokens = {i: [] for i in short}
    done = threading.Event()

    def collect(i):
        def on_event(event):
            tokens[i].extend(event.token_ids)
            if event.finish_reason and all(len(tokens[j]) == MAX_TOKENS[j] for j in short):
                done.set()
        return on_event

    for i in short:  # all queued before the loop starts: they arrive together
        engine.submit(engine_lib.Request(str(i), prompts[i], greedy(MAX_TOKENS[i]), collect(i)))
    engine.start()
    try:
        assert done.wait(120)
    finally:
        engine.stop()
    assert engine.stats.prefill_steps == 1
    assert engine.stats.prefill_tokens == sum(len(prompts[i]) for i in short)
    assert [tokens[i] for i in short] == [references[i] for i in short]


def test_no_request_compiles_after_warm_up(model_and_params, prompts):
    engine = make(model_and_params, max_num_seqs=4, kv_block_size=8, prefill_chunk=32)
    programs = engine.programs
    # and a sampler per row count, the program that readies a slot's sampling state, the
    # one that copies a block, and one that passes tokens on per pair of decode row counts
    row_counts = {rows for rows, _, _ in programs.shapes()}
    extra = len(row_counts) + 2 + len(engine.layout.decode_rows) ** 2
    assert programs.compiles == len(programs.shapes()) + extra
    compiles = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    engine.start()
    try:
        sampled = engine_lib.SamplingParams(max_tokens=9, temperature=0.8, top_k=20, top_p=0.9,
                                            seed=1, logprobs=3, ignore_eos=True, min_tokens=2,
                                            presence_penalty=0.5, logit_bias=((7, 1.0),))
        run_all(engine, [(p, greedy(5) if i % 2 else sampled) for i, p in enumerate(prompts)])
    finally:
        engine.stop()
        jax.monitoring.clear_event_listeners()
    assert compiles == [] and programs.compiles == len(programs.shapes()) + extra


def test_a_seed_gives_the_same_text_alone_and_under_load(model_and_params, prompts):
    engine = make(model_and_params, warm_up=False, max_num_seqs=4, kv_block_size=8,
                  prefill_chunk=16)
    params = engine_lib.SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.95,
                                       seed=7, ignore_eos=True)
    other = engine_lib.SamplingParams(max_tokens=24, temperature=1.0, seed=8, ignore_eos=True)
    engine.start()
    try:
        (alone,), _ = run_all(engine, [(prompts[3], params)])
        loaded, _ = run_all(engine, [(p, other) for p in prompts[:5]] + [(prompts[3], params)])
        (reseeded,), _ = run_all(engine, [(prompts[3], other)])
    finally:
        engine.stop()
    assert loaded[-1] == alone
    assert reseeded != alone
    assert all(0 <= t < TOKENIZER.vocab_size for t in alone)


def test_a_shared_prefix_is_prefilled_once(model_and_params):
    big = TransformerConfig(**{**CONFIG.__dict__, "max_seq_len": 1280})
    model = Transformer(big)
    _, params = model_and_params
    engine = engine_lib.make_engine(model, params, one_device_mesh(), (("batch", "data"),),
                                    TOKENIZER, engine_lib.EngineOptions(
                                        max_num_seqs=2, kv_block_size=16, prefill_chunk=256),
                                    warm_up=False)
    rng = np.random.default_rng(2)
    prefix = rng.integers(0, 256, 1000).tolist()
    first, second = prefix + [1, 2, 3], prefix + [4, 5, 6, 7, 8]
    engine.start()
    try:
        (first_tokens,), (first_event,) = run_all(engine, [(first, greedy(4))])
        computed = engine.stats.prefill_tokens
        (second_tokens,), (second_event,) = run_all(engine, [(second, greedy(4))])
    finally:
        engine.stop()
    assert computed == len(first) and first_event.cached_tokens == 0
    # 62 full blocks of 16 (992 tokens) are shared; only the rest of the prompt is computed.
    assert second_event.cached_tokens == 992
    assert engine.stats.prefill_tokens - computed == len(second) - 992
    outputs = [first_tokens, second_tokens]
    assert [len(t) for t in outputs] == [4, 4]
    assert outputs == teacher_forced((model, params), [first, second], outputs)


def test_the_block_pool_shares_full_prefix_blocks_and_evicts_the_oldest():
    pool = BlockPool(num_blocks=4, block_size=2)
    a = [pool.allocate() for _ in range(2)]
    key = pool.register(a[0], b"", [1, 2])
    pool.register(a[1], key, [3, 4])
    pool.release(a)
    assert pool.available == 4 and pool.in_use == 0
    shared, _ = pool.match_prefix([1, 2, 3, 4, 5], limit=2)
    assert shared == a and pool.in_use == 2
    assert pool.match_prefix([1, 2, 9, 9], limit=2)[0] == [a[0]]  # held twice now
    pool.release(shared)
    pool.release([a[0]])
    taken = [pool.allocate() for _ in range(4)]  # two never-cached blocks, then the oldest
    assert sorted(taken) == [0, 1, 2, 3]
    assert pool.match_prefix([1, 2, 3, 4], limit=2)[0] == []  # evicted, so no longer found


def test_stop_strings_end_the_text_before_them_and_hold_back_their_start():
    stream = TextStream(TOKENIZER, stop=("END",))
    out = []
    for char in "abcEN":
        assert not stream.add(ord(char))
        out.append(stream.take(final=False))
    assert "".join(out) == "abc"  # "EN" may begin the stop string: held back
    assert stream.add(ord("D"))
    assert "".join(out) + stream.take(final=True) == "abc"
    multibyte = TextStream(TOKENIZER, stop=())
    for byte in "é".encode():
        multibyte.add(byte)
    assert multibyte.take(final=True) == "é"


def test_a_full_queue_refuses_at_once(model_and_params):
    engine = make(model_and_params, warm_up=False, max_num_seqs=2, kv_block_size=8,
                  max_queue=2)
    for i in range(2):  # not started: nothing leaves the queue
        engine.submit(engine_lib.Request(str(i), [1, 2], greedy(2), lambda e: None))
    with pytest.raises(engine_lib.QueueFull):
        engine.submit(engine_lib.Request("2", [1, 2], greedy(2), lambda e: None))


@pytest.mark.parametrize("options, message", [
    ({"max_num_seqs": 0}, "--max_num_seqs=0"),
    ({"num_kv_blocks": 3, "kv_block_size": 16}, "--num_kv_blocks"),
])
def test_impossible_engine_options_are_user_errors(model_and_params, options, message):
    with pytest.raises(UserError, match=message):
        make(model_and_params, **options)


SHARDED = TransformerConfig(vocab_size=264, num_layers=2, embed_dim=64, num_heads=8,
                            num_kv_heads=4, head_dim=8, mlp_dim=128, max_seq_len=64)


@pytest.mark.parametrize("mesh", [{"tensor": 4, "data": 1}, {"tensor": 2, "data": 2}],
                         ids=["tensor=4", "tensor=2,data=2"])
def test_a_sharded_engine_gives_one_devices_tokens(mesh):
    import flax.linen as nn
    import ml_collections

    from scaling.config.schema import DEFAULT_SHARDING_RULES
    from scaling.sharding import mesh as mesh_lib

    model = Transformer(SHARDED)
    boxed = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"]
    mesh_config = ml_collections.ConfigDict(
        {axis: mesh.get(axis, 1) for axis in mesh_lib.MESH_AXES}
        | {f"dcn_{axis}": 1 for axis in mesh_lib.MESH_AXES})
    device_mesh = mesh_lib.make_mesh(mesh_config, jax.devices()[:4])
    rules = tuple(DEFAULT_SHARDING_RULES)
    params = jax.device_put(nn.meta.unbox(boxed),
                            mesh_lib.logical_shardings(boxed, device_mesh, rules))
    engine = engine_lib.make_engine(model, params, device_mesh, rules, TOKENIZER,
                                    engine_lib.EngineOptions(max_num_seqs=4, kv_block_size=8,
                                                             prefill_chunk=16), warm_up=False)
    pool = jax.tree.leaves(engine.programs.cache)[0]
    assert pool.sharding.shard_shape(pool.shape)[0] == SHARDED.num_kv_heads // mesh["tensor"]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 20, 9, 33, 1)]
    max_tokens = [12, 7, 20, 9, 15]
    engine.start()
    try:
        tokens, _ = run_all(engine, [(p, greedy(m)) for p, m in zip(prompts, max_tokens,
                                                                     strict=True)])
    finally:
        engine.stop()
    assert tokens == recomputed((model, nn.meta.unbox(boxed)), prompts, max_tokens)


def test_an_int8_cache_takes_under_a_third_of_the_bytes_and_keeps_the_greedy_tokens(
        model_and_params, prompts, references):
    float_engine = make(model_and_params, warm_up=False, max_num_seqs=4, kv_block_size=8)
    engine = make(model_and_params, warm_up=False, max_num_seqs=4, kv_block_size=8,
                  kv_cache_dtype="int8")
    # Head width 16: 16 int8 bytes and a 4-byte scale per vector, against 64 float32 bytes.
    assert engine.programs.cache_bytes / float_engine.programs.cache_bytes == \
        pytest.approx(20 / 64, rel=1e-6)
    engine.start()
    try:
        tokens, _ = run_all(engine, [(p, greedy(m)) for p, m in
                                     zip(prompts, MAX_TOKENS, strict=True)])
    finally:
        engine.stop()
    # Rounding can flip a near-tie, after which a sequence diverges: count the tokens up to
    # each sequence's first difference.
    agreed = sum(next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b),
                      len(want))
                 for got, want in zip(tokens, references, strict=True))
    assert agreed / sum(MAX_TOKENS) >= 0.9


def test_an_unknown_cache_dtype_names_the_flag(model_and_params):
    with pytest.raises(UserError, match="--kv_cache_dtype=fp4"):
        make(model_and_params, warm_up=False, kv_cache_dtype="fp4")


def test_overlapped_steps_give_the_tokens_and_text_of_steps_read_one_at_a_time(
        model_and_params, prompts):
    """The next step is dispatched before a stop is seen: the token computed past a stop
    string, a stop id or a stop at min_tokens is thrown away, never sent, and its blocks
    come back."""
    sampled = dict(temperature=1.0, top_k=30, ignore_eos=True)
    settings = [greedy(40),
                engine_lib.SamplingParams(max_tokens=40, seed=2, stop=("a", "e"), **sampled),
                engine_lib.SamplingParams(max_tokens=40, seed=3, stop_token_ids=(7, 9, 11, 13),
                                          **sampled),
                engine_lib.SamplingParams(max_tokens=40, seed=4, min_tokens=5,
                                          stop_token_ids=tuple(range(0, 256, 3)),
                                          presence_penalty=0.5, logprobs=2, **sampled),
                greedy(1), greedy(2)]
    requests = [(prompts[i], settings[i % len(settings)]) for i in range(len(prompts))]
    engine = make(model_and_params, warm_up=False, max_num_seqs=8, kv_block_size=8,
                  prefill_chunk=32)
    outputs, logprobs = {}, collections.defaultdict(list)
    engine.start()
    try:
        for overlap in (False, True):
            engine.overlap = overlap
            texts = {i: [] for i in range(len(requests))}
            done, finished = threading.Event(), []

            def collect(i, texts=texts, done=done, finished=finished, overlap=overlap):
                def on_event(event):
                    texts[i].append((event.text, event.token_ids,
                                     [(lp.token, [t for t, _ in lp.top]) for lp in event.logprobs]))
                    logprobs[overlap, i].extend(lp.logprob for lp in event.logprobs)
                    if event.finish_reason:
                        texts[i].append((event.finish_reason, event.stop_reason,
                                         event.completion_tokens))
                        finished.append(i)
                        if len(finished) == len(requests):
                            done.set()
                return on_event

            for i, (prompt, params) in enumerate(requests):
                engine.submit(engine_lib.Request(str(i), list(prompt), params, collect(i)))
            assert done.wait(120)
            outputs[overlap] = texts
    finally:
        engine.stop()
    assert outputs[True] == outputs[False]
    # Rows batch differently from run to run: logprobs agree to rounding.
    assert logprobs[True, 3]
    for i in range(len(requests)):
        assert np.allclose(logprobs[True, i], logprobs[False, i], atol=1e-4)
    reasons = [events[-1][0] for events in outputs[True].values()]
    assert "stop" in reasons and "length" in reasons  # stops came mid-run
    assert engine.pool.in_use == 0
