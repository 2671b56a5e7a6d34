"""Fixtures of the integration tests: `short_dir`, a directory whose path is short enough for the
Unix sockets of QEMU, QMP and nbdkit (sun_path holds 108 bytes)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh directory under /tmp with a short path, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="pc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
