"""The verifying workload must pass on a correct disk and catch a wrong one."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from postcopy.kit.sample_disk import allocated_bytes, make_sample_disk, plan_data_runs
from postcopy.kit.workload import VerifyingWorkload

SIZE = 8 * 1024 * 1024


class MemoryDisk:
    """An in-memory disk speaking the part of the client API the workload uses."""

    def __init__(self, data: bytes, corrupt_at: int | None = None) -> None:
        self.data = bytearray(data)
        self.corrupt_at = corrupt_at

    async def pread(self, offset: int, length: int) -> bytes:
        await trio.sleep(0)
        out = bytearray(self.data[offset : offset + length])
        if self.corrupt_at is not None and offset <= self.corrupt_at < offset + length:
            out[self.corrupt_at - offset] ^= 0xFF
        return bytes(out)

    async def pwrite(self, data: bytes, offset: int) -> None:
        await trio.sleep(0)
        self.data[offset : offset + len(data)] = data


def test_sample_disk_is_sparse_and_reproducible(tmp_path: Path) -> None:
    first = make_sample_disk(tmp_path / "a.img", SIZE, seed=3)
    second = make_sample_disk(tmp_path / "b.img", SIZE, seed=3)
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    assert first.data_runs == second.data_runs == tuple(plan_data_runs(SIZE, 3))
    assert 0.2 * SIZE < first.data_bytes < 0.8 * SIZE
    assert allocated_bytes(first.path) <= first.data_bytes + 64 * 1024


async def test_workload_passes_on_a_correct_disk_and_final_compare_holds(tmp_path: Path) -> None:
    image = make_sample_disk(tmp_path / "src.img", SIZE, seed=4)
    disk = MemoryDisk(image.path.read_bytes())
    workload = VerifyingWorkload(image.path, SIZE, seed=1)
    try:
        await workload.run(disk, 0.5, start=time.monotonic())
        assert workload.report.errors == []
        assert workload.report.reads > 10 and workload.report.writes > 5
        result = tmp_path / "dest.img"
        result.write_bytes(bytes(disk.data))
        assert workload.compare_with_file(result) == []
        disk.data[12345] ^= 1
        result.write_bytes(bytes(disk.data))
        assert workload.compare_with_file(result) != []
    finally:
        workload.close()


async def test_workload_reports_wrong_data(tmp_path: Path) -> None:
    image = make_sample_disk(tmp_path / "src.img", SIZE, seed=5)
    disk = MemoryDisk(image.path.read_bytes(), corrupt_at=4096 * 7 + 5)
    workload = VerifyingWorkload(image.path, SIZE, seed=2, write_region=(SIZE // 2, SIZE))
    try:
        deadline = trio.current_time() + 10
        while not workload.report.errors and trio.current_time() < deadline:
            await workload.run(disk, 0.2, start=time.monotonic())
        assert any("wrong data" in error for error in workload.report.errors)
    finally:
        workload.close()
