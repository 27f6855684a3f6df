"""The one error policy of every command (`mmpr` and `python -m mmpr_pipeline.card`): an error that
reached the top becomes an exit code and a one-line message, never a traceback. Apart from cli.py so
that a module the CLI imports can use it too without an import cycle."""

from __future__ import annotations

import errno
import os
import sys
import traceback

# Exit codes: a user error (bad input, named in the message), a failure of the environment (disk,
# memory, network, a crashed engine).
USER_ERROR, ENVIRONMENT_ERROR = 2, 1


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message says all a user needs: exit code 2, or the error's own `code`
    (publishing tells a refusal, a login problem and the network apart; a non-finite loss is 1)."""
    from mmpr_pipeline.errors import (
        CardError,
        ExportError,
        NonFiniteLossError,
        PreviewError,
        PublishError,
        RunFolderError,
        TrainInputError,
    )
    from mmpr_pipeline.preflight import PreflightError
    from mmpr_pipeline.recipe import RecipeError
    from mmpr_pipeline.selection import SelectError
    from mmpr_pipeline.sources import SourceError

    return (
        RecipeError,
        SourceError,
        RunFolderError,
        PreflightError,
        ExportError,
        PreviewError,
        SelectError,
        PublishError,
        TrainInputError,
        NonFiniteLossError,
        CardError,
    )


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_HINT = (
    " (the disk is full or a file size limit was hit: free space, then run the same command again)"
)


def _disk_full(e: BaseException) -> bool:
    """Whether `e` or an error behind it is a full disk. Ray re-raises a worker's error wrapped, with
    the original only in its text, so the text is read too."""
    for _ in range(20):
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if any(os.strerror(code) in str(e) for code in _DISK_FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def error_message(e: Exception, debug: str = "mmpr --debug ...") -> tuple[int, str]:
    """(exit code, message) for an exception that reached the top: never a traceback. `debug` is the
    command line that shows the traceback, named in an unexpected error's message."""
    if isinstance(e, _user_errors()):
        return getattr(e, "code", USER_ERROR), str(e)
    hint = _DISK_FULL_HINT if _disk_full(e) else ""
    if hint and "run the same command again" in str(e):  # the build's own message already says so
        hint = " (the disk is full or a file size limit was hit: free space first)"
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        reason = e.strerror or (str(e).strip().splitlines() or [type(e).__name__])[0]
        return ENVIRONMENT_ERROR, where + reason + hint
    if isinstance(e, MemoryError):
        return ENVIRONMENT_ERROR, "out of memory"
    lines = str(e).strip().splitlines()  # a Ray task error carries the remote traceback below its first line
    first = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return ENVIRONMENT_ERROR, f"{first}{hint} (run `{debug}` to see the traceback)"


def debug_requested() -> bool:
    """MMPR_DEBUG=1 (also what `mmpr --debug` defaults to): show an error's traceback."""
    return os.environ.get("MMPR_DEBUG", "") not in ("", "0")


def report(e: Exception, show_traceback: bool, debug: str = "mmpr --debug ...", suffix: str = "") -> int:
    """End a command on `e`: its traceback when asked, then one `error:` line; returns the exit code."""
    if show_traceback:
        traceback.print_exc()
    code, message = error_message(e, debug)
    print(f"error: {message}{suffix}", file=sys.stderr)
    return code
