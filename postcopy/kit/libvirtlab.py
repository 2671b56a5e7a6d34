"""Two real libvirtd "hosts" on this one machine, for tests of libvirt migrations (needs root).

How it works: `open_libvirt_hosts(workdir)` takes Host A and Host B from `postcopy.kit.netns` (two
network namespaces joined by a veth pair, link-local addresses, loopback up) and starts one real
libvirtd in each, no systemd.  Each daemon is launched as

    ip netns exec NS unshare --mount --uts --propagation private /bin/sh WORKDIR/host-X/start.sh

and the script, now in a private mount namespace and UTS namespace, mounts a tmpfs over each of
`LIBVIRT_DIRS` (so the two daemons share no state and nothing lands on the machine's own
/etc/libvirt or /var/lib/libvirt), bind-mounts the host's own `images/` directory onto
/var/lib/libvirt/images (the same path is then a different file on each host, which storage
copies need) and its `qemu-logs/` onto /var/log/libvirt/qemu (kept for diagnosis), writes
qemu.conf and libvirtd.conf (root QEMU, no security driver, no cgroups, a distinct `host_uuid`,
`migration_host` = the host's address, TCP without authentication on that address only: the
address exists only inside the lab's namespaces), bind-mounts a hosts file naming both hosts,
sets the host name, and execs `libvirtd --listen`.  ip, unshare and sh all exec, so the launched
process *is* the daemon.  The daemon answers `qemu+tcp://ADDRESS/system`; python3-libvirt
connects from the caller's process with `LibvirtHost.connect()`, which opens the socket with the
calling thread moved into the host's network namespace for the moment of the connect (a socket
stays in the namespace it was made in).  `LibvirtHost.command(argv)` runs a command inside the
host's namespaces through nsenter (absolute paths: nsenter starts in /).  `stop_daemon` stops
one host's libvirtd (a host whose daemon died) and `start_daemon` starts a fresh one.

Clean-up, on every exit (errors and Ctrl-C included): the lab's connections are closed, then every
process inside either network namespace (the daemons, their QEMUs, anything run with `command`)
gets SIGTERM, then SIGKILL, with bounded waits; the private mount namespaces die with their last
process, taking the tmpfs mounts with them; `open_two_hosts` then removes the network namespaces.
A process that survives all that is an error (`LibvirtLabError`).  The files under `workdir`
(configs, daemon logs, QEMU logs, images) belong to the caller.

A fresh libvirtd probes QEMU for ~4 s before its first domain can start.  Given a
`capabilities_cache` directory, the lab copies the probe results out of the daemons' tmpfs at
the end and into the next lab's fresh caches at the start; libvirt checks each entry against
QEMU, itself and the kernel and probes again when it is stale.

Machine set-up, idempotent (what Debian's libvirt-daemon-system would do, which we do not
install): the `libvirt-qemu` user the QEMU driver insists on, and the empty mount points of
`LIBVIRT_DIRS`.

`guest_domain_xml` describes the project's TCG test guest (postcopy.kit.guestkit) as a libvirt
domain; `GuestConsole` reads its serial log (one file both QEMUs append to, so it reads straight
across a migration) and waits for the workload's PASS lines with the guest kit's parser.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.guestkit.qemu import ConsoleLog, GuestError, GuestLayout, Marker
from postcopy.kit.netns import TestHost, open_two_hosts
from postcopy.kit.processes import start_logged

# The daemon's state directories; each host gets a tmpfs over every one of them.
LIBVIRT_DIRS = (
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/cache/libvirt",
    "/var/log/libvirt",
)
IMAGES_INSIDE = Path("/var/lib/libvirt/images")  # the host's own images/ directory, inside it
CAPABILITIES_INSIDE = Path("/var/cache/libvirt/qemu/capabilities")  # the QEMU driver's probe cache
QEMU_USER = "libvirt-qemu"
START_TIMEOUT = 20.0  # seconds for both daemons to answer (they need ~0.5 s on an idle machine)
STOP_TIMEOUT = 5.0  # seconds for the lab's processes to exit after SIGTERM, then after SIGKILL
POLL_SECONDS = 0.05
CLONE_NEWNET = 0x40000000


class LibvirtLabError(RuntimeError):
    """The lab could not be built or torn down, or a command in a host failed; the message is
    one line and names the log where there is one."""


@dataclass
class LibvirtHost:
    """One libvirtd "host": its namespaces, its daemon, its files."""

    name: str  # "A" or "B"
    network: TestHost  # the network namespace, the veth end and its address
    directory: Path  # WORKDIR/host-a: configs, logs, images
    host_uuid: str
    capabilities_cache: Path | None = None  # QEMU probe results kept between labs
    process: subprocess.Popen[bytes] | None = None
    _connections: list[Any] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.network.address

    @property
    def uri(self) -> str:
        """The libvirt URI of this host's daemon (reachable from inside the lab's namespaces)."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def migration_uri(self) -> str:
        """Where QEMU's migration stream goes to reach this host."""
        return f"tcp://{self.address}"

    @property
    def hostname(self) -> str:
        return f"libvirtlab-{self.name.lower()}"

    @property
    def images(self) -> Path:
        """The host's own images directory, as the caller sees it (IMAGES_INSIDE in the host)."""
        return self.directory / "images"

    @property
    def daemon_log(self) -> Path:
        return self.directory / "libvirtd.log"

    @property
    def qemu_logs(self) -> Path:
        """libvirt's per-domain QEMU logs (/var/log/libvirt/qemu inside the host)."""
        return self.directory / "qemu-logs"

    @property
    def pid(self) -> int:
        if self.process is None or self.process.poll() is not None:
            raise LibvirtLabError(f"host {self.name}: libvirtd is not running")
        return self.process.pid

    def command(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` inside this host's network, mount and UTS namespaces."""
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "-u", "--", *argv]

    def run(
        self, argv: Sequence[str], timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the host; its output is captured as text.  With `check`, a
        non-zero exit is a LibvirtLabError that carries the command's last line of stderr."""
        done = subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["(no stderr)"]
            raise LibvirtLabError(
                f"host {self.name}: {shlex.join(argv)} exited with status {done.returncode}: "
                f"{lines[-1]}"
            )
        return done

    def connect(self) -> Any:
        """A python3-libvirt connection (`libvirt.virConnect`) to this host's daemon; the lab
        closes it on exit."""
        import libvirt

        with _in_network_namespace(self.network.namespace):
            connection = libvirt.open(self.uri)
        self._connections.append(connection)
        return connection

    def close_connections(self) -> None:
        while self._connections:
            with contextlib.suppress(Exception):
                self._connections.pop().close()

    def stop_daemon(self) -> None:
        """Stop this host's libvirtd (SIGTERM, then SIGKILL), as a host whose daemon died; the
        connections made with `connect` stay open (and broken), as a caller's would.  Whatever
        else runs in the host (QEMUs, commands) is left alone, and the host's mount namespace
        lives on while such a process holds it.  `start_daemon` starts a fresh one."""
        if self.process is None or self.process.poll() is not None:
            return
        _keep_capabilities(self)
        for stop in (self.process.terminate, self.process.kill):
            stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT)
                return
        raise LibvirtLabError(f"libvirtd of host {self.name} survived SIGKILL")

    def start_daemon(self, timeout: float = START_TIMEOUT) -> None:
        """Start this host's libvirtd again after `stop_daemon`: a new mount namespace with
        fresh tmpfs state (no domains), the same configuration, address and host UUID."""
        if self.process is not None and self.process.poll() is None:
            raise LibvirtLabError(f"libvirtd of host {self.name} is running already")
        script = self.directory / "start.sh"
        script.write_text(_start_script(self))
        _start_daemon(self, script)
        _wait_until_answering([self], timeout)


@dataclass(frozen=True)
class LibvirtLab:
    host_a: LibvirtHost
    host_b: LibvirtHost

    @property
    def hosts(self) -> tuple[LibvirtHost, LibvirtHost]:
        return self.host_a, self.host_b


####################################################################################################
# Network namespace of the calling thread


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


@contextmanager
def _in_network_namespace(namespace: str) -> Iterator[None]:
    """Move the calling thread (only it: setns is per thread) into `namespace`, and back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


####################################################################################################
# Machine set-up and the per-host files


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def prepare_machine() -> None:
    """Create, if missing, the `libvirt-qemu` user and the mount points of LIBVIRT_DIRS."""
    if not _user_exists(QEMU_USER):
        command = [
            "useradd", "--system", "--user-group", "--no-create-home",
            "--home-dir", "/var/lib/libvirt", "--shell", "/usr/sbin/nologin", QEMU_USER,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if done.returncode != 0 and done.returncode != 9:  # 9: made meanwhile by another lab
            raise LibvirtLabError(f"useradd {QEMU_USER} failed: {done.stderr.strip()}")
    for directory in LIBVIRT_DIRS:
        os.makedirs(directory, mode=0o755, exist_ok=True)


def _libvirtd_conf(host: LibvirtHost) -> str:
    return "".join(
        f"{key} = {value}\n"
        for key, value in [
            ("listen_tls", "0"),
            ("listen_tcp", "1"),
            ("listen_addr", f'"{host.address}"'),
            ("auth_tcp", '"none"'),
            ("auth_unix_rw", '"none"'),
            ("auth_unix_ro", '"none"'),
            ("host_uuid", f'"{host.host_uuid}"'),
            ("log_outputs", f'"3:file:{host.daemon_log}"'),
        ]
    )


def _qemu_conf(host: LibvirtHost) -> str:
    return "".join(
        f"{key} = {value}\n"
        for key, value in [
            ("user", '"root"'),
            ("group", '"root"'),
            ("security_driver", '"none"'),
            ("cgroup_controllers", "[ ]"),
            ("stdio_handler", '"file"'),
            ("migration_address", f'"{host.address}"'),
            ("migration_host", f'"{host.address}"'),
        ]
    )


def _start_script(host: LibvirtHost) -> str:
    q = shlex.quote
    d = host.directory
    lines = [
        "set -eu",
        *(f"mount -t tmpfs -o mode=0755 libvirtlab {q(path)}" for path in LIBVIRT_DIRS),
        f"mkdir {IMAGES_INSIDE} /var/log/libvirt/qemu",
        f"mount --bind {q(str(host.images))} {IMAGES_INSIDE}",
        f"mount --bind {q(str(host.qemu_logs))} /var/log/libvirt/qemu",
        f"cp {q(str(d / 'libvirtd.conf'))} {q(str(d / 'qemu.conf'))} /etc/libvirt/",
        f"mount --bind {q(str(d / 'hosts'))} /etc/hosts",
        *_seed_capabilities_lines(host),
        f"hostname {q(host.hostname)}",
        # The default pid file lies outside the tmpfs mounts: two daemons would fight over it.
        "exec libvirtd --listen --pid-file /run/libvirt/libvirtd.pid",
    ]
    return "\n".join(lines) + "\n"


def _seed_capabilities_lines(host: LibvirtHost) -> list[str]:
    """Script lines that copy kept QEMU probe results into the host's fresh cache, sparing its
    first domain start the ~4 s probe.  libvirt checks every entry (QEMU's and its own ctime,
    the kernel, the microcode, ...) and probes again when one is stale, so an old file costs
    only the probe it was meant to save."""
    cache = host.capabilities_cache
    if cache is None or not any(cache.glob("*.xml")):
        return []
    q = shlex.quote
    return [f"mkdir -p {CAPABILITIES_INSIDE}", f"cp {q(str(cache))}/*.xml {CAPABILITIES_INSIDE}/"]


def _keep_capabilities(host: LibvirtHost) -> None:
    """Copy the daemon's QEMU probe results out of its tmpfs (reached through /proc/PID/root)
    into `capabilities_cache`, each file atomically, for the next lab."""
    cache = host.capabilities_cache
    if cache is None or host.process is None or host.process.poll() is not None:
        return
    inside = Path(f"/proc/{host.process.pid}/root") / CAPABILITIES_INSIDE.relative_to("/")
    with contextlib.suppress(OSError):  # a cache that cannot be kept only costs time
        cache.mkdir(parents=True, exist_ok=True)
        for entry in inside.glob("*.xml"):
            partial = cache / f".{entry.name}.{os.getpid()}"
            shutil.copyfile(entry, partial)
            os.replace(partial, cache / entry.name)


def _write_host_files(host: LibvirtHost, hosts_file: str) -> Path:
    host.directory.mkdir(parents=True, exist_ok=True)
    host.images.mkdir(exist_ok=True)
    host.qemu_logs.mkdir(exist_ok=True)
    (host.directory / "libvirtd.conf").write_text(_libvirtd_conf(host))
    (host.directory / "qemu.conf").write_text(_qemu_conf(host))
    (host.directory / "hosts").write_text(hosts_file)
    script = host.directory / "start.sh"
    script.write_text(_start_script(host))
    return script


####################################################################################################
# Start and stop


def _log_hint(host: LibvirtHost) -> str:
    return f"its log: {host.daemon_log} (stderr: {host.directory / 'libvirtd.stderr'})"


def _last_words(host: LibvirtHost) -> str:
    """The last line the daemon wrote to its log, else to its stderr, as ' (LINE)'."""
    for path in (host.daemon_log, host.directory / "libvirtd.stderr"):
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            continue
        if lines:
            return f" ({lines[-1].strip()})"
    return ""


def _start_daemon(host: LibvirtHost, script: Path) -> None:
    command = [
        "ip", "netns", "exec", host.network.namespace,
        "unshare", "--mount", "--uts", "--propagation", "private", "/bin/sh", str(script),
    ]  # fmt: skip
    host.process = start_logged(command, host.directory / "libvirtd.stderr")


def _wait_until_answering(hosts: Sequence[LibvirtHost], timeout: float) -> None:
    import libvirt

    deadline = time.monotonic() + timeout
    waiting = list(hosts)
    while waiting:
        host = waiting[0]
        assert host.process is not None
        status = host.process.poll()
        if status is not None:
            raise LibvirtLabError(
                f"libvirtd of host {host.name} exited with status {status} before answering"
                f"{_last_words(host)}; {_log_hint(host)}"
            )
        try:
            host.connect()
            waiting.pop(0)
            continue
        except libvirt.libvirtError:
            pass
        if time.monotonic() > deadline:
            raise LibvirtLabError(
                f"libvirtd of host {host.name} not answering on {host.uri} within {timeout} s; "
                f"{_log_hint(host)}"
            )
        time.sleep(POLL_SECONDS)


def _namespace_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def processes_in_network_namespace(namespace: str) -> list[int]:
    """The pids of every process inside the named network namespace."""
    wanted = _namespace_inode(f"/run/netns/{namespace}")
    if wanted is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _namespace_inode(f"/proc/{entry}/ns/net") == wanted:
            pids.append(int(entry))
    return pids


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def process_identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time) of a live process, so that a recycled pid is not taken for it; None
    for a process that is gone or a zombie (dead, waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else (pid, fields[19])


def _stop_everything(hosts: Sequence[LibvirtHost]) -> None:
    """SIGTERM, then SIGKILL, every process in the lab's network namespaces; reap the daemons;
    then wait until each of them has finished exiting (a dying process leaves its namespaces
    before it lets go of its memory and files).  The network namespaces are pinned by their
    /run/netns files until open_two_hosts removes them, so a namespace seen here cannot be a
    recycled one holding someone else's processes."""
    namespaces = [host.network.namespace for host in hosts]
    seen: set[tuple[int, str]] = set()
    for signum in (signal.SIGTERM, signal.SIGKILL):
        signalled: set[int] = set()
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:
            for host in hosts:
                if host.process is not None:
                    host.process.poll()  # reap the daemon, so that it stops being listed
            pids = [pid for ns in namespaces for pid in processes_in_network_namespace(ns)]
            seen.update(ident for pid in pids if (ident := process_identity(pid)) is not None)
            if not pids or time.monotonic() > deadline:
                break
            _signal_all([pid for pid in pids if pid not in signalled], signum)
            signalled.update(pids)
            time.sleep(POLL_SECONDS)
        if not pids:
            break
    else:
        raise LibvirtLabError(f"processes of the libvirt lab survived SIGKILL: {sorted(pids)}")
    deadline = time.monotonic() + STOP_TIMEOUT
    while exiting := [pid for pid, start in seen if process_identity(pid) == (pid, start)]:
        if time.monotonic() > deadline:
            raise LibvirtLabError(
                f"processes of the libvirt lab still exiting after {STOP_TIMEOUT} s: {exiting}"
            )
        time.sleep(POLL_SECONDS)


@contextmanager
def open_libvirt_hosts(
    workdir: Path,
    *,
    start_timeout: float = START_TIMEOUT,
    capabilities_cache: Path | None = None,
) -> Iterator[LibvirtLab]:
    """Build Host A and Host B, each with a running libvirtd; tear both down on exit.

    `workdir` receives host-a/ and host-b/ (configs, daemon logs, QEMU logs, images/), which
    stay for the caller.  `capabilities_cache`, if given, is a directory where the daemons'
    QEMU probe results are kept between labs (read at start, written at the end).  Raises
    LibvirtLabError (one line, naming the log) when a daemon does not answer within
    `start_timeout` seconds."""
    if os.geteuid() != 0:
        raise LibvirtLabError("the libvirt lab needs root (namespaces, mounts, libvirtd)")
    if shutil.which("libvirtd") is None:
        raise LibvirtLabError("libvirtd not found: install libvirt-daemon and "
                              "libvirt-daemon-driver-qemu (make system-deps)")  # fmt: skip
    try:
        import libvirt
    except ImportError as exc:
        raise LibvirtLabError("python3-libvirt is not importable (install python3-libvirt; "
                              "the venv needs --system-site-packages)") from exc  # fmt: skip
    # libvirt prints every error to stderr by default; the lab reports its own.
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    prepare_machine()
    with open_two_hosts(prefix="pclv") as two:
        hosts = [
            LibvirtHost(
                name,
                network,
                workdir / f"host-{name.lower()}",
                str(uuid.uuid4()),
                capabilities_cache,
            )  # fmt: skip
            for name, network in (("A", two.host_a), ("B", two.host_b))
        ]
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{host.address} {host.hostname}\n" for host in hosts
        )
        try:
            for host in hosts:
                _start_daemon(host, _write_host_files(host, hosts_file))
            _wait_until_answering(hosts, start_timeout)
            yield LibvirtLab(hosts[0], hosts[1])
        finally:
            for host in hosts:
                host.close_connections()
                _keep_capabilities(host)
            _stop_everything(hosts)


####################################################################################################
# The test guest as a libvirt domain, and its console


def guest_domain_xml(
    name: str,
    boot_files: GuestBootFiles,
    layout: GuestLayout,
    disk: Path,
    serial_log: Path,
    memory_mib: int = 128,
) -> str:
    """The test guest as a `<domain type='qemu'>` (TCG): q35, direct kernel boot with the
    workload's parameters on the command line, `disk` (a path as the host sees it) as a raw
    virtio disk, the serial console appended to `serial_log`, no balloon, no USB, no network.
    The disk's geometry is pinned, as in guestkit.qemu, so QEMU does not read sector 0 to guess."""
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(domain, "vcpu").text = "1"
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_element, "kernel").text = str(boot_files.kernel)
    ET.SubElement(os_element, "initrd").text = str(boot_files.initramfs)
    ET.SubElement(os_element, "cmdline").text = layout.kernel_args()
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "destroy"  # the guest panics with panic=-1
    ET.SubElement(domain, "on_crash").text = "destroy"
    devices = ET.SubElement(domain, "devices")
    disk_element = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk_element, "driver", name="qemu", type="raw")
    ET.SubElement(disk_element, "source", file=str(disk))
    ET.SubElement(disk_element, "target", dev="vda", bus="virtio")
    sectors = layout.disk_size // 512
    heads, secs = 16, 63
    cyls = max(1, min(sectors // (heads * secs), 16383))
    ET.SubElement(disk_element, "geometry", cyls=str(cyls), heads=str(heads), secs=str(secs))
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(serial_log), append="on")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


@dataclass
class GuestConsole:
    """The test guest's serial log, read incrementally for the workload's PASS lines.

    `alive` (optional) says whether the guest still runs somewhere; a wait fails early when it
    returns False.  Markers keep the monotonic time they were first read."""

    name: str
    serial_log: Path
    alive: Callable[[], bool] | None = None
    markers: list[Marker] = field(default_factory=list)
    _console: ConsoleLog = field(init=False)

    def __post_init__(self) -> None:
        self._console = ConsoleLog(self.serial_log)

    def poll(self) -> list[Marker]:
        """Read new console output; return the markers it added."""
        new = self._console.read_markers()
        self.markers.extend(new)
        return new

    def failures(self) -> list[Marker]:
        self.poll()
        return [marker for marker in self.markers if not marker.ok]

    def tail(self, size: int = 2000) -> str:
        try:
            data = self.serial_log.read_bytes()[-size:]
        except FileNotFoundError:
            data = b""
        return f"--- {self.name} console tail ---\n{data.decode(errors='replace')}"

    def last_pass(self) -> int:
        """The highest pass number in the log so far (0 before the first)."""
        self.poll()
        return max((marker.pass_number for marker in self.markers), default=0)

    def wait_for_pass(self, pass_number: int, timeout: float) -> Marker:
        """Wait for the marker of pass `pass_number` or a later one (OK or FAIL); return it.
        Pass numbers go on across a migration, so a pass later than every one logged when the
        migration returned was run on the destination.  Fails (GuestError, with the console's
        tail) on timeout or when the guest stops."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            for marker in self.markers:
                if marker.pass_number >= pass_number:
                    return marker
            stopped = self.alive is not None and not self.alive()
            if stopped or time.monotonic() > deadline:
                raise GuestError(
                    f"{self.name}: no pass {pass_number} within {timeout} s (last: "
                    f"{self.last_pass()}; {'guest stopped' if stopped else 'guest running'})\n"
                    f"{self.tail()}"
                )
            time.sleep(POLL_SECONDS)
