"""Round trips of the wire module: golden bytes parse, build back, and the struct fast paths agree
with the construct declarations."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdsrv import constants as k
from nbdsrv import wire
from nbdsrv.errors import RemoteProtocolError


def test_server_greeting_golden_bytes() -> None:
    golden = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert wire.build_server_greeting(3) == golden
    assert wire.parse_server_greeting(golden) == 3


def test_server_greeting_oldstyle_is_refused() -> None:
    oldstyle = b"NBDMAGIC" + bytes.fromhex("00420281861253") + b"\x00" * 3
    with pytest.raises(RemoteProtocolError, match="malformed server greeting"):
        wire.parse_server_greeting(oldstyle)


def test_go_request_golden_bytes() -> None:
    golden = b"\x00\x00\x00\x04disk" + b"\x00\x02" + b"\x00\x03\x00\x01"
    request = wire.InfoRequest("disk", (k.Info.BLOCK_SIZE, k.Info.NAME))
    assert wire.build_info_request(request) == golden
    assert wire.parse_info_request(golden) == request


def test_go_request_with_trailing_garbage_is_malformed() -> None:
    golden = b"\x00\x00\x00\x00" + b"\x00\x00" + b"junk"
    with pytest.raises(RemoteProtocolError):
        wire.parse_info_request(golden)


def test_go_request_with_name_longer_than_data_is_malformed() -> None:
    with pytest.raises(RemoteProtocolError):
        wire.parse_info_request(b"\xff\xff\xff\xffabc")


def test_meta_context_request_round_trip() -> None:
    request = wire.MetaContextRequest("", ("base:allocation", "qemu:dirty-bitmap:x"))
    data = wire.build_meta_context_request(request)
    assert data[:8] == b"\x00\x00\x00\x00\x00\x00\x00\x02"
    assert wire.parse_meta_context_request(data) == request


@pytest.mark.parametrize(
    "item",
    [
        wire.ExportInfo(1 << 40, 0x1CD),
        wire.NameInfo("disk"),
        wire.DescriptionInfo("a disk"),
        wire.BlockSizeInfo(1, 4096, 32 << 20),
        wire.UnknownInfo(77, b"xyz"),
    ],
)
def test_info_items_round_trip(item: wire.InfoItem) -> None:
    assert wire.parse_info(wire.build_info(item)) == item


def test_info_export_must_be_12_bytes() -> None:
    with pytest.raises(RemoteProtocolError, match="expected 12"):
        wire.parse_info(wire.build_info(wire.ExportInfo(1, 1)) + b"\x00")


def test_export_name_reply_with_and_without_zeroes() -> None:
    assert len(wire.build_export_name_reply(512, 1, no_zeroes=True)) == 10
    padded = wire.build_export_name_reply(512, 1, no_zeroes=False)
    assert len(padded) == 134 and padded[10:] == bytes(124)
    assert wire.parse_export_name_reply(padded) == wire.ExportInfo(512, 1)


requests = st.builds(
    wire.Request,
    flags=st.integers(0, 0xFFFF),
    command=st.integers(0, 0xFFFF),
    cookie=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
)


@given(requests)
def test_request_header_struct_agrees_with_construct(request: wire.Request) -> None:
    fast = wire.build_request_header(request)
    reference = wire.RequestHeaderStruct.build(
        {
            "flags": request.flags,
            "type": request.command,
            "cookie": request.cookie,
            "offset": request.offset,
            "length": request.length,
        }
    )
    assert fast == reference
    assert wire.parse_request_header(fast) == request


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_simple_reply_struct_agrees_with_construct(error: int, cookie: int) -> None:
    fast = wire.build_simple_reply(cookie, error)
    assert fast == wire.SimpleReplyStruct.build({"error": error, "cookie": cookie})
    assert wire.parse_simple_reply(fast) == wire.SimpleReply(error, cookie)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1),
       st.integers(0, 2**32 - 1))
def test_structured_header_struct_agrees_with_construct(
    flags: int, reply_type: int, cookie: int, length: int
) -> None:
    fast = wire.build_structured_reply_header(flags, reply_type, cookie, length)
    reference = wire.StructuredReplyHeaderStruct.build(
        {"flags": flags, "type": reply_type, "cookie": cookie, "length": length}
    )
    assert fast == reference
    parsed = wire.parse_structured_reply_header(fast)
    assert parsed == wire.StructuredReplyHeader(flags, reply_type, cookie, length)


def test_bad_request_magic_is_a_remote_error() -> None:
    with pytest.raises(RemoteProtocolError, match="bad request magic"):
        wire.parse_request_header(b"\x00" * 28)


def test_block_status_round_trip_and_bad_length() -> None:
    data = wire.build_block_status(1, [(65536, 0), (4096, 3)])
    assert data == bytes.fromhex("00000001" "00010000" "00000000" "00001000" "00000003")
    assert wire.parse_block_status(data) == wire.BlockStatusChunk(1, ((65536, 0), (4096, 3)))
    with pytest.raises(RemoteProtocolError):
        wire.parse_block_status(data[:-1])


def test_error_chunks_round_trip() -> None:
    plain = wire.build_error_chunk(k.Errno.EIO, "disk on fire")
    assert wire.parse_error_chunk(k.ReplyType.ERROR, plain) == wire.ErrorChunk(5, "disk on fire")
    with_offset = wire.build_error_chunk(k.Errno.EINVAL, "bad", offset=4096)
    assert wire.parse_error_chunk(k.ReplyType.ERROR_OFFSET, with_offset) == wire.ErrorChunk(
        22, "bad", 4096
    )


def test_error_chunk_message_is_kept_short() -> None:
    data = wire.build_error_chunk(k.Errno.EIO, "x" * 5000)
    assert len(data) < 1000


@given(st.binary(max_size=64))
def test_parsers_never_raise_anything_but_remote_protocol_error(data: bytes) -> None:
    parsers = [
        wire.parse_server_greeting,
        wire.parse_option_header,
        wire.parse_option_reply_header,
        wire.parse_info_request,
        wire.parse_meta_context_request,
        wire.parse_meta_context_reply,
        wire.parse_server_reply,
        wire.parse_info,
        wire.parse_request_header,
        wire.parse_simple_reply,
        wire.parse_structured_reply_header,
        wire.parse_offset_hole,
        wire.parse_block_status,
        lambda d: wire.parse_error_chunk(k.ReplyType.ERROR, d),
        lambda d: wire.parse_error_chunk(k.ReplyType.ERROR_OFFSET, d),
        lambda d: wire.parse_error_chunk(0x8005, d),
    ]
    for parse in parsers:
        with contextlib.suppress(RemoteProtocolError):
            parse(data)


def test_errno_mapping() -> None:
    assert k.errno_to_wire(30) == k.Errno.EPERM  # EROFS
    assert k.errno_to_wire(2) == k.Errno.EIO  # ENOENT has no wire value
    assert k.errno_from_wire(999) == k.Errno.EINVAL
    assert k.errno_from_wire(28) == 28


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_offset_hole_struct_agrees_with_construct(offset: int, size: int) -> None:
    fast = wire.build_offset_hole(offset, size)
    assert fast == wire.OffsetHoleData.build({"offset": offset, "hole_size": size})
    assert wire.parse_offset_hole(fast) == (offset, size)


@given(st.integers(0, 2**32 - 1), st.lists(st.tuples(st.integers(0, 2**32 - 1),
                                                     st.integers(0, 2**32 - 1)), min_size=1))
def test_block_status_struct_agrees_with_construct(
    context_id: int, descriptors: list[tuple[int, int]]
) -> None:
    fast = wire.build_block_status(context_id, descriptors)
    items = [{"length": length, "status_flags": flags} for length, flags in descriptors]
    assert fast == wire.BlockStatusData.build({"context_id": context_id, "descriptors": items})
    assert wire.parse_block_status(fast) == wire.BlockStatusChunk(context_id, tuple(descriptors))
