"""The NaN policy: abort naming the step and keeping the last good checkpoint, or skip."""

import shutil

import jax
import numpy as np
import pytest
from conftest import REPO, run_cli, write_idx

from scaling.config import experiments as config_lib
from scaling.data import dataset as dataset_lib
from scaling.runtime.metrics import read_metrics
from scaling.training import loop
from scaling.training import run as run_lib

POISONED_EXAMPLE = 77
HOOK = '''

def make_model(config):
    """The MLP, except that an all-white image gives NaN logits: a NaN on demand."""
    import flax.linen as nn
    import jax.numpy as jnp

    from scaling.models.mlp import MLP

    class Poisoned(nn.Module):
        @nn.compact
        def __call__(self, x, *, train=False):
            logits = MLP(hidden_sizes=(32,), num_classes=10)(x)
            white = jnp.all(x == 1.0, axis=(1, 2, 3))
            return jnp.where(white[:, None], jnp.nan, logits)

    return Poisoned()
'''
ARGS = ["batch_size=64", "eval_batch_size=100", "num_steps=16", "log_every_steps=1",
        "steps_per_call=2", "checkpoint_every_steps=2", "eval_every_steps=16"]


@pytest.fixture
def poisoned(tmp_path, tiny_idx_dir):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_idx_dir, data_dir)
    from scaling.data.idx import read_idx

    images = read_idx(data_dir / "train-images-idx3-ubyte.gz").copy()
    images[POISONED_EXAMPLE] = 255
    write_idx(data_dir / "train-images-idx3-ubyte.gz", images)
    experiment = tmp_path / "poisoned.py"
    experiment.write_text((REPO / "experiments" / "mnist_mlp.py").read_text() + HOOK)
    bad_step = next(s for s in range(8)
                    if POISONED_EXAMPLE in dataset_lib.train_indices(0, s, 64, 512)) + 1
    return experiment, data_dir, bad_step


def test_abort_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, poisoned):
    experiment, data_dir, bad_step = poisoned
    workdir = tmp_path / "run"
    result = run_cli(f"--experiment={experiment}", f"--workdir={workdir}",
                     f"--config.data.manual_dir={data_dir}", *[f"--config.{a}" for a in ARGS])
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: step {bad_step}: the loss (nan)" in result.stderr
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert all(step < bad_step for step in saved)
    assert saved == [s for s in (2, 4, 6, 8) if s < bad_step][-3:]
    assert (f"The checkpoint of step {saved[-1]} holds the last good state" if saved
            else "No checkpoint exists yet, so a re-run starts over") in result.stderr


def test_a_divergence_before_any_checkpoint_says_none_exists(tmp_path, poisoned):
    experiment, data_dir, bad_step = poisoned
    result = run_cli(f"--experiment={experiment}", f"--workdir={tmp_path / 'run'}",
                     f"--config.data.manual_dir={data_dir}", *[f"--config.{a}" for a in ARGS],
                     "--config.checkpoint_every_steps=1000")
    assert result.returncode == 3, result.stderr
    assert "No checkpoint exists yet, so a re-run starts over" in result.stderr


def test_skip_leaves_params_and_optimizer_state_unchanged(tmp_path, poisoned):
    experiment, data_dir, bad_step = poisoned
    config, module = config_lib.load_config(
        str(experiment), [f"data.manual_dir={data_dir}", "nan_policy=skip", *ARGS])
    run, dataset = run_lib.setup(config, module, devices=jax.devices()[:1])
    state = run.init()
    before = run_lib.put_train_chunk(run, dataset, 0, bad_step - 1)
    state, _ = run.train_steps(state, before)
    params, opt_state = jax.device_get((state.params, state.opt_state))
    state, metrics = run.train_steps(state, run_lib.put_train_chunk(run, dataset,
                                                                  bad_step - 1, 1))
    assert float(metrics["skipped"][0]) == 1.0 and int(state.step) == bad_step
    after = jax.device_get((state.params, state.opt_state))
    for old, new in zip(jax.tree_util.tree_leaves((params, opt_state)),
                        jax.tree_util.tree_leaves(after), strict=True):
        np.testing.assert_array_equal(old, new)

    results = loop.train_and_evaluate(config, tmp_path / "run", module,
                                       devices=jax.devices()[:1])
    records = {r["step"]: r for r in read_metrics(tmp_path / "run") if r["split"] == "train"}
    assert records[bad_step]["skipped"] == 1.0
    assert np.isfinite(results["test"]["loss"])
