"""`--profile_steps=A:B`: a `jax.profiler` trace of training steps A to B, in WORKDIR/profile.

Steps count from 1, as in metrics.jsonl, and both ends are included. The device runs whole
compiled calls of `steps_per_call` steps, so the trace starts before the call that runs step
A and stops after the call that runs step B, once its results are ready: the window widens to
call boundaries, and may take in an evaluation or a checkpoint save that falls inside it.
The trace is TensorBoard's profile plugin format plus a `perfetto_trace.json.gz` for
ui.perfetto.dev.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from scaling.errors import UserError

FLAG = "--profile_steps"


@dataclasses.dataclass(frozen=True)
class StepWindow:
    first: int
    last: int

    def __str__(self) -> str:
        return f"{FLAG}={self.first}:{self.last}"


def parse_steps(value: str | None, mode: str) -> StepWindow | None:
    """`A:B` (or `A` for one step) to a window, checked before any heavy work."""
    if not value:
        return None
    if mode != "train":
        raise UserError(f"{FLAG}={value}: only --mode=train is profiled")
    first, sep, last = value.partition(":")
    try:
        window = StepWindow(int(first), int(last) if sep else int(first))
    except ValueError:
        raise UserError(f"{FLAG}={value}: expected A:B, the first and last step to trace, "
                        "such as 10:20") from None
    if window.first < 1 or window.last < window.first:
        raise UserError(f"{FLAG}={value}: expected 1 <= A <= B (steps count from 1)")
    return window


class StepTrace:
    """Starts and stops the profiler around the compiled calls that cover the window."""

    def __init__(self, window: StepWindow | None, workdir: Path, total_steps: int):
        if window is not None and window.last > total_steps:
            raise UserError(f"{window}: the run has only {total_steps} steps; choose a "
                            "window inside them")
        import jax  # not at the top: main parses the flag before it imports JAX

        self.jax = jax
        self.window = window
        self.message = print
        self.active = False
        self.start_step = 0
        suffix = f"process_{jax.process_index()}" if jax.process_count() > 1 else ""
        self.directory = Path(workdir) / "profile" / suffix

    def resume(self, step: int, message) -> None:
        """Training starts after `step`; `message` reports what was traced."""
        self.message = message
        if self.window is not None and self.window.last <= step:
            message(f"{self.window}: the run resumed at step {step}, past the window; "
                    "nothing is traced")
            self.window = None

    def before_call(self, step: int, num_steps: int) -> None:
        """`step` is the last completed step; the call will run the next `num_steps`."""
        window = self.window
        if window is None or self.active or step >= window.last:
            return
        if step + num_steps >= window.first:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True
            self.start_step = step + 1

    def after_call(self, step: int, outputs) -> None:
        """Stop once the call reaching the window's end has finished on the device."""
        if self.active and step >= self.window.last:
            self.jax.block_until_ready(outputs)
            self._stop(step)

    def close(self) -> None:
        """The run ended (or failed) with the trace still open: save what it has."""
        if self.active:
            self._stop(None)

    def _stop(self, step: int | None) -> None:
        self.jax.profiler.stop_trace()
        self.active = False
        end = step if step is not None else "(stopped early)"
        self.message(f"profile: steps {self.start_step}..{end} traced to {self.directory}")
        self.window = None
