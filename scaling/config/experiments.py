"""Experiment files, command-line overrides and config validation.

An experiment is a plain Python file with a docstring and `get_config()`, found by name in
`experiments/` or by path anywhere. Its config is laid over the defaults of
`scaling.config.schema`, which also says which keys exist and what values they take.
Overrides arrive as `--config.a.b=value` strings and are parsed against the type of the
field they replace, so a typo or a wrong type fails before any heavy work starts.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
import traceback
import types
from collections.abc import Iterable
from pathlib import Path

import ml_collections

from scaling.config import schema
from scaling.errors import UserError

EXPERIMENTS_ENV = "SCALING_EXPERIMENTS_DIR"


def experiment_dirs() -> list[Path]:
    """Where experiment names are looked up, first match wins."""
    dirs = []
    if os.environ.get(EXPERIMENTS_ENV):
        dirs.append(Path(os.environ[EXPERIMENTS_ENV]))
    dirs.append(Path.cwd() / "experiments")
    dirs.append(Path(__file__).resolve().parents[2] / "experiments")  # beside scaling/
    unique = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def list_experiments() -> dict[str, str]:
    """Experiment name to the first line of its docstring, read without importing the file."""
    found = {}
    for directory in experiment_dirs():
        for path in sorted(directory.glob("*.py")):
            if path.stem.startswith("_") or path.stem in found:
                continue
            found[path.stem] = _first_docstring_line(path)
    return found


def _first_docstring_line(path: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except SyntaxError:
        return "(syntax error in file)"
    return doc.strip().splitlines()[0] if doc else "(no docstring)"


def resolve_experiment(name_or_path: str) -> Path:
    """A name means experiments/NAME.py; anything ending in .py is a path."""
    if not name_or_path:
        raise UserError(
            "--experiment is required; known experiments: " + ", ".join(list_experiments())
        )
    if name_or_path.endswith(".py") or os.sep in name_or_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"--experiment={name_or_path}: no such file")
        if path.suffix != ".py":
            raise UserError(f"--experiment={name_or_path}: not a Python file; an experiment "
                            "is a .py file defining get_config()")
        return path.resolve()
    for directory in experiment_dirs():
        candidate = directory / f"{name_or_path}.py"
        if candidate.is_file():
            return candidate.resolve()
    known = list(list_experiments())
    close = difflib.get_close_matches(name_or_path, known, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(
        f"--experiment={name_or_path}: unknown experiment.{hint} "
        f"Known: {', '.join(known) or '(none)'}. A path to a .py file also works."
    )


def load_experiment(path: Path) -> types.ModuleType:
    """Import an experiment file as an anonymous module, so copies never clash by name."""
    module_name = f"scaling_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        source = path.read_text(encoding="utf-8")
        compile(source, str(path), "exec")
    except SyntaxError as e:
        raise UserError(f"--experiment={path}: syntax error at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--experiment={path}: not UTF-8 text (byte {e.start}); save it as "
                        "UTF-8") from None
    except OSError as e:
        raise UserError(f"--experiment={path}: cannot read it ({e.strerror})") from None
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the file raises is the user's to fix
        raise UserError(f"--experiment={path}: importing the file failed"
                        f"{_line_in(e, path)}: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"--experiment={path}: the file defines no get_config() function")
    return module


def _line_in(error: BaseException, path: Path) -> str:
    """` at line N`, the last line of the experiment file in the error's traceback."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if Path(frame.filename) == path]
    return f" at line {lines[-1]}" if lines else ""


CONFIG_PREFIX = "--config."
MESH_PREFIX = "--mesh."  # short for --config.mesh., as both entry points take it


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """`--config.a.b=v` and `--mesh.axis=n` overrides (as `a.b=v`, `mesh.axis=n`) apart from
    the other arguments, which the entry point's own flags parse."""
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith(CONFIG_PREFIX):
            overrides.append(arg[len(CONFIG_PREFIX):])
        elif arg.startswith(MESH_PREFIX):
            overrides.append("mesh." + arg[len(MESH_PREFIX):])
        else:
            rest.append(arg)
    return overrides, rest


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Apply `a.b=value` strings in place, each parsed as the type of the field it replaces."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise UserError(f"--config.{key}: expected --config.{key}=VALUE")
        parent, leaf = _lookup_parent(config, key)
        current = parent[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise UserError(f"--config.{key} is a group; set one of its fields: "
                            + ", ".join(f"{key}.{k}" for k in current.keys()))
        value = _parse_like(current, raw, key)
        with parent.unlocked():
            parent[leaf] = value


def _lookup_parent(config: ml_collections.ConfigDict, key: str):
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = _all_keys(config)
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join('--config.' + c for c in close)}?" if close else ""
            raise UserError(f"--config.{key}: unknown config key.{hint}")
        if depth == len(parts) - 1:
            return node, part
        node = node[part]
    raise AssertionError("unreachable")


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _parse_like(current, raw: str, key: str):
    """Parse `raw` so that it has the type of `current`, or fail naming the flag."""
    def fail(kind: str):
        return UserError(f"--config.{key}={raw}: expected {kind}")

    if isinstance(current, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise fail("a boolean (true or false)")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise fail("an integer") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise fail("a number") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            # A bare comma list such as `data,fsdp` or `64,64`.
            value = tuple(_literal_or_str(p) for p in raw.split(",") if p.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    if current is None:
        return _literal_or_str(raw)
    raise fail(type(current).__name__)


def _literal_or_str(raw: str):
    try:
        return ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        return raw.strip()


def require(condition: bool, message: str) -> None:
    """Validate user input in a way that survives `python -O`, unlike assert."""
    if not condition:
        raise UserError(message)


def load_config(experiment: str, overrides: Iterable[str]) -> tuple[ml_collections.ConfigDict,
                                                                   types.ModuleType]:
    """Experiment name or path plus overrides to a locked, validated config and its module.

    Schema defaults first, then the experiment's literal config (keys the schema does not
    know are refused, naming the file), then the overrides, then validation.
    """
    path = resolve_experiment(experiment)
    module = load_experiment(path)
    try:
        given = module.get_config()
    except Exception as e:  # noqa: BLE001 - whatever the file raises is the user's to fix
        raise UserError(f"--experiment={path}: get_config() raised{_line_in(e, path)}: "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(given, ml_collections.ConfigDict):
        raise UserError(f"--experiment={path}: get_config() must return an "
                        "ml_collections.ConfigDict")
    given = given.to_dict()
    given.pop("experiment", None)  # the loader names it, from the file
    config = resolve_literal(given, f"--experiment={path}", path.stem, overrides,
                             has_model_hook(module))
    return config, module


def resolve_literal(given: dict, source: str, name: str, overrides: Iterable[str],
                    has_hook: bool = False) -> ml_collections.ConfigDict:
    """A literal config (what `get_config()` returns, or what a model directory stands for)
    over the schema's defaults, named `name`, with the overrides laid on, checked, locked.
    `source` names where the literal came from in error messages."""
    resolved = schema.resolve(given, source, has_hook)
    resolved["experiment"] = name
    config = ml_collections.ConfigDict(resolved)
    selected = schema.selectors(resolved)
    apply_overrides(config, overrides)
    schema.check(config, selected, has_hook)
    validate(config)
    config.lock()
    return config


def has_model_hook(module: types.ModuleType | None) -> bool:
    """Whether the experiment builds its own model, and so may carry its own model fields."""
    return callable(getattr(module, "make_model", None))


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks that need no devices; mesh and batch checks happen once devices are known."""
    require(config.batch_size > 0, f"--config.batch_size={config.batch_size}: must be positive")
    require(config.eval_batch_size > 0,
            f"--config.eval_batch_size={config.eval_batch_size}: must be positive")
    require(config.num_epochs > 0 or config.num_steps > 0,
            "--config.num_epochs and --config.num_steps: one of them must be positive")
    require(config.num_steps >= -1,
            f"--config.num_steps={config.num_steps}: must be positive, or -1 to use num_epochs")
    require(config.steps_per_call > 0,
            f"--config.steps_per_call={config.steps_per_call}: must be positive")
    require(config.log_every_steps > 0,
            f"--config.log_every_steps={config.log_every_steps}: must be positive")
    require(config.keep_checkpoints > 0,
            f"--config.keep_checkpoints={config.keep_checkpoints}: must be positive")
    for axis in schema.MESH_AXES:
        size = config.mesh[axis]
        require(size == -1 or size > 0,
                f"--config.mesh.{axis}={size}: must be a positive size, or -1 for the rest")


def load_recorded_config(workdir: Path, experiment: str | None,
                         overrides: Iterable[str]) -> tuple[ml_collections.ConfigDict,
                                                            types.ModuleType]:
    """The config a workdir was trained or imported with (its `config.json`), under the
    experiment it names unless `experiment` is given, plus `overrides`.

    Commands that only read a workdir (serving) need no `--experiment`: the resolved config
    already says everything, including the overrides training was started with.
    """
    path = Path(workdir) / "config.json"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--workdir={workdir}: holds no config.json; train or import a model "
                        "into it first (--mode=train or --mode=import_hf)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({e})") from None
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: expected a JSON object")
    name = experiment or recorded.get("experiment")
    if not isinstance(name, str):
        raise UserError(f"{path}: names no experiment; pass --experiment=NAME_OR_PATH")
    config, module = load_config(name, [])
    with config.unlocked():
        _lay_over(config, recorded, path)
    apply_overrides(config, overrides)
    validate(config)
    config.lock()
    return config, module


def _lay_over(config: ml_collections.ConfigDict, recorded: dict, path: Path,
              prefix: str = "") -> None:
    """Sets every recorded field the schema still has (JSON lists become tuples where the
    schema holds tuples)."""
    for key, value in recorded.items():
        if key not in config:
            continue
        current = config[key]
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
            _lay_over(current, value, path, f"{prefix}{key}.")
            continue
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            config[key] = value
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: {prefix}{key}={value!r} does not fit the config "
                            f"({e})") from None
