"""The client's sans-IO core, byte by byte, and the trio shell over memory streams with a fake
server built from nbdsrv.wire (frames trickled one byte at a time, replies out of order, dropped
connections, garbage, cancellation).  Hypothesis feeds the core random reply streams: it must
raise RemoteProtocolError or nothing, never anything else, never loop."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbdsrv
from nbdsrv import constants as k
from nbdsrv import wire
from nbdsrv.client_core import (
    NEED_DATA,
    ClientHandshake,
    ClientTransmission,
    NegotiatedExport,
    RequestFinished,
)
from nbdsrv.errors import (
    CommandError,
    ConnectionClosedError,
    LocalProtocolError,
    NegotiationError,
    RemoteProtocolError,
)

FIXED = k.HandshakeFlag.FIXED_NEWSTYLE
NO_ZEROES = k.HandshakeFlag.NO_ZEROES
CONTEXT_ID = 7
FLAGS = int(
    k.TransmissionFlag.HAS_FLAGS
    | k.TransmissionFlag.SEND_FLUSH
    | k.TransmissionFlag.SEND_FUA
    | k.TransmissionFlag.SEND_TRIM
    | k.TransmissionFlag.SEND_WRITE_ZEROES
    | k.TransmissionFlag.SEND_CACHE
    | k.TransmissionFlag.CAN_MULTI_CONN
)


# -- helpers: server-side frames ----------------------------------------------------------------


def reply(option: k.Option, reply_type: int, data: bytes = b"") -> bytes:
    return wire.build_option_reply(option, reply_type, data)


def info(item: wire.InfoItem) -> bytes:
    return reply(k.Option.GO, k.OptionReply.INFO, wire.build_info(item))


def chunk(cookie: int, reply_type: int, data: bytes = b"", done: bool = False) -> bytes:
    flags = k.ReplyFlag.DONE if done else 0
    return wire.build_structured_reply_header(flags, reply_type, cookie, len(data)) + data


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return chunk(cookie, k.ReplyType.OFFSET_DATA, struct.pack(">Q", offset) + data, done)


def hole_chunk(cookie: int, offset: int, size: int, done: bool = False) -> bytes:
    return chunk(cookie, k.ReplyType.OFFSET_HOLE, wire.build_offset_hole(offset, size), done)


def done_chunk(cookie: int) -> bytes:
    return chunk(cookie, k.ReplyType.NONE, b"", True)


def parse_options(data: bytes) -> list[tuple[int, bytes]]:
    """The options a client sent (after its 4 flag bytes)."""
    options = []
    while data:
        header = wire.parse_option_header(data[:16])
        options.append((header.option, data[16 : 16 + header.length]))
        data = data[16 + header.length :]
    return options


def handshake_with(server_bytes: bytes, export: str = "", trickle: bool = False) -> ClientHandshake:
    handshake = ClientHandshake(export)
    pieces = (
        [server_bytes[i : i + 1] for i in range(len(server_bytes))] if trickle else [server_bytes]
    )
    for piece in pieces:
        handshake.receive_data(piece)
    return handshake


FULL_SERVER = (
    wire.build_server_greeting(FIXED | NO_ZEROES)
    + reply(k.Option.STRUCTURED_REPLY, k.OptionReply.ACK)
    + reply(
        k.Option.SET_META_CONTEXT,
        k.OptionReply.META_CONTEXT,
        wire.build_meta_context_reply(wire.MetaContext(CONTEXT_ID, "base:allocation")),
    )
    + reply(k.Option.SET_META_CONTEXT, k.OptionReply.ACK)
    + info(wire.ExportInfo(1 << 30, FLAGS))
    + info(wire.BlockSizeInfo(512, 4096, 65536))
    + info(wire.NameInfo("canonical"))
    + info(wire.DescriptionInfo("a test disk"))
    + reply(k.Option.GO, k.OptionReply.ACK)
)


# -- handshake ------------------------------------------------------------------------------------


@pytest.mark.parametrize("trickle", [False, True])
def test_handshake_negotiates_everything_through_named_states(trickle: bool) -> None:
    handshake = handshake_with(FULL_SERVER, "disk", trickle)
    assert handshake.done and handshake.state == "READY"
    result = handshake.result
    assert result == NegotiatedExport(
        export_name="canonical",
        size=1 << 30,
        transmission_flags=FLAGS,
        description="a test disk",
        block_size=(512, 4096, 65536),
        structured_replies=True,
        meta_context_id=CONTEXT_ID,
        no_zeroes=True,
        fixed_newstyle=True,
    )
    assert handshake.trace == [
        "NEWSTYLE.RECV_GREETING",
        "NEWSTYLE.OPT_STRUCTURED_REPLY.SEND",
        "NEWSTYLE.OPT_STRUCTURED_REPLY.RECV_REPLY",
        "NEWSTYLE.OPT_SET_META_CONTEXT.SEND",
        "NEWSTYLE.OPT_SET_META_CONTEXT.RECV_REPLY",
        *["NEWSTYLE.OPT_SET_META_CONTEXT.RECV_REPLY"],  # the META_CONTEXT reply, then ACK
        "NEWSTYLE.OPT_GO.SEND",
        "NEWSTYLE.OPT_GO.RECV_REPLY",
        *["NEWSTYLE.OPT_GO.RECV_REPLY"] * 4,  # four INFO replies
        "READY",
    ]
    sent = handshake.data_to_send()
    assert wire.parse_client_flags(sent[:4]) == k.ClientFlag.FIXED_NEWSTYLE | k.ClientFlag.NO_ZEROES
    options = parse_options(sent[4:])
    assert [o for o, _ in options] == [
        k.Option.STRUCTURED_REPLY,
        k.Option.SET_META_CONTEXT,
        k.Option.GO,
    ]
    meta = wire.parse_meta_context_request(options[1][1])
    assert meta == wire.MetaContextRequest("disk", ("base:allocation",))
    go = wire.parse_info_request(options[2][1])
    assert go.name == "disk" and k.Info.BLOCK_SIZE in go.info_requests


def test_refused_structured_replies_fall_back_to_simple_replies() -> None:
    server = (
        wire.build_server_greeting(FIXED | NO_ZEROES)
        + reply(k.Option.STRUCTURED_REPLY, k.OptionReply.ERR_UNSUP, b"no")
        + info(wire.ExportInfo(4096, 1))
        + reply(k.Option.GO, k.OptionReply.ACK)
    )
    handshake = handshake_with(server)
    assert handshake.result.structured_replies is False
    assert handshake.result.meta_context_id is None
    options = parse_options(handshake.data_to_send()[4:])
    assert [o for o, _ in options] == [k.Option.STRUCTURED_REPLY, k.Option.GO]  # no meta context


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_unsupported_go_falls_back_to_export_name(no_zeroes: bool) -> None:
    flags = FIXED | (NO_ZEROES if no_zeroes else 0)
    padding = b"" if no_zeroes else bytes(124)
    server = (
        wire.build_server_greeting(flags)
        + reply(k.Option.STRUCTURED_REPLY, k.OptionReply.ERR_UNSUP)
        + reply(k.Option.GO, k.OptionReply.ERR_UNSUP)
        + struct.pack(">QH", 123 * 512, 3)
        + padding
    )
    handshake = ClientHandshake("old")
    handshake.receive_data(server[:-1])
    assert not handshake.done  # the padding (or flags) is not all here yet
    handshake.receive_data(server[-1:])
    assert handshake.result.size == 123 * 512 and handshake.result.transmission_flags == 3
    assert handshake.trace[-3:] == [
        "NEWSTYLE.OPT_EXPORT_NAME.SEND",
        "NEWSTYLE.OPT_EXPORT_NAME.RECV_REPLY",
        "READY",
    ]
    options = parse_options(handshake.data_to_send()[4:])
    assert options[-1] == (k.Option.EXPORT_NAME, b"old")
    assert not len(handshake.buffer)


def test_plain_newstyle_server_gets_export_name_and_no_flags() -> None:
    server = wire.build_server_greeting(0) + struct.pack(">QH", 1 << 20, 1) + bytes(124)
    handshake = handshake_with(server, "x")
    sent = handshake.data_to_send()
    assert sent[:4] == bytes(4)
    assert parse_options(sent[4:]) == [(k.Option.EXPORT_NAME, b"x")]
    assert handshake.result.size == 1 << 20 and not handshake.result.structured_replies


def test_go_refusal_is_a_negotiation_error_with_the_reply_code() -> None:
    server = (
        wire.build_server_greeting(FIXED | NO_ZEROES)
        + reply(k.Option.STRUCTURED_REPLY, k.OptionReply.ERR_UNSUP)
        + reply(k.Option.GO, k.OptionReply.ERR_UNKNOWN, b"no such export")
    )
    with pytest.raises(NegotiationError, match="no such export") as refused:
        handshake_with(server)
    assert refused.value.reply_type == k.OptionReply.ERR_UNKNOWN


@pytest.mark.parametrize(
    "server",
    [
        struct.pack(">QQ", k.NBDMAGIC, 0x00420281861253) + bytes(8),  # oldstyle
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
    ],
)
def test_a_server_that_is_not_newstyle_is_refused(server: bytes) -> None:
    with pytest.raises(NegotiationError):
        handshake_with(server)


def test_invalid_block_size_and_mismatched_option_reply_are_protocol_errors() -> None:
    greeting = wire.build_server_greeting(FIXED | NO_ZEROES)
    refuse_sr = reply(k.Option.STRUCTURED_REPLY, k.OptionReply.ERR_UNSUP)
    with pytest.raises(RemoteProtocolError, match="BLOCK_SIZE"):
        handshake_with(greeting + refuse_sr + info(wire.BlockSizeInfo(3, 4096, 65536)))
    with pytest.raises(RemoteProtocolError, match="while waiting"):
        handshake_with(greeting + reply(k.Option.GO, k.OptionReply.ACK))
    with pytest.raises(RemoteProtocolError, match="NBD_INFO_EXPORT"):
        handshake_with(greeting + refuse_sr + reply(k.Option.GO, k.OptionReply.ACK))


def test_eof_during_export_name_names_the_export() -> None:
    handshake = handshake_with(wire.build_server_greeting(0), "missing")
    with pytest.raises(NegotiationError, match="missing"):
        handshake.receive_eof()


# -- transmission ---------------------------------------------------------------------------------


def make_core(
    structured: bool = True, size: int = 1 << 20, max_payload: int = 1 << 20
) -> ClientTransmission:
    export = NegotiatedExport(
        export_name="",
        size=size,
        transmission_flags=FLAGS,
        block_size=(1, 4096, max_payload),
        structured_replies=structured,
        meta_context_id=CONTEXT_ID if structured else None,
    )
    return ClientTransmission(export)


def feed(
    core: ClientTransmission, data: bytes, trickle: bool = False
) -> list[nbdsrv.client_core.RequestFinished]:
    events = []
    pieces = [data[i : i + 1] for i in range(len(data))] if trickle else [data]
    for piece in pieces:
        core.receive_data(piece)
        while isinstance(event := core.next_event(), RequestFinished):
            events.append(event)
    return events


def test_request_headers_match_the_construct_declaration() -> None:
    core = make_core()
    cookie, header = core.request_write(4096, 512, fua=True)
    parsed = wire.RequestHeaderStruct.parse(header)
    assert (parsed.flags, parsed.type, parsed.cookie, parsed.offset, parsed.length) == (
        k.CommandFlag.FUA, k.Command.WRITE, cookie, 4096, 512,
    )  # fmt: skip
    cookie2, header = core.request_block_status(0, 1 << 20, req_one=True)
    parsed = wire.RequestHeaderStruct.parse(header)
    assert cookie2 != cookie and parsed.flags == k.CommandFlag.REQ_ONE
    assert parsed.type == k.Command.BLOCK_STATUS


@pytest.mark.parametrize("trickle", [False, True])
def test_structured_read_assembles_data_and_holes_out_of_order(trickle: bool) -> None:
    core = make_core()
    target = bytearray(b"\xff" * 10000)
    cookie, _ = core.request_read(5000, memoryview(target))
    a, c = bytes(range(256)) * 8, b"z" * 3000
    stream = (
        data_chunk(cookie, 5000 + 7000, c)  # the end first
        + hole_chunk(cookie, 5000 + 2048, 4952)
        + data_chunk(cookie, 5000, a)
        + done_chunk(cookie)
    )
    events = feed(core, stream, trickle)
    assert [(e.cookie, e.error) for e in events] == [(cookie, None)]
    assert target == a + bytes(4952) + c
    assert core.in_flight == 0 and core.hole_chunks == 1 and core.data_chunks == 2


def test_replies_to_pipelined_requests_come_in_any_order() -> None:
    core = make_core(structured=False)
    first, second = bytearray(100), bytearray(50)
    cookie1, _ = core.request_read(0, memoryview(first))
    cookie2, _ = core.request_read(100, memoryview(second))
    cookie3, _ = core.request_flush()
    stream = (
        wire.build_simple_reply(cookie3)
        + wire.build_simple_reply(cookie2) + b"b" * 50
        + wire.build_simple_reply(cookie1, errno.EIO)  # an error: no data follows
    )  # fmt: skip
    events = feed(core, stream, trickle=True)
    assert [e.cookie for e in events] == [cookie3, cookie2, cookie1]
    assert isinstance(events[2].error, CommandError) and events[2].error.errno == errno.EIO
    assert second == b"b" * 50 and first == bytes(100)


def test_error_chunk_maps_errno_and_the_reply_still_finishes() -> None:
    core = make_core()
    cookie, _ = core.request_read(0, memoryview(bytearray(100)))
    other, _ = core.request_trim(0, 4096)
    stream = (
        chunk(cookie, k.ReplyType.ERROR, wire.build_error_chunk(28, "disk full"))
        + data_chunk(cookie, 0, b"x" * 100, done=True)
        + chunk(other, k.ReplyType.ERROR_OFFSET, wire.build_error_chunk(9999, "odd", 10), True)
    )
    events = feed(core, stream)
    assert events[0].error is not None and events[0].error.errno == errno.ENOSPC
    assert events[0].error.message == "disk full"
    assert events[1].error is not None and events[1].error.errno == errno.EINVAL  # unknown value


def test_block_status_becomes_clipped_extents() -> None:
    core = make_core()
    cookie, _ = core.request_block_status(4096, 65536)
    data = wire.build_block_status(CONTEXT_ID, [(8192, 3), (4096, 0), (1 << 20, 1)])
    [event] = feed(core, chunk(cookie, k.ReplyType.BLOCK_STATUS, data, done=True), trickle=True)
    assert event.extents == [
        nbdsrv.Extent(4096, 8192, 3),
        nbdsrv.Extent(12288, 4096, 0),
        nbdsrv.Extent(16384, 65536 - 12288, 1),  # the last one stops at the request's end
    ]


R = 1000  # the READ in the violation table covers [R, R + 100)


@pytest.mark.parametrize(
    "make_stream, message",
    [
        (lambda c: data_chunk(c, R, b"x" * 60) + data_chunk(c, R + 50, b"y" * 50, True), "overlap"),
        (lambda c: hole_chunk(c, R + 10, 10) + data_chunk(c, R, b"x" * 11, True), "overlap"),
        (lambda c: data_chunk(c, R, b"x" * 60, done=True), "gap"),
        (lambda c: data_chunk(c, R + 90, b"x" * 20, done=True), "outside"),
        (lambda c: hole_chunk(c, R, 101, done=True), "outside"),
        (lambda c: hole_chunk(c, R, 0, done=True), "outside"),
        (lambda c: data_chunk(c + 1, R, b"x" * 100, True), "unknown cookie"),
        (lambda c: b"\x00" * 20, "magic"),
        (lambda c: wire.build_simple_reply(c) + b"x" * 100, "simple reply to a READ"),
        (lambda c: chunk(c, k.ReplyType.NONE, b"", done=False), "DONE"),
        (lambda c: chunk(c, 77, b"", done=True), "unknown structured reply type"),
        (lambda c: chunk(c, k.ReplyType.BLOCK_STATUS, bytes(12), True), "another command"),
        (lambda c: chunk(c, k.ReplyType.ERROR, wire.build_error_chunk(0, "")), "error value 0"),
        (lambda c: chunk(c, k.ReplyType.OFFSET_DATA, bytes(8), True), "OFFSET_DATA chunk of 8"),
    ],
)
def test_read_protocol_violations(make_stream: Callable[[int], bytes], message: str) -> None:
    core = make_core()
    cookie, _ = core.request_read(R, memoryview(bytearray(100)))
    with pytest.raises(RemoteProtocolError, match=message):
        feed(core, make_stream(cookie))


def test_read_chunk_offsets_are_absolute() -> None:
    core = make_core()
    target = bytearray(10)
    cookie, _ = core.request_read(1000, memoryview(target))
    with pytest.raises(RemoteProtocolError, match="outside"):
        feed(core, data_chunk(cookie, 0, b"x" * 10, True))  # offset 0 is not in [1000, 1010)


@pytest.mark.parametrize(
    "payload, message",
    [
        (wire.build_block_status(CONTEXT_ID + 1, [(4096, 0)]), "context id"),
        (struct.pack(">I", CONTEXT_ID), "BLOCK_STATUS of 4 bytes"),
        (wire.build_block_status(CONTEXT_ID, [(0, 0)]), "length 0"),
    ],
)
def test_block_status_violations(payload: bytes, message: str) -> None:
    core = make_core()
    cookie, _ = core.request_block_status(0, 4096)
    with pytest.raises(RemoteProtocolError, match=message):
        feed(core, chunk(cookie, k.ReplyType.BLOCK_STATUS, payload, done=True))


def test_block_status_reply_without_extents_is_a_protocol_error() -> None:
    core = make_core()
    cookie, _ = core.request_block_status(0, 4096)
    with pytest.raises(RemoteProtocolError, match="without extents"):
        feed(core, done_chunk(cookie))


def test_structured_chunk_without_structured_replies_is_a_protocol_error() -> None:
    core = make_core(structured=False)
    cookie, _ = core.request_flush()
    with pytest.raises(RemoteProtocolError, match="without structured replies"):
        feed(core, done_chunk(cookie))


def test_abandoned_read_is_parsed_but_not_written() -> None:
    core = make_core()
    target = bytearray(b"\xee" * 64)
    cookie, _ = core.request_read(0, memoryview(target))
    later = bytearray(8)
    cookie2, _ = core.request_read(64, memoryview(later))
    core.receive_data(data_chunk(cookie, 0, b"a" * 32)[:30])  # part of the first chunk arrives
    assert core.next_event() is NEED_DATA
    core.abandon(cookie)
    events = feed(
        core,
        data_chunk(cookie, 0, b"a" * 32)[30:]
        + hole_chunk(cookie, 32, 32, True)
        + data_chunk(cookie2, 64, b"L" * 8, True),
    )
    assert [e.cookie for e in events] == [cookie, cookie2] and events[0].abandoned
    # 2 data bytes had arrived before the caller gave up; nothing was written after
    assert target == b"aa" + b"\xee" * 62 and later == b"L" * 8


def test_payload_goes_straight_into_the_target_when_the_buffer_is_empty() -> None:
    core = make_core()
    target = bytearray(1000)
    cookie, _ = core.request_read(0, memoryview(target))
    frame = data_chunk(cookie, 0, bytes(range(200)) * 5, done=True)
    core.receive_data(frame[: 28 + 100])  # header, offset and 100 data bytes
    assert core.next_event() is NEED_DATA
    view = core.payload_target()
    assert view is not None and len(view) == 900
    view[:900] = frame[128:]  # what socket.recv_into would do
    core.payload_received(900)
    event = core.next_event()
    assert event is not None and event.cookie == cookie and target == bytes(range(200)) * 5


def test_eof_is_clean_only_after_disconnect_with_nothing_pending() -> None:
    core = make_core()
    core.request_flush()
    with pytest.raises(ConnectionClosedError, match="1 request"):
        core.receive_eof()
    idle = make_core()
    with pytest.raises(ConnectionClosedError):
        idle.receive_eof()
    idle = make_core()  # (the failed one is in ERROR now and refuses every call)
    idle.request_disconnect()
    idle.receive_eof()  # no error
    with pytest.raises(LocalProtocolError):
        idle.request_flush()


def test_local_misuse_is_refused_before_sending() -> None:
    core = make_core(size=4096, max_payload=1024)
    with pytest.raises(LocalProtocolError, match="outside"):
        core.request_read(4000, memoryview(bytearray(200)))
    with pytest.raises(LocalProtocolError, match="maximum"):
        core.request_read(0, memoryview(bytearray(2048)))
    assert core.in_flight == 0


# -- hypothesis: random reply streams ---------------------------------------------------------


def _random_frames(draw: st.DrawFn, cookies: list[int]) -> bytes:
    frames = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["data", "hole", "none", "error", "status", "simple", "junk"]))
        cookie = draw(st.sampled_from([*cookies, 999]))
        done = draw(st.booleans())
        offset = draw(st.integers(0, 300))
        size = draw(st.integers(0, 300))
        if kind == "data":
            frames.append(data_chunk(cookie, offset, bytes(size), done))
        elif kind == "hole":
            frames.append(hole_chunk(cookie, offset, size, done))
        elif kind == "none":
            frames.append(chunk(cookie, k.ReplyType.NONE, bytes(draw(st.integers(0, 2))), done))
        elif kind == "error":
            frames.append(
                chunk(
                    cookie,
                    draw(st.sampled_from([k.ReplyType.ERROR, k.ReplyType.ERROR_OFFSET, 0x8005])),
                    draw(st.binary(max_size=20)),
                    done,
                )
            )
        elif kind == "status":
            frames.append(
                chunk(cookie, k.ReplyType.BLOCK_STATUS, draw(st.binary(max_size=40)), done)
            )
        elif kind == "simple":
            frames.append(
                wire.build_simple_reply(cookie, draw(st.sampled_from([0, 5, 1234])))
                + bytes(draw(st.integers(0, 200)))
            )
        else:
            frames.append(draw(st.binary(max_size=40)))
    return b"".join(frames)


@st.composite
def reply_streams(draw: st.DrawFn) -> tuple[bool, bytes, list[int]]:
    structured = draw(st.booleans())
    cuts = draw(st.lists(st.integers(1, 64), max_size=30))
    return structured, _random_frames(draw, [1, 2, 3, 4]), cuts


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reply_streams())
def test_random_reply_streams_raise_only_remote_protocol_errors(
    case: tuple[bool, bytes, list[int]],
) -> None:
    structured, stream, cuts = case
    core = make_core(structured=structured, size=4096)
    core.request_read(0, memoryview(bytearray(200)))  # cookie 1
    core.request_read(100, memoryview(bytearray(300)))  # cookie 2
    if structured:
        core.request_block_status(0, 4096)  # cookie 3
    else:
        core.request_flush()
    core.request_write(0, 100)  # cookie 4
    position = 0
    try:
        for cut in [*cuts, len(stream)]:  # random fragmentation, then the rest
            core.receive_data(stream[position : position + cut])
            position += cut
            for _ in range(len(stream) + 10):  # each event consumes a frame: bounded
                if core.next_event() is NEED_DATA:
                    break
            else:
                pytest.fail("next_event kept returning events without consuming bytes")
    except RemoteProtocolError:
        pass


@st.composite
def read_replies(draw: st.DrawFn) -> tuple[list[tuple[str, int, int]], list[int]]:
    """A valid structured reply to a READ of [0, 1000): the range cut into data and hole pieces,
    sent in a random order, with random fragmentation."""
    points = sorted(draw(st.sets(st.integers(1, 999), max_size=8)))
    bounds = [0, *points, 1000]
    pieces = [
        (draw(st.sampled_from(["data", "hole"])), a, b - a)
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    order = draw(st.permutations(pieces))
    cuts = draw(st.lists(st.integers(1, 50), max_size=40))
    return list(order), cuts


@settings(max_examples=200, deadline=None)
@given(read_replies())
def test_any_valid_chunking_of_a_read_gives_the_same_bytes(
    case: tuple[list[tuple[str, int, int]], list[int]],
) -> None:
    pieces, cuts = case
    content = bytes(random.Random(1).randbytes(1000))
    expected = bytearray(content)
    stream = b""
    for index, (kind, offset, size) in enumerate(pieces):
        last = index == len(pieces) - 1
        if kind == "data":
            stream += data_chunk(1, offset, content[offset : offset + size], last)
        else:
            stream += hole_chunk(1, offset, size, last)
            expected[offset : offset + size] = bytes(size)
    core = make_core()
    target = bytearray(b"\xaa" * 1000)
    core.request_read(0, memoryview(target))
    events, position = [], 0
    for cut in [*cuts, len(stream)]:
        events += feed(core, stream[position : position + cut])
        position += cut
    assert [e.cookie for e in events] == [1] and events[0].error is None
    assert target == expected


# -- the trio shell over memory streams -------------------------------------------------------


class FakeServer:
    """An NBD server over one memory stream, written with nbdsrv.wire: a RAM disk, structured or
    simple replies, and knobs to trickle, reorder, stall, or break."""

    def __init__(self, size: int = 1 << 20, structured: bool = True, trickle: bool = False) -> None:
        self.disk = bytearray(size)
        self.structured = structured
        self.trickle = trickle
        self.batch = 1  # answer after this many requests, in reverse order
        self.stall_reads = False  # never answer READs
        self.garbage_after = -1  # send garbage instead of the Nth reply
        self.close_after = -1  # close the connection instead of the Nth reply
        self.requests_seen = 0
        self.disconnected = False
        self.stop_reading = False  # after the handshake, read nothing more (and never close)
        self.jitter: random.Random | None = None  # answer each request after a random delay
        self._send_lock = trio.Lock()

    async def send(self, stream: trio.abc.Stream, data: bytes) -> None:
        async with self._send_lock:
            if self.trickle:
                for i in range(len(data)):
                    await stream.send_all(data[i : i + 1])
            else:
                await stream.send_all(data)

    async def send_later(self, stream: trio.abc.Stream, data: bytes, delay: float) -> None:
        await trio.sleep(delay)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send(stream, data)

    async def serve(self, stream: trio.abc.Stream) -> None:
        buffer = nbdsrv.buffer.ReceiveBuffer()

        async def need(count: int) -> bytes:
            while len(buffer) < count:
                data = await stream.receive_some(65536)
                if not data:
                    raise EOFError
                buffer.feed(data)
            taken = buffer.take(count)
            assert taken is not None
            return taken

        try:
            await self.send(stream, wire.build_server_greeting(FIXED | NO_ZEROES))
            await need(4)
            while True:
                header = wire.parse_option_header(await need(16))
                await need(header.length)
                if header.option == k.Option.STRUCTURED_REPLY:
                    answer = k.OptionReply.ACK if self.structured else k.OptionReply.ERR_UNSUP
                    await self.send(stream, reply(k.Option.STRUCTURED_REPLY, answer))
                elif header.option == k.Option.SET_META_CONTEXT:
                    context = wire.build_meta_context_reply(
                        wire.MetaContext(CONTEXT_ID, "base:allocation")
                    )
                    await self.send(
                        stream,
                        reply(k.Option.SET_META_CONTEXT, k.OptionReply.META_CONTEXT, context)
                        + reply(k.Option.SET_META_CONTEXT, k.OptionReply.ACK),
                    )
                elif header.option == k.Option.GO:
                    await self.send(
                        stream,
                        info(wire.ExportInfo(len(self.disk), FLAGS))
                        + info(wire.BlockSizeInfo(1, 4096, 65536))
                        + reply(k.Option.GO, k.OptionReply.ACK),
                    )
                    break
            held: list[bytes] = []
            if self.stop_reading:
                await trio.sleep_forever()
            async with trio.open_nursery() as nursery:
                try:
                    while True:
                        request = wire.parse_request_header(await need(28))
                        if request.command == k.Command.DISC:
                            self.disconnected = True
                            await stream.aclose()
                            return
                        payload = (
                            await need(request.length)
                            if request.command == k.Command.WRITE
                            else b""
                        )
                        self.requests_seen += 1
                        if self.requests_seen == self.close_after:
                            await stream.aclose()
                            return
                        if self.requests_seen == self.garbage_after:
                            await self.send(stream, b"\xde\xad\xbe\xef" * 8)
                            continue
                        if request.command == k.Command.READ and self.stall_reads:
                            continue
                        if self.jitter is not None:
                            delay = self.jitter.random() * 0.002
                            nursery.start_soon(
                                self.send_later, stream, self.answer(request, payload), delay
                            )
                            continue
                        held.append(self.answer(request, payload))
                        if len(held) >= self.batch:
                            for frame in reversed(held):
                                await self.send(stream, frame)
                            held.clear()
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()  # the client went away
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def answer(self, request: wire.Request, payload: bytes) -> bytes:
        start, end = request.offset, request.offset + request.length
        if request.command == k.Command.WRITE:
            self.disk[start:end] = payload
        if request.command == k.Command.READ:
            data = bytes(self.disk[start:end])
            if not self.structured:
                return wire.build_simple_reply(request.cookie) + data
            half = request.length // 2
            if half == 0:
                return data_chunk(request.cookie, start, data, True)
            return data_chunk(request.cookie, start + half, data[half:]) + data_chunk(
                request.cookie, start, data[:half], True
            )
        if request.command == k.Command.BLOCK_STATUS:
            status = wire.build_block_status(CONTEXT_ID, [(request.length, 0)])
            return chunk(request.cookie, k.ReplyType.BLOCK_STATUS, status, True)
        return wire.build_simple_reply(request.cookie)


def connect_to(
    server: FakeServer, nursery: trio.Nursery
) -> Callable[[], Awaitable[trio.abc.Stream]]:
    async def connect() -> trio.abc.Stream:
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve, server_end)
        return client_end

    return connect


def socketpair_to(
    server: FakeServer, nursery: trio.Nursery
) -> Callable[[], Awaitable[trio.abc.Stream]]:
    """Like connect_to, over a real socket pair: the client takes its non-blocking socket path."""

    async def connect() -> trio.abc.Stream:
        client_end, server_end = trio.socket.socketpair()
        nursery.start_soon(server.serve, trio.SocketStream(server_end))
        return trio.SocketStream(client_end)

    return connect


TRANSPORTS = {"memory": connect_to, "socketpair": socketpair_to}
URI = "nbd+unix:///?socket=/nowhere"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("structured", [True, False])
async def test_shell_pipelines_requests_answered_in_reverse_one_byte_at_a_time(
    structured: bool, transport: str
) -> None:
    server = FakeServer(structured=structured, trickle=True)
    server.batch = 8
    async with (
        trio.open_nursery() as nursery,
        nbdsrv.open_client(URI, stream_factory=TRANSPORTS[transport](server, nursery)) as client,
    ):
        assert client.structured_replies is structured
        content = random.Random(2).randbytes(client.size)
        await client.pwrite(content, 0)  # 16 writes of 64 KiB, answered 8 at a time backwards
        results: dict[int, bytes] = {}

        async def read(offset: int) -> None:
            results[offset] = await client.pread(offset, 1000)

        async with trio.open_nursery() as readers:
            for i in range(16):
                readers.start_soon(read, i * 5000)
        assert all(results[i * 5000] == content[i * 5000 : i * 5000 + 1000] for i in range(16))
        assert client.statistics().in_flight == 0
    assert server.disconnected  # NBD_CMD_DISC was sent, and the EOF after it was no error


async def test_shell_garbage_fails_every_pending_request_with_a_protocol_error() -> None:
    server = FakeServer()
    server.stall_reads = True
    server.garbage_after = 4
    async with (
        trio.open_nursery() as nursery,
        nbdsrv.open_client(URI, stream_factory=connect_to(server, nursery)) as client,
    ):
        errors: list[BaseException] = []

        async def read(offset: int) -> None:
            try:
                await client.pread(offset, 100)
            except RemoteProtocolError as exc:
                errors.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as readers:
                for i in range(3):
                    readers.start_soon(read, i * 100)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(RemoteProtocolError):
                    await client.flush()  # the 4th request: answered with garbage
        assert len(errors) == 3 and all("magic" in str(e) for e in errors)
        with pytest.raises(RemoteProtocolError):
            await client.pread(0, 10)


async def test_shell_dropped_connection_fails_pending_requests() -> None:
    server = FakeServer()
    server.stall_reads = True
    server.close_after = 3
    async with (
        trio.open_nursery() as nursery,
        nbdsrv.open_client(URI, stream_factory=connect_to(server, nursery)) as client,
    ):
        with trio.fail_after(5):
            async with trio.open_nursery() as readers:
                for i in range(2):
                    readers.start_soon(_expect_closed, client.pread(i * 100, 100))
                await trio.testing.wait_all_tasks_blocked()
                await _expect_closed(client.flush())


async def _expect_closed(request: Awaitable[object]) -> None:
    with pytest.raises(ConnectionClosedError):
        await request


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_shell_cancelled_read_leaves_the_connection_usable(transport: str) -> None:
    server = FakeServer()
    server.stall_reads = True
    async with (
        trio.open_nursery() as nursery,
        nbdsrv.open_client(URI, stream_factory=TRANSPORTS[transport](server, nursery)) as client,
    ):
        with trio.move_on_after(0.2) as scope:
            await client.pread(0, 100)
        assert scope.cancelled_caught
        assert client.statistics().in_flight == 0
        server.stall_reads = False
        await client.pwrite(b"w" * 10, 50)
        assert await client.pread(50, 10) == b"w" * 10
        # the stalled read's reply never comes: leaving still disconnects cleanly
    assert server.disconnected


async def test_shell_splits_requests_over_the_maximum_payload() -> None:
    server = FakeServer()
    async with (
        trio.open_nursery() as nursery,
        nbdsrv.open_client(URI, stream_factory=connect_to(server, nursery)) as client,
    ):
        data = random.Random(5).randbytes(300_000)
        await client.pwrite(data, 1000)
        assert server.requests_seen == 5  # 65536 bytes at most per request
        assert await client.pread(1000, 300_000) == data
        assert server.requests_seen == 10
        extents = [e async for e in client.iter_extents(0, client.size)]
        assert extents == [nbdsrv.Extent(0, client.size, 0)]


async def test_errors_of_the_body_and_of_connect_pass_through_unwrapped(tmp_path: object) -> None:
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        with pytest.raises(KeyError):  # not an ExceptionGroup from the client's own nursery
            async with nbdsrv.open_client(URI, stream_factory=connect_to(server, nursery)):
                raise KeyError("mine")
    with pytest.raises(FileNotFoundError):
        async with nbdsrv.open_client(f"{tmp_path}/no-such.sock"):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="invalid NBD URI"):
        async with nbdsrv.open_client("nbd://host:bad/"):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="requires TLS"):  # nbds:// never goes plaintext
        async with nbdsrv.open_client("nbds+unix:///?socket=/x", tls="off"):
            pass  # pragma: no cover


async def test_write_cancelled_halfway_fails_the_connection_instead_of_hanging() -> None:
    server = FakeServer(size=64 << 20)
    server.stop_reading = True
    async with trio.open_nursery() as nursery:
        async with nbdsrv.open_client(URI, stream_factory=socketpair_to(server, nursery)) as client:
            with trio.move_on_after(0.5) as scope:
                await client.pwrite(bytes(32 << 20), 0)  # far more than the socket buffers hold
            assert scope.cancelled_caught
            with pytest.raises(ConnectionClosedError, match="half-sent"):
                await client.flush()
        nursery.cancel_scope.cancel()  # the fake server sleeps forever


STRESS_SEEDS = int(os.environ.get("NBDSRV_STRESS_SEEDS", "3"))  # raise it to hunt for races


@pytest.mark.parametrize("connections", [1, 3])
@pytest.mark.parametrize("seed", range(STRESS_SEEDS))
async def test_random_concurrent_requests_with_cancellations_keep_every_answer_right(
    seed: int, connections: int
) -> None:
    """Many tasks issue reads (some split), writes, flushes and block status over a socket pair
    while the server answers each request after a random delay and callers randomly give up.
    Every answer that arrives must be right, nothing may hang, and the connection must end up
    idle and usable."""
    rng = random.Random(seed)
    server = FakeServer(size=4 << 20)
    server.jitter = random.Random(seed + 100)
    static = random.Random(seed + 200).randbytes(1 << 20)  # [0, 1 MiB) is never written
    server.disk[: len(static)] = static
    region = 128 * 1024  # each task writes only its own region above 1 MiB
    async with (
        trio.open_nursery() as nursery,
        nbdsrv.open_client(
            URI, stream_factory=socketpair_to(server, nursery), connections=connections
        ) as client,
    ):
        assert client.statistics().connections == connections

        async def worker(index: int) -> None:
            base = (1 << 20) + index * region
            model: list[int | None] = [0] * region  # None: unknown after a cancelled write
            # In a pool, a cancelled write's pieces may still land after later writes that went
            # over another connection (NBD orders nothing across connections): never trust
            # those bytes again.  One connection to this in-order server keeps the order.
            tainted = bytearray(region)
            for _ in range(30):
                op = rng.choice(["read", "read", "split", "write", "flush", "status", "mine"])
                give_up = rng.random() < 0.25
                unfinished: tuple[int, int] | None = None
                with trio.move_on_after(rng.random() * 0.003 if give_up else 30):
                    if op in ("read", "split"):
                        length = rng.randrange(1, 200_000 if op == "split" else 60_000)
                        offset = rng.randrange(0, len(static) - length)
                        data = await client.pread(offset, length)
                        assert data == static[offset : offset + length]
                    elif op == "write":
                        length = rng.randrange(1, region)
                        offset = rng.randrange(0, region - length + 1)
                        data = rng.randbytes(length)
                        model[offset : offset + length] = [None] * length
                        unfinished = (offset, length)
                        await client.pwrite(data, base + offset)
                        unfinished = None
                        model[offset : offset + length] = list(data)
                    elif op == "flush":
                        await client.flush()
                    elif op == "status":
                        extents = await client.block_status(4096, 1 << 20)
                        assert extents == [nbdsrv.Extent(4096, 1 << 20, 0)]
                    else:
                        data = await client.pread(base, region)
                        for i, expected in enumerate(model):
                            assert expected is None or tainted[i] or data[i] == expected
                if unfinished is not None and connections > 1:
                    offset, length = unfinished
                    tainted[offset : offset + length] = b"\1" * length

        with trio.fail_after(30):
            async with trio.open_nursery() as workers:
                for index in range(12):
                    workers.start_soon(worker, index)
            await trio.sleep(0.01)  # the last abandoned replies arrive (< 2 ms late)
            stats = client.statistics()
            assert stats.in_flight == 0
            assert await client.pread(0, 4096) == static[:4096]
    assert server.disconnected


def test_many_info_replies_in_one_packet_are_all_consumed() -> None:
    server = (
        wire.build_server_greeting(FIXED | NO_ZEROES)
        + reply(k.Option.STRUCTURED_REPLY, k.OptionReply.ERR_UNSUP)
        + b"".join(info(wire.UnknownInfo(999, bytes(4))) for _ in range(500))
        + info(wire.ExportInfo(4096, 1))
        + reply(k.Option.GO, k.OptionReply.ACK)
    )
    assert handshake_with(server).result.size == 4096
