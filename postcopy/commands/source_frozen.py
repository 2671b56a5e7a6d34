"""`postcopy source-frozen --state-dir DIR`: tell a waiting destination that the source is frozen.

Run it after the source domain has stopped writing its disk (at switchover).  A destination started
with `--wait-for-source` passes reads through until then; afterwards it keeps what it fetches and
starts draining.

It is meant for a running receive, so it does not take the state directory's lock (see
`postcopy.destination.statelock`): it writes nothing but the `source-frozen` file, atomically and
idempotently, which the engine polls; it never touches the map, the journal or the status.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from postcopy.destination.gate import declare_source_frozen


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "source-frozen",
        help="declare the source disk frozen so the destination starts keeping fetched data",
    )
    parser.add_argument("--state-dir", required=True, type=Path, help="the receive state directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    declare_source_frozen(args.state_dir)
    return 0
