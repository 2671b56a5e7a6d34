"""The nested Xen lab: a PVH domU on a kernel NBD disk runs the self-checking workload, keeps
passing across `xl migrate ... localhost`, and the old qdisk+URI disk form is shown not to work.

One lab (Xen 4.17 + Debian dom0 in QEMU/TCG, `postcopy.kit.xenlab`) is booted for the module. The
timings (set-up, boot, domU start, migration, the guest-visible pause) are printed and written to
`xenlab-timings.txt` in the lab's work directory; nothing asserts on them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postcopy.guestkit.build import ensure_guest_boot_files
from postcopy.guestkit.qemu import GuestLayout, expected_preboot_bytes, prepare_disk_image
from postcopy.kit.xenlab.build import LabFiles, ensure_lab
from postcopy.kit.xenlab.lab import DomuConsole, LabError, XenLab, domu_config, run_xen_lab

pytestmark = [pytest.mark.xen, pytest.mark.timeout(1200)]

# Bounds, not expectations: under TCG on a loaded 2-core machine a domU takes ~70 s to its first
# pass and `xl migrate` ~85 s (unloaded: ~15 s and ~10-15 s).
DOMU_BOOT_TIMEOUT = 300
MIGRATE_LIMIT = 300
QDISK_LOG_TIMEOUT = 120
QDISK_GRACE_SECONDS = 20
PASSES_AFTER_MIGRATION = 3
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module", name="lab_files")
def lab_files_fixture() -> LabFiles:
    started = time.monotonic()
    files = ensure_lab()
    TIMINGS["set-up (ensure_lab)"] = time.monotonic() - started
    started = time.monotonic()
    ensure_lab()
    TIMINGS["set-up, cached"] = time.monotonic() - started
    TIMINGS["cache size MiB"] = files.size_bytes() / (1 << 20)
    return files


@pytest.fixture(scope="module", name="lab")
def lab_fixture(lab_files: LabFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[XenLab]:
    workdir = tmp_path_factory.mktemp("xenlab")
    try:
        with run_xen_lab(lab_files, workdir) as lab:
            TIMINGS["boot: QEMU start to dom0 ready"] = lab.boot_seconds
            yield lab
        assert lab.process.poll() is not None  # QEMU is gone when the context ends
    finally:
        report = "".join(f"{name}: {value:.1f}\n" for name, value in TIMINGS.items())
        (workdir / "xenlab-timings.txt").write_text(report)
        print("\nxenlab timings\n" + report)


def _nbd_disk(lab: XenLab, image: Path, name: str, device: str) -> None:
    """nbdkit (Debian's, in dom0) serving `image` on a Unix socket; a kernel NBD device on it."""
    lab.run(
        f"nbdkit --unix /run/{name}.sock --pidfile /run/{name}.pid file {lab.dom0_path(image)}\n"
        f"nbd-client -unix /run/{name}.sock {device} -b 4096\n"
        f"test $(cat /sys/block/{device.removeprefix('/dev/')}/size) -gt 0\n",
        timeout=30,
    )


def _drop_nbd_disk(lab: XenLab, name: str, device: str) -> None:
    lab.run(f"nbd-client -d {device}\nkill $(cat /run/{name}.pid)\n", timeout=30)


def _wait_passes(
    lab: XenLab, console: DomuConsole, count: int, after: float, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while len([m for m in console.markers if m.seen_at >= after]) < count:
        lab.wait_for_marker(console, max(1.0, deadline - time.monotonic()), after=after)
        console.poll()
        if time.monotonic() > deadline:
            raise LabError(f"{count} passes not seen within {timeout:g} s\n{console.text()}")
        time.sleep(0.2)


def test_pvh_domu_on_kernel_nbd_keeps_passing_across_xl_migrate_localhost(lab: XenLab) -> None:
    layout = GuestLayout()
    host_a = lab.ctl / "host-a"
    host_a.mkdir()
    image = host_a / "disk.img"
    prepare_disk_image(image, layout, ensure_guest_boot_files())
    _nbd_disk(lab, image, "a", "/dev/nbd0")
    config = lab.ctl / "du.cfg"
    config.write_text(domu_config(lab.files, "du", "phy:/dev/nbd0,xvda,w", layout))
    console = lab.console("du")

    created = time.monotonic()
    lab.run(f"xl create {lab.dom0_path(config)}", timeout=120)
    TIMINGS["xl create returns"] = time.monotonic() - created
    first = lab.wait_for_marker(console, DOMU_BOOT_TIMEOUT)
    TIMINGS["domU: xl create to first PASS OK"] = first.seen_at - created
    _wait_passes(lab, console, 3, created, DOMU_BOOT_TIMEOUT)
    domid_before = lab.run("xl domid du").output.strip()

    migrating = time.monotonic()
    before = len(console.markers)
    pending = lab.start(f"xl migrate -s {lab.dom0_path(lab.ctl / 'ssh-localhost.sh')} du localhost",
                        MIGRATE_LIMIT)  # fmt: skip
    while (migrated := lab.result(pending)) is None:
        console.poll()
        if time.monotonic() > migrating + MIGRATE_LIMIT + 20:
            lab.wait(pending)  # raises with the details
        time.sleep(0.05)
    assert migrated.returncode == 0, migrated.output
    TIMINGS["xl migrate localhost"] = migrated.seconds
    _wait_passes(lab, console, PASSES_AFTER_MIGRATION, time.monotonic(), 120)

    assert not console.failures(), console.text()
    last_on_source = console.markers[before - 1].pass_number
    incoming = [m for m in console.markers if m.pass_number > last_on_source]
    assert len(incoming) >= PASSES_AFTER_MIGRATION
    assert (lab.ctl / "console" / "guest-du--incoming.log").exists()  # the domain was re-created
    domid_after = lab.run("xl domid du").output.strip()
    assert domid_after != domid_before
    seen = [m.seen_at for m in console.markers]
    gaps = [later - earlier for earlier, later in zip(seen, seen[1:], strict=False)]
    TIMINGS["pass interval (median, before migration)"] = statistics.median(gaps[: before - 1])
    TIMINGS["guest-visible pause (longest gap between passes)"] = max(gaps[before - 2 :])

    lab.run("xl destroy du", timeout=60)
    _drop_nbd_disk(lab, "a", "/dev/nbd0")
    # The disk the guest wrote through blkback, NBD and nbdkit is the host's file: the pre-boot
    # pattern is intact and the guest's slots were written.
    start, length = layout.preboot_byte_range()
    with open(image, "rb") as disk:
        for offset in (start, start + length // 2, start + length - 4096):
            disk.seek(offset)
            assert disk.read(4096) == expected_preboot_bytes(layout.seed, offset, 4096)
        disk.seek(layout.work_kib[0] * 1024)
        assert disk.read(layout.work_kib[1] * 1024).count(0) < layout.work_kib[1] * 1024


def test_qdisk_backend_cannot_open_an_nbd_uri(lab: XenLab) -> None:
    """The form `postcopy config --xl` used to write: QEMU 7.2's xen-block stats the target as a
    file, the backend never connects, and `xl create` still succeeds; the guest finds no disk."""
    layout = GuestLayout()
    image = lab.ctl / "qdisk.img"
    prepare_disk_image(image, layout, ensure_guest_boot_files())
    lab.run(f"nbdkit --unix /run/q.sock --pidfile /run/q.pid file {lab.dom0_path(image)}")
    disk = "backendtype=qdisk,format=raw,vdev=xvda,access=rw,target=nbd+unix:///?socket=/run/q.sock"
    config = lab.ctl / "dq.cfg"
    config.write_text(domu_config(lab.files, "dq", disk, layout))
    console = lab.console("dq")
    lab.run(f"xl create {lab.dom0_path(config)}", timeout=120)  # returns 0 all the same
    deadline = time.monotonic() + QDISK_LOG_TIMEOUT
    qemu_log = "cat /var/log/xen/qemu-dm-dq.log"
    while "Could not stat" not in (log := lab.run(qemu_log, check=False).output):
        if time.monotonic() > deadline:
            raise LabError(f"qdisk backend log without the stat failure:\n{log}")
        time.sleep(1)
    assert "Could not stat file 'nbd+unix:///?socket=/run/q.sock'" in log, log
    # Give the backend time it would need to connect (a phy: disk is connected by now).  The
    # guest cannot tell: its xen-blkfront waits up to 300 s for the disk before init goes on.
    time.sleep(QDISK_GRACE_SECONDS)
    domid = lab.run("xl domid dq").output.strip()
    state = lab.run(f"xenstore-read /local/domain/0/backend/qdisk/{domid}/51712/state").output
    assert state.strip() == "1", state  # XenbusStateInitialising: never InitWait, never Connected
    assert not console.poll(), console.text()  # no workload pass on this disk
    lab.run("xl destroy dq; kill $(cat /run/q.pid)", timeout=60)
