"""What produced a workdir, and a guard against restoring it into a different model.

Every start appends one record to `provenance.jsonl`: the resolved config, the experiment file
and its hash, package versions, the source revision and the devices. A result can then be
traced to the code and libraries that made it, across every resume. Before a restore, the
model part of the config is compared with the one the checkpoints were written under, because
a changed model whose shapes happen to match would otherwise load weights silently.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import ml_collections

from scaling.errors import UserError
from scaling.runtime import checkpoint, jsonl

PACKAGES = ("scaling", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "ml-collections", "tensorflow-datasets")
# Config sections that define what a checkpoint's arrays mean.
MODEL_SECTIONS = ("model", "task")
LORA_BASE_KEYS = ("init_from", "seed")  # what makes a LoRA run's frozen params
ALLOW_FLAG = "--allow_config_change"


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revisions(paths: dict[str, Path]) -> dict[str, dict | None]:
    """For each path, the commit holding it and whether the work tree differs from it; None
    outside git. Every git command starts at once, so a start waits for one, not four."""
    commands = {"commit": ("rev-parse", "HEAD"),
                "dirty": ("status", "--porcelain", "--untracked-files=no")}
    running = {}
    for name, path in paths.items():
        directory = path if path.is_dir() else path.parent
        try:
            running[name] = {key: subprocess.Popen(
                ["git", "-C", str(directory), *args], stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True) for key, args in commands.items()}
        except OSError:  # no git
            running[name] = None
    return {name: _revision(processes) for name, processes in running.items()}


def _revision(processes: dict[str, subprocess.Popen] | None) -> dict | None:
    if processes is None:
        return None
    outputs = {key: _output(process) for key, process in processes.items()}
    if None in outputs.values():
        return None
    return {"commit": outputs["commit"], "dirty": bool(outputs["dirty"])}


def _output(process: subprocess.Popen) -> str | None:
    """A git command's output; None if it failed or hung."""
    try:
        out, _ = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return None
    return out.strip() if process.returncode == 0 else None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(workdir: Path, config: ml_collections.ConfigDict, experiment_file: Path, mode: str,
           devices: dict, config_change_allowed: bool = False, extra: dict | None = None
           ) -> dict:
    """Append this start's provenance to WORKDIR/provenance.jsonl and return it; `extra`
    adds what the mode itself read (an imported checkpoint's source)."""
    package_dir = Path(__file__).resolve().parent
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "argv": sys.argv,
        "experiment_file": str(experiment_file),
        "experiment_sha256": file_sha256(experiment_file),
        **{f"{name}_revision": revision for name, revision in git_revisions(
            {"experiment": experiment_file, "scaling": package_dir}).items()},
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "devices": devices,
        "config_change_allowed": config_change_allowed,
        "config": config.to_dict(),
        **(extra or {}),
    }
    path = workdir / "provenance.jsonl"
    jsonl.settle(path, what="provenance records")  # a torn line must not swallow this one
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
    return entry


def check_model_config(workdir: Path, config: ml_collections.ConfigDict,
                       allow_change: bool) -> list[str]:
    """Refuse to restore this workdir's checkpoints under a different model config.

    Returns the differences (empty when none); raises UserError for any unless allowed.
    """
    recorded_path = workdir / "config.json"
    if not checkpoint.committed_steps(workdir / "checkpoints") or not recorded_path.exists():
        return []
    try:
        recorded = json.loads(recorded_path.read_text())
        if not isinstance(recorded, dict):
            raise ValueError(f"it holds a JSON {type(recorded).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise UserError(f"{recorded_path}: cannot be read ({e}); it records the config the "
                        "checkpoints were written with. Restore it, or pass "
                        f"{ALLOW_FLAG}") from None
    current = json.loads(json.dumps(config.to_dict(), default=str))
    differences = []
    for section in MODEL_SECTIONS:
        differences += _differences(recorded.get(section), current.get(section), section)
    if isinstance(recorded.get("model"), dict) and recorded["model"].get("lora_rank"):
        # A LoRA run saves only its adapters: the frozen params under them are init_from's,
        # or the seed's init, made again at restore, so both are as much the model as its
        # shapes. Left unchecked, a command without the run's init_from would restore the
        # adapters over random params and say nothing.
        for key in LORA_BASE_KEYS:
            if key in recorded:
                differences += _differences(recorded[key], current.get(key, _ABSENT), key)
    if differences and not allow_change:
        raise UserError(
            f"--workdir={workdir}: its checkpoints were written with a different model "
            "config:\n  " + "\n  ".join(differences) +
            f"\nUse the same config, a new --workdir, or pass {ALLOW_FLAG} to restore anyway "
            "(the arrays must still match in shape and dtype)")
    return differences


def _differences(recorded, current, prefix: str) -> list[str]:
    if isinstance(recorded, dict) and isinstance(current, dict):
        found = []
        # A key that config.json lacks was written before the field was declared, when the
        # run used the field's default implicitly; the checkpoint's arrays are still compared
        # path by path at restore, so such a key is not reported as a change.
        for key in sorted(recorded.keys()):
            found += _differences(recorded.get(key, _ABSENT), current.get(key, _ABSENT),
                                  f"{prefix}.{key}")
        return found
    if _normal(recorded) == _normal(current):
        return []
    return [f"{prefix}: {_show(recorded)} in config.json, {_show(current)} now"]


_ABSENT = object()


def _normal(value):
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value


def _show(value) -> str:
    return "absent" if value is _ABSENT else json.dumps(_normal(value))
