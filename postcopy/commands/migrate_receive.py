"""`postcopy migrate-receive --domain NAME --migration-dir DIR [--keep]`: Host B's side of
`postcopy migrate`, started by it over the remote command (like `xl migrate-receive`); not for
people.  It reads requests on stdin and answers on stdout (`postcopy.migrate.agent`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from postcopy.migrate.agent import run_agent


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "migrate-receive", help="Host B's side of postcopy migrate (started by it over ssh)"
    )
    parser.add_argument("--domain", required=True)
    parser.add_argument("--migration-dir", required=True, type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_agent(args.domain, args.migration_dir.absolute(), args.keep)
