"""Steady-state epoch time of the Fashion-MNIST MLP: the framework against plain loops.

The framework's loop (chunked `lax.scan` calls, sharded batches, per-epoch eval and async
checkpoints) should cost a small model at most 10% over what a user would write by hand. This
measures that in one process on one machine, so the numbers are comparable:

    python bench/mlp_epoch.py [--epochs=N] [--json=PATH]

(a) the framework through its real path, timed from the wall-clock `time` of its records in
    metrics.jsonl: once doing the hand-written loop's work (training; eval and checkpoint
    only at the end), and once as the experiment ships ("fw recipe": a test-set eval every
    epoch and an async checkpoint every 1000 steps);
    The framework also runs without the experiment's `xla_options` ("fw no xla_opts"), and
    the hand-written loop with them ("jax + xla_opts"), to show what the options contribute;
(b) a minimal hand-written `jax.jit` loop, one step per call with donated state;
(c) an idiomatic PyTorch loop, if torch is installed;
(d) the founding document's Keras code (`bench/keras_mlp.py`), run by the Python of a
    separate TensorFlow virtualenv (`--keras_python`), since TensorFlow must not share the
    framework's environment. Without that interpreter, Keras is skipped with a note.

Epoch 1 includes compilation (and warm-up), so each figure is the median of epochs 2..N.
Every contender trains on the same arrays and reports its test accuracy, so a fast but broken
contender shows. The targets: the framework's epoch within 1.1x of the hand-written JAX loop's,
at least 2x faster than PyTorch's and 4x faster than Keras's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from machine_load import cpu_seconds, print_load
from results import Check, Contender, write_results

import scaling.config.experiments
import scaling.runtime.metrics
import scaling.training.compiler_options
import scaling.training.loop
from scaling.data.idx import read_idx
from scaling.runtime import platforms

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
ADAM_EPS = 1e-7
HIDDEN = 128
NUM_CLASSES = 10
TARGET_RATIO = 1.1  # framework epoch time over the hand-written loop's, at most
PYTORCH_TARGET = 2.0  # PyTorch's epoch time over the framework's, at least
KERAS_TARGET = 4.0    # Keras's epoch time over the framework's, at least
KERAS_PYTHON = Path("/work/venv-tf/bin/python")  # a virtualenv with tensorflow-cpu


def load_arrays() -> dict[str, np.ndarray]:
    """Float32 pixels in [0, 1] and int labels, as the hand-written loops would load them."""
    def images(name: str) -> np.ndarray:
        pixels = read_idx(DATA_DIR / name)
        return (pixels.reshape(len(pixels), -1) / np.float32(255.0)).astype(np.float32)

    def labels(name: str) -> np.ndarray:
        return read_idx(DATA_DIR / name).astype(np.int64)

    return {"train_x": images("train-images-idx3-ubyte.gz"),
            "train_y": labels("train-labels-idx1-ubyte.gz"),
            "test_x": images("t10k-images-idx3-ubyte.gz"),
            "test_y": labels("t10k-labels-idx1-ubyte.gz")}


def bench_framework(epochs: int, recipe: bool, xla_options: bool = True) -> dict:
    """The real `train_and_evaluate`, timed from the records it writes every epoch.

    With `recipe`, the experiment runs as shipped: a test-set evaluation every epoch and a
    checkpoint every 1000 steps, timed from the test records. Without it, the loop does the
    same work as the hand-written one (evaluation and checkpoint only at the end), timed from
    one train record per epoch.
    """
    steps_per_epoch = 60000 // BATCH_SIZE
    overrides = [f"num_epochs={epochs}"]
    if not recipe:
        overrides += [f"log_every_steps={steps_per_epoch}", "eval_every_steps=1000000000",
                      "checkpoint_every_steps=1000000000"]
    config, module = scaling.config.experiments.load_config("fashion_mnist_mlp", overrides)
    if not xla_options:
        with config.unlocked():
            config.xla_options = {}
    with tempfile.TemporaryDirectory() as workdir:
        start = time.time()
        with contextlib.redirect_stdout(io.StringIO()):  # keep the table readable
            results = scaling.training.loop.train_and_evaluate(config, Path(workdir), module)
        end = time.time()
        records = scaling.runtime.metrics.read_metrics(Path(workdir))
    split = "test" if recipe else "train"
    times = [r["time"] for r in records if r["split"] == split]
    if len(times) != epochs:
        raise RuntimeError(f"expected {epochs} {split} records, found {len(times)}")
    epoch_seconds = np.diff([start] + times).tolist()
    return {"epoch_seconds": epoch_seconds, "total_seconds": end - start,
            "test_accuracy": results["test"]["accuracy"]}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(HIDDEN)(x))
        x = nn.relu(nn.Dense(HIDDEN)(x))
        return nn.Dense(NUM_CLASSES)(x)


def experiment_xla_options() -> dict:
    """The CPU compiler options `fashion_mnist_mlp` gives its steps."""
    config, _ = scaling.config.experiments.load_config("fashion_mnist_mlp", [])
    return scaling.training.compiler_options.for_platform(config, "cpu")


def bench_jax(data: dict[str, np.ndarray], epochs: int, compiler_options=None) -> dict:
    """What a competent user writes: data on device, one jitted, donating step per batch."""
    model = MLP()
    tx = optax.adam(LEARNING_RATE, eps=ADAM_EPS)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))["params"]
    opt_state = tx.init(params)
    train_x, train_y = jax.device_put(data["train_x"]), jax.device_put(data["train_y"])
    num_examples = len(data["train_x"])
    steps = num_examples // BATCH_SIZE

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit(donate_argnums=(0, 1), compiler_options=compiler_options)
    def train_step(params, opt_state, train_x, train_y, batch_indices, step):
        index = batch_indices[step]
        loss, grads = jax.value_and_grad(loss_fn)(params, train_x[index], train_y[index])
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    epoch_seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = rng.permutation(num_examples)[:steps * BATCH_SIZE].astype(np.int32)
        batch_indices = jax.device_put(order.reshape(steps, BATCH_SIZE))
        for step in range(steps):
            params, opt_state, loss = train_step(params, opt_state, train_x, train_y,
                                                 batch_indices, step)
        jax.block_until_ready((params, opt_state, loss))
        epoch_seconds.append(time.perf_counter() - start)

    logits = jax.jit(model.apply)({"params": params}, data["test_x"])
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == data["test_y"]))
    return {"epoch_seconds": epoch_seconds, "test_accuracy": accuracy}


def bench_torch(data: dict[str, np.ndarray], epochs: int) -> dict | None:
    """The loop from the PyTorch tutorials, on all cores; None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, NUM_CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, eps=ADAM_EPS)
    loss_fn = torch.nn.CrossEntropyLoss()
    train_x, train_y = torch.from_numpy(data["train_x"]), torch.from_numpy(data["train_y"])
    steps = len(train_x) // BATCH_SIZE

    epoch_seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x))
        for step in range(steps):
            index = order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(train_x[index]), train_y[index])
            loss.backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - start)

    model.eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(data["test_x"])).argmax(-1)
    accuracy = float((predictions == torch.from_numpy(data["test_y"])).float().mean())
    return {"epoch_seconds": epoch_seconds, "test_accuracy": accuracy}


def bench_keras(data: dict[str, np.ndarray], epochs: int, python: Path) -> dict | str:
    """The founding document's Keras code in TensorFlow's own interpreter, or why not."""
    if not python.exists():
        return f"{python} does not exist (see bench/keras_mlp.py to create it)"
    script = Path(__file__).resolve().parent / "keras_mlp.py"
    with tempfile.TemporaryDirectory() as tmp:
        arrays, out = Path(tmp) / "arrays.npz", Path(tmp) / "keras.json"
        np.savez(arrays, **data)
        done = subprocess.run([str(python), str(script), f"--data={arrays}",
                               f"--epochs={epochs}", f"--batch_size={BATCH_SIZE}",
                               f"--json={out}"], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"{python} {script.name} failed ({last})"
        return json.loads(out.read_text())


CONTENDERS = {  # result key: what the row is
    "framework": "framework, same work as the hand-written loop",
    "fw recipe": "framework as shipped: test eval every epoch, checkpoints",
    "fw no xla_opts": "framework, same work, without the experiment's xla_options",
    "jax": "hand-written jax.jit loop",
    "jax + xla_opts": "hand-written jax.jit loop with the experiment's xla_options",
    "pytorch": "PyTorch loop",
    "keras": "founding document's Keras code",
}


def report(contenders: list[Contender], examples_per_epoch: int) -> list[Check]:
    """The table, and the targets each ratio is held to."""
    print(f"{'name':<15} {'epoch s':>8} {'examples/s':>11} {'vs framework':>13} "
          f"{'test acc':>9}  epochs (s)")
    for c in contenders:
        epochs = " ".join(f"{s:.2f}" for s in c.samples)
        print(f"{c.name:<15} {c.median:>8.3f} {examples_per_epoch / c.median:>11,.0f} "
              f"{c.ratio:>12.2f}x {c.extra['test_accuracy']:>9.4f}  {epochs}")
    by_name = {c.name: c for c in contenders}
    checks = [Check("framework / hand-written jax epoch time, same work",
                    1 / by_name["jax"].ratio, at_most=TARGET_RATIO)]
    if "pytorch" in by_name:
        checks.append(Check("pytorch / framework epoch time", by_name["pytorch"].ratio,
                            at_least=PYTORCH_TARGET))
    if "keras" in by_name:
        checks.append(Check("keras / framework epoch time", by_name["keras"].ratio,
                            at_least=KERAS_TARGET))
    for check in checks:
        print(check.line())
    print(f"framework with its per-epoch test eval and checkpoints / hand-written jax: "
          f"{by_name['fw recipe'].median / by_name['jax'].median:.2f}x")
    return checks


def main(argv: list[str] | None = None) -> None:
    platforms.skip_absent_tpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs per contender (>= 2)")
    parser.add_argument("--keras_python", type=Path, default=KERAS_PYTHON,
                        help="the Python of a virtualenv with tensorflow-cpu installed")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: epoch 1 includes compilation")

    start = cpu_seconds()
    data = load_arrays()
    examples_per_epoch = len(data["train_x"]) // BATCH_SIZE * BATCH_SIZE
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
          f"{args.epochs} epochs each; {examples_per_epoch} examples per epoch", flush=True)

    results = {"framework": bench_framework(args.epochs, recipe=False),
               "fw recipe": bench_framework(args.epochs, recipe=True),
               "fw no xla_opts": bench_framework(args.epochs, recipe=False, xla_options=False),
               "jax": bench_jax(data, args.epochs),
               "jax + xla_opts": bench_jax(data, args.epochs, experiment_xla_options())}
    torch_result = bench_torch(data, args.epochs)
    if torch_result is None:
        print("pytorch: skipped (torch is not installed)")
    else:
        results["pytorch"] = torch_result
    keras_result = bench_keras(data, args.epochs, args.keras_python)
    if isinstance(keras_result, str):
        print(f"keras: skipped ({keras_result})")
    else:
        results["keras"] = keras_result

    framework = Contender("framework", results["framework"].pop("epoch_seconds"), warmup=1)
    contenders = [framework] + [
        Contender(name, result.pop("epoch_seconds"), baseline=framework, warmup=1)
        for name, result in results.items() if name != "framework"]
    for contender in contenders:
        contender.extra = {"description": CONTENDERS[contender.name],
                           **results[contender.name]}
    checks = report(contenders, examples_per_epoch)
    share = print_load(start)
    if args.json:
        write_results(args.json, "mlp_epoch", "seconds per epoch", higher_is_better=False,
                      contenders=contenders, others_cpu_share=share, checks=checks,
                      details={"epochs": args.epochs, "batch_size": BATCH_SIZE,
                               "examples_per_epoch": examples_per_epoch,
                               "jax": jax.__version__})


if __name__ == "__main__":
    sys.exit(main())
