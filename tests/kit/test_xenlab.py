"""The nested Xen lab: a PVH domU on a kernel NBD disk runs the self-checking workload, keeps
passing across `xl migrate ... localhost`, and the old qdisk+URI disk form is shown not to work.

The tests marked `xen` (`make test-xen`) build the lab (as root, cached) and boot one instance
(Xen 4.17 + Debian dom0 in QEMU/TCG, `postcopy.kit.xenlab`) for the module.  The timings (set-up,
boot, domU start, migration, the guest-visible pause, QEMU's peak memory) are printed and written
to `xenlab-timings.txt` in the lab's work directory; nothing asserts on them.  The unmarked tests
check the kit's own logic without a lab and run in `make test`.
"""

from __future__ import annotations

import gzip
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postcopy.kit.guestkit.build import ensure_guest_boot_files, modinfo_depends
from postcopy.kit.guestkit.qemu import GuestLayout, expected_preboot_bytes, prepare_disk_image
from postcopy.kit.xenlab.build import (
    LabBuildError,
    LabFiles,
    ensure_lab,
    installed_version,
    module_load_order,
)
from postcopy.kit.xenlab.lab import (
    DomuConsole,
    LabError,
    XenLab,
    domu_config,
    qemu_command,
    run_xen_lab,
)

in_the_lab = pytest.mark.xen

# Bounds, not expectations: under TCG on a loaded 2-core machine a domU takes ~70 s to its first
# pass and `xl migrate` ~85 s (unloaded: ~15 s and ~10-15 s).
DOMU_BOOT_TIMEOUT = 300
MIGRATE_LIMIT = 300
QDISK_LOG_TIMEOUT = 120
QDISK_GRACE_SECONDS = 20
PASSES_AFTER_MIGRATION = 3
TIMINGS: dict[str, float] = {}


# ---- the kit's logic, without a lab --------------------------------------------------------


def _module_tree(tmp_path: Path, builtin: list[str]) -> Path:
    """A kernel module tree of the guest kit's real virtio modules, in nested folders."""
    modules = ensure_guest_boot_files().kernel.parent / "modules"
    root = tmp_path / "lib/modules/6.1.0-test"
    for index, module in enumerate(sorted(modules.glob("*.ko"))):
        folder = root / "kernel" / f"drivers{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, folder / module.name.replace("_", "-"))  # file names with dashes
    (root / "modules.builtin").write_text("".join(f"kernel/{name}.ko\n" for name in builtin))
    return root


def test_module_load_order_puts_dependencies_first_and_skips_built_ins(tmp_path: Path) -> None:
    root = _module_tree(tmp_path, builtin=[])
    order = module_load_order(root, ("virtio_blk", "virtio_pci"))
    names = [path.name.removesuffix(".ko").replace("-", "_") for path in order]
    assert {"virtio_blk", "virtio_pci", "virtio", "virtio_ring"} <= set(names)
    assert len(names) == len(set(names))
    for position, path in enumerate(order):
        for dependency in modinfo_depends(path.read_bytes()):
            assert names.index(dependency.replace("-", "_")) < position, (path.name, dependency)
    built_in = module_load_order(_module_tree(tmp_path / "b", builtin=["virtio-ring"]), ("virtio",))
    assert [path.name for path in built_in] == ["virtio.ko"]


def test_module_load_order_names_a_missing_module(tmp_path: Path) -> None:
    with pytest.raises(LabBuildError, match="xen_blkback"):
        module_load_order(_module_tree(tmp_path, builtin=[]), ("virtio_pci", "xen_blkback"))


def test_installed_version_reads_dpkg_status(tmp_path: Path) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(
        "Package: xen-utils-common\nStatus: install ok installed\nVersion: 1\n\n"
        "Package: xen-utils-4.17\nStatus: install ok installed\nDescription: x\n"
        " Version: not-this\nVersion: 4.17.5+72-g01140da4e8-1\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 2\n"
    )
    assert installed_version(tmp_path, "xen-utils-4.17") == "4.17.5+72-g01140da4e8-1"
    with pytest.raises(LabBuildError, match="gone"):
        installed_version(tmp_path, "gone")


def test_domu_console_reads_markers_from_both_logs_and_waits_for_whole_lines(
    tmp_path: Path,
) -> None:
    console = DomuConsole(tmp_path, "du")
    assert console.poll() == []  # no log yet
    source = tmp_path / "guest-du.log"
    source.write_bytes(b"POSTCOPY-GUEST INIT ready\r\nPOSTCOPY-GUEST PASS 1 OK written=1\r\nPOST")
    assert [(m.pass_number, m.ok) for m in console.poll()] == [(1, True)]
    with open(source, "ab") as log:
        log.write(b"COPY-GUEST PASS 2 OK written=2\r\n")
    (tmp_path / "guest-du--incoming.log").write_bytes(
        b"POSTCOPY-GUEST PASS 3 FAIL written-data slot=7\r\n"
    )
    assert [(m.pass_number, m.ok) for m in console.poll()] == [(2, True), (3, False)]
    assert [m.detail for m in console.failures()] == ["written-data slot=7"]
    assert console.poll() == []  # nothing read twice


def test_domu_config_and_qemu_command_carry_the_facts(tmp_path: Path) -> None:
    files = LabFiles(
        hypervisor=tmp_path / "lab/xen",
        dom0_kernel=tmp_path / "lab/vmlinuz",
        dom0_initramfs=tmp_path / "lab/dom0-initrd.gz",
        rootfs=tmp_path / "rootfs",
        domu_kernel=tmp_path / "lab/domu-vmlinux",
        domu_initramfs=tmp_path / "lab/domu-initrd.gz",
        workload_tool=tmp_path / "workload",
        kernel_version="6.1.0-57-amd64",
        kernel_package_version="6.1.192-3",
        xen_version="4.17.5",
        cache_dir=tmp_path / "lab",
    )
    config = domu_config(files, "du", "phy:/dev/nbd0,xvda,w", GuestLayout())
    assert 'type = "pvh"' in config  # PV domUs cannot live-migrate with Debian's Xen
    assert 'kernel = "/xenlab/domu-vmlinux"' in config
    assert "console=hvc0" in config and "ttyS0" not in config
    assert "pgw.dev=/dev/xvda" in config and "disk = [ 'phy:/dev/nbd0,xvda,w' ]" in config
    command = qemu_command(files, tmp_path, memory_mib=1536, dom0_mib=512)
    assert command[command.index("-cpu") + 1] == "qemu64,+svm,+npt"  # no NPT: no HAP, no PVH
    shares = [command[i + 1] for i, arg in enumerate(command) if arg == "-virtfs"]
    assert [share.split("mount_tag=")[1].split(",")[0] for share in shares] == [
        "root",
        "kit",
        "ctl",
    ]
    assert shares[0].endswith(",readonly=on") and not shares[2].endswith(",readonly=on")
    with_project = qemu_command(files, tmp_path, 1536, 512, project=tmp_path / "checkout")
    project_share = [a for a in with_project if "mount_tag=project" in a]
    assert project_share == [
        f"local,path={tmp_path / 'checkout'},mount_tag=project,security_model=none,id=project"
        ",readonly=on"
    ]
    modules = command[command.index("-initrd") + 1]
    assert (
        modules
        == f"{files.dom0_kernel} console=hvc0 earlyprintk=xen loglevel=5,{files.dom0_initramfs}"
    )


# ---- in the lab ----------------------------------------------------------------------------


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
            TIMINGS["QEMU peak RSS MiB"] = _peak_rss_kib(lab.process.pid) / 1024
        assert lab.process.poll() is not None  # QEMU is gone when the context ends
    finally:
        report = "".join(f"{name}: {value:.1f}\n" for name, value in TIMINGS.items())
        (workdir / "xenlab-timings.txt").write_text(report)
        print("\nxenlab timings\n" + report)


def _peak_rss_kib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return 0.0


@in_the_lab
def test_the_built_lab_holds_what_dom0_and_the_domu_need(lab_files: LabFiles) -> None:
    def listing(initramfs: Path) -> list[str]:
        archive = gzip.decompress(initramfs.read_bytes())
        cpio = ["cpio", "-it", "--quiet"]
        return (
            subprocess.run(cpio, input=archive, capture_output=True, check=True)
            .stdout.decode()
            .split()
        )

    dom0 = listing(lab_files.dom0_initramfs)
    for name in ("init", "bin/busybox", "dev/console", "lib/modules/load-order"):
        assert name in dom0
    assert {"lib/modules/9p.ko", "lib/modules/9pnet_virtio.ko", "lib/modules/overlay.ko"} <= set(
        dom0
    )
    domu = listing(lab_files.domu_initramfs)
    assert {"init", "bin/workload", "lib/modules/xen-blkfront.ko"} <= set(domu)
    assert lab_files.hypervisor.read_bytes()[:5] == b"\x7fELF\x01"  # multiboot ELF32, gunzipped
    for tool in ("usr/sbin/xl", "usr/bin/nbdkit", "usr/sbin/nbd-client", "usr/sbin/dmsetup"):
        assert (lab_files.rootfs / tool).exists(), tool
    modules = lab_files.rootfs / "lib/modules" / lab_files.kernel_version
    dependencies = (modules / "modules.dep").read_text()
    for module in ("xen-blkback.ko", "nbd.ko", "dm-mod.ko", "loop.ko"):
        assert f"/{module}:" in dependencies, module
    assert not list((lab_files.rootfs / "usr/share/doc").iterdir())  # trimmed


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


@in_the_lab
@pytest.mark.timeout(1200)
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


@in_the_lab
@pytest.mark.timeout(900)
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
