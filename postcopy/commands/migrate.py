"""`postcopy migrate`: move a running domain and its disks to Host B with one command on Host A.

    postcopy migrate [--config F] --qmp SOCKET [--ssh PROGRAM] [--remote-postcopy CMD]
                     [--dest-qemu-args FILE | --dest-qmp SOCKET] [--migrate-address ADDR]
                     [--migrate-port N] [--source-address ADDR] [--tls-pki DIR]
                     [--remote-tls-pki DIR] [--record-dir DIR] [--keep] [--json] DOMAIN DEST
    postcopy migrate --resume [--config F] [--record-dir DIR] [--json] DOMAIN

Shaped like `virsh migrate` and `xl migrate`: DEST is reached with `PROGRAM DEST 'COMMAND'`
(`--ssh`, default `ssh`, split like a shell would, as `xl migrate -s`).  The steps and the failure
policy are in `postcopy.migrate.orchestrate`.  Exit status: 0 migrated; 1 failed and rolled back
(the domain runs on A); 2 a mistake (one line); 3 detached by Ctrl-C after the switchover (finish
with --resume); 4 verification failed (A kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import trio

from postcopy.errors import UserError
from postcopy.migrate.orchestrate import (
    DEFAULT_MIGRATE_PORT,
    DEFAULT_RECORD_DIR,
    MigrateOptions,
    resume_migration,
    run_migration,
)
from postcopy.migrate.qemu import DEFAULT_RECONNECT_DELAY
from postcopy.policy import add_config_argument, load_config


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "migrate", help="migrate a running domain and its disks to another host (run on A)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )  # fmt: skip
    add_config_argument(parser)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="pick up a detached or interrupted migration of DOMAIN",
    )
    parser.add_argument("--qmp", type=Path, metavar="SOCKET", help="A's QEMU monitor (QMP)")
    parser.add_argument(
        "--ssh",
        default="ssh",
        metavar="PROGRAM",
        help="how to run a command on DEST: PROGRAM DEST 'COMMAND' (default ssh)",
    )
    parser.add_argument(
        "--remote-postcopy",
        default="postcopy",
        metavar="CMD",
        help="the postcopy command on DEST (default: postcopy)",
    )
    dest = parser.add_mutually_exclusive_group()
    dest.add_argument(
        "--dest-qemu-args",
        type=Path,
        metavar="FILE",
        help="B's QEMU command line before the rewrite (default: A's own)",
    )
    dest.add_argument(
        "--dest-qmp",
        type=Path,
        metavar="SOCKET",
        help="a QEMU already started on B with -incoming defer",
    )
    parser.add_argument(
        "--migrate-address",
        metavar="ADDR",
        help="B's address for the memory stream (default: DEST)",
    )
    parser.add_argument("--migrate-port", type=int, default=DEFAULT_MIGRATE_PORT)
    parser.add_argument(
        "--source-address",
        metavar="ADDR",
        help="the address serve binds on A (default: A's address towards B)",
    )
    parser.add_argument(
        "--tls-pki",
        type=Path,
        metavar="DIR",
        help="A's PKI dir (ca-cert.pem, server-cert.pem, server-key.pem)",
    )
    parser.add_argument(
        "--remote-tls-pki",
        type=Path,
        metavar="DIR",
        help="B's PKI dir with client-cert.pem and client-key.pem (default: the same path)",
    )
    parser.add_argument(
        "--record-dir",
        type=Path,
        default=DEFAULT_RECORD_DIR,
        help=f"A's records of migrations (default {DEFAULT_RECORD_DIR})",
    )
    parser.add_argument(
        "--persist",
        type=Path,
        metavar="FILE",
        help="where B keeps the domain's QEMU arguments on its local disks",
    )
    parser.add_argument(
        "--reconnect-delay",
        type=int,
        default=DEFAULT_RECONNECT_DELAY,
        help="seconds B's QEMU holds guest I/O while a receive restarts",
    )
    parser.add_argument(
        "--keep", action="store_true", help="on a failure, keep B's files (for a post-mortem)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON event per step on stdout")
    parser.add_argument("domain", metavar="DOMAIN")
    parser.add_argument("dest", metavar="DEST", nargs="?", help="host B")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    domain = load_config(args.config).domain(args.domain)
    if args.resume:
        if args.dest is not None:
            raise UserError("--resume takes the DOMAIN only (B comes from the record)")
        return int(trio.run(resume_migration, domain, args.record_dir, args.json))
    if args.dest is None:
        raise UserError("give DEST, the host to migrate to")
    if args.qmp is None:
        raise UserError("give --qmp SOCKET, the monitor of the domain's QEMU on A")
    dest_args = None
    if args.dest_qemu_args is not None:
        try:
            dest_args = args.dest_qemu_args.read_text()
        except OSError as exc:
            raise UserError(f"cannot read {args.dest_qemu_args}: {exc.strerror}") from None
    if not 0 < args.migrate_port < 65536:
        raise UserError(f"--migrate-port {args.migrate_port} is not a port")
    options = MigrateOptions(
        domain=domain, dest_host=args.dest, source_qmp=args.qmp, ssh=args.ssh,
        remote_postcopy=args.remote_postcopy, dest_qemu_args=dest_args, dest_qmp=args.dest_qmp,
        migrate_address=args.migrate_address, migrate_port=args.migrate_port,
        source_address=args.source_address, pki_dir=args.tls_pki,
        remote_pki_dir=args.remote_tls_pki, record_dir=args.record_dir,
        persist_path=args.persist, keep=args.keep, as_json=args.json,
        reconnect_delay=args.reconnect_delay,
    )  # fmt: skip
    return int(trio.run(run_migration, options))
