"""Logical axis names are declared once and every sharding rule is checked against them.

A rule that names no known logical axis, a mesh axis that does not exist, or a name the model
uses without a rule each stop the run with exit code 2, naming the rule or the axis: flax
would otherwise leave the axis silently unsharded.
"""

import pytest
from conftest import run_cli, write_custom_experiment
from jax.sharding import PartitionSpec as P

from scaling.config import experiments as config_lib
from scaling.errors import UserError
from scaling.models import axes
from scaling.sharding import mesh as mesh_lib
from scaling.training import run as run_lib

MLP_RULES = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
             ("classes", None)]


def rules_override(rules) -> str:
    return f"sharding_rules={tuple(rules)!r}"


def build(experiment: str, rules, *overrides):
    config, module = config_lib.load_config(experiment, [rules_override(rules), *overrides])
    mesh = mesh_lib.make_abstract_mesh(config.mesh, 8)
    return run_lib.build_run_from_shapes(config, mesh, module)


def test_a_misspelt_rule_exits_2_naming_it(tmp_path):
    rules = [r if r[0] != "mlp" else ("mpl", "tensor") for r in MLP_RULES]
    result = run_cli("--experiment=fashion_mnist_mlp", "--mode=describe",
                     f"--workdir={tmp_path}", f"--config.{rules_override(rules)}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        'error: --config.sharding_rules: rule ("mpl", "tensor") names no logical axis; '
        f"known: {', '.join(sorted(axes.LOGICAL_AXES))}. Did you mean: mlp?")


@pytest.mark.parametrize("experiment, dropped, extra", [
    ("fashion_mnist_mlp", "mlp", []),        # a param's axis
    ("fashion_mnist_mlp", "batch", []),      # the step splits the batch by it
    ("shakespeare_char_lm", "seq", []),      # named only by activation constraints
    ("shakespeare_char_lm", "layers", []),   # the scan's stacking axis
])
def test_a_used_name_without_a_rule_is_refused(experiment, dropped, extra):
    config, _ = config_lib.load_config(experiment, [])
    rules = [r for r in config.sharding_rules if r[0] != dropped]
    with pytest.raises(UserError, match=f"no rule for the logical axis '{dropped}', which "
                                        "the model uses"):
        build(experiment, rules, *extra)


@pytest.mark.parametrize("physical, message", [
    ("tensr", "names 'tensr', which is not a mesh axis; mesh axes: data, fsdp, context, tensor, or "
              "None to replicate. Did you mean: tensor?"),
    (("data", "pipeline"), "names 'pipeline', which is not a mesh axis"),
    (("data", "data"), "names a mesh axis twice"),
    (3, "must map to a mesh axis, a tuple of them, or None to replicate"),
])
def test_a_rule_to_a_missing_mesh_axis_is_refused(physical, message):
    rules = [r if r[0] != "mlp" else ("mlp", physical) for r in MLP_RULES]
    config, _ = config_lib.load_config("fashion_mnist_mlp", [rules_override(rules)])
    with pytest.raises(UserError) as error:
        mesh_lib.rules_from_config(config)
    assert str(error.value).startswith("--config.sharding_rules: rule (\"mlp\", ")
    assert message in str(error.value)


def test_rules_for_names_the_model_does_not_use_are_allowed():
    """The default table covers every built-in name; the MLP uses only a few of them."""
    rules = MLP_RULES + [("seq", None), ("heads", "tensor"), ("kv", None),
                         ("vocab", "tensor"), ("layers", None)]
    run = build("fashion_mnist_mlp", rules)
    assert dict(run.rules)["mlp"] == "tensor"
    assert run.abstract_state.params["hidden_0"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_replicated_is_an_explicit_rule():
    rules = [r if r[0] != "mlp" else ("mlp", None) for r in MLP_RULES]
    run = build("fashion_mnist_mlp", rules, "mesh.data=1", "mesh.tensor=8")
    assert run.abstract_state.params["hidden_0"]["kernel"].sharding.spec == P("fsdp", None)




def test_an_experiments_own_names_need_a_rule_and_may_have_one(tmp_path):
    path = write_custom_experiment(tmp_path)
    base = [("batch", ("data", "fsdp")), ("embed", "fsdp")]
    run = build(str(path), base + [("widgets", "tensor")], "mesh.data=1", "mesh.tensor=8")
    assert run.abstract_state.params["Dense_0"]["kernel"].sharding.spec == P("fsdp", "tensor")
    with pytest.raises(UserError, match="no rule for the logical axis 'widgets'"):
        build(str(path), base)
    with pytest.raises(UserError, match=r'rule \("gadgets", None\) names no logical axis; '
                                        r"known: .*widgets"):
        build(str(path), base + [("widgets", None), ("gadgets", None)])


def test_models_name_axes_only_through_the_constants():
    """No string literal of a logical name is left where the models declare their axes."""
    from pathlib import Path

    import scaling.models.mlp as mlp
    import scaling.models.transformer as transformer

    for module in (mlp, transformer):
        code = Path(module.__file__).read_text()
        for name in axes.LOGICAL_AXES:
            for pattern in (f'("{name}",', f', "{name}")', f'("{name}")'):
                assert pattern not in code, (module.__name__, pattern)
