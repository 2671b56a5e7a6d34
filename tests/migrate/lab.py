"""Two test hosts for `postcopy migrate`: network namespaces, a guest on A, an ssh-like wrapper.

`open_lab()` makes Host A and Host B (`postcopy.kit.netns`, a shaped veth between them) and a
wrapper script that behaves like `ssh HOST COMMAND` but runs COMMAND in B's namespace (what
`--ssh` is given).  Both hosts share this machine's filesystem, so each host's paths live in
their own directories (`a/`, `b/`), and Unix sockets in a short private directory.

`Lab.domain(name)` writes a domain: A's image with the guest's seeded pattern, the policy file
(postcopy mode, B's state root and socket dir), and B's QEMU command line (the same guest on B's
file, B's serial log).  `Lab.start_guest_a` boots the guest in A's namespace (so its memory
stream crosses the veth); `Lab.migrate` runs `postcopy migrate --json` in A's namespace and
reads its events on a thread.  `processes_of` lists the processes whose command line mentions
a path of the domain (what must be gone after a migration).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from postcopy.integrations.qmp import open_qmp
from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.guestkit.qemu import GuestLayout, QemuGuest, prepare_disk_image, qemu_command
from postcopy.kit.netns import TwoHosts, open_two_hosts

LINK_RATE = 1_000_000_000  # 1 Gbit/s between the hosts, both directions
BOOT_TIMEOUT = 60.0


class PidProcess:
    """Enough of Popen for `QemuGuest` to watch a process this test did not start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            state = "Z"
        if state == "Z":
            self.returncode = -1
        return self.returncode


@dataclass
class Domain:
    name: str
    policy: Path
    image_a: Path
    dest_b: Path
    dest_args: Path
    serial_b: Path
    qmp_a: Path
    qmp_b: Path
    state_dir_b: Path  # <state_root>/<domain>/vda
    migration_dir_b: Path
    record_dir_a: Path
    socket_b: Path


@dataclass
class Migration:
    process: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    _queue: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)
    stderr_log: Path | None = None

    def wait_event(self, event: str, state: str, timeout: float = 90.0) -> dict[str, Any]:
        """The first event of that step and state (waiting for it)."""
        return self.wait_for(
            lambda e: e.get("event") == event and e.get("state") == state, timeout, event
        )

    def wait_for(
        self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 90.0, what: str = "?"
    ) -> dict[str, Any]:
        """The first event `wanted` accepts, seen or to come within `timeout` seconds."""
        for seen in self.events:
            if wanted(seen):
                return seen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                break
            self.events.append(item)
            if wanted(item):
                return item
        raise AssertionError(f"no {what} event; saw {self.events}\n{self.stderr()}")

    def finish(self, timeout: float = 120.0) -> int:
        code = self.process.wait(timeout=timeout)
        while True:
            try:
                item = self._queue.get(timeout=2)
            except queue.Empty:
                break
            if item is None:
                break
            self.events.append(item)
        return code

    def stderr(self) -> str:
        if self.stderr_log is None or not self.stderr_log.exists():
            return ""
        return self.stderr_log.read_text(errors="replace")[-4000:]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


@dataclass
class Lab:
    hosts: TwoHosts
    root: Path
    sockets: Path
    ssh: Path
    boot_files: GuestBootFiles
    layout: GuestLayout

    def domain(self, name: str, bandwidth: str | None = None) -> Domain:
        a, b = self.root / "a" / name, self.root / "b" / name
        for directory in (a, b / "disks"):
            directory.mkdir(parents=True)
        image = a / "disk.img"
        prepare_disk_image(image, self.layout, self.boot_files)
        dest = b / "disks" / "disk.img"
        policy = a / "domains.toml"
        cap = f'bandwidth = "{bandwidth}"\n' if bandwidth else ""
        policy.write_text(
            f'[defaults]\nstate_root = "{b / "state"}"\nsocket_dir = "{self.sockets}"\n'
            f'[domains.{name}]\nmode = "postcopy"\n{cap}'
            f'[[domains.{name}.disks]]\ndevice = "vda"\nsource_image = "{image}"\n'
            f'dest_file = "{dest}"\n'
        )
        serial_b = b / "serial.log"
        args = qemu_command(
            self.boot_files, self.layout, dest, self.sockets / "unused.qmp", serial_b
        )
        dest_args = a / "dest.args"
        dest_args.write_text("".join(arg + "\n" for arg in args))
        return Domain(
            name=name, policy=policy, image_a=image, dest_b=dest, dest_args=dest_args,
            serial_b=serial_b, qmp_a=self.sockets / f"{name}-a.qmp",
            qmp_b=self.sockets / f"{name}.qmp", state_dir_b=b / "state" / name / "vda",
            migration_dir_b=b / "state" / name, record_dir_a=a / "records",
            socket_b=self.sockets / f"{name}-vda.sock",
        )  # fmt: skip

    @contextmanager
    def guest_on_a(self, domain: Domain) -> Iterator[QemuGuest]:
        serial = domain.image_a.parent / "serial.log"
        stderr_log = domain.image_a.parent / "qemu.stderr"
        command = qemu_command(self.boot_files, self.layout, domain.image_a, domain.qmp_a, serial)
        with open(stderr_log, "wb") as err:
            process = subprocess.Popen(
                self.hosts.host_a.command(command),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        guest = QemuGuest(
            f"{domain.name}-A", process, domain.qmp_a, serial, stderr_log, time.monotonic()
        )
        try:
            deadline = time.monotonic() + 20
            while not domain.qmp_a.exists():
                assert process.poll() is None and time.monotonic() < deadline, guest.console_tail()
                time.sleep(0.02)
            yield guest
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)

    def guest_on_b(self, domain: Domain, pid: int) -> QemuGuest:
        return QemuGuest(
            f"{domain.name}-B",
            PidProcess(pid),  # type: ignore[arg-type]
            domain.qmp_b,
            domain.serial_b,
            domain.serial_b.with_suffix(".none"),
            time.monotonic(),
        )

    def migrate_command(self, domain: Domain, *extra: str) -> list[str]:
        return self.hosts.host_a.command([
            sys.executable, "-m", "postcopy.cli", "migrate", "--config", str(domain.policy),
            "--ssh", str(self.ssh), "--remote-postcopy", f"{sys.executable} -m postcopy.cli",
            "--record-dir", str(domain.record_dir_a), "--json", *extra,
        ])  # fmt: skip

    def start_migration(self, domain: Domain, *extra: str) -> Migration:
        port = str(49152 + int.from_bytes(os.urandom(2), "big") % 1000)
        argv = self.migrate_command(
            domain,
            "--qmp",
            str(domain.qmp_a),
            "--dest-qemu-args",
            str(domain.dest_args),
            "--migrate-port",
            port,
            *extra,
            domain.name,
            self.hosts.host_b.address,
        )
        return self._run(domain, argv)

    def resume(self, domain: Domain) -> Migration:
        return self._run(domain, self.migrate_command(domain, "--resume", domain.name))

    def _run(self, domain: Domain, argv: list[str]) -> Migration:
        log = domain.image_a.parent / f"migrate-{time.monotonic_ns()}.stderr"
        with open(log, "wb") as err:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        migration = Migration(process, stderr_log=log)

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                try:
                    migration._queue.put(json.loads(line))
                except ValueError:
                    migration._queue.put({"event": "garbage", "line": line})
            migration._queue.put(None)

        threading.Thread(target=read, daemon=True).start()
        return migration

    def pki(self) -> tuple[Path, Path]:
        """(A's PKI dir, B's) in libvirt's layout, from a fresh CA; A's certificate names A's
        address on the link (what B connects to)."""
        import trustme

        base = self.root / "pki"
        if not base.exists():
            ca = trustme.CA()
            server = ca.issue_cert(self.hosts.host_a.address)
            client = ca.issue_cert("host-b.test")
            for name in ("a", "b"):
                (base / name).mkdir(parents=True)
                ca.cert_pem.write_to_path(str(base / name / "ca-cert.pem"))
            server.cert_chain_pems[0].write_to_path(str(base / "a" / "server-cert.pem"))
            server.private_key_pem.write_to_path(str(base / "a" / "server-key.pem"))
            client.cert_chain_pems[0].write_to_path(str(base / "b" / "client-cert.pem"))
            client.private_key_pem.write_to_path(str(base / "b" / "client-key.pem"))
        return base / "a", base / "b"

    def logs_of_b(self, domain: Domain) -> str:
        """The tails of B's QEMU log and serial console, for a failure's message."""
        parts = []
        for path in (domain.migration_dir_b / "qemu.log", domain.serial_b):
            try:
                parts.append(f"--- {path} ---\n{path.read_text(errors='replace')[-2000:]}")
            except OSError:
                parts.append(f"--- {path}: none")
        return "\n".join(parts)

    def kill_leftovers(self) -> None:
        """After a failed test: whatever still runs from the lab's paths (a detached serve, a
        receive, a QEMU) is killed, so that nothing outlives the test."""
        for name in (path.name for path in (self.root / "a").iterdir() if path.is_dir()):
            for line in self.processes_of(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(_pid_of(line), signal.SIGKILL)

    def processes_of(self, name: str) -> list[str]:
        """Command lines of live processes that mention a path of domain `name` on a host."""
        found = []
        marks = (
            f"{self.root / 'a' / name}/",
            f"{self.root / 'b' / name}/",
            f"{self.sockets}/{name}",
        )
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if state != "Z" and any(mark in cmdline for mark in marks):
                found.append(f"{entry.name}: {cmdline[:300]}")
        return found


def _pid_of(line: str) -> int:
    return int(line.partition(":")[0])


def qmp(socket: Path, command: str, arguments: dict[str, Any] | None = None) -> Any:
    async def call() -> Any:
        async with open_qmp(socket) as client:
            return await client.execute(command, arguments)

    return trio.run(call)


def kill(pid: int, signum: int = signal.SIGKILL) -> None:
    os.kill(pid, signum)


@contextmanager
def open_lab(boot_files: GuestBootFiles, root: Path) -> Iterator[Lab]:
    sockets = Path(tempfile.mkdtemp(prefix="pcm-"))
    try:
        with open_two_hosts(LINK_RATE, prefix="pcmig") as hosts:
            ssh = root / "ssh-to-b"
            ssh.write_text(
                "#!/bin/sh\n# like `ssh HOST COMMAND`: COMMAND runs in Host B's namespace\n"
                f'shift\nexec ip netns exec {hosts.host_b.namespace} sh -c "$*"\n'
            )
            ssh.chmod(0o755)
            lab = Lab(hosts, root, sockets, ssh, boot_files, GuestLayout())
            try:
                yield lab
            finally:
                lab.kill_leftovers()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
