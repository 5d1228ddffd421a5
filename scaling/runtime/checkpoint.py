"""Orbax checkpoints of the train state: asynchronous saves, keep-last-K, restore-or-init.

A restore is driven by the abstract state of the current run (shapes, dtypes and target
shardings), so a checkpoint written on one mesh restores directly onto another. Before any
array is read, the checkpoint's own metadata is compared with that abstract state: Orbax
would otherwise cast a changed dtype silently, and a changed width would fail deep inside
TensorStore. Orbax stages each save in a temporary directory and renames it only once every
array is written, so a save killed or failed half-way is never taken for a checkpoint.

Importing Orbax takes about 0.12 s, a tenth of a warm start. A fresh run needs it only at its
first save, so `Checkpoints` imports it and makes Orbax's manager on first use; until then it
lists the committed steps from the directory names alone.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from scaling.errors import CheckpointWriteError, UserError

MAX_LISTED_MISMATCHES = 40


def committed_steps(directory: Path) -> list[int]:
    """Steps saved completely in `directory`: Orbax renames a save's staging directory to the
    bare step number only once every array is written."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


class Checkpoints:
    """The checkpoints of one workdir: Orbax's asynchronous manager, made on first use."""

    def __init__(self, workdir: Path, keep: int):
        self.directory = Path(workdir).resolve() / "checkpoints"
        self.keep = keep
        self._orbax = None
        self.saving: int | None = None  # the step of the latest save started
        self.failed = False  # a write failure was reported: Orbax re-raises it on every wait
        # What a save keeps of a state (a LoRA run keeps its adapters alone); None: all of it.
        self.view: Callable | None = None

    @property
    def orbax(self):
        if self._orbax is None:
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, enable_async_checkpointing=True, create=True,
                cleanup_tmp_directories=True)
            quiet_tracebacks()
            # The handler is named up front so a fresh manager can read metadata before any
            # save.
            self._orbax = ocp.CheckpointManager(self.directory, options=options,
                                                item_handlers=ocp.StandardCheckpointHandler())
        return self._orbax

    @property
    def opened(self) -> bool:
        """Whether Orbax's manager exists, i.e. something was saved or restored."""
        return self._orbax is not None

    def all_steps(self) -> list[int]:
        if self._orbax is None:
            return committed_steps(self.directory)
        return sorted(self._orbax.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def close(self) -> None:
        if self._orbax is not None:
            with _write_errors(self):
                self._orbax.close()


def make_manager(workdir: Path, keep: int) -> Checkpoints:
    return Checkpoints(workdir, keep)


def save(manager: Checkpoints, state, *, force: bool = False) -> None:
    """Start an asynchronous save; it returns once the arrays are safe to donate."""
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return
    if manager.view is not None:
        state = manager.view(state)
    import orbax.checkpoint as ocp

    with _write_errors(manager):
        manager.orbax.save(step, args=ocp.args.StandardSave(state), force=force)
        manager.saving = step


def save_params(manager: Checkpoints, params, step: int = 0) -> None:
    """A checkpoint of params alone (an imported model): inference restores it like any
    other; training starts from it only through `init_from`, with a fresh optimizer."""
    import orbax.checkpoint as ocp

    manager.saving = step
    with _write_errors(manager):
        manager.orbax.save(step, args=ocp.args.StandardSave({PARAMS: params}), force=True)
        manager.orbax.wait_until_finished()


PARAMS = "params"  # the entry of a saved state that holds the weights


def saved_tree(manager: Checkpoints, step: int):
    """The checkpoint's metadata tree (shapes and dtypes of every saved array)."""
    return manager.orbax.item_metadata(step).tree


def wait(manager: Checkpoints) -> None:
    """Block until the save in flight is committed; a failed one raises CheckpointWriteError."""
    if not manager.opened:  # nothing was saved, so nothing is in flight
        return
    with _write_errors(manager):
        manager.orbax.wait_until_finished()


@contextlib.contextmanager
def _write_errors(manager: Checkpoints):
    # Orbax re-raises whatever the filesystem raised in its writer threads, at the next save
    # or wait; name the step and the checkpoint that survives instead of a thread traceback.
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
        if manager.failed:  # already reported; Orbax raises it again at each wait and close
            return
        manager.failed = True
        step = manager.saving
        manager.orbax.reload()
        committed = [s for s in manager.all_steps() if s != step]
        kept = (f"the last committed checkpoint, step {max(committed)}, is intact"
                if committed else "no earlier checkpoint exists")
        raise CheckpointWriteError(
            f"saving the checkpoint of step {step} in {manager.directory} failed: {e}; {kept}. "
            "Free space or fix the directory, then re-run the same command to resume") from e


class _OneLineRecords(logging.Filter):
    """Orbax logs each failure of its writer threads with a traceback, several times over;
    the run reports the failure once itself, so keep only each record's first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" in record.pathname:
            record.exc_info = record.exc_text = None
            record.msg, record.args = (record.getMessage().splitlines() or [""])[0][:300], None
        return True


def quiet_tracebacks() -> None:
    for handler in logging.getLogger("absl").handlers + logging.getLogger().handlers:
        if not any(isinstance(f, _OneLineRecords) for f in handler.filters):
            handler.addFilter(_OneLineRecords())


class DamagedCheckpoint(UserError):
    """A committed step whose files cannot be read back (truncated, missing or garbage)."""

    def __init__(self, directory: Path, step: int, error: Exception):
        self.step = step
        first = (str(error).strip().splitlines() or [""])[0][:300]
        super().__init__(f"checkpoint {directory / str(step)} is damaged "
                         f"({type(error).__name__}: {first})")


@contextlib.contextmanager
def reading(manager: Checkpoints, step: int):
    """Any failure to read step `step` but a refusal of ours becomes DamagedCheckpoint."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds
        raise DamagedCheckpoint(manager.directory, step, e) from None


def restore(manager: Checkpoints, abstract_state, step: int | None = None):
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    if step not in manager.all_steps():
        raise UserError(f"no checkpoint for step {step} in {manager.directory}; "
                        f"available: {', '.join(map(str, manager.all_steps())) or 'none'}")
    with reading(manager, step):
        saved = saved_tree(manager, step)
        if isinstance(saved, dict) and set(saved) == {PARAMS}:
            workdir = manager.directory.parent
            raise UserError(f"checkpoint {manager.directory / str(step)} holds params only (an "
                            "imported model), no optimizer state to resume; fine-tune in a new "
                            f"--workdir with --config.init_from={workdir}")
        check_compatible(manager, step, abstract_state, saved)
        return manager.orbax.restore(step, args=ocp.args.StandardRestore(abstract_state))


@contextlib.contextmanager
def read_only(manager: Checkpoints):
    """For modes that only read (eval, sample, predict, export): a damaged step is reported
    with the flag that reads the step before; nothing is moved, a training run does that."""
    try:
        yield
    except DamagedCheckpoint as damaged:
        earlier = [s for s in manager.all_steps() if s < damaged.step]
        hint = (f"; --checkpoint_step={earlier[-1]} reads the step before (predict, export, "
                "export_hf), and the next training run moves the damaged one aside"
                if earlier else "; no earlier step exists")
        raise UserError(f"{damaged}{hint}") from None


def move_aside(manager: Checkpoints, step: int) -> Path:
    """Rename a damaged step folder out of the step listing (never delete it)."""
    source = manager.directory / str(step)
    target = source.with_name(f"{step}.damaged")
    n = 1
    while target.exists():
        n += 1
        target = source.with_name(f"{step}.damaged{n}")
    source.rename(target)
    if manager.opened:
        manager.orbax.reload()
    return target


def restore_or_init(manager: Checkpoints, abstract_state,
                    init: Callable[[], object]) -> tuple[object, bool]:
    """The latest intact checkpoint if there is one, else a fresh state; and which it was.

    A damaged step is moved aside (`STEP.damaged`) with a warning and the one before it is
    tried, down to the oldest. With several processes none moves anything: the run stops
    with the command that moves it, since processes moving folders under each other's reads
    would disagree on the step. If no step is intact the run stops too, rather than start
    over silently; once the damaged ones are aside, a re-run starts from scratch.
    """
    if manager.latest_step() is None:
        return init(), False
    moved = []
    while manager.latest_step() is not None:
        try:
            return restore(manager, abstract_state), True
        except DamagedCheckpoint as damaged:
            if jax.process_count() > 1:
                raise UserError(f"{damaged}; move it aside and re-run to resume from the step "
                                f"before: mv {manager.directory / str(damaged.step)} "
                                f"{manager.directory / str(damaged.step)}.damaged") from None
            moved.append(move_aside(manager, damaged.step))
            earlier = manager.latest_step()
            print(f"warning: {damaged}; moved it to {moved[-1]}"
                  + (f", resuming from step {earlier}" if earlier is not None else ""),
                  file=sys.stderr, flush=True)
    raise UserError(f"no intact checkpoint in {manager.directory}: the damaged ones are moved "
                    f"aside ({', '.join(p.name for p in moved)}); re-run to start over from "
                    "step 0, or put an intact copy back")


def check_compatible(manager: Checkpoints, step: int, abstract_state, saved=None) -> None:
    """Refuse a checkpoint whose paths, shapes or dtypes differ from this run's state
    (`saved`: its metadata tree, when the caller has read it already)."""
    saved = _leaf_specs(saved_tree(manager, step) if saved is None else saved)
    expected = _leaf_specs(abstract_state)
    mismatches = [f"{path}: {_describe(saved.get(path))} in the checkpoint, "
                  f"{_describe(expected.get(path))} in this config"
                  for path in sorted(saved.keys() | expected.keys(),
                                     key=lambda p: (not p.startswith("params"), p))
                  if saved.get(path) != expected.get(path)]
    if not mismatches:
        return
    listed = mismatches[:MAX_LISTED_MISMATCHES]
    if len(mismatches) > len(listed):
        listed.append(f"... and {len(mismatches) - len(listed)} more")
    raise UserError(
        f"checkpoint {Path(manager.directory) / str(step)} does not match this config "
        f"({len(mismatches)} mismatched paths):\n  " + "\n  ".join(listed) +
        "\nRun with the config it was written with (config.json in its workdir), or train "
        "into a new --workdir")


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in flat}


def _path_name(path) -> str:
    """`params/hidden_0/kernel`, whether the path came from dataclass fields, dicts or lists."""
    parts = []
    for key in path:
        for attribute in ("name", "key", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _describe(spec: tuple[tuple[int, ...], str] | None) -> str:
    if spec is None:
        return "absent"
    shape, dtype = spec
    return f"{dtype}[{','.join(map(str, shape))}]"


def restore_params(manager: Checkpoints, step: int, abstract_params) -> Any:
    """Only the `params` subtree of the checkpoint at `step`, in `abstract_params`' shardings.

    The comparison is the training restore's own (`checkpoint.check_compatible`), given the
    checkpoint's other entries as they are saved, so only params can differ and the message
    names exactly the params that do.
    """
    with reading(manager, step):
        return _restore_params(manager, step, abstract_params)


def _restore_params(manager: Checkpoints, step: int, abstract_params) -> Any:
    import orbax.checkpoint as ocp

    saved = saved_tree(manager, step)
    if not isinstance(saved, dict) or PARAMS not in saved:
        raise UserError(f"checkpoint {manager.directory / str(step)} holds no params; train "
                        "into a new --workdir")
    check_compatible(manager, step, {**saved, PARAMS: abstract_params}, saved)
    item = {PARAMS: abstract_params}
    # The training manager reads whole states only; a read-only manager with the PyTree
    # handler (which wrote the arrays under the standard one) skips every other entry.
    reader = ocp.CheckpointManager(manager.directory,
                                   options=ocp.CheckpointManagerOptions(create=False),
                                   item_handlers=ocp.PyTreeCheckpointHandler())
    try:
        restored = reader.restore(step, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))
    finally:
        reader.close()
    return restored[PARAMS]
