"""Stop a training run cleanly: Ctrl-C or SIGTERM ends the current step, writes ``last.pt``, then exits.

The first SIGINT/SIGTERM only sets a flag that the training loop reads after each optimizer step
(:class:`StopRequest`); a second SIGINT aborts at once (the default ``KeyboardInterrupt``). The loop
then raises :class:`TrainingInterrupted`, a ``KeyboardInterrupt``, so the CLI exits with status 130.
Handlers can only be installed from the main thread; elsewhere the request simply never fires.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger("kpt.engine")


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving ``last.pt``.

    Attributes:
        checkpoint: the ``last.pt`` written at the stop (resume from it with ``--resume``).
        step: the optimizer steps it holds.
    """

    def __init__(self, message: str, checkpoint: Path, step: int) -> None:
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


class StopRequest:
    """Context manager that turns the first SIGINT / SIGTERM into a flag (``requested``).

    Args:
        enabled: install the handlers (False: a plain flag that only :meth:`request` sets).
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, name: str = "request") -> None:
        """Ask the loop to stop after the current step (what the first signal does)."""
        self.signal_name = self.signal_name or name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            # the user insists: abort now, without the checkpoint (the last saved one stays valid)
            raise KeyboardInterrupt
        self.request(name)
        logger.warning("%s received: finishing the current step, then saving last.pt "
                       "(press Ctrl-C again to abort at once without saving)", name)

    def __enter__(self) -> StopRequest:  # noqa: PYI034
        if self.enabled:
            for name in self.SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
