"""The OpenAI-compatible HTTP front end of the language-model engine.

    POST /v1/completions        prompt text (or token ids) in, text out
    POST /v1/chat/completions   messages in (rendered by `scaling.serving.chat`), text out
    GET  /v1/models             the one model served
    GET  /metrics               Prometheus text: requests, tokens, latencies, queue, cache
    GET  /healthz               200 once the programs are compiled

Both generation routes take `stream: true` and then answer with server-sent events, one per
new piece of text, a last one with the token counts, and `data: [DONE]`. Every mistake gets
the API's JSON error object with a 4xx, and the server carries on: a queue longer than
`--max_queue` gets 429 at once. A client that goes away mid-request has its request aborted,
which frees its slot and its cache blocks for the next one. SIGTERM or SIGINT stops
listening, lets the requests in flight finish (for at most `--shutdown_grace_s`), and exits 0.

The engine runs on its own thread (`scaling.engine.scheduler`); this module only translates,
so the event loop never waits on the devices.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from scaling.engine import Engine, Event, QueueFull, Request
from scaling.serving import openai_api, protocol
from scaling.serving.chat import ChatTemplate
from scaling.serving.server import Limits


class LanguageModelService:
    """What the routes need: the engine, the tokenizer's text side and the model's name."""

    def __init__(self, engine: Engine, model_name: str, chat: ChatTemplate,
                 default_max_tokens: int):
        self.engine = engine
        self.model_name = model_name
        self.chat = chat
        self.default_max_tokens = default_max_tokens
        self.tokenizer = engine.tokenizer
        self.context = engine.layout.max_seq_len
        self.created = int(time.time())
        self.in_flight = 0

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def prompt_ids(self, parsed: openai_api.ParsedRequest) -> list[int]:
        """The token ids of the prompt, begin-of-document first where the vocabulary has one
        (as in training and `--mode=sample`); refused when it leaves no room to generate."""
        prompt = parsed.prompt
        encode = self.tokenizer.encode
        if parsed.chat:
            try:
                prompt = self.chat.render(prompt)
            except ValueError as e:
                raise openai_api.ApiError(400, str(e), "messages") from None
            if self.chat.kind == "model":  # its special pieces are tokens, not text
                encode = self.tokenizer.encode_prompt
        if isinstance(prompt, str):
            bos = self.tokenizer.bos_id
            ids = [int(t) for t in encode(prompt)]
            if bos is not None and not (ids and ids[0] == bos):
                ids = [bos, *ids]
        else:
            ids = list(prompt)
            if max(ids) >= self.tokenizer.vocab_size:
                raise openai_api.ApiError(400, f"prompt: token id {max(ids)} is outside the "
                                          f"vocabulary of {self.tokenizer.vocab_size}",
                                          "prompt")
        if len(ids) >= self.context:
            param = "messages" if parsed.chat else "prompt"
            raise openai_api.ApiError(
                400, f"{param}: {len(ids)} tokens, but the model's context is {self.context} "
                f"(room is needed for at least one new token); shorten it", param,
                code="context_length_exceeded")
        return ids


def error(e: openai_api.ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status)


def _parse_body(body: bytes, chat: bool, default_max_tokens: int,
                max_depth: int) -> openai_api.ParsedRequest:
    depth = protocol.json_depth(body)
    if depth > max_depth:
        raise openai_api.ApiError(400, f"the body nests {depth} levels deep, over the limit "
                                  f"of {max_depth}")
    try:
        decoded = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise openai_api.ApiError(400, f"the body is not UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:
        raise openai_api.ApiError(400, f"the body is not valid JSON: {e}") from None
    return openai_api.parse(decoded, chat, default_max_tokens)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def make_app(service: LanguageModelService, limits: Limits,
             parser: ThreadPoolExecutor) -> web.Application:
    engine = service.engine

    async def read_request(request: web.Request, chat: bool) -> openai_api.ParsedRequest:
        if request.content_length is not None and \
                request.content_length > limits.max_request_bytes:
            raise openai_api.ApiError(413, f"the body has {request.content_length} bytes, "
                                      f"over the limit of {limits.max_request_bytes}")
        try:
            body = await asyncio.wait_for(request.read(), limits.body_timeout_s)
        except TimeoutError:
            raise openai_api.ApiError(408, f"the body did not arrive within "
                                      f"{limits.body_timeout_s:g} s") from None
        parsed = await asyncio.get_running_loop().run_in_executor(
            parser, _parse_body, body, chat, service.default_max_tokens,
            limits.max_json_depth)
        if parsed.model != service.model_name:
            raise openai_api.ApiError(404, f"model: {parsed.model!r} is not served here; "
                                      f"this server serves {service.model_name!r}", "model",
                                      code="model_not_found")
        return parsed

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            parsed = await read_request(request, chat)
            ids = service.prompt_ids(parsed)
        except openai_api.ApiError as e:
            return error(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        builder = openai_api.ResponseBuilder(parsed, service.model_name, service.piece)

        def deliver(event: Event) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            engine.submit(Request(builder.request_id, ids, parsed.params, deliver))
        except QueueFull as e:
            return error(openai_api.ApiError(429, f"the server is busy: {e}; retry later",
                                             kind="rate_limit_error"))
        service.in_flight += 1
        finished = False
        try:
            if not parsed.stream:
                received = []
                while not received or received[-1].finish_reason is None:
                    received.append(await events.get())
                finished = True
                if received[-1].finish_reason == "error":
                    return error(openai_api.ApiError(500, "the engine failed while serving this "
                                                     "request; the server log says why",
                                                     kind="server_error"))
                return web.json_response(builder.whole(received))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
            await response.prepare(request)
            first = True
            while True:
                event = await events.get()
                finished = event.finish_reason is not None
                if event.text or event.logprobs or finished or first:
                    await response.write(_sse(builder.chunk(event, first)))
                    first = False
                if finished:
                    break
            if parsed.include_usage:
                await response.write(_sse(builder.usage_chunk(event)))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            service.in_flight -= 1
            if not finished:  # the client left (or the handler was cancelled): stop it
                engine.abort(builder.request_id)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=True)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": service.created,
            "owned_by": "scaling", "max_model_len": service.context}]})

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

    application = web.Application(client_max_size=limits.max_request_bytes,
                                  middlewares=[json_errors])
    application.add_routes([
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.get("/v1/models", models), web.get("/metrics", metrics),
        web.get("/healthz", healthz)])
    return application


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
    metric("generation_tokens_total", "counter", "Tokens generated.",
           [("", stats.completion_tokens)])
    metric("queue_depth", "gauge", "Requests waiting for a slot or cache blocks.",
           [("", engine.queue_depth)])
    metric("running_requests", "gauge", "Requests prefilling or decoding.",
           [("", engine.running)])
    metric("kv_blocks_in_use", "gauge", "KV cache blocks held by running requests.",
           [("", engine.pool.in_use)])
    metric("kv_blocks_total", "gauge", "KV cache blocks in the pool.",
           [("", engine.pool.num_blocks)])
    metric("kv_blocks_peak", "gauge", "The most KV cache blocks held at once since start.",
           [("", engine.pool.peak_in_use)])
    metric("kv_block_bytes", "gauge", "Bytes of one KV cache block, every layer's keys and "
           "values.", [("", engine.programs.block_bytes)])
    histogram("time_to_first_token_seconds", "From arrival to the first new token.",
              stats.time_to_first_token)
    histogram("inter_token_latency_seconds", "Between consecutive tokens of a request.",
              stats.inter_token_latency)
    return "\n".join(lines) + "\n"


async def serve(service: LanguageModelService, host: str, port: int, limits: Limits,
                idle_timeout_s: float, shutdown_grace_s: float) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and return."""
    parser = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parse")
    runner, bound_port, stop = await protocol.listen(make_app(service, limits, parser), host,
                                                     port, idle_timeout_s, shutdown_grace_s)
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
