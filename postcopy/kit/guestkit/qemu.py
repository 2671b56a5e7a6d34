"""Run the test guest in QEMU (TCG) and watch its serial console; helpers for guest tests.

How it works: `run_qemu_guest` starts `qemu-system-x86_64 -accel tcg -nodefaults` with the
cached kernel and initramfs, a virtio-blk disk that is either a local raw file (a `Path`) or an
NBD URI (a `str`: `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`, opened with
`-blockdev driver=nbd`), the serial console written to a file, and QMP on a Unix socket in a
short private directory (Unix socket paths are limited to 107 bytes).  `incoming=True` adds
`-incoming defer` for a migration destination.  The guest's workload parameters travel on the
kernel command line (`GuestLayout.kernel_args`).  On exit QEMU is terminated, then killed.

`QemuGuest.wait_for_marker` polls the serial file for the workload's marker lines with a deadline
and fails early (`GuestError`, with the console's tail) if QEMU exits.  Every marker seen is kept
with the monotonic time it was first noticed, for timing measurements.  `ConsoleLog` is that
incremental reader of one console file; the libvirt and Xen labs read their guests' consoles
with it too.  QEMU runs in its own
session, so a Ctrl-C on the terminal reaches only the caller, which stops QEMU on its way out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.processes import start_logged, stop_process

MIB = 1 << 20
MARKER_RE = re.compile(r"POSTCOPY-GUEST PASS (\d+) (OK|FAIL)(.*)")
POLL_SECONDS = 0.02


class GuestError(AssertionError):
    """The guest or a process around it did not do what was expected in time: QEMU exited or
    did not start, a marker did not come, a command of the scenario did not start.  An
    AssertionError, so that a test using these helpers fails with the message and the logs."""


@dataclass(frozen=True)
class GuestLayout:
    """Where on the disk the workload looks, and how hard it works; all regions in KiB.

    Default 64 MiB disk: [0, 1 MiB) untouched, [1, 33) MiB pre-boot pattern written by the host,
    [33, 49) MiB the guest's own slots, [49, 57) MiB must read as zeros, the rest untouched.
    """

    seed: int = 20261128
    disk_size: int = 64 * MIB
    preboot_kib: tuple[int, int] = (1024, 32768)
    work_kib: tuple[int, int] = (33792, 16384)
    zero_kib: tuple[int, int] = (50176, 8192)
    writes_per_pass: int = 32
    preboot_per_pass_kib: int = 4096
    pause_ms: int = 200

    def kernel_args(self) -> str:
        return " ".join(
            [
                "console=ttyS0",
                "quiet",
                "loglevel=3",
                "panic=-1",
                f"pgw.seed={self.seed}",
                f"pgw.pre={self.preboot_kib[0]}:{self.preboot_kib[1]}",
                f"pgw.work={self.work_kib[0]}:{self.work_kib[1]}",
                f"pgw.zero={self.zero_kib[0]}:{self.zero_kib[1]}",
                f"pgw.wpp={self.writes_per_pass}",
                f"pgw.vpp={self.preboot_per_pass_kib}",
                f"pgw.pause={self.pause_ms}",
            ]
        )

    def preboot_byte_range(self) -> tuple[int, int]:
        return self.preboot_kib[0] * 1024, self.preboot_kib[1] * 1024


def prepare_disk_image(path: Path, layout: GuestLayout, boot_files: GuestBootFiles) -> None:
    """Create a sparse raw image of `layout.disk_size` holding the seeded pre-boot pattern."""
    with open(path, "wb") as image:
        image.truncate(layout.disk_size)
    start, length = layout.preboot_byte_range()
    tool = str(boot_files.workload_tool)
    fill = [tool, "fill", str(path), str(layout.seed), str(start), str(length)]
    subprocess.run(fill, check=True, timeout=60)


def splitmix64(value: int) -> int:
    """The workload's pattern function, written again here to check the C recipe independently."""
    mask = (1 << 64) - 1
    z = (value + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def expected_preboot_bytes(seed: int, offset: int, length: int) -> bytes:
    """The pre-boot pattern's bytes at [offset, offset+length), both multiples of 8."""
    return b"".join(
        splitmix64(seed + o).to_bytes(8, "little") for o in range(offset, offset + length, 8)
    )


@dataclass
class Marker:
    pass_number: int
    ok: bool
    detail: str
    seen_at: float  # time.monotonic() when this helper first read it


@dataclass
class ConsoleLog:
    """A console log file that QEMU (or xenconsoled, or libvirt's QEMU) appends to, read
    incrementally for the workload's PASS markers: each `read_markers()` parses only the lines
    completed since the last call (a partial last line waits for its end)."""

    path: Path
    _read_offset: int = 0
    _partial: bytes = b""

    def read_markers(self, now: float | None = None) -> list[Marker]:
        """The markers of the lines added since the last call (none while the file does not
        exist), stamped `now` (default: time.monotonic())."""
        try:
            with open(self.path, "rb") as log:
                log.seek(self._read_offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._read_offset += len(data)
        seen_at = time.monotonic() if now is None else now
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            match = MARKER_RE.search(line.decode(errors="replace"))
            if match:
                number, ok, detail = int(match.group(1)), match.group(2) == "OK", match.group(3)
                new.append(Marker(number, ok, detail.strip(), seen_at))
        return new


@dataclass
class QemuGuest:
    """A running QEMU process with the test guest; see `run_qemu_guest`."""

    name: str
    process: subprocess.Popen[bytes]
    qmp_socket: Path
    serial_log: Path
    stderr_log: Path
    started_at: float
    markers: list[Marker] = field(default_factory=list)
    _console: ConsoleLog = field(init=False)

    def __post_init__(self) -> None:
        self._console = ConsoleLog(self.serial_log)

    def poll_serial(self) -> list[Marker]:
        """Read new console output; return the markers it added."""
        new = self._console.read_markers()
        self.markers.extend(new)
        return new

    def console_tail(self, size: int = 3000) -> str:
        try:
            data = self.serial_log.read_bytes()[-size:]
        except FileNotFoundError:
            data = b""
        try:
            err = self.stderr_log.read_bytes()[-1000:]
        except FileNotFoundError:
            err = b""
        return (
            f"--- {self.name} console tail ---\n{data.decode(errors='replace')}\n"
            f"--- {self.name} qemu stderr ---\n{err.decode(errors='replace')}"
        )

    def failures(self) -> list[Marker]:
        self.poll_serial()
        return [m for m in self.markers if not m.ok]

    def wait_for_marker(
        self, timeout: float, ok: bool | None = True, min_pass: int = 0, after: float = 0.0
    ) -> Marker:
        """Wait for a PASS marker with number >= min_pass, seen after `after` (monotonic),
        and OK (ok=True), FAIL (ok=False) or either (None).  Fails with the console's tail."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll_serial()
            for marker in self.markers:
                if (
                    marker.pass_number >= min_pass
                    and marker.seen_at >= after
                    and (ok is None or marker.ok == ok)
                ):
                    return marker
            if self.process.poll() is not None:
                raise GuestError(
                    f"{self.name}: QEMU exited ({self.process.returncode}) while waiting for a "
                    f"marker\n{self.console_tail()}"
                )
            if time.monotonic() > deadline:
                raise GuestError(
                    f"{self.name}: no {'OK' if ok else 'FAIL' if ok is False else ''} marker "
                    f"(pass >= {min_pass}) within {timeout} s\n{self.console_tail()}"
                )
            time.sleep(POLL_SECONDS)

    def wait_for_passes(self, count: int, timeout: float, after: float = 0.0) -> list[Marker]:
        """Wait until `count` markers (OK or FAIL) were seen after `after`; return them."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll_serial()
            seen = [m for m in self.markers if m.seen_at >= after]
            if len(seen) >= count:
                return seen
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise GuestError(
                    f"{self.name}: {len(seen)} of {count} markers within {timeout} s "
                    f"(QEMU {'exited' if self.process.poll() is not None else 'running'})\n"
                    f"{self.console_tail()}"
                )
            time.sleep(POLL_SECONDS)


def _blockdev_args(disk: Path | str) -> list[str]:
    """QEMU arguments for a raw disk node named `vda` on a file or an NBD URI."""
    if isinstance(disk, Path):
        protocol = f"driver=file,node-name=proto0,filename={disk}"
    else:
        uri = urllib.parse.urlsplit(disk)
        export = urllib.parse.unquote(uri.path.lstrip("/"))
        if uri.scheme == "nbd+unix":
            socket = urllib.parse.parse_qs(uri.query)["socket"][0]
            protocol = f"driver=nbd,node-name=proto0,server.type=unix,server.path={socket}"
        elif uri.scheme == "nbd":
            protocol = (
                f"driver=nbd,node-name=proto0,server.type=inet,"
                f"server.host={uri.hostname},server.port={uri.port or 10809}"
            )
        else:
            raise ValueError(f"unsupported disk URI {disk}")
        if export:
            protocol += f",export={export}"
    return ["-blockdev", protocol, "-blockdev", "driver=raw,node-name=vda,file=proto0"]


def qemu_command(
    boot_files: GuestBootFiles,
    layout: GuestLayout,
    disk: Path | str,
    qmp_socket: Path,
    serial_log: Path,
    incoming: bool = False,
    memory_mib: int = 128,
    extra_args: Sequence[str] = (),
) -> list[str]:
    # Pinning the geometry spares QEMU's guess, which reads sector 0 when the device is made.
    sectors = layout.disk_size // 512
    heads, secs = 16, 63
    cyls = max(1, min(sectors // (heads * secs), 16383))
    command = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        str(memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(boot_files.kernel),
        "-initrd",
        str(boot_files.initramfs),
        "-append",
        layout.kernel_args(),
        "-chardev",
        f"file,id=serial0,path={serial_log}",
        "-serial",
        "chardev:serial0",
        "-qmp",
        f"unix:{qmp_socket},server=on,wait=off",
        *_blockdev_args(disk),
        "-device",
        f"virtio-blk-pci,drive=vda,id=vda-dev,cyls={cyls},heads={heads},secs={secs}",
    ]
    if incoming:
        command += ["-incoming", "defer"]
    return [*command, *extra_args]


@contextmanager
def run_qemu_guest(
    boot_files: GuestBootFiles,
    layout: GuestLayout,
    disk: Path | str,
    workdir: Path,
    name: str,
    incoming: bool = False,
    extra_args: Sequence[str] = (),
) -> Iterator[QemuGuest]:
    """Start QEMU with the test guest; yield a `QemuGuest`; terminate QEMU on exit."""
    socket_dir = Path(tempfile.mkdtemp(prefix="pcg-"))
    qmp_socket = socket_dir / f"{name}.qmp"
    serial_log = workdir / f"{name}.serial.log"
    stderr_log = workdir / f"{name}.qemu.stderr"
    command = qemu_command(
        boot_files, layout, disk, qmp_socket, serial_log, incoming, extra_args=extra_args
    )
    process = start_logged(command, stderr_log)
    guest = QemuGuest(
        name=name,
        process=process,
        qmp_socket=qmp_socket,
        serial_log=serial_log,
        stderr_log=stderr_log,
        started_at=time.monotonic(),
    )
    try:
        deadline = time.monotonic() + 10
        while not qmp_socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise GuestError(f"{name}: QEMU did not start\n{guest.console_tail()}")
            time.sleep(POLL_SECONDS)
        yield guest
    finally:
        stop_process(process, timeout=5)
        shutil.rmtree(socket_dir, ignore_errors=True)


def wait_until_exited(guest: QemuGuest, timeout: float) -> int:
    """Wait for QEMU to exit on its own (e.g. after `quit`); return its exit status."""
    try:
        return guest.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"{guest.name}: QEMU still running after {timeout} s") from exc


def kill_now(guest: QemuGuest) -> None:
    """SIGKILL the QEMU process (to simulate a crashed peer) and reap it."""
    if guest.process.poll() is None:
        os.kill(guest.process.pid, 9)
        guest.process.wait(timeout=5)
