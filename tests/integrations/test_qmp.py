"""The QMP client against a fake QMP peer on trio memory streams.

The fake speaks the protocol as QEMU does: a greeting, `qmp_capabilities`, answers echoing the
command's `id`, and events interleaved anywhere.  It can answer out of order, split its output
into one-byte writes, and hang up.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from postcopy.integrations.qmp import (
    QMPCommandError,
    QMPConnectionError,
    QMPLineParser,
    open_qmp,
    open_qmp_stream,
)

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}


class FakeQMPPeer:
    """The server side of a memory stream: reads commands, lets the test script the answers."""

    def __init__(self, stream: trio.abc.Stream, trickle: bool = False) -> None:
        self.stream = stream
        self.trickle = trickle
        self.parser = QMPLineParser()
        self.received: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\r\n"
        if self.trickle:
            for index in range(len(data)):
                await self.stream.send_all(data[index : index + 1])
        else:
            await self.stream.send_all(data)

    async def receive_command(self) -> dict[str, Any]:
        while not self.received:
            data = await self.stream.receive_some(65536)
            assert data, "client hung up"
            self.received.extend(self.parser.feed(data))
        return self.received.pop(0)

    async def negotiate(self) -> None:
        await self.send(GREETING)
        command = await self.receive_command()
        assert command["execute"] == "qmp_capabilities"
        await self.send({"return": {}, "id": command["id"]})


async def test_execute_returns_the_answer_matching_its_id_even_out_of_order() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = FakeQMPPeer(server_stream)
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.negotiate)
        async with open_qmp_stream(client_stream) as client:
            assert client.greeting["version"]["qemu"]["major"] == 7

            async def run(command: str) -> None:
                results[command] = await client.execute(command)

            async def answer_in_reverse() -> None:
                first = await peer.receive_command()
                second = await peer.receive_command()
                for command in (second, first):
                    await peer.send({"return": {"name": command["execute"]}, "id": command["id"]})

            async with trio.open_nursery() as inner:
                inner.start_soon(answer_in_reverse)
                inner.start_soon(run, "query-status")
                inner.start_soon(run, "query-migrate")
    assert results == {
        "query-status": {"name": "query-status"},
        "query-migrate": {"name": "query-migrate"},
    }


async def test_error_answer_raises_with_class_and_description() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = FakeQMPPeer(server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.negotiate)
        async with open_qmp_stream(client_stream) as client:

            async def refuse() -> None:
                command = await peer.receive_command()
                assert command == {
                    "execute": "migrate",
                    "id": command["id"],
                    "arguments": {"uri": "unix:/nowhere"},
                }
                error = {"class": "GenericError", "desc": "Failed to connect"}
                await peer.send({"error": error, "id": command["id"]})

            nursery.start_soon(refuse)
            with pytest.raises(QMPCommandError) as caught:
                await client.execute("migrate", {"uri": "unix:/nowhere"})
    assert caught.value.error_class == "GenericError"
    assert caught.value.description == "Failed to connect"


async def test_events_are_queued_between_answers_and_survive_a_one_byte_trickle() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = FakeQMPPeer(server_stream, trickle=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.negotiate)
        async with open_qmp_stream(client_stream) as client:

            async def answer_with_events_around() -> None:
                command = await peer.receive_command()
                await peer.send({"event": "STOP", "data": {}, "timestamp": {}})
                await peer.send({"return": {"status": "running"}, "id": command["id"]})
                await peer.send({"event": "MIGRATION", "data": {"status": "completed"}})

            nursery.start_soon(answer_with_events_around)
            with trio.fail_after(5):
                assert await client.execute("query-status") == {"status": "running"}
                event = await client.wait_event("MIGRATION")
    assert event["data"] == {"status": "completed"}


async def test_hang_up_fails_the_pending_command_and_later_ones() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = FakeQMPPeer(server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.negotiate)
        async with open_qmp_stream(client_stream) as client:

            async def hang_up() -> None:
                await peer.receive_command()
                await server_stream.aclose()

            nursery.start_soon(hang_up)
            with trio.fail_after(5), pytest.raises(QMPConnectionError):
                await client.execute("quit")
            assert client.is_closed
            with pytest.raises(QMPConnectionError):
                await client.execute("query-status")
            with pytest.raises(QMPConnectionError):
                await client.next_event()


async def test_a_peer_that_does_not_greet_with_qmp_is_refused() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await server_stream.send_all(b'{"hello": "not qmp"}\n')
    with trio.fail_after(5), pytest.raises(QMPConnectionError, match="did not greet"):
        async with open_qmp_stream(client_stream):
            pass


async def test_invalid_json_is_a_connection_error() -> None:
    parser = QMPLineParser()
    assert parser.feed(b'{"return": {}, "id": "a"}\r\n{"ev') == [{"return": {}, "id": "a"}]
    assert parser.feed(b'ent": "STOP"}\n') == [{"event": "STOP"}]
    with pytest.raises(QMPConnectionError):
        parser.feed(b"{not json\n")


async def test_open_qmp_over_a_unix_socket(tmp_path: Any) -> None:
    path = str(tmp_path / "q.sock")
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)

    async def serve_one() -> None:
        sock, _ = await listener.accept()
        peer = FakeQMPPeer(trio.SocketStream(sock))
        await peer.negotiate()
        command = await peer.receive_command()
        await peer.send({"return": {"status": "inmigrate"}, "id": command["id"]})
        await peer.stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one)
        with trio.fail_after(5):
            async with open_qmp(path) as client:
                assert await client.execute("query-status") == {"status": "inmigrate"}
    listener.close()


async def test_open_qmp_on_a_missing_socket_says_so(tmp_path: Any) -> None:
    with pytest.raises(QMPConnectionError, match="cannot connect"):
        async with open_qmp(tmp_path / "absent.sock"):
            pass


async def test_an_error_in_the_callers_block_comes_out_as_itself() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = FakeQMPPeer(server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.negotiate)
        with pytest.raises(KeyError, match="caller's own"):
            async with open_qmp_stream(client_stream):
                raise KeyError("caller's own")


async def test_a_peer_that_never_greets_times_out(autojump_clock: trio.abc.Clock) -> None:
    # QEMU accepts a second QMP client but greets it only when the first one leaves.
    client_stream, _server_stream = trio.testing.memory_stream_pair()
    started = trio.current_time()
    with pytest.raises(QMPConnectionError, match="no QMP greeting"):
        async with open_qmp_stream(client_stream, negotiation_timeout=10):
            pass
    assert trio.current_time() - started == pytest.approx(10)
