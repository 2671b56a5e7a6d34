"""`postcopy qemu-migrate` against real QEMU processes (TCG) running the self-checking guest.

Both QEMUs open the same local raw image (shared storage), so these tests check the QMP driver
alone: the RAM migration, the switchover, the report, and the rollback when things go wrong.
The postcopy disk is exercised by test_guest_migration.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from postcopy.destination.gate import is_source_frozen
from postcopy.errors import UserError
from postcopy.integrations.qemu_migrate import MigrationConfig, MigrationFailed, migrate_qemu_domain
from postcopy.integrations.qmp import open_qmp
from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.guestkit.qemu import (
    GuestLayout,
    QemuGuest,
    kill_now,
    run_qemu_guest,
    wait_until_exited,
)

BOOT_TIMEOUT = 30
SLOW_BANDWIDTH = 1 << 20  # bytes/s: keeps a 128 MiB guest's migration busy for a while


async def qemu_status_at(qmp_socket: Path) -> str:
    with trio.fail_after(5):
        async with open_qmp(qmp_socket) as qmp:
            return str((await qmp.execute("query-status"))["status"])


async def qemu_status(guest: QemuGuest) -> str:
    return await qemu_status_at(guest.qmp_socket)


def written_slots(detail: str) -> int:
    return int(detail.split("written_slots=")[1].split()[0])


def test_qemu_migrate_moves_a_running_guest_and_it_keeps_passing(
    guest_boot_files: GuestBootFiles,
    guest_layout: GuestLayout,
    guest_image: Path,
    tmp_path: Path,
    short_socket_dir: Path,
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    monitor = short_socket_dir / "src.qmp"  # a second QMP monitor on the source, for the watcher
    with (
        run_qemu_guest(
            guest_boot_files, guest_layout, guest_image, tmp_path, "src",
            extra_args=["-qmp", f"unix:{monitor},server=on,wait=off"],
        ) as source,
        run_qemu_guest(
            guest_boot_files, guest_layout, guest_image, tmp_path, "dst", incoming=True
        ) as dest,
    ):  # fmt: skip
        source.wait_for_marker(BOOT_TIMEOUT, ok=True, min_pass=2)
        command = [
            sys.executable, "-m", "postcopy.cli", "qemu-migrate",
            "--source-qmp", str(source.qmp_socket), "--dest-qmp", str(dest.qmp_socket),
            "--state-dir", str(state_dir), "--timeout", "30", "--json",
        ]  # fmt: skip
        migration = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # Watch for the gate: when it opens, the source must already be paused for good.
            deadline = time.monotonic() + 30
            while not is_source_frozen(state_dir) and time.monotonic() < deadline:
                time.sleep(0.002)
            assert is_source_frozen(state_dir)
            source_status_at_gate = trio.run(qemu_status_at, monitor)
            stdout, stderr = migration.communicate(timeout=30)
        finally:
            if migration.poll() is None:
                migration.kill()
                migration.wait()
        migrated_at = time.monotonic()
        assert source_status_at_gate == "postmigrate"
        assert migration.returncode == 0, stderr
        report = json.loads(stdout)
        assert report["status"] == "completed"
        assert 0 <= report["qemu_downtime_ms"] <= report["qemu_total_time_ms"]  # ms: may be 0
        assert report["qemu_total_time_ms"] > 0
        assert report["ram_transferred_bytes"] > 0

        source.poll_serial()
        last_on_source = source.markers[-1]
        first_on_dest = dest.wait_for_marker(BOOT_TIMEOUT, ok=None)
        later = dest.wait_for_passes(4, BOOT_TIMEOUT)
        # The same guest, memory and all: its pass counter and its record of written slots go on.
        last_number = last_on_source.pass_number
        assert last_number < first_on_dest.pass_number <= last_number + 2
        assert written_slots(first_on_dest.detail) > written_slots(last_on_source.detail)
        numbers = [m.pass_number for m in later]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        assert source.failures() == [] and dest.failures() == []
        assert all(m.ok for m in later)
        # Only one guest runs: the source stays paused after the switchover.
        assert trio.run(qemu_status, source) == "postmigrate"
        assert trio.run(qemu_status, dest) == "running"
        source.poll_serial()
        assert source.markers[-1].pass_number == last_on_source.pass_number
        print(
            f"RAM migration {report['qemu_total_time_ms']} ms, downtime "
            f"{report['qemu_downtime_ms']} ms, first OK on destination "
            f"{first_on_dest.seen_at - migrated_at:.2f} s after qemu-migrate returned"
        )


async def test_migration_to_a_destination_that_dies_leaves_the_source_running(
    guest_boot_files: GuestBootFiles,
    guest_layout: GuestLayout,
    guest_image: Path,
    tmp_path: Path,
    short_socket_dir: Path,
) -> None:
    monitor = short_socket_dir / "src.qmp"  # a second QMP monitor, to watch the migration
    with run_qemu_guest(
        guest_boot_files, guest_layout, guest_image, tmp_path, "src",
        extra_args=["-qmp", f"unix:{monitor},server=on,wait=off"],
    ) as source:  # fmt: skip
        source.wait_for_marker(BOOT_TIMEOUT, ok=True, min_pass=1)

        # 1. The destination is killed in the middle of the RAM migration.
        with run_qemu_guest(
            guest_boot_files, guest_layout, guest_image, tmp_path, "dst1", incoming=True
        ) as dest:
            config = MigrationConfig(
                source.qmp_socket, dest.qmp_socket, None, timeout_seconds=30,
                max_bandwidth_bytes=SLOW_BANDWIDTH,
            )  # fmt: skip
            failure: MigrationFailed | None = None

            async def migrate() -> None:
                nonlocal failure
                with pytest.raises(MigrationFailed) as caught:
                    await migrate_qemu_domain(config)
                failure = caught.value

            async with trio.open_nursery() as nursery:
                nursery.start_soon(migrate)
                # Kill it once RAM is flowing, as seen on the source's second monitor.
                with trio.fail_after(20):
                    async with open_qmp(monitor) as watcher:
                        while (await watcher.execute("query-migrate")).get("status") != "active":
                            await trio.sleep(0.05)
                        await trio.sleep(0.3)
                        kill_now(dest)
                        while (await watcher.execute("query-migrate")).get("status") == "active":
                            await trio.sleep(0.05)
                        migration_ended_as = (await watcher.execute("query-migrate"))["status"]
        assert migration_ended_as == "failed"
        assert failure is not None
        assert failure.source_resumed and failure.destination_stopped, str(failure)
        assert "failed" in failure.reason
        assert await qemu_status(source) == "running"
        resumed_at = time.monotonic()
        source.wait_for_marker(BOOT_TIMEOUT, ok=True, after=resumed_at)

        # 2. The migration takes longer than --timeout: cancelled, destination told to quit.
        with run_qemu_guest(
            guest_boot_files, guest_layout, guest_image, tmp_path, "dst2", incoming=True
        ) as dest:
            config = MigrationConfig(
                source.qmp_socket, dest.qmp_socket, None, timeout_seconds=1.5,
                max_bandwidth_bytes=SLOW_BANDWIDTH,
            )  # fmt: skip
            with pytest.raises(MigrationFailed, match="timed out") as caught:
                await migrate_qemu_domain(config)
            assert caught.value.source_resumed and caught.value.destination_stopped
            assert wait_until_exited(dest, timeout=10) == 0
        assert await qemu_status(source) == "running"
        resumed_at = time.monotonic()
        source.wait_for_marker(BOOT_TIMEOUT, ok=True, after=resumed_at)
        assert source.failures() == []

        # 3. After both failures the guest still migrates, here to a destination started with -S
        #    (paused after the incoming migration): qemu-migrate resumes it.
        with run_qemu_guest(
            guest_boot_files, guest_layout, guest_image, tmp_path, "dst3", incoming=True,
            extra_args=["-S"],
        ) as dest:  # fmt: skip
            # max-bandwidth sticks to the source QEMU: put back QEMU's default of 32 MiB/s.
            config = MigrationConfig(
                source.qmp_socket, dest.qmp_socket, None, timeout_seconds=30,
                max_bandwidth_bytes=32 << 20,
            )  # fmt: skip
            report = await migrate_qemu_domain(config)
            assert report.destination_resumed_by_us
            assert await qemu_status(dest) == "running"
            assert await qemu_status(source) == "postmigrate"
            dest.wait_for_passes(2, BOOT_TIMEOUT)
            assert dest.failures() == [] and source.failures() == []


async def test_qemu_migrate_refuses_a_destination_not_waiting_for_a_migration(
    guest_boot_files: GuestBootFiles, guest_layout: GuestLayout, guest_image: Path, tmp_path: Path
) -> None:
    # Two QEMUs without -incoming: nothing to migrate into.  Nothing must be touched.
    other_image = tmp_path / "other.img"
    other_image.write_bytes(guest_image.read_bytes())
    with (
        run_qemu_guest(guest_boot_files, guest_layout, guest_image, tmp_path, "a") as first,
        run_qemu_guest(
            guest_boot_files, guest_layout, other_image, tmp_path, "b",
            extra_args=["-S"],
        ) as second,
    ):  # fmt: skip
        with pytest.raises(UserError, match="-incoming defer"):
            await migrate_qemu_domain(MigrationConfig(first.qmp_socket, second.qmp_socket, None))
        assert await qemu_status(first) == "running"
