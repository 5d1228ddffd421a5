"""Preemption: SIGTERM asks the loop to checkpoint the step it has reached and exit.

Ctrl-C (SIGINT) does the same on one process, so an interrupted run loses nothing; a second
Ctrl-C stops at once (`KeyboardInterrupt`, reported in one line by `exit_on_error`).

On one process a signal handler sets a flag. With several processes they must agree on the
step to stop at, so JAX's preemption sync point decides (the distributed runtime watches for
SIGTERM itself, as it does on TPU VMs).
"""

from __future__ import annotations

import signal


class PreemptionWatch:
    def __init__(self):
        import jax

        self.requested = False
        self.interrupted = False  # the request came from Ctrl-C
        self._calls = 0
        self.multiprocess = jax.process_count() > 1
        self._previous = {}
        if not self.multiprocess:
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            print("\ninterrupted: saving the step reached (Ctrl-C again stops at once)",
                  flush=True)
        self.requested = True

    def should_stop(self) -> bool:
        """Asked once after every compiled call, by every process."""
        if self.multiprocess:
            from jax.experimental import multihost_utils

            # The sync point agrees on "the largest id any process has reported, plus one",
            # so the ids must advance by one per call; steps advance by steps_per_call.
            self._calls += 1
            return multihost_utils.reached_preemption_sync_point(self._calls)
        return self.requested

    def close(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
