"""The transformer LM through the real loop: meshes, collectives, accumulation, sampling."""

import dataclasses
import re

import jax
import pytest
from jax.sharding import PartitionSpec as P

from scaling import data
from scaling.config import experiments as config_lib
from scaling.inference.sample import SampleOptions, sample_text
from scaling.runtime.metrics import read_metrics
from scaling.training import loop
from scaling.training import run as run_lib

TINY = ["model.embed_dim=32", "model.num_layers=2", "model.num_heads=8", "model.num_kv_heads=4",
        "model.head_dim=8", "model.mlp_dim=64", "model.max_seq_len=16", "data.seq_len=16",
        "batch_size=16", "eval_batch_size=16", "num_steps=10", "steps_per_call=5",
        "log_every_steps=1", "eval_every_steps=10", "checkpoint_every_steps=10",
        "optimizer.warmup_steps=2", "data.eval_splits=('validation',)"]


def tiny_lm(shakespeare_dir, *overrides):
    return config_lib.load_config(
        "shakespeare_char_lm", TINY + [f"data.manual_dir={shakespeare_dir}", *overrides])


def train_losses(workdir):
    return [r["loss"] for r in read_metrics(workdir) if r["split"] == "train"]


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory, shakespeare_dir):
    workdir = tmp_path_factory.mktemp("one_device")
    config, module = tiny_lm(shakespeare_dir, "mesh.data=1")
    loop.train_and_evaluate(config, workdir, module, devices=jax.devices()[:1])
    return train_losses(workdir)


# The query kernel is (layers=2, embed=32, heads=8, kv=8), named so that embed goes to fsdp
# and heads to tensor; each mesh must leave this much of it on one device.
MESHES = {
    "data=8": (["mesh.data=8"], (2, 32, 8, 8)),
    "fsdp=8": (["mesh.data=1", "mesh.fsdp=8"], (2, 4, 8, 8)),
    "tensor=4,data=2": (["mesh.data=2", "mesh.tensor=4"], (2, 32, 2, 8)),
    "data=2,fsdp=2,tensor=2": (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], (2, 16, 4, 8)),
}


@pytest.mark.parametrize("mesh", MESHES, ids=list(MESHES))
def test_every_mesh_matches_one_device(mesh, tmp_path, shakespeare_dir, one_device_losses):
    overrides, shard_shape = MESHES[mesh]
    config, module = tiny_lm(shakespeare_dir, *overrides)
    run, _ = run_lib.setup(config, module)
    state = run.init()
    query = state.params["layers"]["attention"]["query"]
    assert query.sharding.spec == P(None, "fsdp", "tensor", None)
    assert {shard.data.shape for shard in query.addressable_shards} == {shard_shape}
    moment = state.opt_state[1][0].mu["layers"]["attention"]["query"]
    assert moment.sharding == query.sharding  # optimizer state is sharded like its param
    loop.train_and_evaluate(config, tmp_path, module)
    losses = train_losses(tmp_path)
    assert len(losses) == len(one_device_losses) == 10
    assert losses == pytest.approx(one_device_losses, rel=1e-4)
    assert losses[-1] < losses[0]


def compiled_hlo(config, module) -> str:
    run, dataset = run_lib.setup(config, module)
    state = run.init()
    chunk = run_lib.put_chunk(run, data.dataset.train_chunk(dataset.train, 0, 0, 1,
                                                          config.batch_size))
    with jax.set_mesh(run.mesh):
        return run.train_steps.inner.lower(state, chunk).compile().as_text()


def collectives(hlo: str) -> set[str]:
    return set(re.findall(r"\b(all-gather|reduce-scatter|all-reduce|all-to-all)(?:-start)?\(",
                          hlo))


def test_fsdp_gathers_params_and_scatters_gradients(shakespeare_dir):
    found = collectives(compiled_hlo(*tiny_lm(shakespeare_dir, "mesh.data=1", "mesh.fsdp=8")))
    assert "all-gather" in found
    assert found & {"reduce-scatter", "all-reduce"}


def test_data_parallel_all_reduces_gradients(shakespeare_dir):
    found = collectives(compiled_hlo(*tiny_lm(shakespeare_dir, "mesh.data=8")))
    assert "all-reduce" in found
    assert "all-gather" not in found


def test_accumulation_and_remat_leave_the_loss_unchanged(tmp_path, shakespeare_dir,
                                                         one_device_losses):
    for name, extra in (("accumulated", ["grad_accum_steps=4"]),
                        ("remat", ["model.remat_policy=full"])):
        config, module = tiny_lm(shakespeare_dir, "mesh.data=1", *extra)
        loop.train_and_evaluate(config, tmp_path / name, module, devices=jax.devices()[:1])
        assert train_losses(tmp_path / name) == pytest.approx(one_device_losses, rel=1e-5)


def test_sampling_is_deterministic_and_uses_the_vocabulary(shakespeare_dir):
    config, module = tiny_lm(shakespeare_dir, "mesh.data=1")
    run, dataset = run_lib.setup(config, module, devices=jax.devices()[:1])
    params = run.init().params
    options = SampleOptions(prompt="ROMEO:", max_new_tokens=40, temperature=1.0, top_k=5,
                            seed=3)
    first = sample_text(run.model, params, dataset.tokenizer, options)
    again = sample_text(run.model, params, dataset.tokenizer, options)
    other = sample_text(run.model, params, dataset.tokenizer,
                        SampleOptions("ROMEO:", 40, 1.0, 5, seed=4))
    assert first == again != other
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40
    greedy = SampleOptions("ROMEO:", 40, temperature=0.0, top_k=0, seed=0)
    reseeded = dataclasses.replace(greedy, seed=9)
    assert sample_text(run.model, params, dataset.tokenizer, greedy) == sample_text(
        run.model, params, dataset.tokenizer, reseeded)
