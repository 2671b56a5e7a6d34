"""`postcopy receive`: run the lazy destination of one disk (nbdkit + the postcopy plugin).

    postcopy receive --source URI --dest FILE --state-dir DIR (--socket PATH | --listen HOST:PORT)
                     [--chunk-size N] [--wait-for-source] [--threads N]
                     [--source-timeout SECONDS] [--request-timeout SECONDS] [--bandwidth RATE]

Prints the NBD URI for the domain's disk config as its first stdout line, then serves in the
foreground until SIGINT/SIGTERM.  Every value is checked here, before anything starts: a bad
one is a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from nbdsrv.uri import parse_host_port, parse_nbd_uri
from postcopy.destination.blockmap import check_chunk_size
from postcopy.destination.receive import DEFAULT_THREADS, ReceiveConfig, run_receive
from postcopy.errors import UserError
from postcopy.units import UnitError, parse_rate, parse_size

DEFAULT_SOURCE_TIMEOUT = 180.0
DEFAULT_REQUEST_TIMEOUT = 10.0


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
        "--source-timeout",
        "--unreachable-timeout",
        dest="source_timeout",
        default=str(DEFAULT_SOURCE_TIMEOUT),
        metavar="SECONDS",
        help="how long guest reads of missing data wait for an unreachable source before they "
        f"fail with EIO (default {DEFAULT_SOURCE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--request-timeout",
        default=str(DEFAULT_REQUEST_TIMEOUT),
        metavar="SECONDS",
        help="a source request unanswered this long means a stalled source: reconnect "
        f"(default {DEFAULT_REQUEST_TIMEOUT:g})",
    )
    parser.add_argument(
        "--bandwidth",
        metavar="RATE",
        help="cap the background drain at RATE bytes/s per disk, e.g. 200M (= 200 MiB/s); "
        "guest misses are never held back (default: unlimited)",
    )
    parser.add_argument("--domain", help="the domain this disk belongs to (informational)")
    parser.set_defaults(func=run)


def _parse_listen(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, default_host="0.0.0.0", allow_port_zero=True)
    except ValueError:
        raise UserError(f"bad listen address {text!r}: expected HOST:PORT") from None


def _seconds(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{option} {text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{option} must be a positive number of seconds, not {text!r}")
    return value


def _bandwidth(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_rate(text)
    except UnitError as exc:
        raise UserError(f"--bandwidth: {exc} (e.g. 200M for 200 MiB/s)") from None


def _check_source_uri(uri: str) -> None:
    try:
        parse_nbd_uri(uri)
    except ValueError as exc:
        raise UserError(f"--source {uri!r} is not an NBD URI: {exc}") from None


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise UserError("--threads must be at least 1")
    check_chunk_size(args.chunk_size)
    _check_source_uri(args.source)
    source_timeout = _seconds("--source-timeout", args.source_timeout)
    request_timeout = _seconds("--request-timeout", args.request_timeout)
    bandwidth = _bandwidth(args.bandwidth)
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
        unreachable_timeout=source_timeout,
        request_timeout=request_timeout,
        bandwidth=bandwidth,
        domain=args.domain,
    )
    return run_receive(config)
