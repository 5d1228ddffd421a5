"""Exceptions that end a run with one message and a documented exit code.

`scaling.main` turns each into a single line on stderr and its exit code (UserError 2,
TrainingDiverged 3, DoesNotFit 4, CheckpointWriteError 74), so every module can stop a run
without printing or exiting itself.
"""


class UserError(Exception):
    """A mistake in flags, config or files that the user can fix; never a bug in scaling."""


class TrainingDiverged(Exception):
    """The loss or gradients stopped being finite and the NaN policy says abort."""


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, permissions); committed ones are intact."""


class DoesNotFit(Exception):
    """Preflight found that the compiled step needs more memory per chip than the chip has."""
