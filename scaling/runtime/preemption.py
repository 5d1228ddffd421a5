"""Preemption: SIGTERM asks the loop to checkpoint the step it has reached and exit.

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
        self._calls = 0
        self.multiprocess = jax.process_count() > 1
        self._previous = None
        if not self.multiprocess:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
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
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
