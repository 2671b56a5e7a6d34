"""Restarting `postcopy receive` on a complete disk never touches the source.

A disk is received to completion once (module fixture); each test restarts a copy of that
destination and state directory with a `--source` that can no longer help: a unix socket path that
is gone, a TCP port nobody listens on, a listener that never answers the handshake (a source that
drops packets: a probe would wait its full timeout), and a real `postcopy serve` at the old address
serving another export (another size) or other data of the same size.  Each restart must serve,
and serve the local bytes (compared with the original image); the silent listeners must never have
seen a connection.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.destination.test_receive import connect, running_receive
from tests.peers import running_serve, sparse_test_image

MiB = 1024 * 1024
SIZE = 8 * MiB
SOURCE_ID = "restart-test-disk"


@dataclass
class CompletedDisk:
    workdir: Path  # holds dest.img and state/
    image: Path  # what the source served
    uri: str  # the source's URI, a unix socket that is gone now
    socket_path: Path


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory) -> CompletedDisk:
    workdir = tmp_path_factory.mktemp("completed")
    image = workdir / "source.img"
    sparse_test_image(image, SIZE, seed=91, data_fraction=0.6)
    socket_path = workdir / "source.sock"
    with running_serve(f"disk={image}", socket_path=str(socket_path)) as serve:
        uri = serve.export_uri("disk")
        with running_receive(uri, workdir, "--source-id", SOURCE_ID) as receiver:
            receiver.wait_complete(timeout=60)
    socket_path.unlink(missing_ok=True)
    return CompletedDisk(workdir, image, uri, socket_path)


def copy_of(completed: CompletedDisk, tmp_path: Path) -> None:
    shutil.copyfile(completed.workdir / "dest.img", tmp_path / "dest.img")
    # without the first run's status record: a restart is judged by the record it writes itself
    shutil.copytree(
        completed.workdir / "state",
        tmp_path / "state",
        ignore=shutil.ignore_patterns("status.json"),
    )


@contextlib.contextmanager
def silent_listener(family: socket.AddressFamily, address: str | tuple[str, int]) -> Iterator[
    socket.socket
]:
    """A socket that listens (the kernel completes connections into its backlog) and never
    accepts, so an NBD client waits for a greeting that never comes."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind(address)
        listener.listen(8)
        yield listener
    finally:
        listener.close()


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_restart_serves_local_bytes(completed: CompletedDisk, tmp_path: Path, uri: str) -> None:
    with running_receive(uri, tmp_path, "--source-id", SOURCE_ID) as receiver:
        record = receiver.wait_complete(timeout=30)
        handle = connect(receiver.uri)
        assert handle.get_size() == SIZE
        with open(completed.image, "rb") as original:
            for offset in range(0, SIZE, MiB):
                assert handle.pread(MiB, offset) == original.read(MiB), f"differs at {offset}"
        handle.shutdown()
    assert record["transferred_bytes"] == 0, record
    assert receiver.process.returncode == 0, receiver.log()


def assert_never_connected(listener: socket.socket) -> None:
    pending, _, _ = select.select([listener], [], [], 0)
    assert pending == [], "the restart of a complete disk connected to its source"


@pytest.mark.timeout(90)
def test_complete_disk_restarts_when_its_unix_socket_is_gone(
    completed: CompletedDisk, tmp_path: Path
) -> None:
    copy_of(completed, tmp_path)
    assert not completed.socket_path.exists()
    assert_restart_serves_local_bytes(completed, tmp_path, completed.uri)


@pytest.mark.timeout(90)
def test_complete_disk_restarts_when_nobody_listens_on_its_tcp_port(
    completed: CompletedDisk, tmp_path: Path
) -> None:
    copy_of(completed, tmp_path)
    uri = f"nbd://127.0.0.1:{free_tcp_port()}/disk"
    assert_restart_serves_local_bytes(completed, tmp_path, uri)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_complete_disk_restarts_without_waiting_for_a_source_that_never_answers(
    completed: CompletedDisk, tmp_path: Path, transport: str
) -> None:
    copy_of(completed, tmp_path)
    if transport == "unix":
        listening = silent_listener(socket.AF_UNIX, str(completed.socket_path))
    else:
        listening = silent_listener(socket.AF_INET, ("127.0.0.1", 0))
    with listening as listener:
        if transport == "unix":
            uri = completed.uri
        else:
            uri = f"nbd://127.0.0.1:{listener.getsockname()[1]}/disk"
        try:
            assert_restart_serves_local_bytes(completed, tmp_path, uri)
            assert_never_connected(listener)
        finally:
            if transport == "unix":
                completed.socket_path.unlink(missing_ok=True)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("other_size", [SIZE // 2, SIZE], ids=["another-export", "other-data"])
def test_complete_disk_restarts_while_its_old_address_serves_something_else(
    completed: CompletedDisk, tmp_path: Path, other_size: int
) -> None:
    copy_of(completed, tmp_path)
    other = tmp_path / "other.img"
    sparse_test_image(other, other_size, seed=92, data_fraction=1.0)
    with running_serve(f"disk={other}", socket_path=str(completed.socket_path)) as serve:
        assert serve.export_uri("disk") == completed.uri
        assert_restart_serves_local_bytes(completed, tmp_path, completed.uri)
    completed.socket_path.unlink(missing_ok=True)
