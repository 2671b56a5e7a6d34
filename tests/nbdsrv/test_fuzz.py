"""Hostile input (issue 7): hypothesis drives the sans-IO cores with generated peers.

Each test builds a byte stream that is mostly well shaped (real options, real requests, real
replies, built with nbdsrv.wire) and partly corrupted (bytes flipped, cut, inserted; nonsense
codes, lengths and offsets), feeds it in random-sized pieces, and checks that

- the core only ever raises the documented errors (RemoteProtocolError / ConnectionClosedError on
  the server; RemoteProtocolError / NegotiationError / ConnectionClosedError on the client),
  never anything else (no struct.error, IndexError, LocalProtocolError, AssertionError...);
- it never hangs: every loop is bounded, and after the end of the input (EOF) the core stops
  asking for data;
- what it lets through is safe: a REQUIRED-TLS server answers nothing but ERR_TLS_REQD before
  TLS and opens no export; a read-only export never executes a write; an executed request is
  inside the export; a client that requires TLS never finishes a plaintext handshake; when the
  server's replies were not corrupted, every READ returns exactly the disk's bytes.

Examples per test: POSTCOPY_FUZZ_EXAMPLES (default 2000; e.g. 50000 for a long run).  The number
of cases run is printed at the end of the module ("fuzz cases run: ...").
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import ssl
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbdsrv
from nbdsrv import constants as k
from nbdsrv import server_core as core
from nbdsrv import wire
from nbdsrv.backend import FileBackend
from nbdsrv.client_core import (
    ClientHandshake,
    ClientTransmission,
    NegotiatedExport,
    RequestFinished,
)
from nbdsrv.errors import (
    ConnectionClosedError,
    NegotiationError,
    RemoteProtocolError,
)
from nbdsrv.extent import Extent
from nbdsrv.server import Export, Server

FUZZ_EXAMPLES = int(os.environ.get("POSTCOPY_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_STEPS = 20_000  # events per example: far above what the inputs can produce
CASES: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def report_fuzz_cases(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    summary = ", ".join(f"{name} {count}" for name, count in CASES.items())
    line = f"\nfuzz cases run: {sum(CASES.values())} ({summary})"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(line)
    else:  # pragma: no cover
        print(line)


def count_case(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


# -- shared strategies --------------------------------------------------------------------------

SIZE = 1 << 20
names = st.sampled_from(["", "disk", "Disk", "disk ", "nosuch", "*"]) | st.text(max_size=12)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


@dataclass
class Corruption:
    kind: str  # flip | cut | insert | none
    position: int
    value: bytes


corruptions = st.builds(
    Corruption,
    st.sampled_from(["flip", "cut", "insert"]),
    st.integers(0, 1 << 16),
    st.binary(min_size=1, max_size=8),
)


def corrupt(data: bytes, damage: list[Corruption]) -> bytes:
    for hit in damage:
        if not data:
            break
        at = hit.position % len(data)
        if hit.kind == "flip":
            data = data[:at] + bytes([data[at] ^ (hit.value[0] or 1)]) + data[at + 1 :]
        elif hit.kind == "cut":
            data = data[:at]
        else:
            data = data[:at] + hit.value + data[at:]
    return data


def pieces(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """`data` cut into the given sizes (cycled), the one-byte trickle included."""
    position, index = 0, 0
    while position < len(data):
        size = sizes[index % len(sizes)] if sizes else len(data)
        index += 1
        yield data[position : position + size]
        position += size


piece_sizes = st.lists(st.integers(1, 64) | st.just(1 << 16), min_size=1, max_size=8)


# -- the server: negotiation ----------------------------------------------------------------------

EXPORTS = {
    "": core.ExportSpec("", size=SIZE),
    "disk": core.ExportSpec("disk", size=SIZE, read_only=False, minimum_block_size=512),
}


OPTIONS = st.sampled_from([int(o) for o in k.Option]) | u32
OPTION_REPLIES = st.sampled_from([int(r) for r in k.OptionReply]) | u32
INFO_LISTS = st.lists(st.sampled_from([int(i) for i in k.Info]) | u16, max_size=4)
QUERY_LISTS = st.lists(st.sampled_from([k.BASE_ALLOCATION, "base:", "qemu:x"]) | names, max_size=3)


@st.composite
def option_messages(draw: st.DrawFn) -> bytes:
    option = draw(OPTIONS)
    shape = draw(st.integers(0, 3))
    if shape == 0:
        data = draw(st.binary(max_size=48))
    elif option in (k.Option.INFO, k.Option.GO):
        infos = draw(INFO_LISTS)
        data = wire.build_info_request(wire.InfoRequest(draw(names), tuple(int(i) for i in infos)))
    elif option in (k.Option.LIST_META_CONTEXT, k.Option.SET_META_CONTEXT):
        queries = draw(QUERY_LISTS)
        data = wire.build_meta_context_request(wire.MetaContextRequest(draw(names), tuple(queries)))
    elif option == k.Option.EXPORT_NAME:
        data = draw(names).encode()
    else:
        data = b""
    message = wire.build_option(option, data)
    if draw(st.integers(0, 15)) == 0:  # a lying length field
        message = message[:12] + struct.pack(">I", draw(u32)) + message[16:]
    return message


@st.composite
def handshake_streams(draw: st.DrawFn) -> bytes:
    flags = draw(
        st.sampled_from([CLIENT_FLAGS, int(k.ClientFlag.FIXED_NEWSTYLE), 0]) | u32
    )
    options = draw(st.lists(option_messages(), max_size=6))
    stream = wire.build_client_flags(flags) + b"".join(options)
    if draw(st.booleans()):
        stream = corrupt(stream, draw(st.lists(corruptions, max_size=3)))
    return stream


CLIENT_FLAGS = int(k.ClientFlag.FIXED_NEWSTYLE | k.ClientFlag.NO_ZEROES)
SERVER_ERRORS = (RemoteProtocolError, ConnectionClosedError)


def option_reply_types(data: bytes) -> list[tuple[int, int]]:
    """(option, reply_type) of queued option replies; they must parse."""
    found = []
    while data:
        header = wire.parse_option_reply_header(data[: wire.OPTION_REPLY_HEADER_SIZE])
        end = wire.OPTION_REPLY_HEADER_SIZE + header.length
        assert len(data) >= end
        found.append((header.option, header.reply_type))
        data = data[end:]
    return found


@dataclass
class ServerRun:
    events: list[object] = field(default_factory=list)
    error: Exception | None = None


def drive_server(
    conn: core.ServerConnection, data: bytes, sizes: list[int], on_event: object = None
) -> ServerRun:
    """Feed `data` then EOF; collect events until the connection ends.  Fails on a hang (the
    step bound) or on NEED_DATA after EOF."""
    run = ServerRun()
    feed = pieces(data, sizes)
    eof = False
    for _ in range(MAX_STEPS):
        try:
            event = conn.next_event()
        except SERVER_ERRORS as exc:
            run.error = exc
            return run
        if event is core.NEED_DATA:
            assert not eof, "NEED_DATA after the peer closed: would hang"
            chunk = next(feed, b"")
            eof = not chunk
            if chunk:
                conn.receive_data(chunk)
            else:
                conn.receive_eof()
            continue
        run.events.append(event)
        if callable(on_event):
            on_event(event)
        if isinstance(event, core.TLSRequested):
            conn.tls_established()
        if isinstance(event, core.HandshakeEnded | core.DisconnectRequested):
            return run
        if isinstance(event, core.CommandRefused) and event.close_after:
            assert conn.state is core.State.CLOSED  # the shell sends the error, then closes
            return run
    raise AssertionError("no end after MAX_STEPS events")


@FUZZ
@given(stream=handshake_streams(), sizes=piece_sizes, mode=st.sampled_from(list(core.TLSMode)))
def test_fuzz_server_negotiation(stream: bytes, sizes: list[int], mode: core.TLSMode) -> None:
    count_case("server negotiation")
    conn = core.ServerConnection(EXPORTS, tls=mode)
    assert conn.data_to_send()[:8] == b"NBDMAGIC"
    tls_up = False

    def check(event: object) -> None:
        nonlocal tls_up
        outgoing = conn.data_to_send()
        if isinstance(event, core.ExportOpened):
            assert mode is not core.TLSMode.REQUIRED or tls_up, "export opened without TLS"
            assert event.export.name in EXPORTS
            return
        if isinstance(event, core.HandshakeEnded):
            if event.refused:
                assert outgoing == b""  # EXPORT_NAME refused: nothing about any export
            return
        replies = option_reply_types(outgoing)
        assert replies and all(option == replies[0][0] for option, _ in replies)
        if mode is core.TLSMode.REQUIRED and not tls_up:
            allowed = {int(k.OptionReply.ERR_TLS_REQD), int(k.OptionReply.ERR_INVALID)}
            if replies[0][0] == k.Option.STARTTLS:
                allowed.add(int(k.OptionReply.ACK))
            assert {reply for _, reply in replies} <= allowed, replies
        if mode is core.TLSMode.OFF:
            assert all(reply != k.OptionReply.ERR_TLS_REQD for _, reply in replies)
        if isinstance(event, core.TLSRequested):
            assert mode is not core.TLSMode.OFF and not tls_up
            tls_up = True

    run = drive_server(conn, stream, sizes, check)
    assert run.error is not None or run.events


# -- the server: transmission ---------------------------------------------------------------------


def opened_server(
    spec: core.ExportSpec, structured: bool, block_size: bool
) -> core.ServerConnection:
    conn = core.ServerConnection({spec.name: spec})
    conn.data_to_send()
    infos = (int(k.Info.BLOCK_SIZE),) if block_size else ()
    handshake = wire.build_client_flags(CLIENT_FLAGS)
    if structured:
        meta = wire.MetaContextRequest(spec.name, (k.BASE_ALLOCATION,))
        handshake += wire.build_option(k.Option.STRUCTURED_REPLY) + wire.build_option(
            k.Option.SET_META_CONTEXT, wire.build_meta_context_request(meta)
        )
    handshake += wire.build_option(
        k.Option.GO, wire.build_info_request(wire.InfoRequest(spec.name, infos))
    )
    conn.receive_data(handshake)
    for _ in range(10):
        event = conn.next_event()
        if isinstance(event, core.ExportOpened):
            conn.data_to_send()
            return conn
    raise AssertionError("handshake did not open the export")


ZEROES = memoryview(bytes(k.MAX_PAYLOAD))
boundary_offsets = st.sampled_from(
    [0, 1, 511, 512, SIZE - 512, SIZE - 1, SIZE, SIZE + 512, 1 << 63]
)
boundary_lengths = st.sampled_from(
    [0, 1, 512, 4096, 65536, k.MAX_PAYLOAD, k.MAX_PAYLOAD + 1, 0xFFFFFFFF]
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    command = draw(COMMANDS)
    flags = draw(COMMAND_FLAGS)
    offset = draw(OFFSETS)
    length = draw(WRITE_LENGTHS if command == k.Command.WRITE else LENGTHS)
    header = wire.build_request_header(wire.Request(flags, command, draw(u64), offset, length))
    if command == k.Command.WRITE and length <= 2048:
        return header + random.Random(length).randbytes(length)  # the bytes do not matter
    return header


# Built once: making a strategy per draw costs more than drawing from it.
COMMANDS = st.sampled_from([int(c) for c in k.Command]) | u16
COMMAND_FLAGS = st.sampled_from([0, *[int(f) for f in k.CommandFlag]]) | u16
OFFSETS = boundary_offsets | st.integers(0, 2 * SIZE) | u64
WRITE_LENGTHS = st.integers(0, 2048) | boundary_lengths
LENGTHS = boundary_lengths | st.integers(0, 2 * SIZE) | u32


@st.composite
def request_streams(draw: st.DrawFn) -> bytes:
    stream = b"".join(draw(st.lists(requests(), max_size=8)))
    if draw(st.integers(0, 3)) == 0:
        stream = corrupt(stream, draw(st.lists(corruptions, max_size=2)))
    return stream


@FUZZ
@given(
    stream=request_streams(),
    sizes=piece_sizes,
    read_only=st.booleans(),
    structured=st.booleans(),
    block_size=st.booleans(),
    holes=st.lists(st.tuples(st.integers(0, SIZE), st.integers(1, 1 << 16)), max_size=4),
)
def test_fuzz_server_transmission(
    stream: bytes,
    sizes: list[int],
    read_only: bool,
    structured: bool,
    block_size: bool,
    holes: list[tuple[int, int]],
) -> None:
    count_case("server transmission")
    spec = core.ExportSpec("", size=SIZE, read_only=read_only, minimum_block_size=512)
    conn = opened_server(spec, structured, block_size)
    hole_flags = int(k.BlockStatusFlag.HOLE | k.BlockStatusFlag.ZERO)
    hole_extents = sorted((Extent(o, n, hole_flags) for o, n in holes), key=lambda e: e.offset)

    def check(event: object) -> None:
        if isinstance(event, core.CommandReceived):
            request = event.request
            assert conn.validate(request) is None
            if request.command in (k.Command.WRITE, k.Command.TRIM, k.Command.WRITE_ZEROES):
                assert not read_only, "a write reached a read-only export"
            if request.command != k.Command.FLUSH:
                assert request.length > 0 and request.offset + request.length <= SIZE
            if request.command == k.Command.WRITE:
                assert event.payload is not None and len(event.payload) == request.length
            if request.command == k.Command.READ:
                inside = [h for h in hole_extents if h.offset < request.offset + request.length
                          and h.end > request.offset]
                merged: list[Extent] = []
                for hole in inside:  # read_reply wants sorted, non-overlapping holes
                    if merged and hole.offset < merged[-1].end:
                        continue
                    merged.append(hole)
                reply = conn.read_reply(request, ZEROES[: request.length], merged)
                assert sum(len(part) for part in reply) >= 16
            if request.command == k.Command.BLOCK_STATUS:
                extents = [Extent(request.offset, request.length, 0)]
                status = conn.block_status_reply(request, extents)
                assert status[:4] == struct.pack(">I", k.STRUCTURED_REPLY_MAGIC)
        elif isinstance(event, core.CommandRefused):
            refusal = conn.error_reply(event.request, event.errno, event.message)
            assert len(refusal) >= 16 and event.errno != 0

    drive_server(conn, stream, sizes, check)


# -- the client: handshake -----------------------------------------------------------------------


@st.composite
def server_option_replies(draw: st.DrawFn) -> bytes:
    option = draw(OPTIONS)
    reply = draw(OPTION_REPLIES)
    if reply == k.OptionReply.INFO and draw(st.booleans()):
        items: list[wire.InfoItem] = [
            wire.ExportInfo(SIZE, int(k.TransmissionFlag.HAS_FLAGS)),
            wire.NameInfo("disk"),
            wire.DescriptionInfo("a disk"),
            wire.BlockSizeInfo(512, 4096, k.MAX_PAYLOAD),
            wire.BlockSizeInfo(3, 4096, 1),
        ]
        data = wire.build_info(draw(st.sampled_from(items)))
    elif reply == k.OptionReply.META_CONTEXT and draw(st.booleans()):
        data = wire.build_meta_context_reply(
            wire.MetaContext(draw(u32), draw(st.sampled_from([k.BASE_ALLOCATION, "qemu:x"])))
        )
    else:
        data = draw(st.binary(max_size=24))
    return wire.build_option_reply(option, reply, data)


@st.composite
def server_handshake_streams(draw: st.DrawFn) -> bytes:
    greeting_flags = draw(
        st.sampled_from([int(k.HandshakeFlag.FIXED_NEWSTYLE | k.HandshakeFlag.NO_ZEROES), 0]) | u16
    )
    stream = wire.build_server_greeting(greeting_flags)
    stream += b"".join(draw(st.lists(server_option_replies(), max_size=8)))
    if draw(st.booleans()):
        stream += wire.build_export_name_reply(SIZE, 1, True)
    if draw(st.booleans()):
        stream = corrupt(stream, draw(st.lists(corruptions, max_size=3)))
    return stream


@FUZZ
@given(stream=server_handshake_streams(), sizes=piece_sizes,
       tls=st.sampled_from(["off", "on", "require"]))
def test_fuzz_client_handshake(stream: bytes, sizes: list[int], tls: str) -> None:
    count_case("client handshake")
    handshake = ClientHandshake("disk", tls=tls)
    try:
        for chunk in pieces(stream, sizes):
            handshake.receive_data(chunk)
            handshake.data_to_send()
            if handshake.tls_requested:
                # Never upgrade here: a client that requires TLS must not finish in plaintext.
                break
            if handshake.done:
                break
        else:
            handshake.receive_eof()  # stops asking: raises
            raise AssertionError("receive_eof() returned mid-handshake")
    except (NegotiationError, RemoteProtocolError):
        return
    if handshake.done:
        assert tls != "require", "a TLS-requiring client finished a plaintext handshake"
        assert handshake.result.size >= 0


# -- the client: transmission replies -----------------------------------------------------------


DISK = random.Random(5).randbytes(SIZE)
CONTEXT_ID = 7


@dataclass(frozen=True)
class PlannedRequest:
    command: int  # READ, BLOCK_STATUS, FLUSH or WRITE
    offset: int
    length: int


planned_requests = st.builds(
    PlannedRequest,
    st.sampled_from([k.Command.READ, k.Command.READ, k.Command.BLOCK_STATUS, k.Command.FLUSH]),
    st.integers(0, SIZE - 1),
    st.integers(1, 8192),
)


def valid_reply(
    rng: random.Random, cookie: int, request: PlannedRequest, structured: bool
) -> bytes:
    """A correct reply to `request` (data from DISK), in randomly sized chunks."""
    if rng.random() < 0.1:  # an error reply
        if structured:
            payload = wire.build_error_chunk(int(k.Errno.EIO), "no")
            return wire.build_structured_reply_header(
                k.ReplyFlag.DONE, k.ReplyType.ERROR, cookie, len(payload)
            ) + payload
        return wire.build_simple_reply(cookie, int(k.Errno.EIO))
    if request.command == k.Command.READ:
        data = DISK[request.offset : request.offset + request.length]
        if not structured:
            return wire.build_simple_reply(cookie, 0) + data
        cuts = sorted({0, len(data), *(rng.randrange(len(data) + 1) for _ in range(3))})
        chunks = []
        spans = list(zip(cuts, cuts[1:], strict=False))
        rng.shuffle(spans)  # chunks may come in any order
        for index, (start, end) in enumerate(spans):
            flags = k.ReplyFlag.DONE if index == len(spans) - 1 else 0
            offset = request.offset + start
            if data[start:end] == bytes(end - start) and rng.random() < 0.5:
                payload = wire.build_offset_hole(offset, end - start)
                chunks.append(wire.build_structured_reply_header(
                    flags, k.ReplyType.OFFSET_HOLE, cookie, len(payload)) + payload)
            else:
                chunks.append(
                    wire.build_structured_reply_header(
                        flags, k.ReplyType.OFFSET_DATA, cookie, 8 + end - start
                    ) + wire.build_offset_data_header(offset) + data[start:end]
                )
        return b"".join(chunks)
    if request.command == k.Command.BLOCK_STATUS:
        payload = wire.build_block_status(CONTEXT_ID, [(request.length, 0)])
        return wire.build_structured_reply_header(
            k.ReplyFlag.DONE, k.ReplyType.BLOCK_STATUS, cookie, len(payload)
        ) + payload
    return wire.build_simple_reply(cookie, 0)


@FUZZ
@given(
    planned=st.lists(planned_requests, min_size=1, max_size=6),
    structured=st.booleans(),
    seed=st.integers(0, 1 << 32),
    damage=st.lists(corruptions, max_size=3),
    garbage=st.binary(max_size=64),
    sizes=piece_sizes,
    direct=st.booleans(),
)
def test_fuzz_client_replies(
    planned: list[PlannedRequest],
    structured: bool,
    seed: int,
    damage: list[Corruption],
    garbage: bytes,
    sizes: list[int],
    direct: bool,
) -> None:
    count_case("client replies")
    rng = random.Random(seed)
    flags = int(k.TransmissionFlag.HAS_FLAGS | k.TransmissionFlag.SEND_FLUSH)
    export = NegotiatedExport(
        "disk", SIZE, flags, structured_replies=structured,
        meta_context_id=CONTEXT_ID if structured else None,
    )
    client = ClientTransmission(export)
    targets: dict[int, tuple[PlannedRequest, bytearray]] = {}
    replies = []
    for request in planned:
        length = min(request.length, SIZE - request.offset)
        request = PlannedRequest(request.command, request.offset, length)
        if request.command == k.Command.BLOCK_STATUS and not structured:
            request = PlannedRequest(k.Command.READ, request.offset, length)
        if request.command == k.Command.READ:
            buffer = bytearray(length)
            cookie, _ = client.request_read(request.offset, memoryview(buffer))
        elif request.command == k.Command.BLOCK_STATUS:
            buffer = bytearray()
            cookie, _ = client.request_block_status(request.offset, length)
        else:
            buffer = bytearray()
            cookie, _ = client.request_flush()
        targets[cookie] = (request, buffer)
        replies.append(valid_reply(rng, cookie, request, structured))
    rng.shuffle(replies)  # replies to different requests come in any order
    stream = b"".join(replies)
    corrupted = bool(damage or garbage)
    if damage:
        stream = corrupt(stream, damage)
    if garbage:
        stream = stream[: len(stream) // 2] + garbage + stream[len(stream) // 2 :]
    finished: dict[int, RequestFinished] = {}
    try:
        for chunk in pieces(stream, sizes):
            while chunk:
                target = client.payload_target() if direct else None
                if target is not None:  # the shell's zero-copy path
                    count = min(len(target), len(chunk))
                    target[:count] = chunk[:count]
                    client.payload_received(count)
                    chunk = chunk[count:]
                else:
                    client.receive_data(chunk)
                    chunk = b""
                for _ in range(MAX_STEPS):
                    event = client.next_event()
                    if event is core.NEED_DATA:
                        break
                    assert event.cookie not in finished
                    finished[event.cookie] = event
                else:
                    raise AssertionError("next_event() did not settle")
        if client.in_flight:
            with pytest.raises(ConnectionClosedError):
                client.receive_eof()
    except RemoteProtocolError:
        assert corrupted, "a valid reply stream was refused"
        return
    if corrupted:
        return  # corruption that still parsed (a flipped data byte): no oracle
    assert set(finished) == set(targets)
    for cookie, (request, buffer) in targets.items():
        event = finished[cookie]
        if event.error is None and request.command == k.Command.READ:
            assert bytes(buffer) == DISK[request.offset : request.offset + request.length]


# -- the server shell: hostile bytes through the real trio Server --------------------------------


class _ErrorRecords(logging.Handler):
    """Collects ERROR records of nbdsrv.server ("internal error": an undocumented exception)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_SHELL: dict[str, object] = {}


def shell_fixtures() -> tuple[str, ssl.SSLContext]:
    """A 1 MiB image and a server TLS context, made once per process."""
    if not _SHELL:
        workdir = tempfile.mkdtemp(prefix="fuzz-shell-")
        image = os.path.join(workdir, "disk.img")
        with open(image, "wb") as file:
            file.write(DISK)
        ca = trustme.CA()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("localhost").configure_cert(context)
        _SHELL.update(image=image, context=context, workdir=workdir)
    return str(_SHELL["image"]), _SHELL["context"]  # type: ignore[return-value]


@pytest.fixture(scope="module", autouse=True)
def remove_shell_fixtures() -> Iterator[None]:
    yield
    if _SHELL:
        shutil.rmtree(str(_SHELL["workdir"]), ignore_errors=True)
        _SHELL.clear()


async def serve_hostile_bytes(server: Server, data: bytes, sizes: list[int]) -> bytes:
    client_end, server_end = trio.testing.memory_stream_pair()
    received = bytearray()
    with trio.fail_after(10):  # no hang: the shell must end the connection
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_stream, server_end, "fuzz")

            async def receive() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while chunk := await client_end.receive_some(1 << 16):
                        received.extend(chunk)

            nursery.start_soon(receive)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for chunk in pieces(data, sizes):
                    await client_end.send_all(chunk)
                await client_end.send_eof()
    return bytes(received)


@settings(FUZZ, max_examples=max(FUZZ_EXAMPLES // 8, 10))
@given(
    opening=st.sampled_from(["handshake", "transmission"]),
    handshake=handshake_streams(),
    requests_stream=request_streams(),
    sizes=piece_sizes,
    mode=st.sampled_from(list(core.TLSMode)),
    writable=st.booleans(),
)
def test_fuzz_server_shell(
    opening: str,
    handshake: bytes,
    requests_stream: bytes,
    sizes: list[int],
    mode: core.TLSMode,
    writable: bool,
) -> None:
    count_case("server shell")
    image, context = shell_fixtures()
    if opening == "handshake":
        data = handshake
    else:
        meta = wire.MetaContextRequest("", (k.BASE_ALLOCATION,))
        data = (
            wire.build_client_flags(CLIENT_FLAGS)
            + wire.build_option(k.Option.STRUCTURED_REPLY)
            + wire.build_option(k.Option.SET_META_CONTEXT, wire.build_meta_context_request(meta))
            + wire.build_option(k.Option.GO, wire.build_info_request(wire.InfoRequest("")))
            + requests_stream
        )
        mode = core.TLSMode.OFF
    backend = FileBackend(image, writable=writable)
    errors = _ErrorRecords()
    logger = logging.getLogger("nbdsrv.server")
    logger.addHandler(errors)
    try:
        server = Server([Export("", backend)], tls=mode, ssl_context=context, handshake_timeout=5)
        received = trio.run(serve_hostile_bytes, server, data, sizes)
    finally:
        logger.removeHandler(errors)
        backend.close()
        with open(image, "rb") as file:
            unchanged = file.read() == DISK
        if writable and not unchanged:  # the next example starts from the same image
            with open(image, "wb") as file:
                file.write(DISK)
    assert received[:8] == b"NBDMAGIC"
    assert not errors.records, [record.getMessage() for record in errors.records]
    stats = server.statistics()
    assert stats.connections_open == 0 and stats.connections_accepted == 1
    if not writable:
        assert "WRITE" not in stats.commands and "TRIM" not in stats.commands
        assert unchanged, "a read-only export was modified"


# -- the client shell: a hostile server behind a real socket pair ---------------------------------


def server_handshake_replies(structured: bool) -> bytes:
    """What a well-behaved server sends for the client's STRUCTURED_REPLY, SET_META_CONTEXT and
    GO (all at once: the client parses them in order)."""
    flags = int(k.HandshakeFlag.FIXED_NEWSTYLE | k.HandshakeFlag.NO_ZEROES)
    out = wire.build_server_greeting(flags)
    if not structured:
        out += wire.build_option_reply(k.Option.STRUCTURED_REPLY, k.OptionReply.ERR_UNSUP)
    else:
        out += wire.build_option_reply(k.Option.STRUCTURED_REPLY, k.OptionReply.ACK)
        context = wire.build_meta_context_reply(wire.MetaContext(CONTEXT_ID, k.BASE_ALLOCATION))
        out += wire.build_option_reply(k.Option.SET_META_CONTEXT, k.OptionReply.META_CONTEXT,
                                       context)
        out += wire.build_option_reply(k.Option.SET_META_CONTEXT, k.OptionReply.ACK)
    transmission = int(k.TransmissionFlag.HAS_FLAGS | k.TransmissionFlag.READ_ONLY)
    for item in (
        wire.ExportInfo(SIZE, transmission),
        wire.BlockSizeInfo(1, 4096, 1 << 20),
    ):
        out += wire.build_option_reply(k.Option.GO, k.OptionReply.INFO, wire.build_info(item))
    return out + wire.build_option_reply(k.Option.GO, k.OptionReply.ACK)


async def hostile_server(
    stream: trio.SocketStream,
    handshake: bytes,
    structured: bool,
    rng: random.Random,
    damage: dict[int, list[Corruption]],
    handshake_damaged: bool,
) -> None:
    """Send `handshake`, then answer each request (READ or BLOCK_STATUS) with a valid reply,
    damaged for the request numbers in `damage`; ends at NBD_CMD_DISC or EOF, or right after
    sending damaged bytes (a server that then stalls is a matter for deadlines, not parsing:
    the client has none of its own during the handshake)."""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await _answer_requests(stream, handshake, structured, rng, damage, handshake_damaged)


async def _answer_requests(
    stream: trio.SocketStream,
    handshake: bytes,
    structured: bool,
    rng: random.Random,
    damage: dict[int, list[Corruption]],
    handshake_damaged: bool,
) -> None:
    await stream.send_all(handshake)
    if handshake_damaged:
        return
    buffer = b""
    answered = 0
    while True:
        chunk = await stream.receive_some(1 << 16)
        if not chunk:
            return
        buffer += chunk
        # skip the handshake options the client sent: requests start with their magic
        while len(buffer) >= wire.REQUEST_HEADER_SIZE:
            magic = struct.unpack(">I", buffer[:4])[0]
            if magic != k.REQUEST_MAGIC:
                buffer = buffer[1:]
                continue
            request = wire.parse_request_header(buffer[: wire.REQUEST_HEADER_SIZE])
            buffer = buffer[wire.REQUEST_HEADER_SIZE :]
            if request.command == k.Command.DISC:
                return
            planned = PlannedRequest(request.command, request.offset, request.length)
            reply = valid_reply(rng, request.cookie, planned, structured)
            answered += 1
            await stream.send_all(corrupt(reply, damage.get(answered, [])))
            if answered in damage:
                return


@settings(FUZZ, max_examples=max(FUZZ_EXAMPLES // 8, 10))
@given(
    structured=st.booleans(),
    handshake_damage=st.lists(corruptions, max_size=2) | st.just([]),
    reply_damage=st.dictionaries(st.integers(1, 6), st.lists(corruptions, min_size=1, max_size=2),
                                 max_size=2),
    reads=st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 1 << 17)), min_size=1,
                   max_size=6),
    block_status=st.booleans(),
    seed=st.integers(0, 1 << 32),
)
def test_fuzz_client_shell(
    structured: bool,
    handshake_damage: list[Corruption],
    reply_damage: dict[int, list[Corruption]],
    reads: list[tuple[int, int]],
    block_status: bool,
    seed: int,
) -> None:
    count_case("client shell")
    handshake = corrupt(server_handshake_replies(structured), handshake_damage)
    reads = [(offset, min(length, SIZE - offset)) for offset, length in reads]
    corrupted = bool(handshake_damage or reply_damage)
    outcome: dict[str, object] = {}

    async def main() -> None:
        client_socket, server_socket = trio.socket.socketpair()
        client_stream = trio.SocketStream(client_socket)
        server_stream = trio.SocketStream(server_socket)

        async def connect() -> trio.abc.Stream:
            return client_stream

        with trio.fail_after(10):  # no hang, whatever the server sends
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hostile_server, server_stream, handshake, structured,
                                   random.Random(seed), reply_damage, bool(handshake_damage))
                try:
                    async with nbdsrv.open_client("nbd://fuzz/", stream_factory=connect) as client:
                        results: dict[int, bytes] = {}

                        async def read(index: int, offset: int, length: int) -> None:
                            results[index] = await client.pread(offset, length)

                        async with trio.open_nursery() as readers:
                            for index, (offset, length) in enumerate(reads):
                                readers.start_soon(read, index, offset, length)
                        if block_status and client.has_base_allocation:
                            await client.block_status(0, 4096)
                        outcome["results"] = results
                except BaseExceptionGroup as group:
                    outcome["errors"] = list(_leaves(group))
                except Exception as exc:
                    outcome["errors"] = [exc]
                await server_stream.aclose()
                nursery.cancel_scope.cancel()

    trio.run(main)
    errors = outcome.get("errors", [])
    assert isinstance(errors, list)
    assert all(isinstance(error, nbdsrv.NBDError) for error in errors), errors
    if errors:
        return
    results = outcome["results"]
    assert isinstance(results, dict)
    for index, (offset, length) in enumerate(reads):
        if index in results and not corrupted:
            assert results[index] == DISK[offset : offset + length]


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
