"""What `fetch-progress` draws: status records of destination disks as one rich table.

How it works.  The command reads each disk's record (`postcopy.destination.status.read_status`) and
checks whether the process that wrote it still runs; it hands the results here as `DiskView`s.  This
module does no I/O: `render_progress(views, now)` turns them into a `rich.table.Table`, grouped by
domain (a bold domain line, its disks, then its total row), followed by one line of detail per disk
that needs attention.  A disk row has a `rich.progress_bar.ProgressBar` (rich draws it), the
percentage present (rounded down: 100.0% means every byte), bytes present/total in binary units, the
source transfer rate, the ETA, guest faults, their p50/p99 latency, reconnects and a short state.  A
disk whose record could not be read is an error row; its reason is the detail line.  Disks named
only by a state directory have no domain line and are labelled by their path.

Short states in the rows (`display_state`), and what the detail line adds (`disk_note`):

    waiting for source       the engine waits for the source (or for `source-frozen`)
    fetching                 on-demand fetches and the drain are running
    source unreachable 12s   the source has been down this long; detail: how long guest reads
                             of missing data wait (`unreachable_timeout_seconds`), last error
    complete                 every chunk is present; the source is no longer needed
    failed                   the engine gave up; detail: its `error`
    stopped                  the writer (`pid`) is gone before completion: nothing progresses
    error                    no usable record; detail: why (missing or unreadable state dir)

A live writer whose record has not changed for `STALE_AFTER_SECONDS` also gets a detail line.
`now` is the time the records are shown at; the unreachable time and the age of a stale record
are computed from it and the record's `updated_at`, so rendering is repeatable in tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from postcopy.units import format_size

__all__ = [
    "BAR_WIDTH",
    "STALE_AFTER_SECONDS",
    "DiskView",
    "DomainTotal",
    "disk_note",
    "display_state",
    "domain_totals",
    "format_duration",
    "percent_present",
    "render_progress",
    "source_down_seconds",
]

BAR_WIDTH = 20
MAX_PATH_LABEL = 24
# The engine rewrites the record at least every 5 s; a record older than this while its writer
# is alive means the writer is stuck, which the operator should see.
STALE_AFTER_SECONDS = 15.0
ACTIVE_STATES = ("waiting-for-source", "fetching", "source-unreachable")


@dataclass(frozen=True)
class DiskView:
    """One shown disk: where its record lives and what reading it gave.

    Exactly one of `record` and `error` is set.  `writer_running` says whether the record's
    `pid` is alive (None when unknown, e.g. for an error row).  `domain` is None for a disk named
    only by its state directory.
    """

    domain: str | None
    disk: str
    state_dir: Path
    record: dict[str, Any] | None = None
    error: str | None = None
    writer_running: bool | None = None

    @property
    def stopped(self) -> bool:
        """The writer is gone while the record says work was still going on."""
        return (
            self.record is not None
            and self.writer_running is False
            and self.record.get("state") in ACTIVE_STATES
        )

    @property
    def complete(self) -> bool:
        return self.record is not None and self.record.get("state") == "complete"

    @property
    def failed(self) -> bool:
        """No progress will come without the operator: error row, failed or stopped writer."""
        return self.record is None or self.record.get("state") == "failed" or self.stopped


@dataclass(frozen=True)
class DomainTotal:
    """The sums over one domain's readable disks, for its total row."""

    disks: int
    complete: int
    failed: int
    size_bytes: int
    present_bytes: int
    transfer_rate: float
    eta_seconds: float | None
    faults: int
    reconnects: int


def format_duration(seconds: float | None) -> str:
    """`45s`, `3m05s`, `2h01m`; `-` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def percent_present(present: int, size: int, complete: bool) -> float:
    """Present bytes in percent, rounded down to 0.1 so that 100.0 means every byte."""
    if size <= 0:
        return 100.0 if complete else 0.0
    percent = math.floor(1000.0 * present / size) / 10.0
    return min(percent, 100.0)


def _record_age(record: dict[str, Any], now: float) -> float:
    updated = record.get("updated_at")
    if not isinstance(updated, int | float):
        return 0.0
    return max(0.0, now - float(updated))


def display_state(view: DiskView, now: float) -> str:
    """The short state shown in a disk's row (see the module docstring for the list)."""
    if view.record is None:
        return "error"
    state = view.record.get("state")
    if view.stopped:
        return "stopped"
    if state == "source-unreachable":
        return f"source unreachable {format_duration(source_down_seconds(view.record, now))}"
    return {
        "waiting-for-source": "waiting for source",
        "fetching": "fetching",
        "complete": "complete",
        "failed": "failed",
    }.get(str(state), str(state))


def source_down_seconds(record: dict[str, Any], now: float) -> float:
    """How long the source has been unreachable, as of `now` (the record says as of its write)."""
    return float(record.get("source_down_seconds") or 0.0) + _record_age(record, now)


def disk_note(view: DiskView, now: float) -> str | None:
    """The detail printed under the table for a disk that needs attention, or None."""
    if view.record is None:
        return view.error or "no status record"
    record = view.record
    state = record.get("state")
    error = record.get("error")
    if view.stopped:
        return (
            f"stopped: the writer (pid {record.get('pid')}) is gone and the disk is not complete; "
            "restart receive with the same state directory to resume"
        )
    if state == "failed":
        return f"failed: {error}" if error else "failed"
    parts: list[str] = []
    if state == "source-unreachable":
        parts.append(f"source unreachable for {format_duration(source_down_seconds(record, now))}")
        window = record.get("unreachable_timeout_seconds")
        if isinstance(window, int | float):
            parts.append(f"guest reads of missing data fail after {format_duration(window)}")
        if error:
            parts.append(f"last error: {error}")
    age = _record_age(record, now)
    if state != "complete" and age > STALE_AFTER_SECONDS:
        parts.append(f"no status update for {format_duration(age)}")
    return "; ".join(parts) or None


def _state_style(view: DiskView) -> str:
    if view.record is None or view.failed:
        return "bold red"
    state = view.record.get("state")
    return {
        "complete": "green",
        "fetching": "cyan",
        "waiting-for-source": "yellow",
        "source-unreachable": "bold yellow",
    }.get(str(state), "")


def _rate(bytes_per_second: float | None) -> str:
    if bytes_per_second is None:
        return "-"
    return f"{format_size(int(bytes_per_second))}/s"


def _latencies(p50_ms: float | None, p99_ms: float | None) -> str:
    if p50_ms is None or p99_ms is None:
        return "-"

    def short(milliseconds: float) -> str:
        return f"{milliseconds:.2f}" if milliseconds < 10 else f"{milliseconds:.0f}"

    return f"{short(p50_ms)}/{short(p99_ms)} ms"


def _bar(present: int, size: int) -> ProgressBar:
    return ProgressBar(total=max(size, 1), completed=min(present, max(size, 1)), width=BAR_WIDTH)


def domain_totals(views: Iterable[DiskView]) -> DomainTotal:
    """Sum the disks of one domain; the ETA is the missing total over the summed present rate."""
    views = list(views)
    readable = [v.record for v in views if v.record is not None]
    size = sum(int(r.get("size_bytes") or 0) for r in readable)
    present = sum(int(r.get("present_bytes") or 0) for r in readable)
    complete = sum(1 for v in views if v.complete)
    present_rate = sum(float(r.get("present_rate_bytes_per_second") or 0.0) for r in readable)
    eta: float | None
    if complete == len(views):
        eta = 0.0
    elif len(views) == 1 and readable:
        eta = readable[0].get("eta_seconds")
    elif present_rate > 0 and len(readable) == len(views):
        eta = (size - present) / present_rate
    else:
        eta = None
    return DomainTotal(
        disks=len(views),
        complete=complete,
        failed=sum(1 for v in views if v.failed),
        size_bytes=size,
        present_bytes=present,
        transfer_rate=sum(float(r.get("transfer_rate_bytes_per_second") or 0.0) for r in readable),
        eta_seconds=eta,
        faults=sum(int(r.get("faults") or 0) for r in readable),
        reconnects=sum(int(r.get("reconnects") or 0) for r in readable),
    )


def _group_by_domain(views: Sequence[DiskView]) -> list[tuple[str | None, list[DiskView]]]:
    groups: dict[str | None, list[DiskView]] = {}
    for view in views:
        groups.setdefault(view.domain, []).append(view)
    return list(groups.items())


def _new_table() -> Table:
    table = Table(
        box=None, pad_edge=False, collapse_padding=True, header_style="bold", expand=False
    )
    table.add_column("Disk", no_wrap=True)
    table.add_column("Progress", no_wrap=True, width=BAR_WIDTH)
    table.add_column("%", justify="right", no_wrap=True)
    table.add_column("Present / Total", justify="right", no_wrap=True)
    table.add_column("Rate", justify="right", no_wrap=True)
    table.add_column("ETA", justify="right", no_wrap=True)
    table.add_column("Faults", justify="right", no_wrap=True)
    table.add_column("p50/p99", justify="right", no_wrap=True)
    table.add_column("Reconn", justify="right", no_wrap=True)
    table.add_column("State", min_width=10)
    return table


def _disk_row(table: Table, view: DiskView, now: float) -> None:
    state = Text(display_state(view, now), style=_state_style(view))
    label = f"  {view.disk if view.domain is not None else _short_path(view.state_dir)}"
    if view.record is None:
        table.add_row(label, "", "", "", "", "", "", "", "", state)
        return
    record = view.record
    size = int(record.get("size_bytes") or 0)
    present = int(record.get("present_bytes") or 0)
    complete = view.complete
    eta = 0.0 if complete else record.get("eta_seconds")
    table.add_row(
        label,
        _bar(present, size),
        f"{percent_present(present, size, complete):.1f}%",
        f"{format_size(present)} / {format_size(size)}",
        _rate(record.get("transfer_rate_bytes_per_second")),
        format_duration(eta),
        str(int(record.get("faults") or 0)),
        _latencies(record.get("fault_latency_p50_ms"), record.get("fault_latency_p99_ms")),
        str(int(record.get("reconnects") or 0)),
        state,
    )


def _total_row(table: Table, views: list[DiskView]) -> None:
    total = domain_totals(views)
    all_complete = total.complete == total.disks
    state = f"{total.complete}/{total.disks} complete"
    if total.failed:
        state += f", {total.failed} need attention"
    style = "bold red" if total.failed else ("green" if all_complete else "")
    table.add_row(
        Text("  total", style="bold"),
        _bar(total.present_bytes, total.size_bytes),
        f"{percent_present(total.present_bytes, total.size_bytes, all_complete):.1f}%",
        f"{format_size(total.present_bytes)} / {format_size(total.size_bytes)}",
        _rate(total.transfer_rate),
        format_duration(total.eta_seconds),
        str(total.faults),
        "",
        str(total.reconnects),
        Text(state, style=style),
        end_section=True,
    )


def _short_path(path: Path) -> str:
    """A disk named only by its state directory: its last two parts (`web1/xvda`), cut from the
    left to `MAX_PATH_LABEL` characters (the full path is in the notes and the JSON)."""
    label = "/".join(part for part in path.parts[-2:] if part != "/") or str(path)
    return label if len(label) <= MAX_PATH_LABEL else "…" + label[-(MAX_PATH_LABEL - 1) :]


def _disk_name(view: DiskView) -> str:
    return f"{view.domain}/{view.disk}" if view.domain is not None else str(view.state_dir)


def render_progress(views: Sequence[DiskView], now: float) -> RenderableType:
    """The whole display: a table of every disk, grouped by domain, each group with a total
    row, then one line of detail per disk that needs attention (errors, failures, outages)."""
    if not views:
        return Text("no disks to show")
    table = _new_table()
    for domain, group in _group_by_domain(views):
        if domain is not None:
            table.add_row(Text(domain, style="bold"))
        for view in group:
            _disk_row(table, view, now)
        if domain is not None or len(group) > 1:
            _total_row(table, group)
    notes = [
        Text.assemble((f"{_disk_name(view)}: ", "bold"), (note, _state_style(view)))
        for view in views
        if (note := disk_note(view, now)) is not None
    ]
    return Group(table, *notes)
