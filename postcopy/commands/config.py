"""`postcopy config`: rewrite a domain's xl, libvirt or QEMU config so its disks use NBD.

    postcopy config [--domain NAME] [--config F] (--xl FILE [--local] | --libvirt FILE |
                    --qemu-args FILE) [--in-place]
    postcopy config --domain NAME [--config F] --plan [--json]

The domain's policy comes from the policy file (`postcopy.policy`); the rewriting from
`postcopy.integrations` (for xl: `script=block-postcopy` disks; `--local`: the config for the
destination's next start once the disks are local). FILE may be `-` for standard input. The result
goes to standard output, or with `--in-place` back into FILE: first the original is copied to
`FILE.postcopy-bak`, then the new text replaces FILE; both writes go through a temporary file in the
same directory, fsync and rename, so a crash leaves either the old or the new file, never half of
one. A domain that is not in postcopy mode is printed unchanged (and an `--in-place` file is left
untouched), with a note on standard error.

Without `--domain`, the domain is the one the config names (`name = ...`, `<name>`, `-name`); with
both, they must agree.

`--plan` prints, from the policy alone, the commands one migration of the domain runs: the
`postcopy serve` line for the source host, a `postcopy receive` per disk for the destination, the
`postcopy source-frozen` lines for the switchover, and the NBD URI each disk is opened with
(`--json`: the same as one JSON object, for scripts).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postcopy.destination.settings import DestinationSettings, receive_arguments
from postcopy.errors import UserError
from postcopy.fsutil import write_file_atomically
from postcopy.integrations import Rewrite, libvirt, qemu, xl
from postcopy.policy import DomainPolicy, add_config_argument, load_config

BACKUP_SUFFIX = ".postcopy-bak"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "config",
        help="rewrite a domain's xl/libvirt/QEMU config so its disks use the lazy destination",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--domain", metavar="NAME", help="the domain (default: the config's name)")
    add_config_argument(parser)
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--xl", metavar="FILE", help="an xl domain config (`-` for stdin)")
    kind.add_argument("--libvirt", metavar="FILE", help="a libvirt domain XML (`-` for stdin)")
    kind.add_argument(
        "--qemu-args",
        metavar="FILE",
        help="a QEMU command line, shell-quoted or one argument per line (`-` for stdin)",
    )
    kind.add_argument(
        "--plan",
        action="store_true",
        help="print the serve/receive/source-frozen commands and URIs of the domain's migration",
    )
    parser.add_argument("--json", action="store_true", help="with --plan: print it as JSON")
    parser.add_argument(
        "--local",
        action="store_true",
        help="with --xl: the config for the destination once the disks are local (after the "
        "pivot): each postcopy disk opens its dest_file",
    )
    parser.add_argument(
        "--in-place",
        action="store_true",
        help=f"write the result back into FILE, keeping the original as FILE{BACKUP_SUFFIX}",
    )
    parser.set_defaults(func=run)


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def write_atomically(path: Path, data: str, mode: int | None = None) -> None:
    """Replace `path` with `data` durably, keeping `mode` (default 0644)."""
    write_file_atomically(path, data.encode("utf-8"), 0o644 if mode is None else mode)


def migration_plan(domain: DomainPolicy) -> dict[str, object]:
    """What one postcopy migration of `domain` runs, as data (see `--plan`)."""
    if not domain.is_postcopy:
        return {"domain": domain.name, "mode": domain.mode.value, "disks": []}
    serve: list[str] = ["postcopy", "serve"]
    source = domain.source
    if source is not None and source.socket is not None:
        serve += ["--socket", str(source.socket)]
    elif source is not None:
        serve += ["--listen", f"{source.host}:{source.port}"]
    disks = []
    for disk in domain.disks:
        serve.append(f"{disk.export}={disk.source_image}")
        state_dir = domain.state_dir(disk)
        dest = domain.dest_endpoint(disk)
        # the options come from the settings contract; a stable source identity keeps the map
        # valid if A's address changes between restarts
        settings = DestinationSettings(
            domain=domain.name,
            source=domain.source_endpoint(disk).uri() if source else "SOURCE-URI",
            dest=disk.dest_file,
            state_dir=state_dir,
            socket=dest.socket,
            listen=None if dest.socket is not None else (dest.host or "", dest.port),
            chunk_size=domain.chunk_size,
            bandwidth=domain.bandwidth,
            source_id=f"{domain.name}/{disk.device}",
            wait_for_source=True,
        )
        receive = ["postcopy", "receive", *receive_arguments(settings)]
        disks.append(
            {
                "device": disk.device,
                "source_image": str(disk.source_image),
                "dest_file": str(disk.dest_file),
                "export": disk.export,
                "state_dir": str(state_dir),
                "dest_uri": dest.uri(),
                "qemu_image_opts": qemu.image_opts(dest),
                "receive": receive,
                "source_frozen": ["postcopy", "source-frozen", "--state-dir", str(state_dir)],
            }
        )
    return {
        "domain": domain.name,
        "mode": domain.mode.value,
        "chunk_size": domain.chunk_size,
        "bandwidth": domain.bandwidth,
        "source": source.uri() if source else None,
        "serve": serve,
        "disks": disks,
    }


def _print_plan(domain: DomainPolicy, as_json: bool) -> None:
    plan = migration_plan(domain)
    if as_json:
        print(json.dumps(plan, indent=2))
        return
    if not domain.is_postcopy:
        print(f"# domain {domain.name}: {domain.mode.value} mode, nothing for postcopy to do")
        return
    disks: list[dict[str, Any]] = plan["disks"]  # type: ignore[assignment]
    cap = f"{domain.bandwidth} bytes/s" if domain.bandwidth else "none"
    print(
        f"# domain {domain.name}: postcopy, chunk size {domain.chunk_size} bytes, drain cap {cap}"
    )
    if domain.source is None:
        print(f"# no 'source' in {domain.config_file}: replace SOURCE-URI below")
    print("# on the source host (A), before the migration:")
    print(shlex.join(plan["serve"]))  # type: ignore[arg-type]
    print("# on the destination host (B), one per disk; each prints its URI:")
    for disk in disks:
        print(shlex.join(disk["receive"]))
    print("# the domain's disks then open:")
    for disk in disks:
        print(f"#   {disk['device']}: {disk['dest_uri']}")
    print("# at switchover, once the domain on A is paused for good:")
    for disk in disks:
        print(shlex.join(disk["source_frozen"]))


def run(args: argparse.Namespace) -> int:
    if args.plan:
        if not args.domain:
            raise UserError("--plan needs --domain NAME")
        _print_plan(load_config(args.config).domain(args.domain), args.json)
        return 0
    rewriters: dict[str, tuple[Callable[..., Rewrite], Callable[..., str | None]]] = {
        "xl": (xl.rewrite_xl, xl.domain_name),
        "libvirt": (libvirt.rewrite_libvirt, libvirt.domain_name),
        "qemu_args": (qemu.rewrite_qemu_args, qemu.domain_name),
    }
    kind = next(k for k in rewriters if getattr(args, k) is not None)
    if args.local:
        if kind != "xl":
            raise UserError("--local is for --xl configs")
        rewriters["xl"] = (functools.partial(xl.rewrite_xl, local=True), xl.domain_name)
    source = getattr(args, kind)
    if args.in_place and source == "-":
        raise UserError("--in-place needs a file, not standard input")
    rewrite, find_name = rewriters[kind]
    name = "<stdin>" if source == "-" else source
    text = _read(source)

    named = find_name(text) if kind == "qemu_args" else find_name(text, name)
    if args.domain and named and args.domain != named:
        raise UserError(f"{name} is the config of domain {named!r}, not {args.domain!r}")
    domain_name = args.domain or named
    if not domain_name:
        raise UserError(f"{name} names no domain; pass --domain NAME")

    domain = load_config(args.config).domain(domain_name)
    result = rewrite(text, domain, name)
    for note in result.notes:
        print(f"postcopy config: note: {note}", file=sys.stderr)

    if not args.in_place:
        sys.stdout.write(result.text)
        return 0
    path = Path(source)
    if not domain.is_postcopy or result.text == text:
        print(f"postcopy config: {path} left unchanged", file=sys.stderr)
        return 0
    mode = path.stat().st_mode & 0o7777
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    write_atomically(backup, text, mode)
    write_atomically(path, result.text, mode)
    print(
        f"postcopy config: rewrote {', '.join(result.changed)} in {path} (original in {backup})",
        file=sys.stderr,
    )
    return 0
