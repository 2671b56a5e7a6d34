"""`postcopy demo [--size 256M] [--rate 1G]`: watch a real two-host migration on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from postcopy.errors import UserError
from postcopy.kit.demo import DemoConfig, run_demo
from postcopy.units import UnitError, parse_bit_rate, parse_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="migrate a sample disk between two hosts on this machine, live"
    )
    parser.add_argument("--size", default="256M", help="sample disk size (default 256M)")
    parser.add_argument(
        "--rate", default="1G", help="link rate in bits/s between the hosts (default 1G; 0: none)"
    )
    parser.add_argument("--chunk-size", default="64K", help="block map chunk size (default 64K)")
    parser.add_argument("--workdir", type=Path, help="where to create the hosts' files")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--no-live", action="store_true", help="plain progress lines")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this long")
    parser.add_argument(
        "--vm", action="store_true",
        help="migrate a real QEMU guest (TCG) with its disk, Unix sockets only "
             "(postcopy.kit.vm_demo)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        size = parse_size(args.size)
        rate = parse_bit_rate(args.rate) if args.rate not in ("0", "none") else None
        chunk_size = parse_size(args.chunk_size)
    except UnitError as exc:
        raise UserError(str(exc)) from None
    if size < 1024 * 1024 or size % (64 * 1024):
        raise UserError("--size must be at least 1M and a multiple of 64K")
    common: dict[str, Any] = {
        "rate_bits_per_second": rate,
        "chunk_size": chunk_size,
        "workdir": args.workdir,
        "keep": args.keep,
        "live": False if args.no_live else None,
        "timeout": args.timeout,
    }
    if args.vm:
        from postcopy.kit.vm_demo import VmDemoConfig, run_vm_demo

        return 0 if run_vm_demo(VmDemoConfig(disk_size=size, **common)).passed else 1
    config = DemoConfig(size=size, **common)
    summary = run_demo(config)
    return 0 if summary.passed else 1
