"""`postcopy xl-pivot --domain NAME`: move a running Xen domain's disks off the lazy destination.

    postcopy xl-pivot --domain NAME [--config F] [--device DEV] [--keep-receive]

On the destination host, once each disk is complete, points the disk's device-mapper device
(`postcopy-<domain>-<device>`, made by `block-postcopy`) at a loop device of its local file,
disconnects NBD and stops `postcopy receive` (see `postcopy.integrations.xen.pivot`). One line per
disk; a disk that is not complete or not attached here is refused in one line (exit 2), with
nothing changed. Then `postcopy config --xl FILE --local` writes the domain's config for its next
start on this host.
"""

from __future__ import annotations

import argparse

from postcopy.errors import UserError
from postcopy.integrations.xen.pivot import PivotError, pivot_xen_disk
from postcopy.integrations.xl import block_script_target
from postcopy.policy import add_config_argument, load_config


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "xl-pivot", help="switch a Xen domain's complete disks from NBD to their local files"
    )
    parser.add_argument("--domain", required=True, metavar="NAME", help="the domain")
    add_config_argument(parser)
    parser.add_argument("--device", help="only this disk (default: every disk of the domain)")
    parser.add_argument(
        "--keep-receive", action="store_true", help="leave `postcopy receive` running"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    domain = load_config(args.config).domain(args.domain)
    if not domain.is_postcopy:
        raise UserError(f"domain {domain.name!r} is in {domain.mode.value} mode, not postcopy")
    disks = [domain.disk(args.device)] if args.device else list(domain.disks)
    for disk in disks:
        target = block_script_target(domain, disk)
        try:
            result = pivot_xen_disk(
                target, disk.dest_file, domain.state_dir(disk), stop_receive=not args.keep_receive
            )
        except PivotError as exc:
            raise UserError(str(exc)) from None
        stopped = ", receive stopped" if result.receive_stopped else ""
        print(
            f"{disk.device}: {result.dm_name} now on {result.loop_device} ({disk.dest_file}), "
            f"was {result.old_device}; I/O paused {result.suspended_seconds * 1000:.0f} ms{stopped}"
        )
    return 0
