"""The OpenAI-compatible HTTP front end of the language-model engine.

    POST /v1/completions        prompt text, token ids, or a batch of either in; text out
    POST /v1/chat/completions   messages in (rendered by `scaling.serving.chat`), text out
    GET  /v1/models             the one model served
    POST /tokenize              text or messages to token ids, as vLLM's route
    POST /detokenize            token ids to text, as vLLM's route
    GET  /metrics               Prometheus text: requests, tokens, latencies, queue, cache
    GET  /health, /healthz      200 once the programs are compiled

Both generation routes take `stream: true` and then answer with server-sent events, one per
new piece of text of each choice, then the token counts when `stream_options.include_usage`
asks for them, and `data: [DONE]`. A failure inside the engine mid-stream arrives as an
`error` event (the `openai` client raises it), never as a normal end. Every mistake gets the
API's JSON error object with a 4xx, and the server carries on: a queue longer than
`--max_queue` gets 429 at once. A client that goes away mid-request has its requests aborted,
which frees their slots and cache blocks. SIGTERM or SIGINT stops listening, lets the
requests in flight finish (for at most `--shutdown_grace_s`), and exits 0.

The engine runs on its own thread (`scaling.engine.scheduler`); this module only translates,
so the event loop never waits on the devices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from scaling.engine import Engine, Event, QueueFull, Request, TokenLogprob
from scaling.serving import openai_api, protocol
from scaling.serving.chat import ChatTemplate
from scaling.serving.protocol import Limits


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt of a request, ready for the engine."""

    ids: list[int]
    max_tokens: int
    echo_text: str = ""


class LanguageModelService:
    """What the routes need: the engine, the tokenizer's text side, the chat template, the
    model's name and its own sampling defaults (generation_config.json)."""

    def __init__(self, engine: Engine, model_name: str, chat: ChatTemplate,
                 default_max_tokens: int, sampling_defaults: dict | None = None):
        self.engine = engine
        self.model_name = model_name
        self.chat = chat
        self.default_max_tokens = default_max_tokens
        self.sampling_defaults = dict(sampling_defaults or {})
        self.tokenizer = engine.tokenizer
        self.context = engine.layout.max_seq_len
        self.created = int(time.time())
        self.in_flight = 0

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def render(self, messages: list[dict], options: openai_api.ChatOptions) -> str:
        try:
            return self.chat.render(messages, options.add_generation_prompt,
                                    options.continue_final_message, options.tools,
                                    options.documents, options.template_kwargs)
        except ValueError as e:
            raise openai_api.ApiError(400, str(e), "messages") from None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Text's ids, its special pieces as their tokens, with the begin-of-text id first
        when asked for and the text does not already start with it."""
        ids = [int(t) for t in self.tokenizer.encode_prompt(text)]
        bos = self.tokenizer.bos_id
        if add_special_tokens and bos is not None and not (ids and ids[0] == bos):
            ids = [bos, *ids]
        return ids

    def prepare(self, parsed: openai_api.ParsedRequest, prompt) -> Prompt:
        """A prompt's ids and its budget of new tokens, refused when it does not fit."""
        param = "messages" if parsed.chat else "prompt"
        vocab = self.tokenizer.vocab_size
        for name, ids in (("logit_bias", [t for t, _ in parsed.params.logit_bias]),
                          ("stop_token_ids", parsed.params.stop_token_ids)):
            if ids and max(ids) >= vocab:
                raise openai_api.bad(name, f"token id {max(ids)} is outside the vocabulary "
                                     f"of {vocab}")
        if parsed.chat:
            ids = self.encode(self.render(prompt, parsed.chat_options),
                              parsed.add_special_tokens)
        elif isinstance(prompt, str):
            ids = self.encode(prompt, parsed.add_special_tokens)
        else:
            ids = list(prompt)
            if max(ids) >= self.tokenizer.vocab_size:
                raise openai_api.ApiError(400, f"prompt: token id {max(ids)} is outside the "
                                          f"vocabulary of {self.tokenizer.vocab_size}",
                                          "prompt")
        max_tokens = parsed.max_tokens
        if max_tokens is None:  # the room left in the context, as OpenAI and vLLM do
            max_tokens = self.context - len(ids)
        if len(ids) >= self.context + (max_tokens == 0):
            raise openai_api.ApiError(
                400, f"{param}: {len(ids)} tokens, but the model's context is {self.context} "
                f"(room is needed for at least one new token); shorten it", param,
                code="context_length_exceeded")
        if len(ids) + max_tokens > self.context:
            name = "max_tokens" if not parsed.chat else param
            raise openai_api.ApiError(
                400, f"max_tokens: the model's context is {self.context} tokens, but "
                f"{len(ids) + max_tokens} were asked for ({len(ids)} in the {param}, "
                f"{max_tokens} to generate); lower max_tokens or shorten the {param}", name,
                code="context_length_exceeded")
        echo = ""
        if parsed.echo:
            echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(
                ids, skip_special_tokens=False)
        return Prompt(ids, max_tokens, echo)

    def tokenize(self, body) -> dict:
        """vLLM's /tokenize: a prompt or messages to ids."""
        if not isinstance(body, dict):
            raise openai_api.ApiError(400, "the body must be a JSON object")
        if body.get("messages") is not None:
            parsed = openai_api.parse({**body, "model": self.model_name, "max_tokens": 1},
                                      True, 1)
            ids = self.encode(self.render(parsed.prompts[0], parsed.chat_options),
                              parsed.add_special_tokens)
        elif isinstance(body.get("prompt"), str):
            add = body.get("add_special_tokens")
            ids = self.encode(body["prompt"], True if add is None else bool(add))
        else:
            raise openai_api.bad("prompt", "required: a string (or messages)")
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids,
                "token_strs": None}

    def detokenize(self, body) -> dict:
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool)
                and 0 <= t < self.tokenizer.vocab_size for t in tokens):
            raise openai_api.bad("tokens", "required, a list of token ids of this vocabulary")
        return {"prompt": self.tokenizer.decode(tokens, skip_special_tokens=False)}


def error(e: openai_api.ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status)


def _decode_body(body: bytes, max_depth: int):
    depth = protocol.json_depth(body)
    if depth > max_depth:
        raise openai_api.ApiError(400, f"the body nests {depth} levels deep, over the limit "
                                  f"of {max_depth}")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise openai_api.ApiError(400, f"the body is not UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:
        raise openai_api.ApiError(400, f"the body is not valid JSON: {e}") from None


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _echoed(event: Event, prompt: Prompt) -> list[TokenLogprob]:
    """The prompt's logprobs as entries; the first token has none."""
    return [TokenLogprob(prompt.ids[0], None, ()) if entry is None else entry
            for entry in event.prompt_logprobs]


ENGINE_FAILED = "the engine failed while serving this request; the server log says why"


def make_app(service: LanguageModelService, limits: Limits, parser: ThreadPoolExecutor,
             allowed_origins: tuple[str, ...] = ()) -> web.Application:
    engine = service.engine

    async def read_json(request: web.Request):
        if request.content_length is not None and \
                request.content_length > limits.max_request_bytes:
            raise openai_api.ApiError(413, f"the body has {request.content_length} bytes, "
                                      f"over the limit of {limits.max_request_bytes}")
        try:
            body = await asyncio.wait_for(request.read(), limits.body_timeout_s)
        except TimeoutError:
            raise openai_api.ApiError(408, f"the body did not arrive within "
                                      f"{limits.body_timeout_s:g} s") from None
        return await asyncio.get_running_loop().run_in_executor(
            parser, _decode_body, body, limits.max_json_depth)

    async def read_request(request: web.Request, chat: bool) -> openai_api.ParsedRequest:
        decoded = await read_json(request)
        parsed = openai_api.parse(decoded, chat, service.default_max_tokens,
                                  service.sampling_defaults)
        if parsed.model != service.model_name:
            raise openai_api.ApiError(404, f"model: {parsed.model!r} is not served here; "
                                      f"this server serves {service.model_name!r}", "model",
                                      code="model_not_found")
        return parsed

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            parsed = await read_request(request, chat)
            prompts = [service.prepare(parsed, p) for p in parsed.prompts]
        except openai_api.ApiError as e:
            return error(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        builder = openai_api.ResponseBuilder(parsed, service.model_name, service.piece)
        choices: list[openai_api.Choice] = []
        requests: dict[int, Request] = {}
        for p, prompt in enumerate(prompts):
            for j in range(parsed.n):
                index = p * parsed.n + j
                choices.append(openai_api.Choice(index, p, len(prompt.ids),
                                                 prompt_text=prompt.echo_text))
                params = dataclasses.replace(parsed.params, max_tokens=prompt.max_tokens,
                                             seed=(parsed.params.seed + j) % (1 << 32))
                if prompt.max_tokens == 0 and params.prompt_logprobs is None:
                    choices[-1].finish_reason = "length"  # the echo alone: nothing to run
                    continue

                def deliver(event: Event, index=index) -> None:  # on the engine's thread
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))

                requests[index] = Request(f"{builder.request_id}-{index}", prompt.ids, params,
                                          deliver)
        try:
            engine.submit_many(list(requests.values()))
        except QueueFull as e:
            return error(openai_api.ApiError(429, f"the server is busy: {e}; retry later",
                                             kind="rate_limit_error"))
        service.in_flight += 1
        pending = set(requests)
        response = None
        try:
            if parsed.stream:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
                await response.prepare(request)
                for choice in choices:
                    if choice.index not in requests:
                        for chunk in builder.chunks(choice, "", [], [], "length", choices):
                            await response.write(_sse(chunk))
            while pending:
                index, event = await events.get()
                choice = choices[index]
                echoed = _echoed(event, prompts[choice.prompt_index]) \
                    if event.prompt_logprobs else []
                choice.text += event.text
                choice.logprobs += [*echoed, *event.logprobs]
                choice.completion_tokens += len(event.token_ids)
                if event.finish_reason is not None:
                    pending.discard(index)
                    choice.finish_reason = event.finish_reason
                    choice.stop_reason = event.stop_reason
                    choice.completion_tokens = event.completion_tokens
                    choice.cached_tokens = event.cached_tokens
                if event.finish_reason == "error":
                    if response is None:
                        return error(openai_api.ApiError(500, ENGINE_FAILED,
                                                         kind="server_error"))
                    await response.write(_sse(openai_api.ApiError(
                        500, ENGINE_FAILED, kind="server_error", code="500").body()))
                    break
                if response is not None:
                    for chunk in builder.chunks(choice, event.text, echoed,
                                                list(event.logprobs), event.finish_reason,
                                                choices):
                        await response.write(_sse(chunk))
            if response is None:
                return web.json_response(builder.whole(choices))
            if parsed.include_usage and not pending:
                await response.write(_sse(builder.usage_chunk(choices)))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        except ConnectionResetError:  # the client left mid-stream: nobody to answer
            return response
        finally:
            service.in_flight -= 1
            for index in pending:  # the client left, or a sibling failed: stop the rest
                engine.abort(requests[index].request_id)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=True)

    async def tokenize(request: web.Request) -> web.Response:
        try:
            return web.json_response(service.tokenize(await read_json(request)))
        except openai_api.ApiError as e:
            return error(e)

    async def detokenize(request: web.Request) -> web.Response:
        try:
            return web.json_response(service.detokenize(await read_json(request)))
        except openai_api.ApiError as e:
            return error(e)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": service.created,
            "owned_by": "scaling", "max_model_len": service.context}]})

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": service.model_name,
                                  "requests_in_flight": service.in_flight})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=prometheus_text(engine), content_type="text/plain",
                            charset="utf-8", headers={"X-Content-Format": "0.0.4"})

    @web.middleware
    async def json_errors(request: web.Request, handler: Callable):
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error(openai_api.ApiError(413, f"the body is over the limit of "
                                             f"{limits.max_request_bytes} bytes"))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error(openai_api.ApiError(
                e.status, f"{e.reason}: {request.method} {request.path}; use POST "
                "/v1/completions, POST /v1/chat/completions, GET /v1/models or GET /metrics"))

    middlewares = [json_errors]
    if allowed_origins:
        middlewares.insert(0, cors(allowed_origins))
    application = web.Application(client_max_size=limits.max_request_bytes,
                                  middlewares=middlewares)
    application.add_routes([
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.post("/tokenize", tokenize), web.post("/detokenize", detokenize),
        web.get("/v1/models", models), web.get("/metrics", metrics),
        web.get("/health", health), web.get("/healthz", healthz)])
    return application


def cors(allowed_origins: tuple[str, ...]):
    """Cross-origin answers for browser front ends: the preflight `OPTIONS` and the
    `Access-Control-Allow-Origin` header, for the origins `--allowed_origins` names."""
    allow_all = "*" in allowed_origins

    def headers_for(request: web.Request) -> dict:
        origin = request.headers.get("Origin")
        if origin is None or not (allow_all or origin in allowed_origins):
            return {}
        return {"Access-Control-Allow-Origin": "*" if allow_all else origin,
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "Authorization, Content-Type"),
                "Vary": "Origin"}

    @web.middleware
    async def middleware(request: web.Request, handler: Callable):
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204 if headers_for(request) else 403,
                                headers=headers_for(request))
        response = await handler(request)
        if not response.prepared:
            response.headers.update(headers_for(request))
        return response

    return middleware


def prometheus_text(engine: Engine) -> str:
    """The engine's counters in Prometheus's text exposition format."""
    stats = engine.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
        lines.extend([f"# HELP scaling_{name} {help_text}", f"# TYPE scaling_{name} {kind}"])
        lines.extend(f"scaling_{name}{labels} {value:g}" for labels, value in samples)

    def histogram(name: str, help_text: str, h) -> None:
        samples = [(f'_bucket{{le="{"+Inf" if b == float("inf") else f"{b:g}"}"}}', c)
                   for b, c in h.cumulative()]
        samples += [("_sum", h.total), ("_count", h.count)]
        lines.extend([f"# HELP scaling_{name} {help_text}", f"# TYPE scaling_{name} histogram"])
        lines.extend(f"scaling_{name}{suffix} {value:g}" for suffix, value in samples)

    metric("requests_received_total", "counter", "Requests accepted into the queue.",
           [("", stats.requests_received)])
    metric("requests_finished_total", "counter", "Requests finished, by reason.",
           [(f'{{reason="{r}"}}', stats.requests_finished[r])
            for r in ("stop", "length", "abort", "error")])
    metric("prompt_tokens_total", "counter", "Prompt tokens received.",
           [("", stats.prompt_tokens)])
    metric("prompt_tokens_cached_total", "counter", "Prompt tokens found in the prefix cache.",
           [("", stats.cached_prompt_tokens)])
    metric("prompt_tokens_computed_total", "counter", "Prompt tokens run through prefill.",
           [("", stats.prefill_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.",
           [("", stats.completion_tokens)])
    metric("decode_steps_total", "counter", "Decode steps dispatched.",
           [("", stats.decode_steps)])
    metric("decode_host_seconds_total", "counter", "Host time of the decode loop: building "
           "steps, reading tokens, stop checks, text and events.",
           [("", stats.decode_host_seconds)])
    metric("decode_wait_seconds_total", "counter", "Time the decode loop waited for the "
           "device's tokens.", [("", stats.decode_wait_seconds)])
    metric("queue_depth", "gauge", "Requests waiting for a slot or cache blocks.",
           [("", engine.queue_depth)])
    metric("running_requests", "gauge", "Requests prefilling or decoding.",
           [("", engine.running)])
    metric("running_requests_peak", "gauge", "The most requests decoding in one step since "
           "start.", [("", stats.peak_running)])
    metric("preemptions_total", "counter", "Running requests sent back to the queue when the "
           "KV cache ran out of blocks, to be recomputed.", [("", stats.preemptions)])
    metric("kv_blocks_in_use", "gauge", "KV cache blocks held by running requests.",
           [("", engine.pool.in_use)])
    metric("kv_blocks_total", "gauge", "KV cache blocks in the pool.",
           [("", engine.pool.num_blocks)])
    metric("kv_blocks_peak", "gauge", "The most KV cache blocks held at once since start.",
           [("", engine.pool.peak_in_use)])
    metric("kv_block_bytes", "gauge", "Bytes of one KV cache block, every layer's keys and "
           "values.", [("", engine.programs.block_bytes)])
    metric("weight_bytes", "gauge", "Bytes of the weights, each array counted once (int8 "
           "kernels and their scales with --quantize=int8).",
           [("", engine.programs.weight_bytes)])
    histogram("time_to_first_token_seconds", "From arrival to the first new token.",
              stats.time_to_first_token)
    histogram("inter_token_latency_seconds", "Between consecutive tokens of a request.",
              stats.inter_token_latency)
    return "\n".join(lines) + "\n"


async def serve(service: LanguageModelService, host: str, port: int, limits: Limits,
                idle_timeout_s: float, shutdown_grace_s: float,
                allowed_origins: tuple[str, ...] = (), sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and return; on
    `sock` when the port was reserved before the model loaded."""
    parser = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parse")
    application = make_app(service, limits, parser, allowed_origins)
    runner, bound_port, stop = await protocol.listen(application, host, port, idle_timeout_s,
                                                     shutdown_grace_s, sock)
    service.engine.start()
    layout = service.engine.layout
    print(f"serving {service.model_name} on http://{host}:{bound_port}/v1 ({layout.max_num_seqs} "
          f"slots, {layout.num_blocks} KV blocks of {layout.block_size}, context "
          f"{layout.max_seq_len}, chat template {service.chat.kind}); SIGTERM or Ctrl-C stops",
          flush=True)
    await stop.wait()
    print("stopping: finishing the requests in flight", flush=True)
    await runner.cleanup()  # stops listening, then waits for the handlers in flight
    service.engine.stop()
    parser.shutdown(wait=False, cancel_futures=True)
    print(f"stopped after {service.engine.stats.completion_tokens} tokens", flush=True)
