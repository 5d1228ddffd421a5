"""The HTTP server, through real requests on loopback, and its request batching."""

import asyncio
import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import REPO
from serve_process import ServeProcess

from scaling import serving
from scaling.config import experiments as config_lib
from scaling.data.idx import read_idx
from scaling.inference import export
from scaling.serving.server import Batcher
from scaling.training import loop

# The tests share a module fixture that is costly to build: one worker builds it once.
pytestmark = pytest.mark.xdist_group("serve")

MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_idx_dir):
    workdir = tmp_path_factory.mktemp("served")
    config, module = config_lib.load_config("fashion_mnist_mlp", [
        f"data.manual_dir={tiny_idx_dir}", "num_steps=8", "batch_size=32",
        "eval_batch_size=96", "steps_per_call=8"])
    with contextlib.redirect_stdout(io.StringIO()):
        loop.train_and_evaluate(config, workdir, module)
    export.export_checkpoint(config, workdir, export.ExportOptions(), module)
    return workdir / "export"


@pytest.fixture(scope="module")
def test_images(tiny_idx_dir):
    return read_idx(tiny_idx_dir / "t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def expected(artifact, test_images):
    """What the standalone loader predicts for every test image."""
    return serving.load(artifact).predict(test_images, top_k=2)


class Server(ServeProcess):
    """The classifier server over `artifact`."""

    def __init__(self, artifact, log_dir, *flags):
        super().__init__(log_dir, f"--artifact={artifact}", "--max_batch_size=16",
                         f"--max_request_bytes={MAX_REQUEST_BYTES}", *flags)

    def predict(self, images, **fields):
        return self.request("POST", "/predict", {"instances": images.tolist(), **fields})


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    running = Server(artifact, tmp_path_factory.mktemp("server"))
    try:
        yield running
    finally:
        running.stop()


def assert_matches(predictions, expected):
    assert [p["label"] for p in predictions] == [e["label"] for e in expected]
    for got, want in zip(predictions, expected, strict=True):
        assert [c["label"] for c in got["top_k"]] == [c["label"] for c in want["top_k"]]
        assert [c["probability"] for c in got["top_k"]] == pytest.approx(
            [c["probability"] for c in want["top_k"]], abs=1e-6)


def test_valid_requests_get_200_and_the_labels(server, test_images, expected):
    status, health = server.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    status, body = server.predict(test_images[:5], top_k=2)
    assert status == 200, body
    assert_matches(body["predictions"], expected[:5])
    status, body = server.predict(test_images[5:7, :, :, None])  # with the channel axis
    assert status == 200 and [len(p["top_k"]) for p in body["predictions"]] == [3, 3]
    assert [p["label"] for p in body["predictions"]] == [e["label"] for e in expected[5:7]]
    status, metadata = server.request("GET", "/metadata")
    assert status == 200 and metadata["input"]["shape"] == [28, 28, 1]


IMAGE = np.zeros((28, 28), np.int64)


@pytest.mark.parametrize("body, status, fragment", [
    (b'{"instances": [', 400, "not valid JSON"),
    ({"instances": [IMAGE[:27].tolist()]}, 400, "shape [1, 27, 28]"),
    ({"instances": [(IMAGE + 0.5).tolist()]}, 400, "float64 values"),
    ({"instances": [[["x"] * 28] * 28]}, 400, "values"),
    ({"instances": [(IMAGE + 256).tolist()]}, 400, "outside 0 to 255"),
    ({"instances": [IMAGE.tolist(), IMAGE[:3].tolist()]}, 400, "ragged"),
    ({"instances": []}, 400, "non-empty list"),
    ({"images": [IMAGE.tolist()]}, 400, '{"instances"'),
    ({"instances": [IMAGE.tolist()], "top_k": 11}, 400, "top_k=11"),
    ({"instances": [IMAGE.tolist()], "colour": 1}, 400, "unknown fields colour"),
    (b"[" + b"0," * MAX_REQUEST_BYTES + b"0]", 413, "over the limit"),
])
def test_mistakes_get_4xx_and_the_server_lives_on(server, body, status, fragment):
    got, answer = server.request("POST", "/predict", body)
    assert got == status and fragment in answer["error"], answer
    assert server.request("GET", "/healthz")[0] == 200


def test_unknown_paths_and_methods_get_4xx(server):
    assert server.request("GET", "/nothing")[0] == 404
    status, answer = server.request("GET", "/predict")
    assert status == 405 and "POST /predict" in answer["error"]


def test_concurrent_clients_are_all_served(server, test_images, expected):
    before = server.request("GET", "/healthz")[1]
    requests = [(start, 1 + start % 3) for start in range(0, 96, 3)]  # 32 requests

    def send(request):
        start, count = request
        status, body = server.predict(test_images[start:start + count], top_k=2)
        assert status == 200, body
        assert_matches(body["predictions"], expected[start:start + count])
        return count

    with ThreadPoolExecutor(max_workers=8) as pool:
        served = sum(pool.map(send, requests))
    after = server.request("GET", "/healthz")[1]
    assert after["examples"] - before["examples"] == served
    assert after["model_calls"] - before["model_calls"] <= len(requests)


class RecordingModel:
    """Stands in for a loaded artifact and records the batch sizes it is called with."""

    def __init__(self):
        self.calls = []

    def predict_arrays(self, images):
        self.calls.append(len(images))
        probabilities = np.zeros((len(images), 10), np.float32)
        probabilities[:, 0] = 1
        return images[:, 0, 0, 0].astype(np.int32), probabilities


def test_waiting_requests_share_model_calls_up_to_the_batch_limit():
    async def scenario():
        model = RecordingModel()
        batcher = Batcher(model, max_batch_size=8, max_wait_s=0.0)
        requests = [np.full((3, 28, 28, 1), i, np.uint8) for i in range(5)]
        waiting = [asyncio.ensure_future(batcher.predict(r)) for r in requests]
        await asyncio.sleep(0)  # every request is queued before the worker starts
        batcher.start()
        results = await asyncio.gather(*waiting)
        await batcher.stop()
        return model.calls, results

    calls, results = asyncio.run(scenario())
    assert calls == [6, 6, 3]  # 3 + 3 fit in 8; a third request starts the next batch
    for i, (labels, probabilities) in enumerate(results):
        assert labels.tolist() == [i] * 3 and probabilities.shape == (3, 10)


def test_sigterm_finishes_the_request_in_flight_and_exits_0(artifact, test_images, expected,
                                                            tmp_path):
    # A long batching wait holds the request inside the server while the signal arrives.
    server = Server(artifact, tmp_path, "--max_wait_ms=1500")
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(server.predict, test_images[:1], top_k=2)
            deadline = time.monotonic() + 60
            while server.request("GET", "/healthz")[1]["requests_in_flight"] < 1:
                assert time.monotonic() < deadline and not pending.done()
                time.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            status, body = pending.result(timeout=60)
        assert status == 200
        assert_matches(body["predictions"], expected[:1])
        assert server.wait() == 0
        assert "stopped after 1 model calls" in server.output()
    finally:
        server.stop()


def test_a_missing_artifact_is_a_user_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scaling.serve",
                             f"--artifact={tmp_path / 'none'}"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "not an exported model" in errors[0]


@pytest.fixture(scope="module")
def strict_server(artifact, tmp_path_factory):
    running = Server(artifact, tmp_path_factory.mktemp("strict"), "--idle_timeout_s=1",
                     "--body_timeout_s=1", "--max_json_depth=8")
    try:
        yield running
    finally:
        running.stop()


def raw_exchange(port: int, data: bytes, wait_s: float = 10.0) -> tuple[bytes, float]:
    """Send `data` on a fresh connection, then read until the server closes it; the reply
    and the seconds the server took to close."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as connection:
        start = time.monotonic()
        if data:
            connection.sendall(data)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks), time.monotonic() - start


def json_body(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_deep_nesting_is_refused_before_parsing(strict_server):
    status, body = strict_server.request("POST", "/predict", b'{"instances": ' + b"[" * 30000
                                         + b"]" * 30000 + b"}")
    assert status == 400 and "nests 30001 levels deep, over the limit of 8" in body["error"]


def test_a_request_aiohttp_cannot_parse_gets_a_json_400(strict_server):
    reply, _ = raw_exchange(strict_server.port, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
    status, body = json_body(reply)
    assert status == 400 and body["error"].startswith("Bad Request")


def test_a_slow_body_gets_408_and_idle_connections_are_closed(strict_server):
    started = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: 1000\r\n\r\n{\"instances\": [")
    reply, seconds = raw_exchange(strict_server.port, started)
    status, body = json_body(reply)
    assert status == 408 and "did not arrive within 1 s" in body["error"]
    for silent in (b"", b"POST /predict HTTP/1.1\r\nHost: x\r\n"):  # nothing; half a header
        reply, seconds = raw_exchange(strict_server.port, silent)
        assert reply == b"" and seconds < 5
    status, _ = strict_server.request("GET", "/healthz")
    assert status == 200


def test_health_checks_answer_while_a_large_body_is_parsed():
    """In process, with a model whose input conversion takes 1.5 s: /healthz must not wait
    for it, since bodies are parsed on worker threads, not on the event loop."""
    from aiohttp.test_utils import TestClient, TestServer

    from scaling.serving.protocol import Limits
    from scaling.serving.server import make_app

    class SlowModel:
        num_classes, label_names, metadata = 2, ("a", "b"), {}

        def as_batch(self, instances):
            time.sleep(1.5)
            return np.zeros((len(instances), 2), np.uint8)

        def predict_arrays(self, images):
            return np.zeros(len(images), np.int32), np.full((len(images), 2), 0.5)

    async def scenario():
        model = SlowModel()
        batcher = Batcher(model, 16, 0.001)
        parser = ThreadPoolExecutor(max_workers=2)
        client = TestClient(TestServer(make_app(model, batcher, Limits(), parser)))
        await client.start_server()
        batcher.start()
        try:
            slow = asyncio.create_task(client.post("/predict", json={"instances": [[1, 2]],
                                                                  "top_k": 1}))
            await asyncio.sleep(0.3)  # the body is being parsed now
            start = time.monotonic()
            health = await client.get("/healthz")
            waited = time.monotonic() - start
            assert health.status == 200 and not slow.done()
            assert (await slow).status == 200
            return waited
        finally:
            await batcher.stop()
            await client.close()
            parser.shutdown()

    assert asyncio.run(scenario()) < 1.0
