"""TrainState, sharded initialisation, the pure train and eval steps, and the training loop.

The loop is flat: build the mesh and the compiled steps, restore or initialise, then run
chunks of `steps_per_call` steps per compiled call (a `lax.scan` over stacked batches) so the
host never bounds a small model. Metrics are read one call late, so the host never stalls the
device.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scaling import checkpoint
from scaling import mesh as mesh_lib
from scaling.data import dataset as dataset_lib
from scaling.data import images, load_dataset
from scaling.errors import UserError
from scaling.metrics import MetricsWriter, Progress
from scaling.models import make_model
from scaling.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    """Arrays only, so a checkpoint is nothing but arrays."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def l2_penalty(params) -> jax.Array:
    """λ/2·Σw² is applied with λ outside; this is Σw² over weight matrices (not biases)."""
    leaves = [p for p in jax.tree_util.tree_leaves(params) if p.ndim > 1]
    return sum(jnp.sum(jnp.square(p.astype(jnp.float32))) for p in leaves)


def classification_loss(params, batch, rng, *, model: nn.Module, preprocess: Callable,
                        l2: float):
    logits = model.apply({"params": params}, preprocess(batch), train=True,
                         rngs={"dropout": rng}).astype(jnp.float32)
    labels = batch["label"]
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss = cross_entropy + 0.5 * l2 * l2_penalty(params) if l2 else cross_entropy
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {"cross_entropy": cross_entropy, "accuracy": accuracy}


def train_step(state: TrainState, batch, *, loss_fn: Callable,
               tx: optax.GradientTransformation):
    """One optimizer update; pure, so it can be scanned, jitted and sharded."""
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model: nn.Module, preprocess: Callable):
    """Sums, not means, over the real (unmasked) examples, so padding never counts."""
    logits = model.apply({"params": params}, preprocess(batch), train=False).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything compiled for one config on one mesh; built once, used by every mode."""
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    model: nn.Module
    total_steps: int
    steps_per_epoch: int
    schedule: optax.Schedule
    state_shardings: Any
    abstract_state: Any
    init: Callable[[], TrainState]
    train_steps: Callable      # (state, chunk of k batches) -> (state, per-step metrics)
    evaluate_chunk: Callable   # (params, padded eval chunk) -> summed metrics


def check_batch_divisible(config: ml_collections.ConfigDict, mesh, rules) -> None:
    dp = mesh_lib.data_parallel_size(mesh, rules)
    axes = "×".join(f"{a}={mesh.shape[a]}" for a in mesh_lib.batch_axes(rules)) or "none"
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % dp:
            raise UserError(
                f"--config.{key}={config[key]}: must be divisible by the data-parallel size "
                f"{dp} (batch sharded over {axes}); pick a multiple of {dp} or change the mesh")


def total_steps_for(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
    per_epoch = dataset_lib.steps_per_epoch(num_examples, config.batch_size)
    total = config.num_steps if config.num_steps > 0 else config.num_epochs * per_epoch
    return total, per_epoch


def build_run(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, element_spec: dict,
              num_train: int, experiment=None) -> Run:
    """Compile nothing yet: jit wrappers, shardings and the abstract state, from shapes only."""
    rules = mesh_lib.rules_from_config(config)
    model = make_model(config, experiment)
    total, per_epoch = total_steps_for(config, num_train)
    tx, schedule = make_optimizer(config.optimizer, total)
    preprocess = images.preprocess
    sample = {k: np.zeros((1,) + v.shape, v.dtype) for k, v in element_spec.items()}

    def init_boxed(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = model.init(params_rng, preprocess(sample), train=False)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=state_rng)

    rng = jax.random.PRNGKey(config.seed)
    boxed = jax.eval_shape(init_boxed, rng)
    state_shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    init = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=state_shardings)
    abstract_state = jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        nn.meta.unbox(boxed), state_shardings)

    loss_fn = functools.partial(classification_loss, model=model, preprocess=preprocess,
                                l2=config.l2)

    def train_steps(state, chunk):
        return jax.lax.scan(lambda s, b: train_step(s, b, loss_fn=loss_fn, tx=tx), state, chunk)

    def evaluate_chunk(params, chunk):
        sums = jax.lax.scan(
            lambda carry, b: (carry, eval_step(params, b, model=model, preprocess=preprocess)),
            None, chunk)[1]
        return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), sums)

    chunk_sharding = mesh_lib.batch_sharding(mesh, rules, leading_dims=1)
    replicated = mesh_lib.replicated(mesh)
    return Run(
        config=config, mesh=mesh, rules=rules, model=model, total_steps=total,
        steps_per_epoch=per_epoch, schedule=schedule, state_shardings=state_shardings,
        abstract_state=abstract_state, init=lambda: init(rng),
        train_steps=jax.jit(train_steps, in_shardings=(state_shardings, chunk_sharding),
                            out_shardings=(state_shardings, replicated), donate_argnums=0),
        evaluate_chunk=jax.jit(evaluate_chunk,
                               in_shardings=(state_shardings.params, chunk_sharding),
                               out_shardings=replicated))


def put_chunk(run: Run, chunk: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays of shape (k, batch, ...) to global arrays sharded along the batch."""
    sharding = mesh_lib.batch_sharding(run.mesh, run.rules, leading_dims=1)
    return {k: jax.make_array_from_process_local_data(sharding, v, v.shape)
            for k, v in chunk.items()}


def evaluate(run: Run, params, dataset: dataset_lib.ArrayDataset) -> dict[str, dict[str, float]]:
    results = {}
    for split, data in dataset.eval_splits.items():
        chunk = dataset_lib.eval_chunk(data, run.config.eval_batch_size)
        sums = jax.device_get(run.evaluate_chunk(params, put_chunk(run, chunk)))
        count = float(sums["count"])
        results[split] = {"loss": float(sums["loss_sum"]) / count,
                          "accuracy": float(sums["correct"]) / count,
                          "num_examples": int(count)}
    return results


def every(value: int, default: int) -> int:
    return default if value <= 0 else value


def call_length(step: int, stop: int, steps_per_call: int) -> int:
    """Steps in the next compiled call, never crossing `stop`.

    Short calls are powers of two, so at most log2(steps_per_call) + 1 shapes ever compile.
    """
    remaining = stop - step
    if remaining >= steps_per_call:
        return steps_per_call
    return 1 << (remaining.bit_length() - 1)


def setup(config: ml_collections.ConfigDict, experiment=None, devices=None):
    """Mesh, batch checks, data and compiled steps: everything a mode needs before it runs.

    `devices` defaults to all devices; passing a subset lets one process compare meshes.
    """
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    check_batch_divisible(config, mesh, mesh_lib.rules_from_config(config))
    dataset = load_dataset(config)
    spec = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in dataset.train.items()}
    return build_run(config, mesh, spec, dataset.num_train, experiment), dataset


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, experiment=None,
                       devices=None) -> dict[str, dict[str, float]]:
    """Train from the latest checkpoint in `workdir` (or from scratch) and evaluate."""
    run, dataset = setup(config, experiment, devices)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    state, resumed = checkpoint.restore_or_init(manager, run.abstract_state, run.init)
    step = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, resume_step=step)
    progress = Progress(run.total_steps)
    progress.message(
        f"data: {dataset.source} ({dataset.num_train} train examples); mesh "
        f"{dict(run.mesh.shape)}; {run.total_steps} steps of batch {config.batch_size}"
        + (f"; resumed at step {step}" if resumed else ""))
    eval_every = every(config.eval_every_steps, run.steps_per_epoch)
    checkpoint_every = every(config.checkpoint_every_steps, run.steps_per_epoch)
    logger = _StepLogger(writer, progress, run, config)

    pending = None
    while step < run.total_steps:
        stop = min(run.total_steps, _next_multiple(step, eval_every),
                   _next_multiple(step, checkpoint_every))
        num_steps = call_length(step, stop, config.steps_per_call)
        chunk = dataset_lib.train_chunk(dataset.train, config.seed, step, num_steps,
                                        config.batch_size)
        state, metrics = run.train_steps(state, put_chunk(run, chunk))
        if pending is not None:
            logger.log(*pending)  # the previous call's metrics, while this call runs
        pending = (step, metrics)
        step += num_steps
        if step % eval_every == 0 or step % checkpoint_every == 0 or step == run.total_steps:
            logger.log(*pending)
            pending = None
            if step % checkpoint_every == 0 or step == run.total_steps:
                checkpoint.save(manager, state)
            if step % eval_every == 0 and step != run.total_steps:
                _write_eval(writer, progress, step, evaluate(run, state.params, dataset))
            logger.pause()

    results = evaluate(run, state.params, dataset)
    _write_eval(writer, progress, step, results)
    checkpoint.save(manager, state)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    for split, values in results.items():
        progress.message(f"final {split} loss {values['loss']:.4f} "
                         f"accuracy {values['accuracy']:.4f} ({values['num_examples']} examples)")
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: Path, experiment=None,
                        devices=None) -> dict[str, dict[str, float]]:
    """`--mode=eval`: the latest checkpoint, evaluated on every eval split."""
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    if manager.latest_step() is None:
        raise UserError(f"--workdir={workdir}: no checkpoint to evaluate in "
                        f"{Path(workdir) / 'checkpoints'}; train first with --mode=train")
    run, dataset = setup(config, experiment, devices)
    state = checkpoint.restore(manager, run.abstract_state)
    step = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, resume_step=2**62)
    progress = Progress(run.total_steps)
    results = evaluate(run, state.params, dataset)
    _write_eval(writer, progress, step, results)
    writer.close()
    manager.close()
    return results


def _next_multiple(step: int, period: int) -> int:
    return (step // period + 1) * period


def _write_eval(writer: MetricsWriter, progress: Progress, step: int, results: dict) -> None:
    for split, values in results.items():
        writer.write(step, split, **values)
        progress.message(f"step {step}: {split} loss {values['loss']:.4f} "
                         f"accuracy {values['accuracy']:.4f}")


class _StepLogger:
    """Turns per-step metric arrays into windowed log records and the progress line."""

    def __init__(self, writer: MetricsWriter, progress: Progress, run: Run, config):
        self.writer, self.progress, self.run = writer, progress, run
        self.every = config.log_every_steps
        self.batch_size = config.batch_size
        self.window: list[dict[str, float]] = []
        self.window_seconds = 0.0
        self.last_time = time.perf_counter()

    def log(self, first_step: int, metrics) -> None:
        metrics = jax.device_get(metrics)  # waits for the call that produced them
        num_steps = len(metrics["loss"])
        now = time.perf_counter()
        seconds_per_step = (now - self.last_time) / num_steps
        self.last_time = now
        for i in range(num_steps):
            self.window.append({k: float(v[i]) for k, v in metrics.items()})
            self.window_seconds += seconds_per_step
            step = first_step + i + 1
            if step % self.every == 0 or step == self.run.total_steps:
                self._flush(step)

    def pause(self) -> None:
        """Time spent on evaluation or checkpoints does not count as training time."""
        self.last_time = time.perf_counter()

    def _flush(self, step: int) -> None:
        rate = len(self.window) * self.batch_size / max(self.window_seconds, 1e-9)
        means = {k: float(np.mean([m[k] for m in self.window])) for k in self.window[0]}
        eta = (self.run.total_steps - step) * self.batch_size / rate
        self.writer.write(step, "train", **means, examples_per_sec=rate,
                          learning_rate=float(self.run.schedule(step - 1)))
        self.progress.update(step, means["loss"], rate, eta)
        self.window = []
        self.window_seconds = 0.0
