"""A guest-like verifying workload over NBD, for the demo and end-to-end tests.

Workers issue random reads and writes against the destination's NBD export while the disk migrates.
The workload knows what the disk must hold: the source image (a local file it can read, because the
demo creates it) overlaid with every write the destination acknowledged.  Each read is compared
block by block with that.
At the end `compare_with_file()` checks a whole image (B's local file) the same way.

Writes are 4 KiB blocks of seeded random bytes aimed at `write_region` (the whole disk by default);
reads are 4 KiB to 64 KiB, aligned to 4 KiB.  A block that a write touched while a read of it was
in flight (started before, or started and finished during it) is not judged by that read, and a
block whose write failed or was cancelled unanswered is not judged at all.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

BLOCK = 4096


@dataclass
class WorkloadReport:
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    first_io_seconds: float | None = None
    read_latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def latency_percentile(self, fraction: float) -> float | None:
        if not self.read_latencies:
            return None
        ordered = sorted(self.read_latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class VerifyingWorkload:
    def __init__(
        self,
        source_image: Path,
        size: int,
        *,
        seed: int = 7,
        write_fraction: float = 0.3,
        write_region: tuple[int, int] | None = None,
    ) -> None:
        self._source_fd = os.open(source_image, os.O_RDONLY)
        self.size = size
        self.written: dict[int, bytes] = {}  # block index -> bytes the destination acknowledged
        self._writing: set[int] = set()
        self._write_starts: dict[int, int] = {}  # block index -> writes started on it so far
        self.uncertain: set[int] = set()  # blocks whose last write was cancelled unanswered
        self._rng = random.Random(seed)
        self._write_fraction = write_fraction
        start, end = write_region or (0, size)
        self._write_blocks = (start // BLOCK, end // BLOCK)
        self.report = WorkloadReport()

    def close(self) -> None:
        os.close(self._source_fd)

    def expected(self, offset: int, length: int) -> bytes:
        """What the disk must hold at [offset, offset+length): source plus acknowledged writes."""
        data = bytearray(os.pread(self._source_fd, length, offset))
        data.extend(bytes(length - len(data)))
        for index in range(offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK):
            block = self.written.get(index)
            if block is not None:
                at = index * BLOCK - offset
                data[at : at + BLOCK] = block
        return bytes(data)

    async def run(
        self,
        client: Any,
        duration: float,
        *,
        workers: int = 4,
        start: float,
        stop: trio.Event | None = None,
    ) -> None:
        """Run `workers` tasks for `duration` seconds or until `stop` is set; `start` is the
        time.monotonic() origin of `first_io_seconds`.  Workers finish the operation they are
        in, so every write ends answered (cancelling the caller instead leaves writes unknown)."""
        deadline = trio.current_time() + duration
        stop = stop if stop is not None else trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(self._worker, client, start, deadline, stop)

    async def _worker(self, client: Any, start: float, deadline: float, stop: trio.Event) -> None:
        while not stop.is_set() and trio.current_time() < deadline:
            if self._rng.random() < self._write_fraction:
                await self._write_one(client)
            else:
                await self._read_one(client)
            if self.report.first_io_seconds is None:
                self.report.first_io_seconds = time.monotonic() - start

    async def _write_one(self, client: Any) -> None:
        low, high = self._write_blocks
        index = self._rng.randrange(low, high)
        if index in self._writing:
            return
        data = self._rng.randbytes(BLOCK)
        self._writing.add(index)
        self._write_starts[index] = self._write_starts.get(index, 0) + 1
        try:
            await client.pwrite(data, index * BLOCK)
            self.written[index] = data
            self.report.writes += 1
            self.report.bytes_written += BLOCK
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            self.report.errors.append(f"write at {index * BLOCK}: {exc}")
            self.uncertain.add(index)
        except BaseException:
            # Cancelled with the write sent but unanswered (the workload's end): it may or may
            # not have landed, so the block is not judged any more.
            self.uncertain.add(index)
            raise
        finally:
            self._writing.discard(index)

    async def _read_one(self, client: Any) -> None:
        blocks = self._rng.randint(1, 16)
        index = self._rng.randrange(0, self.size // BLOCK - blocks + 1)
        offset, length = index * BLOCK, blocks * BLOCK
        # A block written while the read is in flight may read as either version: not judged.
        blocks_read = range(index, index + blocks)
        busy = {i for i in blocks_read if i in self._writing}
        starts_before = [self._write_starts.get(i, 0) for i in blocks_read]
        began = time.monotonic()
        try:
            data = await client.pread(offset, length)
        except Exception as exc:  # noqa: BLE001
            self.report.errors.append(f"read at {offset}+{length}: {exc}")
            return
        self.report.read_latencies.append(time.monotonic() - began)
        self.report.reads += 1
        self.report.bytes_read += length
        busy |= {i for i in blocks_read if i in self._writing}
        busy |= {
            i
            for i, before in zip(blocks_read, starts_before, strict=True)
            if self._write_starts.get(i, 0) != before
        }
        expected = self.expected(offset, length)
        for i in range(blocks):
            if index + i in busy or index + i in self.uncertain:
                continue
            if data[i * BLOCK : (i + 1) * BLOCK] != expected[i * BLOCK : (i + 1) * BLOCK]:
                self.report.errors.append(f"read at {offset + i * BLOCK}: wrong data")
                return

    def compare_with_file(self, image: Path, piece: int = 4 * 1024 * 1024) -> list[str]:
        """Compare a whole image with the source plus acknowledged writes; returns mismatches,
        one line per differing 4 KiB block (at most 10), saying what the block holds instead."""
        mismatches: list[str] = []
        with open(image, "rb") as handle:
            for offset in range(0, self.size, piece):
                length = min(piece, self.size - offset)
                actual = os.pread(handle.fileno(), length, offset)
                expected = self.expected(offset, length)
                if actual == expected:
                    continue
                for at in range(0, length, BLOCK):
                    got, want = actual[at : at + BLOCK], expected[at : at + BLOCK]
                    if got != want and (offset + at) // BLOCK not in self.uncertain:
                        mismatches.append(self._describe(offset + at, got))
                        if len(mismatches) >= 10:
                            return mismatches
        return mismatches

    def _describe(self, offset: int, got: bytes) -> str:
        written = offset // BLOCK in self.written
        source = os.pread(self._source_fd, BLOCK, offset)
        if got == bytes(len(got)):
            holds = "zeros"
        elif got == source:
            holds = "the source's bytes"
        else:
            holds = "bytes from neither the source nor the last write"
        kind = "guest-written" if written else "untouched"
        return f"block at {offset} ({kind}) holds {holds}"
