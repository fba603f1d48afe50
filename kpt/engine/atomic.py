"""Atomic file writes whose temporary files can be recognised and cleaned after a crash.

:func:`atomic_write` writes ``NAME`` through a temporary file ``.NAME.tmp-PID`` in the same folder,
fsync'ed, then renamed over ``NAME`` with ``os.replace`` (atomic on POSIX and Windows): a process killed
while saving leaves the previous file intact. :func:`stale_temp_files` lists the temporary files of
writers that died, for a run folder's cleanup.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "stale_temp_files"]

_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # the process exists but belongs to another user
        return True
    return True


def stale_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files in ``folder`` left by :func:`atomic_write` calls whose process is gone.

    A writer names its temporary file ``.NAME.tmp-PID`` (``.last.pt.tmp-4242``,
    ``.weights.safetensors.tmp-4242``); the file is stale when no process PID exists any more. Files of
    live writers are never listed. Run-folder cleanup deletes what this returns. On systems without a
    POSIX liveness probe (Windows) nothing is listed.

    Args:
        folder: a run folder (or any folder :func:`atomic_write` writes into); missing folders give [].

    Returns:
        The stale files, sorted by name.
    """
    folder = Path(folder)
    if os.name != "posix" or not folder.is_dir():
        return []
    stale = []
    for path in folder.iterdir():
        match = _TMP_NAME.match(path.name)
        if match and path.is_file() and not _pid_alive(int(match["pid"])):
            stale.append(path)
    return sorted(stale)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened on some systems (Windows)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then rename it over ``path``.

    The temporary file is ``.NAME.tmp-PID`` (see :func:`stale_temp_files`); stale ones of the same
    ``NAME`` are deleted first. Data and folder entry are fsync'ed before the function returns.

    Args:
        path: destination.
        write: writes the whole content to the open file object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_files(path.parent):
        if _TMP_NAME.match(stale.name)["name"] == path.name:
            stale.unlink(missing_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path
