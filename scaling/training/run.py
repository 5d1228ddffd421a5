"""One config on one mesh: shardings, the abstract state, jit wrappers, and data placement.

`build_run` compiles nothing: it derives the logical shardings from `jax.eval_shape` of the
init, so a state is initialised straight into its shardings and describe and preflight can
size any mesh from shapes alone. Every mode that trains or evaluates goes through it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scaling.data import dataset as dataset_lib
from scaling.data import element_spec, load_dataset
from scaling.data.loader import TrainLoader, eval_chunks
from scaling.errors import UserError
from scaling.models import axes, init_keys, lora, make_model, training_flops_per_example
from scaling.sharding import mesh as mesh_lib
from scaling.training import compiler_options, memory_check
from scaling.training.optimizer import make_optimizer
from scaling.training.state_summary import state_table
from scaling.training.steps import TrainState, eval_step, objective, train_step
from scaling.training.tasks import Task, get_task, sum_metrics


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
    start_from: Callable[[Any], TrainState]  # params -> a fresh state holding them (init_from)
    flops_per_example: float | None  # the model's analytic training FLOPs (None: no formula)
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
    policy = config.nan_policy
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
    model = make_model(config, experiment, mesh_lib.platform(mesh))
    total, per_epoch = total_steps_for(config, num_train)
    tx, schedule = make_optimizer(config.optimizer, total)
    lora_rank = config.model.get("lora_rank", 0)
    if lora_rank:  # adapters alone train: no moments and no gradients for the rest
        tx = optax.multi_transform({lora.ADAPTER: tx, lora.FROZEN: optax.set_to_zero()},
                                   lora.optimizer_labels)
    task = get_task(config.task)
    sample = {k: np.zeros((1,) + v.shape, v.dtype) for k, v in element_spec.items()}

    def init_boxed(given=None):
        """A fresh state; `given` params (init_from) replace the initialised ones they name,
        so only what they lack (LoRA adapters) keeps its init, the rest compiled away."""
        # The key is made inside the compiled init: made eagerly, it costs two more programs.
        params_rng, state_rng = init_keys(config.seed)
        params = model.init(params_rng, task.preprocess(sample), train=False)["params"]
        if given is not None:
            params = lora.overlay(nn.meta.unbox(params), given)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=state_rng)

    with axes.recording() as activation_axes:  # the init traces the forward pass once
        boxed = jax.eval_shape(init_boxed)
    # Every logical name the model uses, in params or activations, must have a rule.
    mesh_lib.rules_from_config(config, mesh_lib.logical_names(boxed) | activation_axes)
    state_shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    init = mesh_lib.with_mesh_rules(
        jax.jit(lambda: nn.meta.unbox(init_boxed()), out_shardings=state_shardings),
        mesh, rules)
    start_from = mesh_lib.with_mesh_rules(
        jax.jit(lambda params: nn.meta.unbox(init_boxed(params)),
                out_shardings=state_shardings),
        mesh, rules)
    abstract_state = jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        nn.meta.unbox(boxed), state_shardings)

    loss_fn = functools.partial(objective, model=model, task=task, l2=config.l2)
    if lora_rank:
        def loss_fn(params, batch, rng, objective_fn=loss_fn):
            return objective_fn(lora.freeze_base(params), batch, rng)
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
        abstract_state=abstract_state, init=init, start_from=start_from,
        flops_per_example=training_flops_per_example(model, config, abstract_state.params,
                                                     experiment),
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


def lower_train_step(run: Run, steps_per_call: int = 1) -> jax.stages.Lowered:
    """`run.train_steps` lowered as training calls it, for a chunk of `steps_per_call` global
    batches given by shape: with the mesh and the logical axis rules in scope, without which
    the models' activation constraints are silently dropped. Preflight and the tests that
    read collectives or shardings all lower through here, so they see the real program."""
    sharding = mesh_lib.batch_sharding(run.mesh, run.rules, leading_dims=1)
    chunk = {k: jax.ShapeDtypeStruct((steps_per_call, run.config.batch_size) + v.shape,
                                     v.dtype, sharding=sharding)
             for k, v in element_spec(run.config).items()}
    lower = mesh_lib.with_mesh_rules(run.train_steps.inner.lower, run.mesh, run.rules)
    return lower(run.abstract_state, chunk)


def local_batch_rows(run: Run, batch_size: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold, in order."""
    sharding = mesh_lib.batch_sharding(run.mesh, run.rules, leading_dims=1)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((1, batch_size)).values():
        rows.update(range(*index[1].indices(batch_size)))
    return np.array(sorted(rows), np.int64)


def put_local_chunk(run: Run, chunk: dict[str, np.ndarray], local_rows: np.ndarray,
                    batch_size: int) -> dict[str, jax.Array]:
    """This process's rows (k, len(local_rows), ...) of k global batches as global arrays
    sharded along the batch; no process ever holds another's rows."""
    sharding = mesh_lib.batch_sharding(run.mesh, run.rules, leading_dims=1)

    def rows_of(value, index):
        take = np.searchsorted(local_rows, np.arange(batch_size)[index[1]])
        return value[index[0]][:, take]

    return {k: jax.make_array_from_callback((v.shape[0], batch_size) + v.shape[2:], sharding,
                                            functools.partial(rows_of, v))
            for k, v in chunk.items()}


def make_train_loader(run: Run, dataset, start_step: int) -> TrainLoader:
    """This process's loader of the training batches from `start_step` on, reading ahead
    where the rows come from disk."""
    config = run.config
    return TrainLoader(dataset, config.seed, config.batch_size,
                       local_batch_rows(run, config.batch_size), start_step, run.total_steps,
                       config.data.prefetch_steps if dataset.streamed else 0)


def put_train_chunk(run: Run, dataset, start_step: int, num_steps: int) -> dict[str, jax.Array]:
    """The global batches of `num_steps` steps from `start_step`, read at once."""
    rows = local_batch_rows(run, run.config.batch_size)
    loader = TrainLoader(dataset, run.config.seed, run.config.batch_size, rows, start_step,
                         start_step + num_steps, prefetch_steps=0)
    return put_local_chunk(run, loader.next(num_steps), rows, run.config.batch_size)


def evaluate(run: Run, params, dataset) -> dict[str, dict[str, float]]:
    """Every eval split, streamed in chunks of batches; sums add up over chunks and hosts."""
    batch_size = run.config.eval_batch_size
    rows = local_batch_rows(run, batch_size)
    results = {}
    for split in dataset.eval_splits:
        total = None
        for chunk in eval_chunks(dataset, split, batch_size, rows):
            sums = jax.device_get(run.evaluate_chunk(
                params, put_local_chunk(run, chunk, rows, batch_size)))
            total = sums if total is None else jax.tree_util.tree_map(np.add, total, sums)
        results[split] = run.task.summarize(total)
    return results


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
    if run.flops_per_example is None:
        return state_table(run.abstract_state, mesh) + "\ntraining FLOPs: no formula for this model"
    per_step = run.flops_per_example * config.batch_size
    return (state_table(run.abstract_state, mesh) + "\n"
            f"training FLOPs per step {per_step:.3e} ({per_step / num_devices:.3e} a device)")


def setup(config: ml_collections.ConfigDict, experiment=None, devices=None):
    """Mesh, batch checks, data and compiled steps: everything a mode needs before it runs.

    `devices` defaults to all devices; passing a subset lets one process compare meshes.
    """
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    check_batch_divisible(config, mesh, mesh_lib.rules_from_config(config))
    make_model(config, experiment, mesh_lib.platform(mesh))  # choices the devices refuse fail
    dataset = load_dataset(config)                            # before any data is read
    vocab = config.model.get("vocab_size")
    if dataset.tokenizer is not None and vocab is not None and vocab < dataset.tokenizer.vocab_size:
        raise UserError(f"--config.model.vocab_size={vocab}: the tokenizer has "
                        f"{dataset.tokenizer.vocab_size} tokens; raise it to at least that")
    run = build_run(config, mesh, element_spec(config), dataset.num_train, experiment)
    memory_check.check_fits(config, run.abstract_state, element_spec(config), mesh.devices.flat,
                            config.data.prefetch_steps if dataset.streamed else 0)
    return run, dataset
