"""`postcopy qemu-migrate`: live-migrate a running QEMU guest over QMP and open the disk gate.

    postcopy qemu-migrate --source-qmp A.sock --dest-qmp B.sock --state-dir DIR [--uri URI]
                          [--timeout S] [--max-bandwidth BYTES] [--json]

The destination QEMU must be started with `-incoming defer` on the NBD URI that
`postcopy receive --wait-for-source --state-dir DIR` printed.  At switchover (source paused and
flushed) the gate of DIR is declared frozen, then the destination runs.  `--shared-storage`
instead of `--state-dir` migrates a guest whose disk both hosts see (no gate).  On failure the
destination is stopped, the source resumed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from postcopy.errors import UserError
from postcopy.integrations.qemu_migrate import MigrationConfig, MigrationFailed, migrate_qemu_domain
from postcopy.integrations.qmp import QMPError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "qemu-migrate",
        help="live-migrate a QEMU guest over QMP, opening the postcopy disk gate at switchover",
    )
    parser.add_argument("--source-qmp", required=True, type=Path, help="source QEMU's QMP socket")
    parser.add_argument("--dest-qmp", required=True, type=Path, help="destination's QMP socket")
    gate = parser.add_mutually_exclusive_group(required=True)
    gate.add_argument("--state-dir", type=Path, help="state directory of `postcopy receive`")
    gate.add_argument(
        "--shared-storage", action="store_true", help="both hosts see the same disk: no gate"
    )
    parser.add_argument(
        "--uri", help="migration stream URI (default: a Unix socket in a temporary directory)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument(
        "--max-bandwidth", type=int, help="RAM migration cap in bytes/s (QEMU's default: 32 MiB/s)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = MigrationConfig(
        source_qmp=args.source_qmp,
        dest_qmp=args.dest_qmp,
        state_dir=None if args.shared_storage else args.state_dir,
        migration_uri=args.uri,
        timeout_seconds=args.timeout,
        max_bandwidth_bytes=args.max_bandwidth,
    )
    try:
        report = trio.run(migrate_qemu_domain, config)
    except QMPError as exc:
        # Raised only before anything was changed (a socket missing, a QEMU not answering).
        raise UserError(str(exc)) from exc
    except MigrationFailed as exc:
        if args.json:
            print(
                json.dumps(
                    {
                        "status": "failed",
                        "reason": exc.reason,
                        "source_resumed": exc.source_resumed,
                        "destination_stopped": exc.destination_stopped,
                    }
                )
            )
        print(f"postcopy qemu-migrate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(
            f"migrated: RAM migration {report.qemu_total_time_ms} ms, "
            f"downtime {report.qemu_downtime_ms} ms (QEMU), "
            f"destination running {report.completed_to_running_seconds * 1000:.0f} ms "
            f"after completion"
        )
    return 0
