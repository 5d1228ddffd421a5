"""Checkpoints under failure: killed saves, incompatible restores, provenance, full disks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from conftest import REPO, child_env, run_cli
from test_cli import assert_user_error, committed_steps

from scaling.config import experiments as config_lib
from scaling.errors import UserError
from scaling.runtime import checkpoint, provenance
from scaling.training import loop
from scaling.training import run as run_lib


def tiny_args(data_dir, workdir, *extra):
    return ["--experiment=mnist_mlp", f"--workdir={workdir}",
            f"--config.data.manual_dir={data_dir}", "--config.batch_size=64",
            "--config.eval_batch_size=64", "--config.steps_per_call=4",
            "--config.log_every_steps=4", "--config.eval_every_steps=100000", *extra]


def train_with_checkpoints(data_dir, workdir) -> None:
    """A tiny run of 8 steps into `workdir`, with checkpoints at steps 4 and 8."""
    result = run_cli(*tiny_args(data_dir, workdir, "--config.num_steps=8",
                                "--config.checkpoint_every_steps=4"))
    assert result.returncode == 0, result.stderr[-2000:]


def tiny_config_overrides(data_dir, *overrides) -> list[str]:
    return [f"data.manual_dir={data_dir}", "batch_size=64", "eval_batch_size=64", "num_steps=8",
            "steps_per_call=4", "checkpoint_every_steps=8", *overrides]


def tiny_config(data_dir, *overrides):
    return config_lib.load_config("mnist_mlp", tiny_config_overrides(data_dir, *overrides))


def staged_saves(workdir):
    """Orbax's temporary directories: a save that has started but not committed."""
    directory = workdir / "checkpoints"
    return [p.name for p in directory.iterdir() if "tmp" in p.name] if directory.exists() else []


def test_sigkill_during_an_async_save_resumes_from_the_last_committed_step(tmp_path,
                                                                           tiny_idx_dir):
    workdir = tmp_path / "run"
    # Wide layers make each save take long enough to be caught half-written.
    args = [sys.executable, "-m", "scaling.main",
            *tiny_args(tiny_idx_dir, workdir, "--config.model.hidden_sizes=1024,1024",
                       "--config.num_steps=100000", "--config.checkpoint_every_steps=4",
                       "--config.keep_checkpoints=2")]
    caught = None
    for _ in range(3):  # a save can commit between seeing it and the kill; then try again
        process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if staged_saves(workdir) and committed_steps(workdir):
                break
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
        caught = staged_saves(workdir)
        if caught:
            break
    assert caught, "never caught a save in flight"
    staged_step = int(caught[0].split(".")[0])
    committed = committed_steps(workdir)
    assert committed and staged_step not in committed

    final = committed[-1] + 4
    result = run_cli(*tiny_args(tiny_idx_dir, workdir, "--config.model.hidden_sizes=1024,1024",
                                f"--config.num_steps={final}",
                                "--config.checkpoint_every_steps=4"))
    assert result.returncode == 0, result.stderr
    assert f"resumed at step {committed[-1]}" in result.stdout
    assert staged_saves(workdir) == []  # the partial save was cleaned up, never loaded
    assert committed_steps(workdir)[-1] == final


def test_checkpoint_listing_agrees_with_orbax_before_orbax_is_opened(tmp_path, tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir, "checkpoint_every_steps=4")
    loop.train_and_evaluate(config, tmp_path, module)
    (tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()  # a save still staged
    manager = checkpoint.make_manager(tmp_path, 3)
    assert (manager.all_steps(), manager.latest_step(), manager.opened) == ([4, 8], 8, False)
    assert sorted(manager.orbax.all_steps()) == [4, 8]
    assert manager.opened
    manager.close()


def test_a_fresh_run_imports_orbax_only_for_its_first_save(tmp_path, tiny_idx_dir):
    script = f"""
import sys
from pathlib import Path

from scaling.runtime import checkpoint

from scaling.training import loop
from scaling.config import experiments as config_lib

imported_at_save = []
save = checkpoint.save

def spy(manager, state, **kwargs):
    imported_at_save.append("orbax.checkpoint" in sys.modules)
    save(manager, state, **kwargs)

checkpoint.save = spy
config, module = config_lib.load_config("mnist_mlp", {tiny_config_overrides(tiny_idx_dir)!r})
loop.train_and_evaluate(config, Path({str(tmp_path)!r}), module)
print(imported_at_save)
"""
    env = child_env()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[False, True]"


def test_incompatible_checkpoints_list_every_mismatched_path(tmp_path, tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir)
    loop.train_and_evaluate(config, tmp_path, module)
    manager = checkpoint.make_manager(tmp_path, 3)

    def refusal(abstract_state) -> str:
        with pytest.raises(UserError) as error:
            checkpoint.restore(manager, abstract_state)
        return str(error.value)

    def abstract_state(*overrides):
        changed, module = tiny_config(tiny_idx_dir, *overrides)
        return run_lib.setup(changed, module)[0].abstract_state

    wider = refusal(abstract_state("model.hidden_sizes=(64, 128)"))
    assert "params/hidden_0/kernel: float32[784,128] in the checkpoint, float32[784,64]" in wider
    assert "opt_state/0/mu/hidden_0/kernel" in wider
    assert "params/hidden_1/kernel" in wider and "params/logits/kernel" not in wider

    extra = refusal(abstract_state("model.hidden_sizes=(128, 128, 128)"))
    assert "params/hidden_2/kernel: absent in the checkpoint, float32[128,128]" in extra
    missing = refusal(abstract_state("model.hidden_sizes=(128,)"))
    assert "params/hidden_1/kernel: float32[128,128] in the checkpoint, absent" in missing

    run = run_lib.setup(config, module)[0]
    as_bfloat16 = run.abstract_state.replace(params=jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.bfloat16, sharding=leaf.sharding),
        run.abstract_state.params))
    cast = refusal(as_bfloat16)
    assert "params/hidden_0/bias: float32[128] in the checkpoint, bfloat16[128]" in cast
    assert "(6 mismatched paths)" in cast  # only the params; no silent cast of any

    restored = checkpoint.restore(manager, run.abstract_state)  # the matching config loads
    assert int(restored.step) == 8
    manager.close()


def test_changed_model_config_is_refused_unless_overridden(tmp_path, tiny_idx_dir):
    workdir = tmp_path / "run"
    first = run_cli(*tiny_args(tiny_idx_dir, workdir, "--config.num_steps=8"))
    assert first.returncode == 0, first.stderr
    recorded_config = (workdir / "config.json").read_text()

    refused = run_cli(*tiny_args(tiny_idx_dir, workdir, "--config.num_steps=16",
                                 "--config.model.hidden_sizes=64,64"))
    assert_user_error(refused, "different model config")
    assert "pass --allow_config_change" in refused.stderr
    assert "model.hidden_sizes: [128, 128] in config.json, [64, 64] now" in refused.stderr

    # Allowed, but the arrays no longer fit: refused again, with the paths, and nothing
    # re-initialised or overwritten.
    forced = run_cli(*tiny_args(tiny_idx_dir, workdir, "--config.num_steps=16",
                                "--config.model.hidden_sizes=64,64", "--allow_config_change"))
    assert_user_error(forced, "does not match this config")
    assert "params/hidden_0/kernel: float32[784,128] in the checkpoint" in forced.stderr
    assert (workdir / "config.json").read_text() == recorded_config
    assert committed_steps(workdir) == [8]

    # A change the arrays survive (the compute dtype) restores once it is allowed.
    dtype = ["--config.num_steps=16", "--config.model.dtype=bfloat16"]
    refused = run_cli(*tiny_args(tiny_idx_dir, workdir, *dtype))
    assert_user_error(refused, "different model config")
    assert 'model.dtype: "float32" in config.json, "bfloat16" now' in refused.stderr
    allowed = run_cli(*tiny_args(tiny_idx_dir, workdir, *dtype, "--allow_config_change"))
    assert allowed.returncode == 0, allowed.stderr
    assert "resumed at step 8" in allowed.stdout
    assert json.loads((workdir / "config.json").read_text())["model"]["dtype"] == "bfloat16"


def test_a_lora_run_is_not_restored_over_another_base(tmp_path):
    """The adapters of a LoRA run sit on init_from's params (or the seed's): a command that
    names another base, or none, is refused as a model change, not run on random params."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "8").mkdir(parents=True)
    recorded = {"model": {"lora_rank": 2}, "task": "language_modeling",
                "init_from": "/models/base", "seed": 0}
    (workdir / "config.json").write_text(json.dumps(recorded))
    same = ml_collections.ConfigDict(recorded)
    assert provenance.check_model_config(workdir, same, allow_change=False) == []
    for changed, line in (({"init_from": ""}, 'init_from: "/models/base" in config.json, "" now'),
                          ({"seed": 1}, "seed: 0 in config.json, 1 now")):
        with pytest.raises(UserError) as refused:
            provenance.check_model_config(
                workdir, ml_collections.ConfigDict({**recorded, **changed}), allow_change=False)
        assert line in str(refused.value) and "different model config" in str(refused.value)
    # Without adapters the checkpoint holds every param: the base is not part of it.
    full = {**recorded, "model": {"lora_rank": 0}}
    (workdir / "config.json").write_text(json.dumps(full))
    assert provenance.check_model_config(
        workdir, ml_collections.ConfigDict({**full, "init_from": ""}), allow_change=False) == []


def test_provenance_records_config_versions_and_revision(tmp_path, tiny_idx_dir):
    workdir = tmp_path / "run"
    for steps in (4, 8):  # a start and a resume
        result = run_cli(*tiny_args(tiny_idx_dir, workdir, f"--config.num_steps={steps}"))
        assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (workdir / "provenance.jsonl").open()]
    assert [r["config"]["num_steps"] for r in records] == [4, 8]
    latest = records[-1]
    assert latest["config"] == json.loads((workdir / "config.json").read_text())
    assert latest["packages"]["jax"] == jax.__version__
    assert latest["experiment_sha256"] == provenance.file_sha256(
        REPO / "experiments" / "mnist_mlp.py")
    assert latest["devices"] == {"platform": "cpu", "kind": "cpu", "count": 1, "processes": 1}
    if (REPO / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True,
                              capture_output=True, check=True).stdout.strip()
        assert latest["scaling_revision"]["commit"] == head


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB filesystem of its own, so it can really run out of space."""
    mount_point = tmp_path / "run" / "checkpoints"
    mount_point.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(small_disk,
                                                                      tiny_idx_dir):
    workdir = small_disk.parent
    first = run_cli(*tiny_args(tiny_idx_dir, workdir, "--config.num_steps=8"))
    assert first.returncode == 0, first.stderr
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: closing has nothing to flush
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass

    full = run_cli(*tiny_args(tiny_idx_dir, workdir, "--config.num_steps=16"))
    assert full.returncode == 74, full.stderr
    # Orbax's writer threads log their own failures too; the run reports it in one line.
    message = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1
    assert "saving the checkpoint of step 16" in message[0]
    assert "No space left on device" in message[0] and "step 8, is intact" in message[0]
    assert committed_steps(workdir) == [8]

    os.remove(filler)
    resumed = run_cli(*tiny_args(tiny_idx_dir, workdir, "--config.num_steps=16"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 8" in resumed.stdout
    assert committed_steps(workdir) == [8, 16]


def test_a_save_failing_mid_run_exits_74_at_once_without_a_traceback(small_disk,
                                                                      tiny_idx_dir):
    """The first save fails in Orbax's writer threads; the run learns of it at the next save
    and stops there. Orbax raises the same failure again at every later wait and at close,
    which must neither replace the message nor hang."""
    with open(small_disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    full = run_cli(*tiny_args(tiny_idx_dir, small_disk.parent, "--config.num_steps=16",
                              "--config.checkpoint_every_steps=4"), timeout=30)
    assert full.returncode == 74, full.stderr[-2000:]
    # Orbax's writer threads may print "Event loop is closed" tracebacks of their own as the
    # failure reaches them (TensorStore calling back into a finished loop); none is ours.
    assert "scaling/" not in full.stderr
    message = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and "saving the checkpoint of step 4" in message[0]
    assert "no earlier checkpoint exists" in message[0]


def test_checkpoints_contain_no_pickle(tmp_path, tiny_idx_dir):
    config, module = tiny_config(tiny_idx_dir)
    loop.train_and_evaluate(config, tmp_path, module)
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        head = path.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), path
        assert path.suffix not in (".pkl", ".pickle", ".npy"), path
    for name in ("_CHECKPOINT_METADATA", "_METADATA"):
        for path in (tmp_path / "checkpoints").rglob(name):
            json.loads(path.read_text())  # metadata is plain JSON


def test_workdir_entries_cannot_lead_outside(tmp_path, tiny_idx_dir):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("precious\n")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").symlink_to(outside)
    result = run_cli(*tiny_args(tiny_idx_dir, workdir, "--config.num_steps=4"))
    assert_user_error(result, "metrics.jsonl", "leads outside the workdir")
    assert outside.read_text() == "precious\n"


def test_a_crafted_experiment_name_cannot_pick_the_default_workdir(tmp_path, tiny_idx_dir):
    crafted = tmp_path / "...py"  # its name would make the default workdir runs/..
    crafted.write_text((REPO / "experiments" / "mnist_mlp.py").read_text())
    result = run_cli(f"--experiment={crafted}", f"--config.data.manual_dir={tiny_idx_dir}",
                     "--config.num_steps=4", cwd=tmp_path)
    assert_user_error(result, "cannot name a directory", "--workdir")
    assert not (tmp_path / "config.json").exists()


def test_a_second_run_on_a_busy_workdir_exits_2_and_the_first_finishes_as_if_alone(
        tmp_path, tiny_idx_dir):
    workdir, alone = tmp_path / "shared", tmp_path / "alone"
    # Wide layers and many steps: the first run is still training when the second starts.
    train = ["--config.model.hidden_sizes=1024,1024", "--config.num_steps=1500",
             "--config.checkpoint_every_steps=500"]
    # Training long enough to be found busy runs its steps more than it compiles: XLA's
    # default flags, as a user's shell has them (the tests' drop LLVM's optimisation).
    one_device = {**child_env(), "XLA_FLAGS": ""}
    first = subprocess.Popen([sys.executable, "-m", "scaling.main",
                              *tiny_args(tiny_idx_dir, workdir, *train)],
                             cwd=REPO, env=one_device, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lock = workdir / "run.lock"
    deadline = time.time() + 120
    while time.time() < deadline and f"pid {first.pid}," not in (
            lock.read_text() if lock.exists() else ""):
        time.sleep(0.05)
    second = run_cli(*tiny_args(tiny_idx_dir, workdir, "--config.optimizer.learning_rate=0.1",
                                *train))
    still_training = first.poll() is None
    # Readers need no lock: an evaluation of the first committed checkpoint runs beside it,
    # appending its record without rewriting the file the first run appends to.
    while time.time() < deadline and not committed_steps(workdir):
        time.sleep(0.05)
    evaluated = run_cli(*tiny_args(tiny_idx_dir, workdir, *train), "--mode=eval")
    evaluating_beside = first.poll() is None
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert still_training, "the first run ended before the second tried; lengthen it"
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert evaluating_beside, "the first run ended before the evaluation; lengthen it"
    assert second.returncode == 2 and "Traceback" not in second.stderr
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"error: --workdir={workdir}: another run is using it (host ")
    assert f"pid {first.pid}, started " in line
    # The refused run wrote nothing: one start recorded, and the history is the first run's
    # alone, to the bit.
    starts = [json.loads(r) for r in (workdir / "provenance.jsonl").read_text().splitlines()]
    assert [s["mode"] for s in starts] == ["train", "eval"]
    assert run_cli(*tiny_args(tiny_idx_dir, alone, *train),
                   env_extra={"XLA_FLAGS": ""}).returncode == 0
    evaluations = [r for r in logged(workdir) if r["split"] != "train" and r["step"] < 1500]
    assert len(evaluations) == 1  # the evaluation's own record, beside the run's
    history = [r for r in logged(workdir) if r not in evaluations]
    assert history == logged(alone) and len(history) > 10


def logged(workdir):
    """metrics.jsonl without the fields that depend on the machine's speed."""
    timing = ("time", "per_s", "per_sec", "seconds", "wait", "mfu", "tflops")
    return [{k: v for k, v in json.loads(line).items() if not any(t in k for t in timing)}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]
