"""The source gate file: atomic creation, idempotence, one-line error, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from postcopy.destination.gate import declare_source_frozen, is_source_frozen, source_frozen_path
from postcopy.errors import UserError


def test_declare_source_frozen_creates_gate_file(tmp_path: Path) -> None:
    assert not is_source_frozen(tmp_path)
    declare_source_frozen(tmp_path)
    assert is_source_frozen(tmp_path)
    assert source_frozen_path(tmp_path).read_bytes() == b"frozen\n"
    declare_source_frozen(tmp_path)  # idempotent
    assert is_source_frozen(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["source-frozen"]  # no temp file left behind


def test_declare_source_frozen_missing_dir_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        declare_source_frozen(tmp_path / "nope")


def test_source_frozen_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "postcopy.cli", "source-frozen", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert is_source_frozen(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "postcopy.cli", "source-frozen", "--state-dir", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
