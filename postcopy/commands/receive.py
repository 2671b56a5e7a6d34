"""`postcopy receive`: run the lazy destination of one disk (nbdkit + the postcopy plugin).

    postcopy receive --source URI --dest FILE --state-dir DIR (--socket PATH | --listen HOST:PORT)
                     [--chunk-size N] [--wait-for-source] [--threads N]

Prints the NBD URI for the domain's disk config as its first stdout line, then serves in the
foreground until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from postcopy.errors import UserError
from postcopy.receive import DEFAULT_THREADS, ReceiveConfig, run_receive


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in units else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(digits) * factor


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "receive", help="serve a disk on the destination, fetching it lazily from the source"
    )
    parser.add_argument("--source", required=True, metavar="URI", help="the source's NBD URI")
    parser.add_argument("--dest", required=True, type=Path, help="the local (sparse) disk file")
    parser.add_argument("--state-dir", required=True, type=Path, help="block map and status")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path, metavar="PATH", help="serve on this Unix socket")
    where.add_argument("--listen", metavar="HOST:PORT", help="serve on this TCP address")
    parser.add_argument("--chunk-size", type=_size, default=64 * 1024, help="default 64K")
    parser.add_argument(
        "--wait-for-source",
        action="store_true",
        help="keep nothing from the source until `postcopy source-frozen`",
    )
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="nbdkit threads")
    parser.add_argument("--export-name", help="the source export (default: the URI's)")
    parser.add_argument("--source-id", help="identifies the source in the state (default: URI)")
    parser.add_argument(
        "--unreachable-timeout",
        type=float,
        help="seconds a guest read of missing data waits for an unreachable source (default 30)",
    )
    parser.add_argument("--domain", help="the domain this disk belongs to (informational)")
    parser.set_defaults(func=run)


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UserError(f"bad listen address {text!r}: expected HOST:PORT")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise UserError("--threads must be at least 1")
    config = ReceiveConfig(
        source=args.source,
        dest=args.dest.absolute(),
        state_dir=args.state_dir.absolute(),
        socket_path=args.socket.absolute() if args.socket else None,
        listen=_parse_listen(args.listen) if args.listen else None,
        chunk_size=args.chunk_size,
        wait_for_source=args.wait_for_source,
        threads=args.threads,
        export_name=args.export_name,
        source_id=args.source_id,
        unreachable_timeout=args.unreachable_timeout,
        domain=args.domain,
    )
    return run_receive(config)
