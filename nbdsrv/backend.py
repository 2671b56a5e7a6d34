"""What a served disk must offer (`Backend`), and `FileBackend`: a raw file or block device.

Every method is blocking and thread-safe: the trio server calls them from worker threads, many at
once, so nothing here keeps a file position (preadv/pwritev take explicit offsets) and nothing is
cached between calls (a writable file changes under us).

    backend = FileBackend("/var/lib/disk.img", writable=False)
    backend.read_into(0, memoryview(buffer))       # os.preadv straight into the caller's buffer
    backend.read_cached(0, memoryview(buffer))     # the same, only what is cached (RWF_NOWAIT)
    backend.extents(0, backend.size)               # from SEEK_DATA/SEEK_HOLE, asked every time

Holes: `extents()` reports HOLE|ZERO for ranges that SEEK_HOLE finds and plain data elsewhere; a
file system (or block device) without SEEK_DATA support reports everything as data.  TRIM and
WRITE_ZEROES punch holes with fallocate(PUNCH_HOLE|KEEP_SIZE) (libc through ctypes, since `os`
offers no fallocate modes); WRITE_ZEROES with NO_HOLE uses fallocate(ZERO_RANGE), falling back
to writing zeroes.  FAST_ZERO fails with ENOTSUP instead of falling back to the slow path.

Tests that need slow reads wrap a backend (`tests.delayed_serve.DelayingBackend`); nothing here
exists only for tests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import threading
from typing import Any, Protocol

from nbdsrv.constants import BlockStatusFlag
from nbdsrv.extent import Extent

HOLE_FLAGS = int(BlockStatusFlag.HOLE | BlockStatusFlag.ZERO)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20


class Backend(Protocol):
    """A served disk.  All methods block; they raise OSError with an errno on failure."""

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def can_multi_conn(self) -> bool:
        """True when a flush on one connection makes every connection's writes durable and
        visible to all (CAN_MULTI_CONN)."""
        ...

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the bytes at `offset` (zeroes past the end of the data)."""
        ...

    def read_cached(self, offset: int, buffer: memoryview) -> int:
        """Without blocking, fill a prefix of `buffer` with bytes already in memory (page cache);
        returns how many bytes were filled (0 when none, or when the backend cannot tell)."""
        ...

    def sendfile_source(self, offset: int, length: int) -> int | None:
        """A file descriptor the server may os.sendfile [offset, offset+length) from, without
        blocking long (the range is in the page cache); or None, and the range is read into a
        buffer with read_cached/read_into instead.  A backend without a file returns None."""
        ...

    def extents(self, offset: int, length: int, limit: int = 1024) -> list[Extent]:
        """Contiguous extents covering [offset, offset+length) or a prefix of it (at most
        `limit` extents), starting exactly at `offset`."""
        ...

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def trim(self, offset: int, length: int, fua: bool = False) -> None: ...

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool = False
    ) -> None: ...

    def cache(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


def _load_fallocate() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        function = libc.fallocate64
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2) with a mode (`os` offers only posix_fallocate); raises OSError
    (EOPNOTSUPP when unsupported); public, so that other file code shares this one copy."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate `[offset, offset+length)`: it reads as zeros, the file keeps its size."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


class FileBackend:
    """A raw image file or block device, read-only unless `writable`."""

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        self.path = os.fspath(path)
        self._writable = writable
        self._fd = os.open(self.path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            mode = os.fstat(self._fd).st_mode
            self.is_block_device = stat.S_ISBLK(mode)
            if not (stat.S_ISREG(mode) or self.is_block_device):
                raise OSError(errno.EINVAL, f"{self.path} is not a regular file or block device")
            self._size = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise
        self._seek_data_works = True
        self._nowait_works = True
        self._punch_works = True
        self._zero_range_works = True
        self._closed = False
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return not self._writable

    @property
    def can_multi_conn(self) -> bool:
        # One fd shared by every connection, no cache of our own, flush is fdatasync of it.
        return True

    def fileno(self) -> int:
        return self._fd

    # -- reads ------------------------------------------------------------------------------

    def read_into(self, offset: int, buffer: memoryview) -> None:
        wanted = len(buffer)
        done = 0
        while done < wanted:
            count = os.preadv(self._fd, [buffer[done:]], offset + done)
            if count == 0:  # past the end of the file: the rest reads as zeroes
                buffer[done:] = bytes(wanted - done)
                return
            done += count

    def read_cached(self, offset: int, buffer: memoryview) -> int:
        if not self._nowait_works:
            return 0
        wanted = len(buffer)
        done = 0
        while done < wanted:
            try:
                count = os.preadv(self._fd, [buffer[done:]], offset + done, os.RWF_NOWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait_works = False
                break
            if count == 0:  # end of file: zeroes
                buffer[done:] = bytes(wanted - done)
                return wanted
            done += count
        return done

    def sendfile_source(self, offset: int, length: int) -> int | None:
        """The fd to os.sendfile the range from, when its first and last bytes are in the page
        cache (probed with RWF_NOWAIT); None otherwise.  The middle of a partly cached range may
        still block briefly in sendfile; cold ranges, the common case on a fresh source, are
        caught by the probe and read in a thread."""
        if not self._nowait_works or self._closed:
            return None
        probe = bytearray(1)
        try:
            for position in (offset, offset + length - 1):
                if os.preadv(self._fd, [probe], position, os.RWF_NOWAIT) != 1:
                    return None
        except OSError:
            return None
        return self._fd

    def extents(self, offset: int, length: int, limit: int = 1024) -> list[Extent]:
        end = min(offset + length, self._size)
        if offset >= end:
            return []
        if not self._seek_data_works:
            return [Extent(offset, end - offset, 0)]
        found: list[Extent] = []
        position = offset
        while position < end and len(found) < limit:
            try:
                data_start = os.lseek(self._fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from here to the end of the file
                    data_start = end
                elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and not found:
                    self._seek_data_works = False
                    return [Extent(offset, end - offset, 0)]
                else:
                    raise
            if data_start > position:
                stop = min(data_start, end)
                found.append(Extent(position, stop - position, HOLE_FLAGS))
                position = stop
                if position >= end or len(found) >= limit:
                    break
            try:
                hole_start = os.lseek(self._fd, position, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: the file shrank under us
                    raise
                hole_start = end
            stop = min(max(hole_start, position + 1), end)
            found.append(Extent(position, stop - position, 0))
            position = stop
        return found

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    # -- writes -----------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if not self._writable:
            raise OSError(errno.EPERM, "read-only export")

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._check_writable()
        view = memoryview(data)
        flags = os.RWF_DSYNC if fua else 0
        done = 0
        while done < len(view):
            done += os.pwritev(self._fd, [view[done:]], offset + done, flags)

    def flush(self) -> None:
        self._check_writable()
        os.fdatasync(self._fd)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        if not self._punch_works:
            return  # trim is advisory: doing nothing is correct
        try:
            punch_hole(self._fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._punch_works = False
            return
        if fua:
            os.fdatasync(self._fd)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool = False
    ) -> None:
        self._check_writable()
        done = False
        if may_trim and self._punch_works:
            try:
                punch_hole(self._fd, offset, length)
                done = True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._punch_works = False
        if not done and self._zero_range_works:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                done = True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._zero_range_works = False
        if not done:
            if fast_only:
                raise OSError(errno.ENOTSUP, "zeroing would be slow here")
            zeroes = bytes(min(length, _ZERO_CHUNK))
            position, end = offset, offset + length
            while position < end:
                count = min(len(zeroes), end - position)
                self.write(position, memoryview(zeroes)[:count])
                position += count
        if fua:
            os.fdatasync(self._fd)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> FileBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
