"""Every config field of three experiments, given hostile values: each is refused with a
UserError naming a flag, or accepted; an accepted value of a field that shapes the model,
the mesh or the batch must then build. Never another exception."""

import pytest

from scaling.config import experiments as config_lib
from scaling.errors import UserError
from scaling.sharding import mesh as mesh_lib
from scaling.training import run as run_lib

HOSTILE = {
    bool: ["abc", "2"],
    int: ["-1", "0", "99999999999999999999", "1.5", "abc"],
    float: ["nan", "inf", "-inf", "-1", "0", "1e300", "abc"],
    str: ["''", "abc", "../../x"],
    tuple: ["'(1,)'", "'((\"embed\",),)'", "'((1, 2),)'", "'(\"x\",)'", "'(-3, 4)'",
            "'((\"batch\", \"nope\"),)'", "'()'"],
}
# Fields whose value changes what builds: the model, the mesh, the rules, the batch.
BUILT = ("model.", "mesh.", "sharding_rules", "batch_size", "grad_accum_steps", "data.seq_len",
         "optimizer.name", "l2")


def leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items") and prefix + key != "xla_options":
            yield from leaves(value, prefix + key + ".")
        elif prefix + key not in ("experiment", "xla_options"):
            yield prefix + key, value


@pytest.mark.parametrize("experiment", ["fashion_mnist_mlp", "shakespeare_char_lm",
                                        "addition_sft"])
def test_hostile_values_are_refused_by_name_or_build(experiment):
    config, _ = config_lib.load_config(experiment, [])
    accepted, refused = 0, 0
    for key, current in leaves(config):
        kind = type(current) if type(current) in HOSTILE else tuple
        for value in HOSTILE[kind]:
            try:
                candidate, module = config_lib.load_config(experiment, [f"{key}={value}"])
                if key.startswith(BUILT):
                    mesh = mesh_lib.make_abstract_mesh(candidate.mesh, 8)
                    run_lib.build_run_from_shapes(candidate, mesh, module)
                accepted += 1
            except UserError as e:
                assert "--config." in str(e) or "--experiment" in str(e), (key, value, e)
                refused += 1
            except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
                pytest.fail(f"--config.{key}={value}: {type(e).__name__}: {e}")
    assert refused > accepted > 0
