"""Every experiment file builds abstractly on 8 devices, found by globbing, not a registry."""

import ast
from pathlib import Path

import jax
import pytest

from scaling import config as config_lib
from scaling import data
from scaling import mesh as mesh_lib
from scaling.train import build_run

EXPERIMENTS = sorted((Path(__file__).resolve().parent.parent / "experiments").glob("*.py"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_builds_abstractly(path):
    config, module = config_lib.load_config(str(path), ["num_steps=10"])
    mesh = mesh_lib.make_mesh(config.mesh)
    run = build_run(config, mesh, data.element_spec(config), num_train=1000, experiment=module)
    abstract = jax.eval_shape(run.init)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(
        run.abstract_state)
    for leaf in jax.tree_util.tree_leaves(run.abstract_state):
        assert leaf.sharding.mesh.shape == mesh.shape


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
