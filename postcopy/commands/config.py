"""`postcopy config`: rewrite a domain's xl, libvirt or QEMU config so its disks use NBD.

    postcopy config [--domain NAME] [--config F] (--xl FILE | --libvirt FILE | --qemu-args FILE)
                    [--in-place]

The domain's policy comes from the policy file (`postcopy.config`); the rewriting from
`postcopy.integrations`. FILE may be `-` for standard input (a libvirt qemu hook passes the domain
XML that way). The result goes to standard output, or with `--in-place` back into FILE: first the
original is copied to `FILE.postcopy-bak`, then the new text replaces FILE; both writes go through
a temporary file in the same directory, fsync and rename, so a crash leaves either the old or the
new file, never half of one. A domain that is not in postcopy mode is printed unchanged (and an
`--in-place` file is left untouched), with a note on standard error.

Without `--domain`, the domain is the one the config names (`name = ...`, `<name>`, `-name`); with
both, they must agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from postcopy.config import add_config_argument, load_config
from postcopy.errors import UserError
from postcopy.integrations import Rewrite, libvirt, qemu, xl

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
    """Replace `path` with `data` via a temporary file in the same directory, fsync and rename."""
    directory = path.parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def run(args: argparse.Namespace) -> int:
    rewriters: dict[str, tuple[Callable[..., Rewrite], Callable[..., str | None]]] = {
        "xl": (xl.rewrite_xl, xl.domain_name),
        "libvirt": (libvirt.rewrite_libvirt, libvirt.domain_name),
        "qemu_args": (qemu.rewrite_qemu_args, qemu.domain_name),
    }
    kind = next(k for k in rewriters if getattr(args, k) is not None)
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
