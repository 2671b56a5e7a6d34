"""The two-libvirtd lab (postcopy.kit.libvirtlab) with real daemons and the real TCG test guest.

One lab serves both migrations, since a fresh libvirtd probes QEMU for ~4 s before its first
domain: the guest on a shared-path disk goes A -> B with libvirt's live p2p migration
(`--unsafe`, the disk file is the same file on both hosts), then a second guest on A's own
images directory goes A -> B with `--copy-storage-all` (libvirt's NBD storage migration, the
honest peer of postcopy), arriving paused so B's copy can be compared with A's image byte for
byte before it runs on.  After the lab exits nothing of it may remain: no process, no namespace,
no mount in the machine's namespace, nothing in the machine's libvirt directories.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.guestkit.qemu import GuestLayout, prepare_disk_image
from postcopy.kit.libvirtlab import (
    IMAGES_INSIDE,
    LIBVIRT_DIRS,
    GuestConsole,
    LibvirtLab,
    LibvirtLabError,
    guest_domain_xml,
    open_libvirt_hosts,
    prepare_machine,
    process_identity,
    processes_in_network_namespace,
)
from tests.guest.fixtures import guest_boot_files_fixture, guest_layout_fixture  # noqa: F401

BOOT_TIMEOUT = 60.0
PASS_TIMEOUT = 30.0
ROUNDS_ON_B = 2


def _own_network_namespaces() -> set[str]:
    """The network namespaces of labs made by this process (postcopy.kit.netns tags their names
    with the maker's pid): other tests may make and remove their own meanwhile."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    return {
        n
        for n in names
        if n.startswith(("pclv-a-", "pclv-b-")) and n[7:].startswith(f"{os.getpid():x}")
    }


def _machine_state() -> dict[str, Any]:
    """What the lab must leave as it found it, seen from the machine's own namespaces."""
    with open("/proc/self/mountinfo") as mountinfo:
        mount_points = {line.split()[4] for line in mountinfo}
    children = {
        ident
        for entry in os.listdir("/proc")
        if entry.isdigit() and _parent(entry) == os.getpid()
        if (ident := process_identity(int(entry))) is not None
    }
    return {
        "network namespaces of this test's labs": _own_network_namespaces(),
        "children of this test": children,
        "libvirt dirs": {d: sorted(os.listdir(d)) for d in LIBVIRT_DIRS},
        "mounts under libvirt dirs": sorted(
            m for m in mount_points for d in LIBVIRT_DIRS if m == d or m.startswith(d + "/")
        ),
    }


def _parent(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0


def _lab_processes(lab: LibvirtLab) -> set[tuple[int, str]]:
    pids = [p for host in lab.hosts for p in processes_in_network_namespace(host.network.namespace)]
    return {ident for pid in pids if (ident := process_identity(pid)) is not None}


def _running_names(connection: Any) -> list[str]:
    return sorted(
        d.name() for d in connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    )


def _migrate_p2p(domain: Any, lab: LibvirtLab, flags: int) -> float:
    """Live p2p migration of `domain` (on A) to B; returns the wall time of the call."""
    started = time.monotonic()
    domain.migrateToURI3(
        lab.host_b.uri,
        {libvirt.VIR_MIGRATE_PARAM_URI: lab.host_b.migration_uri},
        flags | libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER,
    )
    return time.monotonic() - started


def _boot_on_a(connection: Any, xml: str, console: GuestConsole) -> tuple[Any, float]:
    started = time.monotonic()
    domain = connection.createXML(xml, 0)
    console.alive = domain.isActive
    first = console.wait_for_pass(1, BOOT_TIMEOUT)
    assert first.ok, console.tail()
    return domain, time.monotonic() - started


def _keeps_passing_on_b(console: GuestConsole, domain_on_b: Any) -> None:
    """ROUNDS_ON_B passes later than every pass logged so far, so run by B; none may FAIL."""
    console.alive = domain_on_b.isActive
    console.wait_for_pass(console.last_pass() + ROUNDS_ON_B, PASS_TIMEOUT)
    assert console.failures() == [], console.tail()


@pytest.fixture(name="capabilities_cache")
def capabilities_cache_fixture(pytestconfig: pytest.Config) -> Path | None:
    """Where the labs keep libvirt's QEMU probe results between runs (pytest's cache)."""
    cache = getattr(pytestconfig, "cache", None)  # absent with -p no:cacheprovider
    return None if cache is None else cache.mkdir("libvirtlab-qemu-capabilities")


def test_guest_migrates_between_two_libvirtd_with_shared_and_copied_storage(
    tmp_path: Path,
    guest_boot_files: GuestBootFiles,
    guest_layout: GuestLayout,
    capabilities_cache: Path | None,
) -> None:
    prepare_machine()  # the one-time machine set-up (user, mount points) is not a leftover
    before = _machine_state()
    shared_image = tmp_path / "shared.img"
    prepare_disk_image(shared_image, guest_layout, guest_boot_files)
    timings: dict[str, float] = {}
    seen_processes: set[tuple[int, str]] = set()
    started = time.monotonic()
    with open_libvirt_hosts(tmp_path / "lab", capabilities_cache=capabilities_cache) as lab:
        timings["lab up"] = time.monotonic() - started
        on_a, on_b = lab.host_a.connect(), lab.host_b.connect()
        lab_namespaces = {host.network.namespace for host in lab.hosts}
        assert _own_network_namespaces() == lab_namespaces
        assert on_a.getHostname() == "libvirtlab-a" and on_b.getHostname() == "libvirtlab-b"
        # Each host has its own /etc/libvirt on a tmpfs; the machine's is untouched.
        inside = lab.host_a.run(["/usr/bin/findmnt", "-n", "-o", "FSTYPE", "/etc/libvirt"])
        assert inside.stdout.strip() == "tmpfs"

        # 1. Shared storage: the same disk file on both hosts, so --unsafe.
        shared_console = GuestConsole("shared", tmp_path / "shared.serial.log")
        xml = guest_domain_xml(
            "pclv-shared", guest_boot_files, guest_layout, shared_image, shared_console.serial_log
        )
        domain, timings["shared: first boot"] = _boot_on_a(on_a, xml, shared_console)
        seen_processes |= _lab_processes(lab)
        timings["shared: migrate"] = _migrate_p2p(domain, lab, libvirt.VIR_MIGRATE_UNSAFE)
        assert _running_names(on_a) == []
        assert _running_names(on_b) == ["pclv-shared"]
        # virsh inside B's namespaces reaches B's daemon on its own Unix socket.
        listed = lab.host_b.run(["/usr/bin/virsh", "-c", "qemu:///system", "list", "--name"])
        assert listed.stdout.split() == ["pclv-shared"]
        on_b_domain = on_b.lookupByName("pclv-shared")
        assert on_b_domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        stats = on_b_domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        assert stats["downtime"] > 0 and stats["time_elapsed"] > 0, stats
        timings["shared: downtime"] = stats["downtime"] / 1000
        timings["shared: job"] = stats["time_elapsed"] / 1000
        _keeps_passing_on_b(shared_console, on_b_domain)
        seen_processes |= _lab_processes(lab)
        on_b_domain.destroy()

        # 2. Copied storage: A's own image, B's empty file of the same size (libvirt wants it).
        a_image, b_image = lab.host_a.images / "copy.img", lab.host_b.images / "copy.img"
        prepare_disk_image(a_image, guest_layout, guest_boot_files)
        with open(b_image, "wb") as empty:
            empty.truncate(a_image.stat().st_size)
        copy_console = GuestConsole("copy", tmp_path / "copy.serial.log")
        xml = guest_domain_xml(
            "pclv-copy", guest_boot_files, guest_layout, IMAGES_INSIDE / "copy.img",
            copy_console.serial_log,
        )  # fmt: skip
        domain, timings["copy: boot"] = _boot_on_a(on_a, xml, copy_console)
        timings["copy: migrate"] = _migrate_p2p(
            domain, lab, libvirt.VIR_MIGRATE_NON_SHARED_DISK | libvirt.VIR_MIGRATE_PAUSED
        )
        assert _running_names(on_a) == []
        on_b_domain = on_b.lookupByName("pclv-copy")
        assert on_b_domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        stats = on_b_domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        timings["copy: downtime"] = stats["downtime"] / 1000
        timings["copy: job"] = stats["time_elapsed"] / 1000
        # A's QEMU is gone and B's has not run a guest instruction: the copy must be exact.
        assert b_image.stat().st_size == a_image.stat().st_size
        assert b_image.read_bytes() == a_image.read_bytes()
        on_b_domain.resume()
        _keeps_passing_on_b(copy_console, on_b_domain)
        seen_processes |= _lab_processes(lab)
        stopping = time.monotonic()
    timings["lab down"] = time.monotonic() - stopping

    assert _machine_state() == before
    assert len(seen_processes) >= 3  # the two daemons and at least one QEMU were watched
    survivors = {ident for pid, _ in seen_processes if (ident := process_identity(pid))}
    assert survivors & seen_processes == set()
    print("libvirt lab timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))


def test_daemon_not_answering_in_time_is_one_line_naming_the_log_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    prepare_machine()
    before = _machine_state()
    with (
        pytest.raises(LibvirtLabError) as caught,
        open_libvirt_hosts(tmp_path, start_timeout=0.0),
    ):
        raise AssertionError("the lab must not open")
    message = str(caught.value)
    assert "\n" not in message
    assert "not answering on qemu+tcp://169.254." in message
    assert str(tmp_path / "host-a" / "libvirtd.log") in message
    assert _machine_state() == before


class _Interrupted(Exception):
    pass


def test_error_inside_the_lab_propagates_and_stops_the_running_guest(
    tmp_path: Path,
    guest_boot_files: GuestBootFiles,
    guest_layout: GuestLayout,
    capabilities_cache: Path | None,
) -> None:
    prepare_machine()
    before = _machine_state()
    image = tmp_path / "guest.img"
    prepare_disk_image(image, guest_layout, guest_boot_files)
    watched: set[tuple[int, str]] = set()
    with (
        pytest.raises(_Interrupted),
        open_libvirt_hosts(tmp_path / "lab", capabilities_cache=capabilities_cache) as lab,
    ):
        xml = guest_domain_xml(
            "pclv-left", guest_boot_files, guest_layout, image, tmp_path / "serial.log"
        )
        domain = lab.host_a.connect().createXML(xml, 0)
        assert domain.isActive()
        watched = _lab_processes(lab)
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid, _ in watched}
        assert {"libvirtd", "qemu-system-x86"} <= names  # comm is cut to 15 characters
        raise _Interrupted
    assert _machine_state() == before
    assert {ident for pid, _ in watched if (ident := process_identity(pid))} & watched == set()
