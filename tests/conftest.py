"""Fixtures shared by the test files."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def kpt_log(caplog):
    """caplog that also sees the ``kpt`` logger (the CLI's configure_logging stops propagation)."""
    root = logging.getLogger("kpt")
    root.addHandler(caplog.handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield caplog
    root.removeHandler(caplog.handler)
    root.setLevel(level)
