"""Reading a child process's output line by line with a deadline (the demo, tests, benchmarks).

`read_line` reads the child's stdout one byte at a time straight from the file descriptor, so no
buffered bytes are left behind for a later reader, and gives up after `timeout` seconds: a child
that hangs can never hang its parent.  It returns what was read (possibly "") when the child
closes its stdout.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from typing import Any


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
