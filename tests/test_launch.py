"""The launch scripts: exact commands from their dry runs, help, errors, shellcheck."""

import os
import shlex
import shutil
import subprocess

import pytest
from conftest import REPO

LAUNCH = REPO / "launch"
HOSTILE = "--workdir=/tmp/a b;rm -rf ~ $(reboot)"


def dry_run(script: str, *args: str) -> list[list[str]]:
    result = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def test_tpu_pod_dry_run_single_slice():
    commands = dry_run("tpu_pod.sh", "--name", "run1", "--zone", "us-east5-a",
                       "--project", "proj", "--accelerator", "v5p-128", "--dry-run", "--",
                       "--experiment=lm_8b", HOSTILE)
    where = ["--zone=us-east5-a", "--project=proj"]
    assert commands[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "run1", *where,
                           "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"]
    assert commands[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
                           str(REPO), "run1:~/scaling", *where, "--worker=all"]
    assert commands[2] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "run1", *where,
                           "--worker=all",
                           "--command=cd ~/scaling && pip install -e . 'jax[tpu]'"]
    assert commands[3][:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "run1", *where]
    assert commands[3][8] == "--worker=all"
    command = commands[3][9].removeprefix("--command=")
    prefix, _, quoted = command.partition(" && ")
    assert prefix == "cd ~/scaling"
    # The remote shell splits it back into exactly the argv that was given.
    assert shlex.split(quoted) == ["python", "-m", "scaling.main", "--experiment=lm_8b",
                                   HOSTILE]
    assert commands[4] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "run1", *where,
                           "--quiet"]
    assert len(commands) == 5


def test_tpu_pod_dry_run_multi_slice():
    commands = dry_run("tpu_pod.sh", "--name", "ms", "--zone", "z", "--num-slices", "2",
                       "--keep", "--dry-run", "--", "--experiment=lm_8b",
                       "--config.mesh.dcn_data=2")
    assert commands[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ms",
                           "--zone=z", "--accelerator-type=v5p-128",
                           "--runtime-version=v2-alpha-tpuv5", "--node-count=2",
                           "--node-prefix=ms"]
    runs = [c for c in commands if c[-1].startswith("--command=cd ~/scaling && python")]
    assert [c[5] for c in runs] == ["ms-0", "ms-1"]
    assert runs[0][-1].endswith("--experiment=lm_8b --config.mesh.dcn_data=2")
    assert not any("delete" in c for c in commands)  # --keep


def test_slurm_dry_run():
    commands = dry_run("slurm.sh", "--nodes", "2", "--gpus-per-node", "4", "--partition",
                       "gpu", "--dry-run", "--", "--experiment=lm_1b", HOSTILE)
    assert commands == [["sbatch", "--job-name=scaling", "--nodes=2", "--ntasks-per-node=4",
                         "--gpus-per-node=4", "--time=04:00:00", "--partition=gpu",
                         str(LAUNCH / "slurm_job.sbatch"), "--experiment=lm_1b", HOSTILE]]


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm.sh"])
def test_help_and_bad_options(script):
    shown = subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True,
                           text=True)
    assert shown.returncode == 0 and "Usage: launch/" in shown.stdout
    bad = subprocess.run(["bash", str(LAUNCH / script), "--bogus"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


def test_local_launcher_help():
    result = subprocess.run(["python", str(LAUNCH / "local.py"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--dry_run" in result.stdout


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install shellcheck (see .ci/run)")
        pytest.skip("shellcheck is not installed")
    scripts = [str(p) for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch")]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert len(scripts) == 3
