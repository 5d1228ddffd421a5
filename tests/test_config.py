"""Experiment lookup, the config schema and typed overrides."""

import dataclasses
import shutil

import pytest
from conftest import run_cli

from scaling.config import experiments as config_lib
from scaling.config import schema
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


# The schema: one declaration per field, defaults filled, unknown keys and bad values refused.

MINIMAL = '''
import ml_collections


def get_config():
    return ml_collections.ConfigDict({
        "task": "classification",
        "data": {"name": "mnist"%s},
        "model": {"name": "mlp", "hidden_sizes": (16,), "num_classes": 10},
        %s
    })
'''


def write_experiment(tmp_path, extra: str = "", hook: str = "", data: str = ""):
    path = tmp_path / "minimal.py"
    path.write_text(MINIMAL % (data, extra) + hook)
    return path


def test_fields_the_experiment_omits_take_the_schema_default(tmp_path):
    config, _ = config_lib.load_config(str(write_experiment(tmp_path)), [])
    defaults = {f.key: f.default for f in schema.COMMON_FIELDS + schema.MODEL_FIELDS["mlp"]}
    assert config.optimizer.eps == defaults["optimizer.eps"] == 1e-8
    assert config.nan_policy == "abort" and config.mesh.dcn_data == 1
    assert config.model.dtype == "float32" and config.xla_options.to_dict() == {}
    assert tuple(config.sharding_rules) == schema.DEFAULT_SHARDING_RULES
    assert "sample" not in config and "seq_len" not in config.data  # not a text LM
    # ... and overrides of an omitted field parse by the default's type.
    config, _ = config_lib.load_config(str(write_experiment(tmp_path)), ["optimizer.b2=0.9"])
    assert config.optimizer.b2 == 0.9


def test_language_models_get_text_and_sample_fields():
    config, _ = config_lib.load_config("lm_1b", [])
    assert config.data.eval_splits == ("validation",) and config.sample.max_new_tokens == 200
    assert config.model.attention == "auto" and config.model.norm_eps == 1e-6


@pytest.mark.parametrize("extra, data, fragments", [
    ('"batch_sise": 64,', "", ["sets batch_sise, which is no config key",
                               "Did you mean: batch_size"]),
    ('"optimizer": {"learning_rat": 1.0},', "", ["optimizer.learning_rat",
                                                 "Did you mean: optimizer.learning_rate"]),
    ("", ', "seq_len": 64', ["data.seq_len", "it is a field of text datasets"]),
])
def test_unknown_key_in_an_experiment_file_names_the_file_and_key(tmp_path, extra, data,
                                                                    fragments):
    path = write_experiment(tmp_path, extra, data=data)
    with pytest.raises(UserError) as error:
        config_lib.load_config(str(path), [])
    assert f"--experiment={path}" in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.parametrize("extra, message", [
    ('"batch_size": "big",', "--config.batch_size='big' in --experiment="),
    ('"optimizer": {"name": "adan"},',
     "--config.optimizer.name='adan' in --experiment="),
])
def test_wrong_values_in_an_experiment_file_are_refused(tmp_path, extra, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        config_lib.load_config(str(write_experiment(tmp_path, extra)), [])


def test_required_fields_must_be_set(tmp_path):
    path = write_experiment(tmp_path)
    path.write_text(path.read_text().replace('"num_classes": 10', '"dtype": "float32"'))
    with pytest.raises(UserError, match="must set model.num_classes"):
        config_lib.load_config(str(path), [])


@pytest.mark.parametrize("override, message", [
    ("optimizer.name=adan", "--config.optimizer.name='adan': expected one of adam, adamw, sgd"),
    ("optimizer.schedule=cosine", "expected one of constant, warmup_cosine"),
    ("nan_policy=ignore", "--config.nan_policy='ignore': expected one of abort, skip"),
    ("model.dtype=float8", "--config.model.dtype='float8': expected one of float32, bfloat16"),
    ("task=regression", "--config.task='regression': expected one of classification"),
    ("optimizer.learning_rate=-1", "--config.optimizer.learning_rate=-1.0: must be at least 0"),
    ("model.name=transformer", "--config.model.name='transformer': needs other fields"),
])
def test_values_outside_the_allowed_set_name_the_flag(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        config_lib.load_config("mnist_mlp", [override])


def test_transformer_choices_are_checked_for_language_models():
    with pytest.raises(UserError, match="--config.model.remat_policy='some': expected one of"):
        config_lib.load_config("shakespeare_char_lm", ["model.remat_policy=some"])


def test_an_experiment_with_make_model_may_carry_its_own_model_fields(tmp_path):
    hook = "\n\ndef make_model(config):\n    raise NotImplementedError\n"
    path = write_experiment(tmp_path, hook=hook)
    path.write_text(path.read_text().replace(
        '"model": {"name": "mlp", "hidden_sizes": (16,), "num_classes": 10}',
        '"model": {"name": "my_net", "width": 8}'))
    config, _ = config_lib.load_config(str(path), ["model.width=16"])
    assert config.model.name == "my_net" and config.model.width == 16
    assert "model.width" in schema.describe(config, has_model_hook=True)
    # Without the hook the same file is refused: nothing would read those fields.
    path.write_text(path.read_text().replace(hook, ""))
    with pytest.raises(UserError, match="--config.model.name='my_net' in --experiment="):
        config_lib.load_config(str(path), [])


def test_schema_mirrors_the_code_it_configures():
    """The schema cannot import the models (JAX would load before the config is checked),
    so this holds its copies of their names and defaults equal to the code."""
    from scaling import models
    from scaling.models import transformer
    from scaling.training import optimizer, tasks

    assert tuple(schema.MODEL_FIELDS) == models.MODELS
    declared = {f.key.removeprefix("model."): f for f in schema.MODEL_FIELDS["transformer"]}
    for field in dataclasses.fields(transformer.TransformerConfig):
        default = field.default
        if default is dataclasses.MISSING:
            default = schema.REQUIRED
        elif field.name in ("dtype", "param_dtype"):
            default = default.dtype.name if hasattr(default, "dtype") else str(default)
        assert declared.pop(field.name).default == default, field.name
    assert not declared
    assert set(schema._field("task").choices) == set(tasks.TASKS)
    assert schema._field("optimizer.name").choices == optimizer.OPTIMIZERS
    assert schema._field("optimizer.schedule").choices == optimizer.SCHEDULES
    choices = {f.key: f.choices for f in schema.MODEL_FIELDS["transformer"]}
    assert set(choices["model.remat_policy"]) == set(transformer.REMAT_POLICIES)
    assert set(choices["model.attention"]) == set(transformer.ATTENTION_CHOICES)


def test_every_field_has_a_type_default_and_help():
    tables = [schema.COMMON_FIELDS, *schema.MODEL_FIELDS.values(),
              *schema.DATA_FIELDS.values(), *schema.TASK_FIELDS.values()]
    for field in (f for table in tables for f in table):
        assert field.help and field.type in schema.TYPE_NAMES, field.key
        if field.default is not schema.REQUIRED:
            field.coerce(field.default, "")
            assert field.type is dict or field.problem(field.default) is None, field.key


def test_config_json_holds_the_resolved_config(tmp_path):
    config, _ = config_lib.load_config("fashion_mnist_mlp", [])
    assert {"nan_policy", "xla_options", "sharding_rules"} <= set(config.to_dict())
    assert set(config.mesh) == {"data", "fsdp", "context", "tensor", "dcn_data", "dcn_fsdp",
                               "dcn_context", "dcn_tensor"}


def test_describe_lists_every_field_with_its_value_and_help(tmp_path):
    result = run_cli("--experiment=fashion_mnist_mlp", "--mode=describe",
                     f"--workdir={tmp_path}", "--config.l2=0.5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    config, _ = config_lib.load_config("fashion_mnist_mlp", [])
    fields, _ = schema.fields_for(config.to_dict())
    for field in fields:
        assert any(line[2:].startswith(field.key + " ") for line in lines), field.key
    by_key = {line[2:].split()[0]: line for line in lines if line[:2] in ("  ", "* ")
              and line[2:3].isalpha()}
    assert by_key["l2"].startswith("* ") and "0.5" in by_key["l2"]  # differs: marked
    assert by_key["nan_policy"].startswith("  ") and "'abort'" in by_key["nan_policy"]
    assert "abort the run, or skip the update" in by_key["nan_policy"]  # the help
    assert "'fashion_mnist'" in by_key["data.name"]
    assert "parameters" in result.stdout  # then the state table
    assert result.stdout.index("optimizer.name") < result.stdout.index("parameters")
