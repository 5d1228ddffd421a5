"""The one exception type that means "the user asked for something impossible".

`scaling.main` turns it into a single line on stderr and exit code 2, so every module can
reject bad input without printing or exiting itself.
"""


class UserError(Exception):
    """A mistake in flags, config or files that the user can fix; never a bug in scaling."""


class TrainingDiverged(Exception):
    """The loss or gradients stopped being finite and the NaN policy says abort."""
