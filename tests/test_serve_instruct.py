"""An imported instruct model served as vLLM serves it, checked through the `openai` client.

The model is `tests/fixtures/hf/llama3_instruct`: a tiny Llama-3-style chat model saved by
transformers 5, with its template in `chat_template.jinja`, `<|eot_id|>` among the end ids
of its `generation_config.json`, and transformers' own greedy replies and prompt
log-probabilities in `reference.json` (made by `tests/fixtures/hf/make_instruct_fixture.py`).
"""

import concurrent.futures
import json
import re
import urllib.request

import openai
import pytest
from conftest import REPO
from serve_process import ServeProcess

from scaling.data.tokenizer import HuggingFaceTokenizer

# The tests share a module fixture that is costly to build: one worker builds it once.
pytestmark = pytest.mark.xdist_group("serve_instruct")

MODEL_DIR = REPO / "tests" / "fixtures" / "hf" / "llama3_instruct"
REFERENCE = json.loads((MODEL_DIR / "reference.json").read_text())
SERVER_FLAGS = ["--max_num_seqs=4", "--kv_block_size=8", "--prefill_chunk=32"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ServeProcess(tmp_path_factory.mktemp("instruct_server"), f"--model={MODEL_DIR}",
                           *SERVER_FLAGS)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def model(server) -> str:
    status, models = server.request("GET", "/v1/models")
    assert status == 200
    return models["data"][0]["id"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                         max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    return HuggingFaceTokenizer(str(MODEL_DIR / "tokenizer.json"))


def metric(server, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as response:
        text = response.read().decode()
    return float(re.search(rf"^scaling_{name} (\S+)", text, re.M).group(1))


@pytest.mark.parametrize("case", range(len(REFERENCE["chats"])))
def test_chat_replies_equal_transformers_and_stop_at_the_end_of_turn(client, model, case):
    chat = REFERENCE["chats"][case]
    reply = client.chat.completions.create(model=model, messages=chat["messages"],
                                           temperature=0)  # no max_tokens: the room left
    assert reply.choices[0].message.content == chat["text"]
    assert reply.choices[0].finish_reason == chat["finish_reason"] == "stop"
    assert reply.usage.prompt_tokens == len(chat["prompt_ids"])  # one BOS, pieces as tokens
    assert reply.usage.completion_tokens == len(chat["generated_ids"])  # the eot id counts


def test_client_rendered_prompts_parse_their_special_pieces(client, model):
    for completion in REFERENCE["completions"]:
        got = client.completions.create(model=model, prompt=completion["prompt"],
                                        temperature=0, max_tokens=REFERENCE["max_new_tokens"])
        assert got.usage.prompt_tokens == len(completion["prompt_ids"])
        assert got.choices[0].text == completion["text"]
        assert got.choices[0].finish_reason == completion["finish_reason"]


def test_tokenize_counts_as_transformers(server, model):
    completion = REFERENCE["completions"][0]
    status, body = server.request("POST", "/tokenize", {"model": model,
                                                        "prompt": completion["prompt"]})
    assert status == 200 and body["tokens"] == completion["prompt_ids"]
    chat = REFERENCE["chats"][0]
    status, body = server.request("POST", "/tokenize", {"model": model,
                                                        "messages": chat["messages"]})
    assert status == 200 and body["tokens"] == chat["prompt_ids"]
    status, body = server.request("POST", "/detokenize", {"tokens": chat["prompt_ids"]})
    assert status == 200 and body["prompt"] == chat["prompt_text"]


@pytest.mark.parametrize("case", range(len(REFERENCE["completions"])))
def test_echoed_prompt_logprobs_equal_transformers(client, model, case):
    """What lm-eval's local-completions model asks for every log-likelihood."""
    completion = REFERENCE["completions"][case]
    got = client.completions.create(model=model, prompt=completion["prompt_ids"], echo=True,
                                    max_tokens=0, logprobs=5, temperature=0)
    logprobs = got.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(completion["prompt_logprobs"][1:],
                                                        abs=1e-4)
    assert len(logprobs.tokens) == len(completion["prompt_ids"])
    for top, expected in zip(logprobs.top_logprobs[1:], completion["prompt_top_logprobs"][1:],
                             strict=True):
        best = max(lp for _, lp in expected)
        assert max(top.values()) == pytest.approx(best, abs=1e-4)
    assert got.usage.completion_tokens == 0
    # With generation after the echo: the prompt's text, then the reply's.
    both = client.completions.create(model=model, prompt=completion["prompt"], echo=True,
                                     max_tokens=REFERENCE["max_new_tokens"], temperature=0)
    assert both.choices[0].text == completion["prompt"] + completion["text"]


def test_the_tutorial_stream_loop_and_the_usage_chunk(client, model):
    chat = REFERENCE["chats"][1]
    pieces = []
    for chunk in client.chat.completions.create(model=model, messages=chat["messages"],
                                                temperature=0, stream=True):
        pieces.append(chunk.choices[0].delta.content or "")  # never an empty choices list
    assert "".join(pieces) == chat["text"]
    chunks = list(client.chat.completions.create(model=model, messages=chat["messages"],
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and all(c.choices for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == len(chat["generated_ids"])
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop"


def test_n_choices_share_one_prefill_and_repeat_with_their_seed(server, client, model):
    messages = REFERENCE["chats"][5]["messages"]  # unseen in training: a wide distribution
    before = metric(server, "prompt_tokens_computed_total")
    first = client.chat.completions.create(model=model, messages=messages, n=4, seed=11,
                                           temperature=2.0, max_tokens=12)
    computed = metric(server, "prompt_tokens_computed_total") - before
    prompt = first.usage.prompt_tokens
    assert prompt == len(REFERENCE["chats"][5]["prompt_ids"])
    assert computed <= prompt + 3  # the three siblings compute only their last prompt token
    again = client.chat.completions.create(model=model, messages=messages, n=4, seed=11,
                                           temperature=2.0, max_tokens=12)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice draws with its own seed
    assert first.usage.completion_tokens == again.usage.completion_tokens


def test_a_batch_of_prompts_answers_each_at_its_index(client, model, tokenizer):
    completions = REFERENCE["completions"]
    got = client.completions.create(model=model, prompt=[c["prompt"] for c in completions],
                                    temperature=0, max_tokens=REFERENCE["max_new_tokens"])
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == \
        [c["text"] for c in completions]
    assert got.usage.prompt_tokens == sum(len(c["prompt_ids"]) for c in completions)
    ids = [c["prompt_ids"] for c in completions]
    by_ids = client.completions.create(model=model, prompt=ids, temperature=0,
                                       max_tokens=REFERENCE["max_new_tokens"])
    assert [c.text for c in by_ids.choices] == [c.text for c in got.choices]


@pytest.mark.parametrize("stream", [False, True])
def test_an_unfinished_character_is_flushed_as_decode_gives_it(client, model, tokenizer,
                                                                stream):
    lead = tokenizer._tokenizer.token_to_id("Ã")  # byte 0xC3: the first of two UTF-8 bytes
    assert lead is not None
    kwargs = {"model": model, "prompt": "The sky is", "max_tokens": 1,
              "logit_bias": {str(lead): 100}, "temperature": 0}
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(**kwargs,
                                                                            stream=True))
    else:
        text = client.completions.create(**kwargs).choices[0].text
    assert text == tokenizer.decode([lead]) == "\ufffd"


def test_stop_ids_min_tokens_and_special_pieces_as_vllm(client, model, tokenizer):
    chat = REFERENCE["chats"][0]
    eot = REFERENCE["special_token_ids"]["<|eot_id|>"]
    longer = client.chat.completions.create(model=model, messages=chat["messages"],
                                            temperature=0, max_tokens=4,
                                            extra_body={"ignore_eos": True})
    assert longer.choices[0].finish_reason == "length"
    kept = client.chat.completions.create(
        model=model, messages=chat["messages"], temperature=0, max_tokens=12,
        extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert "<|eot_id|>" in kept.choices[0].message.content
    assert kept.choices[0].message.content.startswith(chat["text"])
    first = chat["generated_ids"][0]
    stopped = client.chat.completions.create(model=model, messages=chat["messages"],
                                             temperature=0, extra_body={"stop_token_ids": [first]})
    assert stopped.choices[0].message.content == "" and \
        stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].stop_reason == first  # vLLM names the id that stopped it
    assert chat["generated_ids"][-1] == eot
    at_least = client.chat.completions.create(
        model=model, messages=chat["messages"], temperature=0, max_tokens=20,
        extra_body={"min_tokens": len(chat["generated_ids"]) + 2})
    assert at_least.usage.completion_tokens >= len(chat["generated_ids"]) + 2
    assert at_least.choices[0].message.content.startswith(chat["text"])


REFUSED = [
    ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_tokens": 100000}, "max_tokens"), ({"logprobs": 21}, "logprobs"),
    ({"min_p": 1.5}, "min_p"), ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"echo": True, "max_tokens": 0, "prompt": ""}, "prompt"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
]
REFUSED_CHAT = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"), ({"echo": True}, "echo"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:,"}}]}]}, "messages[0].content[0]"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"chat_template": "{{ 1 }}"}, "chat_template"),
]


@pytest.mark.parametrize("fields, param", REFUSED, ids=[p for _, p in REFUSED])
def test_refused_completions_fields_name_themselves(server, model, fields, param):
    status, body = server.request("POST", "/v1/completions",
                                  {"model": model, "prompt": "The sky is", **fields})
    assert status == 400, body
    assert body["error"]["param"] == param and param in body["error"]["message"]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health") as response:
        assert response.status == 200  # the server stays up


@pytest.mark.parametrize("fields, param", REFUSED_CHAT, ids=[p for _, p in REFUSED_CHAT])
def test_refused_chat_fields_name_themselves(server, model, fields, param):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **fields}
    status, answer = server.request("POST", "/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param


def test_explicit_nulls_text_parts_and_tools_shown_to_the_template(server, client, model):
    nulls = {key: None for key in (
        "n", "stream", "stream_options", "logprobs", "top_logprobs", "temperature", "top_p",
        "seed", "stop", "max_tokens", "max_completion_tokens", "presence_penalty",
        "frequency_penalty", "logit_bias", "user", "response_format", "tools", "tool_choice",
        "best_of", "suffix")}
    chat = REFERENCE["chats"][0]
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]}
             for m in chat["messages"]]
    status, body = server.request("POST", "/v1/chat/completions", {
        "model": model, "messages": parts, **nulls, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == chat["text"]
    tool_use = REFERENCE["tool_use"]
    status, body = server.request("POST", "/tokenize", {
        "model": model, "messages": tool_use["messages"], "tools": tool_use["tools"],
        "tool_choice": "none"})
    assert status == 200 and body["tokens"] == tool_use["prompt_ids"]
    reply = client.chat.completions.create(model=model, messages=tool_use["messages"],
                                           tools=tool_use["tools"], tool_choice="none",
                                           max_tokens=3, temperature=0)
    assert reply.usage.prompt_tokens == len(tool_use["prompt_ids"])


def test_concurrent_streams_carry_the_same_text_as_alone(client, model):
    chats = REFERENCE["chats"]

    def ask(chat):
        stream = client.chat.completions.create(model=model, messages=chat["messages"],
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with concurrent.futures.ThreadPoolExecutor(len(chats)) as pool:
        assert list(pool.map(ask, chats)) == [c["text"] for c in chats]


CHAT = REFERENCE["chats"][1]["messages"]
# One request per honoured field of docs/serving.md's table, each sent whole and streamed.
HONOURED = [
    ("completions", {"max_tokens": 5}), ("chat", {"max_completion_tokens": 5}),
    ("completions", {"temperature": 1.5, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                     "seed": 7}),
    ("chat", {"temperature": 1.5, "seed": 7, "n": 2}), ("completions", {"n": 3, "seed": 1}),
    ("completions", {"best_of": 2, "n": 2, "seed": 2}), ("completions", {"stop": [" is"]}),
    ("chat", {"stop": "apple"}), ("chat", {"stop_token_ids": [300]}),
    ("chat", {"ignore_eos": True, "max_tokens": 9}), ("chat", {"min_tokens": 10}),
    ("completions", {"stop": [" is"], "include_stop_str_in_output": True}),
    ("chat", {"skip_special_tokens": False, "ignore_eos": True, "max_tokens": 12}),
    ("completions", {"logprobs": 3}), ("chat", {"logprobs": True, "top_logprobs": 2}),
    ("completions", {"echo": True, "logprobs": 2}), ("completions", {"logit_bias": {"70": 5}}),
    ("chat", {"presence_penalty": 1.0, "frequency_penalty": 0.5}),
    ("chat", {"repetition_penalty": 1.3}), ("completions", {"add_special_tokens": False}),
    ("chat", {"add_generation_prompt": True, "chat_template_kwargs": {"unused": 1},
              "documents": []}),
    ("chat", {"user": "u", "metadata": {"a": "b"}, "store": False,
              "parallel_tool_calls": False, "response_format": {"type": "text"}}),
]


@pytest.mark.parametrize("route, fields", HONOURED,
                         ids=[f"{r}-{'-'.join(f)}" for r, f in HONOURED])
def test_every_honoured_field_answers_alike_whole_and_streamed(server, model, route, fields):
    """Sampling rows carry a seed, so the two answers must be the same text, choice for
    choice; a stream ends each choice once, with the same finish reason."""
    chat = route == "chat"
    body = {"model": model, "temperature": 0, **fields,
            **({"messages": CHAT} if chat else {"prompt": "The sky is"})}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, whole = server.request("POST", path, body)
    assert status == 200, whole
    texts = {c["index"]: (c["message"]["content"] if chat else c["text"])
             for c in whole["choices"]}
    reasons = {c["index"]: c["finish_reason"] for c in whole["choices"]}
    assert sorted(texts) == list(range(fields.get("n", 1)))
    streamed, ended = stream_texts(server, path, body, chat)
    assert streamed == texts and ended == reasons


def stream_texts(server, path, body, chat) -> tuple[dict, dict]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", path, body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    texts, reasons = {}, {}
    for line in response.read().decode().splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        for choice in chunk["choices"]:
            piece = (choice["delta"].get("content") or "") if chat else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
            if choice["finish_reason"] is not None:
                assert choice["index"] not in reasons
                reasons[choice["index"]] = choice["finish_reason"]
    connection.close()
    return texts, reasons
