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

from scaling import checkpoint, collector, compiler_options, hardware, profiling
from scaling import mesh as mesh_lib
from scaling.data import dataset as dataset_lib
from scaling.data import element_spec, load_dataset
from scaling.errors import TrainingDiverged, UserError
from scaling.metrics import MetricsWriter, Progress, throughput
from scaling.models import make_model, training_flops_per_example
from scaling.optim import make_optimizer
from scaling.preemption import Preempted, PreemptionWatch
from scaling.summary import state_table
from scaling.tasks import Task, get_task, sum_metrics
from scaling.workdir import write_config


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


def objective(params, batch, rng, *, model: nn.Module, task: Task, l2: float):
    """The task loss plus the optional L2 term λ/2·Σw²; what the optimizer descends."""
    logits = model.apply({"params": params}, task.preprocess(batch), train=True,
                         rngs={"dropout": rng}).astype(jnp.float32)
    loss, aux = task.loss(logits, batch)
    if l2:
        aux["data_loss"] = loss
        loss = loss + 0.5 * l2 * l2_penalty(params)
    return loss, aux


def split_microbatches(batch, num_microbatches: int, sharding=None):
    """(B, ...) to (k, B/k, ...), taking every k-th example so each device's rows stay local."""
    def split(x):
        x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
    return jax.tree_util.tree_map(split, batch)


def loss_and_grads(loss_fn: Callable, params, batch, rng, num_microbatches: int = 1,
                   microbatch_sharding=None):
    """Mean loss and gradient over the batch, optionally accumulated over microbatches.

    With equal-sized microbatches the mean of their gradients is the full-batch gradient, so
    accumulation changes memory, not the update.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        return grad_fn(params, batch, rng)

    def accumulate(carry, indexed):
        index, microbatch = indexed
        out = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
        return jax.tree_util.tree_map(jnp.add, carry, out), None

    microbatches = split_microbatches(batch, num_microbatches, microbatch_sharding)
    first = jax.tree_util.tree_map(lambda x: x[0], microbatches)
    zeros = jax.tree_util.tree_map(
        jnp.zeros_like, jax.eval_shape(grad_fn, params, first, rng))
    total, _ = jax.lax.scan(accumulate, zeros,
                            (jnp.arange(num_microbatches), microbatches))
    return jax.tree_util.tree_map(lambda x: x / num_microbatches, total)


def train_step(state: TrainState, batch, *, loss_fn: Callable,
               tx: optax.GradientTransformation, num_microbatches: int = 1,
               microbatch_sharding=None, skip_nonfinite: bool = False):
    """One optimizer update; pure, so it can be scanned, jitted and sharded.

    With `skip_nonfinite`, a step whose loss or gradients are not finite leaves params and
    optimizer state exactly as they were (the batch is still consumed).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = loss_and_grads(loss_fn, state.params, batch, rng, num_microbatches,
                                        microbatch_sharding)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
    if skip_nonfinite:
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree_util.tree_map,
                                 lambda new, old: jnp.where(finite, new, old))
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_logits(params, batch, *, model: nn.Module, task: Task) -> jax.Array:
    """Float32 logits of the model in eval mode from a raw batch: the one forward pass that
    evaluation, prediction and export all share, so they preprocess exactly as training."""
    return model.apply({"params": params}, task.preprocess(batch),
                       train=False).astype(jnp.float32)


def eval_step(params, batch, *, model: nn.Module, task: Task):
    """Sums, not means, over the real (unmasked) examples, so padding never counts."""
    return task.eval_sums(eval_logits(params, batch, model=model, task=task), batch)


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything compiled for one config on one mesh; built once, used by every mode."""
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    model: nn.Module
    task: Task
    total_steps: int
    steps_per_epoch: int
    schedule: optax.Schedule
    state_shardings: Any
    abstract_state: Any
    init: Callable[[], TrainState]
    flops_per_example: float   # analytic training FLOPs, for TFLOP/s and MFU
    items_per_example: int     # tokens (or images) per example, for throughput
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
    accum = config.grad_accum_steps
    if accum < 1 or config.batch_size % (accum * dp):
        raise UserError(
            f"--config.grad_accum_steps={accum}: must be positive and split "
            f"--config.batch_size={config.batch_size} into microbatches divisible by the "
            f"data-parallel size {dp}")


NAN_POLICIES = ("abort", "skip")


def nan_policy(config: ml_collections.ConfigDict) -> str:
    policy = config.get("nan_policy", "abort")
    if policy not in NAN_POLICIES:
        raise UserError(f"--config.nan_policy={policy}: expected one of "
                        f"{', '.join(NAN_POLICIES)}")
    return policy


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
    task = get_task(config.task)
    sample = {k: np.zeros((1,) + v.shape, v.dtype) for k, v in element_spec.items()}

    def init_boxed():
        # The key is made inside the compiled init: made eagerly, it costs two more programs.
        params_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
        params = model.init(params_rng, task.preprocess(sample), train=False)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=state_rng)

    boxed = jax.eval_shape(init_boxed)
    state_shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    init = mesh_lib.with_mesh_rules(
        jax.jit(lambda: nn.meta.unbox(init_boxed()), out_shardings=state_shardings),
        mesh, rules)
    abstract_state = jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        nn.meta.unbox(boxed), state_shardings)

    loss_fn = functools.partial(objective, model=model, task=task, l2=config.l2)
    chunk_sharding = mesh_lib.batch_sharding(mesh, rules, leading_dims=1)
    step_fn = functools.partial(train_step, loss_fn=loss_fn, tx=tx,
                                num_microbatches=config.grad_accum_steps,
                                microbatch_sharding=chunk_sharding,
                                skip_nonfinite=nan_policy(config) == "skip")

    def train_steps(state, chunk):
        return jax.lax.scan(step_fn, state, chunk)

    def evaluate_chunk(params, chunk):
        sums = jax.lax.scan(
            lambda carry, b: (carry, eval_step(params, b, model=model, task=task)),
            None, chunk)[1]
        return sum_metrics(sums)

    replicated = mesh_lib.replicated(mesh)
    platform = mesh_lib.platform(mesh)
    xla_options = compiler_options.for_platform(config, platform)
    compiler_options.check(xla_options, platform)
    return Run(
        config=config, mesh=mesh, rules=rules, model=model, task=task, total_steps=total,
        steps_per_epoch=per_epoch, schedule=schedule, state_shardings=state_shardings,
        abstract_state=abstract_state, init=init,
        flops_per_example=training_flops_per_example(model, abstract_state.params,
                                                     element_spec),
        items_per_example=task.items_per_example(element_spec),
        train_steps=mesh_lib.with_mesh_rules(
            jax.jit(train_steps, in_shardings=(state_shardings, chunk_sharding),
                    out_shardings=(state_shardings, replicated), donate_argnums=0,
                    compiler_options=xla_options or None),
            mesh, rules),
        evaluate_chunk=mesh_lib.with_mesh_rules(
            jax.jit(evaluate_chunk, in_shardings=(state_shardings.params, chunk_sharding),
                    out_shardings=replicated, compiler_options=xla_options or None),
            mesh, rules))


def put_chunk(run: Run, chunk: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays of shape (k, batch, ...) to global arrays sharded along the batch."""
    sharding = mesh_lib.batch_sharding(run.mesh, run.rules, leading_dims=1)
    return {k: jax.make_array_from_callback(v.shape, sharding, v.__getitem__)
            for k, v in chunk.items()}


def put_train_chunk(run: Run, data: dict[str, np.ndarray], start_step: int,
                    num_steps: int) -> dict[str, jax.Array]:
    """The global batches of `num_steps` steps, each process gathering only the rows that its
    own devices hold, so no host ever builds a whole global batch."""
    config = run.config
    num_examples = len(next(iter(data.values())))
    indices = dataset_lib.train_chunk_indices(config.seed, start_step, num_steps,
                                              config.batch_size, num_examples)
    sharding = mesh_lib.batch_sharding(run.mesh, run.rules, leading_dims=1)
    return {k: jax.make_array_from_callback(indices.shape + v.shape[1:], sharding,
                                            lambda index, v=v: v[indices[index[:2]]])
            for k, v in data.items()}


def put_eval_splits(run: Run, dataset: dataset_lib.ArrayDataset) -> dict[str, dict]:
    """Every eval split, padded and placed on the devices once for the whole run."""
    return {split: put_chunk(run, dataset_lib.eval_chunk(data, run.config.eval_batch_size))
            for split, data in dataset.eval_splits.items()}


def evaluate(run: Run, params, eval_splits: dict[str, dict]) -> dict[str, dict[str, float]]:
    return {split: run.task.summarize(jax.device_get(run.evaluate_chunk(params, chunk)))
            for split, chunk in eval_splits.items()}


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


def build_run_from_shapes(config: ml_collections.ConfigDict, mesh, experiment=None) -> Run:
    """The Run of `setup` without loading any data: the example's shape comes from the config,
    so describe and preflight can size a step for hardware this machine does not have."""
    check_batch_divisible(config, mesh, mesh_lib.rules_from_config(config))
    return build_run(config, mesh, element_spec(config), num_train=config.batch_size,
                     experiment=experiment)


def describe(config: ml_collections.ConfigDict, num_devices: int, experiment=None) -> str:
    """`--mode=describe`: the state table for a mesh of any size, built from shapes alone."""
    mesh = mesh_lib.make_abstract_mesh(config.mesh, num_devices)
    run = build_run_from_shapes(config, mesh, experiment)
    per_step = run.flops_per_example * config.batch_size
    return (state_table(run.abstract_state, mesh) + "\n"
            f"training FLOPs per step {per_step:.3e} ({per_step / num_devices:.3e} a device)")


def setup(config: ml_collections.ConfigDict, experiment=None, devices=None):
    """Mesh, batch checks, data and compiled steps: everything a mode needs before it runs.

    `devices` defaults to all devices; passing a subset lets one process compare meshes.
    """
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    check_batch_divisible(config, mesh, mesh_lib.rules_from_config(config))
    dataset = load_dataset(config)
    vocab = config.model.get("vocab_size")
    if dataset.tokenizer is not None and vocab is not None and vocab < dataset.tokenizer.vocab_size:
        raise UserError(f"--config.model.vocab_size={vocab}: the tokenizer has "
                        f"{dataset.tokenizer.vocab_size} tokens; raise it to at least that")
    spec = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in dataset.train.items()}
    return build_run(config, mesh, spec, dataset.num_train, experiment), dataset


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, experiment=None,
                       devices=None, profile_steps: profiling.StepWindow | None = None
                       ) -> dict[str, dict[str, float]]:
    """Train from the latest checkpoint in `workdir` (or from scratch) and evaluate."""
    run, dataset = setup(config, experiment, devices)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    trace = profiling.StepTrace(profile_steps, workdir, run.total_steps)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    state, resumed = checkpoint.restore_or_init(manager, run.abstract_state, run.init)
    if jax.process_index() == 0:  # only once the checkpoint is known to fit this config
        write_config(config, workdir)
    step = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, resume_step=step)
    progress = Progress(run.total_steps)
    progress.message(state_table(run.abstract_state, run.mesh))
    progress.message(
        f"data: {dataset.source} ({dataset.num_train} train examples); "
        f"{run.total_steps} steps of batch {config.batch_size}"
        + (f"; resumed at step {step}" if resumed else ""))
    logger = _StepLogger(writer, progress, run, config)
    trace.resume(step, progress.message)
    eval_splits = put_eval_splits(run, dataset)

    watch = PreemptionWatch()
    try:
        state, step = _train_loop(run, dataset, state, step, manager, logger, writer, progress,
                                  eval_splits, watch, trace)
        results = evaluate(run, state.params, eval_splits)
        _write_eval(writer, progress, step, results)
        checkpoint.save(manager, state)
    finally:
        trace.close()
        checkpoint.wait(manager)  # a save in flight still commits, even on an error
        manager.close()
        writer.close()
        watch.close()
    for split, values in results.items():
        progress.message(f"final {split} {format_metrics(values)}")
    return results


def _train_loop(run: Run, dataset, state, step: int, manager, logger, writer, progress,
                eval_splits, watch: PreemptionWatch,
                trace: profiling.StepTrace) -> tuple[TrainState, int]:
    config = run.config
    eval_every = every(config.eval_every_steps, run.steps_per_epoch)
    checkpoint_every = every(config.checkpoint_every_steps, run.steps_per_epoch)
    pending = None
    while step < run.total_steps:
        stop = min(run.total_steps, _next_multiple(step, eval_every),
                   _next_multiple(step, checkpoint_every))
        num_steps = call_length(step, stop, config.steps_per_call)
        chunk = put_train_chunk(run, dataset.train, step, num_steps)
        trace.before_call(step, num_steps)
        state, metrics = run.train_steps(state, chunk)
        trace.after_call(step + num_steps, (state, metrics))
        if pending is not None:
            logger.log(*pending)  # the previous call's metrics, while this call runs
            collector.resume()  # start-up ends with the first step reported
        pending = (step, metrics)
        step += num_steps
        if step % eval_every == 0 or step % checkpoint_every == 0 or step == run.total_steps:
            logger.log(*pending)  # checked before anything is saved
            collector.resume()
            pending = None
            if step % checkpoint_every == 0 or step == run.total_steps:
                checkpoint.save(manager, state)
            if step % eval_every == 0 and step != run.total_steps:
                _write_eval(writer, progress, step, evaluate(run, state.params, eval_splits))
            logger.pause()
        if watch.should_stop():
            if pending is not None:
                logger.log(*pending)
            checkpoint.save(manager, state, force=True)
            checkpoint.wait(manager)
            progress.message(f"preempted: saved step {step}; re-run the same command to resume")
            raise Preempted(step)
    return state, step


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
    results = evaluate(run, state.params, put_eval_splits(run, dataset))
    _write_eval(writer, progress, step, results)
    writer.close()
    manager.close()
    return results


def _next_multiple(step: int, period: int) -> int:
    return (step // period + 1) * period


def format_metrics(values: dict) -> str:
    """`loss 0.3262 accuracy 0.8851 (10000 examples)`, whatever the task reports."""
    counts = {k: v for k, v in values.items() if k.startswith("num_")}
    text = " ".join(f"{k} {v:.4f}" for k, v in values.items() if k not in counts)
    return text + "".join(f" ({v} {k[4:]})" for k, v in counts.items())


def _write_eval(writer: MetricsWriter, progress: Progress, step: int, results: dict) -> None:
    for split, values in results.items():
        writer.write(step, split, **values)
        progress.message(f"step {step}: {split} {format_metrics(values)}")


class _StepLogger:
    """Turns per-step metric arrays into windowed log records and the progress line."""

    def __init__(self, writer: MetricsWriter, progress: Progress, run: Run, config):
        self.writer, self.progress, self.run = writer, progress, run
        self.every = config.log_every_steps
        self.batch_size = config.batch_size
        chip = hardware.chip_for(run.mesh.devices.flat[0].device_kind)
        self.peak_flops = chip.peak_flops if chip else None
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
            values = {k: float(v[i]) for k, v in metrics.items()}
            if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])) and \
                    "skipped" not in values:
                raise TrainingDiverged(
                    f"step {first_step + i + 1}: the loss ({values['loss']}) or gradient norm "
                    f"({values['grad_norm']}) is not finite; stopped without saving it. The "
                    "latest checkpoint holds the last good state; lower the learning rate, "
                    "clip gradients, or set --config.nan_policy=skip to skip such steps")
            self.window.append(values)
            self.window_seconds += seconds_per_step
            step = first_step + i + 1
            if step % self.every == 0 or step == self.run.total_steps:
                self._flush(step)

    def pause(self) -> None:
        """Time spent on evaluation or checkpoints does not count as training time."""
        self.last_time = time.perf_counter()

    def _flush(self, step: int) -> None:
        rate = len(self.window) * self.batch_size / max(self.window_seconds, 1e-9)
        # Steps skipped by the NaN policy are counted, not averaged in.
        finite = [m for m in self.window if np.isfinite(m["loss"])] or self.window
        means = {k: float(np.mean([m[k] for m in finite])) for k in self.window[0]}
        if "skipped" in self.window[0]:
            means["skipped"] = float(sum(m["skipped"] for m in self.window))
        eta = (self.run.total_steps - step) * self.batch_size / rate
        rates = throughput(rate, self.run.items_per_example, self.run.flops_per_example,
                           self.run.mesh.size, self.peak_flops)
        self.progress.update(step, means["loss"], rates, eta)  # the console first
        self.writer.write(step, "train", **means, **rates,
                          learning_rate=float(self.run.schedule(step - 1)))
        self.window = []
        self.window_seconds = 0.0
