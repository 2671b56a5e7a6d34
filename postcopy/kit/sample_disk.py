"""Sample domain disks for the demo and benchmarks: a filesystem-like mix of data and holes.

`make_sample_disk(path, size, seed, data_fraction)` writes a sparse raw image whose layout looks
like a used filesystem: a dense first MiB (boot sector, superblock), then runs of data of 64 KiB to
4 MiB separated by holes, with about `data_fraction` of the disk holding random (incompressible)
bytes.  The same seed always gives the same bytes, so a test or the demo can recompute any region
of the source without keeping a copy.  Runs are aligned to 64 KiB, so any chunk size from 4 KiB to
64 KiB sees whole data chunks and whole hole chunks.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

ALIGNMENT = 64 * 1024
_WRITE_PIECE = 4 * 1024 * 1024


@dataclass(frozen=True)
class SampleDisk:
    path: Path
    size: int
    data_runs: tuple[tuple[int, int], ...]  # (offset, length) of every data run

    @property
    def data_bytes(self) -> int:
        return sum(length for _, length in self.data_runs)


def plan_data_runs(size: int, seed: int, data_fraction: float = 0.5) -> list[tuple[int, int]]:
    """Where the data goes: aligned (offset, length) runs covering about `data_fraction`."""
    if size % ALIGNMENT:
        raise ValueError(f"sample disk size must be a multiple of {ALIGNMENT}")
    rng = random.Random(seed)
    runs: list[tuple[int, int]] = [(0, min(size, 1024 * 1024))]
    position = runs[0][1]
    max_run = 64  # in units of ALIGNMENT: up to 4 MiB
    while position < size:
        data = ALIGNMENT * rng.randint(1, max_run)
        mean_hole = data * (1 - data_fraction) / max(data_fraction, 1e-6)
        hole = ALIGNMENT * max(1, round(rng.uniform(0.5, 1.5) * mean_hole / ALIGNMENT))
        position += hole
        if position >= size:
            break
        length = min(data, size - position)
        runs.append((position, length))
        position += length
    return runs


def make_sample_disk(
    path: Path, size: int, *, seed: int = 1, data_fraction: float = 0.5
) -> SampleDisk:
    """Create (or replace) a sparse image at `path`."""
    runs = plan_data_runs(size, seed, data_fraction)
    rng = random.Random(seed ^ 0x5EED)
    with open(path, "wb") as image:
        image.truncate(size)
        fd = image.fileno()
        for offset, length in runs:
            done = 0
            while done < length:
                piece = min(_WRITE_PIECE, length - done)
                os.pwrite(fd, rng.randbytes(piece), offset + done)
                done += piece
    return SampleDisk(Path(path), size, tuple(runs))


def allocated_bytes(path: Path) -> int:
    """Bytes the file really occupies on disk (sparse files occupy less than their size)."""
    return os.stat(path).st_blocks * 512
