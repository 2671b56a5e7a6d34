"""Measure the test guest's boot and QEMU live migration over several runs.

    .venv/bin/python -m bench.bench_guest [--runs 10] [--mode shared|postcopy] [--no-link]
    .venv/bin/python -m bench guest       (the defaults: 10 runs, shared storage)

Each run boots a fresh guest on a fresh image, lets it pass twice, migrates it with
`migrate_qemu_domain`, and waits for passes on the destination.  It prints one line per run and
the median and worst of: boot time (QEMU start to first marker), QEMU's RAM migration time and
downtime, the time from `qemu-migrate` returning to the destination's first OK, and (postcopy
mode) the drain time and fetches.  Any FAIL marker aborts the run with an error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from postcopy.integrations.qemu_migrate import MigrationConfig, migrate_qemu_domain
from postcopy.kit.guestkit.build import GuestBootFiles, ensure_guest_boot_files
from postcopy.kit.guestkit.qemu import GuestLayout, prepare_disk_image, run_qemu_guest
from postcopy.kit.guestkit.scenario import LINK_RATE, SCENARIO_LAYOUT, measure_postcopy_run


def measure_shared_storage_run(boot_files: GuestBootFiles, workdir: Path) -> dict[str, float]:
    layout = GuestLayout()
    image = workdir / "guest.img"
    prepare_disk_image(image, layout, boot_files)
    with (
        run_qemu_guest(boot_files, layout, image, workdir, "src") as source,
        run_qemu_guest(boot_files, layout, image, workdir, "dst", incoming=True) as dest,
    ):
        first = source.wait_for_marker(30, ok=None)
        source.wait_for_marker(30, ok=True, min_pass=2)
        report = trio.run(
            migrate_qemu_domain, MigrationConfig(source.qmp_socket, dest.qmp_socket, None)
        )
        returned = time.monotonic()
        first_ok = dest.wait_for_marker(30, ok=True)
        dest.wait_for_passes(3, 30)
        if source.failures() or dest.failures():
            raise RuntimeError(f"FAIL marker: {source.failures() + dest.failures()}")
    return {
        "boot_s": first.seen_at - source.started_at,
        "ram_migration_ms": report.qemu_total_time_ms,
        "downtime_ms": report.qemu_downtime_ms,
        "first_ok_after_switchover_s": first_ok.seen_at - returned,
    }


def summarise(runs: list[dict[str, Any]]) -> str:
    lines = []
    for key in runs[0]:
        values = [float(run[key]) for run in runs]
        lines.append(
            f"{key:32s} median {statistics.median(values):9.3f}  min {min(values):9.3f}  "
            f"max {max(values):9.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the measurements; `argv` defaults to the command line (names of other benchmarks
    given to `python -m bench` are ignored)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--mode", choices=["shared", "postcopy"], default="shared")
    parser.add_argument(
        "--no-link", action="store_true", help="postcopy mode: no rate-limited relay"
    )
    args, _other_benchmarks = parser.parse_known_args(argv)
    boot_files = ensure_guest_boot_files()
    runs = []
    for number in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="pcg-measure-") as directory:
            if args.mode == "shared":
                result = measure_shared_storage_run(boot_files, Path(directory))
            else:
                link = None if args.no_link else LINK_RATE
                result = measure_postcopy_run(boot_files, Path(directory), SCENARIO_LAYOUT, link)
        runs.append(result)
        print(f"run {number}: " + ", ".join(f"{k}={v:.3f}" for k, v in result.items()))
        sys.stdout.flush()
    print(summarise(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
