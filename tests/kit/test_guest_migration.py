"""The proof on a real guest: a QEMU VM live-migrated while postcopy moves its disk.

Host A runs the guest on a local raw image and `postcopy serve` exports that image read-only;
Host B runs `postcopy receive --wait-for-source` and a QEMU started with `-incoming defer` on the
URI it printed; `postcopy qemu-migrate` moves the RAM and opens the gate at switchover (see
postcopy/guestkit/scenario.py).  The guest checks its own disk every pass: the data written
before boot, everything it wrote on A and on B, and a region that must stay zero.

The negative control feeds B a copy of A's disk taken a few passes too early: the guest's own
re-reads must catch it, and the same checks that pass above must fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.guestkit.scenario import (
    LINK_RATE,
    SCENARIO_LAYOUT,
    check_scenario,
    run_postcopy_scenario,
)


def test_guest_keeps_passing_while_postcopy_moves_its_disk(
    guest_boot_files: GuestBootFiles, tmp_path: Path
) -> None:
    result = run_postcopy_scenario(
        guest_boot_files, tmp_path, SCENARIO_LAYOUT, link_rate=LINK_RATE
    )
    check_scenario(result)
    assert result.passes_during_drain >= 2, result.passes_during_drain
    status = result.final_status
    # The guest really ran on a lazy disk: it missed chunks that B fetched on demand, the rest was
    # drained, and holes were not transferred.
    assert status["demand_fetches"] > 0, status
    assert status["present_bytes"] == status["size_bytes"]
    assert status["transferred_bytes"] < status["size_bytes"]
    assert result.report is not None
    print(
        f"boot {result.boot_seconds:.2f} s, RAM migration {result.report.qemu_total_time_ms} ms, "
        f"downtime {result.report.qemu_downtime_ms} ms, first marker on B "
        f"{result.first_marker_after_switchover_seconds:.2f} s after switchover, drain "
        f"{result.drain_seconds:.2f} s, {result.passes_during_drain} passes during the drain, "
        f"{status['demand_fetches']} demand fetches"
    )


def test_a_destination_fed_a_stale_disk_makes_the_guest_fail(
    guest_boot_files: GuestBootFiles, tmp_path: Path
) -> None:
    result = run_postcopy_scenario(
        guest_boot_files, tmp_path, SCENARIO_LAYOUT, stale_source=True
    )
    assert [m for m in result.source_markers if not m.ok] == []
    dest_failures = [m for m in result.dest_markers if not m.ok]
    assert dest_failures, f"the guest did not notice the stale disk\n{result.logs}"
    assert "written-data" in dest_failures[0].detail
    print(f"stale disk caught on B: pass {dest_failures[0].pass_number} {dest_failures[0].detail}")
    with pytest.raises(AssertionError):
        check_scenario(result)
