"""Prediction throughput and serving latency of the Fashion-MNIST MLP, in one run.

    python bench/predict.py [--repeats=N] [--clients=C] [--requests=R] [--json=PATH]
    /work/venv-tf/bin/python bench/predict.py   # with TensorFlow: adds the Keras baseline

It trains `fashion_mnist_mlp` for one epoch (the weights do not change the speed), exports it
(float and int8), and times predicting the 10,000 test images, uint8 pixels in and class
probabilities and labels out on the host, with batches of 1000 everywhere:

(a) in-framework predict: `Predictor.predict`, the restored checkpoint jitted on the run's
    mesh, exactly what `--mode=predict` runs;
(b) the exported artifact through `scaling.serving.load`, float and int8;
(c) Keras `model.predict` of the founding MLP (Flatten, Dense 128 relu, Dense 128 relu,
    Dense 10, then softmax) holding the same weights, when TensorFlow is installed.

Each figure is the median of `--repeats` timed passes after one untimed pass; the
contenders take turns pass by pass. Then it starts `python -m scaling.serve` on 127.0.0.1
and sends a bounded load: C concurrent clients, each sending R requests of one image on a
keep-alive connection, one at a time, reporting the p50 and p99 latency.

TensorFlow must not go into the main environment (it would change what the data loaders
find); install it in a separate virtual environment that sees the system packages:
`python -m venv --system-site-packages /work/venv-tf && /work/venv-tf/bin/pip install
tensorflow-cpu`.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from machine_load import cpu_seconds, print_load

import scaling.config.experiments
import scaling.data
import scaling.inference.export
import scaling.inference.predict
import scaling.serving
import scaling.training.loop
from scaling.runtime import platforms

REPO = Path(__file__).resolve().parent.parent
BATCH_SIZE = 1000


def time_passes(contenders: dict, images: np.ndarray, repeats: int) -> dict:
    """Median seconds of `repeats` full passes over `images` for each contender, after one
    untimed pass. Passes take turns, so a change in the machine's load hits all alike."""
    results = {name: {"labels": predict(images)[0], "seconds": []}
               for name, predict in contenders.items()}
    for _ in range(repeats):
        for name, predict in contenders.items():
            start = time.perf_counter()
            predict(images)
            results[name]["seconds"].append(time.perf_counter() - start)
    for result in results.values():
        result["median_seconds"] = statistics.median(result["seconds"])
        result["examples_per_sec"] = len(images) / result["median_seconds"]
    return results


def make_keras_predict(params: dict):
    """The founding MLP in Keras with the trained weights; None without TensorFlow."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        import keras
        import tensorflow as tf
    except ImportError:
        return None, None
    model = keras.Sequential([
        keras.Input((28, 28)), keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"), keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10), keras.layers.Softmax()])
    layers = [params["hidden_0"], params["hidden_1"], params["logits"]]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for keras_layer, weights in zip(dense, layers, strict=True):
        keras_layer.set_weights([np.asarray(weights["kernel"]), np.asarray(weights["bias"])])

    def predict(images: np.ndarray):
        pixels = images.reshape(len(images), 28, 28).astype(np.float32) / 255.0
        probabilities = model.predict(pixels, batch_size=BATCH_SIZE, verbose=0)
        return np.argmax(probabilities, axis=-1), probabilities

    return predict, f"tensorflow {tf.__version__}, keras {keras.__version__}"


def prepare(workdir: Path) -> tuple:
    """Train one epoch, restore it for in-framework predict, and export it twice."""
    config, module = scaling.config.experiments.load_config("fashion_mnist_mlp", [
        "num_epochs=1", f"eval_batch_size={BATCH_SIZE}"])
    with contextlib.redirect_stdout(io.StringIO()):
        scaling.training.loop.train_and_evaluate(config, workdir, module)
    predictor = scaling.inference.predict.load_predictor(config, workdir, None, module)
    reports = {}
    for name, quantize in (("float", None), ("int8", "int8")):
        reports[name] = scaling.inference.export.export_checkpoint(
            config, workdir,
            scaling.inference.export.ExportOptions(str(workdir / name), quantize), module)
    return predictor, reports


def start_server(artifact: Path) -> tuple[subprocess.Popen, int]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "scaling.serve", f"--artifact={artifact}", "--port=0",
         "--host=127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=REPO, env=env)
    for line in process.stdout:
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if found:
            return process, int(found.group(1))
    raise RuntimeError("the server exited before it started listening")


def client_latencies(port: int, images: np.ndarray, requests: int, offset: int) -> list[float]:
    """One client: `requests` single-image requests in a row on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies = []
    try:
        for i in range(requests):
            body = json.dumps({"instances": images[(offset + i) % len(images)][None].tolist()})
            start = time.perf_counter()
            connection.request("POST", "/predict", body=body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                raise RuntimeError(f"status {response.status}: {payload[:200]!r}")
    finally:
        connection.close()
    return latencies


def bench_server(artifact: Path, images: np.ndarray, clients: int, requests: int) -> dict:
    process, port = start_server(artifact)
    try:
        client_latencies(port, images, 20, 0)  # warm the connection path
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            per_client = list(pool.map(
                lambda c: client_latencies(port, images, requests, c * requests),
                range(clients)))
        wall = time.perf_counter() - start
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/healthz")
        health = json.loads(connection.getresponse().read())
        connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
    latencies = sorted(x for client in per_client for x in client)
    return {"clients": clients, "requests": len(latencies),
            "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "requests_per_sec": len(latencies) / wall,
            "examples_per_model_call": health["examples"] / max(health["model_calls"], 1),
            "server_exit_code": exit_code}


def main(argv: list[str] | None = None) -> None:
    platforms.skip_absent_tpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed passes per contender")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if min(args.repeats, args.clients, args.requests) < 1:
        parser.error("--repeats, --clients and --requests must be positive")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        predictor, reports = prepare(workdir)
        images = scaling.data.load_dataset(predictor.config).eval_splits["test"]["image"]
        print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
              f"{len(images)} test images, batches of {BATCH_SIZE}; median of {args.repeats} "
              "passes", flush=True)
        for report in reports.values():
            print(report)

        contenders = {"framework": predictor.predict}
        for name in ("float", "int8"):
            contenders[f"artifact {name}"] = scaling.serving.load(workdir / name).predict_arrays
        keras_predict, keras_version = make_keras_predict(jax.device_get(predictor.params))
        if keras_predict is None:
            print("keras: skipped (TensorFlow is not installed; see the docstring)")
        else:
            contenders["keras"] = keras_predict
        start = cpu_seconds()  # the server's CPU time counts as ours once it has exited
        results = time_passes(contenders, images, args.repeats)
        serving = bench_server(workdir / "float", images, args.clients, args.requests)

    reference = results["framework"]["labels"]
    framework = results["framework"]["examples_per_sec"]
    print(f"{'contender':<16} {'median s':>9} {'examples/s':>11} {'vs framework':>13} "
          f"{'labels agree':>13}")
    for name, result in results.items():
        result["agreement"] = float(np.mean(result.pop("labels") == reference))
        print(f"{name:<16} {result['median_seconds']:>9.4f} "
              f"{result['examples_per_sec']:>11,.0f} "
              f"{result['examples_per_sec'] / framework:>12.2f}x"
              f" {result['agreement']:>12.2%}")
    artifact = results["artifact float"]["examples_per_sec"]
    print(f"artifact / in-framework predict: {artifact / framework:.2f}x throughput")
    if "keras" in results:
        print(f"artifact / keras model.predict ({keras_version}): "
              f"{artifact / results['keras']['examples_per_sec']:.2f}x throughput")
    print(f"server on 127.0.0.1, {serving['clients']} clients x {args.requests} requests of one "
          f"image: p50 {serving['p50_ms']:.2f} ms, p99 {serving['p99_ms']:.2f} ms, "
          f"{serving['requests_per_sec']:,.0f} requests/s, "
          f"{serving['examples_per_model_call']:.1f} examples per model call; "
          f"exit code {serving['server_exit_code']} after SIGTERM")
    share = print_load(start)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "batch_size": BATCH_SIZE, "repeats": args.repeats, "num_examples": len(images),
            "keras": keras_version, "others_cpu_share": share, "throughput": results,
            "serving": serving, "exports": reports}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
