"""`postcopy fetch-progress` (and the `fetch-progress` script): where every receiving disk stands.

Which disks.  With no argument, every disk of every postcopy domain in the policy file
(`--config`, else $POSTCOPY_CONFIG, else /etc/postcopy/domains.toml), each at its state directory
`<state_root>/<domain>/<device>`.  `--domain NAME` (repeatable) shows that domain's disks;
`--state-dir DIR` (repeatable) adds a disk by its state directory, without reading the policy.

What is shown.  Each disk's status record (`postcopy.destination.status`, written by the engine) is
read and its writer's pid checked; `postcopy.progress_display` draws them as one rich table (bars,
bytes, rates, ETA, faults and latency, reconnects, state; a total row per domain).  A disk whose
record cannot be read is an error row, not a crash.  `--watch` redraws the table in place
(`rich.live.Live`, every `--interval` seconds, 0.25 by default) until every shown disk is complete,
then exits 0 (a failed or stopped disk keeps it going: receive may be restarted, and the display
says so); Ctrl-C exits 130 and SIGTERM 143, without a traceback and with the cursor shown again
(when stdout is not a terminal, only the last table is printed).  `--json` prints the records for
tools: for exactly one `--state-dir`, the record itself (one line); otherwise a list of `{"domain",
"disk", "state_dir", "writer_running", "record"}` objects, with `"error"` in place of `"record"` for
an unreadable disk.  With `--watch`, `--json` prints one such line per interval.

One `--state-dir`, as before: an unusable directory is a one-line error (exit 2); a readable record
exits 0 whatever its state (the state is in the output), and when stdout is not a terminal the
plain output is the one-line summary
`STATE[ (not running)]: P% present of N bytes, T transferred, F demand fetches, eta E`
(followed by `, error: REASON` when the state is `failed`).

Exit status of the other forms: 0 when every disk is readable and none failed, 1 when a disk
failed or its writer stopped before completion, 2 when a state directory is missing or unreadable
(or the arguments or policy are wrong).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from postcopy.destination.status import process_alive, read_status, status_path
from postcopy.errors import UserError
from postcopy.policy import add_config_argument, load_config
from postcopy.progress_display import DiskView, render_progress

DEFAULT_INTERVAL = 0.25
PLAIN_WIDTH = 120  # the table's width when stdout is not a terminal (unless $COLUMNS)

EXIT_OK = 0
EXIT_DISK_FAILED = 1
EXIT_UNREADABLE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class _Terminated(Exception):
    """SIGTERM arrived while watching: leave the terminal as it was (cursor shown), then exit."""


@dataclass(frozen=True)
class DiskTarget:
    """A disk to show: its domain (None when named by directory), its name and state directory."""

    domain: str | None
    disk: str
    state_dir: Path


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.01 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} must be between 0.01 and 3600 seconds")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "fetch-progress",
        help="show the progress of receiving (destination) disks",
        description="Show where every destination disk stands: by default every disk of every "
        "postcopy domain in the policy file.",
    )
    add_config_argument(parser)
    parser.add_argument(
        "--domain", action="append", default=[], metavar="NAME",
        help="show this domain's disks (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--state-dir", action="append", default=[], type=Path, metavar="DIR",
        help="show the disk received into this state directory (repeatable)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the status records as JSON")
    parser.add_argument(
        "--watch", action="store_true",
        help="keep refreshing until every shown disk is complete (Ctrl-C stops)",
    )  # fmt: skip
    parser.add_argument(
        "--interval", type=_positive_seconds, default=DEFAULT_INTERVAL, metavar="SECONDS",
        help=f"refresh period with --watch (default {DEFAULT_INTERVAL})",
    )  # fmt: skip
    parser.set_defaults(func=run)


def resolve_targets(
    config_path: str | None, domains: Sequence[str], state_dirs: Sequence[Path]
) -> list[DiskTarget]:
    """The disks to show, in the order asked (the policy file's order when nothing is named)."""
    targets: list[DiskTarget] = []
    if domains or not state_dirs:
        config = load_config(config_path)
        if domains:
            for name in domains:
                domain = config.domain(name)
                if not domain.is_postcopy:
                    why = "is not listed" if not domain.listed else f"has mode {domain.mode.value}"
                    raise UserError(
                        f"domain {name!r} {why} in {config.path}: only postcopy domains have "
                        "disks to show"
                    )
                targets += [DiskTarget(name, d.device, domain.state_dir(d)) for d in domain.disks]
        else:
            targets += [
                DiskTarget(domain.name, disk.device, domain.state_dir(disk))
                for domain, disk in config.postcopy_disks()
            ]
            if not targets:
                raise UserError(
                    f"no postcopy domains in {config.path} "
                    "(name a policy file with --config, or disks with --state-dir)"
                )
    targets += [DiskTarget(None, path.name or str(path), path) for path in state_dirs]
    return targets


def read_record(state_dir: Path) -> dict[str, Any]:
    """`read_status`, with a record that is not UTF-8 also reported as a `UserError`."""
    try:
        return read_status(state_dir)
    except UnicodeDecodeError:
        raise UserError(f"{status_path(state_dir)} is not a valid status record") from None


def read_view(target: DiskTarget) -> DiskView:
    """Read one disk's record; an unusable state directory becomes an error view."""
    try:
        record = read_record(target.state_dir)
    except UserError as exc:
        return DiskView(target.domain, target.disk, target.state_dir, error=str(exc))
    except OSError as exc:
        error = f"cannot read {target.state_dir}: {exc.strerror or exc}"
        return DiskView(target.domain, target.disk, target.state_dir, error=error)
    pid = record.get("pid")
    running = process_alive(pid) if isinstance(pid, int) and not isinstance(pid, bool) else None
    return DiskView(target.domain, target.disk, target.state_dir, record, None, running)


def exit_status(views: Sequence[DiskView]) -> int:
    """2 if a disk is unreadable, else 1 if one failed or stopped, else 0."""
    if any(view.record is None for view in views):
        return EXIT_UNREADABLE
    if any(view.failed for view in views):
        return EXIT_DISK_FAILED
    return EXIT_OK


def json_document(views: Sequence[DiskView]) -> list[dict[str, Any]]:
    """The `--json` list form: one object per disk."""
    entries: list[dict[str, Any]] = []
    for view in views:
        entry: dict[str, Any] = {
            "domain": view.domain,
            "disk": view.disk,
            "state_dir": str(view.state_dir),
            "writer_running": view.writer_running,
        }
        if view.record is not None:
            entry["record"] = view.record
        else:
            entry["error"] = view.error
        entries.append(entry)
    return entries


def one_line_summary(record: dict[str, Any]) -> str:
    """The plain one-line form of one record (kept stable for scripts)."""
    size = record["size_bytes"] or 1
    percent = 100.0 * record["present_bytes"] / size
    eta = record.get("eta_seconds")
    running = "" if process_alive(int(record.get("pid", 0))) else " (not running)"
    line = (
        f"{record['state']}{running}: {percent:.1f}% present of {record['size_bytes']} bytes, "
        f"{record['transferred_bytes']} transferred, {record['demand_fetches']} demand fetches, "
        f"eta {'-' if eta is None else f'{eta:.0f}s'}"
    )
    if record["state"] == "failed":
        line += ", error: " + " ".join(str(record.get("error") or "unknown").split())
    return line


def _console() -> Console:
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=PLAIN_WIDTH)
    return console


def _all_complete(views: Sequence[DiskView]) -> bool:
    return bool(views) and all(view.complete for view in views)


def _watch_json(targets: Sequence[DiskTarget], single: bool, interval: float) -> int:
    while True:
        views = [read_view(target) for target in targets]
        if single and views[0].record is None:
            document: Any = {"error": views[0].error}
        else:
            document = views[0].record if single else json_document(views)
        print(json.dumps(document, sort_keys=True), flush=True)
        if _all_complete(views):
            return EXIT_OK
        time.sleep(interval)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While watching, SIGTERM unwinds like Ctrl-C so that `Live` restores the cursor."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch_display(targets: Sequence[DiskTarget], interval: float) -> int:
    views = [read_view(target) for target in targets]
    live = Live(
        render_progress(views, time.time()),
        console=_console(),
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    # Not `with live`: an interrupt inside `Live.__enter__` (its first draw, after it hid the
    # cursor) would skip `__exit__`.  `stop()` is safe however far `start()` got.
    with _sigterm_raises():
        try:
            live.start(refresh=True)
            while not _all_complete(views):
                time.sleep(interval)
                views = [read_view(target) for target in targets]
                live.update(render_progress(views, time.time()), refresh=True)
        finally:
            live.stop()
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    state_dirs: list[Path] = args.state_dir
    single = len(state_dirs) == 1 and not args.domain
    record: dict[str, Any] = {}
    if single and not args.watch:
        record = read_record(state_dirs[0])
    elif single and not state_dirs[0].is_dir():
        # With --watch the record may not be written yet, but a mistyped directory must not
        # look like "waiting".
        raise UserError(f"state directory {state_dirs[0]} does not exist")
    targets = resolve_targets(args.config, args.domain, state_dirs)
    try:
        if args.watch:
            if args.json:
                return _watch_json(targets, single, args.interval)
            return _watch_display(targets, args.interval)
        if single and args.json:
            print(json.dumps(record, sort_keys=True))
            return EXIT_OK
        views = [read_view(target) for target in targets]
        if args.json:
            print(json.dumps(json_document(views), sort_keys=True))
            return exit_status(views)
        console = _console()
        if single and not console.is_terminal:
            print(one_line_summary(record))
            return EXIT_OK
        console.print(render_progress(views, time.time()))
        return EXIT_OK if single else exit_status(views)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except _Terminated:
        return EXIT_TERMINATED
