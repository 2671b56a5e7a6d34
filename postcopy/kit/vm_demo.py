"""`postcopy demo --vm`: watch a real QEMU guest live-migrate while postcopy moves its disk.

Everything runs on this machine, QEMU without KVM (`-accel tcg`), every connection on a Unix
socket.  The guest is the project's tiny test guest (`postcopy.kit.guestkit`: Debian's kernel and an
initramfs whose init runs a self-checking disk workload that prints one marker per pass, OK or
FAIL, on the serial console), built on first use and then taken from the cache.

1. Host A: QEMU boots the guest on a local raw image that holds a seeded pattern written before
   boot; `postcopy serve` exports that image read-only.
2. The link: with a rate, Host B reaches A through an nbdkit relay with the rate filter (the
   same relay as the tests' scenario), so the drain lasts long enough to watch.
3. Host B: `postcopy receive --wait-for-source` prints an NBD URI, and QEMU starts with
   `-incoming defer` on that disk.
4. `postcopy qemu-migrate` moves the RAM; at switchover (A paused and flushed) it opens B's disk
   gate, and the guest runs on B while the disk drains behind it.
5. The guest's markers are shown as they arrive, with the disk's progress: on a terminal the
   same table `fetch-progress --watch` draws (`postcopy.progress_display`), pinned below the
   scrolling markers; otherwise plain lines.  (The `fetch-progress` command itself cannot share
   the terminal: its live display would overwrite the marker lines.)
6. After the drain completes the guest runs a few more passes on B; then every process is
   stopped and B's file is compared with A's where the guest never writes.
7. The summary: boot time, RAM migration time and downtime (QEMU's figures), time from
   switchover to the guest's first OK on B, drain time, passes OK and FAIL.  The demo passes
   (exit 0) only if no FAIL appeared and the drain completed.

Every process it starts (QEMU A and B, serve, the relay, receive, qemu-migrate) runs in its own
session, so a Ctrl-C (or SIGTERM) reaches only the demo, which stops them all and removes its
files before it exits; a second Ctrl-C during that clean-up is ignored.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from postcopy.destination.gate import is_source_frozen
from postcopy.destination.status import process_alive, read_status
from postcopy.errors import UserError
from postcopy.kit.guestkit.build import (
    GuestBootFiles,
    GuestBuildError,
    cache_root,
    ensure_guest_boot_files,
)
from postcopy.kit.guestkit.qemu import (
    MIB,
    GuestError,
    GuestLayout,
    Marker,
    QemuGuest,
    prepare_disk_image,
    run_qemu_guest,
)
from postcopy.kit.guestkit.scenario import (
    ReceiveProcess,
    layout_for_disk_size,
    run_postcopy_receive,
    run_postcopy_serve,
    run_rate_limited_link,
    untouched_regions_match,
)
from postcopy.kit.processes import stop_process
from postcopy.progress_display import DiskView, render_progress
from postcopy.units import format_size

PASSES_ON_A_BEFORE_MIGRATION = 2
BOOT_TIMEOUT = 60.0  # QEMU start to the passes above (TCG boots in ~2 s here)
MIGRATION_TIMEOUT = 60.0  # handed to qemu-migrate; RAM migration takes ~1 s here
PASS_TIMEOUT = 30.0  # longest wait for one more guest pass
TICK_SECONDS = 0.02
LIVE_REFRESH_SECONDS = 0.25
PLAIN_PROGRESS_SECONDS = 2.0
MIN_DISK_SIZE = 128 * MIB


@dataclass(frozen=True)
class VmDemoConfig:
    disk_size: int = 256 * MIB  # 5/8 of it is data written before boot
    rate_bits_per_second: int | None = 1_000_000_000  # the relay between the hosts; None: none
    chunk_size: int = 64 * 1024
    workdir: Path | None = None  # where the hosts' files live (default: the system temp dir)
    keep: bool = False
    live: bool | None = None  # live display (default: when the output is a terminal)
    timeout: float = 600.0  # longest drain
    passes_after_complete: int = 3


@dataclass
class VmDemoSummary:
    """What the run measured; None where a step was not reached."""

    disk_size: int
    link: str
    boot_seconds: float | None = None
    ram_migration_ms: int | None = None
    downtime_ms: int | None = None
    switchover_to_first_ok_seconds: float | None = None
    drain_seconds: float | None = None
    drain_completed: bool = False
    passes_during_drain: int = 0
    passes_after_complete: int = 0
    ok_on_a: int = 0
    ok_on_b: int = 0
    fail_markers: list[str] = field(default_factory=list)
    faults: int = 0
    transferred_bytes: int = 0
    untouched_regions_match: bool | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.drain_completed and not self.fail_markers and not self.problems

    def lines(self) -> list[str]:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} s"

        def ms(value: int | None) -> str:
            return "-" if value is None else f"{value} ms"

        drain = "complete" if self.drain_completed else "NOT complete"
        match = {None: "not checked", True: "yes", False: "NO"}[self.untouched_regions_match]
        lines = [
            f"disk: {format_size(self.disk_size)}, link A -> B: {self.link}",
            f"guest boot on Host A (QEMU start to first pass): {seconds(self.boot_seconds)}",
            f"RAM migration: {ms(self.ram_migration_ms)}, downtime {ms(self.downtime_ms)} (QEMU)",
            "switchover to the guest's first OK on Host B: "
            f"{seconds(self.switchover_to_first_ok_seconds)}",
            f"drain: {seconds(self.drain_seconds)} after switchover, {drain} "
            f"({self.passes_during_drain} guest passes during it, {self.faults} on-demand "
            f"faults, {format_size(self.transferred_bytes)} moved)",
            f"guest passes: {self.ok_on_a} OK on Host A, {self.ok_on_b} OK on Host B "
            f"({self.passes_after_complete} after the drain), {len(self.fail_markers)} FAIL",
            f"B's disk equals A's where the guest never wrote: {match}",
            f"result: {'PASSED' if self.passed else 'FAILED'}",
        ]
        lines += [f"  FAIL: {failure}" for failure in self.fail_markers[:10]]
        lines += [f"  problem: {problem}" for problem in self.problems]
        return lines


class _StepFailed(Exception):
    """A step of the demo did not work; the message goes to the summary's problems."""


class _Display:
    """Event and marker lines, with the disk's progress: live on a terminal, else plain lines."""

    def __init__(self, out: TextIO, live: bool, started: float) -> None:
        self._out = out
        self._live_wanted = live
        self._started = started
        self._live: Live | None = None
        self._state_dir: Path | None = None
        self._last_progress = 0.0

    def say(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(Text(text))
        else:
            print(text, file=self._out, flush=True)

    def event(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self._started:6.1f} s] {text}")

    def marker(self, host: str, marker: Marker, note: str = "") -> None:
        verdict = "OK" if marker.ok else f"FAIL {marker.detail}"
        self.event(f"Host {host} guest: pass {marker.pass_number} {verdict}{note}")

    def follow_disk(self, state_dir: Path) -> None:
        """From now on, show the progress of the disk whose state directory this is."""
        self._state_dir = state_dir
        if self._live_wanted:
            console = Console(file=self._out)
            self._live = Live(
                self._render(_read_record(state_dir)),
                console=console,
                auto_refresh=False,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start(refresh=True)

    def refresh(self, record: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if self._state_dir is None:
            return
        if self._live is not None:
            if force or now - self._last_progress >= LIVE_REFRESH_SECONDS:
                self._last_progress = now
                self._live.update(self._render(record), refresh=True)
        elif record and (force or now - self._last_progress >= PLAIN_PROGRESS_SECONDS):
            self._last_progress = now
            self.event(_progress_line(record))

    def stop(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()

    def _render(self, record: dict[str, Any] | None = None) -> Any:
        assert self._state_dir is not None
        label = "guest disk (Host B)"
        if not record:
            view = DiskView(None, label, self._state_dir, error="waiting for postcopy receive")
        else:
            pid = record.get("pid")
            running = process_alive(pid) if isinstance(pid, int) else None
            view = DiskView(None, label, self._state_dir, record, None, running)
        return render_progress([view], time.time())


def _progress_line(record: dict[str, Any]) -> str:
    size = max(1, int(record.get("size_bytes", 0)))
    present = int(record.get("present_bytes", 0))
    rate = record.get("transfer_rate_bytes_per_second") or 0
    return (
        f"disk: {record.get('state')}, {100.0 * present / size:5.1f}% present, "
        f"{format_size(int(record.get('transferred_bytes', 0)))} moved, "
        f"{format_size(int(rate))}/s, {record.get('faults', 0)} faults"
    )


def _read_record(state_dir: Path) -> dict[str, Any]:
    try:
        return read_status(state_dir)
    except (UserError, OSError, UnicodeDecodeError):
        return {}


@contextlib.contextmanager
def _interrupts_unwind() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C; once either came, further ones are ignored, so that the
    clean-up on the way out runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        if interrupted:
            return
        interrupted = True
        raise KeyboardInterrupt

    previous_int = signal.signal(signal.SIGINT, interrupt)
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


def run_vm_demo(config: VmDemoConfig, out: TextIO = sys.stdout) -> VmDemoSummary:
    """Run the demo (see the module docs); print the summary and return it.

    `UserError` when the guest cannot be built or the configuration is unusable;
    KeyboardInterrupt (Ctrl-C, SIGTERM) after everything was stopped and removed."""
    if config.disk_size < MIN_DISK_SIZE or config.disk_size % MIB:
        raise UserError("with --vm, --size must be a multiple of 1M, at least 128M")
    layout = layout_for_disk_size(config.disk_size)
    live = out.isatty() if config.live is None else config.live
    started = time.monotonic()
    display = _Display(out, live, started)
    rate = config.rate_bits_per_second
    link = f"nbdkit relay capped at {rate / 1e6:g} Mbit/s" if rate else "direct (no rate cap)"
    summary = VmDemoSummary(config.disk_size, link)
    display.say(
        "postcopy demo --vm: a QEMU guest (TCG) live-migrated while postcopy moves its "
        f"{format_size(config.disk_size)} disk; Unix sockets only"
    )
    display.say(f"the test guest: building it or taking it from {cache_root()} ...")
    try:
        boot_files = ensure_guest_boot_files()
    except GuestBuildError as exc:
        raise UserError(f"cannot build the test guest: {exc}") from None
    display.say(f"the test guest: {boot_files.kernel_package} {boot_files.kernel_version}")
    if live and rate and rate >= 500_000_000:
        display.say("(a slower link makes a longer drain to watch, e.g. --rate 200M)")
    with _interrupts_unwind():
        base = Path(tempfile.mkdtemp(prefix="postcopy-vm-demo-", dir=config.workdir))
        socket_dir = Path(tempfile.mkdtemp(prefix="pcvm-"))  # short: Unix socket paths
        interrupted = False
        try:
            try:
                _run_hosts(base, socket_dir, layout, boot_files, config, display, summary)
            finally:
                display.stop()
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:  # every process of the demo is stopped by now
            shutil.rmtree(socket_dir, ignore_errors=True)
            if config.keep:
                display.say(f"files kept in {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)
            if interrupted:
                kept = "" if config.keep else ", its files removed"
                display.say(f"interrupted: every process of the demo is stopped{kept}")
    for line in summary.lines():
        display.say(line)
    return summary


def _run_hosts(
    base: Path,
    socket_dir: Path,
    layout: GuestLayout,
    boot_files: GuestBootFiles,
    config: VmDemoConfig,
    display: _Display,
    summary: VmDemoSummary,
) -> None:
    host_a, host_b = base / "host-a", base / "host-b"
    host_a.mkdir()
    host_b.mkdir()
    image_a, image_b = host_a / "disk.img", host_b / "disk.img"
    state_dir = host_b / "state"
    prebooted = format_size(layout.preboot_kib[1] * 1024)
    display.say(f"Host A: writing {prebooted} of seeded data to the guest's disk before boot")
    prepare_disk_image(image_a, layout, boot_files)
    watch = _GuestWatch(display)
    try:
        with contextlib.ExitStack() as stack:
            display.say("Host A: QEMU boots the guest on the local raw image")
            source = stack.enter_context(
                run_qemu_guest(boot_files, layout, image_a, host_a, "hostA")
            )
            watch.source = source
            watch.until(lambda: watch.ok_count(source) >= PASSES_ON_A_BEFORE_MIGRATION,
                        BOOT_TIMEOUT, "the guest did not pass twice on Host A")  # fmt: skip
            summary.boot_seconds = source.markers[0].seen_at - source.started_at
            source_uri = stack.enter_context(
                run_postcopy_serve(image_a, socket_dir / "A.sock", host_a)
            )
            display.say(f"Host A: postcopy serve exports the image read-only: {source_uri}")
            if config.rate_bits_per_second:
                source_uri = stack.enter_context(
                    run_rate_limited_link(
                        socket_dir / "A.sock",
                        socket_dir / "link.sock",
                        str(config.rate_bits_per_second),
                        base,
                    )
                )
                display.say(f"link A -> B: {summary.link}: {source_uri}")
            receive = stack.enter_context(
                run_postcopy_receive(
                    source_uri, image_b, state_dir, socket_dir / "B.sock", host_b,
                    extra_args=["--chunk-size", str(config.chunk_size)],
                )
            )  # fmt: skip
            display.say(f"Host B: postcopy receive --wait-for-source serves {receive.uri}")
            dest = stack.enter_context(
                run_qemu_guest(boot_files, layout, receive.uri, host_b, "hostB", incoming=True)
            )
            watch.dest = dest
            display.say("Host B: QEMU waits for the migration (-incoming defer) on that disk")
            display.say(f"(from another terminal: fetch-progress --watch --state-dir {state_dir})")
            display.follow_disk(state_dir)
            switchover = _migrate(stack, source, dest, state_dir, watch, display, summary)
            _drain(receive, dest, switchover, config, watch, display, summary)
            display.refresh(_read_record(state_dir), force=True)
            display.stop()
            display.say("stopping QEMU on both hosts, receive, the link and serve ...")
    except (_StepFailed, GuestError) as exc:
        display.stop()
        display.say(f"the demo stopped early: {str(exc)[-4000:]}")  # with QEMU's console tail
        summary.problems.append(str(exc).splitlines()[0])
    finally:
        record = _read_record(state_dir)  # the last one written, also after a failed step
        summary.faults = int(record.get("faults", 0))
        summary.transferred_bytes = int(record.get("transferred_bytes", 0))
        summary.fail_markers = list(watch.failures)
        summary.ok_on_a = watch.ok_count(watch.source)
        summary.ok_on_b = watch.ok_count(watch.dest)
    if summary.drain_completed:  # every process is gone: B's file is final
        summary.untouched_regions_match = untouched_regions_match(layout, image_a, image_b)
        if not summary.untouched_regions_match:
            summary.problems.append("B's disk differs from A's where the guest never wrote")


class _GuestWatch:
    """Reads both guests' consoles and shows every new marker; remembers the FAIL ones."""

    def __init__(self, display: _Display) -> None:
        self.display = display
        self.source: QemuGuest | None = None
        self.dest: QemuGuest | None = None
        self.failures: list[str] = []
        self.note_for_dest = ""

    @staticmethod
    def ok_count(guest: QemuGuest | None) -> int:
        return 0 if guest is None else len([m for m in guest.markers if m.ok])

    def poll(self) -> None:
        for host, guest in (("A", self.source), ("B", self.dest)):
            if guest is None:
                continue
            for marker in guest.poll_serial():
                self.display.marker(host, marker, self.note_for_dest if host == "B" else "")
                if not marker.ok:
                    self.failures.append(f"Host {host} pass {marker.pass_number}: {marker.detail}")

    def until(
        self,
        condition: Callable[[], bool],
        timeout: float,
        failure: str,
        record_from: Callable[[], None] | None = None,
    ) -> None:
        """Poll (and show) until `condition()` holds; `_StepFailed(failure)` after `timeout` s
        or when a QEMU process exits."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if record_from is not None:
                record_from()
            if condition():
                return
            for guest in (self.source, self.dest):
                if guest is not None and guest.process.poll() is not None:
                    raise _StepFailed(f"{failure}: QEMU {guest.name} exited")
            if time.monotonic() > deadline:
                raise _StepFailed(f"{failure} within {timeout:g} s")
            time.sleep(TICK_SECONDS)


def _migrate(
    stack: contextlib.ExitStack,
    source: QemuGuest,
    dest: QemuGuest,
    state_dir: Path,
    watch: _GuestWatch,
    display: _Display,
    summary: VmDemoSummary,
) -> float:
    """Run `postcopy qemu-migrate`; return the switchover time (when it opened B's gate)."""
    command = [
        sys.executable, "-m", "postcopy.cli", "qemu-migrate",
        "--source-qmp", str(source.qmp_socket), "--dest-qmp", str(dest.qmp_socket),
        "--state-dir", str(state_dir), "--timeout", f"{MIGRATION_TIMEOUT:g}", "--json",
    ]  # fmt: skip
    display.event("postcopy qemu-migrate moves the guest from Host A to Host B ...")
    migration = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stack.callback(_stop_process, migration)
    switchover: float | None = None

    def migration_done() -> bool:
        nonlocal switchover
        if switchover is None and is_source_frozen(state_dir):
            switchover = time.monotonic()
            display.event("switchover: Host A is paused and flushed, B's disk gate is open")
            watch.note_for_dest = " (drain running)"
        return migration.poll() is not None

    watch.until(migration_done, MIGRATION_TIMEOUT + 15, "postcopy qemu-migrate did not end")
    stdout, stderr = migration.communicate(timeout=5)
    if migration.returncode != 0:
        why = (stderr.strip().splitlines() or [f"exit status {migration.returncode}"])[-1]
        raise _StepFailed(f"postcopy qemu-migrate failed: {why}")
    report = json.loads(stdout.strip().splitlines()[-1])
    summary.ram_migration_ms = int(report["qemu_total_time_ms"])
    summary.downtime_ms = int(report["qemu_downtime_ms"])
    display.event(
        f"migrated: RAM migration {summary.ram_migration_ms} ms, downtime "
        f"{summary.downtime_ms} ms (QEMU); the guest runs on Host B"
    )
    return switchover if switchover is not None else time.monotonic()


def _drain(
    receive: ReceiveProcess,
    dest: QemuGuest,
    switchover: float,
    config: VmDemoConfig,
    watch: _GuestWatch,
    display: _Display,
    summary: VmDemoSummary,
) -> None:
    """Watch the drain to its end, then the guest's passes after it."""
    record: dict[str, Any] = {}

    def track() -> None:
        nonlocal record
        record = _read_record(receive.state_dir) or record
        display.refresh(record)
        if summary.switchover_to_first_ok_seconds is None:
            first_ok = [m for m in dest.markers if m.ok and m.seen_at >= switchover]
            if first_ok:
                summary.switchover_to_first_ok_seconds = first_ok[0].seen_at - switchover

    def drain_ended() -> bool:
        if receive.process.poll() is not None:
            raise _StepFailed(f"postcopy receive exited ({receive.process.returncode})")
        return record.get("state") in ("complete", "failed")

    watch.until(drain_ended, config.timeout, "the drain did not end", record_from=track)
    if record.get("state") == "failed":
        raise _StepFailed(f"the drain failed: {record.get('error')}")
    completed_at = time.monotonic()
    summary.drain_completed = True
    summary.drain_seconds = completed_at - switchover
    summary.passes_during_drain = len([m for m in dest.markers if m.seen_at < completed_at])
    display.refresh(record, force=True)
    display.event(
        f"the drain is complete {summary.drain_seconds:.2f} s after switchover: Host A's disk "
        "is no longer needed"
    )
    watch.note_for_dest = " (after the drain)"

    def passes_after() -> int:
        return len([m for m in dest.markers if m.seen_at >= completed_at])

    wanted = config.passes_after_complete
    watch.until(
        lambda: passes_after() >= wanted,
        PASS_TIMEOUT * max(1, wanted),
        f"the guest did not pass {wanted} times after the drain",
        record_from=track,
    )
    summary.passes_after_complete = passes_after()


def _stop_process(process: subprocess.Popen[str]) -> None:
    stop_process(process)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
