"""The destination's local data file: every read, change and sync of it, and the release fence.

`LocalDisk` owns the descriptor of the sparse file the disk is served from.  Every change to the
file goes through `write`, `punch_hole` or `zero_range`, and every sync through `sync`, so that a
test's `DataFileObserver` sees them all and can simulate a power loss exactly (it undoes the
changes no completed fdatasync covered).  `mark_present` is the one way a chunk becomes PRESENT
after its data was written: the release fence, then the block map's store (see below).

The file's size is the disk's size and never changes (fallocate with KEEP_SIZE).  The methods
are safe from any thread: they are plain system calls on one descriptor at explicit offsets;
which thread may write which chunk is the engine's rule (the commit lock, see `engine`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable
from typing import Protocol

from nbdsrv.backend import FALLOC_FL_KEEP_SIZE as _FALLOC_FL_KEEP_SIZE
from nbdsrv.backend import FALLOC_FL_ZERO_RANGE as _FALLOC_FL_ZERO_RANGE
from nbdsrv.backend import fallocate, punch_hole
from postcopy.destination.blockmap import BlockMap
from postcopy.destination.planner import EXTENT_HOLE, EXTENT_ZERO
from postcopy.errors import UserError


class EngineIOError(OSError):
    """An operation failed; `errno` is what the NBD client should see."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message or os.strerror(code))


# #### the release fence ##########################################################################
#
# The C fast path (plugin/fastpath.c) reads the live map on nbdkit's threads without the GIL: it
# load-acquires a chunk's byte and, when PRESENT is set, preads the chunk from the data file.  For
# that to return the data, our data write (a pwrite/fallocate system call: stores the kernel makes
# into the page cache on this thread) must be visible before the PRESENT store into the mapping.
# A system call return is no memory barrier on weakly ordered CPUs (arm64, POWER, RISC-V), so a
# release fence goes between them.  On x86 (TSO) stores are never reordered with older stores:
# the program order (the system call returns before the mapping store is executed) is enough, and
# the fence is a no-op.  Elsewhere the fence is C11 `atomic_thread_fence(memory_order_release)`
# from libatomic (a dependency of gcc, which builds the filter); without it the engine refuses
# to run, rather than let the filter serve a chunk before its data.  (`BlockMap.mark` takes a
# lock before the store, but a lock acquire orders only what follows it.  Our own Python readers,
# `pread_into` on other worker threads, need no fence: they hold the GIL, whose hand-off is a
# release/acquire pair; a free-threaded build would need acquire loads there too.)
_TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i486", "i586", "i686"})
_MEMORY_ORDER_RELEASE = 3  # C11 memory_order_release


def release_fence_for(machine: str, libatomic_path: str | None) -> Callable[[], None]:
    """The release fence to run between a data write and the PRESENT store for CPU `machine`
    (`platform.machine()`), from libatomic at `libatomic_path` where one is needed."""
    if machine.lower() in _TSO_MACHINES:
        return _no_fence
    fence = None
    if libatomic_path is not None:
        with contextlib.suppress(OSError, AttributeError):
            fence = ctypes.CDLL(libatomic_path).atomic_thread_fence
    if fence is None:
        raise UserError(
            f"libatomic is missing (Debian: apt install libatomic1): on {machine} the block "
            "map's stores need its release fence"
        )
    fence.argtypes = [ctypes.c_int]
    fence.restype = None
    return lambda: fence(_MEMORY_ORDER_RELEASE)


def _no_fence() -> None:
    pass


class DataFileObserver(Protocol):
    """Sees every change to the local data file and every fdatasync of it (tests simulate power
    loss with it: they undo the changes no completed fdatasync covered).  Not used in service."""

    def before_change(self, fd: int, offset: int, length: int) -> None: ...

    def before_sync(self) -> object: ...

    def after_sync(self, token: object) -> None: ...


# #### the data file ##############################################################################


class LocalDisk:
    """The data file at `fd` (owned: `close` closes it), `size` bytes."""

    def __init__(
        self,
        fd: int,
        size: int,
        observer: DataFileObserver | None,
        release_fence: Callable[[], None],
    ) -> None:
        self.fd = fd  # open O_RDWR until close()
        self.size = size  # the file's (and the disk's) size; never changes
        self._observer = observer  # sees every change and sync (tests only)
        self._release_fence = release_fence  # see release_fence_for

    def close(self) -> None:
        os.close(self.fd)

    def read_into(self, buf: memoryview | bytearray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        while view:
            got = os.preadv(self.fd, [view], offset)
            if got <= 0:
                raise EngineIOError(errno.EIO, "short read from the local file")
            view = view[got:]
            offset += got

    def write(self, buf: memoryview | bytes | bytearray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        if self._observer is not None:
            self._observer.before_change(self.fd, offset, len(view))
        while view:
            done = os.pwritev(self.fd, [view], offset)
            view = view[done:]
            offset += done

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate the range (it reads as zeros); OSError EOPNOTSUPP/ENOSYS where the file
        system cannot."""
        if self._observer is not None:
            self._observer.before_change(self.fd, offset, length)
        punch_hole(self.fd, offset, length)

    def zero_range(self, offset: int, count: int) -> None:
        """Make the range read as zeros, allocated: fallocate(ZERO_RANGE), or writes of zeros
        where the file system has no such mode."""
        try:
            if self._observer is not None:
                self._observer.before_change(self.fd, offset, count)
            fallocate(self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, count)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            zeros = bytes(min(count, 1 << 20))
            position, end = offset, offset + count
            while position < end:
                step = min(len(zeros), end - position)
                self.write(memoryview(zeros)[:step], position)
                position += step

    def sync(self) -> None:
        """Step 2 of `BlockMap.make_durable`: every data write made so far reaches the disk."""
        if self._observer is None:
            os.fdatasync(self.fd)
            return
        token = self._observer.before_sync()
        os.fdatasync(self.fd)
        self._observer.after_sync(token)

    def mark_present(self, block_map: BlockMap, first: int, end: int, bits: int) -> None:
        """Set `bits` (with PRESENT) on chunks whose data write has returned: the release fence
        first, so that the C fast path never sees the bit before the data (see
        `release_fence_for`)."""
        self._release_fence()
        block_map.mark(first, end, bits)

    def allocated_extents(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(offset, length, type) runs of `[start, end)` by the file's allocation: holes are
        `EXTENT_HOLE | EXTENT_ZERO`, data 0 (SEEK_DATA / SEEK_HOLE)."""
        extents: list[tuple[int, int, int]] = []
        position = start
        while position < end:
            try:
                data_start = os.lseek(self.fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data_start = end
            data_start = min(data_start, end)
            if data_start > position:
                extents.append((position, data_start - position, EXTENT_HOLE | EXTENT_ZERO))
            if data_start >= end:
                break
            data_end = min(os.lseek(self.fd, data_start, os.SEEK_HOLE), end)
            extents.append((data_start, data_end - data_start, 0))
            position = data_end
        return extents
