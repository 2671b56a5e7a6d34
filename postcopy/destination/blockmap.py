"""The block map: which chunks of the destination disk are present, and its durable journal.

The disk is split into chunks of `chunk_size` bytes (a power of two; the last chunk may be short).
In memory the map is one `bytearray` with one byte per chunk (16 MiB for 1 TiB at 64 KiB chunks;
a fresh one is `calloc`ed, so start-up touches nothing in proportion to the disk).  Each byte holds
three bits that are only ever set, never cleared:

    PRESENT        the chunk's bytes in the local file are authoritative
    SOURCE_HOLE    the source's block status said the whole chunk is a hole / reads as zeros
    GUEST_WRITTEN  the guest wrote, trimmed or zeroed (part of) the chunk here (rollback needs it)

A chunk is MISSING when PRESENT is clear.  Range questions ("is every chunk of this read present?",
"where is the next missing run?") are answered by a compiled regular expression searching the
bytearray in C, so no Python loop runs per chunk.

The engine opens its map with `live_mirror=True`: then the bytes live in a MAP_SHARED `mmap` of
`live.map` in the state directory instead of the bytearray, so that the nbdkit filter
`plugin/fastpath.c` (same process, its own read-only mapping) serves reads of PRESENT chunks in C.
The file is NOT durable state: it is rewritten from the snapshot and journal at every open (a new
file renamed into place, its blocks allocated then) and never read back.  It is safe to share
because a PRESENT bit is set only after the chunk's data was written to the local file and bits
are never cleared; on x86 the map store cannot pass the older data write (stores are not
reordered with older stores), so a reader that sees the bit reads complete data.  When a sync
fails (see Failures) the mapping is cleared (the map keeps its bits in a private copy): the
filter then serves nothing.

Persistence (in the state directory) is a snapshot plus an append-only journal:

    blockmap          header (magic, version, identity) + zlib(map bytes) + crc32 of all of it
    blockmap.journal  header (magic, version, identity, crc32) + 24-byte records
                      (first chunk, chunk count, bits to set, crc32 of the record)

A journal started by a snapshot opens with a marker record (chunk 2**64-1, count 0), so a state
directory whose snapshot is gone, or whose journal is gone, is refused instead of silently
forgetting PRESENT and GUEST_WRITTEN bits (which would serve the source's stale data over the
guest's writes).

Because bits are only ever set, replaying journal records is idempotent and order-free, so a crash
between writing a new snapshot and resetting the journal is harmless.  A torn last record is
dropped (its chunks are fetched again).  The identity (disk size, chunk size, source export size,
export name and source id) must match, or the state is refused with a one-line `StateError`.

Durability order lives in `BlockMap.make_durable`: changes made since the last call are captured,
the data file is fdatasync'd (by the caller's callback), and only then are the captured changes
appended to the journal and fsync'd (or written as a new snapshot when the journal grew large).
A PRESENT bit therefore never reaches disk before the chunk's data does.

Failures.  Linux reports a failed writeback to fsync/fdatasync once per open file and then marks
the pages clean, so a failed sync can never be retried into a success: a failed sync of the data
file, of the journal or of a snapshot (or its directory) makes the map *failed* for good
(`durability_failure`): every later `make_durable` raises `DurabilityError` (EIO) without
persisting anything, so no bit captured before the failure (or marked after it) reaches the disk,
and a restart fetches again whatever the persisted map does not cover.  A failed *write* (ENOSPC
on a full filesystem, EDQUOT...) is not permanent: a journal append writes whole records with
`pwrite` at the end of the last good record and, when it fails (a short write included), cuts the
file back there, so the journal never holds half a record followed by more records; the captured
changes stay pending and the next `make_durable` retries them.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from postcopy.errors import StateError
from postcopy.fsutil import SyncError, write_file_atomically

PRESENT = 0x01
SOURCE_HOLE = 0x02
GUEST_WRITTEN = 0x04

DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 * 1024 * 1024

SNAPSHOT_FILENAME = "blockmap"
LIVE_MAP_FILENAME = "live.map"
JOURNAL_FILENAME = "blockmap.journal"
SNAPSHOT_MAGIC = b"PCOPYMAP"
JOURNAL_MAGIC = b"PCOPYJNL"
FORMAT_VERSION = 1
# Compact the journal into a snapshot once it holds this many bytes of records.
JOURNAL_COMPACT_BYTES = 1024 * 1024

_RECORD = struct.Struct("<QQBxxxI")  # first chunk, chunk count, bits set, pad, crc32 of the rest
_RECORD_BODY = struct.Struct("<QQBxxx")
_IDENTITY_FIXED = struct.Struct("<8sIQIQHH")  # magic, version, disk size, chunk size,
#                                                source size, len(export name), len(source id)
_CRC = struct.Struct("<I")
# (first, count, bits) of the record that opens a journal started by a snapshot
_SNAPSHOT_MARKER = (2**64 - 1, 0, 0)

# A byte whose PRESENT bit is clear (values 0, 2, 4, 6): runs of them are missing chunks.
_MISSING_BYTE = re.compile(b"[\x00\x02\x04\x06]")
_MISSING_RUN = re.compile(b"[\x00\x02\x04\x06]+")
_PRESENT_RUN = re.compile(b"[\x01\x03\x05\x07]+")
_GUEST_WRITTEN_RUN = re.compile(b"[\x04-\x07]+")
_NOT_GUEST_WRITTEN_BYTE = re.compile(b"[\x00-\x03]")
# The run at a position, whatever its class, in ONE match, so that the class is decided from the
# same bytes as the run (a chunk may turn PRESENT at any moment).  The alternatives follow the
# only transitions bits allow (missing data -> missing hole -> present, never back): even if the
# byte changed between two alternatives' tries (free-threaded Python), the first alternative
# that fails cannot succeed any more and a later one must, so a match of at least one byte is
# always found.
_RUN_AT = re.compile(
    b"(?P<data>[\x00\x04]+)|(?P<hole>[\x02\x06]+)|(?P<present>[\x01\x03\x05\x07]+)"
)
_ONLY_GUEST_WRITTEN_BIT = bytes(b & GUEST_WRITTEN for b in range(256))
_ONLY_PRESENT_BIT = bytes(b & PRESENT for b in range(256))
_OR_TABLES = {bits: bytes(b | bits for b in range(256)) for bits in range(8)}


@dataclass(frozen=True)
class MapIdentity:
    """What a state directory belongs to; a mismatch in any field refuses the state."""

    disk_size: int
    chunk_size: int
    source_size: int
    export_name: str
    source_id: str

    def encode(self, magic: bytes) -> bytes:
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


class DurabilityError(OSError):
    """A sync of the data file or of the map failed: the map is failed for good (errno EIO)."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, reason)


def _decode_identity(data: bytes, magic: bytes, what: str) -> tuple[MapIdentity, int]:
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


def _read_regular_file(path: Path, what: str) -> bytes:
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


def _parse_journal_header(data: bytes, what: str) -> tuple[MapIdentity, int]:
    """The identity in a journal's header, checked against the header's checksum, and where
    the journal's records start."""
    identity, header_len = _decode_identity(data, JOURNAL_MAGIC, what)
    if len(data) < header_len + _CRC.size:
        raise StateError(f"{what} is truncated")
    (crc,) = _CRC.unpack_from(data, header_len)
    if crc != zlib.crc32(memoryview(data)[:header_len]):
        raise StateError(f"{what} is corrupt (header checksum mismatch)")
    return identity, header_len + _CRC.size


def _check_same_disk(state_dir: Path, identity: MapIdentity, found: MapIdentity) -> None:
    """Refuse a state file written for another disk than `identity`."""
    if found != identity:
        raise StateError(
            f"state directory {state_dir} belongs to another disk: "
            f"{identity.describe_mismatch(found)}"
        )


def stored_identity(state_dir: Path) -> MapIdentity:
    """The identity recorded in `state_dir`'s journal header (else its snapshot's), for tools
    that inspect a state directory without knowing its disk (`postcopy verify`); pass it to
    `BlockMap.open_read_only`, which checks the rest.  Reads only; StateError when neither
    file is there or readable."""
    state_dir = Path(state_dir)
    journal_path, snapshot_path = state_dir / JOURNAL_FILENAME, state_dir / SNAPSHOT_FILENAME
    if os.path.lexists(journal_path):
        what = f"journal {journal_path}"
        return _parse_journal_header(_read_regular_file(journal_path, what), what)[0]
    if os.path.lexists(snapshot_path):
        what = f"state file {snapshot_path}"
        return _decode_identity(_read_regular_file(snapshot_path, what), SNAPSHOT_MAGIC, what)[0]
    raise StateError(f"state directory {state_dir} holds no block map (no journal, no snapshot)")


def check_chunk_size(chunk_size: int) -> None:
    if (
        chunk_size < MIN_CHUNK_SIZE
        or chunk_size > MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise StateError(
            f"chunk size {chunk_size} must be a power of two between {MIN_CHUNK_SIZE} and "
            f"{MAX_CHUNK_SIZE}"
        )


class BlockMap:
    """The chunk map of one disk, with its journal in `state_dir`.  Thread-safe.

    Chunk ranges are half-open `[first, end)` chunk indexes.  Mutations take `self.lock`;
    callers that must check-and-update atomically together with a data write hold their own lock
    around both (see `postcopy.destination.engine`).
    """

    def __init__(
        self, state_dir: Path, identity: MapIdentity, states: bytearray, *, fresh: bool = False
    ) -> None:
        self.state_dir = Path(state_dir)
        self.identity = identity
        self.disk_size = identity.disk_size
        self.chunk_size = identity.chunk_size
        self.chunk_shift = identity.chunk_size.bit_length() - 1
        self.chunk_count = len(states)
        self._states: bytearray | mmap.mmap = states
        self.lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._pending: list[tuple[int, int, int]] = []
        if not fresh:
            self._present_count = self.chunk_count - states.translate(_ONLY_PRESENT_BIT).count(0)
            self._guest_written_count = (
                self.chunk_count - states.translate(_ONLY_GUEST_WRITTEN_BIT).count(0)
            )
        else:  # a fresh map: nothing to count
            self._present_count = self._guest_written_count = 0
        self._journal_fd = -1
        # bytes of records (marker included) after the journal header, up to the end of the last
        # record that was written whole and fsync'd: appends are written at that offset
        self._journal_bytes = 0
        self._journal_header_bytes = len(identity.encode(JOURNAL_MAGIC)) + _CRC.size
        # why a sync failed (then nothing is ever persisted again), or None
        self._durability_failure: str | None = None
        self._withdrawn_mirror: mmap.mmap | None = None
        self._follows_snapshot = False  # the journal began with the snapshot marker
        # tests: called with the name of each durability step as it completes ("captured",
        # "data-synced", "journal-written" (records written, not yet fsync'd), "map-persisted")
        self.durability_probe: Callable[[str], None] | None = None

    # ----- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls, state_dir: Path, identity: MapIdentity, *, live_mirror: bool = False
    ) -> BlockMap:
        """Load the map of `state_dir` (or start an empty one there); refuse a mismatch.

        With `live_mirror`, the map's bytes are then kept in a shared mapping of `live.map`
        (see the module docstring): only the engine asks for it."""
        block_map, journal_end = cls._load(state_dir, identity)
        block_map._open_journal(journal_end)
        if live_mirror:
            try:
                block_map._publish_live_map()
            except BaseException:
                block_map.close()
                raise
        return block_map

    @classmethod
    def open_read_only(cls, state_dir: Path, identity: MapIdentity) -> BlockMap:
        """Load the map of `state_dir` and refuse a mismatch exactly as `open` does, but write
        nothing: no journal is created, a torn tail is left in place, no live map is published
        (`postcopy receive` checks a state directory with it before the engine opens it).  The
        result answers queries only: never mark it or make it durable."""
        return cls._load(state_dir, identity)[0]

    @classmethod
    def _load(cls, state_dir: Path, identity: MapIdentity) -> tuple[BlockMap, int | None]:
        """Read and check the map of `state_dir`, writing nothing: its snapshot, its journal's
        header, and the journal's whole records replayed.  Every refusal of `open` and of
        `open_read_only` is made here.  Returns the map and where the journal's last whole
        record ends (None when there is no journal yet: a fresh state directory)."""
        check_chunk_size(identity.chunk_size)
        state_dir = Path(state_dir)
        if not state_dir.is_dir():
            raise StateError(f"state directory {state_dir} does not exist")
        chunk_count = -(-identity.disk_size // identity.chunk_size)
        snapshot_path = state_dir / SNAPSHOT_FILENAME
        journal_path = state_dir / JOURNAL_FILENAME
        fresh = not os.path.lexists(snapshot_path)
        if fresh:
            states = bytearray(chunk_count)  # calloc: no page is touched yet
        else:
            states = cls._load_snapshot(snapshot_path, identity, chunk_count)
        block_map = cls(state_dir, identity, states, fresh=fresh)
        if not os.path.lexists(journal_path):
            if not fresh:
                raise StateError(
                    f"journal {journal_path} is missing: the changes made since the snapshot "
                    "are lost (use a new state directory)"
                )
            return block_map, None
        what = f"journal {journal_path}"
        data = _read_regular_file(journal_path, what)
        found, records_start = _parse_journal_header(data, what)
        _check_same_disk(state_dir, identity, found)
        journal_end = block_map._replay_journal(data, records_start, what)
        if fresh and block_map._follows_snapshot:
            raise StateError(
                f"state file {snapshot_path} is missing but its journal continues it "
                "(use a new state directory)"
            )
        return block_map, journal_end

    def _publish_live_map(self) -> None:
        """Move the map's bytes into a fresh shared mapping of `live.map` (written under a
        temporary name and renamed into place, so a planted symlink is replaced, not followed;
        its blocks allocated up front, so that a full disk refuses the open instead of killing
        the process later)."""
        if not self.chunk_count:
            return  # an empty disk: mmap cannot map zero bytes, and there is nothing to serve
        final_path = self.state_dir / LIVE_MAP_FILENAME
        temporary_path = self.state_dir / (LIVE_MAP_FILENAME + ".tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary_path)
            fd = os.open(
                temporary_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
            try:
                os.ftruncate(fd, self.chunk_count)
                # allocated now: a store into a page of a sparse shared mapping that the
                # filesystem cannot allocate (a full disk) is a SIGBUS, not an error
                os.posix_fallocate(fd, 0, self.chunk_count)
                states = self._states
                assert isinstance(states, bytearray)  # published once, at open
                if states.count(0) != self.chunk_count:
                    view = memoryview(states)
                    written = 0
                    while written < len(view):
                        written += os.pwrite(fd, view[written:], written)
                live = mmap.mmap(fd, self.chunk_count, mmap.MAP_SHARED)
            finally:
                os.close(fd)
            os.replace(temporary_path, final_path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # on a full disk it would keep the space
                os.unlink(temporary_path)
            raise StateError(f"cannot create {final_path}: {exc.strerror}") from None
        with self.lock:
            self._states = live

    @staticmethod
    def _load_snapshot(path: Path, identity: MapIdentity, chunk_count: int) -> bytearray:
        what = f"state file {path}"
        data = _read_regular_file(path, what)
        if len(data) < _CRC.size:
            raise StateError(f"{what} is truncated")
        (stored_crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(memoryview(data)[:-_CRC.size]) != stored_crc:
            raise StateError(f"{what} is corrupt (checksum mismatch)")
        found, header_len = _decode_identity(data, SNAPSHOT_MAGIC, what)
        _check_same_disk(path.parent, identity, found)
        try:
            states = bytearray(zlib.decompress(memoryview(data)[header_len:-_CRC.size]))
        except zlib.error:
            raise StateError(f"{what} is corrupt (bad compressed map)") from None
        if len(states) != chunk_count:
            raise StateError(f"{what} is corrupt (map length)")
        return states

    def _open_journal(self, journal_end: int | None) -> None:
        """Open the journal (checked and replayed by `_load`) for appends after `journal_end`,
        cutting a torn tail; create it when there is none (`journal_end` None)."""
        path = self.state_dir / JOURNAL_FILENAME
        header = self.identity.encode(JOURNAL_MAGIC)
        header += _CRC.pack(zlib.crc32(header))
        if journal_end is None:
            write_file_atomically(path, header)
            journal_end = len(header)
        self._journal_fd = os.open(path, os.O_WRONLY)
        os.ftruncate(self._journal_fd, journal_end)  # drop a torn tail
        os.lseek(self._journal_fd, journal_end, os.SEEK_SET)
        self._journal_bytes = journal_end - len(header)

    def _replay_journal(self, data: bytes, start: int, what: str) -> int:
        position = start
        while position + _RECORD.size <= len(data):
            first, count, bits, crc = _RECORD.unpack_from(data, position)
            body = memoryview(data)[position:position + _RECORD_BODY.size]
            if zlib.crc32(body) != crc:
                if position + _RECORD.size == len(data):
                    break  # a torn last record: its chunks will be fetched again
                raise StateError(f"{what} is corrupt (record checksum mismatch)")
            if (first, count, bits) == _SNAPSHOT_MARKER and position == start:
                self._follows_snapshot = True
                position += _RECORD.size
                continue
            if first + count > self.chunk_count or bits & ~0x07 or count == 0:
                raise StateError(f"{what} is corrupt (record out of range)")
            self._set_bits(first, first + count, bits)
            position += _RECORD.size
        return position

    def close(self) -> None:
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1

    # ----- queries (lock-free: bits only ever get set) -----------------------------------------

    def chunk_of(self, offset: int) -> int:
        return offset >> self.chunk_shift

    def chunk_range(self, offset: int, length: int) -> tuple[int, int]:
        """The chunks `[first, end)` that the byte range touches (length > 0)."""
        return offset >> self.chunk_shift, ((offset + length - 1) >> self.chunk_shift) + 1

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """Byte offsets `[start, end)` of a chunk (the last one may be short)."""
        start = chunk << self.chunk_shift
        return start, min(start + self.chunk_size, self.disk_size)

    def is_present(self, chunk: int) -> bool:
        return bool(self._states[chunk] & PRESENT)

    def all_present(self, first: int, end: int) -> bool:
        if end - first == 1:
            return bool(self._states[first] & PRESENT)
        return _MISSING_BYTE.search(self._states, first, end) is None

    def all_guest_written(self, first: int, end: int) -> bool:
        return _NOT_GUEST_WRITTEN_BYTE.search(self._states, first, end) is None

    def run_from(self, chunk: int) -> tuple[int, bool, bool]:
        """The run of chunks from `chunk` that share its class: returns (end chunk, present,
        source hole).  Present chunks form one class (source hole is False for them); missing
        ones split on SOURCE_HOLE.  Safe while other threads set bits: the class and the run
        come from one regex match (see `_RUN_AT`)."""
        match = _RUN_AT.match(self._states, chunk)
        assert match is not None  # every byte value is in one of the classes (see _RUN_AT)
        kind = match.lastgroup
        return match.end(), kind == "present", kind == "hole"

    def is_source_hole(self, chunk: int) -> bool:
        return bool(self._states[chunk] & SOURCE_HOLE)

    def is_guest_written(self, chunk: int) -> bool:
        return bool(self._states[chunk] & GUEST_WRITTEN)

    def bits(self, chunk: int) -> int:
        return self._states[chunk]

    def missing_ranges(self, first: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Coalesced runs `[a, b)` of missing chunks within `[first, end)`, in order."""
        stop = self.chunk_count if end is None else end
        for match in _MISSING_RUN.finditer(self._states, first, stop):
            yield match.start(), match.end()

    def next_missing_range(self, first: int, end: int | None = None) -> tuple[int, int] | None:
        stop = self.chunk_count if end is None else end
        match = _MISSING_RUN.search(self._states, first, stop)
        return None if match is None else (match.start(), match.end())

    def present_ranges(self, first: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        stop = self.chunk_count if end is None else end
        for match in _PRESENT_RUN.finditer(self._states, first, stop):
            yield match.start(), match.end()

    def guest_written_ranges(self) -> Iterator[tuple[int, int]]:
        """Runs of chunks the guest changed here: what a reverse sync would have to copy."""
        for match in _GUEST_WRITTEN_RUN.finditer(self._states):
            yield match.start(), match.end()

    @property
    def guest_written_count(self) -> int:
        return self._guest_written_count

    @property
    def present_count(self) -> int:
        return self._present_count

    @property
    def present_bytes(self) -> int:
        with self.lock:  # the count and the last chunk's bit from the same moment
            count = self._present_count
            last_present = bool(count) and bool(self._states[self.chunk_count - 1] & PRESENT)
        total = count * self.chunk_size
        if last_present:
            total -= self.chunk_count * self.chunk_size - self.disk_size  # the short last chunk
        return total

    @property
    def is_complete(self) -> bool:
        return self._present_count == self.chunk_count

    # ----- mutations -------------------------------------------------------------------------

    def _set_bits(self, first: int, end: int, bits: int) -> int:
        """Set `bits` on chunks `[first, end)`; returns how many became present.  Lock held."""
        before = self._states[first:end]
        newly_present = 0
        if bits & PRESENT:
            newly_present = before.translate(_ONLY_PRESENT_BIT).count(0)
        if bits & GUEST_WRITTEN:
            self._guest_written_count += before.translate(_ONLY_GUEST_WRITTEN_BIT).count(0)
        self._states[first:end] = before.translate(_OR_TABLES[bits])
        self._present_count += newly_present
        return newly_present

    def mark(self, first: int, end: int, bits: int) -> int:
        """Set `bits` on `[first, end)` in memory and queue them for the journal.

        Returns how many chunks became present.  Call it only after the data the bits describe
        has been written to the local file (not necessarily synced: `make_durable` does that).
        """
        if first >= end:
            return 0
        with self.lock:
            newly_present = self._set_bits(first, end, bits)
            self._pending.append((first, end - first, bits))
        return newly_present

    def mark_present(
        self, first: int, end: int, *, source_hole: bool = False, guest_written: bool = False
    ) -> int:
        bits = PRESENT | (SOURCE_HOLE if source_hole else 0)
        bits |= GUEST_WRITTEN if guest_written else 0
        return self.mark(first, end, bits)

    def note_source_hole(self, first: int, end: int) -> None:
        """Remember that the source reported `[first, end)` as holes (chunks stay missing)."""
        self.mark(first, end, SOURCE_HOLE)

    @property
    def pending_changes(self) -> int:
        return len(self._pending)

    # ----- durability ------------------------------------------------------------------------

    @property
    def durability_failure(self) -> str | None:
        """Why a sync failed (the map persists nothing any more), or None."""
        return self._durability_failure

    def _fail_durability(self, reason: str) -> DurabilityError:
        if self._durability_failure is None:
            self._durability_failure = reason
            self._withdraw_live_mirror()
        return DurabilityError(self._durability_failure)

    def _withdraw_live_mirror(self) -> None:
        """After a failed sync the local file cannot be trusted: a chunk made PRESENT since the
        last good sync reads back stale bytes once its pages leave the page cache.  The map keeps
        its bits in a private copy and clears the shared mapping, so that the C filter serves
        nothing more and every read reaches the engine (which refuses it)."""
        with self.lock:
            mirror = self._states
            if not isinstance(mirror, mmap.mmap):
                return
            self._states = bytearray(mirror)
            mirror[:] = bytes(len(mirror))
            # not closed: a lock-free reader may still hold it (it now reads "missing")
            self._withdrawn_mirror = mirror

    def make_durable(self, sync_data: Callable[[], None], *, compact: bool = False) -> None:
        """Persist every change marked so far, in the one safe order:

        1. capture: take the pending changes (and, when compacting, a copy of the map); every
           one of them describes data already written to the local file;
        2. sync data: `sync_data()` (the engine's fdatasync of the data file);
        3. persist map: append the captured changes to the journal and fsync it, or write the
           captured copy as a new snapshot and start an empty journal.

        When the snapshot cannot be written (ENOSPC...), the captured changes go to the journal.
        The data is synced even when no map change is pending: a guest flush after overwriting
        chunks that were already PRESENT and guest-written changes no bit, yet must be durable.
        On failure the captured changes are put back, so the next call retries them, unless a
        sync failed: then the map is failed for good and this and every later call raise
        `DurabilityError` (see the module docstring).
        """
        with self._sync_lock:
            if self._durability_failure is not None:
                raise DurabilityError(self._durability_failure)
            compact = compact or self._journal_bytes >= JOURNAL_COMPACT_BYTES
            # step 1: capture
            with self.lock:
                captured = self._pending
                self._pending = []
                snapshot = bytes(self._states) if compact else None
            try:
                self._probe("captured")
                # step 2: sync data (also when no bit changed: see above)
                try:
                    sync_data()
                except OSError as exc:
                    raise self._fail_durability(
                        f"data file sync failed: {exc.strerror or exc}"
                    ) from exc
                self._probe("data-synced")
                if not captured and snapshot is None:
                    return
                # step 3: persist map
                if snapshot is not None:
                    try:
                        self._write_snapshot(snapshot)
                    except DurabilityError:
                        raise
                    except OSError:
                        # a write error (a full disk): compaction is only an optimization, the
                        # journal may still take the few records that matter
                        if not captured:
                            raise
                        self._append_journal(captured)
                else:
                    self._append_journal(captured)
                self._probe("map-persisted")
            except BaseException:
                with self.lock:
                    self._pending[:0] = captured
                raise

    def _probe(self, step: str) -> None:
        if self.durability_probe is not None:
            self.durability_probe(step)

    @property
    def journal_synced_bytes(self) -> int:
        """Bytes of the journal file (header included) that the last fsync covered: the end of
        the last good record, where the next append is written."""
        return self._journal_header_bytes + self._journal_bytes

    def _append_journal(self, changes: list[tuple[int, int, int]]) -> None:
        """Write whole records at the end of the last good one and fsync them; all or nothing."""
        records = bytearray()
        for first, count, bits in changes:
            body = _RECORD_BODY.pack(first, count, bits)
            records += body + _CRC.pack(zlib.crc32(body))
        good_end = self.journal_synced_bytes
        view = memoryview(records)
        try:
            while view:
                written = os.pwrite(self._journal_fd, view, good_end + len(records) - len(view))
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
        except OSError:
            self._cut_journal_back(good_end)  # no half record stays for later ones to follow
            raise
        self._probe("journal-written")
        try:
            os.fdatasync(self._journal_fd)
        except OSError as exc:
            raise self._fail_durability(f"journal sync failed: {exc.strerror or exc}") from exc
        self._journal_bytes += len(records)

    def _cut_journal_back(self, good_end: int) -> None:
        """After a failed append: the journal ends at its last good record again."""
        try:
            os.ftruncate(self._journal_fd, good_end)
            os.fsync(self._journal_fd)
        except OSError as exc:
            raise self._fail_durability(
                f"cannot cut a failed journal append back: {exc.strerror or exc}"
            ) from exc

    def _write_snapshot(self, states: bytes) -> None:
        data = bytearray(self.identity.encode(SNAPSHOT_MAGIC))
        data += zlib.compress(states, 1)
        data += _CRC.pack(zlib.crc32(data))
        self._replace_file(self.state_dir / SNAPSHOT_FILENAME, bytes(data))
        # the snapshot holds everything: start an empty journal (atomically replaced) whose
        # first record says that it continues a snapshot (so a lost snapshot is noticed)
        header = self.identity.encode(JOURNAL_MAGIC)
        header += _CRC.pack(zlib.crc32(header))
        marker = _RECORD_BODY.pack(*_SNAPSHOT_MARKER)
        header += marker + _CRC.pack(zlib.crc32(marker))
        journal_path = self.state_dir / JOURNAL_FILENAME
        self._replace_file(journal_path, header)
        try:
            # not O_APPEND: Linux's pwrite appends on an O_APPEND descriptor, whatever the offset
            new_fd = os.open(journal_path, os.O_WRONLY)
        except OSError as exc:  # appends to the old (replaced) file would be lost
            raise self._fail_durability(
                f"cannot open the new journal: {exc.strerror or exc}"
            ) from exc
        old_fd, self._journal_fd = self._journal_fd, new_fd
        if old_fd >= 0:
            os.close(old_fd)
        self._journal_bytes = _RECORD.size  # the marker

    def _replace_file(self, path: Path, data: bytes) -> None:
        """`write_file_atomically`, where a failed fsync (of the file or of the directory, after
        the rename) fails the map for good; a failed write leaves the old file (retried later)."""
        try:
            write_file_atomically(path, data)
        except SyncError as exc:
            raise self._fail_durability(
                f"sync of {path.name} failed: {exc.strerror or exc}"
            ) from exc
