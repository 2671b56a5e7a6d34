"""One suite for the source interface the engine talks to, run against every kind of source.

The engine reaches its source through an opener yielding a client (`size`, `export_name`,
`pread_into`, `iter_extents`: `postcopy.destination.links.SourceClient`), wrapped in a
`SourceLink`.  Its unit tests use `tests.fakes.FakeSource`; production uses `nbdsrv`'s client
against `postcopy serve`, or against any NBD server.  Each test here runs against:

- `fake`: the FakeSource the engine unit tests use;
- `serve`: nbdsrv's client connected to a real `postcopy serve` of a sparse image file;
- `nbdkit`: nbdsrv's client connected to real nbdkit (`file` plugin on the same image behind the
  `extentlist` filter, which also declares one HOLE-only run: allocated data that the server
  calls "unallocated", as over a backing file; our own server cannot say that).

so that what the fake does is what the real client does: reads at any offset and length, refusals
of requests outside the disk, block status (only ZERO means "reads as zeros"), identity, and the
error a dropped or stopping source gives (what `SourceLink` treats as "reconnect and re-send").
`BlockingSource` (libnbd, the worker threads' path; the engine never uses it with a fake) is
checked against the two real servers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import nbd
import pytest
import trio

import nbdsrv
from nbdsrv.constants import BlockStatusFlag
from nbdsrv.errors import CommandError, ConnectionClosedError, LocalProtocolError, NBDError
from nbdsrv.uri import parse_nbd_uri
from postcopy.destination.links import BlockingSource, SourceLink, SourceMismatch
from tests.fakes import FakeSource
from tests.peers import READY_TIMEOUT, STOP_TIMEOUT, RunningServe, require_tools, running_serve

KiB = 1024
MiB = 1024 * KiB
SIZE = MiB + 12345  # the last 64 KiB chunk is short
EXPORT = "disk"
DATA, HOLE_ONLY = 0, int(BlockStatusFlag.HOLE)
HOLE_ZERO = int(BlockStatusFlag.HOLE | BlockStatusFlag.ZERO)
# (offset, length, flags) of the image: data, a hole, data, data the server may call
# "unallocated" (HOLE only), a hole, and the short tail
LAYOUT = [
    (0, 256 * KiB, DATA),
    (256 * KiB, 256 * KiB, HOLE_ZERO),
    (512 * KiB, 128 * KiB, DATA),
    (640 * KiB, 128 * KiB, HOLE_ONLY),
    (768 * KiB, 256 * KiB, HOLE_ZERO),
    (MiB, 12345, DATA),
]
UNALLOCATED = (640 * KiB, 128 * KiB)
KINDS = ["fake", "serve", "nbdkit"]
REAL_KINDS = ["serve", "nbdkit"]
SLOW_READ_SECONDS = 2.0

Opener = Callable[[], AbstractAsyncContextManager[Any]]


def write_image(path: Path) -> bytes:
    """The sparse image of LAYOUT (holes never written); returns its bytes."""
    data = bytearray(SIZE)
    seed = 0
    with open(path, "wb") as image:
        image.truncate(SIZE)
        for offset, length, flags in LAYOUT:
            if not flags & BlockStatusFlag.ZERO:
                seed += 1
                run = (bytes([seed]) + os.urandom(length))[:length]
                data[offset:offset + length] = run
                image.seek(offset)
                image.write(run)
    return bytes(data)


def merged(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Adjacent runs with the same flags joined (servers may split or join extents freely)."""
    out: list[tuple[int, int, int]] = []
    for offset, length, flags in runs:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((offset, length, flags))
    return out


Runs = list[tuple[int, int, int]]


def clipped(runs: Runs, offset: int, length: int) -> Runs:
    end = offset + length
    return merged(
        [
            (max(o, offset), min(o + n, end) - max(o, offset), f)
            for o, n, f in runs
            if o < end and o + n > offset
        ]
    )


# -- the peers ---------------------------------------------------------------------------------


class Peer:
    """One source of the image: `opener` yields connected clients; `crash()` drops it at once,
    `begin_stop()` asks it to stop as an operator would, `wait_stopped()`, `start()` again."""

    kind: str
    uri: str | None = None  # None for the fake
    flags_of_unallocated: int = HOLE_ONLY

    def __init__(self, image: Path, data: bytes, sockets: Path, slow: bool = False) -> None:
        self.image = image
        self.data = data
        self.sockets = sockets  # a short path: a Unix socket's path has at most 107 bytes
        self.slow = slow  # reads take SLOW_READ_SECONDS (the real peers)

    @property
    def extents(self) -> list[tuple[int, int, int]]:
        """Block status this peer must report for the whole disk."""
        return merged(
            [(o, n, self.flags_of_unallocated if f == HOLE_ONLY else f) for o, n, f in LAYOUT]
        )

    def opener(self) -> AbstractAsyncContextManager[Any]:
        assert self.uri is not None
        return nbdsrv.open_client(self.uri, export_name=EXPORT)

    def start(self) -> None: ...

    def crash(self) -> None: ...

    def begin_stop(self) -> None: ...

    def wait_stopping(self) -> None:
        """Until the stop has taken effect (new connections are refused)."""

    def wait_stopped(self) -> None: ...

    def close(self) -> None: ...

    def hold_reads(self) -> None:
        """(fake) Hold reads until the peer crashes; the real peers are started slow instead."""


class FakePeer(Peer):
    kind = "fake"

    def __init__(self, image: Path, data: bytes, sockets: Path, slow: bool = False) -> None:
        super().__init__(image, data, sockets, slow)
        holes = [(o, n) for o, n, f in LAYOUT if f == HOLE_ZERO]
        self.source = FakeSource(data, holes=holes, unallocated=[UNALLOCATED], export_name=EXPORT)

    def opener(self) -> AbstractAsyncContextManager[Any]:
        return self.source.open_client()

    def start(self) -> None:
        self.source.unreachable = self.source.shutting_down = False

    def crash(self) -> None:
        self.source.unreachable = True

    def begin_stop(self) -> None:
        self.source.shutting_down = True

    def hold_reads(self) -> None:
        self.source.pause()

    def close(self) -> None:
        self.source.resume()


class ServePeer(Peer):
    kind = "serve"
    flags_of_unallocated = DATA  # the file has those bytes: SEEK_DATA finds data

    def __init__(self, image: Path, data: bytes, sockets: Path, slow: bool = False) -> None:
        super().__init__(image, data, sockets, slow)
        self.socket_path = str(sockets / "serve.sock")
        self._stack = contextlib.ExitStack()
        self.serve: RunningServe | None = None
        self.start()

    def start(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self.serve = self._stack.enter_context(
            running_serve(
                f"{EXPORT}={self.image}",
                socket_path=self.socket_path,
                read_delay=SLOW_READ_SECONDS if self.slow else 0.0,
            )
        )
        self.uri = self.serve.export_uri(EXPORT)

    def crash(self) -> None:
        assert self.serve is not None
        self.serve.process.kill()
        self.serve.process.wait(STOP_TIMEOUT)

    def begin_stop(self) -> None:
        assert self.serve is not None
        self.serve.process.send_signal(signal.SIGTERM)

    def wait_stopping(self) -> None:
        self.wait_stopped()  # serve closes its connections and exits

    def wait_stopped(self) -> None:
        assert self.serve is not None
        self.serve.process.wait(STOP_TIMEOUT)

    def close(self) -> None:
        self._stack.close()


class NbdkitPeer(Peer):
    kind = "nbdkit"

    def __init__(self, image: Path, data: bytes, sockets: Path, slow: bool = False) -> None:
        super().__init__(image, data, sockets, slow)
        self.socket_path = str(sockets / "nbdkit.sock")
        self.uri = f"nbd+unix:///{EXPORT}?socket={self.socket_path}"
        self.extent_list = image.parent / "extents"
        self.extent_list.write_text(
            "".join(
                f"{o} {n} {'hole,zero' if f == HOLE_ZERO else 'hole' if f == HOLE_ONLY else ''}\n"
                for o, n, f in LAYOUT
            )
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # nbdkit does not replace a stale socket
        filters = ["--filter=extentlist"]
        params = [f"extentlist={self.extent_list}"]
        if self.slow:
            filters.append("--filter=delay")
            params.append(f"delay-read={round(SLOW_READ_SECONDS * 1000)}ms")
        self.process = subprocess.Popen(
            ["nbdkit", "-f", "-r", "-U", self.socket_path, *filters, "file", str(self.image),
             *params]
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while not os.path.exists(self.socket_path):
            assert self.process.poll() is None, "nbdkit exited before listening"
            assert time.monotonic() < deadline, "nbdkit did not listen in time"
            time.sleep(0.02)

    def crash(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(STOP_TIMEOUT)

    def begin_stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait_stopping(self) -> None:
        """nbdkit stays until its clients leave, but stops accepting: a new connection waits in
        the listen backlog, never greeted (a running nbdkit greets at once)."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(1.0)
                try:
                    probe.connect(self.socket_path)
                    if probe.recv(8) != b"NBDMAGIC":
                        return
                except OSError:
                    return
            time.sleep(0.02)
        raise TimeoutError("nbdkit still greets new clients after SIGTERM")

    def wait_stopped(self) -> None:
        assert self.process is not None
        self.process.wait(STOP_TIMEOUT)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)


PEERS: dict[str, type[Peer]] = {"fake": FakePeer, "serve": ServePeer, "nbdkit": NbdkitPeer}


@contextlib.contextmanager
def started_peer(kind: str, workdir: Path, *, slow: bool = False) -> Iterator[Peer]:
    require_tools("nbdkit")
    image = workdir / "disk.img"
    data = write_image(image)
    with tempfile.TemporaryDirectory(prefix="conformance-") as sockets:
        peer = PEERS[kind](image, data, Path(sockets), slow=slow)
        try:
            yield peer
        finally:
            peer.close()


@pytest.fixture(scope="module", params=KINDS)
def peer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Peer]:
    """A running source, shared by the module's tests that do not break it."""
    with started_peer(request.param, tmp_path_factory.mktemp(request.param)) as running:
        yield running


@pytest.fixture(params=KINDS)
def own_peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Peer]:
    """A source of the test's own, which it may crash or stop."""
    with started_peer(request.param, tmp_path) as running:
        yield running


@pytest.fixture(params=KINDS)
def slow_peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Peer]:
    """A source of the test's own whose reads stay in flight (seconds) until it crashes."""
    with started_peer(request.param, tmp_path, slow=True) as running:
        yield running


@pytest.fixture(scope="module", params=REAL_KINDS)
def real_peer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Peer]:
    with started_peer(request.param, tmp_path_factory.mktemp(request.param)) as running:
        yield running


async def extents_of(client: Any, offset: int, length: int) -> list[tuple[int, int, int]]:
    return [(e.offset, e.length, e.flags) async for e in client.iter_extents(offset, length)]


# -- the client --------------------------------------------------------------------------------

READS = [
    (0, 64 * KiB),  # one aligned chunk
    (12345, 100_000),  # unaligned start and end, across data and a hole
    (300 * KiB, 4096),  # inside a hole: zeros
    (UNALLOCATED[0] + 5, 1000),  # inside the HOLE-only run: its data
    (SIZE - 12345, 12345),  # the short last chunk
    (MiB - 100, 200),  # across into the short last chunk
    (SIZE - 1, 1),  # the last byte
    (0, SIZE),  # the whole disk in one call
]


async def test_identity_is_the_size_and_the_export_name(peer: Peer) -> None:
    async with peer.opener() as client:
        assert client.size == SIZE
        assert client.export_name == EXPORT


@pytest.mark.parametrize(("offset", "length"), READS)
async def test_reads_return_the_disk_bytes(peer: Peer, offset: int, length: int) -> None:
    async with peer.opener() as client:
        buffer = bytearray(b"\xee" * (length + 10))
        await client.pread_into(memoryview(buffer)[5:5 + length], offset)
        assert buffer[5:5 + length] == peer.data[offset:offset + length]
        assert buffer[:5] == buffer[-5:] == b"\xee" * 5  # nothing written outside the view


async def test_a_read_of_zero_bytes_succeeds_even_at_the_end(peer: Peer) -> None:
    async with peer.opener() as client:
        for offset in (0, 4096, SIZE):
            await client.pread_into(bytearray(), offset)


@pytest.mark.parametrize(
    ("offset", "length"), [(SIZE - 5, 10), (SIZE, 1), (SIZE + 4096, 4096), (-1, 4)]
)
async def test_reads_outside_the_disk_are_refused_locally_and_the_client_stays_usable(
    peer: Peer, offset: int, length: int
) -> None:
    """Refused before anything is sent: an API misuse, not a server's errno (CommandError) and
    not a broken connection (ConnectionClosedError)."""
    async with peer.opener() as client:
        with pytest.raises(LocalProtocolError):
            await client.pread_into(bytearray(length), offset)
        assert await client.pread(SIZE - 4, 4) == peer.data[-4:]


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, SIZE), (12345, 777_777), (300 * KiB, 10), (UNALLOCATED[0] + 1, 100), (SIZE - 1, 1)],
)
async def test_block_status_covers_the_range_with_the_disk_flags(
    peer: Peer, offset: int, length: int
) -> None:
    async with peer.opener() as client:
        found = await extents_of(client, offset, length)
    assert found[0][0] == offset and found[-1][0] + found[-1][1] == offset + length
    assert all(a[0] + a[1] == b[0] for a, b in zip(found, found[1:], strict=False))
    assert merged(found) == clipped(peer.extents, offset, length)


async def test_zero_extents_read_as_zeros_and_hole_only_extents_are_data(peer: Peer) -> None:
    """What the engine relies on: only ZERO says "reads as zeros" (it skips those chunks); a
    HOLE without ZERO is data and is copied."""
    async with peer.opener() as client:
        found = await extents_of(client, 0, SIZE)
        for offset, length, flags in found:
            data = await client.pread(offset, length)
            assert data == peer.data[offset:offset + length]
            if flags & BlockStatusFlag.ZERO:
                assert data == bytes(length)
        unallocated = clipped(found, *UNALLOCATED)
    assert unallocated == [(*UNALLOCATED, peer.flags_of_unallocated)]
    assert peer.data[UNALLOCATED[0]:sum(UNALLOCATED)] != bytes(UNALLOCATED[1])


async def test_block_status_of_nothing_or_outside_the_disk_is_refused_locally(peer: Peer) -> None:
    async with peer.opener() as client:
        with pytest.raises(LocalProtocolError):
            await client.block_status(0, 0)
        with pytest.raises(LocalProtocolError):
            await client.block_status(SIZE - 5, 10)
        with pytest.raises(LocalProtocolError):
            await extents_of(client, SIZE - 5, 10)
        assert await extents_of(client, SIZE, 0) == []
        assert await extents_of(client, SIZE - 1, 1) == [(SIZE - 1, 1, DATA)]


async def test_a_closed_client_fails_as_a_closed_connection(peer: Peer) -> None:
    async with peer.opener() as client:
        await client.pread(0, 10)
    with pytest.raises(ConnectionClosedError):
        await client.pread_into(bytearray(10), 0)
    with pytest.raises(ConnectionClosedError):
        await extents_of(client, 0, 4096)


def is_a_broken_connection(error: BaseException) -> bool:
    """What SourceLink reconnects on: not a server's answer, not an API misuse."""
    return isinstance(error, OSError | NBDError | trio.BrokenResourceError) and not isinstance(
        error, CommandError | LocalProtocolError
    )


async def test_requests_after_the_source_crashed_fail_as_a_closed_connection(
    own_peer: Peer,
) -> None:
    async with own_peer.opener() as client:
        assert await client.pread(0, 10) == own_peer.data[:10]
        own_peer.crash()
        with trio.fail_after(10):
            with pytest.raises(ConnectionClosedError):
                await client.pread_into(bytearray(4096), 0)
            with pytest.raises(ConnectionClosedError):
                await extents_of(client, 0, 4096)
    with trio.fail_after(10), pytest.raises(Exception) as caught:
        async with own_peer.opener():
            pass
    assert is_a_broken_connection(caught.value), repr(caught.value)


async def test_a_read_in_flight_when_the_source_crashes_fails_as_a_closed_connection(
    slow_peer: Peer,
) -> None:
    failures: list[BaseException] = []

    async def read(client: Any) -> None:
        try:
            await client.pread_into(bytearray(4096), 8192)
        except Exception as exc:
            failures.append(exc)

    async with slow_peer.opener() as client:
        slow_peer.hold_reads()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, client)
                await trio.sleep(0.3)  # the read is sent and held (seconds) by the source
                slow_peer.crash()
    assert len(failures) == 1 and isinstance(failures[0], ConnectionClosedError), failures


# -- the link ----------------------------------------------------------------------------------


async def test_a_link_reads_and_asks_block_status_like_its_client(peer: Peer) -> None:
    link = SourceLink("conformance", peer.opener, SIZE, request_timeout=10, connect_timeout=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with trio.fail_after(10):
            buffer = bytearray(SIZE - 12345)
            await link.pread_into(buffer, 12345)
            assert buffer == peer.data[12345:]
            found = [(e.offset, e.length, e.flags) for e in await link.extents(0, SIZE)]
        assert merged(found) == peer.extents
        nursery.cancel_scope.cancel()


async def test_a_link_refuses_a_request_outside_the_disk_at_once(peer: Peer) -> None:
    """No connection can make it succeed: raised, not re-sent over reconnects until the
    caller's deadline."""
    link = SourceLink("conformance", peer.opener, SIZE, request_timeout=10, connect_timeout=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with trio.fail_after(5):
            with pytest.raises(LocalProtocolError):
                await link.pread_into(bytearray(10), SIZE - 5)
            with pytest.raises(LocalProtocolError):
                await link.extents(SIZE - 5, 10)
            assert link.connects == 1
        nursery.cancel_scope.cancel()


async def test_a_link_to_a_source_of_another_size_stops_with_a_mismatch(peer: Peer) -> None:
    link = SourceLink("conformance", peer.opener, SIZE + 64 * KiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        with trio.fail_after(10), pytest.raises(SourceMismatch):
            await link.pread_into(bytearray(10), 0)
        nursery.cancel_scope.cancel()


async def test_a_link_re_sends_a_read_across_a_source_restart(own_peer: Peer) -> None:
    """Stopped the way its operator stops it (nbdkit answers ESHUTDOWN until its clients
    leave; `postcopy serve` closes its connections), then started again: the read waits and
    succeeds, and the link let go of the stopping source (nbdkit exits only then)."""
    link = SourceLink("conformance", own_peer.opener, SIZE, request_timeout=10, connect_timeout=10)
    buffer = bytearray(100_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with trio.fail_after(10):
            await link.pread_into(bytearray(10), 0)
        own_peer.begin_stop()
        await trio.to_thread.run_sync(own_peer.wait_stopping)
        read_done = trio.Event()

        async def read() -> None:
            await link.pread_into(buffer, 12345)
            read_done.set()

        nursery.start_soon(read)
        with trio.fail_after(15):
            while link.is_connected:  # bounded by the deadline
                await trio.sleep(0.01)
            await trio.to_thread.run_sync(own_peer.wait_stopped)
            assert not read_done.is_set()
            await trio.to_thread.run_sync(own_peer.start)
            await read_done.wait()
        assert buffer == own_peer.data[12345:12345 + 100_000]
        assert link.connects == 2
        nursery.cancel_scope.cancel()


# -- the blocking source (libnbd, nbdkit's worker threads) ------------------------------------


def blocking_source(peer: Peer, size: int = SIZE) -> BlockingSource:
    assert peer.uri is not None
    return BlockingSource(
        parse_nbd_uri(peer.uri), EXPORT, size, connect_timeout=10, request_timeout=10
    )


def test_a_blocking_source_reads_the_disk_bytes(real_peer: Peer) -> None:
    source = blocking_source(real_peer)
    try:
        for offset, length in READS:
            assert source.pread(length, offset) == real_peer.data[offset:offset + length]
        with pytest.raises(nbd.Error) as caught:  # the engine drops it and uses its link
            source.pread(10, SIZE - 5)
        assert caught.value.errnum == errno.EINVAL
    finally:
        source.close()
    with pytest.raises(ConnectionError):
        source.pread(10, 0)


def test_a_blocking_source_of_another_size_is_a_mismatch(real_peer: Peer) -> None:
    with pytest.raises(SourceMismatch):
        blocking_source(real_peer, SIZE + 64 * KiB)
