"""The trio server in-process, over trio memory streams, with a fake in-memory backend: requests
run concurrently and are answered out of order, in-flight requests are bounded, backend errors
become NBD errors and a broken backend never takes the server down."""

from __future__ import annotations

import errno
import threading
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from nbdsrv import constants as k
from nbdsrv import wire
from nbdsrv.backend import FileBackend
from nbdsrv.extent import Extent
from nbdsrv.server import Export, Server, serve_nbd
from tests.delayed_serve import DelayingBackend

SIZE = 1 << 20


class GatedMemoryBackend:
    """An in-memory disk whose reads at offsets in `gated` wait until `release()` is called."""

    def __init__(self, size: int = SIZE) -> None:
        self.data = bytearray(bytes(range(256)) * (size // 256))
        self.gated: set[int] = set()
        self.failing: dict[int, BaseException] = {}
        self.gate = threading.Event()
        self.reads_started = 0
        self.max_reads_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    size = property(lambda self: len(self.data))
    read_only = property(lambda self: False)
    can_multi_conn = property(lambda self: True)

    def release(self) -> None:
        self.gate.set()

    def read_into(self, offset: int, buffer: memoryview) -> None:
        with self._lock:
            self.reads_started += 1
            self._in_flight += 1
            self.max_reads_in_flight = max(self.max_reads_in_flight, self._in_flight)
        try:
            if offset in self.failing:
                raise self.failing[offset]
            if offset in self.gated:
                assert self.gate.wait(10), "gate never released"
            buffer[:] = self.data[offset : offset + len(buffer)]
        finally:
            with self._lock:
                self._in_flight -= 1

    def read_cached(self, offset: int, buffer: memoryview) -> int:
        return 0  # always go through read_into, in a worker thread

    def sendfile_source(self, offset: int, length: int) -> int | None:
        return None  # no file: replies are read into buffers

    def extents(self, offset: int, length: int, limit: int = 1024) -> list[Extent]:
        return [Extent(offset, min(length, self.size - offset), 0)]

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if offset in self.failing:
            raise self.failing[offset]
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        pass

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        pass

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool = False
    ) -> None:
        self.data[offset : offset + length] = bytes(length)

    def cache(self, offset: int, length: int) -> None:
        pass

    def close(self) -> None:
        pass


class RawClient:
    """Bytes-level NBD client over a trio stream (simple replies: EXPORT_NAME handshake)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def recv_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"closed with {len(self.buffer)} of {size} bytes")
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def handshake(self) -> None:
        await self.recv_exact(wire.SERVER_GREETING_SIZE)
        flags = k.ClientFlag.FIXED_NEWSTYLE | k.ClientFlag.NO_ZEROES
        await self.stream.send_all(
            wire.build_client_flags(flags) + wire.build_option(k.Option.EXPORT_NAME, b"")
        )
        await self.recv_exact(wire.EXPORT_NAME_REPLY_SIZE)

    async def send(self, command: int, offset: int, length: int, cookie: int,
                   payload: bytes = b"") -> None:
        header = wire.build_request_header(wire.Request(0, command, cookie, offset, length))
        await self.stream.send_all(header + payload)

    async def reply(self, read_lengths: dict[int, int]) -> tuple[int, int, bytes]:
        """(cookie, error, data) of the next simple reply; `read_lengths` maps READ cookies
        to their lengths so that the data can be framed."""
        reply = wire.parse_simple_reply(await self.recv_exact(wire.SIMPLE_REPLY_SIZE))
        data = b""
        if reply.error == 0 and reply.cookie in read_lengths:
            data = await self.recv_exact(read_lengths[reply.cookie])
        return reply.cookie, reply.error, data


@pytest.fixture
async def backend() -> AsyncIterator[GatedMemoryBackend]:
    fake = GatedMemoryBackend()
    yield fake
    fake.release()  # never leave a worker thread waiting


async def connected(
    nursery: trio.Nursery, server: Server
) -> RawClient:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_stream, server_stream, "test-client")
    client = RawClient(client_stream)
    await client.handshake()
    return client


async def test_replies_go_out_of_order_when_an_early_read_is_slow(
    backend: GatedMemoryBackend,
) -> None:
    backend.gated.add(0)
    server = Server([Export("", backend)])
    async with trio.open_nursery() as nursery:
        client = await connected(nursery, server)
        await client.send(k.Command.READ, 0, 4096, cookie=1)  # held at the gate
        await client.send(k.Command.READ, 8192, 4096, cookie=2)
        lengths = {1: 4096, 2: 4096}
        with trio.fail_after(10):
            cookie, error, data = await client.reply(lengths)
        assert (cookie, error) == (2, 0) and data == bytes(backend.data[8192:12288])
        backend.release()
        with trio.fail_after(10):
            cookie, error, data = await client.reply(lengths)
        assert (cookie, error) == (1, 0) and data == bytes(backend.data[:4096])
        nursery.cancel_scope.cancel()


async def test_requests_in_flight_are_bounded(backend: GatedMemoryBackend) -> None:
    backend.gated.update(range(0, 8 * 4096, 4096))
    server = Server([Export("", backend)], max_in_flight=3)
    async with trio.open_nursery() as nursery:
        client = await connected(nursery, server)
        for cookie in range(8):
            await client.send(k.Command.READ, cookie * 4096, 4096, cookie=cookie)
        with trio.fail_after(10):
            while backend.reads_started < 3:
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # time for more to start, if the bound did not hold
        assert backend.reads_started == 3
        backend.release()
        lengths = dict.fromkeys(range(8), 4096)
        with trio.fail_after(10):
            replies = [await client.reply(lengths) for _ in range(8)]
        assert sorted(cookie for cookie, _, _ in replies) == list(range(8))
        assert all(error == 0 for _, error, _ in replies)
        assert backend.max_reads_in_flight <= 3
        nursery.cancel_scope.cancel()


async def test_backend_errors_become_nbd_errors_and_the_connection_goes_on(
    backend: GatedMemoryBackend,
) -> None:
    backend.failing[0] = OSError(errno.EIO, "disk on fire")
    backend.failing[4096] = OSError(errno.EDQUOT, "quota")
    backend.failing[8192] = RuntimeError("a bug in the backend")
    server = Server([Export("", backend)])
    async with trio.open_nursery() as nursery:
        client = await connected(nursery, server)
        lengths = {4: 512}
        with trio.fail_after(10):
            await client.send(k.Command.READ, 0, 512, cookie=1)
            assert await client.reply({}) == (1, errno.EIO, b"")
            await client.send(k.Command.WRITE, 4096, 4, cookie=2, payload=b"abcd")
            assert await client.reply({}) == (2, errno.ENOSPC, b"")  # EDQUOT maps to ENOSPC
            await client.send(k.Command.READ, 8192, 512, cookie=3)
            assert await client.reply({}) == (3, errno.EIO, b"")
            await client.send(k.Command.READ, 512, 512, cookie=4)
            assert await client.reply(lengths) == (4, 0, bytes(backend.data[512:1024]))
        nursery.cancel_scope.cancel()


async def test_disc_waits_for_requests_in_flight(backend: GatedMemoryBackend) -> None:
    backend.gated.add(0)
    server = Server([Export("", backend)])
    async with trio.open_nursery() as nursery:
        client = await connected(nursery, server)
        await client.send(k.Command.READ, 0, 1024, cookie=1)
        await client.send(k.Command.DISC, 0, 0, cookie=2)
        await trio.sleep(0.1)
        backend.release()
        with trio.fail_after(10):
            assert await client.reply({1: 1024}) == (1, 0, bytes(backend.data[:1024]))
            assert await client.stream.receive_some(1) == b""  # then the server closes
    assert server.statistics().connections_open == 0


async def test_a_delaying_backend_holds_reads_in_flight(tmp_path: Path) -> None:
    """tests.delayed_serve's DelayingBackend (what `running_serve(read_delay=...)` serves) holds
    each read in its worker thread, through the real server."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"d" * 65536)
    with FileBackend(path) as backend:
        delayed = DelayingBackend(backend, 0.3)
        server = Server([Export("", delayed)])
        async with trio.open_nursery() as nursery:
            client = await connected(nursery, server)
            start = trio.current_time()
            await client.send(k.Command.READ, 0, 512, cookie=1)
            with trio.fail_after(10):
                assert await client.reply({1: 512}) == (1, 0, b"d" * 512)
            assert trio.current_time() - start >= 0.3
            nursery.cancel_scope.cancel()


async def test_tcp_connections_get_tcp_nodelay(backend: GatedMemoryBackend) -> None:
    seen: list[int] = []

    class RecordingServer(Server):
        async def handle_stream(self, stream: trio.abc.Stream, peer: str = "client") -> None:
            sock = stream.socket  # type: ignore[attr-defined]
            seen.append(sock.getsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY))
            await super().handle_stream(stream, peer)

    server = RecordingServer([Export("", backend)])
    async with trio.open_nursery() as nursery:
        serving = await nursery.start(
            partial(serve_nbd, [], listen=("127.0.0.1", 0), server=server)
        )
        host, port = serving.uris[0].removeprefix("nbd://").rstrip("/").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        client = RawClient(stream)
        with trio.fail_after(10):
            await client.handshake()
        assert seen == [1]
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_silent_client_is_dropped_after_the_handshake_timeout(
    backend: GatedMemoryBackend, autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Server([Export("", backend)], handshake_timeout=5)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_stream, "slow-client")
        client = RawClient(client_stream)
        await client.recv_exact(wire.SERVER_GREETING_SIZE)  # then say nothing
        with trio.fail_after(60):
            assert await client_stream.receive_some(1) == b""
        assert trio.current_time() >= 5
    assert server.statistics().connections_failed == 1
    assert [r.message for r in caplog.records if r.name == "nbdsrv.server"] == [
        "slow-client: handshake not finished in 5 s, closing"
    ]


async def test_shutdown_answers_requests_in_flight_then_closes(
    backend: GatedMemoryBackend,
) -> None:
    backend.gated.add(0)
    server = Server([Export("", backend)])
    async with trio.open_nursery() as nursery:
        busy = await connected(nursery, server)
        idle = await connected(nursery, server)
        handshaking_stream, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, server_side, "handshaking")
        handshaking = RawClient(handshaking_stream)
        await busy.send(k.Command.READ, 0, 1024, cookie=1)
        with trio.fail_after(10):
            await handshaking.recv_exact(wire.SERVER_GREETING_SIZE)
            while backend.reads_started < 1:
                await trio.sleep(0.01)
        server.begin_shutdown()
        with trio.fail_after(10):
            assert await idle.stream.receive_some(1) == b""  # idle: closed at once
            while await handshaking_stream.receive_some(100):
                pass  # closed without finishing the handshake
        backend.release()
        with trio.fail_after(10):
            assert await busy.reply({1: 1024}) == (1, 0, bytes(backend.data[:1024]))
            assert await busy.stream.receive_some(1) == b""
            await server.wait_idle()
        late_stream, late_server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, late_server_side, "late")
        with trio.fail_after(10):
            assert await late_stream.receive_some(100) == b""  # refused while shutting down
