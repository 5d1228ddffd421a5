"""Several processes on one machine, as a double of a multi-host pod, through launch/local.py."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from scaling.runtime.metrics import read_metrics

# The tests share a module fixture that is costly to build: one worker builds it once.
pytestmark = pytest.mark.xdist_group("multihost")

LAUNCHER = REPO / "launch" / "local.py"
COMMON = ["--experiment=fashion_mnist_mlp", "--config.log_every_steps=1",
          "--config.steps_per_call=4", "--config.eval_every_steps=1000000",
          "--config.checkpoint_every_steps=10"]


def launch(workdir, num_processes, devices_per_process, *args, timeout=30):
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), f"--num_processes={num_processes}",
         f"--devices_per_process={devices_per_process}", f"--timeout={timeout}", "--",
         *COMMON, f"--workdir={workdir}", *args],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == "train"}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, fashion_mnist_available):
    workdir = tmp_path_factory.mktemp("one_by_eight")
    launch(workdir, 1, 8, "--config.num_steps=20")
    return train_losses(workdir)


def test_two_processes_see_the_same_batches_as_one(tmp_path, straight_run):
    result = launch(tmp_path, 2, 4, "--config.num_steps=20")
    assert "process 0 of 2" in result.stdout
    assert "[1] " in result.stdout and "[1] step" not in result.stdout  # only process 0 logs
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 21))
    for step, loss in straight_run.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    assert "test loss" in result.stdout


def test_multi_slice_hybrid_mesh_spans_processes(tmp_path, straight_run):
    """Each process stands in for a slice: data = 4 within a process x 2 across them."""
    result = launch(tmp_path, 2, 4, "--config.num_steps=20", "--config.mesh.dcn_data=2")
    assert "mesh                data=8, fsdp=1, context=1, tensor=1" in result.stdout
    losses = train_losses(tmp_path)
    for step, loss in straight_run.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step


@pytest.mark.parametrize("first, second", [((2, 4), (1, 8)), ((1, 8), (2, 4))],
                         ids=["2x4 then 1x8", "1x8 then 2x4"])
def test_checkpoints_restore_under_another_process_count(tmp_path, straight_run, first,
                                                         second):
    launch(tmp_path, *first, "--config.num_steps=10")
    result = launch(tmp_path, *second, "--config.num_steps=20")
    assert "resumed at step 10" in result.stdout
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 21))
    for step, loss in straight_run.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step


def test_a_dead_process_fails_the_other_within_the_timeout(tmp_path, fashion_mnist_available):
    sys.path.insert(0, str(LAUNCHER.parent))
    import local

    timeout = 10
    commands = local.commands(2, local.free_port(), timeout, [
        "--experiment=fashion_mnist_mlp", f"--workdir={tmp_path}", "--config.num_steps=1000000",
        "--config.eval_every_steps=1000000000", "--config.checkpoint_every_steps=1000000000"])
    processes = [subprocess.Popen(cmd, env=local.environment(4), cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for cmd in commands]
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    while (tmp_path / "metrics.jsonl").stat().st_size == 0 and time.time() < deadline:
        time.sleep(0.1)  # both are training now
    processes[1].kill()
    killed_at = time.time()
    try:
        _, stderr = processes[0].communicate(timeout=timeout + 30)
    finally:
        for process in processes:
            process.kill()
    assert processes[0].returncode != 0
    assert time.time() - killed_at < timeout + 30
    # The coordination service names the death, unless the survivor was inside a collective
    # and gloo ended it first with its own C++ abort (a race seen once under load).
    assert "another task died" in stderr or "gloo::EnforceNotMet" in stderr, stderr[-2000:]


def test_sigterm_to_one_process_stops_both_at_one_saved_step(tmp_path, fashion_mnist_available):
    """A preemption notice reaches one host; the sync point makes every host save one step."""
    sys.path.insert(0, str(LAUNCHER.parent))
    import local

    common = [*COMMON[:3], "--config.eval_every_steps=1000000",
              "--config.checkpoint_every_steps=1000000", f"--workdir={tmp_path}"]
    commands = local.commands(2, local.free_port(), 30, [*common, "--config.num_steps=1000000"])
    processes = [subprocess.Popen(cmd, env=local.environment(4), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for cmd in commands]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
                (tmp_path / "metrics.jsonl").exists() and any(
                    r["step"] >= 8 for r in read_metrics(tmp_path) if r["split"] == "train")):
            time.sleep(0.1)
        processes[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=60)[0] for p in processes]
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [75, 75], outputs
    saved = int(outputs[0].split("preempted: saved step ")[1].split(";")[0])
    checkpoints = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                         if p.name.isdigit())
    assert checkpoints == [saved] and saved >= 8

    result = launch(tmp_path, 2, 4, *common[3:], f"--config.num_steps={saved + 8}")
    assert f"resumed at step {saved}" in result.stdout
    steps = [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == saved + 8


def test_dry_run_prints_each_process_command():
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), "--num_processes=2", "--devices_per_process=4",
         "--port=12345", "--timeout=9", "--dry_run", "--", "--experiment=mnist_mlp",
         "--config.model.hidden_sizes=(64, 64)", "--workdir=/tmp/a b;rm -rf ~"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        f"XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu {sys.executable}"
        f" -m scaling.main --experiment=mnist_mlp '--config.model.hidden_sizes=(64, 64)' "
        f"'--workdir=/tmp/a b;rm -rf ~' --coordinator_address=127.0.0.1:12345 "
        f"--num_processes=2 --process_id={i} --distributed_timeout=9" for i in range(2)]


CORPUS = ["--experiment=python_code_lm", "--config.log_every_steps=1",
          "--config.steps_per_call=2", "--config.eval_every_steps=1000000",
          "--config.checkpoint_every_steps=4", "--config.batch_size=16",
          "--config.eval_batch_size=16", "--config.data.eval_max_windows=32",
          "--config.optimizer.warmup_steps=2", "--config.model.num_layers=1",
          "--config.model.embed_dim=32", "--config.model.num_heads=2",
          "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
          "--config.model.mlp_dim=64", "--config.data.seq_len=32",
          "--config.model.max_seq_len=32"]


@pytest.fixture(scope="module")
def corpus_args(tmp_path_factory):
    """A corpus of several shards, prepared once (packed with document boundaries)."""
    from test_corpus import write_documents

    from scaling.config import experiments as config_lib
    from scaling.data import prepare, text_sources

    root = tmp_path_factory.mktemp("corpus")
    write_documents(root / "docs", count=80)
    args = [f"--config.data.sources=text:{root}/docs/**/*.txt",
            f"--config.data.prepared_dir={root / 'prepared'}",
            "--config.data.validation_fraction=0.1"]
    unit_bytes, text_sources.MIN_UNIT_BYTES = text_sources.MIN_UNIT_BYTES, 3000
    try:
        config = config_lib.load_config(
            "python_code_lm", [a.removeprefix("--config.") for a in CORPUS[1:] + args])[0]
        (manifest,) = prepare.prepare(config).values()
    finally:
        text_sources.MIN_UNIT_BYTES = unit_bytes
    assert len(manifest["splits"]["train"]["shards"]) >= 4
    return [*CORPUS, *args]


def launch_corpus(workdir, num_processes, devices_per_process, *args):
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), f"--num_processes={num_processes}",
         f"--devices_per_process={devices_per_process}", "--timeout=30", "--",
         *args, f"--workdir={workdir}"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_a_corpus_trains_alike_on_one_and_two_processes_and_resumes_across(
        tmp_path, corpus_args):
    launch_corpus(tmp_path / "one", 1, 8, *corpus_args, "--config.num_steps=12")
    straight = train_losses(tmp_path / "one")
    assert sorted(straight) == list(range(1, 13))
    launch_corpus(tmp_path / "moved", 2, 4, *corpus_args, "--config.num_steps=12",
                  "--config.checkpoint_every_steps=8")
    losses = train_losses(tmp_path / "moved")
    for step, loss in straight.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), ("two processes", step)
    # As if stopped at step 8 on two processes, resumed on one: the same batches from there.
    shutil.rmtree(tmp_path / "moved" / "checkpoints" / "12")
    result = launch_corpus(tmp_path / "moved", 1, 8, *corpus_args, "--config.num_steps=12")
    assert "resumed at step 8" in result.stdout
    losses = train_losses(tmp_path / "moved")
    for step, loss in straight.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), ("moved", step)
