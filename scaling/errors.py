"""Exceptions that end a run with one message and a documented exit code.

`exit_on_error` turns each into a single line on stderr and its exit code (UserError 2,
TrainingDiverged 3, DoesNotFit 4, CheckpointWriteError and any other OSError 74, Preempted
75, Interrupted and Ctrl-C 130), so every module can stop a run without printing or exiting itself.
"""

import os
import sys


class UserError(Exception):
    """A mistake in flags, config or files that the user can fix; never a bug in scaling."""


class TrainingDiverged(Exception):
    """The loss or gradients stopped being finite and the NaN policy says abort."""


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, permissions); committed ones are intact."""


class DoesNotFit(Exception):
    """Preflight found that the compiled step needs more memory per chip than the chip has."""


class Preempted(Exception):
    """Raised once the preemption checkpoint is committed; a re-run resumes from it."""


class Interrupted(Preempted):
    """Ctrl-C in training: the step reached is saved, as for a preemption; a re-run resumes."""


EXIT_CODES = {
    Interrupted: 130,          # 128 + SIGINT, as a shell reports Ctrl-C
    UserError: 2,
    TrainingDiverged: 3,
    DoesNotFit: 4,
    CheckpointWriteError: 74,  # EX_IOERR
    Preempted: 75,             # EX_TEMPFAIL: try again later
}
EXIT_USER_ERROR = EXIT_CODES[UserError]
EXIT_PREEMPTED = EXIT_CODES[Preempted]


def exit_on_error(fn, *args) -> None:
    """Run `fn(*args)`; an error above ends the process with one `error:` line and its code.

    The one place where exceptions become exit codes, for every entry point.
    """
    try:
        fn(*args)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop's own handling
        print("error: interrupted (Ctrl-C); nothing was saved since the last checkpoint",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_CODES[Interrupted])
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _exit_now(EXIT_CODES[CheckpointWriteError])
    except tuple(EXIT_CODES) as e:
        if not isinstance(e, Preempted):  # its message was printed when it saved
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(next(code for kind, code in EXIT_CODES.items() if isinstance(e, kind)))
    except OSError as e:  # a file the run writes (or reads) failed under it: disk, permissions
        where = e.filename or "a file of the run"
        print(f"error: {where}: {e.strerror or e}; fix the disk or the directory, then re-run "
              "the same command (committed checkpoints are intact)", file=sys.stderr,
              flush=True)
        _exit_now(EXIT_CODES[CheckpointWriteError])


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown. After a failed write, the checkpoint
    library's writer threads still hold the failure: joining them at exit can wait, and each
    prints a traceback of its own once the event loop it reports to is closed. Committed
    checkpoints are intact and a staged one is removed at the next start, so nothing is
    lost by skipping it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
