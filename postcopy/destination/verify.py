"""Verification before release: does Host B hold Host A's bytes?  (issue 12, item 3)

    digests = DigestList.decode(data)              # made on A by `postcopy digest` (source/digest)
    report = verify_destination(Path("/var/lib/postcopy/web1/xvda"), digests)
    if report.matched: ...release A...             # else report.mismatch_offsets, and keep A

How it works.  The state directory's block map is opened read-only (`stored_identity`, then
`BlockMap.open_read_only`: nothing is written, no lock is taken).  Its chunk size and disk size
must be the digests' (else `VerifyInputError`), and every chunk must be durably PRESENT (else
`DestinationNotComplete`: a caller waits for `complete` and tries again).  Chunks the guest has
written on B (GUEST_WRITTEN) are B's own: they are skipped and counted.  Every other chunk of the
destination file is digested exactly as A digested its image (`hash_chunk_runs`: SEEK_DATA /
SEEK_HOLE, so B's holes are not read either, and zeros are zeros whichever side has them
allocated) and compared with A's digest; each differing chunk is a mismatch, reported by byte
offset.  Only digests cross the link (16 bytes per 64 KiB chunk).

A running receive.  Verification must be allowed while `postcopy receive` still serves the disk
(A is released only after it), so "in use" does not mean "receive is running".  While the state
directory's lock is held (`/proc/locks` is read; nothing is locked, so a receive starting
meanwhile is never refused because of us), the guest may write while we read: the guest-written
set is then taken from the persisted map *and* the engine's live map (`live.map`, which has every
bit the moment it is set), and checked again after the data was read; a chunk that became
guest-written during the pass is skipped (counted in `chunks_written_during_verify`), not
reported.  A guest write whose bit is not set yet can only make a chunk *differ*, so the race can
cause a false mismatch (A is kept; run it again), never a false match.

"In use", refused with `DestinationInUseError`: the destination file is written by something
the block map does not see, so guest writes would not be told apart from corruption:
- a process holds a POSIX or OFD lock on it: a hypervisor opened the file itself (QEMU locks the
  images it opens), e.g. after a pivot; verify before the pivot;
- a `flock` on it is held by a process that does not hold this state directory's lock: another
  receive, with another state directory, serves this file.

Errors, all one line (`UserError`, exit 2 in the CLI):

    VerifyInputError            digests that do not fit the state (chunk size, disk size),
    │                           a missing or unreadable destination
    ├── DestinationNotComplete  chunks not yet durably present
    └── DestinationInUseError   see above
    (and DigestFormatError from postcopy.source.digest, StateError from the block map)
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postcopy.destination.blockmap import (
    GUEST_WRITTEN,
    LIVE_MAP_FILENAME,
    BlockMap,
    stored_identity,
)
from postcopy.destination.statelock import state_lock_path
from postcopy.destination.status import read_status
from postcopy.errors import UserError
from postcopy.source.digest import DEFAULT_THREADS, DigestList, hash_chunk_runs
from postcopy.units import format_size

__all__ = [
    "DEFAULT_MAX_LISTED",
    "DestinationInUseError",
    "DestinationNotComplete",
    "VerifyInputError",
    "VerifyReport",
    "destination_of",
    "verify_destination",
]

DEFAULT_MAX_LISTED = 100  # mismatching offsets a report keeps (the count is always exact)
PROC_LOCKS = Path("/proc/locks")

_NOT_WRITTEN_RUN = re.compile(b"\x00+")
_ONLY_GUEST_WRITTEN = bytes(1 if b & GUEST_WRITTEN else 0 for b in range(256))


class VerifyInputError(UserError):
    """The digests and the destination cannot be compared (one line; exit 2)."""


class DestinationNotComplete(VerifyInputError):
    """Some chunks are not durably PRESENT yet: wait for `complete`, then verify."""


class DestinationInUseError(VerifyInputError):
    """The destination file is written around the block map (see the module docstring)."""


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of one verification.  `matched` is what a caller acts on."""

    state_dir: Path
    dest: Path
    algorithm: str
    chunk_size: int
    image_size: int
    chunk_count: int
    chunks_compared: int
    chunks_skipped_guest_written: int  # includes chunks_written_during_verify
    chunks_written_during_verify: int  # a running guest wrote them while they were read
    hole_chunks: int  # compared chunks that are holes in B's file (zeros, not read)
    bytes_read: int
    mismatch_count: int
    mismatch_offsets: tuple[int, ...]  # byte offsets of the first `max_listed` mismatches
    seconds: float = field(compare=False)  # how long it took: not part of the outcome
    receive_running: bool = False

    @property
    def matched(self) -> bool:
        return self.mismatch_count == 0

    def to_record(self) -> dict[str, Any]:
        """The report as JSON-ready data (`postcopy verify --json`)."""
        return {
            "result": "match" if self.matched else "mismatch",
            "state_dir": str(self.state_dir),
            "dest": str(self.dest),
            "algorithm": self.algorithm,
            "chunk_size": self.chunk_size,
            "image_size": self.image_size,
            "chunk_count": self.chunk_count,
            "chunks_compared": self.chunks_compared,
            "chunks_skipped_guest_written": self.chunks_skipped_guest_written,
            "chunks_written_during_verify": self.chunks_written_during_verify,
            "hole_chunks": self.hole_chunks,
            "bytes_read": self.bytes_read,
            "mismatch_count": self.mismatch_count,
            "mismatch_offsets": list(self.mismatch_offsets),
            "mismatch_offsets_truncated": len(self.mismatch_offsets) < self.mismatch_count,
            "seconds": round(self.seconds, 6),
            "receive_running": self.receive_running,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> VerifyReport:
        """The report back from `to_record()` (e.g. `postcopy verify --json` run on B over ssh
        by `postcopy migrate` on A); ValueError when the record is not one."""
        try:
            return cls(
                state_dir=Path(record["state_dir"]),
                dest=Path(record["dest"]),
                algorithm=str(record["algorithm"]),
                mismatch_offsets=tuple(int(offset) for offset in record["mismatch_offsets"]),
                seconds=float(record["seconds"]),
                receive_running=bool(record["receive_running"]),
                **{name: int(record[name]) for name in _COUNT_FIELDS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a verify report: {exc!r}") from None

    def summary(self) -> str:
        """One line for people."""
        rate = self.bytes_read / self.seconds / (1 << 20) if self.seconds else 0.0
        counts = (
            f"{self.chunks_compared} of {self.chunk_count} chunks compared, "
            f"{self.chunks_skipped_guest_written} skipped as guest-written, "
            f"{format_size(self.bytes_read)} read in {self.seconds:.2f} s ({rate:.0f} MiB/s)"
        )
        if self.matched:
            return f"match: {self.dest} holds the source's bytes ({counts})"
        listed = ", ".join(f"{offset:#x}" for offset in self.mismatch_offsets)
        more = self.mismatch_count - len(self.mismatch_offsets)
        if more:
            listed += f" and {more} more"
        return (
            f"MISMATCH: {self.mismatch_count} chunk(s) of {format_size(self.chunk_size)} differ "
            f"from the source at byte offsets {listed} ({counts}); keep the source"
        )


_COUNT_FIELDS = (
    "chunk_size", "image_size", "chunk_count", "chunks_compared", "chunks_skipped_guest_written",
    "chunks_written_during_verify", "hole_chunks", "bytes_read", "mismatch_count",
)


def destination_of(state_dir: Path) -> Path:
    """The destination file recorded in the state directory's status record (`dest`)."""
    try:
        record = read_status(state_dir)
    except UserError as exc:
        raise VerifyInputError(f"{exc}; name the destination file (--dest)") from None
    dest = record.get("dest")
    if not isinstance(dest, str) or not dest:
        raise VerifyInputError(f"the status record of {state_dir} names no destination file")
    return Path(dest)


# ===== who else has the files open ================================================================


def _lock_holders(path: Path) -> list[tuple[str, int]]:
    """(kind, pid) of every lock held on `path` per /proc/locks: kind FLOCK, POSIX or OFDLCK
    (pid -1 for OFD locks).  Takes no lock itself; [] where /proc/locks cannot be read."""
    try:
        info = os.stat(path)
        text = PROC_LOCKS.read_text()
    except OSError:
        return []
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders = []
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK ADVISORY WRITE 4242 fe:00:1234 0 EOF"; waiters have "->" after the number
        if len(fields) >= 6 and fields[1] != "->" and fields[5] == key:
            try:
                holders.append((fields[1], int(fields[4])))
            except ValueError:
                continue
    return holders


def _check_not_in_use(state_dir: Path, dest: Path) -> bool:
    """Refuse a destination written around the block map; True when this state directory's
    receive is running (its lock is held)."""
    state_holders = {pid for kind, pid in _lock_holders(state_lock_path(state_dir))}
    for kind, pid in _lock_holders(dest):
        if kind in ("POSIX", "OFDLCK"):
            who = "a process" if pid < 0 else f"pid {pid}"
            raise DestinationInUseError(
                f"destination {dest} is open in {who} that locks it as a disk image (a "
                "hypervisor using the file itself, e.g. after a pivot): its writes are not in "
                "the block map, so verify before the pivot"
            )
        if kind == "FLOCK" and pid not in state_holders:
            raise DestinationInUseError(
                f"destination {dest} is served by pid {pid}, which does not hold the lock of "
                f"state directory {state_dir}: another receive with another state directory"
            )
    return bool(state_holders)


# ===== the comparison =============================================================================


def _guest_written_mask(state_dir: Path, block_map: BlockMap, *, live: bool) -> bytearray:
    """One byte per chunk, 1 where the guest has written: from the persisted map and, while a
    receive runs, its live map too (bits are only ever set, so the union is never wrong)."""
    mask = bytearray(block_map.chunk_count)
    for first, end in block_map.guest_written_ranges():
        mask[first:end] = b"\x01" * (end - first)
    if live:
        try:
            live_bits = (state_dir / LIVE_MAP_FILENAME).read_bytes()
        except OSError:
            live_bits = b""
        if len(live_bits) == block_map.chunk_count:
            live_mask = live_bits.translate(_ONLY_GUEST_WRITTEN)
            mask = bytearray(
                (int.from_bytes(mask, "little") | int.from_bytes(live_mask, "little")).to_bytes(
                    len(mask), "little"
                )
            )
    return mask


def verify_destination(
    state_dir: Path,
    digests: DigestList,
    *,
    dest: Path | None = None,
    threads: int = DEFAULT_THREADS,
    max_listed: int = DEFAULT_MAX_LISTED,
) -> VerifyReport:
    """Compare the destination of `state_dir` with the source's `digests`; see the module
    docstring.  `dest` defaults to the file named in the state directory's status record.
    Reads only, takes no lock, works while `postcopy receive` runs.  Returns a report (a
    mismatch is a result, not an exception); raises `VerifyInputError` (and subclasses),
    `StateError` or `UserError` (one line each) when the two cannot be compared."""
    started = time.monotonic()
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise VerifyInputError(f"state directory {state_dir} does not exist")
    dest = destination_of(state_dir) if dest is None else Path(dest)
    identity = stored_identity(state_dir)
    if identity.chunk_size != digests.chunk_size:
        raise VerifyInputError(
            f"the digests use chunks of {digests.chunk_size} bytes, state directory {state_dir} "
            f"{identity.chunk_size}: digest again with --chunk-size {identity.chunk_size}"
        )
    if identity.disk_size != digests.image_size:
        raise VerifyInputError(
            f"the digests describe an image of {digests.image_size} bytes, state directory "
            f"{state_dir} a disk of {identity.disk_size}: not the same disk"
        )
    block_map = BlockMap.open_read_only(state_dir, identity)
    try:
        if not block_map.is_complete:
            missing = block_map.disk_size - block_map.present_bytes
            raise DestinationNotComplete(
                f"{format_size(missing)} of {dest} are not durably present yet "
                f"({block_map.chunk_count - block_map.present_count} chunks): wait until "
                "fetch-progress says complete"
            )
        receive_running = _check_not_in_use(state_dir, dest)
        written = _guest_written_mask(state_dir, block_map, live=receive_running)
    finally:
        block_map.close()
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VerifyInputError(f"cannot open destination {dest}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(info.st_mode) else info.st_size
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
            raise VerifyInputError(f"destination {dest} is not a regular file or block device")
        if size != digests.image_size:
            raise VerifyInputError(
                f"destination {dest} has {size} bytes, the digests describe {digests.image_size}"
            )
        compared_runs = [(m.start(), m.end()) for m in _NOT_WRITTEN_RUN.finditer(written)]
        found = bytearray(len(digests.digests))
        try:
            stats = hash_chunk_runs(
                fd, size, digests.chunk_size, digests.algorithm, compared_runs, found,
                threads=threads,
            )  # fmt: skip
        except OSError as exc:
            raise VerifyInputError(f"cannot read destination {dest}: {exc.strerror}") from None
    finally:
        os.close(fd)
    expected = digests.digests
    width = digests.digest_size
    mismatches: list[int] = []
    for first, end in compared_runs:
        if found[first * width:end * width] == expected[first * width:end * width]:
            continue
        for chunk in range(first, end):
            at = chunk * width
            if found[at:at + width] != expected[at:at + width]:
                mismatches.append(chunk)
    written_during = 0
    if mismatches and receive_running:  # written while we read them? (see the docstring)
        block_map = BlockMap.open_read_only(state_dir, identity)
        try:
            written_now = _guest_written_mask(state_dir, block_map, live=True)
        finally:
            block_map.close()
        still = [chunk for chunk in mismatches if not written_now[chunk]]
        written_during = len(mismatches) - len(still)
        mismatches = still
    chunk_count = digests.chunk_count
    compared = sum(end - first for first, end in compared_runs) - written_during
    return VerifyReport(
        state_dir=state_dir,
        dest=dest,
        algorithm=digests.algorithm,
        chunk_size=digests.chunk_size,
        image_size=digests.image_size,
        chunk_count=chunk_count,
        chunks_compared=compared,
        chunks_skipped_guest_written=chunk_count - compared,
        chunks_written_during_verify=written_during,
        hole_chunks=stats.hole_chunks,
        bytes_read=stats.bytes_read,
        mismatch_count=len(mismatches),
        mismatch_offsets=tuple(chunk * digests.chunk_size for chunk in mismatches[:max_listed]),
        seconds=time.monotonic() - started,
        receive_running=receive_running,
    )
