"""The transformer LM through the real loop: meshes, collectives, accumulation, sampling."""

import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec as P

from scaling.config import experiments as config_lib
from scaling.inference.sample import SampleOptions, sample_text
from scaling.preflight import hlo, step_report
from scaling.runtime.metrics import read_metrics
from scaling.training import loop
from scaling.training import run as run_lib
from scaling.training.state_summary import parameter_count

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
MESHES = {  # data parallelism alone is the MLP's and the multi-process tests' mesh
    "fsdp=8": (["mesh.data=1", "mesh.fsdp=8"], (2, 4, 8, 8)),
    "tensor=4,data=2": (["mesh.data=2", "mesh.tensor=4"], (2, 32, 2, 8)),
    "data=2,fsdp=2,tensor=2": (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], (2, 16, 4, 8)),
}


# The tests that compare against the module's one-device run share one worker, which trains it once.
ONE_DEVICE_RUN = pytest.mark.xdist_group("lm_one_device")


@ONE_DEVICE_RUN
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


def compiled_step(config, module):
    """The run and its train step compiled through the one lowering helper that preflight
    uses, with the mesh and logical rules in scope as in training."""
    run, _ = run_lib.setup(config, module)
    compiled = run_lib.lower_train_step(run).compile()
    return run, compiled, hlo.count_step(compiled.as_text())


def gradient_bytes(run) -> float:
    """Float32 gradients of every param, once."""
    return 4.0 * parameter_count(run.abstract_state.params)


def assert_state_keeps_its_shardings(run, compiled):
    """The updated state comes out exactly as sharded as it went in (donation needs it)."""
    state_out, _ = compiled.output_shardings
    want = jax.tree_util.tree_leaves(run.state_shardings)
    got = jax.tree_util.tree_leaves(state_out)
    assert [g.spec for g in got] == [w.spec for w in want]


def test_fsdp_gathers_params_and_scatters_gradients(shakespeare_dir):
    run, compiled, counts = compiled_step(*tiny_lm(shakespeare_dir, "mesh.data=1",
                                                   "mesh.fsdp=8"))
    groups = step_report.measured_groups(counts)
    # Every gradient is reduced once (plus a few scalar metrics); every param is gathered at
    # least once, for the forward pass, and at most once more, for the backward pass.
    assert groups[step_report.GRADIENTS] == pytest.approx(gradient_bytes(run), rel=1e-3)
    assert gradient_bytes(run) <= groups["all-gather"] <= 2 * gradient_bytes(run)
    assert_state_keeps_its_shardings(run, compiled)
    query = compiled.output_shardings[0].params["layers"]["attention"]["query"]
    assert query.spec == P(None, "fsdp", "tensor", None)


def test_data_parallel_all_reduces_gradients(shakespeare_dir):
    run, compiled, counts = compiled_step(*tiny_lm(shakespeare_dir, "mesh.data=8"))
    by_kind = counts.bytes_by_kind()
    assert by_kind["all-gather"] == by_kind["reduce-scatter"] == 0
    reduces = [c for c in counts.collectives if c.kind == "all-reduce"]
    assert sum(c.count for c in reduces) == 1  # XLA combines every gradient into one
    # The tied embedding's gradient arrives in two parts, the lookup's and the logits',
    # which are reduced before they are added: the table counts twice.
    embedding = 4.0 * parameter_count(run.abstract_state.params["embedding"])
    assert by_kind["all-reduce"] == pytest.approx(gradient_bytes(run) + embedding, rel=1e-3)
    assert_state_keeps_its_shardings(run, compiled)


def test_tensor_parallel_all_reduces_activations_as_the_model_predicts(shakespeare_dir):
    run, compiled, counts = compiled_step(*tiny_lm(shakespeare_dir, "mesh.data=2",
                                                   "mesh.tensor=4"))
    analytic = step_report.analytic_collectives(run, "cpu")
    # 16 sequences of 16 tokens over data=2, width 32, float32: per layer 2 forward and 5
    # backward activation all-reduces, 2 for the vocabulary; the gradients over data=2.
    activation = 16 // 2 * 16 * 32 * 4
    assert analytic[step_report.GRADIENTS] == (7 * 2 + 2) * activation + 4 * sum(
        p.gathered_elements(dict(run.mesh.shape))
        for p in step_report.step_layout(run, "cpu").params)
    assert step_report.agrees(step_report.measured_groups(counts), analytic)
    assert_state_keeps_its_shardings(run, compiled)


@ONE_DEVICE_RUN
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
