"""The language-model server through the official `openai` client, on loopback."""

import concurrent.futures
import contextlib
import io
import json
import re
import signal
import time
import urllib.request

import jax
import openai
import pytest
from serve_process import ServeProcess

from scaling.config import experiments as config_lib
from scaling.inference import sample
from scaling.training import loop

# The tests share a module fixture that is costly to build: one worker builds it once.
pytestmark = pytest.mark.xdist_group("serve_lm")

TINY = ["model.embed_dim=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.head_dim=8", "model.mlp_dim=64", "model.max_seq_len=96", "data.seq_len=32",
        "batch_size=8", "eval_batch_size=8", "num_steps=200", "steps_per_call=50",
        "log_every_steps=50", "eval_every_steps=200", "checkpoint_every_steps=200",
        "optimizer.warmup_steps=2", "data.eval_splits=('validation',)", "mesh.data=1"]
SERVER_FLAGS = ["--max_num_seqs=4", "--kv_block_size=8", "--prefill_chunk=32"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, shakespeare_dir):
    workdir = tmp_path_factory.mktemp("lm")
    config, module = config_lib.load_config(
        "shakespeare_char_lm", [*TINY, f"data.manual_dir={shakespeare_dir}"])
    with contextlib.redirect_stdout(io.StringIO()):
        loop.train_and_evaluate(config, workdir, module, devices=jax.devices()[:1])
    # Sampling in this process sees 8 devices: the same model over all of them.
    sample_config, _ = config_lib.load_config(
        "shakespeare_char_lm", [*TINY, f"data.manual_dir={shakespeare_dir}", "mesh.data=-1"])
    return {"workdir": workdir, "sample_config": sample_config, "module": module}


@pytest.fixture(scope="module")
def server(lm_run, tmp_path_factory):
    running = ServeProcess(tmp_path_factory.mktemp("lm_server"),
                           f"--workdir={lm_run['workdir']}", *SERVER_FLAGS)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                         max_retries=0, timeout=120)


def sampled(lm_run, prompt, max_tokens):
    """`--mode=sample --temperature=0`'s continuation of `prompt`."""
    options = sample.SampleOptions(prompt, max_tokens, 0.0, 0, 0)
    text = sample.sample_from_checkpoint(lm_run["sample_config"], lm_run["workdir"], options,
                                         lm_run["module"])
    assert text.startswith(prompt)
    return text[len(prompt):]


PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "A",
           "KING RICHARD III:\nNow is the winter of our discontent", "What, ho!", "O"]
MAX_TOKENS = [20, 7, 33, 12, 25, 16]


def test_concurrent_greedy_completions_equal_sample_mode(lm_run, client):
    def complete(prompt, max_tokens):
        return client.completions.create(model="shakespeare_char_lm", prompt=prompt,
                                         max_tokens=max_tokens, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(complete, PROMPTS, MAX_TOKENS))
    texts = [r.choices[0].text for r in responses]
    assert texts == [sampled(lm_run, p, m) for p, m in zip(PROMPTS, MAX_TOKENS, strict=True)]
    for response, prompt, max_tokens in zip(responses, PROMPTS, MAX_TOKENS, strict=True):
        assert response.usage.prompt_tokens == len(prompt)  # characters; no begin-of-document id
        if response.choices[0].finish_reason == "length":
            assert response.usage.completion_tokens == max_tokens


def test_a_stream_carries_the_same_text_and_ends_with_the_usage(client):
    kwargs = {"model": "shakespeare_char_lm", "prompt": "ROMEO:", "max_tokens": 20,
              "temperature": 0}
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert len([c for c in chunks if c.choices]) > 3  # piece by piece, not all at once
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens


def test_chat_uses_the_plain_template_and_streams(client):
    messages = [{"role": "system", "content": "Speak verse."},
                {"role": "user", "content": "Who is there?"}]
    reply = client.chat.completions.create(model="shakespeare_char_lm", messages=messages,
                                           max_tokens=12, temperature=0)
    rendered = "system: Speak verse.\nuser: Who is there?\nassistant:"
    assert reply.usage.prompt_tokens == len(rendered)
    assert reply.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="shakespeare_char_lm", messages=messages,
                                              max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        reply.choices[0].message.content


def test_sampling_settings_and_logprobs(client):
    kwargs = {"model": "shakespeare_char_lm", "prompt": "ROMEO:", "max_tokens": 16,
              "temperature": 0.9, "top_p": 0.9, "seed": 5, "extra_body": {"top_k": 10}}
    first, again = (client.completions.create(**kwargs) for _ in range(2))
    other = client.completions.create(**{**kwargs, "seed": 6})
    assert first.choices[0].text == again.choices[0].text != other.choices[0].text
    scored = client.completions.create(model="shakespeare_char_lm", prompt="ROMEO:",
                                       max_tokens=8, temperature=0, logprobs=2)
    logprobs = scored.choices[0].logprobs
    assert "".join(logprobs.tokens) == scored.choices[0].text
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    # Greedy: each chosen token is the most likely of its alternatives.
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                   logprobs.top_logprobs, strict=True):
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob)
        assert top[token] == pytest.approx(logprob)

    greedy = {"model": "shakespeare_char_lm", "prompt": "ROMEO:", "max_tokens": 40,
              "temperature": 0}
    text = client.completions.create(**greedy).choices[0].text
    # A stop string that first appears after the start: the text ends just before it.
    at = next(k for k in range(1, len(text) - 2) if text.find(text[k:k + 2]) == k)
    stopped = client.completions.create(**greedy, stop=["\x00never", text[at:at + 2]])
    assert stopped.choices[0].text == text[:at]
    assert stopped.choices[0].finish_reason == "stop"


def test_models_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["shakespeare_char_lm"]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as response:
        text = response.read().decode()
    for name in ("requests_received_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count",
                 "queue_depth", "kv_blocks_in_use"):
        assert re.search(rf"^scaling_{name}(\{{.*\}})? \d", text, re.M), name


@pytest.mark.parametrize("body, status, words", [
    (b'{"model": "shakespeare_char_lm", "prompt": ', 400, "not valid JSON"),
    (b'\xff\xfe{"model": 1}', 400, "not UTF-8"),
    ({"model": "shakespeare_char_lm", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"model": "shakespeare_char_lm", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "shakespeare_char_lm", "prompt": "a" * 200}, 400, "context is 96"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "not served here"),
    ({"model": "shakespeare_char_lm", "prompt": "a", "suffix": "b"}, 400, "suffix"),
    ({"model": "shakespeare_char_lm", "prompt": "a", "max_tokens": 96}, 400, "max_tokens"),
    ({"model": "shakespeare_char_lm"}, 400, "prompt"),
], ids=["malformed", "not_utf8", "wrong_type", "max_tokens", "too_long", "unknown_model",
        "suffix", "beyond_context", "no_prompt"])
def test_bad_requests_get_an_api_error_and_the_server_stays_up(server, body, status, words):
    got, answer = server.request("POST", "/v1/completions", body)
    assert got == status
    assert words in answer["error"]["message"] and answer["error"]["type"]
    assert server.request("GET", "/healthz")[0] == 200


def test_aborted_streams_free_their_slots_and_blocks(server):
    body = json.dumps({"model": "shakespeare_char_lm", "prompt": "ROMEO:", "max_tokens": 80,
                       "temperature": 0.5, "stream": True}).encode()

    def open_and_leave(_):
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/completions",
                                         data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            response.readline()  # the first event, then the client goes away

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(open_and_leave, range(100)))

    def gauge(name):
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as response:
            text = response.read().decode()
        return float(re.search(rf"^scaling_{name} (\S+)", text, re.M).group(1))

    deadline = time.monotonic() + 60
    while (gauge("kv_blocks_in_use") or gauge("running_requests")) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert gauge("kv_blocks_in_use") == 0 and gauge("running_requests") == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as response:
        aborted = re.search(r'^scaling_requests_finished_total\{reason="abort"\} (\S+)',
                            response.read().decode(), re.M).group(1)
    assert float(aborted) >= 90  # a few may have finished all 80 tokens before the close
    assert "Traceback" not in server.stderr.read_text()  # a client leaving is not an error


def test_sigterm_finishes_the_streams_in_flight_and_exits_0(lm_run, tmp_path):
    running = ServeProcess(tmp_path, f"--workdir={lm_run['workdir']}", *SERVER_FLAGS,
                           "--shutdown_grace_s=60")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{running.port}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    stream = client.completions.create(model="shakespeare_char_lm", prompt="ROMEO:",
                                       max_tokens=60, temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = [next(stream)]
    running.process.send_signal(signal.SIGTERM)
    chunks += list(stream)
    assert running.wait() == 0
    assert chunks[-1].usage.completion_tokens == 60
    assert "stopping: finishing the requests in flight" in running.output()


def test_an_imported_chat_template_renders_and_its_special_pieces_are_tokens(tmp_path):
    from conftest import REPO

    from scaling.data.tokenizer import HuggingFaceTokenizer
    from scaling.serving.chat import ChatTemplate

    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant] "
                "{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|end_of_text|>"}}))
    chat = ChatTemplate(tmp_path)
    text = chat.render([{"role": "user", "content": "hi"}])
    assert chat.kind == "model"
    assert text == "<|begin_of_text|>[user] hi<|end_of_text|>[assistant] "
    tokenizer = HuggingFaceTokenizer(str(REPO / "tests/fixtures/hf/llama/tokenizer.json"))
    ids = tokenizer.encode_prompt(text).tolist()
    assert ids[0] == tokenizer.bos_id and tokenizer.eos_id in ids
    assert tokenizer.bos_id not in tokenizer.encode(text).tolist()  # as a document: plain text
    assert ChatTemplate(tmp_path / "absent").render([{"role": "user", "content": "hi"}]) == \
        "user: hi\nassistant:"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_an_imported_hugging_face_model_serves_transformers_greedy_tokens(tmp_path, family):
    """Through `--mode=import_hf` and the server: the fixture's greedy continuation, as
    transformers made it (tests/fixtures/hf/make_fixtures.py), token for token."""
    from conftest import run_cli
    from test_hf import FIXTURES, write_experiment

    experiment = write_experiment(tmp_path, family)
    workdir = tmp_path / "imported"
    result = run_cli(f"--experiment={experiment}", "--mode=import_hf",
                     f"--source={FIXTURES / family}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads((FIXTURES / family / "reference.json").read_text())
    running = ServeProcess(tmp_path, f"--workdir={workdir}", f"--experiment={experiment}",
                           "--max_num_seqs=2", "--kv_block_size=4", "--prefill_chunk=8")
    try:
        status, body = running.request("POST", "/v1/completions", {
            "model": body_model(running), "prompt": reference["input_ids"],
            "max_tokens": len(reference["greedy"]), "temperature": 0, "ignore_eos": True,
            "logprobs": 0})
    finally:
        assert running.stop() == 0
    assert status == 200, body
    from scaling.data.tokenizer import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(str(FIXTURES / family / "tokenizer.json"))
    pieces = body["choices"][0]["logprobs"]["tokens"]
    assert pieces == [tokenizer.decode([token]) for token in reference["greedy"]]
    assert body["choices"][0]["text"] == tokenizer.decode(reference["greedy"])
    assert body["usage"]["prompt_tokens"] == len(reference["input_ids"])


def body_model(running) -> str:
    """The one model name the server answers to."""
    status, models = running.request("GET", "/v1/models")
    assert status == 200
    return models["data"][0]["id"]
