"""The command line as a user meets it, in fresh processes."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, child_env, run_cli

EIGHT_DEVICES = {"XLA_FLAGS": child_env(8)["XLA_FLAGS"]}


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_list_shows_experiments_with_descriptions():
    result = run_cli("--list")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^fashion_mnist_mlp +Fashion-MNIST MLP", result.stdout, re.M)
    assert "mnist_mlp" in result.stdout


@pytest.mark.parametrize("args, fragments, env", [
    (["--experiment=mnist_mpl"], ["unknown experiment", "Did you mean: mnist_mlp"], None),
    (["--experiment=mnist_mlp", "--config.batch_sise=3"],
     ["--config.batch_sise", "Did you mean: --config.batch_size"], None),
    (["--experiment=mnist_mlp", "--config.batch_size=big"],
     ["--config.batch_size=big", "expected an integer"], None),
    (["--experiment=fashion_mnist_mlp", "--config.mesh.data=3"],
     ["--config.mesh.data=3", "does not divide the 8"], EIGHT_DEVICES),
    (["--experiment=fashion_mnist_mlp", "--config.batch_size=100"],
     ["--config.batch_size=100", "divisible by the data-parallel size 8"], EIGHT_DEVICES),
    (["--experiment=mnist_mlp", "--config.num_steps=-3"], ["--config.num_steps=-3"], None),
    (["--experiment=mnist_mlp", "--mode=dance"], ["--mode=dance"], None),
    (["--experiment=mnist_mlp", "--config.data.manual_dir=/no/such/dir"],
     ["--config.data.manual_dir=/no/such/dir", "expected the four IDX files"], None),
    (["--experiment=mnist_mlp", "--no_such_flag"], ["no_such_flag"], None),
    (["--experiment=shakespeare_char_lm", "--mode=describe", "--config.model.attention=flash"],
     ["--config.model.attention='flash'", "grouped_einsum, batched_matmul"], None),
])
@pytest.mark.parametrize("python_flags", [(), ("-O",)], ids=["python", "python -O"])
def test_user_mistakes_exit_2_with_one_message(args, fragments, env, python_flags, tmp_path):
    result = run_cli(*args, f"--workdir={tmp_path}", env_extra=env, python_flags=python_flags)
    assert_user_error(result, *fragments)


def experiment_file(tmp_path, content: bytes, name: str = "mine.py") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return f"--experiment={path}"


def workdir_config_json(tmp_path, content: str) -> list[str]:
    """A workdir with a checkpoint folder and this config.json beside it."""
    workdir = tmp_path / "old"
    (workdir / "checkpoints" / "5").mkdir(parents=True)
    (workdir / "config.json").write_text(content)
    return ["--experiment=fashion_mnist_mlp", f"--workdir={workdir}", "--mode=eval"]


# Each row: a function of tmp_path giving the arguments, and the fragments of the message.
FILE_MISTAKES = {
    "get_config raises": (lambda d: [experiment_file(d, b"def get_config():\n    return 1 / 0\n")],
                          ["get_config() raised at line 2: ZeroDivisionError"]),
    "not UTF-8": (lambda d: [experiment_file(d, b"\xff\xfe")], ["not UTF-8 text (byte 0)"]),
    "not a .py file": (lambda d: [experiment_file(d, b"x = 1\n", "notes.txt")],
                       ["not a Python file"]),
    "a workdir name too long": (lambda d: ["--experiment=fashion_mnist_mlp",
                                           f"--workdir={d / ('w' * 300)}"],
                                ["cannot write there (File name too long)"]),
    "config.json not an object": (lambda d: workdir_config_json(d, "[1, 2]"),
                                  ["config.json: cannot be read", "not an object"]),
    "a NaN learning rate": (lambda d: ["--experiment=fashion_mnist_mlp",
                                       "--config.optimizer.learning_rate=nan"],
                            ["--config.optimizer.learning_rate=nan: must be a finite number"]),
    "a negative seed": (lambda d: ["--experiment=fashion_mnist_mlp", "--config.seed=-1"],
                        ["--config.seed=-1: must be at least 0"]),
    "a width of 0": (lambda d: ["--experiment=fashion_mnist_mlp",
                                "--config.model.hidden_sizes=0,5"],
                     ["--config.model.hidden_sizes=(0, 5): expected integers of at least 1"]),
    "a batch no host can hold": (lambda d: ["--experiment=fashion_mnist_mlp",
                                            "--config.batch_size=1000000000"],
                                 ["--config.batch_size=1000000000: each host would hold"]),
    "a model no device can hold": (lambda d: ["--experiment=fashion_mnist_mlp",
                                              "--config.model.hidden_sizes=1000000,1000000"],
                                   ["the train state needs 10.9 TiB a device"]),
}


@pytest.mark.parametrize("mistake", FILE_MISTAKES)
@pytest.mark.parametrize("python_flags", [(), ("-O",)], ids=["python", "python -O"])
def test_more_user_mistakes_exit_2_with_one_message(mistake, python_flags, tmp_path,
                                                    fashion_mnist_available):
    make_args, fragments = FILE_MISTAKES[mistake]
    args = make_args(tmp_path)
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={tmp_path / 'run'}")
    result = run_cli(*args, python_flags=python_flags)
    assert_user_error(result, *fragments)


def test_user_errors_survive_python_O(tmp_path):
    result = subprocess.run([sys.executable, "-O", "-m", "scaling.main",
                             "--experiment=mnist_mlp", "--config.batch_size=0",
                             f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=REPO)
    assert_user_error(result, "--config.batch_size=0")


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("--experiment=mnist_mlp", f"--workdir={blocker}/run")
    assert_user_error(result, f"--workdir={blocker}/run", "cannot write")


def test_mnist_offline_fails_fast_listing_the_options(tmp_path):
    result = run_cli("--experiment=mnist_mlp", f"--workdir={tmp_path}",
                     f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", timeout=60)
    if result.returncode == 0:
        pytest.skip("MNIST is reachable from this machine")
    assert_user_error(result, "dataset mnist is not available", "network",
                      "--config.data.tfds_data_dir", "--config.data.manual_dir")


def test_edited_copy_outside_the_repo_trains(tmp_path, tiny_idx_dir):
    source = (REPO / "experiments" / "mnist_mlp.py").read_text()
    edited = source.replace('"hidden_sizes": (128, 128)', '"hidden_sizes": (32,)')
    assert edited != source
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "my_idea.py"
    copy.write_text(edited)
    workdir = tmp_path / "run"
    result = run_cli(f"--experiment={copy}", f"--workdir={workdir}",
                     f"--config.data.manual_dir={tiny_idx_dir}", "--config.num_steps=16",
                     "--config.batch_size=32", "--config.eval_batch_size=100", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "final test loss" in result.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["hidden_sizes"] == [32] and config["experiment"] == "my_idea"

    evaluated = run_cli(f"--experiment={copy}", f"--workdir={workdir}", "--mode=eval",
                        f"--config.data.manual_dir={tiny_idx_dir}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "test loss" in evaluated.stdout and "(300 examples)" in evaluated.stdout


def committed_steps(workdir):
    directory = workdir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, fashion_mnist_available):
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "scaling.main", "--experiment=fashion_mnist_mlp",
            f"--workdir={workdir}", "--config.num_steps=100000",
            "--config.checkpoint_every_steps=200", "--config.eval_every_steps=100000"]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not committed_steps(workdir) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = committed_steps(workdir)
    assert saved, "no checkpoint was committed before the deadline"

    result = run_cli("--experiment=fashion_mnist_mlp", f"--workdir={workdir}",
                     "--config.num_steps=1200", "--config.checkpoint_every_steps=200",
                     "--config.eval_every_steps=100000")
    assert result.returncode == 0, result.stderr
    resumed_at = int(result.stdout.split("resumed at step ")[1].split()[0])
    assert resumed_at >= saved[-1] > 0
    steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
             if r["split"] == "train"]
    assert steps == sorted(set(steps)), "a resumed run must not log a step twice"
    assert steps[-1] == 1200


@pytest.mark.parametrize("signal_number, code, word", [
    (signal.SIGTERM, 75, "preempted"), (signal.SIGINT, 130, "interrupted")],
    ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_saves_the_current_step_and_exits(signal_number, code, word, tmp_path,
                                                   fashion_mnist_available):
    """SIGTERM (a preemption) exits 75, Ctrl-C 130; both save first, without a traceback."""
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "scaling.main", "--experiment=fashion_mnist_mlp",
            f"--workdir={workdir}", "--config.num_steps=100000", "--config.log_every_steps=10",
            "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000"]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    saved = committed_steps(workdir)
    assert len(saved) == 1 and 0 < saved[0] < 100000
    assert f"{word}: saved step {saved[0]}" in stdout

    result = run_cli("--experiment=fashion_mnist_mlp", f"--workdir={workdir}",
                     f"--config.num_steps={saved[0] + 64}",
                     "--config.checkpoint_every_steps=100000",
                     "--config.eval_every_steps=100000")
    assert result.returncode == 0, result.stderr
    assert f"resumed at step {saved[0]}" in result.stdout


def test_no_tpu_runtime_noise_on_a_machine_without_tpus():
    """libtpu comes with the test extra; without a TPU chip a run must not start it."""
    result = run_cli("--experiment=mnist_mlp", "--mode=describe",
                     env_extra={"JAX_PLATFORMS": None})
    assert result.returncode == 0, result.stderr
    assert "TPU" not in result.stderr and "libtpu" not in result.stderr, result.stderr
