"""Atomic file replacement, shared by ``ReferenceClass.save`` and the run store.

``atomic_write(path, write)`` calls ``write(fh)`` on a temporary file in the same
folder (a unique ``.<name>.<random>.tmp``, so concurrent writers never share one),
fsyncs it, ``os.replace``s it over ``path`` and fsyncs the folder. A crash at any point
leaves either the old file or the new one, never a torn one; a failed write removes
its temporary file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where folders can't be opened)."""
    if os.name != "posix":  # pragma: no cover
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable) -> None:
    """Replace ``path`` atomically with what ``write(fh)`` writes (see the module doc)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
