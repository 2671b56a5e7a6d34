"""`postcopy demo`: a real two-host post-copy migration of a sample disk on this one machine.

With root, Host A and Host B are two network namespaces joined by a veth pair shaped to `rate`
(`postcopy.kit.netns`); without root the hosts share loopback (said so on screen).  The demo:

1. creates a sample domain disk on A (a filesystem-like mix of data and holes),
2. runs `postcopy serve` on A (read-only), and `postcopy receive` on B towards it,
3. from the moment B prints its NBD URI, runs a guest-like verifying workload on B's disk (random
   reads checked against A's data plus the guest's own writes, and writes),
4. shows the disk's progress live until the drain completes,
5. stops everything and checks that B's local file equals A's disk plus the guest's writes, and
   that it stayed sparse,
6. prints a summary (time to first guest I/O, drain time, bytes moved, faults and latency).

Everything it created (processes, namespaces, files) is removed at the end, also on Ctrl-C.
Processes are the real commands (`python -m postcopy.cli serve|receive`), as an operator runs them.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import trio

from postcopy.destination.status import read_status
from postcopy.errors import UserError
from postcopy.kit import netns
from postcopy.kit.processes import read_line
from postcopy.kit.sample_disk import allocated_bytes, make_sample_disk
from postcopy.kit.workload import VerifyingWorkload
from postcopy.units import format_size

SOURCE_PORT = 10809
EXTRA_GUEST_SECONDS = 1.0  # the workload goes on this long after the drain completes


@dataclass(frozen=True)
class DemoConfig:
    size: int = 256 * 1024 * 1024
    rate_bits_per_second: int | None = 1_000_000_000
    chunk_size: int = 64 * 1024
    seed: int = 1
    workdir: Path | None = None  # where the temporary hosts live (default: the system temp dir)
    keep: bool = False  # keep the files for inspection
    live: bool | None = None  # live display (default: when stdout is a terminal)
    timeout: float = 600.0


@dataclass
class DemoSummary:
    network: str
    size_bytes: int
    source_data_bytes: int
    first_guest_io_seconds: float | None = None
    drain_seconds: float | None = None
    transferred_bytes: int = 0
    dest_allocated_bytes: int = 0
    reads: int = 0
    writes: int = 0
    faults: int = 0
    fault_p50_ms: float | None = None
    fault_p99_ms: float | None = None
    guest_read_p50_ms: float | None = None
    guest_read_p99_ms: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} ms"

        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} s"

        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"network: {self.network}",
            f"disk: {format_size(self.size_bytes)}, {format_size(self.source_data_bytes)} of data",
            f"time to first guest I/O: {seconds(self.first_guest_io_seconds)}",
            f"total drain time: {seconds(self.drain_seconds)}",
            f"bytes moved: {format_size(self.transferred_bytes)} for a "
            f"{format_size(self.size_bytes)} disk "
            f"({100.0 * self.transferred_bytes / max(1, self.size_bytes):.1f}%)",
            f"destination file allocates {format_size(self.dest_allocated_bytes)}",
            f"guest I/O: {self.reads} reads, {self.writes} writes; read latency p50 "
            f"{ms(self.guest_read_p50_ms)}, p99 {ms(self.guest_read_p99_ms)}",
            f"on-demand faults: {self.faults}, latency p50 {ms(self.fault_p50_ms)}, "
            f"p99 {ms(self.fault_p99_ms)}",
            f"final check (B's disk == A's disk + guest writes): {verdict}",
        ]
        lines += [f"  problem: {problem}" for problem in self.problems]
        return lines


def _postcopy_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "postcopy.cli", *arguments]


def _read_line(process: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The next stdout line of `process`, or UserError if it exits or stays silent."""
    with contextlib.suppress(TimeoutError):
        line = read_line(process, timeout)
        if line:
            return line
    process.kill()
    error = process.stderr.read().strip() if process.stderr else ""
    raise UserError(f"{what} did not start: {error.splitlines()[-1] if error else 'no output'}")


@contextlib.contextmanager
def _running(argv: Sequence[str], what: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def _network(config: DemoConfig, say: Any) -> Iterator[tuple[str, Any, Any]]:
    """(description, command prefix for A, for B); the source address is in the description."""
    if netns.can_create_namespaces():
        with netns.open_two_hosts(config.rate_bits_per_second, prefix="pcdemo") as hosts:
            rate = config.rate_bits_per_second
            shaped = f"shaped to {rate / 1e6:g} Mbit/s" if rate else "unshaped"
            say(
                f"Host A = netns {hosts.host_a.namespace} ({hosts.host_a.address}), "
                f"Host B = netns {hosts.host_b.namespace}, veth link {shaped}"
            )
            yield hosts.host_a.address, hosts.host_a.command, hosts.host_b.command
    else:
        say("not root: Host A and Host B share loopback (no namespaces, no rate shaping)")
        yield "127.0.0.1", list, list


def run_demo(config: DemoConfig, out: TextIO = sys.stdout) -> DemoSummary:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    base = Path(tempfile.mkdtemp(prefix="postcopy-demo-", dir=config.workdir))
    try:
        return _run_demo_in(base, config, say, out)
    finally:
        if config.keep:
            say(f"files kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _run_demo_in(base: Path, config: DemoConfig, say: Any, out: TextIO) -> DemoSummary:
    host_a, host_b = base / "host-a", base / "host-b"
    host_a.mkdir()
    host_b.mkdir()
    source_image = host_a / "disk.img"
    say(f"creating a {format_size(config.size)} sample disk on Host A ...")
    disk = make_sample_disk(source_image, config.size, seed=config.seed)
    state_dir = host_b / "state"
    dest_image = host_b / "disk.img"
    socket_path = host_b / "disk.sock"
    with _network(config, say) as (address, on_a, on_b):
        network = "network namespaces" if on_a is not list else "loopback"
        summary = DemoSummary(network, config.size, disk.data_bytes)
        serve = _postcopy_command(
            "serve", "--listen", f"{address}:{SOURCE_PORT}", f"disk={source_image}"
        )
        with _running(on_a(serve), "postcopy serve") as server:
            say(f"Host A: {_read_line(server, 20, 'postcopy serve')}")
            receive = _postcopy_command(
                "receive",
                "--source",
                f"nbd://{address}:{SOURCE_PORT}/disk",
                "--dest",
                str(dest_image),
                "--state-dir",
                str(state_dir),
                "--socket",
                str(socket_path),
                "--chunk-size",
                str(config.chunk_size),
            )
            started = time.monotonic()
            with _running(on_b(receive), "postcopy receive") as receiver:
                uri = _read_line(receiver, 30, "postcopy receive")
                say(f"Host B: the domain's disk is {uri}")
                workload = VerifyingWorkload(source_image, config.size, seed=config.seed + 1)
                try:
                    trio.run(
                        _guest_and_watch, uri, workload, state_dir, started, config, summary, out
                    )
                finally:
                    workload.close()
            # receive has stopped: its local file is final.
        report = workload.report
        summary.first_guest_io_seconds = report.first_io_seconds
        summary.reads, summary.writes = report.reads, report.writes
        p50, p99 = report.latency_percentile(0.5), report.latency_percentile(0.99)
        summary.guest_read_p50_ms = None if p50 is None else p50 * 1000
        summary.guest_read_p99_ms = None if p99 is None else p99 * 1000
        summary.problems += report.errors[:10]
        summary.problems += workload.compare_with_file(dest_image)
        summary.dest_allocated_bytes = allocated_bytes(dest_image)
        slack = disk.data_bytes // 10 + report.writes * 64 * 1024 + 1024 * 1024
        if summary.dest_allocated_bytes > disk.data_bytes + slack:
            summary.problems.append(
                f"destination is not sparse: {summary.dest_allocated_bytes} bytes allocated "
                f"for {disk.data_bytes} bytes of data"
            )
    for line in summary.lines():
        say(line)
    return summary


async def _guest_and_watch(
    uri: str,
    workload: VerifyingWorkload,
    state_dir: Path,
    started: float,
    config: DemoConfig,
    summary: DemoSummary,
    out: TextIO,
) -> None:
    import nbdsrv

    live = out.isatty() if config.live is None else config.live
    async with nbdsrv.open_client(uri) as client, trio.open_nursery() as nursery:
        stop_guest = trio.Event()
        nursery.start_soon(
            partial(workload.run, client, config.timeout, start=started, stop=stop_guest)
        )
        record = await _watch_until_complete(state_dir, started, config, live, out)
        summary.drain_seconds = time.monotonic() - started
        await trio.sleep(EXTRA_GUEST_SECONDS)
        stop_guest.set()  # the workload ends its operations in flight, then returns
    summary.transferred_bytes = int(record.get("transferred_bytes", 0))
    summary.faults = int(record.get("faults", 0))
    summary.fault_p50_ms = record.get("fault_latency_p50_ms")
    summary.fault_p99_ms = record.get("fault_latency_p99_ms")
    if record.get("state") != "complete":
        summary.problems.append(f"the drain did not complete: {record.get('state')}")


async def _watch_until_complete(
    state_dir: Path, started: float, config: DemoConfig, live: bool, out: TextIO
) -> dict[str, Any]:
    """Poll the status record until the disk is complete (or failed, or the timeout).

    Live, the real `fetch-progress --watch` draws the display on the terminal; otherwise a line
    every two seconds says where the disk stands."""
    record: dict[str, Any] = {}
    watcher: trio.Process | None = None
    if live:
        watch = _postcopy_command("fetch-progress", "--watch", "--state-dir", str(state_dir))
        watcher = await trio.lowlevel.open_process(watch, stdout=out.fileno())
    last_line = 0.0
    try:
        with trio.move_on_after(config.timeout):
            while True:
                with contextlib.suppress(UserError):
                    record = read_status(state_dir)
                    if not live and time.monotonic() - last_line >= 2.0:
                        last_line = time.monotonic()
                        print(
                            _progress_line(record, time.monotonic() - started), file=out, flush=True
                        )
                    if record.get("state") in ("complete", "failed"):
                        break
                await trio.sleep(0.25)
        if watcher is not None:
            with trio.move_on_after(3):
                await watcher.wait()
    finally:
        if watcher is not None and watcher.returncode is None:
            watcher.terminate()  # SIGTERM: fetch-progress restores the terminal's cursor
            with trio.move_on_after(3):
                await watcher.wait()
            if watcher.returncode is None:
                watcher.kill()
                await watcher.wait()
    if not live and record:
        print(_progress_line(record, time.monotonic() - started), file=out, flush=True)
    return record


def _progress_line(record: dict[str, Any], elapsed: float) -> str:
    size = max(1, int(record.get("size_bytes", 0)))
    present = int(record.get("present_bytes", 0))
    rate = record.get("transfer_rate_bytes_per_second") or 0
    return (
        f"[{elapsed:6.1f} s] {record.get('state')}: {100.0 * present / size:5.1f}% present, "
        f"{format_size(int(record.get('transferred_bytes', 0)))} moved, "
        f"{format_size(int(rate))}/s, {record.get('faults', 0)} faults"
    )
