"""Benchmark the lazy destination, `postcopy receive`, against its peers (issue 4, Performance).

    .venv/bin/python -m bench receive

Every figure is measured side by side with its peer in the same run, REPEATS times in
alternation (the machine is shared and noisy); medians are reported.  The source is always
`postcopy serve`; the guest is our client (`nbdsrv.open_client`) or fio.

1. Time to first guest read: from launching `postcopy receive` to the first 4 KiB read (offset
   0, a MISSING chunk, so a demand fetch) served through the printed URI by our client, for a
   1 GiB sample disk (half data) and a 1 TiB disk (truncate + a few MiB of data).  Peer: a
   pre-copy, `qemu-img convert` of the same 1 GiB source from its NBD URI before first use.
   Both again over the 1 Gbit/s link (receive and qemu-img in Host B), where a pre-copy costs
   what it would cost between two hosts.
2. Drain: a 1 GiB source, half data.  Loopback (Unix sockets): from the engine's start (status
   `started_at`) to the moment the local file holds every data byte (its allocation, polled every
   5 ms: the status record is only written every 0.25 s), against `nbdcopy SOURCE_URI file`.
   Over a 1 Gbit/s link (network namespaces, tbf, `postcopy.kit.netns`): serve in Host A on TCP,
   receive in Host B; goodput = data bytes transferred / time, against the link rate, with
   nbdcopy over the same link and the bytes the veth really carried.
3. Guest miss latency: 4 KiB reads of MISSING chunks while the drain runs, queue depth 1, from a
   probe process (this module, `probe`; in Host B for the link case).  Offsets are random
   data chunks of the top part of the disk, read in DESCENDING order: after each miss the drain
   jumps to the chunk after it, so it always works above the next read (or wraps to the bottom)
   and every sample stays a real miss; the probe stops early when the drain is nearly done.
   Each miss is interleaved with the same 4 KiB read straight from the source (same load), and
   an idle baseline (before receive starts) is measured on the same offsets.  The engine's fault
   counter proves how many reads were misses.  Over the link this is measured twice: with the
   drain unlimited, and with `receive --bandwidth 100M` (below the link rate, so the drain does
   not fill the shaper's queue that the guest's reply must wait in).  A diagnostic row runs the
   same probe against nbdkit + the plugin with `drain_requests=0` (no drain at all): the cost of
   a miss itself, without the drain's interference.
4. Served reads of PRESENT data (after `complete`): fio `--ioengine=nbd` 4 KiB random reads at
   iodepth 16 (IOPS) and 1 MiB sequential reads at iodepth 4 (MiB/s) through `postcopy receive
   --threads N` for several N, against `nbdkit file` on the same local file.

Results are printed as a table and written to bench/results/receive-<timestamp>.json.  Exit
status 0 whether or not the targets are met: the numbers are the output.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

import nbdsrv
from postcopy.destination.receive import nbd_uri, nbdkit_command, plugin_environment
from postcopy.destination.settings import DestinationSettings
from postcopy.kit.netns import TestHost, open_two_hosts
from postcopy.kit.processes import read_line, status_record, stop_process, wait_for_status
from postcopy.kit.sample_disk import make_sample_disk

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
PYTHON = sys.executable
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
REPEATS = 3
SMALL_SIZE = 1 * GiB
HUGE_SIZE = 1 * TiB
HUGE_DATA_OFFSETS = (0, 1 * GiB, 100 * GiB, 512 * GiB, HUGE_SIZE - 4 * MiB)  # 1 MiB data each
CHUNK = 64 * KiB  # receive's default chunk size
READ = 4 * KiB
LINK_RATE_BITS = 1_000_000_000
LINK_PORT = 10809
LINK_CAP = "100M"  # receive --bandwidth for the capped latency run: 84% of the link
LATENCY_SAMPLES = 200
LATENCY_STOP_FRACTION = 0.85  # the probe stops once the drain has this share of the data
FIO_SECONDS = 2
THREAD_COUNTS = (1, 2, 4, 8, 16)
START_TIMEOUT = 30.0
DRAIN_TIMEOUT = 120.0


# -- processes ---------------------------------------------------------------------------------


def stop(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, timeout=15, kill_timeout=15)
    if process.stdout is not None:
        process.stdout.close()


def wrap(host: TestHost | None, argv: Sequence[str]) -> list[str]:
    return host.command(argv) if host is not None else list(argv)


@contextlib.contextmanager
def running_serve(
    image: Path, workdir: Path, host: TestHost | None = None
) -> Iterator[str]:
    """`postcopy serve` of one image: on a Unix socket, or on TCP inside `host`.  Yields its URI."""
    args = [PYTHON, "-m", "postcopy.cli", "serve"]
    if host is None:
        args += ["--socket", str(workdir / f"serve-{image.stem}.sock")]
    else:
        args += ["--listen", f"{host.address}:{LINK_PORT}"]
    with open(workdir / f"serve-{image.stem}.log", "ab") as log:
        process = subprocess.Popen(
            wrap(host, [*args, str(image)]), stdout=subprocess.PIPE, stderr=log, cwd=PROJECT_ROOT
        )
    try:
        line = read_line(process, START_TIMEOUT)
        if not line.startswith("ready "):
            raise RuntimeError(f"postcopy serve did not start: {line!r}")
        yield line.split()[1]
    finally:
        stop(process)


@dataclass
class Receiving:
    process: subprocess.Popen[bytes]
    uri: str
    dest: Path
    state_dir: Path
    launched_at: float  # time.time() just before the launch
    uri_seconds: float  # from the launch to the printed URI

    def status(self) -> dict[str, Any]:
        return status_record(self.state_dir)

    def wait_status(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float = DRAIN_TIMEOUT
    ) -> dict[str, Any]:
        return wait_for_status(self.process, self.state_dir, condition, timeout, poll_seconds=0.02)

    def wait_complete(self) -> dict[str, Any]:
        return self.wait_status(lambda record: record["state"] == "complete")


def fresh(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def running_receive(
    source_uri: str,
    workdir: Path,
    *extra: str,
    host: TestHost | None = None,
    keep: bool = False,
    name: str = "dest",
) -> Iterator[Receiving]:
    """`postcopy receive` on a Unix socket (inside `host` when given); a fresh destination file
    and state directory unless `keep`.  SIGTERM on exit."""
    dest, state_dir, socket_path = (
        workdir / f"{name}.img", workdir / f"{name}.state", workdir / f"{name}.sock"
    )
    if not keep:
        fresh(dest, state_dir)
    argv = [
        PYTHON, "-m", "postcopy.cli", "receive", "--source", source_uri, "--dest", str(dest),
        "--state-dir", str(state_dir), "--socket", str(socket_path), *extra,
    ]  # fmt: skip
    with open(workdir / f"{name}-receive.log", "ab") as log:
        launched_at = time.time()
        started = time.perf_counter()
        process = subprocess.Popen(
            wrap(host, argv), stdout=subprocess.PIPE, stderr=log, cwd=PROJECT_ROOT
        )
    try:
        line = read_line(process, START_TIMEOUT)
        uri_seconds = time.perf_counter() - started
        if not line.startswith("nbd+unix://"):
            raise RuntimeError(f"receive printed no URI: {line!r}")
        yield Receiving(process, line, dest, state_dir, launched_at, uri_seconds)
    finally:
        stop(process)


@contextlib.contextmanager
def running_plugin_without_drain(source_uri: str, workdir: Path, size: int) -> Iterator[Receiving]:
    """Diagnostics only: nbdkit with the postcopy plugin as `receive` starts it, plus the
    plugin's `drain_requests=0` (no background drain), to separate the cost of a miss from the
    drain's interference."""
    name = "nodrain"
    dest, state_dir = workdir / f"{name}.img", workdir / f"{name}.state"
    fresh(dest, state_dir)
    state_dir.mkdir()
    with open(dest, "wb") as file:
        file.truncate(size)
    config = DestinationSettings(
        source=source_uri, dest=dest, state_dir=state_dir, socket=workdir / f"{name}.sock",
        drain_requests=0,
    )  # fmt: skip
    assert config.socket is not None
    fresh(config.socket)
    launched_at = time.time()
    started = time.perf_counter()
    with open(workdir / f"{name}-nbdkit.log", "ab") as log:
        process = subprocess.Popen(
            nbdkit_command(config),
            stdout=log, stderr=log, env=plugin_environment(),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not config.socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit with the postcopy plugin did not start")
            time.sleep(0.01)
        uri = nbd_uri(config)
        yield Receiving(process, uri, dest, state_dir, launched_at, time.perf_counter() - started)
    finally:
        stop(process)


def allocated_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def wait_allocated(path: Path, target: int, timeout: float = DRAIN_TIMEOUT) -> float:
    """time.time() when `path` first holds `target` allocated bytes (polled every 5 ms)."""
    deadline = time.monotonic() + timeout
    while allocated_bytes(path) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never reached {target} allocated bytes")
        time.sleep(0.005)
    return time.time()


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# -- images ------------------------------------------------------------------------------------


def make_huge_image(path: Path) -> int:
    """A 1 TiB sparse image with 1 MiB of random data at a few offsets; returns data bytes."""
    rng = random.Random(7)
    with open(path, "wb") as image:
        image.truncate(HUGE_SIZE)
        for offset in HUGE_DATA_OFFSETS:
            os.pwrite(image.fileno(), rng.randbytes(MiB), offset)
    return len(HUGE_DATA_OFFSETS) * MiB


def data_chunks(runs: Sequence[tuple[int, int]]) -> list[int]:
    """Offsets of every whole 64 KiB chunk inside the data runs."""
    chunks: list[int] = []
    for offset, length in runs:
        first = -(-offset // CHUNK) * CHUNK
        chunks.extend(range(first, offset + length - CHUNK + 1, CHUNK))
    return chunks


# -- 1. time to first guest read ---------------------------------------------------------------


async def read_first_block(uri: str) -> bytes:
    async with nbdsrv.open_client(uri) as client:
        buffer = bytearray(READ)
        await client.pread_into(buffer, 0)
        return bytes(buffer)


@dataclass
class FirstRead:
    engine_seconds: float  # launch -> the engine created inside nbdkit (status `started_at`)
    uri_seconds: float  # launch -> URI printed
    read_seconds: float  # launch -> first 4 KiB read returned to the guest


def first_read(
    source_uri: str, workdir: Path, expected: bytes, host: TestHost | None = None
) -> FirstRead:
    with running_receive(source_uri, workdir, host=host, name="first") as receiving:
        got = trio.run(read_first_block, receiving.uri)
        seconds = time.time() - receiving.launched_at
        if got != expected:
            raise RuntimeError("the first read returned the wrong bytes")
        record = receiving.wait_status(lambda record: "started_at" in record)
        return FirstRead(
            engine_seconds=record["started_at"] - receiving.launched_at,
            uri_seconds=receiving.uri_seconds,
            read_seconds=seconds,
        )


def precopy_seconds(source_uri: str, target: Path, host: TestHost | None = None) -> float:
    fresh(target)
    started = time.perf_counter()
    subprocess.run(
        wrap(host, ["qemu-img", "convert", "-f", "raw", "-O", "raw", source_uri, str(target)]),
        check=True, timeout=300,
    )  # fmt: skip
    return time.perf_counter() - started


# -- 2. drain ----------------------------------------------------------------------------------


@dataclass
class DrainRun:
    drain_seconds: float  # engine start -> every data byte in the local file
    total_seconds: float  # receive launched -> every data byte in the local file
    transferred_bytes: int


def drain(
    source_uri: str, workdir: Path, data_bytes: int, host: TestHost | None = None
) -> DrainRun:
    with running_receive(source_uri, workdir, host=host, name="drain") as receiving:
        done_at = wait_allocated(receiving.dest, data_bytes)
        record = receiving.wait_complete()
        return DrainRun(
            drain_seconds=done_at - record["started_at"],
            total_seconds=done_at - receiving.launched_at,
            transferred_bytes=int(record["transferred_bytes"]),
        )


def nbdcopy_seconds(
    source_uri: str, target: Path, size: int, host: TestHost | None = None
) -> float:
    fresh(target)
    with open(target, "wb") as file:
        file.truncate(size)  # nbdcopy needs the output file to exist
    started = time.perf_counter()
    subprocess.run(wrap(host, ["nbdcopy", source_uri, str(target)]), check=True, timeout=300)
    return time.perf_counter() - started


def link_rx_bytes(host: TestHost) -> int:
    """Bytes received so far by `host`'s end of the veth pair."""
    out = subprocess.run(
        ["ip", "-n", host.namespace, "-s", "-j", "link", "show", "dev", host.interface],
        check=True, capture_output=True, text=True, timeout=10,
    ).stdout  # fmt: skip
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


TCP_SEND = """
import socket, sys
listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
connection, _ = listener.accept()
block = memoryview(bytes(4 << 20))
for _ in range(int(sys.argv[3]) // len(block)):
    connection.sendall(block)
connection.close()
"""
TCP_RECEIVE = """
import socket, sys, time
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])))
buffer = bytearray(4 << 20)
total, started = 0, time.perf_counter()
while got := connection.recv_into(buffer):
    total += got
print(total, time.perf_counter() - started)
"""


def raw_tcp_rate(sender: TestHost, receiver: TestHost, size: int) -> float:
    """Bytes per second of one plain TCP stream from `sender` to `receiver` (the link's best)."""
    argv = [sender.address, str(LINK_PORT + 1)]
    server = subprocess.Popen(
        sender.command([PYTHON, "-c", TCP_SEND, *argv, str(size)]), stdout=subprocess.PIPE
    )
    try:
        if read_line(server, START_TIMEOUT) != "ready":
            raise RuntimeError("TCP sender did not start")
        out = subprocess.run(
            receiver.command([PYTHON, "-c", TCP_RECEIVE, *argv]),
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout.split()  # fmt: skip
    finally:
        stop(server)
    return int(out[0]) / float(out[1])


# -- 3. guest miss latency: the probe (a separate process, possibly in Host B) -----------------


async def probe_async(config: dict[str, Any]) -> dict[str, Any]:
    """Idle direct reads, then (once the receive URI arrives on stdin) interleaved direct and
    receive reads of the same offsets while the drain runs.  Microseconds per read."""
    offsets: list[int] = config["offsets"]
    dest = Path(config["dest"])
    stop_at = int(config["stop_allocated"])
    direct_buffer, receive_buffer = bytearray(READ), bytearray(READ)
    chunk_buffer = bytearray(CHUNK)
    result: dict[str, Any] = {"idle_us": [], "idle_chunk_us": [], "direct_us": [], "miss_us": []}
    async with nbdsrv.open_client(config["source"]) as source:
        for offset in offsets:
            started = time.perf_counter_ns()
            await source.pread_into(direct_buffer, offset)
            result["idle_us"].append((time.perf_counter_ns() - started) / 1000)
            started = time.perf_counter_ns()
            await source.pread_into(chunk_buffer, offset - offset % CHUNK)
            result["idle_chunk_us"].append((time.perf_counter_ns() - started) / 1000)
        print("ready", flush=True)
        uri = (await trio.to_thread.run_sync(sys.stdin.readline)).strip()
        mismatches = 0
        async with nbdsrv.open_client(uri) as receive:
            result["allocated_before"] = allocated_bytes(dest)
            started_window = time.perf_counter()
            for offset in offsets:
                if allocated_bytes(dest) >= stop_at:
                    break
                started = time.perf_counter_ns()
                await source.pread_into(direct_buffer, offset)
                middle = time.perf_counter_ns()
                await receive.pread_into(receive_buffer, offset)
                ended = time.perf_counter_ns()
                result["direct_us"].append((middle - started) / 1000)
                result["miss_us"].append((ended - middle) / 1000)
                mismatches += direct_buffer != receive_buffer
            result["window_seconds"] = time.perf_counter() - started_window
            result["allocated_after"] = allocated_bytes(dest)
        result["mismatches"] = mismatches
    return result


def probe_main(config_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
    print(json.dumps(trio.run(probe_async, config)), flush=True)
    return 0


@dataclass
class LatencyRun:
    reads: int
    faults: int  # the engine's count of reads that touched a missing chunk
    mismatches: int
    miss_us: list[float]
    direct_us: list[float]
    idle_us: list[float]
    idle_chunk_us: list[float]
    drained_during_window: int
    window_seconds: float


def miss_latency(
    source_uri: str,
    workdir: Path,
    candidates: Sequence[int],
    data_bytes: int,
    seed: int,
    host: TestHost | None = None,
    extra: Sequence[str] = (),
    without_drain: bool = False,
) -> LatencyRun:
    rng = random.Random(seed)
    chunks = sorted(rng.sample(list(candidates), LATENCY_SAMPLES), reverse=True)
    offsets = [chunk + rng.randrange(CHUNK // READ) * READ for chunk in chunks]
    dest = workdir / ("nodrain.img" if without_drain else "latency.img")
    config_path = workdir / "probe.json"
    config_path.write_text(json.dumps({
        "source": source_uri, "offsets": offsets, "dest": str(dest),
        "stop_allocated": 1 << 62 if without_drain else int(data_bytes * LATENCY_STOP_FRACTION),
    }))  # fmt: skip
    probe = subprocess.Popen(
        wrap(host, [PYTHON, "-m", "bench.bench_receive", "probe", str(config_path)]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=PROJECT_ROOT,
    )  # fmt: skip
    try:
        if read_line(probe, START_TIMEOUT) != "ready":
            raise RuntimeError("latency probe did not start")
        if without_drain:
            assert host is None
            receiver = running_plugin_without_drain(source_uri, workdir, SMALL_SIZE)
        else:
            receiver = running_receive(source_uri, workdir, *extra, host=host, name="latency")
        with receiver as receiving:
            assert probe.stdin is not None
            probe.stdin.write(receiving.uri.encode() + b"\n")
            probe.stdin.flush()
            result = json.loads(read_line(probe, DRAIN_TIMEOUT))
            reads = len(result["miss_us"])
            try:  # the status record is written every 0.25 s
                record = receiving.wait_status(lambda record: record["faults"] >= reads, 2.0)
            except TimeoutError:  # some reads were not misses: the table shows how many
                record = receiving.status()
    finally:
        stop(probe)
    return LatencyRun(
        reads=len(result["miss_us"]),
        faults=int(record["faults"]),
        mismatches=int(result["mismatches"]),
        miss_us=result["miss_us"],
        direct_us=result["direct_us"],
        idle_us=result["idle_us"],
        idle_chunk_us=result["idle_chunk_us"],
        drained_during_window=int(result["allocated_after"]) - int(result["allocated_before"]),
        window_seconds=float(result["window_seconds"]),
    )


# -- 4. served reads of present data -----------------------------------------------------------


FIO_JOBS = {
    "randread 4k qd16": ["--rw=randread", "--bs=4k", "--iodepth=16"],
    "read 1M qd4": ["--rw=read", "--bs=1M", "--iodepth=4"],
}


def fio(uri: str, job: str, size: int, workdir: Path) -> tuple[float, float]:
    """(IOPS, MiB/s) of one fio job against an NBD URI."""
    out = subprocess.run(
        [
            "fio", "--name=served", "--ioengine=nbd", f"--uri={uri}", *FIO_JOBS[job],
            f"--runtime={FIO_SECONDS}", "--time_based", f"--size={size}",
            "--output-format=json", f"--directory={workdir}",
        ],
        check=True, capture_output=True, timeout=120,
    ).stdout  # fmt: skip
    read = json.loads(out[out.index(b"{") :])["jobs"][0]["read"]
    return float(read["iops"]), float(read["bw_bytes"]) / MiB


@contextlib.contextmanager
def running_nbdkit_file(image: Path, workdir: Path) -> Iterator[str]:
    socket_path = workdir / "nbdkit-file.sock"
    fresh(socket_path)
    process = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-U", str(socket_path), "file", str(image)],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not socket_path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit file did not start")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={socket_path}"
    finally:
        process.kill()
        process.wait(15)


# -- the run -----------------------------------------------------------------------------------


def ratio_text(value: float, target: str) -> str:
    return f"{value:6.2f}x  (target {target})"


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, what: str, ours: str, peer: str, verdict: str) -> None:
        self.rows.append((what, ours, peer, verdict))
        print(f"  {what:44s} {ours:>22s} {peer:>34s}  {verdict}", flush=True)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "probe":
        return probe_main(sys.argv[2])
    for tool in ("nbdkit", "nbdcopy", "fio", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"bench_receive: {tool} is missing")
            return 1
    began = time.monotonic()
    results: dict[str, Any] = {"repeats": REPEATS, "machine_cpus": os.cpu_count()}
    table = Table()
    print(f"postcopy receive vs peers; medians of {REPEATS} alternated rounds "
          f"(load average {os.getloadavg()[0]:.1f} at start)")
    print(f"  {'measure':44s} {'receive':>22s} {'peer':>34s}  ratio")
    with tempfile.TemporaryDirectory(prefix="bench-receive-", dir="/var/tmp") as temp:
        workdir = Path(temp)
        small = make_sample_disk(workdir / "small.img", SMALL_SIZE, seed=4, data_fraction=0.5)
        huge = workdir / "huge.img"
        make_huge_image(huge)
        subprocess.run(["cat", str(small.path)], stdout=subprocess.DEVNULL, check=True)  # warm
        with open(small.path, "rb") as image:
            small_first = image.read(READ)
        with open(huge, "rb") as image:
            huge_first = image.read(READ)
        results["small"] = {"size": SMALL_SIZE, "data_bytes": small.data_bytes}
        results["huge"] = {"size": HUGE_SIZE, "data_bytes": len(HUGE_DATA_OFFSETS) * MiB}

        with (
            running_serve(small.path, workdir) as small_uri,
            running_serve(huge, workdir) as huge_uri,
        ):
            # 1. time to first guest read
            firsts: dict[str, list[FirstRead]] = {"1GiB": [], "1TiB": []}
            precopy = []
            for _ in range(REPEATS):
                firsts["1GiB"].append(first_read(small_uri, workdir, small_first))
                firsts["1TiB"].append(first_read(huge_uri, workdir, huge_first))
                precopy.append(precopy_seconds(small_uri, workdir / "precopy.img"))
            fresh(workdir / "precopy.img", workdir / "first.img", workdir / "first.state")
            results["first_read"] = {
                "client": "nbdsrv.open_client (in the bench process), offset 0 (a missing chunk)",
                **{size: [run.__dict__ for run in runs] for size, runs in firsts.items()},
                "qemu_img_convert_seconds_1GiB": precopy,
            }

            def first(size: str, field: str) -> float:
                return median([getattr(run, field) for run in firsts[size]])

            m_small, m_huge = first("1GiB", "read_seconds"), first("1TiB", "read_seconds")
            m_pre = median(precopy)
            table.add("first 4K read, 1 GiB source (s)", f"{m_small:.3f}",
                      f"qemu-img convert {m_pre:.3f}", ratio_text(m_small / m_pre, "< 1 s"))
            table.add("first 4K read, 1 TiB source (s)", f"{m_huge:.3f}", "",
                      ratio_text(m_huge / m_small, "< 1 s, <= 2x the 1 GiB one"))
            for size in firsts:
                table.add(f"  {size}: engine created / URI printed (s)",
                          f"{first(size, 'engine_seconds'):.3f} / {first(size, 'uri_seconds'):.3f}",
                          "", "")

            # 2. drain on loopback
            runs, copies = [], []
            for _ in range(REPEATS):
                runs.append(drain(small_uri, workdir, small.data_bytes))
                copies.append(nbdcopy_seconds(small_uri, workdir / "nbdcopy.img", SMALL_SIZE))
            drained = workdir / "drain.img"
            if subprocess.run(["cmp", "-s", str(small.path), str(drained)]).returncode:
                raise RuntimeError("the drained file differs from the source")
            fresh(workdir / "nbdcopy.img")
            drain_s = median([r.drain_seconds for r in runs])
            total_s = median([r.total_seconds for r in runs])
            copy_s = median(copies)
            rate = SMALL_SIZE / MiB
            results["drain_loopback"] = {
                "drain_seconds": [r.drain_seconds for r in runs],
                "total_seconds": [r.total_seconds for r in runs],
                "transferred_bytes": [r.transferred_bytes for r in runs],
                "nbdcopy_seconds": copies,
            }
            table.add("drain 1 GiB (half data), Unix (MiB/s)", f"{rate / drain_s:.0f}",
                      f"nbdcopy {rate / copy_s:.0f}", ratio_text(copy_s / drain_s, ">= 0.5x"))
            table.add("  the same from launching receive (MiB/s)", f"{rate / total_s:.0f}",
                      f"nbdcopy {rate / copy_s:.0f}", ratio_text(copy_s / total_s, "info"))

            # 3. miss latency on loopback (the top 65% of the data, read top down)
            candidates = [c for c in data_chunks(small.data_runs) if c >= 0.35 * SMALL_SIZE]
            latency_runs = [
                miss_latency(small_uri, workdir, candidates, small.data_bytes, seed)
                for seed in range(REPEATS)
            ]
            report_latency(table, results, "miss_latency_loopback", "Unix", latency_runs)
            latency_runs = [
                miss_latency(small_uri, workdir, candidates, small.data_bytes, seed,
                             without_drain=True)
                for seed in range(REPEATS)
            ]
            report_latency(table, results, "miss_latency_loopback_no_drain",
                           "Unix, NO drain", latency_runs)
            fresh(workdir / "latency.img", workdir / "latency.state")
            fresh(workdir / "nodrain.img", workdir / "nodrain.state")

            # 4. served reads of present data (drain.img is complete from step 2)
            served_reads(table, results, workdir, small_uri)

        # 2b and 3b: over a 1 Gbit/s link
        with open_two_hosts(LINK_RATE_BITS) as hosts:
            host_a, host_b = hosts.host_a, hosts.host_b
            with running_serve(small.path, workdir, host=host_a) as link_uri:
                link_firsts, link_precopy = [], []
                for _ in range(REPEATS):
                    link_firsts.append(first_read(link_uri, workdir, small_first, host=host_b))
                    link_precopy.append(precopy_seconds(link_uri, workdir / "precopy.img",
                                                        host=host_b))
                fresh(workdir / "precopy.img", workdir / "first.img", workdir / "first.state")
                results["first_read_link"] = {
                    "1GiB": [run.__dict__ for run in link_firsts],
                    "qemu_img_convert_seconds_1GiB": link_precopy,
                }
                m_link = median([run.read_seconds for run in link_firsts])
                m_link_pre = median(link_precopy)
                table.add("first 4K read, 1 GiB over 1 Gbit/s (s)", f"{m_link:.3f}",
                          f"qemu-img convert {m_link_pre:.3f}",
                          ratio_text(m_link / m_link_pre, "< 1 s"))
                runs, copies, wire, tcp = [], [], [], []
                for _ in range(REPEATS):
                    tcp.append(raw_tcp_rate(host_a, host_b, 256 * MiB))
                    before = link_rx_bytes(host_b)
                    runs.append(drain(link_uri, workdir, small.data_bytes, host=host_b))
                    wire.append(link_rx_bytes(host_b) - before)
                    copies.append(nbdcopy_seconds(link_uri, workdir / "nbdcopy.img",
                                                  SMALL_SIZE, host=host_b))
                fresh(workdir / "nbdcopy.img")
                link_mib = LINK_RATE_BITS / 8 / MiB
                goodput = median([r.transferred_bytes / r.drain_seconds for r in runs]) / MiB
                wire_rate = median([w / r.drain_seconds for w, r in zip(wire, runs, strict=True)])
                copy_goodput = small.data_bytes / median(copies) / MiB
                tcp_goodput = median(tcp) / MiB
                results["drain_link"] = {
                    "link_bits_per_second": LINK_RATE_BITS,
                    "drain_seconds": [r.drain_seconds for r in runs],
                    "total_seconds": [r.total_seconds for r in runs],
                    "transferred_bytes": [r.transferred_bytes for r in runs],
                    "rx_wire_bytes": wire,
                    "nbdcopy_seconds": copies,
                    "raw_tcp_bytes_per_second": tcp,
                }
                table.add("drain over 1 Gbit/s, data MiB/s (goodput)", f"{goodput:.1f}",
                          f"link {link_mib:.1f}, nbdcopy {copy_goodput:.1f}",
                          ratio_text(goodput / link_mib, ">= 0.90 of link"))
                table.add("  vs one plain TCP stream on the link (MiB/s)", f"{goodput:.1f}",
                          f"TCP {tcp_goodput:.1f}", ratio_text(goodput / tcp_goodput, "info"))
                table.add("  vs nbdcopy on the link", f"{goodput:.1f}",
                          f"nbdcopy {copy_goodput:.1f}", ratio_text(goodput / copy_goodput, "info"))
                table.add("  bytes on the veth during the drain (MiB/s)",
                          f"{wire_rate / MiB:.1f}", "", ratio_text(wire_rate / MiB / link_mib,
                                                                  "info"))
                latency_runs = [
                    miss_latency(link_uri, workdir, candidates, small.data_bytes, seed,
                                 host=host_b)
                    for seed in range(REPEATS)
                ]
                report_latency(table, results, "miss_latency_link", "1 Gbit/s", latency_runs)
                latency_runs = [
                    miss_latency(link_uri, workdir, candidates, small.data_bytes, seed,
                                 host=host_b, extra=["--bandwidth", LINK_CAP])
                    for seed in range(REPEATS)
                ]
                report_latency(table, results, "miss_latency_link_capped",
                               f"1G link, cap {LINK_CAP}", latency_runs)
    results["table"] = table.rows
    results["bench_seconds"] = time.monotonic() - began
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = RESULTS_DIR / f"receive-{stamp}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"({results['bench_seconds']:.0f} s; results in {path.relative_to(PROJECT_ROOT)})")
    return 0


def report_latency(
    table: Table, results: dict[str, Any], key: str, where: str, runs: Sequence[LatencyRun]
) -> None:
    def stat(name: str, fraction: float) -> float:
        return median([percentile(getattr(run, name), fraction) for run in runs])

    results[key] = [run.__dict__ for run in runs]
    miss50, miss99 = stat("miss_us", 0.5), stat("miss_us", 0.99)
    direct50, direct99 = stat("direct_us", 0.5), stat("direct_us", 0.99)
    idle50, idle99 = stat("idle_us", 0.5), stat("idle_us", 0.99)
    chunk50 = stat("idle_chunk_us", 0.5)
    reads = sum(run.reads for run in runs)
    faults = sum(run.faults for run in runs)
    drained = sum(run.drained_during_window for run in runs) / MiB
    window = sum(run.window_seconds for run in runs)
    table.add(f"4K miss while draining, {where}: p50 (us)", f"{miss50:.0f}",
              f"direct, same load {direct50:.0f}", ratio_text(miss50 / direct50, "<= 3x"))
    table.add("  p99 (us)", f"{miss99:.0f}", f"direct, same load {direct99:.0f}",
              ratio_text(miss99 / direct99, "info"))
    table.add("  vs the source idle: p50 / p99 (us)", f"{miss50:.0f} / {miss99:.0f}",
              f"{idle50:.0f} / {idle99:.0f}", ratio_text(miss50 / idle50, "<= 3x (p50)"))
    table.add("  idle 64K chunk read from the source, p50 (us)", "", f"{chunk50:.0f}", "")
    table.add("  reads / faults / wrong bytes", f"{reads} / {faults} / "
              f"{sum(run.mismatches for run in runs)}",
              f"drain moved {drained:.0f} MiB in {window:.1f} s", "")


def served_reads(table: Table, results: dict[str, Any], workdir: Path, source_uri: str) -> None:
    """fio against receive (restarted on the complete destination of the drain bench, with the
    same source URI: it is part of the state's identity) and nbdkit file on the same file."""
    image = workdir / "drain.img"
    size = image.stat().st_size
    names = ["nbdkit file", *(f"receive -t {n}" for n in THREAD_COUNTS)]
    figures: dict[str, dict[str, list[float]]] = {n: {job: [] for job in FIO_JOBS} for n in names}
    for _ in range(REPEATS):
        with running_nbdkit_file(image, workdir) as uri:
            for job in FIO_JOBS:
                iops, mib = fio(uri, job, size, workdir)
                figures["nbdkit file"][job].append(iops if "4k" in job else mib)
        for threads in THREAD_COUNTS:
            with running_receive(source_uri, workdir, "--threads",
                                 str(threads), keep=True, name="drain") as receiving:
                if receiving.status().get("state") not in (None, "complete"):
                    raise RuntimeError("served-read bench needs a complete destination")
                for job in FIO_JOBS:
                    iops, mib = fio(receiving.uri, job, size, workdir)
                    figures[f"receive -t {threads}"][job].append(iops if "4k" in job else mib)
    results["served_reads"] = figures
    for job in FIO_JOBS:
        unit = "IOPS" if "4k" in job else "MiB/s"
        peer = median(figures["nbdkit file"][job])
        best = max(names[1:], key=lambda n: median(figures[n][job]))
        for name in names[1:]:
            ours = median(figures[name][job])
            mark = "  <- best" if name == best else ""
            table.add(f"served {job}, {name} ({unit})", f"{ours:.0f}",
                      f"nbdkit file {peer:.0f}", ratio_text(ours / peer, ">= 0.5x") + mark)


if __name__ == "__main__":
    sys.exit(main())
