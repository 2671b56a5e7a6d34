"""Bulk read throughput of `postcopy serve` against nbdkit and qemu-nbd (issue 2).

    .venv/bin/python -m bench server

A 1 GiB raw image, alternating 4 MiB runs of random data and holes (half each), is served over
Unix sockets by `postcopy serve`, `nbdkit file --readonly` and `qemu-nbd --read-only` at the same
time.  Each round copies it with `nbdcopy URI null:` from each server in turn (the page cache is
warm for all three); three rounds, the median is reported as MiB/s of export size, with the
ratios to nbdkit.  A fourth row copies from `postcopy serve` with `nbdcopy --no-extents`, which
READs every byte, holes included (they come back as OFFSET_HOLE chunks).  `postcopy serve` prints
a statistics line when it stops: the bytes it sent are compared with the data bytes the copies
needed (holes should cost nearly nothing).
The machine is shared and has 2 cores: numbers are noisy, hence the median.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.peers import running_nbdkit, running_qemu_nbd, running_serve

IMAGE_SIZE = 1 << 30
RUN = 4 << 20
ROUNDS = 3
NO_EXTENTS = "serve, no-extents"


def make_half_sparse_image(path: Path) -> int:
    """Alternating RUN-byte data and hole runs; returns the number of data bytes."""
    data_bytes = 0
    block = os.urandom(RUN)
    with open(path, "wb") as image:
        image.truncate(IMAGE_SIZE)
        for offset in range(0, IMAGE_SIZE, 2 * RUN):
            image.seek(offset)
            image.write(block[offset // RUN % 7 :] + block[: offset // RUN % 7])
            data_bytes += RUN
    return data_bytes


def copy_seconds(uri: str, *options: str) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", *options, uri, "null:"], check=True, timeout=300)
    return time.perf_counter() - start


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-server-", dir="/var/tmp") as workdir:
        image = Path(workdir) / "half-sparse.img"
        data_bytes = make_half_sparse_image(image)
        subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)  # warm
        names = ["postcopy serve", "nbdkit file", "qemu-nbd", NO_EXTENTS]
        times: dict[str, list[float]] = {name: [] for name in names}
        with (
            running_serve(image) as serve,
            running_nbdkit(["--readonly", "file", str(image)]) as nbdkit_uri,
            running_qemu_nbd(image) as qemu_uri,
        ):
            uris = {"postcopy serve": serve.uri, "nbdkit file": nbdkit_uri, "qemu-nbd": qemu_uri}
            for _ in range(ROUNDS):
                for name, uri in uris.items():
                    times[name].append(copy_seconds(uri))
                # every byte READ: holes come back as OFFSET_HOLE chunks, not as zeroes
                times[NO_EXTENTS].append(copy_seconds(serve.uri, "--no-extents"))
            serve.process.send_signal(signal.SIGTERM)
            serve.process.wait(30)
            log = serve.log()
    mib = IMAGE_SIZE / (1 << 20)
    rates = {name: mib / statistics.median(values) for name, values in times.items()}
    print(f"nbdcopy of a {mib:.0f} MiB image, half data, over Unix sockets; "
          f"median of {ROUNDS} rounds (MiB/s of export size):")
    for name, rate in rates.items():
        ratio = rate / rates["nbdkit file"]
        runs = ", ".join(f"{mib / t:.0f}" for t in times[name])
        print(f"  {name:17s} {rate:7.0f} MiB/s  {ratio:5.2f}x nbdkit   (rounds: {runs})")
    match = re.search(r"sent (\d+) bytes \((\d+) bytes of read data", log)
    if match is None:
        print("  postcopy serve printed no statistics line:\n" + log)
        return 1
    sent = int(match.group(1))
    copies = 2 * ROUNDS
    needed = data_bytes * copies
    print(f"  postcopy serve sent {sent / (1 << 20):.1f} MiB for {needed / (1 << 20):.0f} MiB of "
          f"data in {copies} copies of {mib:.0f} MiB: {sent / needed:.4f}x the data bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
