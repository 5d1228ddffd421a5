"""Damaged checkpoints: every part of a step folder truncated, deleted or overwritten with
garbage either still restores exactly, or is moved aside for the step before; never a
traceback, never wrong arrays, never a deleted file."""

import shutil

import jax
import numpy as np
import pytest
from conftest import run_cli
from test_cli import assert_user_error
from test_reliability import tiny_args, tiny_config, train_with_checkpoints

from scaling.errors import UserError
from scaling.runtime import checkpoint
from scaling.sharding import mesh as mesh_lib
from scaling.training import run as run_lib

# The tests share a module fixture that is costly to build: one worker builds it once.
pytestmark = pytest.mark.xdist_group("damaged_checkpoints")

PARTS = ["_CHECKPOINT_METADATA", "default/_METADATA", "default/_sharding",
         "default/manifest.ocdbt", "default/array_metadatas/process_0",
         "default/ocdbt.process_0/manifest.ocdbt", "default/ocdbt.process_0/d/*",
         "default/d/*"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_idx_dir):
    """A workdir with checkpoints at steps 4 and 8, and the abstract state to restore."""
    workdir = tmp_path_factory.mktemp("trained")
    train_with_checkpoints(tiny_idx_dir, workdir)
    config, experiment = tiny_config(tiny_idx_dir)
    mesh = mesh_lib.make_mesh(config.mesh)
    run = run_lib.build_run_from_shapes(config, mesh, experiment)
    manager = checkpoint.make_manager(workdir, 3)
    states = {step: jax.device_get(checkpoint.restore(manager, run.abstract_state, step))
              for step in (4, 8)}
    manager.close()
    return workdir, run.abstract_state, states


def damage(path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        path.write_bytes(b"\x00garbage{" * 7)


@pytest.mark.parametrize("how", ["truncated", "deleted", "garbage"])
@pytest.mark.parametrize("part", PARTS)
def test_a_damaged_part_restores_exactly_or_falls_back_a_step(trained, part, how, tmp_path,
                                                              capsys):
    source, abstract_state, states = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    step_dir = workdir / "checkpoints" / "8"
    targets = sorted(step_dir.glob(part))
    assert targets, part
    for target in targets:
        damage(target, how)
    manager = checkpoint.make_manager(workdir, 3)
    try:
        state, resumed = checkpoint.restore_or_init(manager, abstract_state, lambda: None)
    finally:
        manager.close()
    assert resumed
    restored = jax.device_get(state)
    step = int(restored.step)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(states[step]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    if step == 4:  # the damaged step is aside, whole as it was found
        assert not step_dir.exists() and (workdir / "checkpoints" / "8.damaged").is_dir()
        err = capsys.readouterr().err
        assert f"checkpoint {step_dir} is damaged" in err and "resuming from step 4" in err


def test_no_intact_step_stops_rather_than_start_over(trained, tmp_path):
    source, abstract_state, _ = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    for step in (4, 8):
        (workdir / "checkpoints" / str(step) / "default" / "_METADATA").write_text("{")
    manager = checkpoint.make_manager(workdir, 3)
    with pytest.raises(UserError, match="no intact checkpoint.*8.damaged, 4.damaged"):
        checkpoint.restore_or_init(manager, abstract_state, lambda: None)
    manager.close()


def test_training_falls_back_and_eval_names_the_step_to_read(trained, tmp_path, tiny_idx_dir):
    source, _, _ = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    (workdir / "checkpoints" / "8" / "default" / "_METADATA").write_text("not json")
    evaluated = run_cli(*tiny_args(tiny_idx_dir, workdir), "--mode=eval")
    assert_user_error(evaluated, "checkpoints/8 is damaged", "--checkpoint_step=4")
    assert (workdir / "checkpoints" / "8").is_dir()  # readers move nothing
    trained_again = run_cli(*tiny_args(tiny_idx_dir, workdir, "--config.num_steps=12",
                                       "--config.checkpoint_every_steps=4"))
    assert trained_again.returncode == 0, trained_again.stderr[-2000:]
    assert "resumed at step 4" in trained_again.stdout
    assert "Traceback" not in trained_again.stderr
    assert checkpoint.committed_steps(workdir / "checkpoints") == [4, 8, 12]
    assert (workdir / "checkpoints" / "8.damaged").is_dir()
