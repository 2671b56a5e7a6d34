"""`postcopy digest [--chunk-size 64K] [--algorithm sha256-128] [--threads N] [--output FILE|-]
IMAGE`: the per-chunk digests of a frozen source image, for `postcopy verify` on Host B.

Run it on Host A next to `serve`, once the domain is stopped for good.  The digest file (format in
`postcopy.source.digest`) goes to `--output` (replaced atomically, so a failed run leaves no half
file) or to stdout (`-`, the default; refused when stdout is a terminal).  One summary line goes
to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from postcopy.errors import UserError
from postcopy.fsutil import write_file_atomically
from postcopy.source.digest import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_THREADS,
    compute_digests,
)
from postcopy.units import UnitError, format_size, parse_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "digest", help="per-chunk digests of a frozen source image (for postcopy verify)"
    )
    parser.add_argument("--chunk-size", default=str(DEFAULT_CHUNK_SIZE), metavar="SIZE",
                        help="the destination's chunk size (default 64K)")
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS), default=DEFAULT_ALGORITHM,
                        help=f"digest algorithm (default {DEFAULT_ALGORITHM})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"reading and hashing threads (default {DEFAULT_THREADS})")
    parser.add_argument("--output", "-o", default="-", metavar="FILE",
                        help="where the digest file goes (default -: stdout)")
    parser.add_argument("image", type=Path, metavar="IMAGE", help="the source image")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        chunk_size = parse_size(args.chunk_size)
    except UnitError as exc:
        raise UserError(f"--chunk-size: {exc}") from None
    to_stdout = args.output == "-"
    if to_stdout and sys.stdout.isatty():
        raise UserError("the digest file is binary: give --output FILE or redirect stdout")
    if not to_stdout and not Path(args.output).parent.is_dir():
        raise UserError(f"--output: directory {Path(args.output).parent} does not exist")
    digests = compute_digests(
        args.image, chunk_size, algorithm=args.algorithm, threads=args.threads
    )
    data = digests.encode()
    if to_stdout:
        sys.stdout.flush()
        view = memoryview(data)
        while view:
            view = view[os.write(sys.stdout.fileno(), view):]
    else:
        try:
            write_file_atomically(Path(args.output), data)
        except OSError as exc:
            raise UserError(f"cannot write {args.output}: {exc.strerror}") from None
    rate = digests.bytes_read / digests.seconds / (1 << 20) if digests.seconds else 0.0
    print(
        f"postcopy digest: {args.image}: {digests.chunk_count} chunks of "
        f"{format_size(chunk_size)} ({digests.hole_chunks} holes, not read), "
        f"{format_size(digests.bytes_read)} read in {digests.seconds:.2f} s ({rate:.0f} MiB/s), "
        f"{format_size(len(data))} of {digests.algorithm} digests",
        file=sys.stderr,
    )
    return 0
