"""A trained model for inference: the mesh, the model and its params, and nothing else.

Predict, export and sample need the forward pass and the weights. Going through the training
run would load the dataset (the whole training split) and build the optimizer, only to throw
both away; it would also fail once the data has moved. Here the example's shape comes from
the config (`scaling.data.element_spec`), the params' shapes and logical shardings from
`jax.eval_shape` of `model.init`, and Orbax reads the `params` subtree of the checkpoint
alone (a partial restore), straight into those shardings.

The checkpoint's params are compared with this config's before any array is read, with the
same message as a training restore; the model-config guard of `scaling.runtime.provenance`
runs before any mode starts, so it holds here too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from scaling.data import element_spec
from scaling.data.preprocess import Preprocessing, get_preprocessing
from scaling.errors import UserError
from scaling.inference import sources
from scaling.models import init_keys, lora, make_model
from scaling.runtime import checkpoint
from scaling.sharding import mesh as mesh_lib

PARAMS = checkpoint.PARAMS


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint's params on a mesh, with the model and task that give them meaning."""
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    model: nn.Module
    task: Preprocessing  # how the task's batches become the model's inputs
    param_shardings: Any
    params: Any
    step: int


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model and the abstract params it would initialise, placed on a mesh."""
    mesh: jax.sharding.Mesh
    rules: tuple
    model: nn.Module
    task: Preprocessing
    param_shardings: Any
    abstract_params: Any  # ShapeDtypeStructs carrying their target shardings


def model_spec(config: ml_collections.ConfigDict, experiment=None) -> ModelSpec:
    """Mesh, model and abstract params from the config alone: no data, no optimizer."""
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.rules_from_config(config)
    model = make_model(config, experiment, mesh_lib.platform(mesh))
    task = get_preprocessing(config.task)
    sample = {k: np.zeros((1,) + v.shape, v.dtype) for k, v in element_spec(config).items()}

    def init_params():
        return model.init(jax.random.PRNGKey(0), task.preprocess(sample), train=False)[PARAMS]

    boxed = jax.eval_shape(init_params)
    shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        nn.meta.unbox(boxed), shardings)
    return ModelSpec(mesh=mesh, rules=rules, model=model, task=task,
                     param_shardings=shardings, abstract_params=abstract)


def check_batch_divisible(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                          rules: tuple) -> None:
    """Prediction batches are `eval_batch_size` rows, sharded like evaluation's."""
    dp = mesh_lib.data_parallel_size(mesh, rules)
    if config.eval_batch_size % dp:
        raise UserError(f"--config.eval_batch_size={config.eval_batch_size}: must be divisible "
                        f"by the data-parallel size {dp}; pick a multiple of {dp} or change "
                        "the mesh")


def checkpoint_step(manager: checkpoint.Checkpoints, requested: int | None,
                    workdir: Path) -> int:
    """The step to restore: the requested one, which must exist, or the latest."""
    available = manager.all_steps()
    if not available:
        raise UserError(f"--workdir={workdir}: no checkpoint in {manager.directory}; train "
                        "first with --mode=train")
    if requested is None:
        return max(available)
    if requested not in available:
        raise UserError(f"--checkpoint_step={requested}: no such checkpoint in "
                        f"{manager.directory}; available steps: "
                        f"{', '.join(map(str, sorted(available)))}")
    return requested


def starting_params(config: ml_collections.ConfigDict, spec: ModelSpec) -> Any:
    """The params a run started from, without adapters: `init_from`'s, or its seed's init,
    made again exactly as training made them."""
    base = lora.without_adapters(spec.abstract_params)
    if config.init_from:
        return sources.initial_params(config.init_from, config, base)
    sample = {k: np.zeros((1,) + v.shape, v.dtype) for k, v in element_spec(config).items()}

    def init():
        params = spec.model.init(init_keys(config.seed)[0],
                                 spec.task.preprocess(sample), train=False)[PARAMS]
        return lora.without_adapters(nn.meta.unbox(params))

    shardings = jax.tree_util.tree_map(lambda leaf: leaf.sharding, base)
    return mesh_lib.with_mesh_rules(jax.jit(init, out_shardings=shardings), spec.mesh,
                                    spec.rules)()


def load(config: ml_collections.ConfigDict, workdir: Path, requested_step: int | None = None,
         experiment=None) -> Restored:
    """The model and the params of a checkpoint (the latest unless `requested_step`)."""
    workdir = Path(workdir)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    try:
        step = checkpoint_step(manager, requested_step, workdir)
        spec = model_spec(config, experiment)
        lora_rank = config.model.get("lora_rank", 0)
        saved = lora.adapters_only(spec.abstract_params) if lora_rank else spec.abstract_params
        with checkpoint.read_only(manager):
            params = checkpoint.restore_params(manager, step, saved)
    finally:
        manager.close()
    if lora_rank:  # the checkpoint holds the adapters: lay them on the params they trained on
        params = lora.overlay(starting_params(config, spec), params)
    return Restored(config=config, mesh=spec.mesh, rules=spec.rules, model=spec.model,
                    task=spec.task, param_shardings=spec.param_shardings, params=params,
                    step=step)
