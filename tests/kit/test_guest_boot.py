"""The test guest boots under TCG, checks its disk every pass, and reports corruption.

These are the ground truth for the migration tests: if the workload could not fail, a guest that
"keeps passing" after a migration would prove nothing.
"""

from __future__ import annotations

import gzip
import subprocess
import time
from pathlib import Path

from postcopy.kit.guestkit.build import GuestBootFiles, modinfo_depends
from postcopy.kit.guestkit.qemu import GuestLayout, expected_preboot_bytes, run_qemu_guest

BOOT_TIMEOUT = 30


def test_initramfs_holds_init_busybox_workload_and_modules_in_dependency_order(
    guest_boot_files: GuestBootFiles,
) -> None:
    archive = gzip.decompress(guest_boot_files.initramfs.read_bytes())
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True, timeout=30
    ).stdout.decode().split()
    for name in ("init", "bin/busybox", "bin/workload", "dev/console", "lib/modules/load-order"):
        assert name in listing
    modules_dir = guest_boot_files.kernel.parent / "modules"
    order = (modules_dir / "load-order").read_text().split()
    assert {"virtio_blk", "virtio_pci"} <= set(order)
    for position, module in enumerate(order):
        assert f"lib/modules/{module}.ko" in listing
        for dependency in modinfo_depends((modules_dir / f"{module}.ko").read_bytes()):
            assert order.index(dependency) < position, (module, dependency)
    assert modinfo_depends((modules_dir / "virtio_pci.ko").read_bytes())  # it has some


def test_host_fill_matches_the_pattern_recipe(guest_image: Path, guest_layout: GuestLayout) -> None:
    start, length = guest_layout.preboot_byte_range()
    with open(guest_image, "rb") as image:
        for offset in (start, start + length // 2 + 4096, start + length - 64):
            image.seek(offset)
            assert image.read(64) == expected_preboot_bytes(guest_layout.seed, offset, 64)
        image.seek(start - 4096)
        assert image.read(4096) == bytes(4096)  # outside the region: untouched


def test_guest_boots_and_verifies_the_whole_preboot_region(
    guest_boot_files: GuestBootFiles, guest_layout: GuestLayout, guest_image: Path, tmp_path: Path
) -> None:
    passes_for_full_cover = -(-guest_layout.preboot_kib[1] // guest_layout.preboot_per_pass_kib)
    with run_qemu_guest(guest_boot_files, guest_layout, guest_image, tmp_path, "boot") as guest:
        first = guest.wait_for_marker(BOOT_TIMEOUT, ok=None)
        boot_seconds = first.seen_at - guest.started_at
        guest.wait_for_marker(BOOT_TIMEOUT, ok=None, min_pass=passes_for_full_cover + 1)
        assert guest.failures() == []
        passes = [m for m in guest.markers if m.ok]
        assert [m.pass_number for m in passes] == list(range(1, len(passes) + 1))
        # The rotating window went all the way round the pre-boot region.
        assert any("preboot_cursor_kib=0" in m.detail for m in passes)
        assert f"preboot_checked_kib={guest_layout.preboot_per_pass_kib}" in passes[0].detail
        print(f"boot to first pass: {boot_seconds:.2f} s")
    # The guest's writes reached the image: its slots carry the workload's header.
    work = guest_image.read_bytes()[guest_layout.work_kib[0] * 1024 :][
        : guest_layout.work_kib[1] * 1024
    ]
    assert work.count(b"\x00TOLSWGP") >= guest_layout.writes_per_pass


def test_guest_reports_corrupt_preboot_data(
    guest_boot_files: GuestBootFiles, guest_layout: GuestLayout, guest_image: Path, tmp_path: Path
) -> None:
    start, _ = guest_layout.preboot_byte_range()
    corrupt_at = start + 1024 * 1024 + 8  # inside the first pass's window
    with open(guest_image, "r+b") as image:
        image.seek(corrupt_at)
        image.write(b"\xff" * 8)
    with run_qemu_guest(guest_boot_files, guest_layout, guest_image, tmp_path, "corrupt") as guest:
        failure = guest.wait_for_marker(BOOT_TIMEOUT, ok=False)
    assert failure.pass_number == 1
    assert f"preboot-data offset={corrupt_at} " in failure.detail


def test_guest_reports_lost_writes(
    guest_boot_files: GuestBootFiles, guest_layout: GuestLayout, guest_image: Path, tmp_path: Path
) -> None:
    """Wipe what the guest wrote behind its back: its next re-read must say FAIL."""
    work_start, work_len = (v * 1024 for v in guest_layout.work_kib)
    with run_qemu_guest(guest_boot_files, guest_layout, guest_image, tmp_path, "lost") as guest:
        ok = guest.wait_for_marker(BOOT_TIMEOUT, ok=True, min_pass=2)
        with open(guest_image, "r+b") as image:
            image.seek(work_start)
            image.write(bytes(work_len))
            image.flush()
        wiped_at = time.monotonic()
        failure = guest.wait_for_marker(BOOT_TIMEOUT, ok=False)
    assert failure.pass_number > ok.pass_number
    assert failure.seen_at >= wiped_at
    assert "written-data" in failure.detail
