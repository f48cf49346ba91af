"""The one exception type that the command line turns into a clean one-line error, and the
translation of a full disk or a refused write into one."""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager

DISK_FULL = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)
# safetensors (Rust) reports "IoError(Os { code: 28, ... })" or "... (os error 28)"
_ERRNO_IN_TEXT = re.compile(r"os error (\d+)|Os \{ code: (\d+)")


class UserError(Exception):
    """Bad input or a missing resource: the message names the problem and the fix.

    The CLI prints ``error: <message>`` and exits with code 2; nothing else is shown,
    because a traceback would bury the one line the user needs.
    """


def error_number(exc: BaseException) -> int | None:
    """The errno of an OSError, or of a library error that carries it only in its text."""
    if isinstance(exc, OSError):
        return exc.errno
    match = _ERRNO_IN_TEXT.search(str(exc))
    return int(match.group(1) or match.group(2)) if match else None


@contextmanager
def naming_path(path):
    """Re-raise a failed write as an OSError that names ``path`` and keeps its errno.

    ``file.write()`` errors carry no file name and safetensors raises its own type, so
    without this the one-line message could not say which file or disk is the problem.
    """
    try:
        yield
    except Exception as exc:
        code = error_number(exc)
        if code is None or (isinstance(exc, OSError) and exc.filename):
            raise
        raise OSError(code, os.strerror(code), str(path)) from exc


def write_failure(exc: BaseException, path=None, flag: str | None = None) -> UserError | None:
    """A one-line UserError for a full disk or a refused write, or None for any other error.

    Args:
        path: the file or folder to name (default: the error's own file name).
        flag: the option that chooses another place to write, e.g. ``--results_dir``.
    """
    code = error_number(exc)
    path = path or getattr(exc, "filename", None)
    if code in DISK_FULL:
        fix = f" or use {flag} on another disk" if flag else ""
        where = f" while writing '{path}'" if path else ""
        return UserError(f"{DISK_FULL[code]}{where}: free space{fix}")
    if code in NOT_PERMITTED:
        fix = f" or use another {flag}" if flag else ""
        where = f" for '{path}'" if path else ""
        reason = os.strerror(code).lower()  # "permission denied", "read-only file system"
        return UserError(f"{reason}{where}: check its permissions{fix}")
    return None
