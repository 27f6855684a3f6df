"""Environment variables set for a while: what a child process or a library reads, put back after."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def env_var(name: str, value: str):
    """`name` = `value` in this process's environment inside the block; afterwards as it was before
    (unset again if it was unset), so nothing started later inherits it."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
