"""The sans-IO server core: handshake answers, request validation, reply framing, and hostile or
fragmented byte streams (hypothesis, one-byte trickles)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdsrv import constants as k
from nbdsrv import server_core as core
from nbdsrv import wire
from nbdsrv.errors import ConnectionClosedError, LocalProtocolError, NBDError
from nbdsrv.extent import Extent

SIZE = 1 << 20
EXPORTS = {
    "": core.ExportSpec("", SIZE, read_only=True, description="disk", minimum_block_size=512),
    "rw": core.ExportSpec("rw", SIZE, read_only=False),
}
FLAGS = int(k.ClientFlag.FIXED_NEWSTYLE | k.ClientFlag.NO_ZEROES)


def events_of(conn: core.ServerConnection, data: bytes = b"") -> list[core.Event]:
    if data:
        conn.receive_data(data)
    found: list[core.Event] = []
    for _ in range(10_000):
        event = conn.next_event()
        if event is core.NEED_DATA:
            return found
        assert not isinstance(event, core.NeedData)
        found.append(event)
        if isinstance(event, core.ExportOpened | core.HandshakeEnded | core.TLSRequested):
            return found
        if isinstance(event, core.DisconnectRequested):
            return found
        if isinstance(event, core.CommandRefused) and event.close_after:
            return found
    raise AssertionError("no NEED_DATA after 10000 events")


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split queued option replies into (option, reply_type, payload)."""
    replies = []
    while data:
        header = wire.parse_option_reply_header(data[: wire.OPTION_REPLY_HEADER_SIZE])
        start = wire.OPTION_REPLY_HEADER_SIZE
        replies.append((header.option, header.reply_type, data[start : start + header.length]))
        data = data[start + header.length :]
    return replies


def handshaken(
    structured: bool = True, meta: bool = True, export: str = "", block_size: bool = True
) -> core.ServerConnection:
    conn = core.ServerConnection(EXPORTS)
    greeting = conn.data_to_send()
    assert wire.parse_server_greeting(greeting) == 3
    data = wire.build_client_flags(FLAGS)
    if structured:
        data += wire.build_option(k.Option.STRUCTURED_REPLY)
    if meta:
        query = wire.MetaContextRequest("", (k.BASE_ALLOCATION,))  # "rw" never gets one
        data += wire.build_option(
            k.Option.SET_META_CONTEXT, wire.build_meta_context_request(query)
        )
    wanted = (k.Info.BLOCK_SIZE,) if block_size else ()
    go = wire.build_info_request(wire.InfoRequest(export, wanted))
    data += wire.build_option(k.Option.GO, go)
    events = events_of(conn, data)
    assert isinstance(events[-1], core.ExportOpened)
    conn.data_to_send()
    return conn


def req(command: int, offset: int = 0, length: int = 512, flags: int = 0, cookie: int = 9) -> bytes:
    return wire.build_request_header(wire.Request(flags, command, cookie, offset, length))


# -- handshake --------------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = core.ServerConnection(EXPORTS)
    assert conn.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert conn.state is core.State.RECV_CLIENT_FLAGS


def test_go_answers_export_info_block_size_and_opens_transmission() -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    request = wire.InfoRequest("", (k.Info.NAME, k.Info.DESCRIPTION, k.Info.BLOCK_SIZE))
    data = wire.build_client_flags(FLAGS) + wire.build_option(
        k.Option.GO, wire.build_info_request(request)
    )
    events = events_of(conn, data)
    opened = events[-1]
    assert isinstance(opened, core.ExportOpened)
    assert opened.structured_replies is False and opened.block_status is False
    replies = option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [k.OptionReply.INFO] * 4 + [k.OptionReply.ACK]
    infos = [wire.parse_info(r[2]) for r in replies[:-1]]
    flags = int(k.TransmissionFlag.HAS_FLAGS | k.TransmissionFlag.READ_ONLY)
    flags |= int(k.TransmissionFlag.CAN_MULTI_CONN | k.TransmissionFlag.SEND_CACHE)
    assert infos == [
        wire.ExportInfo(SIZE, flags),
        wire.NameInfo(""),
        wire.DescriptionInfo("disk"),
        wire.BlockSizeInfo(512, 4096, 32 * 1024 * 1024),
    ]
    assert conn.state is core.State.RECV_REQUEST


def test_unknown_options_get_err_unsup_and_negotiation_goes_on() -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    data = (
        wire.build_client_flags(FLAGS)
        + wire.build_option(77, b"whatever")
        + wire.build_option(k.Option.EXTENDED_HEADERS)
        + wire.build_option(k.Option.LIST)
    )
    events = events_of(conn, data)
    assert [e.reply_type for e in events if isinstance(e, core.OptionHandled)] == [
        k.OptionReply.ERR_UNSUP,
        k.OptionReply.ERR_UNSUP,
        k.OptionReply.ACK,
    ]
    replies = option_replies(conn.data_to_send())
    assert [(r[0], r[1]) for r in replies] == [
        (77, k.OptionReply.ERR_UNSUP),
        (k.Option.EXTENDED_HEADERS, k.OptionReply.ERR_UNSUP),
        (k.Option.LIST, k.OptionReply.SERVER),
        (k.Option.LIST, k.OptionReply.SERVER),
        (k.Option.LIST, k.OptionReply.ACK),
    ]
    assert [wire.parse_server_reply(r[2]).name for r in replies[2:4]] == ["", "rw"]
    assert all(len(r[2]) <= 256 for r in replies)


def test_unknown_export_gets_err_unknown_for_go_and_info() -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    bad = wire.build_info_request(wire.InfoRequest("nosuch"))
    data = (
        wire.build_client_flags(FLAGS)
        + wire.build_option(k.Option.INFO, bad)
        + wire.build_option(k.Option.GO, bad)
        + wire.build_option(k.Option.GO, b"\x00\x00\x00\x09short")  # malformed
    )
    events_of(conn, data)
    replies = option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [
        k.OptionReply.ERR_UNKNOWN,
        k.OptionReply.ERR_UNKNOWN,
        k.OptionReply.ERR_INVALID,
    ]
    assert conn.state is core.State.RECV_OPTION


def test_export_name_of_unknown_export_ends_the_handshake() -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    events = events_of(
        conn, wire.build_client_flags(FLAGS) + wire.build_option(k.Option.EXPORT_NAME, b"nosuch")
    )
    assert isinstance(events[-1], core.HandshakeEnded) and events[-1].refused
    assert conn.data_to_send() == b""
    assert conn.state is core.State.CLOSED


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_replies_size_and_flags(no_zeroes: bool) -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    flags = FLAGS if no_zeroes else int(k.ClientFlag.FIXED_NEWSTYLE)
    events = events_of(
        conn, wire.build_client_flags(flags) + wire.build_option(k.Option.EXPORT_NAME, b"rw")
    )
    assert isinstance(events[-1], core.ExportOpened)
    reply = conn.data_to_send()
    assert len(reply) == (10 if no_zeroes else 134)
    info = wire.parse_export_name_reply(reply)
    assert info.size == SIZE and not info.transmission_flags & k.TransmissionFlag.READ_ONLY
    assert info.transmission_flags & k.TransmissionFlag.SEND_FLUSH


def test_abort_is_acknowledged_then_closed() -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    events = events_of(conn, wire.build_client_flags(FLAGS) + wire.build_option(k.Option.ABORT))
    assert isinstance(events[-1], core.HandshakeEnded)
    assert option_replies(conn.data_to_send()) == [(k.Option.ABORT, k.OptionReply.ACK, b"")]
    assert conn.state is core.State.CLOSED


def test_starttls_gets_err_policy_without_tls() -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    events_of(conn, wire.build_client_flags(FLAGS) + wire.build_option(k.Option.STARTTLS))
    assert option_replies(conn.data_to_send())[0][1] == k.OptionReply.ERR_POLICY
    assert conn.state is core.State.RECV_OPTION


def test_tls_required_refuses_options_until_tls_is_established() -> None:
    conn = core.ServerConnection(EXPORTS, tls=core.TLSMode.REQUIRED)
    conn.data_to_send()
    go = wire.build_option(k.Option.GO, wire.build_info_request(wire.InfoRequest("")))
    events_of(conn, wire.build_client_flags(FLAGS) + go)
    assert [r[1] for r in option_replies(conn.data_to_send())] == [k.OptionReply.ERR_TLS_REQD]
    events = events_of(conn, wire.build_option(k.Option.STARTTLS))
    assert isinstance(events[-1], core.TLSRequested)
    assert option_replies(conn.data_to_send()) == [(k.Option.STARTTLS, k.OptionReply.ACK, b"")]
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    conn.tls_established()
    events = events_of(conn, go)
    assert isinstance(events[-1], core.ExportOpened)


def test_set_meta_context_answers_exactly_the_known_contexts_asked_for() -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    query = wire.MetaContextRequest("", ("qemu:dirty-bitmap:x", k.BASE_ALLOCATION, "base:"))
    data = (
        wire.build_client_flags(FLAGS)
        + wire.build_option(k.Option.SET_META_CONTEXT, wire.build_meta_context_request(query))
        + wire.build_option(k.Option.STRUCTURED_REPLY)
        + wire.build_option(k.Option.SET_META_CONTEXT, wire.build_meta_context_request(query))
    )
    events_of(conn, data)
    replies = option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [
        k.OptionReply.ERR_INVALID,  # before structured replies
        k.OptionReply.ACK,
        k.OptionReply.META_CONTEXT,
        k.OptionReply.ACK,
    ]
    assert wire.parse_meta_context_reply(replies[2][2]) == wire.MetaContext(
        core.BASE_ALLOCATION_CONTEXT_ID, k.BASE_ALLOCATION
    )


def test_list_meta_context_without_queries_lists_every_context() -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    listing = wire.build_meta_context_request(wire.MetaContextRequest("", ()))
    unknown_only = wire.build_meta_context_request(wire.MetaContextRequest("", ("x-foo:bar",)))
    data = (
        wire.build_client_flags(FLAGS)
        + wire.build_option(k.Option.STRUCTURED_REPLY)
        + wire.build_option(k.Option.LIST_META_CONTEXT, listing)
        + wire.build_option(k.Option.LIST_META_CONTEXT, unknown_only)
    )
    events_of(conn, data)
    replies = option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [
        k.OptionReply.ACK,
        k.OptionReply.META_CONTEXT,
        k.OptionReply.ACK,
        k.OptionReply.ACK,
    ]
    assert wire.parse_meta_context_reply(replies[1][2]).name == k.BASE_ALLOCATION


def test_meta_context_for_another_export_does_not_enable_block_status() -> None:
    conn = handshaken(meta=True, export="")
    assert conn.export is not None
    other = core.ServerConnection(EXPORTS)
    other.data_to_send()
    query = wire.build_meta_context_request(wire.MetaContextRequest("", (k.BASE_ALLOCATION,)))
    go = wire.build_info_request(wire.InfoRequest("rw"))
    events = events_of(
        other,
        wire.build_client_flags(FLAGS)
        + wire.build_option(k.Option.STRUCTURED_REPLY)
        + wire.build_option(k.Option.SET_META_CONTEXT, query)
        + wire.build_option(k.Option.GO, go),
    )
    opened = events[-1]
    assert isinstance(opened, core.ExportOpened) and opened.block_status is False


def test_unknown_client_flags_close_the_connection() -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1 << 5))
    with pytest.raises(NBDError, match="unknown client flags"):
        conn.next_event()
    assert conn.state is core.State.ERROR  # a protocol error ends in ERROR, not CLOSED
    with pytest.raises(LocalProtocolError, match="unknown client flags"):
        conn.next_event()  # refused, naming the first failure


def test_an_oversized_option_closes_the_connection() -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    conn.receive_data(wire.build_client_flags(FLAGS) + struct.pack(">QII", k.IHAVEOPT, 3, 1 << 30))
    with pytest.raises(NBDError, match="bytes of data"):
        conn.next_event()


# -- transmission -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("export", "data", "errno"),
    [
        ("", req(99), k.Errno.EINVAL),  # unknown command
        ("", req(k.Command.READ, length=0), k.Errno.EINVAL),  # zero length
        ("", req(k.Command.READ, SIZE - 512, 1024), k.Errno.EINVAL),  # past the end
        ("", req(k.Command.READ, 1 << 40, 512), k.Errno.EINVAL),
        ("", req(k.Command.READ, 1, 512), k.Errno.EINVAL),  # unaligned (BLOCK_SIZE agreed)
        ("", req(k.Command.READ, 0, 100), k.Errno.EINVAL),
        ("", req(k.Command.READ, 0, 33 << 20), k.Errno.EINVAL),  # over the maximum payload
        ("", req(k.Command.READ, 0, 33 << 20, k.CommandFlag.DF), k.Errno.EOVERFLOW),
        ("", req(k.Command.READ, flags=k.CommandFlag.FUA), k.Errno.EINVAL),  # FUA not offered
        ("", req(k.Command.READ, flags=k.CommandFlag.REQ_ONE), k.Errno.EINVAL),
        ("", req(k.Command.READ, flags=1 << 9), k.Errno.EINVAL),
        ("", req(k.Command.TRIM), k.Errno.EPERM),  # read-only
        ("", req(k.Command.WRITE_ZEROES), k.Errno.EPERM),
        ("", req(k.Command.FLUSH, 0, 0), k.Errno.EINVAL),  # flush not offered read-only
        ("", req(k.Command.BLOCK_STATUS, SIZE, 512), k.Errno.EINVAL),
        ("rw", req(k.Command.WRITE_ZEROES, SIZE - 512, 1024), k.Errno.ENOSPC),
        ("rw", req(k.Command.TRIM, SIZE - 512, 1024), k.Errno.EINVAL),
        ("rw", req(k.Command.TRIM, 0, 0), k.Errno.EINVAL),
        ("rw", req(k.Command.TRIM, flags=k.CommandFlag.NO_HOLE), k.Errno.EINVAL),
        ("rw", req(k.Command.BLOCK_STATUS), k.Errno.EINVAL),  # no meta context for "rw"
        ("rw", req(k.Command.CACHE, SIZE, 1), k.Errno.EINVAL),
        ("rw", req(k.Command.FLUSH, 0, 512), k.Errno.EINVAL),
    ],
)
def test_invalid_requests_are_refused_with_the_specs_errno(
    export: str, data: bytes, errno: int
) -> None:
    conn = handshaken(export=export)
    events = events_of(conn, data)
    assert len(events) == 1 and isinstance(events[0], core.CommandRefused)
    assert events[0].errno == errno
    assert not events[0].close_after
    # still in sync: a valid request parses next
    events = events_of(conn, req(k.Command.READ, 0, 512, cookie=10))
    assert isinstance(events[0], core.CommandReceived) and events[0].request.cookie == 10


def test_valid_requests_are_received() -> None:
    conn = handshaken(export="rw")
    data = (
        req(k.Command.WRITE, 512, 4, k.CommandFlag.FUA, cookie=1) + b"abcd"
        + req(k.Command.FLUSH, 0, 0, cookie=2)
        + req(k.Command.WRITE_ZEROES, 0, 512, k.CommandFlag.NO_HOLE | k.CommandFlag.FAST_ZERO, 3)
        + req(k.Command.TRIM, SIZE - 1, 1, cookie=4)
        + req(k.Command.CACHE, 0, SIZE, cookie=5)
        + req(k.Command.READ, 0, 65536, k.CommandFlag.DF, cookie=6)
        + req(k.Command.DISC, 0, 0, cookie=7)
    )
    events = events_of(conn, data)
    assert [type(e) for e in events] == [core.CommandReceived] * 6 + [core.DisconnectRequested]
    first = events[0]
    assert isinstance(first, core.CommandReceived) and first.payload == b"abcd"
    assert conn.state is core.State.CLOSED


def test_refused_write_payload_is_skipped_even_if_it_looks_like_requests() -> None:
    conn = handshaken(export="")  # read-only
    payload = req(k.Command.DISC, 0, 0) * 18 + bytes(8)  # 512 bytes of fake requests
    events = events_of(conn, req(k.Command.WRITE, 0, 512, cookie=1) + payload)
    assert len(events) == 1
    refused = events[0]
    assert isinstance(refused, core.CommandRefused) and refused.errno == k.Errno.EPERM
    events = events_of(conn, req(k.Command.READ, cookie=2))
    assert isinstance(events[0], core.CommandReceived) and events[0].request.cookie == 2


def test_an_impossible_write_is_refused_then_the_connection_closes() -> None:
    conn = handshaken(export="rw")
    events = events_of(conn, req(k.Command.WRITE, 0, 0xFFFFFFFF, cookie=3) + b"x" * 100)
    refused = events[-1]
    assert isinstance(refused, core.CommandRefused)
    assert refused.close_after and refused.errno == k.Errno.EINVAL
    assert conn.state is core.State.CLOSED


def test_wrong_magic_is_a_protocol_error() -> None:
    conn = handshaken()
    conn.receive_data(b"\x00" * 28)
    with pytest.raises(NBDError, match="bad request magic"):
        conn.next_event()


def test_peer_closing_between_frames_or_mid_frame() -> None:
    conn = handshaken()
    conn.receive_eof()
    with pytest.raises(ConnectionClosedError):
        conn.next_event()
    conn = handshaken(export="rw")
    conn.receive_data(req(k.Command.WRITE, 0, 512) + b"abc")
    assert conn.next_event() is core.NEED_DATA
    conn.receive_eof()
    with pytest.raises(NBDError, match="mid-frame"):
        conn.next_event()


def test_one_byte_trickle_gives_the_same_events_as_one_block() -> None:
    stream = wire.build_client_flags(FLAGS)
    stream += wire.build_option(k.Option.STRUCTURED_REPLY)
    stream += wire.build_option(k.Option.LIST)
    stream += wire.build_option(k.Option.GO, wire.build_info_request(wire.InfoRequest("rw")))
    stream += req(k.Command.WRITE, 0, 5, cookie=1) + b"hello"
    stream += req(k.Command.READ, 0, 512, cookie=2) + req(k.Command.WRITE, 1 << 30, 3) + b"xyz"
    stream += req(k.Command.DISC, 0, 0)

    def run(chunks: list[bytes]) -> tuple[list[object], bytes]:
        conn = core.ServerConnection(EXPORTS)
        sent = conn.data_to_send()
        seen: list[object] = []
        for chunk in chunks:
            conn.receive_data(chunk)
            while conn.state is not core.State.CLOSED:
                event = conn.next_event()
                if event is core.NEED_DATA:
                    break
                seen.append(event)
            sent += conn.data_to_send()
        return seen, sent

    whole = run([stream])
    trickled = run([stream[i : i + 1] for i in range(len(stream))])
    assert whole == trickled
    assert [type(e).__name__ for e in whole[0]][-4:] == [
        "CommandReceived", "CommandReceived", "CommandRefused", "DisconnectRequested"
    ]


def _request_bytes(command: int, flags: int, offset: int, length: int, tail: bytes) -> bytes:
    return req(command, offset, length, flags) + tail


_requests = st.builds(
    _request_bytes,
    command=st.integers(0, 12),
    flags=st.one_of(st.just(0), st.integers(0, 0xFFFF)),
    offset=st.one_of(st.integers(0, SIZE), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
    tail=st.binary(max_size=64),
)


@settings(max_examples=300, deadline=None)
@given(
    structured=st.booleans(),
    export=st.sampled_from(["", "rw"]),
    pieces=st.lists(st.one_of(_requests, st.binary(max_size=64)), max_size=10),
    cut=st.integers(1, 50),
)
def test_random_request_streams_never_crash_hang_or_pass_invalid_requests(
    structured: bool, export: str, pieces: list[bytes], cut: int
) -> None:
    """Whatever arrives, in whatever fragments, the core yields events, NEED_DATA or an NBDError;
    every request it hands out for execution is within the export and well-formed."""
    conn = handshaken(structured=structured, meta=structured, export=export)
    spec = EXPORTS[export]
    stream = b"".join(pieces)
    chunks = [stream[i : i + cut] for i in range(0, len(stream), cut)] + [b""]
    for chunk in chunks:
        if chunk:
            conn.receive_data(chunk)
        else:
            conn.receive_eof()  # the peer closes after the last piece
        try:
            for _ in range(1000):
                event = conn.next_event()
                if event is core.NEED_DATA or isinstance(event, core.DisconnectRequested):
                    break
                if isinstance(event, core.CommandRefused) and event.close_after:
                    return
                if isinstance(event, core.CommandReceived):
                    request = event.request
                    assert request.command in {c.value for c in k.Command}
                    assert request.offset + request.length <= spec.size
                    if request.command == k.Command.FLUSH:
                        assert request.offset == request.length == 0
                    else:
                        assert request.length > 0
                    if request.command == k.Command.WRITE:
                        assert event.payload is not None
                        assert len(event.payload) == request.length
                    else:
                        assert event.payload is None
                    if spec.read_only:
                        assert request.command not in (
                            k.Command.WRITE, k.Command.TRIM, k.Command.WRITE_ZEROES
                        )
            else:
                raise AssertionError("no NEED_DATA in 1000 events")
        except NBDError:
            return
        if conn.state is core.State.CLOSED:
            return


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_handshake_bytes_never_crash_the_core(data: bytes) -> None:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    conn.receive_data(wire.build_client_flags(FLAGS) + data)
    try:
        for _ in range(1000):
            event = conn.next_event()
            if event is core.NEED_DATA or isinstance(
                event, core.ExportOpened | core.HandshakeEnded
            ):
                break
        replies = conn.data_to_send()
        option_replies(replies)  # whatever was queued is well-formed
    except NBDError:
        pass


# -- replies ----------------------------------------------------------------------------------


def parse_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    chunks = []
    while data:
        header = wire.parse_structured_reply_header(data[:20])
        chunks.append((header.flags, header.reply_type, data[20 : 20 + header.length]))
        data = data[20 + header.length :]
    return chunks


def joined(buffers: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def test_read_reply_sends_holes_as_offset_hole_chunks() -> None:
    conn = handshaken()
    request = wire.Request(0, k.Command.READ, 5, 4096, 4096)
    data = memoryview(bytes(range(256)) * 16)
    holes = [Extent(4096, 1024, 3), Extent(6144, 1024, 3)]
    chunks = parse_chunks(joined(conn.read_reply(request, data, holes)))
    assert [(c[0], c[1]) for c in chunks] == [
        (0, k.ReplyType.OFFSET_HOLE),
        (0, k.ReplyType.OFFSET_DATA),
        (0, k.ReplyType.OFFSET_HOLE),
        (k.ReplyFlag.DONE, k.ReplyType.OFFSET_DATA),
    ]
    assert wire.parse_offset_hole(chunks[0][2]) == (4096, 1024)
    assert chunks[1][2] == struct.pack(">Q", 5120) + bytes(data[1024:2048])
    assert wire.parse_offset_hole(chunks[2][2]) == (6144, 1024)
    assert chunks[3][2] == struct.pack(">Q", 7168) + bytes(data[3072:])


def test_read_reply_of_a_whole_hole_is_one_hole_chunk_with_done() -> None:
    conn = handshaken()
    request = wire.Request(0, k.Command.READ, 5, 0, 65536)
    chunks = parse_chunks(joined(conn.read_reply(request, memoryview(bytes(65536)),
                                                 [Extent(0, 1 << 20, 3)])))
    assert chunks == [(k.ReplyFlag.DONE, k.ReplyType.OFFSET_HOLE, struct.pack(">QI", 0, 65536))]


def test_read_reply_with_df_is_one_data_chunk() -> None:
    conn = handshaken()
    request = wire.Request(k.CommandFlag.DF, k.Command.READ, 5, 0, 2048)
    data = memoryview(b"a" * 1024 + bytes(1024))
    chunks = parse_chunks(joined(conn.read_reply(request, data, [Extent(1024, 1024, 3)])))
    assert chunks == [(k.ReplyFlag.DONE, k.ReplyType.OFFSET_DATA, bytes(8) + bytes(data))]


def test_simple_replies_without_structured_negotiation() -> None:
    conn = handshaken(structured=False, meta=False)
    request = wire.Request(0, k.Command.READ, 77, 0, 4)
    assert joined(conn.read_reply(request, memoryview(b"abcd"), [Extent(0, 4, 3)])) == (
        wire.build_simple_reply(77) + b"abcd"
    )
    assert conn.error_reply(request, k.Errno.EIO, "x") == wire.build_simple_reply(77, 5)


def test_error_reply_is_a_short_error_chunk() -> None:
    conn = handshaken()
    request = wire.Request(0, k.Command.READ, 8, 0, 4)
    chunks = parse_chunks(conn.error_reply(request, 28, "m" * 5000))
    assert chunks[0][0] == k.ReplyFlag.DONE and chunks[0][1] == k.ReplyType.ERROR
    assert len(chunks[0][2]) < 1000
    assert wire.parse_error_chunk(k.ReplyType.ERROR, chunks[0][2]).error == 28
    # host errnos the protocol lacks are mapped (EROFS -> EPERM)
    chunks = parse_chunks(conn.error_reply(request, 30, ""))
    assert wire.parse_error_chunk(k.ReplyType.ERROR, chunks[0][2]).error == k.Errno.EPERM


def test_block_status_reply_clips_merges_and_honours_req_one() -> None:
    conn = handshaken()
    extents = [Extent(0, 4096, 0), Extent(4096, 4096, 0), Extent(8192, 8192, 3)]
    request = wire.Request(0, k.Command.BLOCK_STATUS, 4, 1024, 12288)
    chunk = parse_chunks(conn.block_status_reply(request, extents))[0]
    assert chunk[0] == k.ReplyFlag.DONE and chunk[1] == k.ReplyType.BLOCK_STATUS
    status = wire.parse_block_status(chunk[2])
    assert status.context_id == core.BASE_ALLOCATION_CONTEXT_ID
    assert status.descriptors == ((7168, 0), (5120, 3))
    one = wire.Request(k.CommandFlag.REQ_ONE, k.Command.BLOCK_STATUS, 4, 1024, 12288)
    status = wire.parse_block_status(parse_chunks(conn.block_status_reply(one, extents))[0][2])
    assert status.descriptors == ((7168, 0),)
