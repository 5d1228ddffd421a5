"""The OpenAI API layer alone: request fields as vLLM reads them, and the stream's events,
over a scripted engine in this process (no model, no compile)."""

import asyncio
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from aiohttp import web

from scaling.data.tokenizer import ByteTokenizer
from scaling.engine import Event
from scaling.serving import lm_server, openai_api
from scaling.serving.chat import ChatTemplate
from scaling.serving.protocol import Limits


def parse(body: dict, chat: bool = False, defaults=None) -> openai_api.ParsedRequest:
    base = {"model": "m", **({"messages": [{"role": "user", "content": "hi"}]} if chat
                             else {"prompt": "hi"})}
    return openai_api.parse({**base, **body}, chat, 16, defaults)


def test_fields_become_vllm_sampling_params():
    parsed = parse({"stop_token_ids": [7], "min_tokens": 2, "include_stop_str_in_output": True,
                    "skip_special_tokens": False, "logit_bias": {"5": 250, "6": -3},
                    "presence_penalty": 0.5, "frequency_penalty": -0.5,
                    "repetition_penalty": 1.2, "top_k": -1, "n": 3, "seed": 9, "min_p": 0.1})
    params = parsed.params
    assert params.stop_token_ids == (7,) and params.min_tokens == 2
    assert params.include_stop_str_in_output and not params.skip_special_tokens
    assert params.logit_bias == ((5, 100.0), (6, -3.0))  # clamped to ±100 as vLLM does
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == \
        (0.5, -0.5, 1.2)
    assert params.top_k == 0 and parsed.n == 3 and params.seed == 9 and params.min_p == 0.1
    echo = parse({"echo": True, "max_tokens": 0, "logprobs": 3})
    assert echo.params.prompt_logprobs == 3 and echo.params.max_tokens == 0


def test_chat_leaves_max_tokens_to_the_context_and_takes_the_models_defaults():
    assert parse({}, chat=True).max_tokens is None
    assert parse({}).max_tokens == 16  # completions keep the API's default
    defaults = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 40}
    parsed = parse({"top_p": None}, chat=True, defaults=defaults)
    assert (parsed.params.temperature, parsed.params.top_p, parsed.max_tokens) == \
        (0.6, 0.9, 40)
    assert parse({"temperature": 0}, defaults=defaults).params.temperature == 0


def test_usage_is_asked_for_and_nulls_are_defaults():
    assert not parse({"stream": True}).include_usage
    assert parse({"stream": True, "stream_options": {"include_usage": True}}).include_usage
    parsed = parse({"n": None, "stream": None, "stop": None, "logprobs": None, "seed": None})
    assert parsed.n == 1 and not parsed.stream and parsed.params.stop == ()


@pytest.mark.parametrize("body, param", [
    ({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"), ({"logprobs": 21}, "logprobs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logit_bias": {"a": 1}}, "logit_bias"), ({"prompt": [[1, 2], "a", 3]}, "prompt"),
    ({"tools": []}, "tools"), ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 20}, "min_tokens"),
])
def test_refusals_name_the_field(body, param):
    with pytest.raises(openai_api.ApiError) as raised:
        parse(body)
    assert raised.value.status == 400 and raised.value.param == param


def test_chat_content_parts_and_tools():
    parsed = parse({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}, chat=True)
    assert parsed.prompts[0][0]["content"] == "a\nb"
    for body, param in [({"tools": [{"type": "function"}]}, "tool_choice"),
                        ({"tool_choice": {"type": "function"}}, "tool_choice"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                         "messages[0].content[0]")]:
        with pytest.raises(openai_api.ApiError) as raised:
            parse(body, chat=True)
        assert raised.value.param == param
    shown = parse({"tools": [{"type": "function"}], "tool_choice": "none"}, chat=True)
    assert shown.chat_options.tools == [{"type": "function"}]


class ScriptedEngine:
    """Answers each request with `script(request)`'s events, from another thread."""

    def __init__(self, script):
        self.script = script
        self.tokenizer = ByteTokenizer()
        self.layout = types.SimpleNamespace(max_seq_len=64)
        self.submitted = []
        self.aborted = []

    def submit_many(self, requests):
        self.submitted += requests
        for request in requests:
            threading.Thread(target=lambda r=request: [r.on_event(e) for e in self.script(r)],
                             daemon=True).start()

    def abort(self, request_id):
        self.aborted.append(request_id)


@pytest.fixture
def serve_scripted():
    started = []

    def start(script, allowed_origins=()):
        engine = ScriptedEngine(script)
        service = lm_server.LanguageModelService(engine, "m", ChatTemplate(None), 16)
        app = lm_server.make_app(service, Limits(1 << 20, 16, 10.0), ThreadPoolExecutor(1),
                                 allowed_origins)
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        threading.Thread(target=loop.run_forever, daemon=True).start()
        started.append((loop, runner))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=30)
        client.port = port
        return engine, client

    yield start
    for loop, runner in started:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


def test_an_engine_failure_mid_stream_is_an_error_event(serve_scripted):
    def script(request):
        return [Event(request.request_id, "ab", (97, 98)),
                Event(request.request_id, "", (), finish_reason="error")]

    engine, client = serve_scripted(script)
    stream = client.completions.create(model="m", prompt="x", max_tokens=5, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="engine failed"):
        for chunk in stream:
            received.append(chunk.choices[0].text)
    assert received == ["ab"]
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="m", prompt="x", max_tokens=5)


def test_n_choices_stream_with_their_index_and_usage_last(serve_scripted):
    def script(request):
        k = int(request.request_id.rsplit("-", 1)[1])
        return [Event(request.request_id, f"c{k}", (99,)),
                Event(request.request_id, "", (), finish_reason="length", prompt_tokens=2,
                      completion_tokens=1)]

    engine, client = serve_scripted(script)
    chunks = list(client.completions.create(model="m", prompt=["x", "y"], n=2, max_tokens=1,
                                            seed=3, stream=True,
                                            stream_options={"include_usage": True}))
    texts = {}
    for chunk in chunks[:-1]:
        texts[chunk.choices[0].index] = texts.get(chunk.choices[0].index, "") + \
            chunk.choices[0].text
    assert texts == {0: "c0", 1: "c1", 2: "c2", 3: "c3"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 2  # each prompt once, not once per choice
    seeds = sorted(r.params.seed for r in engine.submitted)
    assert seeds == [3, 3, 4, 4]  # choice j of each prompt draws with seed + j, as vLLM


def test_allowed_origins_get_cross_origin_answers_and_others_do_not(serve_scripted):
    import http.client

    def script(request):
        return [Event(request.request_id, "ok", (1,), finish_reason="length", prompt_tokens=1,
                      completion_tokens=1)]

    _, client = serve_scripted(script, allowed_origins=("https://app.example",))

    def send(method, origin, extra=None):
        connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
        body = b'{"model": "m", "prompt": "x"}' if method == "POST" else None
        connection.request(method, "/v1/completions", body=body, headers={
            "Origin": origin, "Content-Type": "application/json", **(extra or {})})
        response = connection.getresponse()
        response.read()
        connection.close()
        return response.status, response.getheader("Access-Control-Allow-Origin")

    preflight = {"Access-Control-Request-Method": "POST"}
    assert send("OPTIONS", "https://app.example", preflight) == (204, "https://app.example")
    assert send("POST", "https://app.example") == (200, "https://app.example")
    assert send("POST", "https://other.example") == (200, None)
    assert send("OPTIONS", "https://other.example", preflight)[0] == 403
