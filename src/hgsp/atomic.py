"""Write a file so that a crash or a full disk never leaves it half-written.

Every output the project writes outside a run's temporary folder goes through here: a
temporary name beside the target, then a rename, which replaces an earlier file only once
the new one is complete. Torch-free, so the report and the scripts that run without the
package's dependencies can use it too.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import naming_path


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming_path(path):  # write() errors carry no file name: give them the entry's
            write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
