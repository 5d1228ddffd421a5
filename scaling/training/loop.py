"""The training loop and eval-only runs.

The loop is flat: build the run, restore or initialise, then run chunks of `steps_per_call`
steps per compiled call (a `lax.scan` over stacked batches) so the host never bounds a small
model. Metrics are read one call late, so the host never stalls the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from scaling.data import heldout
from scaling.data.tokenizer import TOKENIZER_DIR, save_tokenizer
from scaling.errors import Interrupted, Preempted, TrainingDiverged, UserError
from scaling.models import lora
from scaling.runtime import checkpoint, chips, profiling, startup_gc
from scaling.runtime import workdir as workdir_lib
from scaling.runtime.metrics import MetricsWriter, Progress, throughput
from scaling.runtime.preemption import PreemptionWatch
from scaling.runtime.workdir import write_config
from scaling.training.run import Run, evaluate, make_train_loader, put_local_chunk, setup
from scaling.training.state_summary import state_table
from scaling.training.steps import TrainState


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, experiment=None,
                       devices=None, profile_steps: profiling.StepWindow | None = None,
                       initial_params: Callable[[Any], Any] | None = None
                       ) -> dict[str, dict[str, float]]:
    """Train from the latest checkpoint in `workdir` (or from scratch) and evaluate.

    A fresh run starts from `initial_params(abstract_params)` when given (`init_from`:
    fine-tuning), with a fresh optimizer at step 0; a resumed one ignores it."""
    run, dataset = setup(config, experiment, devices)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    trace = profiling.StepTrace(profile_steps, workdir, run.total_steps)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    init = starting_state(run, initial_params)
    state, resumed = checkpoint.restore_or_init(manager, saved_form(run, manager), init)
    if resumed and lora_rank(config):  # only the adapters were saved: lay them on the start
        state = state.replace(params=lora.overlay(init().params, state.params))
    if jax.process_index() == 0:  # only once the checkpoint is known to fit this config
        write_config(config, workdir)
        save_for_inference(dataset, workdir)
    step = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, resume_step=step)
    progress = Progress(run.total_steps)
    progress.message(state_table(run.abstract_state, run.mesh))
    progress.message(
        f"data: {dataset.source} ({dataset.num_train} train examples); "
        f"{run.total_steps} steps of batch {config.batch_size}"
        + (f"; resumed at step {step}" if resumed else ""))
    loader = make_train_loader(run, dataset, step)
    logger = _StepLogger(writer, progress, run, config, loader, manager)
    trace.resume(step, progress.message)

    watch = PreemptionWatch()
    try:
        state, step = _train_loop(run, dataset, state, step, manager, logger, writer, progress,
                                  loader, watch, trace)
        results = evaluate(run, state.params, dataset)
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


def lora_rank(config: ml_collections.ConfigDict) -> int:
    return config.model.get("lora_rank", 0)


def starting_state(run: Run, initial_params: Callable[[Any], Any] | None) -> Callable:
    """A fresh state: from `initial_params` (init_from) when given, else the seed's init.
    The source has no LoRA adapters, so they always start from their init."""
    if initial_params is None:
        return run.init
    return lambda: run.start_from(initial_params(lora.without_adapters(
        run.abstract_state.params)))


def saved_form(run: Run, manager: checkpoint.Checkpoints):
    """The abstract state as checkpoints hold it; a LoRA run saves its adapters alone (the
    frozen params are its starting point, made again on resume)."""
    if not lora_rank(run.config):
        return run.abstract_state
    manager.view = lambda state: state.replace(params=lora.adapters_only(state.params))
    return manager.view(run.abstract_state)


def save_for_inference(dataset, workdir: Path) -> None:
    """What predict, export and sample need from the data, kept in the workdir: the tokenizer
    and a small sample of each eval split, so they run after the dataset is gone."""
    root = Path(workdir).resolve()
    for name in (TOKENIZER_DIR, heldout.FILE_NAME):
        if root not in (root / name).resolve().parents:
            raise UserError(f"{root / name} leads outside the workdir; remove it or choose "
                            "another --workdir")
    if dataset.tokenizer is not None:
        save_tokenizer(dataset.tokenizer, Path(workdir) / TOKENIZER_DIR)
    heldout.save_sample(dataset, workdir)


def _train_loop(run: Run, dataset, state, step: int, manager, logger, writer, progress,
                loader, watch: PreemptionWatch,
                trace: profiling.StepTrace) -> tuple[TrainState, int]:
    config = run.config
    eval_every = every(config.eval_every_steps, run.steps_per_epoch)
    checkpoint_every = every(config.checkpoint_every_steps, run.steps_per_epoch)
    pending = None
    while step < run.total_steps:
        stop = min(run.total_steps, _next_multiple(step, eval_every),
                   _next_multiple(step, checkpoint_every))
        num_steps = call_length(step, stop, config.steps_per_call)
        chunk = put_local_chunk(run, loader.next(num_steps), loader.local_rows,
                                config.batch_size)
        trace.before_call(step, num_steps)
        state, metrics = run.train_steps(state, chunk)
        trace.after_call(step + num_steps, (state, metrics))
        if pending is not None:
            logger.log(*pending)  # the previous call's metrics, while this call runs
            startup_gc.resume()  # start-up ends with the first step reported
        pending = (step, metrics)
        step += num_steps
        if step % eval_every == 0 or step % checkpoint_every == 0 or step == run.total_steps:
            logger.log(*pending)  # checked before anything is saved
            startup_gc.resume()
            pending = None
            if step % checkpoint_every == 0 or step == run.total_steps:
                checkpoint.save(manager, state)
            if step % eval_every == 0 and step != run.total_steps:
                _write_eval(writer, progress, step, evaluate(run, state.params, dataset))
            logger.pause()
        if watch.should_stop():
            if pending is not None:
                logger.log(*pending)
            checkpoint.save(manager, state, force=True)
            checkpoint.wait(manager)
            why = "interrupted" if watch.interrupted else "preempted"
            progress.message(f"{why}: saved step {step}; re-run the same command to resume")
            raise (Interrupted if watch.interrupted else Preempted)(step)
    return state, step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: Path, experiment=None,
                        initial_params: Callable[[Any], Any] | None = None
                        ) -> dict[str, dict[str, float]]:
    """`--mode=eval`: the latest checkpoint, evaluated on every eval split (a LoRA run's
    adapters on the params it started from: `initial_params`, as in training)."""
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    if manager.latest_step() is None:
        raise UserError(f"--workdir={workdir}: no checkpoint to evaluate in "
                        f"{Path(workdir) / 'checkpoints'}; train first with --mode=train")
    run, dataset = setup(config, experiment)
    with checkpoint.read_only(manager):
        state = checkpoint.restore(manager, saved_form(run, manager))
    if lora_rank(config):
        start = starting_state(run, initial_params)()
        state = state.replace(params=lora.overlay(start.params, state.params))
    step = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, resume_step=2**62, settle=not workdir_lib.in_use(workdir))
    progress = Progress(run.total_steps)
    results = evaluate(run, state.params, dataset)
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

    def __init__(self, writer: MetricsWriter, progress: Progress, run: Run, config, loader,
                 manager: checkpoint.Checkpoints):
        self.writer, self.progress, self.run, self.loader = writer, progress, run, loader
        self.manager = manager
        self.every = config.log_every_steps
        self.batch_size = config.batch_size
        chip = chips.chip_for(run.mesh.devices.flat[0].device_kind)
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
                saved = self.manager.saving or self.manager.latest_step()
                kept = (f"The checkpoint of step {saved} holds the last good state" if saved
                        else "No checkpoint exists yet, so a re-run starts over")
                raise TrainingDiverged(
                    f"step {first_step + i + 1}: the loss ({values['loss']}) or gradient norm "
                    f"({values['grad_norm']}) is not finite; stopped without saving it. "
                    f"{kept}; lower the learning rate, clip gradients, or set "
                    "--config.nan_policy=skip to skip such steps")
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
        # Time the loop waited for the loader: near 0 when prefetching keeps up.
        waited = self.loader.take_wait_seconds()
        rates["data_wait_fraction"] = waited / max(self.window_seconds, 1e-9)
        self.progress.update(step, means["loss"], rates, eta)  # the console first
        self.writer.write(step, "train", **means, **rates,
                          learning_rate=float(self.run.schedule(step - 1)))
        self.window = []
        self.window_seconds = 0.0
