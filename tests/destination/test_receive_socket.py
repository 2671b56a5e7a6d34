"""`postcopy receive` clears a dead server's socket file before nbdkit binds there, and refuses
a live socket or a file that is no socket, in one line (the probe is nbdsrv's, shared with
`postcopy serve`)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from postcopy.destination.receive import remove_stale_socket
from postcopy.errors import UserError


def test_a_dead_servers_socket_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    remove_stale_socket(path)
    assert not path.exists()
    remove_stale_socket(path)  # nothing there: fine


def test_a_live_socket_and_a_plain_file_are_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(UserError, match="in use by another server"):
            remove_stale_socket(path)
        assert path.exists()
    plain = tmp_path / "plain"
    plain.write_bytes(b"precious")
    with pytest.raises(UserError, match="exists and is not a socket"):
        remove_stale_socket(plain)
    assert plain.read_bytes() == b"precious"
