"""Per-chunk digests of a frozen disk image, and the file format that carries them to Host B.

    digests = compute_digests(Path("/srv/web1.img"), chunk_size=64 * 1024)
    Path("web1.digests").write_bytes(digests.encode())      # or: postcopy digest IMAGE > FILE
    DigestList.decode(data)                                  # on B: postcopy.destination.verify

How it works.  The image is split into chunks of `chunk_size` bytes (a power of two, as in the
destination's block map; the last chunk may be short) and each chunk gets one digest.  Holes cost
no read: the image's allocation is walked with SEEK_DATA/SEEK_HOLE, and a chunk that lies wholly
in a hole gets the digest of that many zero bytes, computed once per (algorithm, length).  A chunk
that is partly data is read whole (its hole part reads as zeros), so a chunk's digest depends only
on its bytes, never on how they are allocated: zeros are zeros, on A as on B.  Data is read in
large sequential `os.preadv` calls (READ_SIZE, whole chunks) into one preallocated buffer per
worker thread, and each chunk is hashed from a memoryview of it; with `threads` > 1 the workers
take successive blocks (hashlib releases the GIL on large inputs, and preadv releases it too).
`hash_chunk_runs` is the shared engine: `compute_digests` runs it over every chunk of the image,
the verifier over the chunks it compares.  An image whose size or mtime changes while it is read
is refused (`ImageChangedError`): the source must be frozen.  That check is a cheap guard, not a
proof (an overwrite within one tick of the file system's clock keeps the mtime): freezing the
source is the caller's job.

Algorithms (both 16 bytes per chunk, so 16 bytes cross the link per 64 KiB chunk, 1/4096 of the
data): `sha256-128`, SHA-256 truncated to 128 bits, the default (with the SHA extensions of
current x86 and ARM CPUs it runs about 3x faster than blake2b in hashlib; `python -m bench
digest` prints both), and `blake2b-128`, BLAKE2b with a 16-byte digest (faster on CPUs without
them).

The format (version 1; all integers little-endian; `struct`, not construct, which lives in
nbdsrv/wire.py for the wire protocol):

    magic        8 bytes   b"PCDIGEST"
    version      u16       1
    digest size  u16       bytes per chunk digest (16)
    chunk size   u32       bytes per chunk (a power of two, 4 KiB .. 64 MiB)
    image size   u64       bytes of the image
    chunk count  u64       ceil(image size / chunk size), stated so a reader checks it
    name length  u16       then the algorithm's name, ASCII (`sha256-128`)
    name         ...
    header crc   u32       crc32 of every header byte before it
    digests      chunk count x digest size bytes, chunk 0 first
    trailer      digest size bytes: the algorithm's digest of every byte before it

A reader refuses (`DigestFormatError`, one line) a bad magic, an unknown version or algorithm, a
chunk count that does not follow from the sizes, a header checksum mismatch, a file that is
shorter or longer than the header says (truncated, or two files concatenated) and a trailer that
does not match (corruption anywhere).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from postcopy.errors import UserError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_THREADS",
    "DigestFormatError",
    "DigestList",
    "HashStats",
    "ImageChangedError",
    "compute_digests",
    "hash_chunk_runs",
    "zero_digest",
]

MAGIC = b"PCDIGEST"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 64 * 1024  # the block map's default (postcopy.destination.blockmap)
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 * 1024 * 1024
READ_SIZE = 4 * 1024 * 1024  # bytes per preadv (whole chunks; at least one chunk)
DEFAULT_THREADS = 1  # a second thread helps only on an idle machine: `python -m bench digest`

# magic, version, digest size, chunk size, image size, chunk count, name length
_HEADER_FIXED = struct.Struct("<8sHHIQQH")
_CRC = struct.Struct("<I")
# the longest name a reader accepts (bounds what a corrupt length field can make us read)
_MAX_NAME_LENGTH = 64


def _sha256_128(data: memoryview | bytes) -> bytes:
    return hashlib.sha256(data).digest()[:16]


def _blake2b_128(data: memoryview | bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


# name -> (digest size, function of a chunk's bytes)
ALGORITHMS: dict[str, tuple[int, Callable[[memoryview | bytes], bytes]]] = {
    "sha256-128": (16, _sha256_128),
    "blake2b-128": (16, _blake2b_128),
}
DEFAULT_ALGORITHM = "sha256-128"


class DigestFormatError(UserError):
    """A digest file that cannot be used: corrupt, truncated, or of an unknown kind."""


class ImageChangedError(UserError):
    """The image changed (size or mtime) while it was being digested: it is not frozen."""


def check_algorithm(algorithm: str) -> tuple[int, Callable[[memoryview | bytes], bytes]]:
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        known = ", ".join(ALGORITHMS)
        raise UserError(f"unknown digest algorithm {algorithm!r} (known: {known})") from None


def check_chunk_size(chunk_size: int) -> None:
    if (
        chunk_size < MIN_CHUNK_SIZE
        or chunk_size > MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise UserError(
            f"chunk size {chunk_size} must be a power of two between {MIN_CHUNK_SIZE} and "
            f"{MAX_CHUNK_SIZE}"
        )


@functools.lru_cache(maxsize=16)
def zero_digest(algorithm: str, length: int) -> bytes:
    """The digest of `length` zero bytes: what every chunk wholly in a hole gets, unread."""
    _, function = check_algorithm(algorithm)
    return function(bytes(length))


# ===== the digest list and its format =============================================================


@dataclass(frozen=True)
class DigestList:
    """One digest per chunk of an image, chunk 0 first, concatenated in `digests`.

    `bytes_read`, `hole_chunks` and `seconds` say what computing it cost (not encoded; zero for
    a decoded list)."""

    algorithm: str
    chunk_size: int
    image_size: int
    digests: bytes
    bytes_read: int = field(default=0, compare=False)
    hole_chunks: int = field(default=0, compare=False)
    seconds: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        digest_size, _ = check_algorithm(self.algorithm)
        check_chunk_size(self.chunk_size)
        if self.image_size < 0:
            raise ValueError("image size is negative")
        if len(self.digests) != self.chunk_count * digest_size:
            raise ValueError(
                f"{len(self.digests)} digest bytes for {self.chunk_count} chunks of "
                f"{digest_size} bytes"
            )

    @property
    def digest_size(self) -> int:
        return ALGORITHMS[self.algorithm][0]

    @property
    def chunk_count(self) -> int:
        return -(-self.image_size // self.chunk_size)

    def chunk_length(self, chunk: int) -> int:
        """Bytes of chunk `chunk` (the last one may be short)."""
        return min(self.chunk_size, self.image_size - chunk * self.chunk_size)

    def digest(self, chunk: int) -> bytes:
        if not 0 <= chunk < self.chunk_count:
            raise IndexError(f"chunk {chunk} of {self.chunk_count}")
        size = self.digest_size
        return self.digests[chunk * size:(chunk + 1) * size]

    def encode(self) -> bytes:
        """The file format of the module docstring (header, digests, trailer)."""
        name = self.algorithm.encode("ascii")
        header = _HEADER_FIXED.pack(
            MAGIC, FORMAT_VERSION, self.digest_size, self.chunk_size, self.image_size,
            self.chunk_count, len(name),
        ) + name
        header += _CRC.pack(zlib.crc32(header))
        _, function = ALGORITHMS[self.algorithm]
        body = header + self.digests
        return body + function(body)

    @classmethod
    def decode(cls, data: bytes, *, what: str = "digest file") -> DigestList:
        """Parse and check a whole digest file; `DigestFormatError` (one line) when unusable."""
        view = memoryview(data)
        if len(view) < _HEADER_FIXED.size:
            raise DigestFormatError(f"{what} is truncated ({len(view)} bytes, no full header)")
        magic, version, digest_size, chunk_size, image_size, chunk_count, name_length = (
            _HEADER_FIXED.unpack_from(view)
        )
        if magic != MAGIC:
            raise DigestFormatError(f"{what} is not a postcopy digest file (bad magic)")
        if version != FORMAT_VERSION:
            raise DigestFormatError(
                f"{what} has format version {version}, this postcopy reads {FORMAT_VERSION}"
            )
        if name_length > _MAX_NAME_LENGTH:
            raise DigestFormatError(f"{what} is corrupt (algorithm name of {name_length} bytes)")
        name_end = _HEADER_FIXED.size + name_length
        header_end = name_end + _CRC.size
        if len(view) < header_end:
            raise DigestFormatError(f"{what} is truncated (in its header)")
        (header_crc,) = _CRC.unpack_from(view, name_end)
        if header_crc != zlib.crc32(view[:name_end]):
            raise DigestFormatError(f"{what} is corrupt (header checksum mismatch)")
        algorithm = bytes(view[_HEADER_FIXED.size:name_end]).decode("ascii", errors="replace")
        if algorithm not in ALGORITHMS:
            known = ", ".join(ALGORITHMS)
            raise DigestFormatError(
                f"{what} uses the digest algorithm {algorithm!r}, this postcopy knows {known}"
            )
        expected_size, function = ALGORITHMS[algorithm]
        if digest_size != expected_size:
            raise DigestFormatError(
                f"{what} is corrupt ({digest_size}-byte digests for {algorithm})"
            )
        try:
            check_chunk_size(chunk_size)
        except UserError as exc:
            raise DigestFormatError(f"{what} is corrupt ({exc})") from None
        if chunk_count != -(-image_size // chunk_size):
            raise DigestFormatError(
                f"{what} is corrupt ({chunk_count} chunks for {image_size} bytes in chunks of "
                f"{chunk_size})"
            )
        expected_length = header_end + (chunk_count + 1) * digest_size
        if len(view) < expected_length:
            raise DigestFormatError(
                f"{what} is truncated ({len(view)} of {expected_length} bytes)"
            )
        if len(view) > expected_length:
            raise DigestFormatError(
                f"{what} has {len(view) - expected_length} bytes after its end"
            )
        trailer_start = expected_length - digest_size
        if function(view[:trailer_start]) != view[trailer_start:]:
            raise DigestFormatError(f"{what} is corrupt (its trailer digest does not match)")
        return cls(algorithm, chunk_size, image_size, bytes(view[header_end:trailer_start]))


# ===== hashing chunks of a file ===================================================================


@dataclass
class HashStats:
    """What one `hash_chunk_runs` call did."""

    bytes_read: int = 0
    hole_chunks: int = 0  # chunks wholly in a hole: digest of zeros, nothing read


def _seek(fd: int, offset: int, whence: int, size: int) -> int | None:
    """lseek(SEEK_DATA/SEEK_HOLE); `size` when there is no more data (ENXIO), None when the
    file does not support it (a block device, an old file system): then everything is data."""
    try:
        return os.lseek(fd, offset, whence)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return size
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def allocation_runs(
    fd: int, size: int, chunk_size: int, first: int, end: int
) -> Iterator[tuple[int, int, bool]]:
    """Runs `(first, end, is_data)` of the chunks `[first, end)` of an open file: a chunk is
    data when any byte of it is allocated (per SEEK_DATA/SEEK_HOLE), a hole chunk has none."""
    shift = chunk_size.bit_length() - 1
    chunk = first
    while chunk < end:
        offset = chunk << shift
        data = _seek(fd, offset, os.SEEK_DATA, size)
        if data is None:
            yield chunk, end, True
            return
        data_chunk = min(data >> shift, end) if data < size else end
        if data_chunk > chunk:
            yield chunk, data_chunk, False
            chunk = data_chunk
            if chunk >= end:
                return
        hole = _seek(fd, max(data, offset), os.SEEK_HOLE, size)
        hole = size if hole is None else hole
        after = min(max(-(-hole // chunk_size), chunk + 1), end)
        yield chunk, after, True
        chunk = after


def hash_chunk_runs(
    fd: int,
    size: int,
    chunk_size: int,
    algorithm: str,
    runs: Iterable[tuple[int, int]],
    out: bytearray,
    *,
    threads: int = DEFAULT_THREADS,
    read_size: int = READ_SIZE,
) -> HashStats:
    """Write the digest of every chunk of `runs` (half-open chunk ranges) of the open file `fd`
    (`size` bytes) into `out` at `chunk * digest_size`; `out` must hold every chunk.  Hole
    chunks get the zero digest unread; data is read with `os.preadv` in blocks of `read_size`
    bytes (rounded to whole chunks) by `threads` workers.  OSError on a read error, and
    ImageChangedError when the file ends before `size`."""
    digest_size, function = check_algorithm(algorithm)
    shift = chunk_size.bit_length() - 1
    chunks_per_block = max(1, read_size // chunk_size)
    stats = HashStats()
    blocks: list[tuple[int, int]] = []  # data to read: (first chunk, end chunk), one preadv each
    for first, end in runs:
        for run_first, run_end, is_data in allocation_runs(fd, size, chunk_size, first, end):
            if is_data:
                for block in range(run_first, run_end, chunks_per_block):
                    blocks.append((block, min(block + chunks_per_block, run_end)))
                continue
            stats.hole_chunks += run_end - run_first
            full_end = min(run_end, size >> shift)  # chunks of full length
            if full_end > run_first:
                full = zero_digest(algorithm, chunk_size)
                out[run_first * digest_size:full_end * digest_size] = full * (
                    full_end - run_first
                )
            if run_end > full_end:  # the short last chunk
                out[full_end * digest_size:run_end * digest_size] = zero_digest(
                    algorithm, size - (full_end << shift)
                )
    if not blocks:
        return stats
    next_block = 0
    lock = threading.Lock()
    failures: list[BaseException] = []
    read_counts: list[int] = []

    def worker() -> None:
        nonlocal next_block
        buffer = bytearray(chunks_per_block * chunk_size)
        view = memoryview(buffer)
        done = 0
        try:
            while not failures:
                with lock:
                    if next_block >= len(blocks):
                        break
                    first, end = blocks[next_block]
                    next_block += 1
                start = first << shift
                length = min(end << shift, size) - start
                filled = 0
                while filled < length:
                    count = os.preadv(fd, [view[filled:length]], start + filled)
                    if count == 0:
                        raise ImageChangedError(
                            f"the image ended at byte {start + filled}, not {size}: it changed "
                            "while it was read"
                        )
                    filled += count
                done += length
                for chunk in range(first, end):
                    offset = (chunk - first) << shift
                    digest = function(view[offset:min(offset + chunk_size, length)])
                    out[chunk * digest_size:(chunk + 1) * digest_size] = digest
        except BaseException as exc:  # handed to the caller's thread below
            failures.append(exc)
        finally:
            read_counts.append(done)

    workers = [threading.Thread(target=worker, name=f"digest-{n}") for n in range(threads - 1)]
    for thread in workers:
        thread.start()
    worker()  # the calling thread is a worker too
    for thread in workers:
        thread.join()
    if failures:
        raise failures[0]
    stats.bytes_read = sum(read_counts)
    return stats


# ===== Host A: the digests of an image ============================================================


def open_image(path: Path) -> tuple[int, int]:
    """Open a regular file or block device read-only: (descriptor, size in bytes); UserError
    (one line) when it cannot be used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot open {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            size = os.fstat(fd).st_size
        elif stat.S_ISBLK(mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise UserError(f"{path} is neither a regular file nor a block device")
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def compute_digests(
    image: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    algorithm: str = DEFAULT_ALGORITHM,
    threads: int = DEFAULT_THREADS,
) -> DigestList:
    """The per-chunk digests of the (frozen) image at `image`, a regular file or block device.

    `chunk_size` must be the destination's block map chunk size (a power of two, 4 KiB .. 64 MiB;
    64 KiB is receive's default).  Raises UserError (one line) for a bad chunk size or
    algorithm, an image that cannot be opened, and `ImageChangedError` when the image's size or
    mtime changed while it was read (its domain is still writing); OSError on a read error."""
    check_chunk_size(chunk_size)
    digest_size, _ = check_algorithm(algorithm)
    if threads < 1:
        raise UserError(f"threads must be at least 1, not {threads}")
    started = time.monotonic()
    fd, size = open_image(image)
    try:
        before = os.fstat(fd)
        chunk_count = -(-size // chunk_size)
        out = bytearray(chunk_count * digest_size)
        try:
            stats = hash_chunk_runs(
                fd, size, chunk_size, algorithm, [(0, chunk_count)], out, threads=threads
            )
        except OSError as exc:
            raise UserError(f"cannot read {image}: {exc.strerror}") from None
        after = os.fstat(fd)
        if stat.S_ISREG(before.st_mode) and (
            (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)
        ):
            raise ImageChangedError(
                f"{image} changed while it was digested: is its domain still running?"
            )
    finally:
        os.close(fd)
    return DigestList(
        algorithm, chunk_size, size, bytes(out),
        bytes_read=stats.bytes_read, hole_chunks=stats.hole_chunks,
        seconds=time.monotonic() - started,
    )  # fmt: skip
