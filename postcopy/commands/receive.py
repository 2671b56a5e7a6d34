"""`postcopy receive`: run the lazy destination of one disk (nbdkit + the postcopy plugin).

    postcopy receive --source URI --dest FILE --state-dir DIR (--socket PATH | --listen HOST:PORT)
                     [--chunk-size N] [--wait-for-source] [--threads N]
                     [--source-timeout SECONDS] [--request-timeout SECONDS] [--bandwidth RATE]

The options are the receive options of `postcopy.destination.settings.DestinationSettings`: the
parser is built from them (names, aliases, help, defaults), and `from_options` reads their texts.
Prints the NBD URI for the domain's disk config as its first stdout line, then serves in the
foreground until SIGINT/SIGTERM.  Every value is checked here, before anything starts: a bad
one is a one-line error naming the option (exit 2).
"""

from __future__ import annotations

import argparse

from postcopy.destination.receive import run_receive
from postcopy.destination.settings import (
    RECEIVE_OPTIONS,
    DestinationSettings,
    from_options,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "receive", help="serve a disk on the destination, fetching it lazily from the source"
    )
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for setting in RECEIVE_OPTIONS:
        where: argparse._ActionsContainer = parser
        if setting.one_of is not None:
            if setting.one_of not in groups:
                groups[setting.one_of] = parser.add_mutually_exclusive_group(required=True)
            where = groups[setting.one_of]
        if setting.is_flag:
            where.add_argument(
                *setting.options, dest=setting.name, action="store_true",
                help=setting.help_text(),
            )  # fmt: skip
        else:
            where.add_argument(
                *setting.options, dest=setting.name, metavar=setting.kind.metavar,
                required=setting.required, help=setting.help_text(),
            )  # fmt: skip
    parser.set_defaults(func=run)


def settings_from_arguments(args: argparse.Namespace) -> DestinationSettings:
    """The settings the parsed receive options ask for (UserError naming a bad option)."""
    return from_options({setting.name: getattr(args, setting.name) for setting in RECEIVE_OPTIONS})


def run(args: argparse.Namespace) -> int:
    return run_receive(settings_from_arguments(args))
