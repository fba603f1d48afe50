"""Atomic file writes whose temporary files can be recognised and cleaned after a crash.

:func:`atomic_write` writes ``NAME`` through a temporary file ``.NAME.tmp-PID`` in the same folder,
fsync'ed, then renamed over ``NAME`` with ``os.replace`` (atomic on POSIX and Windows): a process killed
while saving leaves the previous file intact. :func:`stale_temp_files` lists the temporary files of
writers that died; a run folder's cleanup (:func:`kpt.engine.run_dir.clean_stale_tmp`) deletes them.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "pid_alive", "stale_temp_files"]

# ``.NAME.tmp-PID`` is what atomic_write makes; older writers left ``NAME.tmp`` and ``NAME.tmp-PID``
# (without the dot), which are recognised only for the destination names a caller says it owns.
_TMP_NAME = re.compile(r"^(?P<dot>\.?)(?P<name>.+?)\.tmp(?:-(?P<pid>\d+))?$")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host (True when that cannot be told)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # the process exists but belongs to another user
        return True
    return True


def stale_temp_files(folder: str | Path, owned: Callable[[str], bool] | None = None,
                     lock_held: bool = False) -> list[Path]:
    """Temporary files in ``folder`` left by writers whose process is gone.

    :func:`atomic_write` names its temporary file ``.NAME.tmp-PID`` (``.last.pt.tmp-4242``,
    ``.weights.safetensors.tmp-4242``); the file is stale when no process PID exists any more. Files of
    live writers are never listed; where liveness cannot be probed (Windows) every PID counts as alive.

    Args:
        folder: a run folder (or any folder :func:`atomic_write` writes into); missing folders give [].
        owned: ``owned(NAME)`` is True for the destination names the caller writes (e.g. a run
            folder's files). When given, only their temporary files are listed, and also in the forms
            older writers left: ``NAME.tmp`` and ``NAME.tmp-PID`` without the leading dot.
        lock_held: the caller holds the folder's lock, so nobody else writes there: a temporary file
            without a PID, or with this process's own (from an earlier run in this process), is stale
            too.

    Returns:
        The stale files, sorted by name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for path in folder.iterdir():
        match = _TMP_NAME.match(path.name)
        if not match or not path.is_file():
            continue
        if owned is None:
            if not (match["dot"] and match["pid"]):  # not a name atomic_write makes
                continue
        elif not owned(match["name"]):
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if pid is None or pid == os.getpid():
            if lock_held:
                stale.append(path)
        elif not pid_alive(pid):
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
