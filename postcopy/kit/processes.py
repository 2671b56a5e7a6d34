"""Children of the demo, the kit, tests and benchmarks: start one with a log, stop it for sure,
read its output line by line with a deadline.

`start_logged` starts a command in a session of its own (a Ctrl-C on the terminal reaches only
the caller, which stops its children on the way out) with stdin from /dev/null and stdout and
stderr into one log file.  `stop_process` sends SIGTERM, waits, then SIGKILLs and reaps: a child
that ignores SIGTERM is never left behind.  `status_record` and `wait_for_status` read the status
record a running `postcopy receive` keeps in its state directory (`{}` while there is none).

`read_line` reads the child's stdout one byte at a time straight from the file descriptor, so no
buffered bytes are left behind for a later reader, and gives up after `timeout` seconds: a child
that hangs can never hang its parent.  It returns what was read (possibly "") when the child
closes its stdout.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def start_logged(command: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start `command` in its own session, stdin from /dev/null, stdout and stderr written to
    `log` (truncated first)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )


def stop_process(
    process: subprocess.Popen[Any],
    *,
    timeout: float = 10.0,
    kill_timeout: float = 5.0,
    sig: int = signal.SIGTERM,
) -> int:
    """Send `sig` (SIGTERM) to a running `process`, wait up to `timeout` seconds for it to exit,
    then SIGKILL it and reap it (within `kill_timeout`); returns its exit status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=kill_timeout)
    return process.returncode


def read_line(process: subprocess.Popen[Any], timeout: float) -> str:
    """The next line of `process`'s stdout, stripped; TimeoutError after `timeout` seconds."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no line in {timeout:g} s (got {data!r})")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            byte = os.read(fd, 1)
            if not byte:
                break
            data += byte
    return data.decode(errors="replace").strip()


def status_record(state_dir: Path) -> dict[str, Any]:
    """The status record of the receive using `state_dir`; {} when there is none (yet) or it is
    being replaced."""
    try:
        return dict(json.loads((Path(state_dir) / "status.json").read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def wait_for_status(
    process: subprocess.Popen[Any],
    state_dir: Path,
    condition: Callable[[dict[str, Any]], bool],
    timeout: float,
    *,
    poll_seconds: float = 0.05,
    describe: Callable[[], str] = lambda: "",
) -> dict[str, Any]:
    """Poll the status record of `process` (a receive using `state_dir`) until `condition`
    holds; returns that record.  ChildProcessError when the process exits first, TimeoutError
    after `timeout` seconds; both say what `describe()` returns (a log's tail, say)."""
    deadline = time.monotonic() + timeout
    while True:
        record = status_record(state_dir)
        if record and condition(record):
            return record
        if process.poll() is not None:
            raise ChildProcessError(f"receive exited with {process.returncode}: {describe()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"status never matched; last {record}; {describe()}")
        time.sleep(poll_seconds)
