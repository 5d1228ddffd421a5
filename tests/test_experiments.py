"""Every experiment file builds abstractly on 8 devices, found by globbing, not a registry."""

import ast
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from scaling import data
from scaling.config import experiments as config_lib
from scaling.preflight import hlo, step_report
from scaling.sharding import mesh as mesh_lib
from scaling.training import run as run_lib
from scaling.training import state_summary
from scaling.training.run import build_run

AGREE_ON_CPU = {"fashion_mnist_mlp", "mnist_mlp", "shakespeare_char_lm"}
# Experiments whose documented mesh needs more than these 8 devices compile here on a smaller
# one (their own is checked from shapes alone, below).
ON_8_DEVICES = {"lm_8b_32k": ["mesh.context=2", "mesh.tensor=2", "data.seq_len=4096",
                              "model.max_seq_len=4096"]}
EXPERIMENTS = sorted((Path(__file__).resolve().parent.parent / "experiments").glob("*.py"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_builds_abstractly(path):
    """Shapes, shardings and the train step compiled as training runs it, without allocating
    any parameter."""
    config, module = config_lib.load_config(str(path), ["num_steps=100000",
                                                        *ON_8_DEVICES.get(path.stem, [])])
    mesh = mesh_lib.make_mesh(config.mesh)
    spec = data.element_spec(config)
    run = build_run(config, mesh, spec, num_train=10**6, experiment=module)
    for leaf in jax.tree_util.tree_leaves(run.abstract_state):
        assert leaf.sharding.mesh.shape == mesh.shape
    assert state_summary.parameter_count(run.abstract_state.params) > 0
    compiled = run_lib.lower_train_step(run).compile()
    # The new state keeps the state's shardings (the step donates it), and XLA aliases it.
    state_out, metrics_out = compiled.output_shardings
    assert ([s.spec for s in jax.tree_util.tree_leaves(state_out)]
            == [s.spec for s in jax.tree_util.tree_leaves(run.state_shardings)])
    assert all(s.spec == P() for s in jax.tree_util.tree_leaves(metrics_out))
    memory = compiled.memory_analysis()
    state_bytes = state_summary.bytes_per_device(run.abstract_state)
    assert 0.99 * state_bytes <= memory.alias_size_in_bytes <= state_bytes
    # Every gradient is reduced at least as the model's formula says; the experiments meant
    # for a CPU agree with their formulas group by group. The pod experiments' formulas are
    # for TPUs: on these 8 CPU devices XLA also sends embedding rows by all-to-all and, for
    # lm_8b, reduces activations of the backward pass that a TPU combines first.
    analytic = step_report.analytic_collectives(run, mesh_lib.platform(mesh), module)
    measured = step_report.measured_groups(hlo.count_step(compiled.as_text()))
    assert analytic is not None, "every shipped experiment's model has a formula"
    gradients = step_report.GRADIENTS
    assert measured[gradients] >= (1 - step_report.TOLERANCE) * analytic[gradients] > 0
    if path.stem in AGREE_ON_CPU:
        assert step_report.agrees(measured, analytic), (measured, analytic)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_is_self_contained_and_documented(path):
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc and f"--experiment={path.stem}" in doc and "Expected" in doc
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in imports:
        names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
        assert not any(n.startswith("experiments") for n in names), "experiments never import "\
            "each other"


def pod_run(experiment: str, mesh_shape: dict):
    """An experiment built from shapes alone on its documented 64-chip mesh: the run, its
    parameter count, and the bytes of params and AdamW state on each chip."""
    config, module = config_lib.load_config(experiment, [])
    mesh = mesh_lib.make_abstract_mesh(config.mesh, 64)
    assert dict(mesh.shape) == mesh_shape
    run = build_run(config, mesh, data.element_spec(config), num_train=1, experiment=module)
    params = state_summary.parameter_count(run.abstract_state.params)
    per_chip = (state_summary.bytes_per_device(run.abstract_state.params)
                + state_summary.bytes_per_device(run.abstract_state.opt_state))
    return config, module, params, per_chip


def test_lm_8b_reports_memory_per_chip_for_its_documented_mesh():
    config, module, params, per_chip = pod_run(
        "lm_8b", {"data": 1, "fsdp": 16, "context": 1, "tensor": 4})
    assert 8.0e9 < params < 8.1e9
    # float32 params plus two AdamW moments, split 64 ways (a few small arrays replicated).
    assert per_chip == pytest.approx(params * 12 / 64, rel=0.01)
    table = run_lib.describe(config, 64, module)
    assert "parameters          8,030,261,248" in table and "fsdp=16, context=1, tensor=4" in table


def test_lm_8b_32k_splits_sequences_and_params_over_the_context_chips():
    config, _, params, per_chip = pod_run(
        "lm_8b_32k", {"data": 1, "fsdp": 2, "context": 8, "tensor": 4})
    # The params are split over fsdp and context together: 64 ways, as lm_8b's are.
    assert per_chip == pytest.approx(params * 12 / 64, rel=0.01)
    assert config.data.seq_len == 32768 and config.batch_size * 32768 == 2**21
