"""Experiment lookup and typed overrides."""

import shutil

import pytest

from scaling.config import experiments as config_lib
from scaling.errors import UserError


def test_names_resolve_to_experiment_files_and_are_listed():
    path = config_lib.resolve_experiment("fashion_mnist_mlp")
    assert path.name == "fashion_mnist_mlp.py" and path.parent.name == "experiments"
    listed = config_lib.list_experiments()
    assert {"mnist_mlp", "fashion_mnist_mlp"} <= set(listed)
    assert listed["mnist_mlp"].startswith("MNIST MLP")


def test_unknown_experiment_suggests_close_names():
    with pytest.raises(UserError, match="Did you mean: fashion_mnist_mlp"):
        config_lib.resolve_experiment("fashion_mnst_mlp")


def test_path_outside_repo_loads(tmp_path):
    copy = tmp_path / "my_idea.py"
    shutil.copy(config_lib.resolve_experiment("mnist_mlp"), copy)
    config, _ = config_lib.load_config(str(copy), [])
    assert config.experiment == "my_idea"


def test_overrides_are_parsed_by_field_type():
    config, _ = config_lib.load_config("mnist_mlp", [
        "mesh.data=4", "mesh.fsdp=2", "optimizer.learning_rate=3e-4", "optimizer.nesterov=true",
        "optimizer.name=sgd", "model.hidden_sizes=(64, 32)", "l2=1"])
    assert (config.mesh.data, config.mesh.fsdp) == (4, 2)
    assert config.optimizer.learning_rate == pytest.approx(3e-4)
    assert config.optimizer.nesterov is True and config.optimizer.name == "sgd"
    assert tuple(config.model.hidden_sizes) == (64, 32)
    assert isinstance(config.l2, float) and config.l2 == 1.0


@pytest.mark.parametrize("override, message", [
    ("batch_sise=64", "unknown config key. Did you mean: --config.batch_size"),
    ("optimizer.learning_rat=1", "Did you mean: --config.optimizer.learning_rate"),
    ("batch_size=abc", "expected an integer"),
    ("optimizer.learning_rate=fast", "expected a number"),
    ("optimizer.nesterov=maybe", "expected a boolean"),
    ("mesh=4", "is a group"),
    ("batch_size", "expected --config.batch_size=VALUE"),
])
def test_bad_overrides_are_user_errors(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        config_lib.load_config("mnist_mlp", [override])


@pytest.mark.parametrize("override", ["batch_size=0", "num_steps=-5", "mesh.tensor=0",
                                      "steps_per_call=0"])
def test_invalid_values_are_user_errors(override):
    with pytest.raises(UserError, match="--config."):
        config_lib.load_config("mnist_mlp", [override])


def test_experiment_with_syntax_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(UserError, match="syntax error at line 1"):
        config_lib.load_config(str(broken), [])
