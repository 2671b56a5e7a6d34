"""The `postcopy` command line: a thin shell over the library.

Each subcommand lives in its own module under `postcopy.commands` and offers two names:
`register(subparsers)`, which adds its argparse parser and sets `run` as the parser's default
`func`, and `run(args) -> int`, which turns the parsed arguments into a config object and calls one
service function.  Modules are discovered, so adding a command touches no shared file.  Errors that
an operator can fix (`postcopy.errors.UserError`) print as one line and exit 2.

One command lives outside `postcopy.commands`: `postcopy demo` belongs to the test and demo kit
(`postcopy.kit`, which product code never imports), so it is loaded by name from `KIT_COMMANDS`.
This table is the one door from the product into the kit (see ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn

from postcopy import commands
from postcopy.errors import UserError

# Subcommands that live in the kit, loaded by module name (the only product-to-kit reference).
KIT_COMMANDS = ("postcopy.kit.demo_command",)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes print one line (`postcopy receive: error: ...`, no usage dump), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def one_line(text: str) -> str:
    """Line breaks (from arguments echoed in a message) shown escaped: an error is one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def version() -> str:
    """The installed distribution's version (`postcopy --version`; `migrate` compares it with
    Host B's)."""
    try:
        return importlib.metadata.version("postcopy")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="postcopy",
        description="Post-copy live migration of VM disks over NBD.",
    )
    parser.add_argument("--version", action="version", version=f"postcopy {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [
        f"{commands.__name__}.{module_info.name}"
        for module_info in pkgutil.iter_modules(commands.__path__)
        if not module_info.name.startswith("_")
    ]
    for name in sorted([*names, *KIT_COMMANDS], key=lambda name: name.rpartition(".")[2]):
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"postcopy {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def fetch_progress_main(argv: Sequence[str] | None = None) -> int:
    """The `fetch-progress` console script: the same as `postcopy fetch-progress`."""
    return main(["fetch-progress", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
