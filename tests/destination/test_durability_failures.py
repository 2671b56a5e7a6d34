"""Failed syncs and full disks: an I/O error of the data file or of the map is never forgotten.

Linux reports a failed writeback to fsync/fdatasync once per open file and then marks the pages
clean, so the next sync "succeeds" for data that is gone.  The engine must treat a failed sync as
permanent (every later flush fails with EIO, no PRESENT bit captured before it is ever
persisted, the status says `failed`), and a failed journal write must leave no half record.

The failures are real where they can be: small filesystems made by the test (a tmpfs with
`size=`, we run as root) that really fill up, and an ext2 filesystem on a loop device whose
backing file lives on a tiny tmpfs, so that the filesystem has room but its disk has not: writes
land in the page cache and the writeback fails, exactly the error the bug forgot.  The data-sync
failure is also injected through the engine's `DataFileObserver` seam, with a model of the lost
pages, so that the test can show what a restart reads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from postcopy import fsutil
from postcopy.destination import gate as source_gate
from postcopy.destination import status
from postcopy.destination.blockmap import (
    GUEST_WRITTEN,
    JOURNAL_FILENAME,
    LIVE_MAP_FILENAME,
    PRESENT,
    SOURCE_HOLE,
    BlockMap,
    MapIdentity,
)
from postcopy.destination.engine import Engine, EngineConfig
from postcopy.errors import UserError
from postcopy.fsutil import SyncError
from tests.destination.test_receive import Receiver, connect, receive_command
from tests.fakes import FakeSource
from tests.peers import running_receive_command, running_serve

MiB = 1024 * 1024
CHUNK = 64 * 1024
PAGE = 4096


def identity(chunks: int = 1024, chunk_size: int = CHUNK) -> MapIdentity:
    size = chunks * chunk_size
    return MapIdentity(size, chunk_size, size, "", "nbd://test/")


# ----- small real filesystems ----------------------------------------------------------------


def run(*command: str) -> None:
    subprocess.run(command, check=True, timeout=60, capture_output=True)


@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `mountpoint` (made if needed), unmounted at the end."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint))
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def unmount(mountpoint: Path) -> None:
    for _ in range(50):  # a process that just died may hold it for a moment
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    run("umount", "-l", str(mountpoint))


def fill_filesystem(directory: Path) -> Path:
    """Write a filler file until the filesystem is full; returns it (delete it to free space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for step in (MiB, PAGE, 1):
            block = bytes(step)
            for _ in range(1 << 20):  # bounded: the filesystem is a few MiB at most
                try:
                    if os.write(fd, block) < step:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def disk_that_runs_out(mountpoint: Path, backing: Path, fs_size: str, disk_room: str) -> Iterator[
    tuple[Path, Path]
]:
    """An ext2 filesystem of `fs_size` at `mountpoint`, on a loop device whose backing file lives
    on a tmpfs of only `disk_room`: the filesystem accepts writes that its disk cannot hold, so
    the writeback (and the fdatasync that waits for it) fails with ENOSPC.  Yields
    (mountpoint, backing tmpfs); `remount_with_room` gives the disk room and mounts it again."""
    with mounted_tmpfs(backing, disk_room):
        image = backing / "disk.ext2"
        with open(image, "wb") as f:
            f.truncate(_parse_size(fs_size))
        run("mkfs.ext2", "-q", "-F", str(image))
        loop = subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True,
            timeout=60,
        ).stdout.strip()
        try:
            mountpoint.mkdir(parents=True, exist_ok=True)
            run("mount", "-o", "errors=continue", loop, str(mountpoint))
            try:
                yield mountpoint, backing
            finally:
                if os.path.ismount(mountpoint):
                    unmount(mountpoint)
        finally:
            run("losetup", "-d", loop)


def remount_with_room(mountpoint: Path, backing: Path, room: str) -> None:
    """Unmount the loop filesystem (the page cache goes: what did not reach the disk is gone),
    give its disk `room`, repair what the failed writeback left and mount it again."""
    loop = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(mountpoint)], check=True, capture_output=True,
        text=True, timeout=60,
    ).stdout.strip()
    unmount(mountpoint)
    run("mount", "-o", f"remount,size={room}", str(backing))
    subprocess.run(["e2fsck", "-fy", loop], capture_output=True, timeout=60)  # exit 1: fixed
    run("mount", "-o", "errors=continue", loop, str(mountpoint))


def _parse_size(text: str) -> int:
    units = {"k": 1024, "m": MiB}
    return int(text[:-1]) * units[text[-1].lower()]


# ----- a receive process with chosen paths ---------------------------------------------------


@contextlib.contextmanager
def receive_at(
    source: str, dest: Path, state_dir: Path, workdir: Path, *extra: str
) -> Iterator[Receiver]:
    """`postcopy receive` with its dest and state directory where the test wants them."""
    socket_path = workdir / "d.sock"
    log_path = workdir / f"receive-{time.monotonic_ns()}.log"
    command = receive_command(source, dest, state_dir, "--socket", str(socket_path), *extra)
    with running_receive_command(command, log_path) as (process, uri):
        yield Receiver(process, uri, state_dir, dest, log_path)


def kill9(receiver: Receiver) -> None:
    """SIGKILL the serving process (nbdkit, the engine's process) and wait for receive."""
    pid = receiver.wait_status(lambda r: True)["pid"]
    os.kill(pid, signal.SIGKILL)
    receiver.process.wait(15)
    for _ in range(100):  # the engine's process is gone for good
        if not status.process_alive(pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} survived SIGKILL")


def chunk_bytes(chunk: int) -> bytes:
    return chunk.to_bytes(4, "little") * (CHUNK // 4)


# ----- the block map: a failed sync is permanent ---------------------------------------------


def test_failed_data_sync_persists_no_bit_ever_and_every_later_call_fails(tmp_path: Path) -> None:
    block_map = BlockMap.open(tmp_path, identity())
    block_map.mark_present(1, 2)
    block_map.make_durable(lambda: None)  # durable: stays

    def failing_sync() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    block_map.mark_present(5, 6, guest_written=True)
    with pytest.raises(OSError) as failed:
        block_map.make_durable(failing_sync)
    assert failed.value.errno == errno.EIO
    block_map.mark_present(9, 10)  # after the failure: never persisted either
    synced: list[int] = []
    for compact in (False, True):  # the next sync "succeeds" (Linux): it must not count
        with pytest.raises(OSError) as again:
            block_map.make_durable(lambda: synced.append(1), compact=compact)
        assert again.value.errno == errno.EIO
    assert synced == []
    reason = block_map.durability_failure
    assert reason is not None and "No space left on device" in reason
    block_map.close()
    reopened = BlockMap.open(tmp_path, identity())
    assert list(reopened.present_ranges()) == [(1, 2)]
    assert reopened.guest_written_count == 0
    reopened.close()


def test_failed_journal_sync_fails_the_map_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block_map = BlockMap.open(tmp_path, identity())
    real_fdatasync = os.fdatasync
    failures = [errno.EIO]  # the journal's next fdatasync fails once, as Linux reports it

    def fdatasync(fd: int) -> None:
        if fd == block_map._journal_fd and failures:
            raise OSError(failures.pop(), "journal writeback failed")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    block_map.mark_present(3, 4)
    with pytest.raises(OSError):
        block_map.make_durable(lambda: None)
    block_map.mark_present(7, 8)
    with pytest.raises(OSError) as again:  # the retry's fdatasync would "succeed"
        block_map.make_durable(lambda: None)
    assert again.value.errno == errno.EIO
    assert "journal sync failed" in (block_map.durability_failure or "")
    block_map.close()


def test_failed_snapshot_sync_fails_the_map_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block_map = BlockMap.open(tmp_path, identity())
    real_fsync = os.fsync
    failures = [errno.EIO]

    def fsync(fd: int) -> None:
        if failures and os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(failures.pop(), "snapshot writeback failed")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    block_map.mark_present(3, 4)
    with pytest.raises(OSError):
        block_map.make_durable(lambda: None, compact=True)
    with pytest.raises(OSError) as again:
        block_map.make_durable(lambda: None, compact=True)
    assert again.value.errno == errno.EIO
    block_map.close()


# ----- the block map: a journal append on a full filesystem is all or nothing ----------------


def test_journal_append_on_a_full_filesystem_leaves_no_half_record(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "fs", "256k") as fs:
        state_dir = fs / "state"
        state_dir.mkdir()
        block_map = BlockMap.open(state_dir, identity())
        header = block_map.journal_synced_bytes
        # records up to just before the journal's first page ends (one record each)
        fitting = (PAGE - header) // 24
        for chunk in range(0, 2 * (fitting - 1), 2):
            block_map.mark_present(chunk, chunk + 1, guest_written=True)
            block_map.make_durable(lambda: None)
        assert (PAGE - block_map.journal_synced_bytes) % 24, "the test needs a torn record"
        good_end = block_map.journal_synced_bytes
        filler = fill_filesystem(fs)
        # five records cross into the next page, which the filesystem cannot give: a short
        # write (the first bytes fit in the page), then ENOSPC
        for chunk in range(1000, 1010, 2):
            block_map.mark_present(chunk, chunk + 1, guest_written=True)
        with pytest.raises(OSError) as full:
            block_map.make_durable(lambda: None)
        assert full.value.errno == errno.ENOSPC
        assert (state_dir / JOURNAL_FILENAME).stat().st_size == good_end  # no fragment left
        assert block_map.pending_changes == 5  # not lost, not taken as persisted
        assert block_map.durability_failure is None  # a write error is not permanent
        filler.unlink()
        block_map.mark_present(1011, 1012, guest_written=True)
        block_map.make_durable(lambda: None)  # the retry persists the five and the new one
        block_map.close()
        reopened = BlockMap.open(state_dir, identity())  # not refused as corrupt
        expected = [(c, c + 1) for c in range(0, 2 * (fitting - 1), 2)]
        expected += [(c, c + 1) for c in range(1000, 1010, 2)] + [(1011, 1012)]
        assert list(reopened.guest_written_ranges()) == expected
        assert list(reopened.present_ranges()) == expected
        reopened.close()


def test_compaction_on_a_full_filesystem_persists_through_the_journal(tmp_path: Path) -> None:
    """A snapshot needs new blocks; the journal's last page still has room for a record."""
    with mounted_tmpfs(tmp_path / "fs", "256k") as fs:
        state_dir = fs / "state"
        state_dir.mkdir()
        block_map = BlockMap.open(state_dir, identity())
        fill_filesystem(fs)
        block_map.mark_present(3, 4, guest_written=True)
        block_map.make_durable(lambda: None, compact=True)  # a guest flush: it must succeed
        assert block_map.pending_changes == 0
        block_map.close()
        reopened = BlockMap.open(state_dir, identity())
        assert list(reopened.guest_written_ranges()) == [(3, 4)]
        reopened.close()


def test_live_map_on_a_full_filesystem_is_refused_at_open_not_a_crash(tmp_path: Path) -> None:
    """live.map is a shared mapping: a store into a page the filesystem cannot allocate kills
    the process with SIGBUS.  Its blocks are allocated at open, so a full disk is a StateError."""
    with mounted_tmpfs(tmp_path / "fs", "64k") as fs:
        state_dir = fs / "state"
        state_dir.mkdir()
        BlockMap.open(state_dir, identity(chunks=256 * 1024)).close()  # the journal exists
        fill_filesystem(fs)
        script = (
            "import sys\n"
            "from postcopy.destination.blockmap import BlockMap, MapIdentity\n"
            "from postcopy.errors import StateError\n"
            f"identity = MapIdentity({256 * 1024 * CHUNK}, {CHUNK}, {256 * 1024 * CHUNK}, '',"
            " 'nbd://test/')\n"
            "try:\n"
            f"    block_map = BlockMap.open({str(state_dir)!r}, identity, live_mirror=True)\n"
            "except StateError as exc:\n"
            "    print(exc); sys.exit(3)\n"
            "block_map.mark_present(200000, 200001)\n"
            "print('marked')\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
            cwd=Path(__file__).parent.parent,
        )
        assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
        assert "No space left on device" in done.stdout
        assert not (state_dir / "live.map.tmp").exists()  # it would hold the little space left


def test_status_write_on_a_full_filesystem_leaves_no_temporary_file(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "fs", "64k") as fs:
        status.write_status(fs, {"state": "fetching"})
        fill_filesystem(fs)
        with pytest.raises(OSError):
            status.write_status(fs, {"state": "failed", "error": "x" * 3 * PAGE})
        assert sorted(p.name for p in fs.iterdir()) == ["filler", "status.json"]
        assert status.read_status(fs)["state"] == "fetching"  # the old record, whole


def test_source_frozen_on_a_full_filesystem_is_one_line_and_leaves_no_gate(
    tmp_path: Path,
) -> None:
    with mounted_tmpfs(tmp_path / "fs", "64k") as fs:
        state_dir = fs / "state"
        state_dir.mkdir()
        fill_filesystem(fs)
        done = subprocess.run(
            [sys.executable, "-m", "postcopy.cli", "source-frozen", "--state-dir", str(state_dir)],
            capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "No space left on device" in done.stderr
        assert list(state_dir.iterdir()) == []


def test_source_frozen_whose_directory_sync_fails_leaves_no_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename happened but may not survive a crash: the engine must not open its gate on it."""

    def failing_directory_sync(directory: Path) -> None:
        raise SyncError(errno.EIO, "directory writeback failed")

    monkeypatch.setattr(fsutil, "fsync_directory", failing_directory_sync)
    with pytest.raises(UserError, match="directory writeback failed"):
        source_gate.declare_source_frozen(tmp_path)
    assert not source_gate.is_source_frozen(tmp_path)


# ----- BlockMap.run_from under concurrent bit-setting ----------------------------------------


class StatesTurningPresent(bytearray):
    """Map bytes where reading chunk `target` one at a time makes it PRESENT right after the
    read, as a commit on another thread would between two reads of the same chunk."""

    target = -1

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        value = super().__getitem__(index)
        if index == self.target:
            self.target = -1
            super().__setitem__(index, super().__getitem__(index) | PRESENT)
        return value


@pytest.mark.parametrize("initial", [0, SOURCE_HOLE, GUEST_WRITTEN])
def test_run_from_is_consistent_when_a_chunk_turns_present_meanwhile(
    tmp_path: Path, initial: int
) -> None:
    states = StatesTurningPresent(bytes([initial]) * 16)
    states.target = 4
    block_map = BlockMap(tmp_path, identity(chunks=16), states)
    found = block_map.run_from(4)  # the old code: AssertionError here
    # one consistent state of chunk 4: as it was (a run to the end), or PRESENT (a run of one)
    assert found in ((16, False, bool(initial & SOURCE_HOLE)), (5, True, False))


def test_run_from_classifies_every_byte_value(tmp_path: Path) -> None:
    for value in range(8):
        block_map = BlockMap(tmp_path, identity(chunks=3), bytearray([value, value, value ^ 1]))
        end, present, source_hole = block_map.run_from(0)
        assert end == 2
        assert present == bool(value & PRESENT)
        assert source_hole == (not value & PRESENT and bool(value & SOURCE_HOLE))


# ----- the engine: a failed data sync, injected at the DataFileObserver seam ----------------


class LosingWritebackTracker:
    """The engine's DataFileObserver: remembers the old bytes under every change not yet covered
    by a completed fdatasync.  When `fail_next_sync` is set, the next fdatasync fails the way a
    writeback error does: the changes it should have covered are lost for good (the pages were
    marked clean), even though later syncs succeed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.unsynced: list[tuple[int, bytes]] = []
        self.lost: list[tuple[int, bytes]] = []
        self.fail_next_sync = False
        self.sync_failed = threading.Event()

    def before_change(self, fd: int, offset: int, length: int) -> None:
        old = os.pread(fd, length, offset)
        with self.lock:
            self.unsynced.append((offset, old))

    def before_sync(self) -> object:
        with self.lock:
            if self.fail_next_sync:
                self.fail_next_sync = False
                self.lost += self.unsynced
                self.unsynced = []
                self.sync_failed.set()
                raise OSError(errno.EIO, "writeback failed (injected)")
            return len(self.unsynced)

    def after_sync(self, token: object) -> None:
        assert isinstance(token, int)
        with self.lock:
            del self.unsynced[:token]

    def image_after_power_loss(self, path: Path) -> bytes:
        with self.lock:
            image = bytearray(path.read_bytes())
            for offset, old in reversed(self.lost + self.unsynced):
                image[offset:offset + len(old)] = old
        return bytes(image)


def test_failed_periodic_data_sync_fails_every_later_flush_and_restart_refetches(
    tmp_path: Path,
) -> None:
    rng = random.Random(10)
    source = FakeSource(rng.randbytes(32 * CHUNK))
    dest, state_dir = tmp_path / "disk.img", tmp_path / "state"
    dest.write_bytes(bytes(len(source.data)))
    state_dir.mkdir()

    def engine_config(**settings: object) -> EngineConfig:
        return EngineConfig(
            source_uri="nbd://fake/", dest_path=dest, state_dir=state_dir, drain=False,
            status_interval=0.05, chunk_size=CHUNK, **settings,  # type: ignore[arg-type]
        )

    tracker = LosingWritebackTracker()
    engine = Engine(engine_config(sync_interval=0.05), source.open_client, data_observer=tracker)
    engine.start()
    try:
        engine.pwrite(b"A" * CHUNK, 0)
        engine.flush()  # chunk 0 is durable
        tracker.fail_next_sync = True
        read = bytearray(CHUNK)
        engine.pread_into(read, 5 * CHUNK)  # a miss: chunk 5 fetched, PRESENT
        assert bytes(read) == source.data[5 * CHUNK:6 * CHUNK]
        engine.pwrite(b"B" * CHUNK, 7 * CHUNK)  # a guest write into a missing chunk
        assert tracker.sync_failed.wait(10), "the periodic sync never ran"
        for _ in range(2):  # every later flush fails, whatever fdatasync says now
            with pytest.raises(OSError) as failed:
                engine.flush()
            assert failed.value.errno == errno.EIO
        with pytest.raises(OSError) as refused:
            engine.pwrite(b"C" * CHUNK, 9 * CHUNK, fua=True)
        assert refused.value.errno == errno.EIO
        with pytest.raises(OSError) as unreadable:  # chunk 5's pages may be gone: no reads
            engine.pread_into(bytearray(CHUNK), 5 * CHUNK)
        assert unreadable.value.errno == errno.EIO
        live_map = (state_dir / LIVE_MAP_FILENAME).read_bytes()
        assert live_map == bytes(len(live_map))  # the C filter serves nothing either
        record = engine.statistics()
        assert record["state"] == "failed"
        assert "data file sync failed" in record["error"]
    finally:
        engine.stop()
    on_disk = status.read_status(state_dir)
    assert on_disk["state"] == "failed" and "sync failed" in on_disk["error"]
    # the power goes: the lost pages are gone; the map kept only what was provably durable
    dest.write_bytes(tracker.image_after_power_loss(dest))
    again = Engine(engine_config(), source.open_client)
    again.start()
    try:
        assert [again.map.is_present(c) for c in (0, 5, 7)] == [True, False, False]
        disk = bytearray(len(source.data))
        again.pread_into(disk, 0)  # chunks 5 and 7 are fetched again
        expected = bytearray(source.data)
        expected[0:CHUNK] = b"A" * CHUNK
        assert disk == expected
        again.flush()
    finally:
        again.stop()


# ----- real nbdkit: a full disk under the data file, a full state directory ------------------


def test_receive_on_a_disk_that_runs_out_fails_flush_with_eio_and_restart_refetches(
    tmp_path: Path,
) -> None:
    """The data file is on a filesystem whose disk fills up during the drain: the writeback
    fails, fdatasync says ENOSPC once.  The guest's flush gets EIO (at the NBD client), the
    status says failed; after a restart on a disk with room, the bytes equal the source."""
    image = tmp_path / "source.img"
    image.write_bytes(random.Random(11).randbytes(16 * MiB))
    real_state = tmp_path / "state"
    real_state.mkdir()
    with running_serve(f"disk={image}") as serve, disk_that_runs_out(
        tmp_path / "mnt", tmp_path / "backing", "64m", "3m"
    ) as (mnt, backing):
        uri = serve.export_uri("disk")
        dest = mnt / "disk.img"
        with receive_at(uri, dest, real_state, tmp_path) as receiver:
            record = receiver.wait_status(
                lambda r: r["state"] in ("failed", "complete"), timeout=60
            )
            handle = connect(receiver.uri)
            with pytest.raises(nbd.Error) as flush_failed:
                handle.flush()
            assert flush_failed.value.errnum == errno.EIO, (record, receiver.log())
            with pytest.raises(nbd.Error) as read_failed:  # not even from the C filter
                handle.pread(CHUNK, 0)
            assert read_failed.value.errnum == errno.EIO
            handle.shutdown()
            record = receiver.wait_status(lambda r: r["state"] == "failed")
            assert re.search("sync failed", record["error"]), record
            progress = subprocess.run(
                [sys.executable, "-m", "postcopy.cli", "fetch-progress", "--state-dir",
                 str(real_state)], capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert re.search("failed.*sync failed", progress.stdout), progress
        remount_with_room(mnt, backing, "64m")
        with receive_at(uri, dest, real_state, tmp_path) as again:
            record = again.wait_status(lambda r: r["state"] == "complete", timeout=60)
            assert record["transferred_bytes"] > 0  # what was lost is fetched again
        assert dest.read_bytes() == image.read_bytes()


def test_receive_killed_after_journal_enospc_resumes_with_every_guest_write(
    tmp_path: Path,
) -> None:
    """The state directory's filesystem fills up while the guest writes and flushes: a journal
    append is cut short (ENOSPC), the flush fails; space comes back and later flushes succeed;
    kill -9; the restart resumes (nothing refused as corrupt) with every guest-written chunk
    PRESENT and GUEST_WRITTEN, reading the guest's bytes."""
    image = tmp_path / "source.img"
    image.write_bytes(random.Random(12).randbytes(32 * MiB))
    chunks = 32 * MiB // CHUNK
    with running_serve(f"disk={image}") as serve, mounted_tmpfs(tmp_path / "fs", "1m") as fs:
        uri = serve.export_uri("disk")
        state_dir, dest = fs / "state", tmp_path / "dest.img"
        # the source is not frozen: no drain, only the guest's writes change the map
        with receive_at(uri, dest, state_dir, tmp_path, "--wait-for-source") as receiver:
            handle = connect(receiver.uri)
            for chunk in range(0, 100):
                handle.pwrite(chunk_bytes(chunk), chunk * CHUNK)
                handle.flush()
            filler = fill_filesystem(fs)
            failed_flushes = 0
            for chunk in range(100, 300):
                handle.pwrite(chunk_bytes(chunk), chunk * CHUNK)
                try:
                    handle.flush()
                except nbd.Error as exc:
                    assert exc.errnum == errno.ENOSPC, exc
                    failed_flushes += 1
            assert failed_flushes > 0, "the journal never hit the full filesystem"
            filler.unlink()
            for chunk in range(300, 400):
                handle.pwrite(chunk_bytes(chunk), chunk * CHUNK)
                handle.flush()
            kill9(receiver)
        with receive_at(uri, dest, state_dir, tmp_path, "--wait-for-source") as again:
            record = again.wait_status(lambda r: r["guest_written_chunks"] == 400, timeout=30)
            assert record["present_bytes"] == 400 * CHUNK
            handle = connect(again.uri)
            for chunk in range(0, 400):  # a lost bit would read the source's bytes here
                assert handle.pread(CHUNK, chunk * CHUNK) == chunk_bytes(chunk), chunk
            handle.shutdown()
        on_disk = BlockMap.open(state_dir, MapIdentity(32 * MiB, CHUNK, 32 * MiB, "", uri))
        try:
            assert all(
                on_disk.bits(c) & (PRESENT | GUEST_WRITTEN) == PRESENT | GUEST_WRITTEN
                for c in range(400)
            )
            assert not any(on_disk.is_present(c) for c in range(400, chunks))
        finally:
            on_disk.close()
