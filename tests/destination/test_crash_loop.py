"""Destination crash loop with real processes: kill -9 nbdkit (then `postcopy receive`) at random
moments of a write-and-flush guest workload during a slow drain, restart `receive` on the same
state directory, and check the guest's view every time.

The model keeps, per 4 KiB block the guest ever wrote, the values it may hold: a write adds its
value before it is sent (it may land even if never acknowledged); a flush that returns collapses
every block written before it to its last value (those writes must survive).  After each restart
every written block must read back as one of its candidates (a flushed block has exactly one:
stale source data there is a failure), and the value seen becomes the only candidate (kill -9
keeps the page cache, and a chunk whose PRESENT bit did not persist is fetched again from the
unchanged source, so what is seen stays).  At the end the drain completes and every block the
guest never wrote equals the source.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import threading
import time
from pathlib import Path

import nbd
import pytest

from tests.destination.test_receive import MiB, assert_equal_outside, connect, running_receive
from tests.peers import running_serve, sparse_test_image

BLOCK = 4096
SIZE = 32 * MiB
GUEST_AREA = 8 * MiB  # the guest writes here; the drain has the rest to do at every kill
ITERATIONS = 20
ZERO = -1  # the candidate value of a block zeroed by the guest
SOURCE = -2  # the candidate value "the source's bytes"


def block_bytes(value: int, block: int) -> bytes:
    return struct.pack("<qq", value, block) * (BLOCK // 16)


class GuestModel:
    """Per 4 KiB block the guest wrote, the values it may hold (see the module docstring)."""

    def __init__(self, source: bytes) -> None:
        self.source = source
        self.candidates: dict[int, list[int]] = {}
        self.written_since_flush: set[int] = set()
        self.next_value = 1

    def expected(self, value: int, block: int) -> bytes:
        if value == SOURCE:
            return self.source[block * BLOCK:(block + 1) * BLOCK]
        if value == ZERO:
            return bytes(BLOCK)
        return block_bytes(value, block)

    def before_write(self, first_block: int, count: int, value: int) -> None:
        for block in range(first_block, first_block + count):
            self.candidates.setdefault(block, [SOURCE]).append(value)
            self.written_since_flush.add(block)

    def new_write(self, first_block: int, count: int) -> bytes:
        """The bytes of a write of `count` blocks with a value never written before, noted as
        a candidate of each block (before the write is sent)."""
        value = self.next_value
        self.next_value += 1
        self.before_write(first_block, count, value)
        return b"".join(block_bytes(value, b) for b in range(first_block, first_block + count))

    def after_flush(self, blocks: set[int]) -> None:
        for block in blocks:
            self.candidates[block] = self.candidates[block][-1:]
        self.written_since_flush -= blocks

    def check_and_settle(self, handle: nbd.NBD) -> int:
        """Read every written block; each must hold a candidate.  Returns how many did."""
        checked = 0
        for block in sorted(self.candidates):
            seen = handle.pread(BLOCK, block * BLOCK)
            matches = [v for v in self.candidates[block] if self.expected(v, block) == seen]
            assert matches, (
                f"block {block} holds {seen[:16]!r}, none of its candidates "
                f"{self.candidates[block]} (flushed: exactly one)"
            )
            self.candidates[block] = matches[-1:]
            checked += 1
        self.written_since_flush.clear()
        return checked


def guest_workload(handle: nbd.NBD, model: GuestModel, rng: random.Random, stop: threading.Event,
                   counts: dict[str, int]) -> None:
    """Writes (partial chunks, whole chunks, zeroes) and flushes until the server dies."""
    try:
        while not stop.is_set():
            kind = rng.random()
            if kind < 0.15:
                pending = set(model.written_since_flush)
                handle.flush()
                model.after_flush(pending)
                counts["flushes"] += 1
                continue
            if kind < 0.3:
                first = rng.randrange(0, GUEST_AREA // (64 * 1024)) * 16  # a whole 64 KiB chunk
                count = 16
            else:
                first = rng.randrange(0, GUEST_AREA // BLOCK - 4)
                count = rng.randint(1, 4)
            if kind < 0.38:
                model.before_write(first, count, ZERO)
                handle.zero(count * BLOCK, first * BLOCK)
            else:
                handle.pwrite(model.new_write(first, count), first * BLOCK)
            counts["writes"] += 1
    except nbd.Error:
        pass  # the destination was killed under us


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(child) for child in text.split()]


@pytest.mark.timeout(120)
def test_kill9_at_random_moments_loses_no_flushed_write(tmp_path: Path) -> None:
    image = tmp_path / "source.img"
    sparse_test_image(image, SIZE, seed=41, data_fraction=1.0)
    model = GuestModel(image.read_bytes())
    rng = random.Random(42)
    counts = {"writes": 0, "flushes": 0, "kills": 0, "checked": 0, "missing_at_kill": 0}
    started = time.monotonic()
    socket_path = str(tmp_path / "source.sock")
    uri = f"nbd+unix:///disk?socket={socket_path}"
    # the drain is capped at 512 KiB/s (64 s for the disk): every kill lands mid-drain
    receive_args = ("--bandwidth", "512K", "--source-timeout", "20")
    with running_serve(f"disk={image}", socket_path=socket_path, read_delay=0.01):
        for iteration in range(ITERATIONS):
            with running_receive(uri, tmp_path, *receive_args) as receiver:
                handle = connect(receiver.uri)
                counts["checked"] += model.check_and_settle(handle)
                stop = threading.Event()
                worker = threading.Thread(
                    target=guest_workload, args=(handle, model, rng, stop, counts), daemon=True
                )
                worker.start()
                time.sleep(rng.uniform(0.05, 0.6))
                killed = children_of(receiver.process.pid)  # nbdkit
                record = receiver.status()  # the last record before the crash
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
                receiver.process.kill()
                receiver.process.wait(10)
                counts["kills"] += 1
                stop.set()
                worker.join(10)
                assert not worker.is_alive()
                with contextlib.suppress(nbd.Error):
                    handle.shutdown()
                if record.get("pid") in killed and record["missing_bytes"] > 0:
                    counts["missing_at_kill"] += 1
            assert iteration < 5 or time.monotonic() - started < 90, "the loop is too slow"
        with running_receive(uri, tmp_path, "--source-timeout", "20") as receiver:
            handle = connect(receiver.uri)
            counts["checked"] += model.check_and_settle(handle)
            handle.shutdown()
            receiver.wait_complete(timeout=60)
    written = [(block * BLOCK, BLOCK) for block in model.candidates]
    assert_equal_outside(receiver.dest, image, written)
    elapsed = time.monotonic() - started
    print(f"\ncrash loop: {counts['kills']} kill -9, {counts['writes']} writes, "
          f"{counts['flushes']} flushes, {counts['checked']} block checks, 0 failures, "
          f"{counts['missing_at_kill']} kills mid-drain, {elapsed:.1f}s")
    assert counts["kills"] == ITERATIONS and counts["flushes"] >= ITERATIONS
    assert counts["missing_at_kill"] >= ITERATIONS // 2  # the kills really hit a live drain
