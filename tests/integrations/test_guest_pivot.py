"""The real guest keeps passing while its disk is pivoted from `postcopy receive` to the local file.

Real peers all the way: `postcopy serve` exports A's image, `postcopy receive` drains it into B's
file and serves it on a Unix socket, a TCG QEMU boots the self-checking guest from `-blockdev`
nodes on that socket (format node `vda` over nbd node `proto0`, as `postcopy config --qemu-args`
emits them), and once the drain is complete `pivot_disk` switches the running disk to B's file.
Then the receive is stopped: a guest that still passes reads and writes the local file only.

The longest guest I/O latency across the switch is read from QEMU's own latency histogram of the
device (`block-latency-histogram-set`), which counts the time a request waits while QEMU drains
the node for the reopen; it is printed, not asserted (no wall-clock asserts in tests).
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import trio

from postcopy.destination.gate import declare_source_frozen
from postcopy.integrations.qemu_pivot import PivotResult, pivot_disk, read_disks
from postcopy.integrations.qmp import QMPClient, open_qmp
from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.guestkit.qemu import GuestLayout, prepare_disk_image, run_qemu_guest
from postcopy.kit.guestkit.scenario import (
    run_postcopy_receive,
    run_postcopy_serve,
    untouched_regions_match,
)
from postcopy.policy import NbdEndpoint
from tests.guest.fixtures import (  # noqa: F401  (fixtures)
    guest_boot_files_fixture,
    guest_layout_fixture,
    short_socket_dir_fixture,
)

BOOT_TIMEOUT = 60
DRAIN_TIMEOUT = 120
# Latency histogram bins (ns): 1, 5, 10, 20, 50, 100, 200, 500 ms, 1 s.
BOUNDARIES_NS = [ms * 1_000_000 for ms in (1, 5, 10, 20, 50, 100, 200, 500, 1000)]


def _worst_bin(stats: dict[str, Any]) -> str:
    """The highest latency bin any read, write or flush of the device fell in."""
    worst = -1
    for kind in ("rd_latency_histogram", "wr_latency_histogram", "flush_latency_histogram"):
        bins = stats.get(kind, {}).get("bins", [])
        for position, count in enumerate(bins):
            if count:
                worst = max(worst, position)
    if worst < 0:
        return "no I/O"
    low = 0 if worst == 0 else BOUNDARIES_NS[worst - 1] // 1_000_000
    if worst >= len(BOUNDARIES_NS):
        return f">= {low} ms"
    return f"{low}-{BOUNDARIES_NS[worst] // 1_000_000} ms"


async def _device_stats(client: QMPClient, qdev_id: str) -> dict[str, Any]:
    for entry in await client.execute("query-blockstats"):
        if qdev_id in str(entry.get("qdev", "")):
            stats: dict[str, Any] = entry["stats"]
            return stats
    raise AssertionError(f"no blockstats for {qdev_id}")


async def _reset_histogram(client: QMPClient) -> None:
    await client.execute(
        "block-latency-histogram-set",
        {"id": "/machine/peripheral/vda-dev/virtio-backend", "boundaries": BOUNDARIES_NS},
    )


async def _pivot_and_measure(
    qmp: Path, receive_socket: Path, local_file: Path, window: float
) -> tuple[PivotResult, str, str, list[Any]]:
    with trio.fail_after(120):
        async with open_qmp(qmp) as client:
            await _reset_histogram(client)
            await trio.sleep(window)
            baseline = _worst_bin(await _device_stats(client, "vda-dev"))
            await _reset_histogram(client)
            result = await pivot_disk(client, NbdEndpoint(socket=receive_socket), local_file)
            await trio.sleep(window)
            across = _worst_bin(await _device_stats(client, "vda-dev"))
            disks = await read_disks(client)
            nodes = await client.execute("query-named-block-nodes", {"flat": True})
            assert not [n for n in nodes if n["drv"] == "nbd"], nodes
            return result, baseline, across, disks


def test_guest_keeps_passing_through_the_pivot_to_the_local_file(
    guest_boot_files: GuestBootFiles,
    guest_layout: GuestLayout,
    tmp_path: Path,
    short_socket_dir: Path,
) -> None:
    _run_pivot_scenario(guest_boot_files, guest_layout, tmp_path, short_socket_dir, stale=False)


def test_a_pivot_onto_a_stale_file_makes_the_guest_fail(
    guest_boot_files: GuestBootFiles,
    guest_layout: GuestLayout,
    tmp_path: Path,
    short_socket_dir: Path,
) -> None:
    """The control: pivoting onto A's image (without the guest's writes) is caught by the guest,
    so the passing run above means the guest really reads B's file after the switch."""
    _run_pivot_scenario(guest_boot_files, guest_layout, tmp_path, short_socket_dir, stale=True)


def _run_pivot_scenario(
    boot_files: GuestBootFiles,
    layout: GuestLayout,
    tmp_path: Path,
    short_socket_dir: Path,
    stale: bool,
) -> None:
    image_a = tmp_path / "a.img"
    image_b = tmp_path / "b.img"
    state_dir = tmp_path / "b.state"
    state_dir.mkdir()
    prepare_disk_image(image_a, layout, boot_files)
    stale_copy = tmp_path / "stale.img"
    shutil.copyfile(image_a, stale_copy)
    receive_socket = short_socket_dir / "B.sock"
    with ExitStack() as stack:
        source_uri = stack.enter_context(
            run_postcopy_serve(image_a, short_socket_dir / "A.sock", tmp_path)
        )
        receive = stack.enter_context(
            run_postcopy_receive(source_uri, image_b, state_dir, receive_socket, tmp_path)
        )
        declare_source_frozen(state_dir)  # nothing runs on A's image: it is frozen already
        guest = stack.enter_context(
            run_qemu_guest(boot_files, layout, receive.uri, tmp_path, "pivot")
        )
        guest.wait_for_marker(BOOT_TIMEOUT, ok=True, min_pass=1)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while receive.status().get("state") != "complete":
            assert time.monotonic() < deadline, f"drain not complete: {receive.status()}"
            assert receive.process.poll() is None, receive.log.read_text()
            time.sleep(0.1)
        guest.wait_for_passes(1, BOOT_TIMEOUT, after=time.monotonic())
        local = stale_copy if stale else image_b

        before_pivot = time.monotonic()
        result, baseline, across, disks = trio.run(
            _pivot_and_measure, guest.qmp_socket, receive_socket, local, 3.0
        )
        assert (result.format_node, result.old_nbd_node) == ("vda", "proto0")
        assert [(d.node, d.protocol_driver, d.filename) for d in disks] == [
            ("vda", "file", str(local))
        ]
        if stale:
            guest.wait_for_marker(BOOT_TIMEOUT, ok=False, after=before_pivot)
            return
        after_pivot = guest.wait_for_passes(2, BOOT_TIMEOUT, after=before_pivot)

        # Without the receive (nbdkit gone), the guest goes on: it uses the local file only.
        receive.process.terminate()
        receive.process.wait(timeout=30)
        stopped = time.monotonic()
        after_stop = guest.wait_for_passes(3, BOOT_TIMEOUT, after=stopped)
        failures = guest.failures()
        assert failures == [], f"{failures}\n{guest.console_tail()}"
        assert all(m.ok for m in after_pivot + after_stop)
        numbers = [m.pass_number for m in guest.markers]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
        print(
            f"\npivot: blockdev-reopen {result.reopen_seconds * 1000:.1f} ms; worst guest I/O "
            f"latency over {3.0:g} s: before {baseline}, across the pivot {across}"
        )
    assert untouched_regions_match(layout, image_a, image_b)
