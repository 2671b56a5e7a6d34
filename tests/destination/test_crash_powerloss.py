"""Power loss, simulated in-process: unsynced data is thrown away at every step of the sync order.

kill -9 keeps the page cache; a power cut does not.  `UnsyncedDataTracker` (the engine's
`DataFileObserver`) records the old bytes under every change to the data file and forgets them
once an fdatasync that started after the change returns.  `BlockMap.durability_probe` names each
step of `make_durable`; at a chosen step of a chosen guest flush the test takes the crash image:
the data file with every unsynced change undone, the snapshot as it is (written atomically with
fsync), and the journal cut to what its last fsync covered, plus (at "journal-written", records
written but not fsync'd) a random prefix of the new records: often a torn record.

A new engine is then opened on the crash image with the same source and the guest's model is
checked: every chunk PRESENT in the reopened map holds exactly allowed bytes (blocks the guest
never wrote: the source's), and every block reads back as one of its candidates (a block written
before a flush that returned: exactly its last value).  The drain runs during the workload, so
drain commits, guest misses, writes, zeroes and trims interleave with the flushes.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import threading
from pathlib import Path

import pytest

from postcopy.destination.blockmap import JOURNAL_FILENAME, SNAPSHOT_FILENAME
from postcopy.destination.engine import Engine, EngineConfig
from tests.destination.test_crash_loop import SOURCE, ZERO, GuestModel, block_bytes
from tests.fakes import FakeSource

CHUNK = 64 * 1024
BLOCK = 4096
SIZE = 4 * 1024 * 1024
STEPS = ("captured", "data-synced", "journal-written", "map-persisted")


class SimulatedPowerLoss(Exception):
    pass


class UnsyncedDataTracker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.unsynced: list[tuple[int, bytes]] = []  # (offset, old bytes), oldest first
        self.sequence = 0

    def before_change(self, fd: int, offset: int, length: int) -> None:
        old = os.pread(fd, length, offset)
        with self.lock:
            self.unsynced.append((offset, old))
            self.sequence += 1

    def before_sync(self) -> object:
        with self.lock:
            return len(self.unsynced)

    def after_sync(self, token: object) -> None:
        assert isinstance(token, int)
        with self.lock:
            del self.unsynced[:token]  # what the sync covered; later changes stay unsynced

    def synced_image(self, path: Path) -> bytearray:
        with self.lock:
            image = bytearray(path.read_bytes())
            for offset, old in reversed(self.unsynced):
                image[offset:offset + len(old)] = old
        return image


class Guest(GuestModel):
    """The crash loop's model of what each 4 KiB block may hold, driving an engine in-process."""

    def __init__(self, source: bytes, rng: random.Random) -> None:
        super().__init__(source)
        self.rng = rng

    def step(self, engine: Engine) -> None:
        """One random guest operation (not a flush)."""
        rng = self.rng
        kind = rng.random()
        if kind < 0.25:  # a read: guest misses fetch and commit chunks
            offset = rng.randrange(0, SIZE - 8192)
            buf = bytearray(8192)
            engine.pread_into(memoryview(buf), offset)
            return
        if kind < 0.4:
            first, count = rng.randrange(0, SIZE // CHUNK) * (CHUNK // BLOCK), CHUNK // BLOCK
        else:
            first, count = rng.randrange(0, SIZE // BLOCK - 4), rng.randint(1, 4)
        if kind < 0.3:
            self.before_write(first, count, ZERO)  # a whole-chunk trim punches a hole: zeros here
            engine.trim(first * BLOCK, count * BLOCK)
        elif kind < 0.5:
            self.before_write(first, count, ZERO)
            engine.zero(first * BLOCK, count * BLOCK, may_trim=rng.random() < 0.5)
        else:
            engine.pwrite(self.new_write(first, count), first * BLOCK)


def describe(held: bytes, block: int, guest: Guest) -> str:
    """What a block holds, in the model's terms (for failure messages)."""
    if held == bytes(BLOCK):
        return "zeros"
    if held == guest.expected(SOURCE, block):
        return "the source's bytes"
    value, at = struct.unpack_from("<qq", held)
    if held == block_bytes(value, at):
        return f"value {value} (written for block {at})"
    return f"unknown bytes {held[:16]!r}"


def make_engine(dest: Path, state_dir: Path, source: FakeSource, drain: bool,
                tracker: UnsyncedDataTracker | None = None) -> Engine:
    config = EngineConfig(
        source_uri="nbd://fake/", dest_path=dest, state_dir=state_dir, chunk_size=CHUNK,
        drain=drain, drain_request_bytes=4 * CHUNK, drain_requests_in_flight=2,
        sync_interval=3600.0, status_interval=0.05,
    )  # fmt: skip
    engine = Engine(config, source_opener=source.open_client, data_observer=tracker)
    engine.start()
    return engine


def run_until_power_loss(tmp_path: Path, seed: int, step: str) -> dict[str, int]:
    rng = random.Random(seed)
    data = random.Random(seed + 1000).randbytes(SIZE)
    source = FakeSource(data, holes=[(3 * 1024 * 1024, 256 * 1024)])
    data = bytes(source.data)  # (holes read as zeros)
    source.read_delay = 0.002  # the drain stays busy during the workload
    live, crashed = tmp_path / f"live-{seed}-{step}", tmp_path / f"crashed-{seed}-{step}"
    for directory in (live, crashed):
        (directory / "state").mkdir(parents=True)
    (live / "disk.img").write_bytes(b"")
    os.truncate(live / "disk.img", SIZE)
    tracker = UnsyncedDataTracker()
    engine = make_engine(live / "disk.img", live / "state", source, True, tracker)
    guest = Guest(data, rng)
    crash_at_flush = rng.randint(1, 8)
    flushes = 0

    guest_thread = threading.current_thread()

    def probe(name: str) -> None:
        # only in the guest's flush (the engine also syncs on its own, e.g. at completion)
        if name != step or flushes < crash_at_flush or threading.current_thread() != guest_thread:
            return
        engine.map.durability_probe = None
        (crashed / "disk.img").write_bytes(tracker.synced_image(live / "disk.img"))
        snapshot = live / "state" / SNAPSHOT_FILENAME
        if snapshot.exists():
            shutil.copyfile(snapshot, crashed / "state" / SNAPSHOT_FILENAME)
        journal = (live / "state" / JOURNAL_FILENAME).read_bytes()
        kept = engine.map.journal_synced_bytes
        if name == "journal-written":  # some unsynced records reached the disk, maybe torn
            kept += rng.randint(0, len(journal) - kept)
        (crashed / "state" / JOURNAL_FILENAME).write_bytes(journal[:kept])
        raise SimulatedPowerLoss

    engine.map.durability_probe = probe
    try:
        while True:
            assert flushes < 200, "no flush reached the crash point"
            for _ in range(rng.randint(1, 12)):
                guest.step(engine)
            flushes += 1
            pending = set(guest.written_since_flush)
            try:
                engine.flush()
            except SimulatedPowerLoss:
                break
            guest.after_flush(pending)
    finally:
        engine.map.durability_probe = None
        engine.stop()

    # power back: a new engine on the crash image, the same source
    reopened = make_engine(crashed / "disk.img", crashed / "state", source, False)
    try:
        on_disk = (crashed / "disk.img").read_bytes()
        present_checked = 0
        for chunk in range(SIZE // CHUNK):
            if not reopened.map.is_present(chunk):
                continue
            for block in range(chunk * CHUNK // BLOCK, (chunk + 1) * CHUNK // BLOCK):
                held = on_disk[block * BLOCK:(block + 1) * BLOCK]
                allowed = guest.candidates.get(block, [SOURCE])
                assert any(guest.expected(v, block) == held for v in allowed), (
                    f"seed {seed} step {step}: PRESENT chunk {chunk} block {block} holds "
                    f"{describe(held, block, guest)}, none of {allowed}"
                )
                present_checked += 1
        for block, allowed in guest.candidates.items():
            buf = bytearray(BLOCK)
            reopened.pread_into(memoryview(buf), block * BLOCK)
            assert any(guest.expected(v, block) == bytes(buf) for v in allowed), (
                f"seed {seed} step {step}: block {block} reads as none of {allowed} "
                f"(one candidate: it was flushed)"
            )
        flushed_blocks = sum(1 for allowed in guest.candidates.values() if len(allowed) == 1)
    finally:
        reopened.stop()
    return {"present_blocks": present_checked, "flushed_blocks": flushed_blocks}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("step", STEPS)
def test_power_loss_at_each_sync_step_keeps_flushed_writes_and_no_wrong_present_chunk(
    tmp_path: Path, step: str
) -> None:
    totals = {"present_blocks": 0, "flushed_blocks": 0}
    for seed in range(6):
        for key, value in run_until_power_loss(tmp_path, seed, step).items():
            totals[key] += value
    assert totals["present_blocks"] > 0 and totals["flushed_blocks"] > 0  # the checks ran


def test_flush_after_overwriting_guest_written_chunks_syncs_the_data(tmp_path: Path) -> None:
    """Overwriting a chunk that is already PRESENT and guest-written changes no map bit; the
    flush must fdatasync all the same (it used to return early: the write was lost on power
    loss although the guest saw its flush succeed)."""
    source = FakeSource(bytes(SIZE))
    (tmp_path / "state").mkdir()
    (tmp_path / "disk.img").write_bytes(b"")
    os.truncate(tmp_path / "disk.img", SIZE)
    tracker = UnsyncedDataTracker()
    engine = make_engine(tmp_path / "disk.img", tmp_path / "state", source, False, tracker)
    try:
        engine.pwrite(b"a" * CHUNK, 0)
        engine.flush()
        assert engine.map.pending_changes == 0 and tracker.unsynced == []
        engine.pwrite(b"b" * 4096, 8192)  # no bit changes
        assert engine.map.pending_changes == 0 and len(tracker.unsynced) == 1
        engine.flush()
        assert tracker.unsynced == []  # the flush covered it
        image = tracker.synced_image(tmp_path / "disk.img")
        assert image[8192:12288] == b"b" * 4096
    finally:
        engine.stop()
