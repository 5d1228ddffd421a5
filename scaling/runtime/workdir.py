"""The run directory: created, proven writable and confined before any heavy work.

Everything a run writes lives under one resolved directory. The names inside it are fixed by
the framework, and a default directory is derived from the experiment name only when that name
is a plain file name, so no crafted experiment name or planted symlink can make a run write
outside the directory the user chose.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import ml_collections

from scaling.errors import UserError

# Every entry a run creates in its workdir; each must stay inside it.
ENTRIES = ("config.json", "provenance.jsonl", "metrics.jsonl", "checkpoints", "tensorboard",
           "profile", "export", "hf", "predictions.jsonl", "preflight.json", "run.lock")
LOCK = "run.lock"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def prepare(workdir: str | None, experiment: str) -> Path:
    """The resolved workdir, created, confined and proven writable."""
    if workdir:
        flag = f"--workdir={workdir}"
        path = Path(workdir).expanduser().resolve()
    else:
        if not SAFE_NAME.fullmatch(experiment) or experiment.strip(".") == "":
            raise UserError(f"experiment name {experiment!r} cannot name a directory; "
                            "choose one with --workdir")
        runs = Path("runs").resolve()
        path = (runs / experiment).resolve()
        flag = f"the default workdir {path}"
        if runs not in path.parents:
            raise UserError(f"{flag} resolves outside {runs}; choose one with --workdir")
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag}: exists and is not a directory; choose another --workdir")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{flag}: cannot write there ({e.strerror}); choose a writable "
                        "directory with --workdir") from None
    check_confined(path)
    return path


@contextlib.contextmanager
def run_lock(workdir: Path) -> Iterator[None]:
    """Hold the workdir's run lock for the block: one training run per workdir.

    An advisory `flock` on `run.lock`, taken before the run reads or writes anything else
    there. The kernel drops it when the process ends, however it ends, so a killed run never
    leaves a stale lock. The file names the holder (host, pid, start time) for the refusal a
    second run gets. `flock` is reliable on local disks; on network filesystems it depends
    on the server's lock support.
    """
    path = workdir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise UserError(f"{path}: cannot open the run lock ({e.strerror}); remove it or "
                        "choose another --workdir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
            raise UserError(f"--workdir={workdir}: another run is using it ({holder}); wait "
                            "for it to finish, or choose another --workdir") from None
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def in_use(workdir: Path) -> bool:
    """Whether a run holds the workdir's run lock now (a reader then must not rewrite the
    files that run appends to)."""
    try:
        fd = os.open(Path(workdir) / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def check_confined(path: Path) -> None:
    """Refuse entries that are symlinks leading out of the workdir."""
    for name in ENTRIES:
        entry = path / name
        if entry.is_symlink() or entry.exists():
            target = entry.resolve()
            if target != path and path not in target.parents:
                raise UserError(f"{entry} leads outside the workdir (to {target}); remove it "
                                "or choose another --workdir")


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """config.json, replaced atomically so a reader never sees half a file."""
    write_json_atomically(workdir / "config.json", config.to_dict())


def write_json_atomically(target: Path, value) -> None:
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    partial.replace(target)
