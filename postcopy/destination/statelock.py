"""The state-directory lock: one destination engine per state directory (and per destination
file), for its whole life.

How it works.  The lock is an exclusive `flock` on the file `lock` in the state directory, taken
(non-blocking) before anything else in the directory is read or written.  A flock belongs to the
open file description, so it is shared by every process that inherited the descriptor and the
kernel releases it when the last of them dies, however it dies (kill -9 included): there is no
stale lock to clean up, and the file itself is never removed (unlinking a lock file lets two
processes lock two different files).

Who holds it.  `postcopy receive` takes it first and starts nbdkit with the descriptor inherited
(`state_lock_fd=N`); the plugin adopts it in `config_complete`, before the engine opens the block
map.  nbdkit runs with `--exit-with-parent`, so the lock lives exactly as long as the pair: there is
no moment where neither holds it.  nbdkit started by hand with the plugin (tests, benchmarks) takes
the lock itself.

The file records its holders, one `PID ROLE` line each (`4242 postcopy receive`, then
`4250 nbdkit`), so a refused command can say who has the directory.

The destination file gets the same kind of lock (`lock_destination`, a flock on the file itself,
taken by receive and inherited by nbdkit): two receives with two state directories but one
`--dest` would otherwise fetch over each other's guest writes.  Nothing can be recorded in a disk
image, so that refusal names no pid.

Which writers are refused.  Everything that writes the block map, the journal, the live map or the
status record is the engine's, and a second `receive` (or a hand-started nbdkit) is refused with one
line naming the holders.  `postcopy source-frozen` (and `qemu-migrate`, which calls the same
function) is deliberately not a conflicting writer: it creates one file, `source-frozen`,
atomically and idempotently, which the running engine polls; it is how an operator opens the gate
of a live receive, so it takes no lock.  `fetch-progress` and `config` never write into a state
directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path

from postcopy.errors import StateError, UserError

STATE_LOCK_FILENAME = "lock"
# how much of the lock file a refused command reads to name the holders
_HOLDERS_READ_LIMIT = 4096


class StateDirInUse(UserError):
    """The state directory's lock is held by another process."""


def state_lock_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_LOCK_FILENAME


class DestinationInUse(UserError):
    """The destination file is locked by another receive."""


class StateLock:
    """A held flock (on a state directory's lock file, or on a destination file); `release()`
    (or the death of every process that shares the descriptor) ends it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = Path(path)  # the locked file
        self.fd = fd  # the locked descriptor; pass it to a child that must share the lock

    def release(self) -> None:
        """Close our descriptor: the lock ends once no process that inherited it keeps it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _open_lock_file(state_dir: Path) -> int:
    path = state_lock_path(state_dir)
    if not Path(state_dir).is_dir():
        raise StateError(f"state directory {state_dir} does not exist")
    try:
        fd = os.open(
            path,
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            0o644,
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(f"lock file {path} is a symbolic link, not a regular file") from None
        raise StateError(f"cannot open the lock file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateError(f"lock file {path} is not a regular file")
    return fd


def _holders(fd: int) -> str:
    """The holders recorded in the lock file, for an error message ("pid 42 (receive), ...")."""
    try:
        text = os.pread(fd, _HOLDERS_READ_LIMIT, 0).decode(errors="replace")
    except OSError:
        text = ""
    holders = []
    for line in text.splitlines():
        pid, _, role = line.strip().partition(" ")
        if pid.isdigit():
            holders.append(f"pid {pid}" + (f" ({role})" if role else ""))
    return ", ".join(holders) or "another process (its pid is not recorded yet)"


def _record_holder(fd: int, role: str, *, first: bool) -> None:
    line = f"{os.getpid()} {role}\n".encode()
    if first:  # overwrite, then cut: a reader never sees an empty file between the two
        os.pwrite(fd, line, 0)
        os.ftruncate(fd, len(line))
    else:
        os.pwrite(fd, line, os.fstat(fd).st_size)


def _flock_or_close(
    fd: int, in_use: Callable[[], UserError], cannot_lock: Callable[[OSError], UserError]
) -> None:
    """Take an exclusive flock on `fd` without waiting.  When it fails, close `fd` and raise
    `in_use()` (someone else holds the lock; called before the close, so it may read `fd`) or
    `cannot_lock(the OSError)`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        error = in_use()
    except OSError as exc:
        error = cannot_lock(exc)
    os.close(fd)
    raise error from None


def _lock(fd: int, state_dir: Path) -> None:
    _flock_or_close(
        fd,
        lambda: StateDirInUse(
            f"state directory {state_dir} is in use by {_holders(fd)}: "
            "stop that postcopy receive first"
        ),
        lambda exc: StateError(f"cannot lock {state_lock_path(state_dir)}: {exc.strerror}"),
    )


def acquire_state_lock(state_dir: Path, role: str) -> StateLock:
    """Lock `state_dir` for this process (and the children it passes `fd` to) and record our
    pid; `StateDirInUse` (one line naming the holders) when another process has it.  Reads and
    writes nothing else in the directory; the directory must exist."""
    fd = _open_lock_file(state_dir)
    _lock(fd, state_dir)
    try:
        _record_holder(fd, role, first=True)
    except OSError as exc:
        os.close(fd)
        raise StateError(f"cannot write {state_lock_path(state_dir)}: {exc.strerror}") from None
    return StateLock(state_lock_path(state_dir), fd)


def adopt_state_lock(state_dir: Path, fd: int, role: str) -> StateLock:
    """Take over the lock a parent passed down as descriptor `fd`: check that it is the lock file
    of `state_dir` and that the lock is ours (flock on the inherited open file description
    succeeds at once; anyone else's lock refuses it), then add our pid to the holders."""
    path = state_lock_path(state_dir)
    try:
        held = os.fstat(fd)
        on_disk = os.lstat(path)
    except OSError as exc:
        raise StateError(f"inherited lock descriptor {fd} for {path}: {exc.strerror}") from None
    if (held.st_dev, held.st_ino) != (on_disk.st_dev, on_disk.st_ino):
        raise StateError(f"inherited lock descriptor {fd} is not {path}")
    os.set_inheritable(fd, False)
    _lock(fd, state_dir)
    with contextlib.suppress(OSError):  # the holder line is informative only
        _record_holder(fd, role, first=False)
    return StateLock(state_lock_path(state_dir), fd)


def lock_destination(dest: Path) -> StateLock:
    """flock the destination file itself (it must exist); `DestinationInUse` when another
    receive, whatever its state directory, serves it."""
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot open {dest}: {exc.strerror}") from None
    _flock_or_close(
        fd,
        lambda: DestinationInUse(
            f"destination {dest} is in use by another postcopy receive "
            "(with another state directory)"
        ),
        lambda exc: UserError(f"cannot lock {dest}: {exc.strerror}"),
    )
    return StateLock(Path(dest), fd)
