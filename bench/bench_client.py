"""Benchmark the NBD client against C tools on the same `nbdkit file` server.

    .venv/bin/python -m bench client        (or: make bench)

1. Bulk: read a 1 GiB image (half data in 1 MiB runs, half holes) skipping holes by block status,
   the way the destination's drain does (4 MiB requests, 8 in flight, reused buffers), side by
   side with `nbdcopy URI null:` (which also skips holes by block status).  MiB/s of the whole
   image and the ratio ours/nbdcopy (target >= 0.5).
2. Latency: 64 KiB random reads at queue depth 1 for 5 s, median and p99, against fio's completion
   latency (`fio --ioengine=nbd --rw=randread --bs=64k --iodepth=1`, clat percentiles from its
   JSON output) on the same server (target: within 2x).
Each figure is measured 3 times in alternation and the medians are reported (the machine is
shared and noisy).  Exit status 0 whether or not the targets are met: the numbers are the output.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

import nbdsrv

MiB = 1024 * 1024
IMAGE_SIZE = 1024 * MiB
RUN = MiB  # data and holes alternate in runs of this size
DRAIN_REQUEST = 4 * MiB
DRAIN_IN_FLIGHT = 8
LATENCY_BLOCK = 64 * 1024
FIO_SECONDS = 5
REPEATS = 3


def make_image(path: Path) -> None:
    block = random.Random(0).randbytes(RUN)
    with open(path, "wb") as image:
        image.truncate(IMAGE_SIZE)
        for offset in range(0, IMAGE_SIZE, 2 * RUN):
            image.seek(offset)
            image.write(block)


@contextlib.contextmanager
def nbdkit_file(directory: Path, image: Path) -> Iterator[str]:
    sock = directory / "bench.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    process = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "file", str(image)],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        process.kill()
        process.wait(timeout=10)


async def drain_with_client(uri: str, connections: int) -> float:
    """Seconds to read every data byte of the image, skipping holes by block status."""
    start = time.perf_counter()
    async with nbdsrv.open_client(uri, connections=connections) as client:
        spans: list[tuple[int, int]] = []
        async for extent in client.iter_extents(0, client.size):
            if extent.is_zero:
                continue
            for offset in range(extent.offset, extent.end, DRAIN_REQUEST):
                spans.append((offset, min(DRAIN_REQUEST, extent.end - offset)))
        pending = iter(spans)

        async def worker() -> None:
            buffer = memoryview(bytearray(DRAIN_REQUEST))
            for offset, length in pending:
                await client.pread_into(buffer[:length], offset)

        async with trio.open_nursery() as nursery:
            for _ in range(DRAIN_IN_FLIGHT):
                nursery.start_soon(worker)
        assert client.statistics().bytes_read == IMAGE_SIZE // 2
    return time.perf_counter() - start


def drain_with_nbdcopy(uri: str) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True, timeout=300)
    return time.perf_counter() - start


async def latency_with_client(uri: str) -> list[float]:
    """Microseconds per 64 KiB read at queue depth 1, random aligned offsets, for as long as
    fio runs (so that both see the same share of the machine's noise)."""
    rng = random.Random(1)
    samples = []
    async with nbdsrv.open_client(uri) as client:
        buffer = memoryview(bytearray(LATENCY_BLOCK))
        blocks = client.size // LATENCY_BLOCK
        deadline = time.monotonic() + FIO_SECONDS
        while time.monotonic() < deadline:
            offset = rng.randrange(blocks) * LATENCY_BLOCK
            start = time.perf_counter_ns()
            await client.pread_into(buffer, offset)
            samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def latency_with_fio(uri: str, directory: Path) -> tuple[float, float]:
    """fio's completion latency (median, p99) in microseconds."""
    out = subprocess.run(
        [
            "fio",
            "--name=qd1",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=randread",
            "--bs=64k",
            "--iodepth=1",
            f"--runtime={FIO_SECONDS}",
            "--time_based",
            f"--size={IMAGE_SIZE}",
            "--output-format=json",
            "--percentile_list=50:99",
            f"--directory={directory}",
        ],  # fmt: skip
        check=True,
        capture_output=True,
        timeout=120,
    ).stdout
    report = json.loads(out[out.index(b"{") :])
    percentiles = report["jobs"][0]["read"]["clat_ns"]["percentile"]
    return percentiles["50.000000"] / 1000, percentiles["99.000000"] / 1000


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    for tool in ("nbdkit", "nbdcopy", "fio"):
        if shutil.which(tool) is None:
            print(f"bench_client: {tool} is missing")
            return 1
    with tempfile.TemporaryDirectory(prefix="bench-client-") as temp:
        directory = Path(temp)
        image = directory / "half-holes.img"
        make_image(image)
        with nbdkit_file(directory, image) as uri:
            ours_1, ours_4, theirs = [], [], []
            ours_p50, ours_p99, fio_p50, fio_p99 = [], [], [], []
            for _ in range(REPEATS):
                theirs.append(drain_with_nbdcopy(uri))
                ours_1.append(trio.run(drain_with_client, uri, 1))
                ours_4.append(trio.run(drain_with_client, uri, 4))
                samples = trio.run(latency_with_client, uri)
                ours_p50.append(percentile(samples, 0.5))
                ours_p99.append(percentile(samples, 0.99))
                p50, p99 = latency_with_fio(uri, directory)
                fio_p50.append(p50)
                fio_p99.append(p99)
    median = statistics.median
    rate = lambda seconds: IMAGE_SIZE / MiB / seconds  # noqa: E731
    print(f"bulk read of a 1 GiB image, half holes (medians of {REPEATS}, MiB/s of the image):")
    print(f"  nbdcopy URI null:            {rate(median(theirs)):8.0f} MiB/s")
    for name, runs in (("1 connection", ours_1), ("4 connections", ours_4)):
        ratio = median(theirs) / median(runs)
        print(f"  nbdsrv client, {name}: {rate(median(runs)):8.0f} MiB/s  ratio {ratio:.2f}x")
    print("64 KiB random reads at queue depth 1 (microseconds, medians of 3 runs):")
    print(f"  fio --ioengine=nbd clat  median {median(fio_p50):7.0f}  p99 {median(fio_p99):7.0f}")
    print(f"  nbdsrv client            median {median(ours_p50):7.0f}  p99 {median(ours_p99):7.0f}")
    print(
        f"  ratio ours/fio           median {median(ours_p50) / median(fio_p50):7.2f}"
        f"  p99 {median(ours_p99) / median(fio_p99):7.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
