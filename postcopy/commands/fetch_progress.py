"""`postcopy fetch-progress --state-dir DIR [--json]`: show a destination's status record.

This issue only prints it (`--json` as is; otherwise a one-line summary); the reading code lives
in `postcopy.status` so the live display can reuse it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from postcopy.status import process_alive, read_status


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "fetch-progress", help="show the progress of a receiving (destination) disk"
    )
    parser.add_argument("--state-dir", required=True, type=Path, help="the receive state directory")
    parser.add_argument("--json", action="store_true", help="print the status record as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    record = read_status(args.state_dir)
    if args.json:
        print(json.dumps(record, sort_keys=True))
        return 0
    size = record["size_bytes"] or 1
    percent = 100.0 * record["present_bytes"] / size
    eta = record.get("eta_seconds")
    running = "" if process_alive(int(record.get("pid", 0))) else " (not running)"
    print(
        f"{record['state']}{running}: {percent:.1f}% present of {record['size_bytes']} bytes, "
        f"{record['transferred_bytes']} transferred, {record['demand_fetches']} demand fetches, "
        f"eta {'-' if eta is None else f'{eta:.0f}s'}"
    )
    return 0
