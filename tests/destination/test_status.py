"""The status record: atomic replacement, reading, one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postcopy.destination.status import process_alive, read_status, status_path, write_status
from postcopy.errors import UserError


def test_write_then_read_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    record = {"state": "fetching", "size_bytes": 10, "present_bytes": 4, "pid": os.getpid()}
    write_status(tmp_path, record)
    assert read_status(tmp_path) == record
    write_status(tmp_path, {**record, "state": "complete", "present_bytes": 10})
    assert read_status(tmp_path)["state"] == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no status in"),
        (lambda d: status_path(d).write_text("{not json"), "not a valid status record"),
        (lambda d: status_path(d).write_text('{"state": "dancing"}'), "not a valid status"),
    ],
)
def test_unusable_records_are_one_line_user_errors(
    tmp_path: Path, setup: object, message: str
) -> None:
    setup(tmp_path)  # type: ignore[operator]
    with pytest.raises(UserError, match=message) as info:
        read_status(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_state_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_status(tmp_path / "missing")


def test_process_alive() -> None:
    assert process_alive(os.getpid())
    assert not process_alive(0)
    assert not process_alive(2**22 + 12345)  # above pid_max on Linux by default
