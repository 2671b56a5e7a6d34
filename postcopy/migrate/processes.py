"""Processes `postcopy migrate` starts on either host and finds again later by pid.

The receives, B's QEMU and A's serve run in their own sessions and outlive the command that
started them (so a detached migration goes on); a resumed migration knows them by pid only.
`process_running` treats a zombie as gone; `stop_process` sends SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

STOP_SECONDS = 10.0


def process_running(pid: int | None, child: subprocess.Popen[bytes] | None = None) -> bool:
    """Is `pid` alive (not a zombie)?  Our own children are reaped first."""
    if not pid:
        return False
    if child is not None and child.poll() is not None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_process(pid: int | None, child: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM, then SIGKILL after STOP_SECONDS; waits until it is gone."""
    if not process_running(pid, child):
        return
    assert pid is not None
    for signum, wait in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while process_running(pid, child) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not process_running(pid, child):
            return
