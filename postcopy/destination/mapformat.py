"""The block map's files in a state directory, byte by byte: how they are written and read back.

`postcopy.destination.blockmap` keeps the map in memory and decides when to write; this module
says what the bytes are.  All integers are little-endian and unsigned; every checksum is zlib's
crc32.  A state directory holds three files of the map:

    blockmap          the snapshot: the whole map at one moment (durable)
    blockmap.journal  the changes since that snapshot, one record per change (durable)
    live.map          the map's bytes shared with the C filter (NOT durable, rewritten at open)

The map byte (one per chunk; a disk of D bytes in chunks of C bytes has ceil(D / C) of them):

    bit 0  PRESENT        the chunk's bytes in the local file are authoritative
    bit 1  SOURCE_HOLE    the source's block status said the whole chunk reads as zeros
    bit 2  GUEST_WRITTEN  the guest wrote, trimmed or zeroed (part of) the chunk here
    bits 3-7              zero

The identity header, H = 36 + N + M bytes (both durable files open with it):

    offset     size  field
    0          8     magic: b"PCOPYMAP" in the snapshot, b"PCOPYJNL" in the journal
    8          4     format version: 1
    12         8     disk size in bytes
    20         4     chunk size in bytes (a power of two, 4 KiB to 64 MiB)
    24         8     the source export's size in bytes
    32         2     N: length of the export name
    34         2     M: length of the source id
    36         N     export name, UTF-8
    36+N       M     source id, UTF-8

A magic or a format version other than these refuses the file.

The snapshot, `blockmap`:

    0          H     identity header, magic b"PCOPYMAP"
    H          ...   zlib stream (written at level 1) of the map bytes, ceil(D / C) bytes inflated
    end-4      4     crc32 of every byte before it

The journal, `blockmap.journal`:

    0          H     identity header, magic b"PCOPYJNL"
    H          4     crc32 of the H header bytes
    H+4        24*k  k records, appended in order; each:
                       0   8  first chunk
                       8   8  chunk count (at least 1)
                       16  1  bits to set on chunks [first, first + count) (bits 0-2 only)
                       17  3  zero padding
                       20  4  crc32 of the record's bytes 0-19

A journal started together with a snapshot opens with the marker record (first chunk 2**64-1,
count 0, bits 0), found only as the first record: then a missing snapshot is noticed, and a
missing journal is noticed whenever a snapshot exists.  Replaying a journal sets each record's
bits on the snapshot's map (or on an all-zero map when there is no snapshot); bits are only ever
set, so replay is idempotent and order-free.  A trailing part of a record, and a last whole record
whose checksum does not match, is a torn append: dropped (its chunks are fetched again).  Any
other bad record (a checksum mismatch before the last, a range beyond the disk, a count of 0,
bits beyond bit 2) refuses the state.

The live map, `live.map`: the ceil(D / C) map bytes and nothing else, no header.  It is never
read back: the filter `plugin/fastpath.c` maps it read-only and tests bit 0 of each chunk.

Every refusal is a one-line `StateError` that names the file.  A state file that is not a
regular file (a symbolic link, a fifo, a directory) is refused before a byte is read from it; an
identity that differs in any field from the disk being opened refuses the state directory.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from postcopy.errors import StateError

PRESENT = 0x01
SOURCE_HOLE = 0x02
GUEST_WRITTEN = 0x04
_ALL_BITS = PRESENT | SOURCE_HOLE | GUEST_WRITTEN

SNAPSHOT_FILENAME = "blockmap"
JOURNAL_FILENAME = "blockmap.journal"
LIVE_MAP_FILENAME = "live.map"
SNAPSHOT_MAGIC = b"PCOPYMAP"
JOURNAL_MAGIC = b"PCOPYJNL"
FORMAT_VERSION = 1

_IDENTITY_FIXED = struct.Struct("<8sIQIQHH")  # magic, version, disk size, chunk size,
#                                                source size, len(export name), len(source id)
_RECORD = struct.Struct("<QQBxxxI")  # first chunk, chunk count, bits set, pad, crc32 of the rest
_RECORD_BODY = struct.Struct("<QQBxxx")
_CRC = struct.Struct("<I")
RECORD_SIZE = _RECORD.size
# (first, count, bits) of the record that opens a journal started by a snapshot
_SNAPSHOT_MARKER = (2**64 - 1, 0, 0)


@dataclass(frozen=True)
class MapIdentity:
    """What a state directory belongs to; a mismatch in any field refuses the state."""

    disk_size: int
    chunk_size: int
    source_size: int
    export_name: str
    source_id: str

    def encode(self, magic: bytes) -> bytes:
        """The identity header of a file opening with `magic`."""
        name = self.export_name.encode()
        source_id = self.source_id.encode()
        return (
            _IDENTITY_FIXED.pack(
                magic, FORMAT_VERSION, self.disk_size, self.chunk_size, self.source_size,
                len(name), len(source_id),
            )
            + name
            + source_id
        )

    def describe_mismatch(self, other: MapIdentity) -> str:
        for field in ("disk_size", "chunk_size", "source_size", "export_name", "source_id"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"{field.replace('_', ' ')} {theirs!r} in the state, {mine!r} now"
        return "identical"


def decode_identity(data: bytes, magic: bytes, what: str) -> tuple[MapIdentity, int]:
    """Parse an identity header; returns it and the number of bytes it used."""
    if len(data) < _IDENTITY_FIXED.size:
        raise StateError(f"{what} is truncated")
    got_magic, version, disk_size, chunk_size, source_size, name_len, id_len = (
        _IDENTITY_FIXED.unpack_from(data)
    )
    if got_magic != magic:
        raise StateError(f"{what} is not a postcopy block map (bad magic)")
    if version != FORMAT_VERSION:
        raise StateError(
            f"{what} has format version {version}, this postcopy reads {FORMAT_VERSION}"
        )
    end = _IDENTITY_FIXED.size + name_len + id_len
    if len(data) < end:
        raise StateError(f"{what} is truncated")
    name = data[_IDENTITY_FIXED.size:_IDENTITY_FIXED.size + name_len].decode(errors="replace")
    source_id = data[_IDENTITY_FIXED.size + name_len:end].decode(errors="replace")
    return MapIdentity(disk_size, chunk_size, source_size, name, source_id), end


def check_same_disk(state_dir: Path, identity: MapIdentity, found: MapIdentity) -> None:
    """Refuse a state file written for another disk than `identity`."""
    if found != identity:
        raise StateError(
            f"state directory {state_dir} belongs to another disk: "
            f"{identity.describe_mismatch(found)}"
        )


def read_regular_file(path: Path, what: str) -> bytes:
    """The bytes of a state file; StateError for anything but a readable regular file (a fifo
    would block the open, a directory or device is not ours to read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(f"{what} is a symbolic link, not a regular file") from None
        raise StateError(f"cannot read {what}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateError(f"{what} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError as exc:
        raise StateError(f"cannot read {what}: {exc.strerror}") from None
    finally:
        os.close(fd)


# ----- the snapshot ---------------------------------------------------------------------------


def encode_snapshot(identity: MapIdentity, states: bytes) -> bytes:
    """The bytes of a snapshot file holding the map `states`."""
    data = bytearray(identity.encode(SNAPSHOT_MAGIC))
    data += zlib.compress(states, 1)
    data += _CRC.pack(zlib.crc32(data))
    return bytes(data)


def read_snapshot(path: Path, identity: MapIdentity, chunk_count: int) -> bytearray:
    """The map stored in the snapshot at `path`, which must be `identity`'s with `chunk_count`
    chunks; StateError for a file that is damaged or another disk's."""
    what = f"state file {path}"
    data = read_regular_file(path, what)
    if len(data) < _CRC.size:
        raise StateError(f"{what} is truncated")
    (stored_crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[:-_CRC.size]) != stored_crc:
        raise StateError(f"{what} is corrupt (checksum mismatch)")
    found, header_len = decode_identity(data, SNAPSHOT_MAGIC, what)
    check_same_disk(path.parent, identity, found)
    try:
        states = bytearray(zlib.decompress(memoryview(data)[header_len:-_CRC.size]))
    except zlib.error:
        raise StateError(f"{what} is corrupt (bad compressed map)") from None
    if len(states) != chunk_count:
        raise StateError(f"{what} is corrupt (map length)")
    return states


# ----- the journal ----------------------------------------------------------------------------


def journal_header(identity: MapIdentity) -> bytes:
    """The bytes a journal of `identity` opens with: its identity header and the header's crc."""
    header = identity.encode(JOURNAL_MAGIC)
    return header + _CRC.pack(zlib.crc32(header))


def parse_journal_header(data: bytes, what: str) -> tuple[MapIdentity, int]:
    """The identity in a journal's header, checked against the header's checksum, and where
    the journal's records start."""
    identity, header_len = decode_identity(data, JOURNAL_MAGIC, what)
    if len(data) < header_len + _CRC.size:
        raise StateError(f"{what} is truncated")
    (crc,) = _CRC.unpack_from(data, header_len)
    if crc != zlib.crc32(memoryview(data)[:header_len]):
        raise StateError(f"{what} is corrupt (header checksum mismatch)")
    return identity, header_len + _CRC.size


def encode_records(changes: Iterable[tuple[int, int, int]]) -> bytes:
    """Journal records for `(first chunk, chunk count, bits)` changes, in order."""
    records = bytearray()
    for first, count, bits in changes:
        body = _RECORD_BODY.pack(first, count, bits)
        records += body + _CRC.pack(zlib.crc32(body))
    return bytes(records)


# the record that opens a journal started by a snapshot
SNAPSHOT_MARKER_RECORD = encode_records([_SNAPSHOT_MARKER])


def replay_records(
    data: bytes, start: int, chunk_count: int, what: str,
    apply: Callable[[int, int, int], object],
) -> tuple[int, bool]:
    """Call `apply(first, end, bits)` for each change record of the journal `data` from `start`
    (where `parse_journal_header` says they begin), in order; a torn last record is left out.
    Returns where the last whole record ends and whether the journal opens with the snapshot
    marker.  StateError for any other bad record (`apply` may have been called before it)."""
    position = start
    follows_snapshot = False
    while position + _RECORD.size <= len(data):
        first, count, bits, crc = _RECORD.unpack_from(data, position)
        body = memoryview(data)[position:position + _RECORD_BODY.size]
        if zlib.crc32(body) != crc:
            if position + _RECORD.size == len(data):
                break  # a torn last record: its chunks will be fetched again
            raise StateError(f"{what} is corrupt (record checksum mismatch)")
        if (first, count, bits) == _SNAPSHOT_MARKER and position == start:
            follows_snapshot = True
            position += _RECORD.size
            continue
        if first + count > chunk_count or bits & ~_ALL_BITS or count == 0:
            raise StateError(f"{what} is corrupt (record out of range)")
        apply(first, first + count, bits)
        position += _RECORD.size
    return position, follows_snapshot


# ----- inspecting a state directory -----------------------------------------------------------


def stored_identity(state_dir: Path) -> MapIdentity:
    """The identity recorded in `state_dir`'s journal header (else its snapshot's), for tools
    that inspect a state directory without knowing its disk (`postcopy verify`); pass it to
    `BlockMap.open_read_only`, which checks the rest.  Reads only; StateError when neither
    file is there or readable."""
    state_dir = Path(state_dir)
    journal_path, snapshot_path = state_dir / JOURNAL_FILENAME, state_dir / SNAPSHOT_FILENAME
    if os.path.lexists(journal_path):
        what = f"journal {journal_path}"
        return parse_journal_header(read_regular_file(journal_path, what), what)[0]
    if os.path.lexists(snapshot_path):
        what = f"state file {snapshot_path}"
        return decode_identity(read_regular_file(snapshot_path, what), SNAPSHOT_MAGIC, what)[0]
    raise StateError(f"state directory {state_dir} holds no block map (no journal, no snapshot)")
