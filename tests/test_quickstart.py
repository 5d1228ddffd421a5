"""The quick start's figure: the founding MLP, trained exactly as the README's first command
trains it, ends inside the accuracy band the README states.

The band is wide enough for the drift that new releases of jax, flax and optax bring (0.8840
on jax 0.10.2, 0.8813 on jax 0.12.0.1, 0.8797 on others; the last epochs move by about 0.005
from one to the next) and narrow enough to catch a regression: the same run reads 0.8155,
0.8602, 0.8657 and 0.8661 after its first four epochs, so training that stops early, learns
slower or scales its inputs wrongly lands outside it.
"""

import re

import pytest
from conftest import REPO, run_cli

# The README's "test accuracy between 0.87 and 0.90".
ACCURACY_BAND = (0.87, 0.90)
# The final test loss read 0.3340 and 0.3444; far above that the objective is broken, even
# where the accuracy holds.
MAX_LOSS = 0.40
FINAL_LINE = re.compile(r"^final test loss (\d+\.\d+) accuracy (\d+\.\d+) \((\d+) examples\)$",
                        re.M)


def test_readme_states_the_band_this_test_holds():
    low, high = ACCURACY_BAND
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"test accuracy between {low:.2f} and {high:.2f}" in readme, (
        "the README's quick start must state the band tests/test_quickstart.py holds")
    assert "python -m scaling.main --experiment=fashion_mnist_mlp" in readme


@pytest.mark.timeout(600)
def test_quick_start_accuracy_is_inside_the_band(tmp_path, fashion_mnist_available):
    # The README's command, on one CPU device with XLA's default flags, as a fresh shell runs
    # it, with the default config: 10 epochs of batch 128.
    result = run_cli("--experiment=fashion_mnist_mlp", f"--workdir={tmp_path / 'run'}",
                     env_extra={"XLA_FLAGS": None}, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IDX files in /usr/share/datasets/fashion-mnist" in result.stdout, (
        "the quick start reads Debian's Fashion-MNIST")
    found = FINAL_LINE.findall(result.stdout)
    assert found, result.stdout[-3000:]
    loss, accuracy, examples = found[-1]
    assert int(examples) == 10000
    low, high = ACCURACY_BAND
    assert low <= float(accuracy) <= high, (
        f"final test accuracy {accuracy} (loss {loss}) is outside the README's band "
        f"{low}-{high}")
    assert float(loss) < MAX_LOSS, f"final test loss {loss} (accuracy {accuracy})"
