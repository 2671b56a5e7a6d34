"""`postcopy pivot --state-dir DIR --qmp SOCKET [--socket PATH] [--dest FILE]`: on Host B, once
a disk is `complete`, switch the running QEMU domain from the NBD disk to the local file, stop
that disk's receive and mark its state directory pivoted (a later receive on it refuses).

The disk is found by what it is: the nbd node on this disk's receive socket (read from the
receive's nbdkit unless `--socket`), and the format node above it.  A disk that is not complete,
or that QEMU's graph does not show as expected, is a one-line error (exit 2) and nothing
changes.  `postcopy migrate` runs the same step (`postcopy.migrate.pivot`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import trio

from postcopy.errors import UserError
from postcopy.integrations.qmp import QMPError, open_qmp
from postcopy.migrate.pivot import pivot_disk_of_state_dir


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "pivot", help="switch a running QEMU domain from a complete NBD disk to its local file"
    )
    parser.add_argument("--state-dir", required=True, type=Path, help="the receive state directory")
    parser.add_argument(
        "--qmp",
        required=True,
        type=Path,
        metavar="SOCKET",
        help="the domain's QEMU monitor (QMP) on this host",
    )
    parser.add_argument("--socket", type=Path, help="the receive's socket (default: found)")
    parser.add_argument("--dest", type=Path, help="the local file (default: the status record's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    async def pivot() -> dict[str, Any]:
        try:
            async with open_qmp(args.qmp) as client:
                return await pivot_disk_of_state_dir(
                    client, args.state_dir.absolute(), socket=args.socket, dest=args.dest
                )
        except QMPError as exc:
            raise UserError(f"QMP {args.qmp}: {exc}") from None

    result = trio.run(pivot)
    print(json.dumps(result, sort_keys=True))
    return 0
