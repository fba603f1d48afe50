"""Run folders: a unique default name, one writer at a time, never overwritten by accident.

* :func:`new_run_dir` creates ``ROOT/<YYYYmmdd-HHMMSS>`` atomically (``mkdir`` without ``exist_ok``);
  a run started in the same second, by this or another process, gets ``-02``, ``-03``, ... appended.
  The names still sort by start time, so the newest run is the last one.
* :func:`claim_run_dir` is what a training run calls before it writes anything: it takes the folder's
  lock (``.kpt.lock``), refuses a folder that already holds a run unless the run resumes it or the user
  asked to overwrite it (then the old run files are removed first, so no old metrics mix into the new
  ``metrics.jsonl``), and deletes temporary files that killed writers left behind.
* :class:`RunLock` is an advisory ``flock`` on ``.kpt.lock``, which records the holder's pid and host for
  the message a second writer gets. The kernel drops the lock when its process dies, so a lock file left
  by a killed run is taken over (with a warning). Without ``fcntl`` (Windows) the lock file is created
  with ``O_CREAT | O_EXCL`` and one whose pid is gone is taken over.

Only rank 0 of a DDP run calls these (the other ranks never write to the run folder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from datetime import datetime
from pathlib import Path
from types import TracebackType

from kpt.engine.atomic import pid_alive, stale_temp_files
from kpt.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RUN_FILES", "RunDirError", "RunLock", "claim_run_dir", "clean_stale_tmp",
           "new_run_dir", "run_files"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".kpt.lock"
# Files whose presence means "a run was written here" (checkpoint shards are matched by pattern).
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt",
             "weights.safetensors")
# Written by a run but not a sign of one (a start that failed leaves run.log): replaced by a new run.
BYPRODUCTS = ("run.log", "curves.png")
_SHARD = re.compile(r"^(last|best)\.step\d+\.rank\d+\.pt$")


class RunDirError(UserError, FileExistsError):
    """A run folder that holds another run, or that another process is writing to.

    Also a ``FileExistsError`` so that callers catching that (older CLIs) still show one line.
    """


def new_run_dir(parent: str | Path) -> Path:
    """Create and return a new, unique run folder ``PARENT/<YYYYmmdd-HHMMSS>[-NN]``.

    ``mkdir(exist_ok=False)`` is atomic, so two processes starting in the same second never share a
    folder: the loser of the race tries the next suffix.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        # "-02" sorts after the bare stamp and before the next second's stamp: names stay in time order
        path = parent / (stamp if n == 1 else f"{stamp}-{n:02d}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RunDirError(f"{parent}: could not create a new run folder for {stamp} "
                      f"(10000 already exist); pass --out")


def run_files(folder: str | Path) -> list[str]:
    """Names of the run files (``RUN_FILES`` and checkpoint shards) present in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if _is_run_file(p.name))


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or _SHARD.match(name) is not None


def clean_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete temporary files of the run writers left in ``folder`` by processes that are gone.

    Call it while holding the folder's :class:`RunLock`: then no other run writes here, so a temporary
    file without a pid (``weights.safetensors.tmp`` of older writers) or with this process's pid (from
    an earlier run in the same process) is stale too. Files of a pid that still lives on this host are
    left alone, and only temporary copies of run files (``RUN_FILES`` and checkpoint shards) are
    considered. :func:`kpt.engine.atomic.stale_temp_files` finds them.

    Returns:
        The deleted paths.
    """
    removed: list[Path] = []
    for path in stale_temp_files(folder, owned=_is_run_file, lock_held=True):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    if removed:
        logger.info("removed %d stale temporary file(s) of killed writers in %s: %s", len(removed),
                    folder, ", ".join(p.name for p in removed))
    return removed


def _read_holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """Exclusive lock on a run folder (``FOLDER/.kpt.lock``); a context manager.

    Args:
        folder: the run folder (created if missing).

    Raises:
        RunDirError: from :meth:`acquire` when another live process holds the lock; the message names
            its pid and host.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _busy(self, holder: dict) -> RunDirError:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        return RunDirError(f"{self.folder} is in use by another kpt process ({who}; lock file "
                           f"{self.path}): wait for that run to end, or pass another --out")

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": datetime.now().isoformat(timespec="seconds")}).encode() + b"\n"

    def acquire(self) -> RunLock:
        """Take the lock now or raise :class:`RunDirError` (never waits)."""
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows
            return self._acquire_exclusive_create()
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(_read_holder(self._read_text())) from None
            except OSError as exc:  # a file system without flock (some FUSE mounts): run unguarded
                logger.warning("%s: cannot lock (%s); a second run writing to %s would not be "
                               "detected", self.path, exc, self.folder)
            # The previous holder unlinks the file when it releases: if it did so between our open and
            # our flock, we locked a file nobody else will see. Only a lock on the current file counts.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            previous = _read_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            if previous.get("pid") not in (None, os.getpid()):
                logger.warning("%s: taking over the lock of pid %s on host %s, which no longer runs",
                               self.path, previous.get("pid"), previous.get("host", "?"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
            self._fd = fd
            return self
        raise self._busy({})  # pragma: no cover - only under a storm of lock/unlock by others

    def _acquire_exclusive_create(self) -> RunLock:  # pragma: no cover - Windows
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self._read_text())
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
                    logger.warning("%s: taking over the stale lock of pid %s", self.path, pid)
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy(holder) from None
            os.write(fd, self._record())
            self._fd = fd
            return self
        raise self._busy({})

    def _read_text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except OSError:
            return ""

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # unlink while still holding the lock: a waiter that opened the old file sees it is gone
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def claim_run_dir(folder: str | Path, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Make ``folder`` ready for a training run and lock it; call before anything is written there.

    Args:
        folder: the run folder (created if missing).
        resume: the run continues the run in ``folder`` (its files are kept).
        overwrite: replace a run that ``folder`` holds: its run files are deleted first.

    Returns:
        The held :class:`RunLock`; release it when the run ends.

    Raises:
        RunDirError: another process holds the folder's lock (message names its pid), or the folder
            holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    folder = Path(folder)
    if resume and overwrite:
        raise RunDirError(f"{folder}: --resume and --overwrite contradict each other; pass one of them")
    lock = RunLock(folder).acquire()
    try:
        found = run_files(folder)
        if found and not resume:
            if not overwrite:
                hint = f"--resume {folder} to continue it, " if "last.pt" in found else ""
                raise RunDirError(
                    f"{folder} already holds a run ({', '.join(found)}); pass {hint}--overwrite to "
                    f"replace it, or choose another --out")
            for name in found:
                (folder / name).unlink(missing_ok=True)
            logger.warning("--overwrite: removed the previous run's files from %s: %s", folder,
                           ", ".join(found))
        if not resume:  # a new run starts its own console log and curves (a resume appends)
            for name in BYPRODUCTS:
                (folder / name).unlink(missing_ok=True)
        clean_stale_tmp(folder)
    except BaseException:
        lock.release()
        raise
    return lock
