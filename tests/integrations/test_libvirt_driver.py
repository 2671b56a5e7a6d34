"""The libvirt driver (postcopy/integrations/libvirt_driver.py) between two real libvirtd.

Real peers all the way, in the two-libvirtd lab of postcopy.kit.libvirtlab (one lab for the
module: a fresh libvirtd probes QEMU before its first domain): the TCG test guest defined on A's
libvirtd with a raw file disk, running its self-checking workload; `postcopy serve` on A's image
inside A's namespaces; a real `postcopy receive --wait-for-source` of it inside B's, on a Unix
socket B's QEMU opens.  The test stands in for `postcopy migrate`'s orchestration: it starts and
stops serve and receive (and, after a failure, removes what the receive created, as migrate's
agent does), and gives the driver its switchover hook (`postcopy source-frozen` inside B) and its
check during libvirt's job (the receive still runs).

The main test migrates with the driver, watches the guest pass on B through the drain, pivots
through libvirt's monitor passthrough, stops the receive, persists B's definition on the local
file and boots B's domain again from it; in the same run libvirt's own `virsh migrate
--copy-storage-all` moves a second copy of the same domain between the same daemons, and the
figures of both are printed (never asserted).  The failure tests inject, before the switchover,
a Ctrl-C, a receive killed and B's libvirtd stopped, and check what both hosts hold after each.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
import trio

from postcopy.destination.gate import declare_source_frozen, is_source_frozen
from postcopy.errors import UserError
from postcopy.integrations.libvirt import rewrite_libvirt, rewrite_libvirt_local
from postcopy.integrations.libvirt_driver import (
    LibvirtCallFailed,
    LibvirtMigration,
    LibvirtMonitor,
    MigrationRolledBack,
    PivotTarget,
    destination_xml,
    guest_io_operations,
    persist_local_disks,
    pivot_disks,
    qemu_pid,
)
from postcopy.integrations.qmp import QMPCommandError
from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.guestkit.qemu import GuestLayout, prepare_disk_image
from postcopy.kit.guestkit.scenario import SCENARIO_LAYOUT, same_bytes
from postcopy.kit.libvirtlab import (
    IMAGES_INSIDE,
    GuestConsole,
    LibvirtHost,
    LibvirtLab,
    guest_domain_xml,
    open_libvirt_hosts,
    processes_in_network_namespace,
)
from postcopy.policy import DomainPolicy, parse_config
from tests.guest.fixtures import guest_boot_files_fixture  # noqa: F401  (fixture)

PYTHON = sys.executable  # the venv's interpreter: the same path inside the lab's mount namespaces
BOOT_TIMEOUT = 90.0
PASS_TIMEOUT = 40.0
START_TIMEOUT = 30.0
DRAIN_TIMEOUT = 90.0
ROUNDS_AFTER_PIVOT = 3
SLOW_MIB_PER_S = 8  # caps the failure tests' memory copy, so that libvirt's job lasts a while
DRAIN_CAP = "40M"  # the main test's drain: ~4 s, so that the guest passes meanwhile
# Latency histogram bins (ns) for the pivot's longest I/O stall: 1, 5, 10, 20, 50 ... 1000 ms.
BOUNDARIES_NS = [ms * 1_000_000 for ms in (1, 5, 10, 20, 50, 100, 200, 500, 1000)]
POLL = 0.02


# --- the lab and the processes of postcopy inside it ------------------------------------------


@pytest.fixture(scope="module", name="lab")
def lab_fixture(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LibvirtLab]:
    cache = getattr(pytestconfig, "cache", None)
    capabilities = None if cache is None else cache.mkdir("libvirtlab-qemu-capabilities")
    workdir = tmp_path_factory.mktemp("libvirt-driver-lab")
    _start_event_loop()  # before any connection: those opened later get domain events
    with open_libvirt_hosts(workdir, capabilities_cache=capabilities) as lab:
        yield lab


_EVENT_LOOP: list[threading.Thread] = []


def _start_event_loop() -> None:
    """libvirt's default event loop, in a thread, once per process."""
    if _EVENT_LOOP:
        return
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    thread = threading.Thread(target=run, name="libvirt events", daemon=True)
    thread.start()
    _EVENT_LOOP.append(thread)


@dataclass
class PauseClock:
    """The guest's real pause across a migration, from libvirt's lifecycle events: the domain
    SUSPENDED on A until RESUMED on B, each timed when this process receives it.  (libvirt's
    own downtime figure stops at B's Finish, before A's QEMU is stopped and before a domain
    migrated with VIR_MIGRATE_PAUSED is resumed.)"""

    name: str
    suspended_on_a: float | None = None
    resumed_on_b: float | None = None

    def pause_ms(self) -> float:
        deadline = time.monotonic() + 5  # the events arrive a little after the calls return
        while self.resumed_on_b is None or self.suspended_on_a is None:
            assert time.monotonic() < deadline, f"no lifecycle events: {self}"
            time.sleep(POLL)
        return (self.resumed_on_b - self.suspended_on_a) * 1000


@contextlib.contextmanager
def pause_clock(on_a: Any, on_b: Any, name: str) -> Iterator[PauseClock]:
    clock = PauseClock(name)

    def on_a_event(_c: Any, domain: Any, event: int, _detail: int, _o: Any) -> None:
        if domain.name() == name and event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
            clock.suspended_on_a = clock.suspended_on_a or time.monotonic()

    def on_b_event(_c: Any, domain: Any, event: int, _detail: int, _o: Any) -> None:
        if domain.name() == name and event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
            clock.resumed_on_b = clock.resumed_on_b or time.monotonic()

    lifecycle = libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE
    registered = [
        (on_a, on_a.domainEventRegisterAny(None, lifecycle, on_a_event, None)),
        (on_b, on_b.domainEventRegisterAny(None, lifecycle, on_b_event, None)),
    ]
    try:
        yield clock
    finally:
        for connection, callback in registered:
            with contextlib.suppress(libvirt.libvirtError):
                connection.domainEventDeregisterAny(callback)


@pytest.fixture(name="short_dir")
def short_dir_fixture() -> Iterator[Path]:
    """Unix socket paths stay under 108 bytes: a short directory, the same path inside B."""
    path = Path(tempfile.mkdtemp(prefix="pclvd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _tail(path: Path, size: int = 1500) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except FileNotFoundError:
        return ""


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _start_in(host: LibvirtHost, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`argv` inside the host's namespaces (nsenter execs it: the Popen is the process)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            host.command(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip


def _wait_for_line(process: subprocess.Popen[bytes], log: Path, word: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while word not in _tail(log, 20000):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start:\n{_tail(log)}")
        time.sleep(POLL)


@contextlib.contextmanager
def serving_on_a(lab: LibvirtLab, policy: DomainPolicy, workdir: Path) -> Iterator[None]:
    """`postcopy serve` of the domain's disks on A's address, inside A."""
    assert policy.source is not None
    exports = [f"{disk.export}={disk.source_image}" for disk in policy.disks]
    listen = f"{policy.source.host}:{policy.source.port}"
    log = workdir / "serve.log"
    process = _start_in(
        lab.host_a, [PYTHON, "-m", "postcopy.cli", "serve", "--listen", listen, *exports], log
    )
    try:
        _wait_for_line(process, log, "ready ", "postcopy serve on A")
        yield
    finally:
        _stop(process)


@dataclass
class Receive:
    process: subprocess.Popen[bytes]
    state_dir: Path
    socket: Path
    dest_file: Path
    log: Path

    def status(self) -> dict[str, Any]:
        try:
            record: dict[str, Any] = json.loads((self.state_dir / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return record


@contextlib.contextmanager
def receiving_on_b(
    lab: LibvirtLab, policy: DomainPolicy, workdir: Path, extra: tuple[str, ...] = ()
) -> Iterator[Receive]:
    """`postcopy receive --wait-for-source` of the domain's one disk, inside B.  On the way out
    it is stopped; unless the domain runs on it (`keep_files`), the paths it created go too,
    as migrate's agent removes them after a rollback."""
    [disk] = policy.disks
    state_dir = policy.state_dir(disk)
    state_dir.mkdir(parents=True)
    socket = policy.dest_socket(disk)
    assert policy.source is not None
    source = policy.source_endpoint(disk).uri()
    log = workdir / "receive.log"
    argv = [
        PYTHON, "-m", "postcopy.cli", "receive", "--source", source, "--dest",
        str(disk.dest_file), "--state-dir", str(state_dir), "--socket", str(socket),
        "--wait-for-source", "--domain", policy.name, *extra,
    ]  # fmt: skip
    process = _start_in(lab.host_b, argv, log)
    receive = Receive(process, state_dir, socket, disk.dest_file, log)
    try:
        _wait_for_line(process, log, "nbd+unix://", "postcopy receive on B")
        yield receive
    finally:
        _stop(process)


def _remove_receive_paths(receive: Receive) -> None:
    """What migrate's agent removes after a rollback: the socket, state and partial file."""
    receive.socket.unlink(missing_ok=True)
    shutil.rmtree(receive.state_dir, ignore_errors=True)
    receive.dest_file.unlink(missing_ok=True)


def _policy(name: str, a_image: Path, b_file: Path, short_dir: Path, lab: LibvirtLab, port: int):
    text = (
        f'[domains.{name}]\nmode = "postcopy"\nsocket_dir = "{short_dir}"\n'
        f'state_root = "{short_dir / "state"}"\nsource = "nbd://{lab.host_a.address}:{port}"\n'
        f'[[domains.{name}.disks]]\ndevice = "vda"\nsource_image = "{a_image}"\n'
        f'dest_file = "{b_file}"\n'
    )
    return parse_config(text, "policy.toml").domain(name)


def _receive_runs(receive: Receive) -> Any:
    """The check during libvirt's job, and before the switchover: the receive still runs."""

    async def check() -> None:
        if receive.process.poll() is not None:
            raise UserError(f"postcopy receive on B exited ({receive.process.returncode})")

    return check


def _source_frozen_hook(receive: Receive, calls: list[float]) -> Any:
    """The switchover: the receive still runs, then its source is declared frozen.  In process,
    as migrate's agent does it (`declare_source_frozen` is what `postcopy source-frozen` runs;
    the state directory is the same path inside B); a `postcopy source-frozen` process started
    inside B here would add its interpreter's start-up (~1 s on this loaded machine) to the
    time the guest stands paused."""

    async def switchover() -> None:
        calls.append(time.monotonic())
        await _receive_runs(receive)()
        declare_source_frozen(receive.state_dir)

    return switchover


def _domain_names(connection: Any, flags: int = 0) -> list[str]:
    return sorted(d.name() for d in connection.listAllDomains(flags))


def _boot_on_a(lab: LibvirtLab, xml: str, console: GuestConsole) -> tuple[Any, Any]:
    """Define the domain on A (persistent, as migrate expects) and start it."""
    on_a = lab.host_a.connect()
    domain = on_a.defineXML(xml)
    domain.create()
    console.alive = domain.isActive
    first = console.wait_for_pass(1, BOOT_TIMEOUT)
    assert first.ok, console.tail()
    return on_a, domain


def _passes_from_now(console: GuestConsole, count: int) -> list[Any]:
    """`count` passes later than every pass logged so far; none may FAIL."""
    start = console.last_pass()
    console.wait_for_pass(start + count, PASS_TIMEOUT)
    new = [m for m in console.markers if m.pass_number > start]
    assert all(m.ok for m in new) and console.failures() == [], console.tail()
    return new


def _disk_of(xml: str, device: str = "vda") -> ET.Element:
    for disk in ET.fromstring(xml).iter("disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == device:
            return disk
    raise AssertionError(f"no disk {device} in {xml}")


# --- the pivot's latency measurement, through the monitor passthrough -------------------------


def _worst_bin(stats: dict[str, Any]) -> str:
    worst = -1
    for kind in ("rd_latency_histogram", "wr_latency_histogram", "flush_latency_histogram"):
        for position, count in enumerate(stats.get(kind, {}).get("bins", [])):
            if count:
                worst = max(worst, position)
    if worst < 0:
        return "no I/O"
    low = 0 if worst == 0 else BOUNDARIES_NS[worst - 1] // 1_000_000
    if worst >= len(BOUNDARIES_NS):
        return f">= {low} ms"
    return f"{low}-{BOUNDARIES_NS[worst] // 1_000_000} ms"


async def _qdev(monitor: LibvirtMonitor) -> str:
    [block] = [b for b in await monitor.execute("query-block") if b.get("inserted")]
    return str(block["qdev"])


async def _histogram_reset(monitor: LibvirtMonitor, qdev: str) -> None:
    arguments = {"id": qdev, "boundaries": BOUNDARIES_NS}
    await monitor.execute("block-latency-histogram-set", arguments)


async def _histogram_worst(monitor: LibvirtMonitor, qdev: str) -> str:
    for entry in await monitor.execute("query-blockstats"):
        if entry.get("qdev") == qdev:
            return _worst_bin(entry["stats"])
    raise AssertionError(f"no blockstats for {qdev}")


# --- the main test ----------------------------------------------------------------------------


def test_domain_moves_to_the_lazy_destination_pivots_and_boots_from_its_local_file(
    lab: LibvirtLab, guest_boot_files: GuestBootFiles, tmp_path: Path, short_dir: Path
) -> None:
    layout = SCENARIO_LAYOUT
    name = "pclvd-main"
    a_image, b_file = tmp_path / "a.img", tmp_path / "b.img"
    prepare_disk_image(a_image, layout, guest_boot_files)
    policy = _policy(name, a_image, b_file, short_dir, lab, 10811)
    console = GuestConsole(name, tmp_path / "serial.log")
    xml = guest_domain_xml(name, guest_boot_files, layout, a_image, console.serial_log)
    figures: dict[str, str] = {}
    on_a, domain_a = _boot_on_a(lab, xml, console)
    on_b = lab.host_b.connect()
    calls: list[float] = []
    with (
        serving_on_a(lab, policy, tmp_path),
        receiving_on_b(lab, policy, tmp_path, ("--bandwidth", DRAIN_CAP)) as receive,
    ):
        rewrite = destination_xml(domain_a, policy)
        assert rewrite.changed == ("vda",)
        migration = LibvirtMigration(
            domain_a, on_b, rewrite, dest_uri=lab.host_b.uri,
            migrate_uri=lab.host_b.migration_uri, check=_receive_runs(receive),
        )  # fmt: skip
        with pause_clock(on_a, on_b, name) as clock:
            result = trio.run(migration.run, _source_frozen_hook(receive, calls))
            resumed = time.monotonic()
            guest_paused_ms = clock.pause_ms()
        domain_b = migration.dest_domain
        io_deadline = resumed + 20
        while guest_io_operations(domain_b, ["vda"]) == 0:
            assert time.monotonic() < io_deadline, "no guest I/O on B"
            time.sleep(0.005)
        first_io = time.monotonic() - resumed
        assert len(calls) == 1 and migration.rollback is None
        assert is_source_frozen(receive.state_dir)
        assert result.libvirt_downtime_ms > 0 and result.job_ms > 0
        assert result.downtime_ms is not None and result.downtime_ms > 0
        last_on_a = console.last_pass()

        # virsh list: running on B, gone from A (undefined there), persistent on B.
        assert _domain_names(on_a) == []
        listed = lab.host_b.run(["/usr/bin/virsh", "-c", "qemu:///system", "list", "--name"])
        assert listed.stdout.split() == [name]
        assert domain_b.state()[0] == libvirt.VIR_DOMAIN_RUNNING and domain_b.isPersistent()
        inactive = domain_b.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        source = _disk_of(inactive).find("source")
        assert source is not None and source.get("protocol") == "nbd"

        # The drain: the guest passes on B meanwhile, and on after the drain completed.
        console.alive = domain_b.isActive
        deadline = resumed + DRAIN_TIMEOUT
        while receive.status().get("state") != "complete":
            assert time.monotonic() < deadline, f"drain not complete: {receive.status()}"
            assert receive.process.poll() is None, _tail(receive.log)
            console.poll()
            time.sleep(0.05)
        completed = time.monotonic()
        on_b_so_far = [m for m in console.markers if m.pass_number > last_on_a]
        during_drain = [m for m in on_b_so_far if m.seen_at <= completed]
        assert during_drain and all(m.ok for m in during_drain), console.tail()
        _passes_from_now(console, 1)

        # The pivot through libvirt's monitor passthrough.
        pid = qemu_pid(name, Path(f"/proc/{lab.host_b.pid}/root"))
        endpoint = policy.dest_endpoint(policy.disks[0])

        async def pivot() -> tuple[Any, str, str, list[Any], list[Any]]:
            monitor = LibvirtMonitor(domain_b, pid)
            with pytest.raises(QMPCommandError, match="CommandNotFound"):
                await monitor.execute("no-such-command")
            qdev = await _qdev(monitor)
            await _histogram_reset(monitor, qdev)
            await trio.sleep(2.0)
            before = await _histogram_worst(monitor, qdev)
            await _histogram_reset(monitor, qdev)
            done = await pivot_disks(domain_b, [PivotTarget("vda", endpoint, b_file)], pid=pid)
            await trio.sleep(2.0)
            across = await _histogram_worst(monitor, qdev)
            blocks = await monitor.execute("query-block")
            nodes = await monitor.execute("query-named-block-nodes", {"flat": True})
            return done, before, across, blocks, nodes

        pivoted, stall_before, stall_across, blocks, nodes = trio.run(pivot)
        vda = pivoted.results["vda"]
        assert (vda.format_node, vda.old_nbd_node) == ("libvirt-1-format", "libvirt-1-storage")
        assert any("tainted (custom-monitor)" in note for note in pivoted.notes)
        qemu_log = (lab.host_b.qemu_logs / f"{name}.log").read_text()
        assert "tainted: custom-monitor" in qemu_log
        [inserted] = [b["inserted"] for b in blocks if b.get("inserted")]
        assert inserted["file"] == str(b_file) and inserted["node-name"] == "libvirt-1-format"
        assert sorted((n["node-name"], n["drv"]) for n in nodes) == [
            ("libvirt-1-format", "raw"),
            (vda.file_node, "file"),
        ]
    # serve and receive are stopped: the guest runs on B's file alone.
    assert receive.process.returncode == 0, _tail(receive.log)
    after_pivot = _passes_from_now(console, ROUNDS_AFTER_PIVOT)
    assert len(after_pivot) >= ROUNDS_AFTER_PIVOT

    # B's persistent definition on the local file; the rest of the disk as it was.
    persisted = persist_local_disks(on_b, name, policy)
    assert persisted.changed == ("vda",)
    disk = _disk_of(on_b.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert disk.get("type") == "file"
    assert [(c.tag, c.attrib) for c in disk if c.tag in ("driver", "source", "target")] == [
        ("driver", {"name": "qemu", "type": "raw"}),
        ("source", {"file": str(b_file)}),
        ("target", {"dev": "vda", "bus": "virtio"}),
    ]
    assert disk.find("geometry") is not None

    # destroy: B's file holds A's bytes wherever the guest does not write (its slots).
    domain_b.destroy()
    work_start, work_length = layout.work_kib[0] * 1024, layout.work_kib[1] * 1024
    assert b_file.stat().st_size == a_image.stat().st_size
    assert same_bytes(a_image, b_file, 0, work_start)
    rest = work_start + work_length
    assert same_bytes(a_image, b_file, rest, layout.disk_size - rest)
    assert not same_bytes(a_image, b_file, work_start, work_length)  # the guest wrote on B

    # start: B boots the domain from its own file, and the guest's checks pass again.
    again = GuestConsole(name, console.serial_log)
    again.poll()  # what the first boot logged is not this boot's
    again.markers.clear()
    domain_b.create()
    again.alive = domain_b.isActive
    booted = again.wait_for_pass(2, BOOT_TIMEOUT)
    assert booted.ok and again.failures() == [], again.tail()
    argv = Path(f"/proc/{qemu_pid(name, Path(f'/proc/{lab.host_b.pid}/root'))}/cmdline")
    command_line = argv.read_bytes().decode(errors="replace")
    assert f'"filename":"{b_file}"' in command_line and '"driver":"nbd"' not in command_line
    domain_b.destroy()
    domain_b.undefine()

    figures["postcopy"] = (
        f"running on B {result.wall_seconds:.2f} s after the call (libvirt job "
        f"{result.job_ms:.0f} ms), guest paused {guest_paused_ms:.0f} ms (events; the "
        f"driver's figure {result.downtime_ms:.0f} ms, libvirt's own "
        f"{result.libvirt_downtime_ms:.0f} ms; A paused until the call returned "
        f"{result.downtime_ms - result.switchover_ms:.0f} ms, then the hook and the resume "
        f"{result.switchover_ms:.0f} ms), first "
        f"guest I/O on B {first_io * 1000:.0f} ms after resume, drain complete "
        f"{completed - resumed:.1f} s after resume ({len(during_drain)} passes meanwhile), "
        f"blockdev-reopen {vda.reopen_seconds * 1000:.1f} ms, worst guest I/O latency: "
        f"{stall_before} before, {stall_across} across the pivot"
    )
    figures["virsh --copy-storage-all"] = _libvirt_copy_storage_peer(
        lab, guest_boot_files, layout, tmp_path
    )
    print("\nlibvirt driver figures:\n" + "\n".join(f"  {k}: {v}" for k, v in figures.items()))


def _libvirt_copy_storage_peer(
    lab: LibvirtLab, boot_files: GuestBootFiles, layout: GuestLayout, tmp_path: Path
) -> str:
    """The honest peer: the same domain moved by `virsh migrate --copy-storage-all` (libvirt's
    NBD storage migration) between the same daemons; its time until the guest runs on B and its
    total time."""
    name = "pclvd-peer"
    image = "peer.img"
    prepare_disk_image(lab.host_a.images / image, layout, boot_files)
    with open(lab.host_b.images / image, "wb") as empty:  # libvirt wants it, of the same size
        empty.truncate(layout.disk_size)
    console = GuestConsole(name, tmp_path / "peer.serial.log")
    xml = guest_domain_xml(name, boot_files, layout, IMAGES_INSIDE / image, console.serial_log)
    on_a, _ = _boot_on_a(lab, xml, console)
    on_b = lab.host_b.connect()
    virsh = [
        "/usr/bin/virsh", "-c", "qemu:///system", "migrate", "--live", "--p2p",
        "--copy-storage-all", "--persistent", "--undefinesource", name, lab.host_b.uri,
        "--migrateuri", lab.host_b.migration_uri,
    ]  # fmt: skip
    with pause_clock(on_a, on_b, name) as clock:
        started = time.monotonic()
        migrating = lab.host_a.run(virsh, timeout=120, check=False)
        total = time.monotonic() - started
        guest_paused_ms = clock.pause_ms()
    assert migrating.returncode == 0, migrating.stderr
    assert clock.resumed_on_b is not None
    running_at = clock.resumed_on_b
    domain_b = on_b.lookupByName(name)
    stats = domain_b.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    console.alive = domain_b.isActive
    _passes_from_now(console, 1)
    domain_b.destroy()
    domain_b.undefine()
    return (
        f"running on B {running_at - started:.2f} s after the call, total {total:.2f} s "
        f"(libvirt job {stats['time_elapsed']} ms), guest paused {guest_paused_ms:.0f} ms "
        f"(events; libvirt's own downtime figure {stats['downtime']} ms)"
    )


# --- failures before the switchover -----------------------------------------------------------


@dataclass
class GuestOnA:
    name: str
    domain: Any
    connection: Any
    console: GuestConsole
    policy: DomainPolicy


@pytest.fixture(scope="module", name="guest_on_a")
def guest_on_a_fixture(
    lab: LibvirtLab,
    guest_boot_files: GuestBootFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GuestOnA]:
    """One guest on A for every failure test: each must leave it running there."""
    workdir = tmp_path_factory.mktemp("libvirt-driver-failures")
    sockets = Path(tempfile.mkdtemp(prefix="pclvf-"))
    try:
        layout = GuestLayout()
        name = "pclvd-stays"
        a_image = workdir / "a.img"
        prepare_disk_image(a_image, layout, guest_boot_files)
        policy = _policy(name, a_image, workdir / "b.img", sockets, lab, 10812)
        console = GuestConsole(name, workdir / "serial.log")
        xml = guest_domain_xml(name, guest_boot_files, layout, a_image, console.serial_log)
        connection, domain = _boot_on_a(lab, xml, console)
        yield GuestOnA(name, domain, connection, console, policy)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def _memory_flowing(domain: Any) -> bool:
    with contextlib.suppress(libvirt.libvirtError):
        stats = domain.jobStats()
        return bool(stats.get("memory_processed", 0) > 0)
    return False


@contextlib.contextmanager
def once_memory_flows(domain: Any, action: Any) -> Iterator[list[BaseException]]:
    """Run `action` in a thread once libvirt's job on `domain` sends memory (a failure injected
    mid-job); what went wrong in the thread is yielded, for the test to check."""
    errors: list[BaseException] = []

    def inject() -> None:
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not _memory_flowing(domain):
                if time.monotonic() > deadline:
                    raise AssertionError("libvirt's job sent no memory")
                time.sleep(0.05)
            time.sleep(0.3)
            action()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        thread.join(timeout=START_TIMEOUT + 5)


def _assert_guest_runs_on_a_and_b_holds_nothing(lab: LibvirtLab, guest: GuestOnA) -> None:
    domain = guest.domain
    assert domain.isActive() and domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert domain.isPersistent()  # still defined on A
    guest.console.alive = domain.isActive
    _passes_from_now(guest.console, 1)  # ... and its guest goes on there
    on_b = lab.host_b.connect()
    assert _domain_names(on_b) == []  # no domain on B, running or defined
    listed = lab.host_b.run(["/usr/bin/virsh", "-c", "qemu:///system", "list", "--all", "--name"])
    assert listed.stdout.split() == []
    # Nothing runs in B but its libvirtd: no QEMU, no receive, no nbdkit.
    others = set(processes_in_network_namespace(lab.host_b.network.namespace)) - {lab.host_b.pid}
    assert others == set(), [Path(f"/proc/{p}/cmdline").read_bytes() for p in others]
    [disk] = guest.policy.disks
    assert not guest.policy.dest_socket(disk).exists()
    assert not disk.dest_file.exists()


def _new_migration(
    lab: LibvirtLab, guest: GuestOnA, receive: Receive, mode: str = "p2p", slow: bool = True
) -> LibvirtMigration:
    """p2p: A's libvirtd reaches B's (dest_uri); direct: this process drives both."""
    return LibvirtMigration(
        guest.domain, lab.host_b.connect(), destination_xml(guest.domain, guest.policy),
        dest_uri=lab.host_b.uri if mode == "p2p" else None,
        migrate_uri=lab.host_b.migration_uri,
        bandwidth_mib=SLOW_MIB_PER_S if slow else None, check=_receive_runs(receive),
    )  # fmt: skip


def test_ctrl_c_during_libvirts_job_aborts_it_and_the_guest_stays_on_a(
    lab: LibvirtLab, guest_on_a: GuestOnA, tmp_path: Path
) -> None:
    calls: list[float] = []
    with (
        serving_on_a(lab, guest_on_a.policy, tmp_path),
        receiving_on_b(lab, guest_on_a.policy, tmp_path) as receive,
    ):
        migration = _new_migration(lab, guest_on_a, receive)
        in_run = threading.Event()  # a SIGINT outside trio.run would stop pytest itself

        def ctrl_c() -> None:  # trio turns it into a KeyboardInterrupt
            if in_run.is_set():
                os.kill(os.getpid(), signal.SIGINT)

        with (
            once_memory_flows(guest_on_a.domain, ctrl_c) as errors,
            pytest.raises(KeyboardInterrupt),
        ):
            in_run.set()
            try:
                trio.run(migration.run, _source_frozen_hook(receive, calls))
            finally:
                in_run.clear()
        assert errors == []
        assert receive.process.poll() is None  # the receive was not what stopped it
    _remove_receive_paths(receive)
    assert calls == []  # the switchover never ran
    rollback = migration.rollback
    assert rollback is not None and migration.dest_domain is None
    assert rollback.source_running and rollback.destination_clean, rollback
    print(f"\nCtrl-C: {rollback!r}")
    _assert_guest_runs_on_a_and_b_holds_nothing(lab, guest_on_a)


def test_a_receive_killed_during_libvirts_job_aborts_it_and_the_guest_stays_on_a(
    lab: LibvirtLab, guest_on_a: GuestOnA, tmp_path: Path
) -> None:
    """In direct mode (this process drives both daemons); the other failures go p2p."""
    calls: list[float] = []
    with (
        serving_on_a(lab, guest_on_a.policy, tmp_path),
        receiving_on_b(lab, guest_on_a.policy, tmp_path) as receive,
    ):
        migration = _new_migration(lab, guest_on_a, receive, mode="direct")
        assert migration.mode == "direct"
        with (
            once_memory_flows(guest_on_a.domain, receive.process.kill) as errors,
            pytest.raises(MigrationRolledBack) as caught,
        ):
            trio.run(migration.run, _source_frozen_hook(receive, calls))
        assert errors == []
        assert receive.process.returncode == -signal.SIGKILL
    _remove_receive_paths(receive)
    message = str(caught.value)
    assert "\n" not in message and "postcopy receive on B exited" in message
    assert calls == []
    rollback = caught.value.rollback
    assert rollback.source_running and rollback.destination_clean, rollback
    print(f"\nreceive killed: {rollback!r}")
    _assert_guest_runs_on_a_and_b_holds_nothing(lab, guest_on_a)


def test_b_libvirtd_stopped_before_the_migration_is_one_line_and_changes_nothing(
    lab: LibvirtLab, guest_on_a: GuestOnA, tmp_path: Path
) -> None:
    calls: list[float] = []
    try:
        with (
            serving_on_a(lab, guest_on_a.policy, tmp_path),
            receiving_on_b(lab, guest_on_a.policy, tmp_path) as receive,
        ):
            migration = _new_migration(lab, guest_on_a, receive)
            lab.host_b.stop_daemon()
            with pytest.raises(LibvirtCallFailed) as caught:
                trio.run(migration.run, _source_frozen_hook(receive, calls))
        _remove_receive_paths(receive)
        message = str(caught.value)
        assert "\n" not in message and message.startswith("libvirt on B: "), message
        print(f"\nB's libvirtd stopped: {message}")
        assert calls == [] and migration.dest_domain is None
        # With its daemon gone, nothing at all runs in B any more.
        assert processes_in_network_namespace(lab.host_b.network.namespace) == []
    finally:
        lab.host_b.start_daemon()
    _assert_guest_runs_on_a_and_b_holds_nothing(lab, guest_on_a)


def test_direct_mode_moves_the_guest_that_stayed_on_a(
    lab: LibvirtLab, guest_on_a: GuestOnA, tmp_path: Path
) -> None:
    """After the failures, the same guest migrates in direct mode (last: it leaves A)."""
    calls: list[float] = []
    with (
        serving_on_a(lab, guest_on_a.policy, tmp_path),
        receiving_on_b(lab, guest_on_a.policy, tmp_path) as receive,
    ):
        migration = _new_migration(lab, guest_on_a, receive, mode="direct", slow=False)
        figures = trio.run(migration.run, _source_frozen_hook(receive, calls))
        assert figures.mode == "direct" and len(calls) == 1
        assert _domain_names(guest_on_a.connection) == []
        domain_b = migration.dest_domain
        assert domain_b.state()[0] == libvirt.VIR_DOMAIN_RUNNING and domain_b.isPersistent()
        guest_on_a.console.alive = domain_b.isActive
        _passes_from_now(guest_on_a.console, 2)
        domain_b.destroy()
        domain_b.undefine()
    print(
        f"\ndirect mode: running on B {figures.wall_seconds:.2f} s after the call, downtime "
        f"{figures.downtime_ms:.0f} ms (libvirt's {figures.libvirt_downtime_ms:.0f} ms)"
    )


# --- units: the XML back to the local file ----------------------------------------------------


def _unit_policy(tmp_path: Path) -> DomainPolicy:
    text = (
        '[domains.web]\nmode = "postcopy"\nsocket_dir = "/run/pc"\n'
        '[[domains.web.disks]]\ndevice = "vda"\nsource_image = "/img/web.raw"\n'
        'dest_file = "/img/web.raw"\n'
    )
    return parse_config(text, str(tmp_path / "p.toml")).domain("web")


UNIT_XML = """<domain type='kvm'>
  <name>web</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' discard='unmap'/>
      <source file='/img/web.raw'/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/img/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>
"""


def test_the_way_back_gives_the_original_disk_again(tmp_path: Path) -> None:
    policy = _unit_policy(tmp_path)
    lazy = rewrite_libvirt(UNIT_XML, policy)
    assert "protocol='nbd'" in lazy.text
    back = rewrite_libvirt_local(lazy.text, policy)
    assert back.changed == ("vda",)
    assert back.text == UNIT_XML


def test_the_way_back_refuses_a_disk_not_on_the_receive(tmp_path: Path) -> None:
    policy = _unit_policy(tmp_path)
    with pytest.raises(UserError, match="is a file disk, not an NBD network disk"):
        rewrite_libvirt_local(UNIT_XML, policy)
    elsewhere = rewrite_libvirt(UNIT_XML, policy).text.replace("/run/pc/web-vda.sock", "/x.sock")
    with pytest.raises(UserError, match="not on postcopy's endpoint") as caught:
        rewrite_libvirt_local(elsewhere, policy)
    assert "\n" not in str(caught.value)


def test_the_pid_file_must_name_the_domains_qemu(tmp_path: Path) -> None:
    pid_dir = tmp_path / "run/libvirt/qemu"
    pid_dir.mkdir(parents=True)
    (pid_dir / "web.pid").write_text(f"{os.getpid()}\n")  # a process that is not QEMU
    with pytest.raises(Exception, match="is not the QEMU of web"):
        qemu_pid("web", tmp_path)
    with pytest.raises(Exception, match="no QEMU of other"):
        qemu_pid("other", tmp_path)
