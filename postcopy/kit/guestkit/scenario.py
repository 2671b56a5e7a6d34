"""The end-to-end scenario: a running QEMU guest live-migrated with its disk moved by postcopy.

How it works (`run_postcopy_scenario`), all on one machine over Unix sockets:
    Host A  QEMU on a local raw image (`a.img`, with the seeded pre-boot pattern), and
            `postcopy serve --socket A.sock a.img` exporting it read-only.
    Host B  `postcopy receive --source nbd+unix:///?socket=A.sock --dest b.img --state-dir B.state
            --socket B.sock --wait-for-source`, and QEMU with `-incoming defer` on the URI it
            printed.
    Optionally (`link_rate`) B reaches A through an nbdkit relay with the rate filter, a slower
    link, so that the drain lasts long enough to watch the guest pass while it runs.
    Then `migrate_qemu_domain` moves the guest (declaring the source frozen at switchover), and
    the scenario watches the guest pass on B while the drain runs, waits for the status record's
    `complete`, lets the guest pass some more rounds after completion, and, with every process
    gone, compares B's file with A's where the guest never wrote (pre-boot and zero regions).

`stale_source=True` is the negative control: B is fed a copy of `a.img` taken a few passes
before the migration, so the guest's re-reads on B must find old data and say FAIL.
`check_scenario` holds the assertions the positive test makes; the negative test expects it to
fail.  Every process started here is terminated on the way out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from postcopy.integrations.qemu_migrate import MigrationConfig, MigrationReport, migrate_qemu_domain
from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.guestkit.qemu import (
    MIB,
    GuestError,
    GuestLayout,
    Marker,
    QemuGuest,
    prepare_disk_image,
    run_qemu_guest,
)
from postcopy.kit.processes import start_logged, status_record, stop_process

BOOT_TIMEOUT = 30.0
URI_RE = re.compile(r"nbd(\+unix)?://\S+")
POLL_SECONDS = 0.02
T = TypeVar("T")

# The hosts are joined by a relay limited to ~100 MB/s (nbdkit's rate filter; bits/s), so the
# drain of the 176 MiB of data lasts ~2 s and the guest passes on B while it runs.
LINK_RATE = "800M"
# A 256 MiB disk: 160 MiB of pre-boot data, the guest's 16 MiB of slots, 8 MiB that must read as
# zeros, holes elsewhere.  Enough data that the guest runs passes on B while the drain goes on.
SCENARIO_LAYOUT = GuestLayout(
    disk_size=256 * MIB,
    preboot_kib=(1024, 160 * 1024),
    work_kib=(161 * 1024, 16 * 1024),
    zero_kib=(177 * 1024, 8 * 1024),
)


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except FileNotFoundError:
        return ""


def same_bytes(first: Path, second: Path, start: int, length: int) -> bool:
    """True when both files hold the same bytes at [start, start+length)."""
    block = 4 << 20
    with open(first, "rb") as a, open(second, "rb") as b:
        for offset in range(start, start + length, block):
            size = min(block, start + length - offset)
            if os.pread(a.fileno(), size, offset) != os.pread(b.fileno(), size, offset):
                return False
    return True


def untouched_regions_match(layout: GuestLayout, image_a: Path, image_b: Path) -> bool:
    """B's file equals A's where the guest never writes: the pre-boot and the zero regions."""
    preboot = layout.preboot_byte_range()
    zero = (layout.zero_kib[0] * 1024, layout.zero_kib[1] * 1024)
    return all(same_bytes(image_a, image_b, start, length) for start, length in (preboot, zero))


def layout_for_disk_size(size: int) -> GuestLayout:
    """A scenario layout for a disk of `size` bytes (a multiple of 1 MiB, at least 128 MiB):
    5/8 of it pre-boot data from 1 MiB on, then the guest's 16 MiB of slots and 8 MiB of zeros,
    holes elsewhere.  256 MiB gives `SCENARIO_LAYOUT`."""
    if size < 128 * MIB or size % MIB:
        raise ValueError("the guest's disk must be a multiple of 1 MiB, at least 128 MiB")
    preboot_mib = size * 5 // 8 // MIB
    return GuestLayout(
        disk_size=size,
        preboot_kib=(1024, preboot_mib * 1024),
        work_kib=((1 + preboot_mib) * 1024, 16 * 1024),
        zero_kib=((17 + preboot_mib) * 1024, 8 * 1024),
    )


@contextmanager
def _running(
    command: Sequence[str], log: Path, ready: Callable[[], T | None], timeout: float, failure: str
) -> Iterator[tuple[subprocess.Popen[bytes], T]]:
    """Start `command` with its output in `log` and poll `ready()` until it returns something;
    yields the process and that.  GuestError with `failure` and the log's tail when the process
    exits or `timeout` seconds pass first.  The process is stopped when the block ends."""
    process = start_logged(command, log)
    try:
        deadline = time.monotonic() + timeout
        while (result := ready()) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise GuestError(f"{failure}:\n{_tail(log)}")
            time.sleep(POLL_SECONDS)
        yield process, result
    finally:
        stop_process(process)


def _socket_exists(socket: Path) -> Callable[[], bool | None]:
    return lambda: socket.exists() or None


@contextmanager
def run_postcopy_serve(image: Path, socket: Path, workdir: Path) -> Iterator[str]:
    """`postcopy serve` exporting `image` read-only on `socket`; yields the NBD URI."""
    log = workdir / "serve.log"
    command = [sys.executable, "-m", "postcopy.cli", "serve", "--socket", str(socket), str(image)]
    with _running(command, log, _socket_exists(socket), 15, "postcopy serve did not start"):
        yield f"nbd+unix:///?socket={socket}"


@contextmanager
def run_rate_limited_link(
    source_socket: Path, link_socket: Path, rate: str, workdir: Path
) -> Iterator[str]:
    """A slower link between the hosts: nbdkit's nbd plugin relaying to `source_socket` through
    its rate filter (`rate` in bits/s, e.g. "800M"); yields the relay's NBD URI.  The filter's
    bucket holds 0.2 s of traffic (its default, 2 s, lets a small disk through in one burst)."""
    log = workdir / "link.log"
    link_socket.unlink(missing_ok=True)  # nbdkit does not remove a stale socket
    command = [
        "nbdkit", "-f", "-U", str(link_socket), "--filter=rate", "nbd",
        f"socket={source_socket}", f"rate={rate}", "burstiness=0.2",
    ]  # fmt: skip
    with _running(command, log, _socket_exists(link_socket), 15, "nbdkit relay did not start"):
        yield f"nbd+unix:///?socket={link_socket}"


@dataclass
class ReceiveProcess:
    uri: str
    process: subprocess.Popen[bytes]
    state_dir: Path
    log: Path

    def status(self) -> dict[str, Any]:
        return status_record(self.state_dir)


@contextmanager
def run_postcopy_receive(
    source_uri: str,
    dest: Path,
    state_dir: Path,
    socket: Path,
    workdir: Path,
    extra_args: Sequence[str] = (),
) -> Iterator[ReceiveProcess]:
    """`postcopy receive --wait-for-source [extra_args]`; yields it once it printed the NBD
    URI."""
    log = workdir / "receive.log"
    command = [
        sys.executable, "-m", "postcopy.cli", "receive", "--source", source_uri,
        "--dest", str(dest), "--state-dir", str(state_dir), "--socket", str(socket),
        "--wait-for-source", *extra_args,
    ]  # fmt: skip

    def printed_uri() -> re.Match[str] | None:
        return URI_RE.search(_tail(log, 10000))

    with _running(command, log, printed_uri, 30, "postcopy receive printed no URI") as started:
        process, match = started
        yield ReceiveProcess(match.group(0), process, state_dir, log)


@dataclass
class ScenarioResult:
    """What one run saw; times are seconds unless named otherwise."""

    report: MigrationReport | None
    source_markers: list[Marker]
    dest_markers: list[Marker]
    boot_seconds: float
    first_marker_after_switchover_seconds: float | None
    drain_seconds: float | None  # qemu-migrate returning until the status record said complete
    passes_during_drain: int
    passes_after_complete: int
    final_status: dict[str, Any]
    copied_regions_match: bool  # B's file equals A's over the pre-boot and zero regions
    errors: list[str] = field(default_factory=list)
    logs: str = ""

    @property
    def failures(self) -> list[Marker]:
        return [m for m in self.source_markers + self.dest_markers if not m.ok]


def check_scenario(result: ScenarioResult, min_passes_after_complete: int = 2) -> None:
    """The positive scenario's acceptance: raises AssertionError when anything is wrong."""
    assert not result.errors, f"{result.errors}\n{result.logs}"
    assert result.failures == [], f"FAIL markers: {result.failures}\n{result.logs}"
    assert result.report is not None and result.report.status == "completed"
    assert result.final_status.get("state") == "complete", result.final_status
    assert result.copied_regions_match, "B's disk differs from A's where the guest never wrote"
    assert result.passes_after_complete >= min_passes_after_complete
    assert all(m.ok for m in result.dest_markers)
    numbers = [m.pass_number for m in result.dest_markers]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    last_source = result.source_markers[-1].pass_number
    assert last_source < numbers[0] <= last_source + 2, (last_source, numbers[0])


def run_postcopy_scenario(
    boot_files: GuestBootFiles,
    workdir: Path,
    layout: GuestLayout | None = None,
    stale_source: bool = False,
    passes_after_complete: int = 2,
    drain_timeout: float = 60.0,
    link_rate: str | None = None,
) -> ScenarioResult:
    """Run the scenario (see the module docs); `link_rate` puts a rate-limited relay between
    the hosts (bits/s, nbdkit's rate filter) so that the drain lasts a while."""
    layout = layout or GuestLayout()
    image_a = workdir / "a.img"
    image_b = workdir / "b.img"
    state_dir = workdir / "b.state"
    state_dir.mkdir()
    prepare_disk_image(image_a, layout, boot_files)
    socket_dir = Path(tempfile.mkdtemp(prefix="pcg-sc-"))
    errors: list[str] = []
    report = None
    first_after: float | None = None
    drain_seconds: float | None = None
    during = after = 0
    final_status: dict[str, Any] = {}
    source: QemuGuest | None = None
    dest: QemuGuest | None = None
    receive: ReceiveProcess | None = None
    try:
        with ExitStack() as stack:
            source = stack.enter_context(
                run_qemu_guest(boot_files, layout, image_a, workdir, "hostA")
            )
            source.wait_for_marker(BOOT_TIMEOUT, ok=True, min_pass=2)
            served = image_a
            if stale_source:
                served = workdir / "stale.img"
                subprocess.run(["cp", "--sparse=always", str(image_a), str(served)], check=True)
                last = source.markers[-1].pass_number
                source.wait_for_marker(BOOT_TIMEOUT, ok=None, min_pass=last + 2)
            source_uri = stack.enter_context(
                run_postcopy_serve(served, socket_dir / "A.sock", workdir)
            )
            if link_rate is not None:
                source_uri = stack.enter_context(
                    run_rate_limited_link(
                        socket_dir / "A.sock", socket_dir / "link.sock", link_rate, workdir
                    )
                )
            receive = stack.enter_context(
                run_postcopy_receive(
                    source_uri, image_b, state_dir, socket_dir / "B.sock", workdir
                )
            )
            dest = stack.enter_context(
                run_qemu_guest(boot_files, layout, receive.uri, workdir, "hostB", incoming=True)
            )
            report = trio.run(
                migrate_qemu_domain,
                MigrationConfig(source.qmp_socket, dest.qmp_socket, state_dir, timeout_seconds=60),
            )
            switched = time.monotonic()
            first = dest.wait_for_marker(BOOT_TIMEOUT, ok=None)
            first_after = first.seen_at - switched
            deadline = switched + drain_timeout
            completed_at = None
            while completed_at is None:
                dest.poll_serial()
                if receive.status().get("state") == "complete":
                    completed_at = time.monotonic()
                    break
                if receive.status().get("state") == "failed":
                    errors.append(f"receive failed: {receive.status().get('error')}")
                    break
                if receive.process.poll() is not None:
                    errors.append(f"receive exited {receive.process.returncode}")
                    break
                if dest.process.poll() is not None or time.monotonic() > deadline:
                    errors.append("drain did not complete in time or QEMU B died")
                    break
                time.sleep(POLL_SECONDS)
            if completed_at is not None:
                drain_seconds = completed_at - switched
                during = len([m for m in dest.markers if m.seen_at < completed_at])
                seen = dest.wait_for_passes(passes_after_complete, BOOT_TIMEOUT, after=completed_at)
                after = len(seen)
            final_status = receive.status()
            dest.poll_serial()
            source.poll_serial()
    except AssertionError as exc:  # GuestError included
        errors.append(str(exc))
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    # Every process is gone: B's file must hold A's pre-boot data and zeros where A has them.
    copied_regions_match = False
    if final_status.get("state") == "complete":
        copied_regions_match = untouched_regions_match(layout, image_a, image_b)
    logs = "\n".join(
        [
            source.console_tail() if source else "",
            dest.console_tail() if dest else "",
            f"--- receive ---\n{_tail(receive.log) if receive else ''}",
            f"--- serve ---\n{_tail(workdir / 'serve.log')}",
            f"--- link ---\n{_tail(workdir / 'link.log')}",
        ]
    )
    return ScenarioResult(
        report=report,
        source_markers=list(source.markers) if source else [],
        dest_markers=list(dest.markers) if dest else [],
        boot_seconds=(source.markers[0].seen_at - source.started_at)
        if source and source.markers
        else 0.0,
        first_marker_after_switchover_seconds=first_after,
        drain_seconds=drain_seconds,
        passes_during_drain=during,
        passes_after_complete=after,
        final_status=final_status,
        copied_regions_match=copied_regions_match,
        errors=errors,
        logs=logs,
    )


def measure_postcopy_run(
    boot_files: GuestBootFiles,
    workdir: Path,
    layout: GuestLayout | None = None,
    link_rate: str | None = None,
) -> dict[str, float]:
    """One scenario run for `python -m bench guest --mode postcopy`."""
    result = run_postcopy_scenario(boot_files, workdir, layout, link_rate=link_rate)
    check_scenario(result)
    assert result.report is not None and result.drain_seconds is not None
    return {
        "boot_s": result.boot_seconds,
        "ram_migration_ms": result.report.qemu_total_time_ms,
        "downtime_ms": result.report.qemu_downtime_ms,
        "first_marker_after_switchover_s": result.first_marker_after_switchover_seconds or 0.0,
        "drain_s": result.drain_seconds,
        "passes_during_drain": result.passes_during_drain,
        "demand_fetches": float(result.final_status.get("demand_fetches", 0)),
        "fault_p50_ms": float(result.final_status.get("fault_latency_p50_ms") or 0.0),
        "fault_p99_ms": float(result.final_status.get("fault_latency_p99_ms") or 0.0),
        "guest_fail_markers": float(len(result.failures)),
    }
