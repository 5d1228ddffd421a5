"""Orbax checkpoints of the train state: asynchronous saves, keep-last-K, restore-or-init.

A restore is driven by the abstract state of the current run (shapes, dtypes and target
shardings), so a checkpoint written on one mesh restores directly onto another.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, state, *, force: bool = False) -> None:
    """Start an asynchronous save; it returns once the arrays are safe to donate."""
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    step = manager.latest_step() if step is None else step
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_or_init(manager: ocp.CheckpointManager, abstract_state,
                    init: Callable[[], object]) -> tuple[object, bool]:
    """The latest committed checkpoint if there is one, else a fresh state; and which it was."""
    if manager.latest_step() is None:
        return init(), False
    return restore(manager, abstract_state), True
