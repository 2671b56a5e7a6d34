"""The kit's child-process helpers: a logged start, a stop that never leaves a child behind."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from postcopy.kit.processes import start_logged, stop_process

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
