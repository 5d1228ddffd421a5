"""Every row of the table of user mistakes (docs/command-line.md), under `python -O` (which strips
asserts). The rows are tested under plain `python` where their behaviour is (test_cli,
test_reliability, test_corpus, test_predict, test_hf, test_damaged_checkpoints); here each
one is run once more with -O, from the command line, expecting exit 2 and one message."""

import fcntl
import os
import shutil

import numpy as np
import pytest
from conftest import REPO, run_cli
from PIL import Image
from test_cli import assert_user_error
from test_reliability import tiny_args, train_with_checkpoints

# The tests share a module fixture that is costly to build: one worker builds it once.
pytestmark = pytest.mark.xdist_group("mistakes_optimized")

FIXTURE = REPO / "tests" / "fixtures" / "hf" / "llama31"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_idx_dir):
    """A tiny mnist_mlp workdir with checkpoints at steps 4 and 8."""
    workdir = tmp_path_factory.mktemp("trained")
    train_with_checkpoints(tiny_idx_dir, workdir)
    return workdir


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The Llama 3.1 fixture imported, with its experiment file."""
    from test_hf import write_experiment

    directory = tmp_path_factory.mktemp("imported")
    experiment = write_experiment(directory, "llama31")
    workdir = directory / "run"
    result = run_cli(f"--experiment={experiment}", "--mode=import_hf", f"--source={FIXTURE}",
                     f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return experiment, workdir


def copy(workdir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(workdir, target)
    return target


def unwritable(tmp_path, **_):
    (tmp_path / "file").write_text("not a directory")
    return ["--experiment=mnist_mlp", f"--workdir={tmp_path}/file/run"], ["cannot write there"]


def syntax_error(tmp_path, **_):
    (tmp_path / "x.py").write_text("def get_config(:\n")
    return [f"--experiment={tmp_path / 'x.py'}"], ["syntax error at line 1"]


def symlink_out(tmp_path, tiny_idx_dir, **_):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (tmp_path / "outside").write_text("precious\n")
    (workdir / "metrics.jsonl").symlink_to(tmp_path / "outside")
    return tiny_args(tiny_idx_dir, workdir), ["metrics.jsonl", "leads outside the workdir"]


def changed_model(tmp_path, trained, tiny_idx_dir, **_):
    return (tiny_args(tiny_idx_dir, copy(trained, tmp_path), "--config.model.hidden_sizes=64,64",
                      "--mode=eval"),
            ["its checkpoints were written with a different model config"])


def mismatched_arrays(tmp_path, trained, tiny_idx_dir, **_):
    return (tiny_args(tiny_idx_dir, copy(trained, tmp_path), "--config.model.hidden_sizes=64,64",
                      "--mode=eval", "--allow_config_change"),
            ["does not match this config", "mismatched paths"])


def offline(tmp_path, **_):
    return (["--experiment=mnist_mlp", f"--workdir={tmp_path}/run",
             f"--config.data.tfds_data_dir={tmp_path}/tfds"], ["dataset mnist is not available"])


def no_corpus_file(tmp_path, **_):
    return (["--experiment=python_code_lm", "--mode=prepare",
             f"--config.data.sources=text:{tmp_path}/nothing/*.txt",
             f"--config.data.prepared_dir={tmp_path}/prepared"], ["matches no file"])


def malformed_record(tmp_path, **_):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    return (["--experiment=python_code_lm", "--mode=prepare",
             f"--config.data.sources=jsonl:{tmp_path}/docs/*.jsonl",
             f"--config.data.prepared_dir={tmp_path}/prepared"],
            ["a.jsonl:2: no text field 'text'"])


def unprepared(tmp_path, **_):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text " * 100)
    return (["--experiment=python_code_lm", f"--workdir={tmp_path}/run",
             f"--config.data.sources=text:{tmp_path}/docs/*.txt",
             f"--config.data.prepared_dir={tmp_path}/prepared"], ["is not prepared in"])


def wrong_image(tmp_path, trained, tiny_idx_dir, **_):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big.png")
    return (tiny_args(tiny_idx_dir, trained, "--mode=predict", f"--inputs={tmp_path / 'big.png'}",
                      f"--output={tmp_path / 'out.jsonl'}"), ["big.png is 32x32", "28x28"])


def busy(tmp_path, tiny_idx_dir, holders, **_):
    workdir = tmp_path / "run"
    workdir.mkdir()
    fd = os.open(workdir / "run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"host h, pid 1, started then\n")
    holders.append(fd)
    return tiny_args(tiny_idx_dir, workdir), ["another run is using it (host h, pid 1"]


def other_architecture(tmp_path, imported, **_):
    experiment, _ = imported
    return ([f"--experiment={experiment}", "--mode=import_hf", f"--source={FIXTURE}",
             f"--workdir={tmp_path}/run", "--config.model.num_layers=3"],
            ["the checkpoint needs --config.model.num_layers=2"])


def train_imported(tmp_path, imported, **_):
    experiment, workdir = imported
    return ([f"--experiment={experiment}", f"--workdir={copy(workdir, tmp_path)}"],
            ["holds params only"])


def damaged_for_eval(tmp_path, trained, tiny_idx_dir, **_):
    workdir = copy(trained, tmp_path)
    (workdir / "checkpoints" / "8" / "default" / "_METADATA").write_text("{")
    return tiny_args(tiny_idx_dir, workdir, "--mode=eval"), ["8 is damaged", "--checkpoint_step=4"]


def all_damaged(tmp_path, trained, tiny_idx_dir, **_):
    workdir = copy(trained, tmp_path)
    for step in ("4", "8"):
        (workdir / "checkpoints" / step / "default" / "_METADATA").write_text("{")
    return (tiny_args(tiny_idx_dir, workdir, "--config.num_steps=12"),
            ["no intact checkpoint", "8.damaged, 4.damaged"])


ROWS = [unwritable, syntax_error, symlink_out, changed_model, mismatched_arrays, offline,
        no_corpus_file, malformed_record, unprepared, wrong_image, busy, other_architecture,
        train_imported, damaged_for_eval, all_damaged]


@pytest.mark.parametrize("row", ROWS, ids=[row.__name__ for row in ROWS])
def test_each_mistake_exits_2_under_python_O(row, tmp_path, request, tiny_idx_dir):
    fixtures = {name: request.getfixturevalue(name) for name in ("trained", "imported")
                if name in row.__code__.co_varnames}
    holders = []
    try:
        args, fragments = row(tmp_path=tmp_path, tiny_idx_dir=tiny_idx_dir, holders=holders,
                              **fixtures)
        result = run_cli(*args, python_flags=("-O",), timeout=120)
    finally:
        for fd in holders:
            os.close(fd)
    if row is offline and result.returncode == 0:
        pytest.skip("MNIST is reachable from this machine")
    assert_user_error(result, *fragments)

