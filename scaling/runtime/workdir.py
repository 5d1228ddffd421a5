"""The run directory: created, proven writable and confined before any heavy work.

Everything a run writes lives under one resolved directory. The names inside it are fixed by
the framework, and a default directory is derived from the experiment name only when that name
is a plain file name, so no crafted experiment name or planted symlink can make a run write
outside the directory the user chose.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import ml_collections

from scaling.errors import UserError

# Every entry a run creates in its workdir; each must stay inside it.
ENTRIES = ("config.json", "provenance.jsonl", "metrics.jsonl", "checkpoints", "tensorboard",
           "profile", "export", "predictions.jsonl", "preflight.json")
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
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag}: exists and is not a directory; choose another --workdir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{flag}: cannot write there ({e.strerror}); choose a writable "
                        "directory with --workdir") from None
    check_confined(path)
    return path


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
