"""`postcopy verify --state-dir DIR --digests FILE|- [--dest FILE] [--max-listed N] [--json]`:
check on Host B that the destination holds the source's bytes before A is released.

FILE is what `postcopy digest` wrote on Host A (`-`: read it from stdin, e.g. over ssh).  Every
chunk the guest has not written on B is compared (`postcopy.destination.verify`); it may run while
`postcopy receive` still serves the disk.  Exit status: 0 when every compared chunk matches, 1 on a
mismatch (the first N byte offsets are named, with the count), 2 when the two cannot be compared
(digests of another chunk size or image size, a corrupt or truncated digest file, a disk that is
not complete, a destination written around the block map), with one line on stderr and nothing
changed.  `--json` prints the report as one JSON object on stdout instead of the summary line
(`"result"`: `match` or `mismatch`), or, on exit 2, `{"result": "error", "kind": ..., "error":
...}` with kind `not-complete` (try again once receive has made the map durable), `in-use`,
`bad-digests` or `bad-input`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from postcopy.destination.verify import (
    DestinationInUseError,
    DestinationNotComplete,
    verify_destination,
)
from postcopy.errors import UserError
from postcopy.source.digest import DEFAULT_THREADS, DigestFormatError, DigestList

# A digest file is 16 bytes per chunk: 4 MiB per 16 GiB of disk at 64 KiB chunks.  Refuse to read
# more than this (a wrong file, /dev/zero) before parsing it.
MAX_DIGEST_FILE_BYTES = 1 << 32


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "verify", help="check the destination against the source's digests before release"
    )
    parser.add_argument("--state-dir", required=True, type=Path, help="the receive state directory")
    parser.add_argument("--digests", required=True, metavar="FILE",
                        help="the digest file of postcopy digest (- for stdin)")
    parser.add_argument("--dest", type=Path, metavar="FILE",
                        help="the destination file (default: the one the status record names)")
    parser.add_argument("--max-listed", type=int, default=20, metavar="N",
                        help="mismatching offsets to name (default 20; the count is exact)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"reading and hashing threads (default {DEFAULT_THREADS})")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def read_digest_file(name: str) -> DigestList:
    """Read and parse a digest file (`-`: stdin); one-line UserError when unusable."""
    what = "the digest file on stdin" if name == "-" else f"digest file {name}"
    try:
        if name == "-":
            data = sys.stdin.buffer.read(MAX_DIGEST_FILE_BYTES + 1)
        else:
            with open(name, "rb") as f:
                data = f.read(MAX_DIGEST_FILE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read {what}: {exc.strerror}") from None
    if len(data) > MAX_DIGEST_FILE_BYTES:
        raise UserError(f"{what} is larger than any digest file ({MAX_DIGEST_FILE_BYTES} bytes)")
    return DigestList.decode(data, what=what)


def error_kind(exc: UserError) -> str:
    """What kind of refusal this is, for tools reading `--json` (a caller may retry
    `not-complete` after a few seconds; the others need a person)."""
    if isinstance(exc, DestinationNotComplete):
        return "not-complete"
    if isinstance(exc, DestinationInUseError):
        return "in-use"
    if isinstance(exc, DigestFormatError):
        return "bad-digests"
    return "bad-input"


def run(args: argparse.Namespace) -> int:
    try:
        return verify(args)
    except UserError as exc:
        if args.json:  # tools get a record too; the one line still goes to stderr
            record = {"result": "error", "error": str(exc), "kind": error_kind(exc)}
            print(json.dumps(record, sort_keys=True))
        raise


def verify(args: argparse.Namespace) -> int:
    if args.max_listed < 0:
        raise UserError("--max-listed must be 0 or more")
    if args.threads < 1:
        raise UserError("--threads must be at least 1")
    digests = read_digest_file(args.digests)
    report = verify_destination(
        args.state_dir, digests, dest=args.dest, threads=args.threads, max_listed=args.max_listed
    )
    if args.json:
        print(json.dumps(report.to_record(), sort_keys=True))
    else:
        print(f"postcopy verify: {report.summary()}")
    return 0 if report.matched else 1
