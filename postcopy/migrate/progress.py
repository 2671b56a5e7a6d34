"""What `postcopy migrate` shows: one record per step, and the drain's progress.

Three forms, chosen once (`Progress.for_streams`):
- `--json`: every step is one JSON object on stdout, `{"event": STEP, "state": STATE, "t": s,
  ...fields}` (`t` in seconds since the start), the drain one `progress` record every
  `LINE_SECONDS`, the summary one `summary` record: for tools and tests.
- a terminal: a line per step on stderr and, while the disks drain, the live table of
  `fetch-progress` (`progress_display.render_progress`, rich).
- otherwise (a log, a pipe): a line per step and one progress line every `LINE_SECONDS`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live

from postcopy.progress_display import DiskView, render_progress
from postcopy.units import format_size

LINE_SECONDS = 3.0


class Progress:
    def __init__(self, mode: str, out: TextIO, err: TextIO) -> None:
        self.mode = mode  # json | terminal | lines
        self.out = out
        self.err = err
        self.started = time.monotonic()
        self._last_line = 0.0
        self._live: Live | None = None

    @classmethod
    def for_streams(
        cls, as_json: bool, out: TextIO | None = None, err: TextIO | None = None
    ) -> Progress:
        out = out or sys.stdout
        err = err or sys.stderr
        if as_json:
            return cls("json", out, err)
        return cls("terminal" if err.isatty() else "lines", out, err)

    def _elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def event(self, step: str, state: str, message: str = "", **fields: Any) -> None:
        """One step's record: `state` is start, done, failed, warning or info."""
        if self.mode == "json":
            record = {"event": step, "state": state, "t": self._elapsed(), **fields}
            if message:
                record["message"] = message
            self.out.write(json.dumps(record, default=str) + "\n")
            self.out.flush()
            return
        text = f"postcopy migrate: [{self._elapsed():7.2f}s] {step}: {state}"
        if message:
            text += f": {message}"
        self._print(text)

    def warn(self, message: str) -> None:
        """A loud warning: on stderr in every mode (and an event with --json)."""
        line = f"postcopy migrate: WARNING: {message}"
        if self.mode == "json":
            self.event("warning", "warning", message)
        self._print(line, force_err=True)

    def _print(self, text: str, force_err: bool = False) -> None:
        if self._live is not None:
            self._live.console.print(text)
        elif self.mode != "json" or force_err:
            print(text, file=self.err, flush=True)

    def drain(self, domain: str, disks: dict[str, dict[str, Any]]) -> None:
        """The disks' status records (device -> agent's status entry), every poll."""
        now = time.monotonic()
        if self.mode == "terminal":
            views = [
                DiskView(domain, device, Path(entry.get("state_dir", "")),
                         record=entry.get("record"),
                         error=None if entry.get("record") else entry.get("error") or "no record",
                         writer_running=entry.get("receive_running"))
                for device, entry in disks.items()
            ]  # fmt: skip
            if self._live is None:
                self._live = Live(console=Console(file=self.err), auto_refresh=False)
                self._live.start()
            self._live.update(render_progress(views, time.time()), refresh=True)
            return
        if now - self._last_line < LINE_SECONDS:
            return
        self._last_line = now
        if self.mode == "json":
            summary = {
                device: {key: (entry.get("record") or {}).get(key) for key in
                         ("state", "present_bytes", "size_bytes", "faults")}
                | {"receive_running": entry.get("receive_running")}
                for device, entry in disks.items()
            }  # fmt: skip
            self.event("progress", "info", disks=summary)
            return
        parts = []
        for device, entry in disks.items():
            record = entry.get("record") or {}
            size = int(record.get("size_bytes") or 0)
            present = int(record.get("present_bytes") or 0)
            percent = 100.0 * present / size if size else 0.0
            rate = record.get("transfer_rate_bytes_per_second") or 0
            state = record.get("state", "?") if entry.get("receive_running") else "receive down"
            parts.append(
                f"{device} {percent:5.1f}% of {format_size(size)} at {format_size(int(rate))}/s, "
                f"{record.get('faults', 0)} faults, {state}"
            )
        self._print(f"postcopy migrate: [{self._elapsed():7.2f}s] drain: " + "; ".join(parts))

    def stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
