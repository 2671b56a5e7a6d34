"""The kit's child-process helpers: a logged start, a stop that never leaves a child behind, the
wait for a receive's status record."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from postcopy.kit.processes import start_logged, status_record, stop_process, wait_for_status

IGNORES_SIGTERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def _wait_for_text(path: Path, text: str) -> None:
    deadline = time.monotonic() + 15
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, path.read_text(errors="replace")
        time.sleep(0.02)


def test_start_logged_writes_both_streams_to_the_log_in_a_new_session(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_text("stale\n")
    code = "import os, sys; print(os.getsid(0) == os.getpid()); print('err', file=sys.stderr)"
    process = start_logged([sys.executable, "-c", code], log)
    assert process.wait(15) == 0
    assert log.read_text().split() == ["True", "err"]  # truncated first, then both streams


def test_stop_process_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    process = start_logged([sys.executable, "-c", IGNORES_SIGTERM], log)
    try:
        _wait_for_text(log, "ready")
        assert stop_process(process, timeout=0.5) == -9
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_stop_process_of_an_exited_child_returns_its_status(tmp_path: Path) -> None:
    process = start_logged([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "c.log")
    process.wait(15)
    assert stop_process(process) == 3


def test_wait_for_status_returns_the_matching_record_and_fails_when_the_child_exits(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    assert status_record(state) == {}  # none yet
    (state / "status.json").write_text("{half")
    assert status_record(state) == {}  # being replaced
    writer = (
        "import json, sys, time; time.sleep(0.2); "
        "open(sys.argv[1], 'w').write(json.dumps({'state': 'complete'})); time.sleep(60)"
    )
    process = start_logged([sys.executable, "-c", writer, str(state / "status.json")],
                           tmp_path / "w.log")  # fmt: skip
    try:
        record = wait_for_status(process, state, lambda r: r["state"] == "complete", 15)
        assert record == {"state": "complete"}
        with pytest.raises(TimeoutError, match="never matched"):
            wait_for_status(process, state, lambda r: r["state"] == "failed", 0.2)
    finally:
        stop_process(process)
    with pytest.raises(ChildProcessError, match="exited"):
        wait_for_status(process, state, lambda r: r["state"] == "failed", 15)
