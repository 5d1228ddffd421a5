"""Shared fixtures. Eight fake CPU devices are set up before anything imports jax."""

import os

# The suite compiles hundreds of small programs and runs each a few times, so XLA's LLVM
# optimisation is about half of its CPU time and none of what it checks: the HLO passes (fusion,
# sharding, collectives) still run, only the machine code is less tuned. The tests' processes
# compile without it; the quick start test trains as a user's shell does, with it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
# With libtpu installed (the tpu extra), jax would also try to open a TPU on this CPU machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gzip  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
# The one dataset the tests read from outside the repository, a Debian package that CI installs;
# `fashion_mnist_available` skips without it. tests/test_repo_paths.py keeps it the only one.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# The first 256 KB of tiny Shakespeare, committed, so the language-model tests run on any clone.
SHAKESPEARE_DIR = FIXTURES / "tiny_shakespeare"


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_dir(tmp_path_factory) -> Path:
    """Runs the tests start share one compilation cache of this session, never ~/.cache."""
    directory = tmp_path_factory.mktemp("compilation_cache")
    os.environ["SCALING_CACHE_DIR"] = str(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def prepared_corpora_dir(tmp_path_factory) -> Path:
    """Corpora prepared by the tests' runs go to a folder of this session, never ~/.cache."""
    directory = tmp_path_factory.mktemp("corpora")
    os.environ["SCALING_DATA_DIR"] = str(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_idx_dir(tmp_path_factory) -> Path:
    """A learnable MNIST-format dataset: the label is written into the image's brightness."""
    directory = tmp_path_factory.mktemp("tiny_idx")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 512), ("t10k", 300)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        images[np.arange(n), labels, :] = 255
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


@pytest.fixture(scope="session")
def fashion_mnist_available() -> None:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install dataset-fashion-mnist (see .ci/run)")
        pytest.skip("needs apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """The directory holding the tests' text corpus, `input.txt`: every test that reads text
    gets it here."""
    if not (SHAKESPEARE_DIR / "input.txt").is_file():
        pytest.fail(f"{SHAKESPEARE_DIR / 'input.txt'} is part of the repository; restore it "
                    "with git checkout")
    return SHAKESPEARE_DIR


CUSTOM_MODEL = '''

def make_model(config):
    """A classifier of the experiment's own, with a logical axis name of its own."""
    import flax.linen as nn

    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x, *, train=False):
            x = x.reshape((x.shape[0], -1))
            kernel = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                  ("embed", "widgets"))
            return nn.Dense(10, kernel_init=kernel, use_bias=False)(x)

    return Custom()
'''


def write_custom_experiment(directory: Path, extra: str = "") -> Path:
    """`fashion_mnist_mlp` with `CUSTOM_MODEL` (and `extra`) appended: an experiment whose
    model is its own, as a researcher would write one."""
    path = directory / "custom.py"
    path.write_text((REPO / "experiments" / "fashion_mnist_mlp.py").read_text()
                    + CUSTOM_MODEL + extra)
    return path


def child_env(devices: int = 1) -> dict[str, str]:
    """The environment of a child process the tests start: `devices` CPU devices (one, as a
    fresh shell has), compiled as the tests' own programs are."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    count = [f"--xla_force_host_platform_device_count={devices}"] if devices > 1 else []
    env["XLA_FLAGS"] = " ".join([*count, FAST_COMPILE])
    return env


def run_cli(*args: str, env_extra: dict | None = None, cwd: Path | None = None,
            python_flags: tuple[str, ...] = (),
            timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m scaling.main ARGS` in a fresh process, on one CPU device unless told."""
    env = child_env()
    env.update(env_extra or {})
    env = {k: v for k, v in env.items() if v is not None}  # None in env_extra unsets it
    return subprocess.run([sys.executable, *python_flags, "-m", "scaling.main", *args],
                          capture_output=True, text=True, env=env, cwd=cwd or REPO,
                          timeout=timeout)


def pytest_collection_modifyitems(items):
    """Groups that share a costly module fixture (`xdist_group`) are the longest units of work
    a worker takes; they go first, so neither worker is left alone with one at the end."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
