"""Boot the nested Xen lab in QEMU/TCG, run commands in dom0 with deadlines, read domU consoles.

How it works: `run_xen_lab` starts `qemu-system-x86_64` (TCG, `-cpu qemu64,+svm,+npt`: without
NPT Xen has no HAP and a PVH domU cannot migrate) with the hypervisor as `-kernel`, dom0's kernel
and initramfs as multiboot modules, and three 9p shares: the cached root file system ("root",
read-only), the cached lab files ("kit", read-only, at /xenlab in dom0) and a per-run control
directory ("ctl", read-write and uncached, at /ctl); optionally a checkout ("project", read-only,
at its own absolute path, so that its venv's `postcopy` runs in dom0).  The serial console (Xen's
and dom0's) goes to `serial.log` in the work directory.

The control channel is the command directory `ctl/cmd` that dom0-init.sh's agent polls: `start`
writes `N.limit` then `N.sh` (atomically, by rename); the agent runs it under `timeout` and writes
`ctl/out/N.out` and, last, `ctl/out/N.rc`.  Every wait here is bounded and fails early with the
console's tail when QEMU exits.  xenconsoled logs each domU's console to `ctl/console/`, so the
host reads the workload's markers straight from the share (`DomuConsole`).  On exit QEMU is
terminated, then killed; nothing of the lab outlives the context.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from postcopy.kit.guestkit.qemu import ConsoleLog, GuestLayout, Marker
from postcopy.kit.processes import start_logged, stop_process
from postcopy.kit.xenlab.build import KIT_DIR, LabFiles

POLL_SECONDS = 0.05
RESULT_GRACE_SECONDS = 15.0  # beyond a command's own limit: the agent polls, 9p is slow under TCG
XEN_ARGS = (
    "dom0_mem={dom0_mib}M,max:{dom0_mib}M dom0_max_vcpus=2 console=com1 com1=115200,8n1 "
    "loglvl=all guest_loglvl=all noreboot"
)
DOM0_ARGS = "console=hvc0 earlyprintk=xen loglevel=5"
DOMU_CONSOLE_ARGS = "console=hvc0"


class LabError(AssertionError):
    """The lab did not do what was asked in time: QEMU exited or did not boot, a dom0 command
    failed or passed its deadline, a marker did not come.  An AssertionError, so that a test
    fails with the message and the logs."""


@dataclass(frozen=True)
class CommandResult:
    script: str
    returncode: int
    output: str
    seconds: float  # host-side, from submission to the exit status appearing


@dataclass
class PendingCommand:
    number: int
    script: str
    limit: float
    submitted_at: float


@dataclass
class DomuConsole:
    """A domU's console as xenconsoled logs it (`guest-NAME.log`, and after an incoming migration
    `guest-NAME--incoming.log`), with the workload's markers and when the host first saw each."""

    directory: Path
    name: str
    markers: list[Marker] = field(default_factory=list)
    _logs: dict[str, ConsoleLog] = field(default_factory=dict)

    def files(self) -> list[Path]:
        return [
            self.directory / f"guest-{self.name}.log",
            self.directory / f"guest-{self.name}--incoming.log",
        ]

    def poll(self) -> list[Marker]:
        new: list[Marker] = []
        now = time.monotonic()
        for path in self.files():
            new += self._logs.setdefault(path.name, ConsoleLog(path)).read_markers(now)
        self.markers.extend(new)
        return new

    def failures(self) -> list[Marker]:
        self.poll()
        return [marker for marker in self.markers if not marker.ok]

    def text(self, size: int = 3000) -> str:
        parts = []
        for path in self.files():
            if path.exists():
                parts.append(f"--- {path.name} ---\n" + path.read_bytes()[-size:].decode("replace"))
        return "\n".join(parts) or f"(no console log for {self.name})"


@dataclass
class XenLab:
    """A running nested Xen (see `run_xen_lab`)."""

    files: LabFiles
    workdir: Path
    process: subprocess.Popen[bytes]
    started_at: float
    boot_seconds: float = 0.0
    _next_command: int = 0

    @property
    def ctl(self) -> Path:
        """The control share on the host; dom0 sees it as /ctl."""
        return self.workdir / "ctl"

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    def dom0_path(self, host_path: Path) -> str:
        """Where dom0 sees a file of the control share."""
        return "/ctl/" + str(host_path.relative_to(self.ctl))

    def console_tail(self, size: int = 4000) -> str:
        try:
            data = self.serial_log.read_bytes()[-size:].decode(errors="replace")
        except FileNotFoundError:
            data = ""
        return f"--- Xen/dom0 serial console tail ---\n{data}"

    def _check_alive(self, doing: str) -> None:
        if self.process.poll() is not None:
            raise LabError(
                f"QEMU exited ({self.process.returncode}) while {doing}\n{self.console_tail()}"
            )

    def wait_ready(self, timeout: float) -> float:
        """Wait for dom0's agent; return seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        while not (self.ctl / "ready").exists():
            self._check_alive("waiting for dom0")
            text = self.console_tail(20000)
            if "XENLAB FATAL" in text or "Kernel panic" in text or "Panic on CPU" in text:
                raise LabError(f"dom0 did not come up\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise LabError(f"dom0 not ready within {timeout:g} s\n{self.console_tail()}")
            time.sleep(0.2)
        self.boot_seconds = time.monotonic() - self.started_at
        return self.boot_seconds

    def start(self, script: str, limit: float) -> PendingCommand:
        """Submit a shell script to dom0's agent; it is killed after `limit` seconds."""
        self._check_alive("submitting a command")
        self._next_command += 1
        number = self._next_command
        commands = self.ctl / "cmd"
        (commands / f"{number}.limit").write_text(f"{int(limit + 0.999)}\n")
        temp = commands / f".{number}.tmp"
        temp.write_text(script)
        temp.rename(commands / f"{number}.sh")
        return PendingCommand(number, script, limit, time.monotonic())

    def result(self, pending: PendingCommand) -> CommandResult | None:
        """The command's result if it has finished, else None."""
        rc_file = self.ctl / "out" / f"{pending.number}.rc"
        if not rc_file.exists():
            return None
        seconds = time.monotonic() - pending.submitted_at
        text = rc_file.read_text().strip()
        output_file = self.ctl / "out" / f"{pending.number}.out"
        output = output_file.read_text(errors="replace") if output_file.exists() else ""
        try:
            returncode = int(text)
        except ValueError as exc:
            raise LabError(f"dom0 command {pending.number}: bad status {text!r}") from exc
        return CommandResult(pending.script, returncode, output, seconds)

    def wait(self, pending: PendingCommand, check: bool = True) -> CommandResult:
        """Wait for a submitted command (its limit plus a grace period); with `check`, a nonzero
        status (124: the deadline killed it) raises LabError with its output."""
        deadline = pending.submitted_at + pending.limit + RESULT_GRACE_SECONDS
        while True:
            done = self.result(pending)
            if done is not None:
                break
            self._check_alive(f"running dom0 command {pending.number}")
            if time.monotonic() > deadline:
                raise LabError(
                    f"dom0 command {pending.number} gave no status within "
                    f"{pending.limit:g}+{RESULT_GRACE_SECONDS:g} s:\n{pending.script}\n"
                    f"{self.console_tail()}"
                )
            time.sleep(POLL_SECONDS)
        if check and done.returncode != 0:
            reason = " (killed at its deadline)" if done.returncode == 124 else ""
            raise LabError(
                f"dom0 command failed with status {done.returncode}{reason}:\n{pending.script}\n"
                f"--- output ---\n{done.output[-3000:]}"
            )
        return done

    def run(self, script: str, timeout: float = 60, check: bool = True) -> CommandResult:
        """Run a shell script in dom0 and wait for it (see `wait`)."""
        return self.wait(self.start(script, timeout), check=check)

    def console(self, name: str) -> DomuConsole:
        return DomuConsole(self.ctl / "console", name)

    def wait_for_marker(
        self, console: DomuConsole, timeout: float, min_pass: int = 0, after: float = 0.0
    ) -> Marker:
        """Wait for a PASS OK marker numbered >= min_pass seen after `after`; any FAIL fails."""
        deadline = time.monotonic() + timeout
        while True:
            console.poll()
            for marker in console.markers:
                if not marker.ok:
                    raise LabError(f"{console.name}: workload FAIL {marker}\n{console.text()}")
                if marker.pass_number >= min_pass and marker.seen_at >= after:
                    return marker
            self._check_alive(f"waiting for {console.name}'s marker")
            if time.monotonic() > deadline:
                raise LabError(
                    f"{console.name}: no PASS OK marker >= {min_pass} within {timeout:g} s\n"
                    f"{console.text()}\n{self.console_tail()}"
                )
            time.sleep(POLL_SECONDS)


def domu_config(
    files: LabFiles,
    name: str,
    disk: str,
    layout: GuestLayout,
    memory_mib: int = 128,
) -> str:
    """An xl config for a PVH test domU; `disk` is one xl disk spec ('phy:/dev/nbd0,xvda,w')."""
    guest_args = layout.kernel_args().replace("console=ttyS0", DOMU_CONSOLE_ARGS)
    kit = "/xenlab"
    return "\n".join(
        [
            f'name = "{name}"',
            'type = "pvh"',
            f'kernel = "{kit}/{files.domu_kernel.name}"',
            f'ramdisk = "{kit}/{files.domu_initramfs.name}"',
            f'extra = "{guest_args} pgw.dev=/dev/xvda"',
            f"memory = {memory_mib}",
            "vcpus = 1",
            'on_crash = "preserve"',
            f"disk = [ '{disk}' ]",
            "",
        ]
    )


def qemu_command(
    files: LabFiles, workdir: Path, memory_mib: int, dom0_mib: int, project: Path | None = None
) -> list[str]:
    xen_args = XEN_ARGS.format(dom0_mib=dom0_mib)
    multiboot_modules = f"{files.dom0_kernel} {DOM0_ARGS.replace(',', ',,')},{files.dom0_initramfs}"

    def share(tag: str, path: Path, readonly: bool) -> list[str]:
        spec = f"local,path={path},mount_tag={tag},security_model=none,id={tag}"
        return ["-virtfs", spec + (",readonly=on" if readonly else "")]

    return [
        "qemu-system-x86_64",
        "-accel", "tcg,thread=multi",
        "-cpu", "qemu64,+svm,+npt",
        "-m", str(memory_mib),
        "-smp", "2",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", f"file,id=serial0,path={workdir / 'serial.log'}",
        "-serial", "chardev:serial0",
        "-kernel", str(files.hypervisor),
        "-append", xen_args,
        "-initrd", multiboot_modules,
        *share("root", files.rootfs, True),
        *share("kit", files.cache_dir, True),
        *share("ctl", workdir / "ctl", False),
        *(share("project", project, True) if project is not None else []),
        "-net", "none",
    ]  # fmt: skip


@contextmanager
def run_xen_lab(
    files: LabFiles,
    workdir: Path,
    boot_timeout: float = 120,
    memory_mib: int = 1536,
    dom0_mib: int = 512,
    project: Path | None = None,
) -> Iterator[XenLab]:
    """Boot the lab and wait for dom0's agent; yield a `XenLab`; kill QEMU on exit.

    With `project` (a checkout whose `.venv` `make venv` built), dom0 mounts it read-only at the
    same absolute path, so its `.venv/bin/postcopy` runs there as on the host: dom0's root file
    system is the same Debian release with the same Python, nbdkit's python plugin and libnbd."""
    ctl = workdir / "ctl"
    for sub in ("cmd", "out", "console"):
        (ctl / sub).mkdir(parents=True, exist_ok=True)
    for script in ("dom0-init.sh", "ssh-localhost.sh"):
        shutil.copy2(KIT_DIR / script, ctl / script)
        (ctl / script).chmod(0o755)
    if project is not None:
        project = project.resolve()
        (ctl / "project-path").write_text(f"{project}\n")
    command = qemu_command(files, workdir, memory_mib, dom0_mib, project)
    (workdir / "qemu.cmdline").write_text(" ".join(command) + "\n")
    process = start_logged(command, workdir / "qemu.stderr")
    lab = XenLab(files=files, workdir=workdir, process=process, started_at=time.monotonic())
    try:
        lab.wait_ready(boot_timeout)
        yield lab
    finally:
        stop_process(process, kill_timeout=10)
