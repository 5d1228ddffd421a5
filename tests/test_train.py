"""The real training loop on tiny configs: sharding equivalence, resume, eval, metrics."""

import json

import jax
import numpy as np
import pytest

from scaling.config import experiments as config_lib
from scaling.errors import UserError
from scaling.runtime import checkpoint
from scaling.runtime.metrics import read_metrics
from scaling.training import loop
from scaling.training import run as run_lib


def tiny_config(data_dir, *overrides):
    config, module = config_lib.load_config("mnist_mlp", [
        f"data.manual_dir={data_dir}", "batch_size=64", "eval_batch_size=64", "num_steps=24",
        "log_every_steps=1", "steps_per_call=8", "checkpoint_every_steps=8",
        "eval_every_steps=16", *overrides])
    return config, module


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == "train"}


def test_data_fsdp_mesh_matches_one_device_for_20_steps(tmp_path, fashion_mnist_available):
    common = ["num_steps=20", "log_every_steps=1", "steps_per_call=4", "eval_every_steps=20",
              "checkpoint_every_steps=20"]
    config, module = config_lib.load_config("fashion_mnist_mlp",
                                            common + ["mesh.data=1", "mesh.fsdp=1"])
    loop.train_and_evaluate(config, tmp_path / "one", module, devices=jax.devices()[:1])
    config, module = config_lib.load_config("fashion_mnist_mlp",
                                            common + ["mesh.data=4", "mesh.fsdp=2"])
    loop.train_and_evaluate(config, tmp_path / "eight", module)
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(one) == list(range(1, 21)) == sorted(eight)
    for step in one:
        assert eight[step] == pytest.approx(one[step], rel=1e-4), step


def test_params_are_sharded_by_the_rules(tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    run, _ = run_lib.setup(config, module)
    state = run.init()
    hidden0 = state.params["hidden_0"]["kernel"]   # (embed, mlp) -> (fsdp, tensor)
    hidden1 = state.params["hidden_1"]["kernel"]   # (mlp, embed) -> (tensor, fsdp)
    assert hidden0.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert hidden1.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert hidden0.addressable_shards[0].data.shape == (784 // 2, 128 // 2)
    adam_mu = state.opt_state[0].mu["hidden_0"]["kernel"]
    assert adam_mu.sharding.spec == hidden0.sharding.spec
    assert state.step.sharding.is_fully_replicated


def test_batch_must_divide_the_data_parallel_size(tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir, "batch_size=60", "mesh.data=8")
    with pytest.raises(UserError, match=r"--config.batch_size=60: must be divisible by .* 8"):
        run_lib.setup(config, module)


def test_mesh_must_match_the_devices(tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir, "mesh.data=3")
    with pytest.raises(UserError, match="--config.mesh.data=3"):
        run_lib.setup(config, module)


def test_training_learns_and_writes_the_workdir(tmp_path, tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir, "num_steps=40", "eval_every_steps=40",
                                 "checkpoint_every_steps=20")
    results = loop.train_and_evaluate(config, tmp_path, module)
    assert results["test"]["num_examples"] == 300       # 300 = 4 full batches + 44 padded
    assert results["test"]["accuracy"] > 0.9
    records = read_metrics(tmp_path)
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 41))
    assert {"loss", "accuracy", "examples_per_sec", "learning_rate"} <= set(train_records[0])
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert records[-1]["split"] == "test" and records[-1]["step"] == 40
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    manager = checkpoint.make_manager(tmp_path, keep=3)
    assert manager.all_steps() == [20, 40]


def test_resume_continues_exactly_where_it_stopped(tmp_path, tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir)
    loop.train_and_evaluate(config, tmp_path / "straight", module)
    short, module = tiny_config(tiny_idx_dir, "num_steps=16")
    loop.train_and_evaluate(short, tmp_path / "resumed", module)
    loop.train_and_evaluate(config, tmp_path / "resumed", module)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 25))
    assert resumed == straight  # bitwise: same data order, rng and optimizer state
    run, _ = run_lib.setup(config, module)
    final = {}
    for name in ("straight", "resumed"):
        manager = checkpoint.make_manager(tmp_path / name, 3)
        final[name] = checkpoint.restore(manager, run.abstract_state)
        manager.close()
    assert int(final["resumed"].step) == 24
    leaves = jax.tree_util.tree_leaves_with_path(final["straight"])  # step, params,
    others = jax.tree_util.tree_leaves(final["resumed"])  # optimizer state and rng
    for (path, straight_leaf), resumed_leaf in zip(leaves, others, strict=True):
        assert np.array_equal(np.asarray(straight_leaf), np.asarray(resumed_leaf)), path


def test_eval_mode_reports_the_latest_checkpoint(tmp_path, tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir)
    trained = loop.train_and_evaluate(config, tmp_path, module)
    evaluated = loop.evaluate_checkpoint(config, tmp_path, module)
    assert evaluated["test"]["loss"] == pytest.approx(trained["test"]["loss"], rel=1e-6)
    assert evaluated["test"]["accuracy"] == trained["test"]["accuracy"]


def test_eval_without_checkpoint_is_a_user_error(tmp_path, tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir)
    with pytest.raises(UserError, match="no checkpoint to evaluate"):
        loop.evaluate_checkpoint(config, tmp_path, module)


@pytest.mark.parametrize("remaining, expected", [(100, 8), (8, 8), (7, 4), (1, 1), (5, 4)])
def test_short_calls_are_powers_of_two(remaining, expected):
    assert loop.call_length(10, 10 + remaining, steps_per_call=8) == expected


def test_config_json_round_trips(tmp_path, tiny_idx_dir):
    from scaling.runtime.workdir import write_config

    config, _ = tiny_config(tiny_idx_dir, "mesh.fsdp=2", "mesh.data=4")
    write_config(config, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["mesh"] == {"data": 4, "fsdp": 2, "context": 1, "tensor": 1, "dcn_data": 1,
                              "dcn_fsdp": 1, "dcn_context": 1, "dcn_tensor": 1}
    assert np.isclose(written["optimizer"]["learning_rate"], 1e-3)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir, "num_steps=8", "eval_every_steps=8")
    loop.train_and_evaluate(config, tmp_path / "full", module)
    config, module = tiny_config(tiny_idx_dir, "num_steps=8", "eval_every_steps=8",
                                 "grad_accum_steps=4")
    loop.train_and_evaluate(config, tmp_path / "accumulated", module)
    full, accumulated = losses(tmp_path / "full"), losses(tmp_path / "accumulated")
    assert sorted(full) == sorted(accumulated) == list(range(1, 9))
    for step in full:
        assert accumulated[step] == pytest.approx(full[step], rel=1e-5), step
    assert full[8] < full[1]


def test_accumulation_must_split_the_batch(tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir, "grad_accum_steps=3")
    with pytest.raises(UserError, match="--config.grad_accum_steps=3"):
        run_lib.setup(config, module)


def test_dcn_axes_need_as_many_slices(tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir, "mesh.dcn_data=2")
    with pytest.raises(UserError, match="multiply to 2 slices, but this run has 1 processes"):
        run_lib.setup(config, module)


def test_checkpoint_restores_onto_a_different_mesh(tmp_path, tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir, "mesh.data=8")
    loop.train_and_evaluate(config, tmp_path / "straight", module)
    short, module = tiny_config(tiny_idx_dir, "mesh.data=8", "num_steps=16")
    loop.train_and_evaluate(short, tmp_path / "moved", module)
    other, module = tiny_config(tiny_idx_dir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    run, _ = run_lib.setup(other, module)
    manager = checkpoint.make_manager(tmp_path / "moved", keep=3)
    state = checkpoint.restore(manager, run.abstract_state)
    kernel = state.params["hidden_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (784 // 2, 128 // 2)
    # The same values land on fsdp=4 x tensor=2, and on a mesh of only 4 devices.
    for overrides, devices, shard in ((("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"), None,
                                       (784 // 4, 128 // 2)),
                                      (("mesh.data=1", "mesh.fsdp=4"), jax.devices()[:4],
                                       (784 // 4, 128))):
        target, _ = tiny_config(tiny_idx_dir, *overrides)
        target_run, _ = run_lib.setup(target, module, devices=devices)
        moved = checkpoint.restore(manager, target_run.abstract_state)
        moved_kernel = moved.params["hidden_0"]["kernel"]
        assert len(moved_kernel.sharding.device_set) == len(devices or jax.devices())
        assert moved_kernel.addressable_shards[0].data.shape == shard
        for restored, reference in zip(jax.tree.leaves(moved), jax.tree.leaves(state),
                                       strict=True):
            assert np.array_equal(np.asarray(restored), np.asarray(reference))
    manager.close()
    loop.train_and_evaluate(other, tmp_path / "moved", module)
    straight, moved = losses(tmp_path / "straight"), losses(tmp_path / "moved")
    assert sorted(moved) == list(range(1, 25))
    for step in straight:
        assert moved[step] == pytest.approx(straight[step], rel=1e-5), step
