"""`python -m scaling.serve --artifact=DIR [--port=N]`: an HTTP JSON server for an export.

    POST /predict   {"instances": [image, ...], "top_k": 3}  ->  {"predictions": [...]}
    GET  /healthz   200 {"status": "ok", ...} once the model is loaded and compiled
    GET  /metadata  the artifact's metadata.json

An image is nested lists of integer pixels 0 to 255 in the dataset's layout (28 x 28, or
28 x 28 x 1). Each prediction is the record `--mode=predict` writes, less the input name.
Mistakes get a 4xx and a JSON `{"error": ...}` naming what to fix: malformed JSON, nesting
deeper than `--max_json_depth`, a wrong shape or dtype (400), a body slower than
`--body_timeout_s` (408), a body over `--max_request_bytes` (413), an unknown path (404), and
requests aiohttp cannot parse at all (`scaling.serving.protocol`). A connection that sends no
whole request within `--idle_timeout_s` is closed. Bodies are parsed on worker threads, so
`/healthz` answers while a large one is decoded.

Concurrent requests are batched: a single worker takes the first waiting request, gathers
more for up to `--max_wait_ms` or until `--max_batch_size` examples, and runs them as one
model call in a thread, so the event loop keeps accepting while the device computes. SIGTERM
or SIGINT stops listening, lets the requests in flight finish (for at most
`--shutdown_grace_s`), and exits 0.

Why aiohttp rather than the standard library's `ThreadingHTTPServer`: the latter spends a
thread per connection, parses HTTP in pure Python without keep-alive or slow-client timeouts,
and its own documentation warns against production use. aiohttp is maintained by aio-libs,
parses HTTP in C, refuses oversize bodies with 413 itself, and shuts down gracefully by
waiting for the handlers in flight; and one asyncio loop makes cross-request batching a queue
and a task instead of locks and condition variables. The cost is one dependency with a few
small ones of its own. The server imports the standalone loader, never flax or the experiment.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from absl import flags, logging
from aiohttp import web

from scaling import artifact
from scaling.artifact.postprocess import DEFAULT_TOP_K, resolve_top_k, top_k_records
from scaling.errors import UserError, exit_on_error
from scaling.runtime import platforms
from scaling.serving import protocol

# The server's own flags, apart from the trainer's: its --help lists only these.
FLAGS = flags.FlagValues()
flags.DEFINE_string("artifact", None, "The directory that --mode=export wrote.", flag_values=FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "The address to listen on (0.0.0.0 for every "
                    "interface).", flag_values=FLAGS)
flags.DEFINE_integer("port", 8000, "The port to listen on; 0 picks a free one.",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_batch_size", 256, "The most examples that concurrent requests "
                     "share in one model call.", flag_values=FLAGS)
flags.DEFINE_float("max_wait_ms", 2.0, "How long a batch waits for more requests once its "
                   "first has arrived.", flag_values=FLAGS)
flags.DEFINE_integer("max_request_bytes", 4 << 20, "Larger request bodies are refused with "
                     "413.", flag_values=FLAGS)
flags.DEFINE_integer("max_json_depth", 16, "Request bodies nested deeper are refused with 400 "
                     "before they are parsed.", flag_values=FLAGS)
flags.DEFINE_float("body_timeout_s", 30.0, "A request body not received within this is "
                   "refused with 408.", flag_values=FLAGS)
flags.DEFINE_float("idle_timeout_s", 30.0, "A connection that has not sent a whole request "
                   "within this of opening or of its last response is closed.",
                   flag_values=FLAGS)
flags.DEFINE_float("shutdown_grace_s", 30.0, "On SIGTERM or Ctrl-C, the longest the requests "
                   "in flight may hold up the exit.", flag_values=FLAGS)
REQUEST_FIELDS = ("instances", "top_k")

Pending = tuple[np.ndarray, asyncio.Future]


class Batcher:
    """Runs the images of concurrent requests together, one model call at a time."""

    def __init__(self, model, max_batch_size: int, max_wait_s: float):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.model_calls = 0
        self.examples = 0
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._held: collections.deque[Pending] = collections.deque()  # next batch's first
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) for these images, computed with whatever else is waiting."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((images, future))
        return await future

    async def _next_batch(self) -> list[Pending]:
        loop = asyncio.get_running_loop()
        first = self._held.popleft() if self._held else await self._queue.get()
        batch, size = [first], len(first[0])
        deadline = loop.time() + self.max_wait_s
        while size < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if size + len(item[0]) > self.max_batch_size:
                self._held.append(item)  # too big to join; it starts the next batch
                break
            batch.append(item)
            size += len(item[0])
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            images = np.concatenate([images for images, _ in batch])
            try:
                labels, probabilities = await loop.run_in_executor(
                    self._executor, self.model.predict_arrays, images)
            except Exception as e:  # noqa: BLE001 - each waiting request gets the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.model_calls += 1
            self.examples += len(images)
            start = 0
            for request_images, future in batch:
                stop = start + len(request_images)
                if not future.done():  # a request whose client left is simply dropped
                    future.set_result((labels[start:stop], probabilities[start:stop]))
                start = stop


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def parse_request(body: bytes, model: artifact.ServedModel,
                  max_depth: int = 16) -> tuple[np.ndarray, int]:
    """The images and top-k of a request body, or ValueError with a message for the client."""
    depth = protocol.json_depth(body)
    if depth > max_depth:
        raise ValueError(f"the body nests {depth} levels deep, over the limit of {max_depth}")
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"the body is not valid JSON: {e}") from None
    if not isinstance(request, dict) or "instances" not in request:
        raise ValueError('expected a JSON object {"instances": [image, ...], "top_k": K}')
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise ValueError(f"unknown fields {', '.join(unknown)}; expected "
                         f"{', '.join(REQUEST_FIELDS)}")
    top_k = request.get("top_k", DEFAULT_TOP_K)
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise ValueError(f"top_k={top_k!r}: expected an integer")
    return model.as_batch(request["instances"]), resolve_top_k(top_k, model.num_classes,
                                                               "top_k")


def make_app(model: artifact.ServedModel, batcher: Batcher, limits: protocol.Limits,
             parser: ThreadPoolExecutor) -> web.Application:
    """The routes. Bodies are parsed on `parser`'s threads, so the event loop (and with it
    /healthz) keeps answering while a large body is decoded."""
    in_flight = {"requests": 0}
    max_request_bytes = limits.max_request_bytes

    async def predict(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > max_request_bytes:
            return error_response(413, f"the body has {request.content_length} bytes, over "
                                  f"the limit of {max_request_bytes}; send fewer instances")
        in_flight["requests"] += 1
        try:
            try:
                body = await asyncio.wait_for(request.read(), limits.body_timeout_s)
            except TimeoutError:
                response = error_response(408, f"the body did not arrive within "
                                          f"{limits.body_timeout_s:g} s")
                response.force_close()  # the rest of the body may still come: drop it
                return response
            try:
                images, top_k = await asyncio.get_running_loop().run_in_executor(
                    parser, parse_request, body, model, limits.max_json_depth)
            except ValueError as e:  # InvalidInput is a ValueError too
                return error_response(400, str(e))
            labels, probabilities = await batcher.predict(images)
        finally:
            in_flight["requests"] -= 1
        records = top_k_records(labels, probabilities, top_k, model.label_names)
        return web.json_response({"predictions": records})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok", "experiment": model.metadata.get("experiment"),
            "checkpoint_step": model.metadata.get("checkpoint_step"),
            "requests_in_flight": in_flight["requests"], "model_calls": batcher.model_calls,
            "examples": batcher.examples})

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response(model.metadata)

    @web.middleware
    async def json_errors(request: web.Request, handler):
        """aiohttp's own refusals (413, 404, 405) as JSON, like every other error here."""
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the body is over the limit of {max_request_bytes} "
                                  "bytes; send fewer instances")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, f"{e.reason}: {request.method} {request.path}; "
                                  "use POST /predict, GET /healthz or GET /metadata")

    application = web.Application(client_max_size=max_request_bytes, middlewares=[json_errors])
    application.add_routes([web.post("/predict", predict), web.get("/healthz", healthz),
                            web.get("/metadata", metadata)])
    return application


async def serve(model: artifact.ServedModel, host: str, port: int, max_batch_size: int,
                max_wait_ms: float, limits: protocol.Limits, idle_timeout_s: float = 30.0,
                shutdown_grace_s: float = 30.0) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight (for at most
    `shutdown_grace_s`) and return."""
    batcher = Batcher(model, max_batch_size, max_wait_ms / 1000)
    batcher.start()
    parser = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parse")
    try:
        runner, bound_port, stop = await protocol.listen(
            make_app(model, batcher, limits, parser), host, port, idle_timeout_s,
            shutdown_grace_s)
    except UserError:
        await batcher.stop()
        raise
    print(f"serving {model.directory} on http://{host}:{bound_port} (batches of up to "
          f"{max_batch_size} examples, {max_wait_ms:g} ms wait); SIGTERM or Ctrl-C stops",
          flush=True)
    await stop.wait()
    print("stopping: finishing the requests in flight", flush=True)
    await runner.cleanup()  # stops listening, then waits for the handlers in flight
    await batcher.stop()
    parser.shutdown(wait=False, cancel_futures=True)
    print(f"stopped after {batcher.model_calls} model calls", flush=True)


def run(argv: list[str]) -> None:
    protocol.parse_command_line(FLAGS, argv)
    if not FLAGS.artifact:
        raise UserError("nothing to serve: pass --artifact=DIR (a classifier that --mode=export "
                        "wrote), or --model=DIR or --workdir=DIR (a language model)")
    protocol.check_port(FLAGS.port)
    protocol.check_minimums(FLAGS, (("max_batch_size", 1), ("max_wait_ms", 0),
                                    *protocol.LIMIT_MINIMUMS))
    model = artifact.load(FLAGS.artifact, FLAGS.max_batch_size)
    model.warm_up()
    limits = protocol.Limits(FLAGS.max_request_bytes, FLAGS.max_json_depth, FLAGS.body_timeout_s)
    asyncio.run(serve(model, FLAGS.host, FLAGS.port, FLAGS.max_batch_size, FLAGS.max_wait_ms,
                      limits, FLAGS.idle_timeout_s, FLAGS.shutdown_grace_s))


def entry(argv: list[str] | None = None) -> None:
    """`python -m scaling.serve`: `--help` lists the server's flags alone."""
    argv = list(sys.argv if argv is None else argv)
    if any(arg in ("--help", "-h", "--helpfull") for arg in argv[1:]):
        print(f"python -m scaling.serve [flags]\n\n{FLAGS.get_help()}")
        return
    platforms.skip_absent_tpu()
    logging.set_verbosity(logging.WARNING)
    exit_on_error(run, argv)
