"""The pivot of one disk on Host B: the running domain leaves the NBD disk for the local file.

`pivot_disk_of_state_dir` is what `postcopy pivot` and the pivot step of `postcopy migrate` do,
in this order, each step only when the previous one succeeded:
1. the disk is `complete` (its status record says so) and not pivoted already; otherwise a
   one-line error and nothing changes;
2. QEMU switches the disk's format node from the nbd node on this disk's receive socket to a
   file node on the local file (`integrations.qemu_pivot.pivot_disk`: it finds the disk by what
   it is, and refuses with one line, changing nothing, a disk it does not recognise);
3. the receive stops (SIGTERM to `postcopy receive`, then to any nbdkit still holding the state
   directory: it exits once QEMU has closed its connection), and its socket is removed;
4. the state directory is marked pivoted (`destination.pivoted`): no receive will serve it again.

The receive's socket, when not given, is read from its nbdkit's command line (`-U PATH`), found
through the state directory's lock holders.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from postcopy.destination.pivoted import is_pivoted, mark_pivoted
from postcopy.destination.receive import remove_stale_socket
from postcopy.destination.statelock import state_lock_path
from postcopy.destination.status import read_status
from postcopy.errors import PostcopyError, UserError
from postcopy.integrations.qmp import QMPClient
from postcopy.migrate.processes import process_running, stop_process
from postcopy.policy import NbdEndpoint


def lock_holders(state_dir: Path) -> list[tuple[int, str]]:
    """The live processes the state directory's lock file names: (pid, role)."""
    try:
        lines = state_lock_path(Path(state_dir)).read_text().splitlines()
    except OSError:
        return []
    holders = []
    for line in lines:
        pid_text, _, role = line.partition(" ")
        if pid_text.isdigit() and process_running(int(pid_text)):
            holders.append((int(pid_text), role.strip()))
    return holders


def receive_socket(state_dir: Path) -> Path | None:
    """The Unix socket the disk's nbdkit serves on (from its command line), if it runs."""
    for pid, role in lock_holders(state_dir):
        if role != "nbdkit":
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for option, value in zip(argv, argv[1:], strict=False):
            if option in (b"-U", b"--unix"):
                return Path(value.decode(errors="surrogateescape"))
    return None


async def pivot_disk_of_state_dir(
    client: QMPClient,
    state_dir: Path,
    *,
    socket: Path | None = None,
    dest: Path | None = None,
    command_line: list[str] | None = None,
    receive: subprocess.Popen[bytes] | None = None,
) -> dict[str, Any]:
    """Pivot the disk of `state_dir` in the QEMU behind `client` (see the module docstring)."""
    from postcopy.integrations.qemu_pivot import pivot_disk

    state_dir = Path(state_dir)
    if is_pivoted(state_dir):
        return {"already": True}
    status = read_status(state_dir)
    if status.get("state") != "complete":
        raise UserError(
            f"the disk of {state_dir} is {status.get('state')}, not complete: it cannot be "
            "pivoted before every chunk is on B"
        )
    dest = Path(dest or status.get("dest") or "")
    socket = socket or receive_socket(state_dir)
    if socket is None:
        raise UserError(f"no receive serves {state_dir}: its socket is unknown (give --socket)")
    try:
        result = await pivot_disk(
            client, NbdEndpoint("", socket=Path(socket)), dest, command_line=command_line
        )
    except PostcopyError as exc:
        raise UserError(str(exc)) from None
    if receive is not None:
        stop_process(receive.pid, receive)
    for pid, _role in lock_holders(state_dir):  # receive, then nbdkit once QEMU let go
        stop_process(pid)
    remove_stale_socket(Path(socket))  # nbdkit leaves its socket behind
    mark_pivoted(state_dir, dest, f"QEMU node {result.format_node} on file node {result.file_node}")
    return {"node": result.format_node, "file_node": result.file_node,
            "reopen_seconds": result.reopen_seconds}  # fmt: skip
