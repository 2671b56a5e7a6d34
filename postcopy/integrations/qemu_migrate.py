"""Drive a QEMU live migration over QMP, and open the postcopy disk gate at switchover.

How it works (`migrate_qemu_domain`):
1. Connect to both QMP sockets.  The destination must be waiting (`-incoming defer`, status
   `inmigrate`); the source must be running or paused.
2. `migrate-incoming` on the destination with a Unix URI (a socket in a fresh temporary
   directory unless one is given), then `migrate` on the source.
3. Poll the source's `query-migrate` until `completed`.  At that point QEMU has paused the
   source and flushed and released its disk: nothing will write it again.  That is the moment
   the destination's `postcopy receive --wait-for-source` may start keeping what it fetches, so
   `declare_source_frozen(state_dir)` is called (skipped with shared storage).
4. Wait for the destination to leave `inmigrate`; `cont` it if it is not running (started with
   `-S`).  Report QEMU's own `total-time` and `downtime` with our wall-clock measures.

Failure policy: any failure before the destination runs with the gate open (migration failed,
timeout, a QMP connection lost, the gate not declared) rolls back: the migration is cancelled,
the destination QEMU is told to `quit` (first, so two guests never run), and the source is
resumed with `cont` if it is left paused.  `MigrationFailed` then says what happened.  Two cases
after the source completed need care: with postcopy the source's disk was never written by B,
so resuming A is safe, but B's state directory (gate open) must be discarded; with shared
storage a destination that started by itself may have written the disk, so A stays paused.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from postcopy.destination.gate import declare_source_frozen
from postcopy.errors import PostcopyError, UserError
from postcopy.integrations.qmp import QMPError, open_qmp

MIGRATION_DONE_STATES = {"completed", "failed", "cancelled"}
DEST_WAITING_STATES = {"inmigrate", "prelaunch"}
ROLLBACK_SECONDS = 10.0


class MigrationFailed(PostcopyError):
    """The migration did not complete; the source was resumed where possible."""

    def __init__(self, reason: str, source_resumed: bool, destination_stopped: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.source_resumed = source_resumed
        self.destination_stopped = destination_stopped

    def __str__(self) -> str:
        source = "source resumed" if self.source_resumed else "source NOT resumed"
        dest = "destination stopped" if self.destination_stopped else "destination NOT stopped"
        return f"migration failed: {self.reason} ({source}, {dest})"


@dataclass(frozen=True)
class MigrationConfig:
    """One migration: the two QMP sockets and where the destination's disk gate lives."""

    source_qmp: Path
    dest_qmp: Path
    state_dir: Path | None  # None: shared storage, no gate to open
    migration_uri: str | None = None  # default: unix:<fresh temp dir>/migration.sock
    timeout_seconds: float = 120.0
    poll_interval_seconds: float = 0.02
    max_bandwidth_bytes: int | None = None  # QEMU's default caps it at 32 MiB/s


@dataclass(frozen=True)
class MigrationReport:
    """What a completed migration measured.  Times from QEMU are in milliseconds."""

    status: str
    qemu_total_time_ms: int  # source: from `migrate` to completion
    qemu_downtime_ms: int  # source: guest paused until the last state left
    qemu_setup_time_ms: int
    ram_transferred_bytes: int
    wall_seconds: float  # our clock: `migrate` sent until the destination runs
    completed_to_gate_seconds: float  # completion seen until the gate was declared
    completed_to_running_seconds: float  # completion seen until the destination runs
    destination_resumed_by_us: bool  # True when we sent `cont` (destination had -S)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _status(client: QMPSession) -> str:
    return str((await client.execute("query-status"))["status"])


async def _poll_source_migration(source: QMPSession, interval: float) -> dict[str, Any]:
    while True:
        info: dict[str, Any] = await source.execute("query-migrate")
        if info.get("status") in MIGRATION_DONE_STATES:
            return info
        await trio.sleep(interval)


async def _wait_destination_loaded(dest: QMPSession, interval: float) -> str:
    while True:
        status = await _status(dest)
        if status not in DEST_WAITING_STATES:
            return status
        await trio.sleep(interval)


async def _rollback(
    source: QMPSession, dest: QMPSession, source_was_running: bool, resume_source: bool = True
) -> tuple[bool, bool]:
    """Stop the destination, resume the source (unless told not to).

    Returns (source_resumed, destination_stopped)."""
    destination_stopped = False
    try:
        await dest.execute("quit")
        destination_stopped = True
    except QMPError as exc:
        # A destination whose QMP connection is gone has usually died already.
        destination_stopped = dest.is_closed or "closed" in str(exc)
    source_resumed = False
    if not resume_source:
        return source_resumed, destination_stopped
    try:
        info = await source.execute("query-migrate")
        if info.get("status") not in MIGRATION_DONE_STATES and info.get("status") != "none":
            await source.execute("migrate_cancel")
            with trio.move_on_after(ROLLBACK_SECONDS / 2):
                while (await source.execute("query-migrate")).get("status") not in (
                    MIGRATION_DONE_STATES | {"none"}
                ):
                    await trio.sleep(0.05)
        status = await _status(source)
        if status == "running":
            source_resumed = True
        elif source_was_running:
            # A failed migration usually restarts the source by itself; QEMU may take a moment.
            with trio.move_on_after(1.0):
                while status in ("finish-migrate", "inmigrate"):
                    await trio.sleep(0.05)
                    status = await _status(source)
            if status != "running":
                await source.execute("cont")
                status = await _status(source)
            source_resumed = status == "running"
        else:
            source_resumed = True  # it was paused before; leaving it paused is resuming it
    except QMPError:
        source_resumed = False
    return source_resumed, destination_stopped


@asynccontextmanager
async def _migration_uri(config: MigrationConfig) -> AsyncIterator[str]:
    if config.migration_uri is not None:
        yield config.migration_uri
        return
    with tempfile.TemporaryDirectory(prefix="postcopy-migrate-") as directory:
        yield f"unix:{directory}/migration.sock"


class QMPSession(Protocol):
    """What the migration needs of a QMP connection: `QMPClient`, or a remote QEMU's monitor
    reached through another channel (`postcopy migrate` drives Host B's over its remote command)."""

    @property
    def is_closed(self) -> bool: ...

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


# Called at switchover instead of declaring `config.state_dir` frozen (e.g. on another host).
SwitchoverHook = Callable[[], Awaitable[None]]


async def migrate_qemu_domain(config: MigrationConfig) -> MigrationReport:
    """Migrate the guest from the source QEMU to the destination QEMU; see the module docs."""
    if config.state_dir is not None and not Path(config.state_dir).is_dir():
        raise UserError(f"state directory {config.state_dir} does not exist")
    async with (
        open_qmp(config.source_qmp) as source,
        open_qmp(config.dest_qmp) as dest,
    ):
        return await migrate_with_sessions(source, dest, config)


async def migrate_with_sessions(
    source: QMPSession,
    dest: QMPSession,
    config: MigrationConfig,
    switchover: SwitchoverHook | None = None,
    failures: list[MigrationFailed] | None = None,
) -> MigrationReport:
    """The migration over two open QMP sessions; `switchover` (when given) replaces the local
    `declare_source_frozen(config.state_dir)` at the switchover.  A cancellation (Ctrl-C) before
    the destination runs rolls back like a failure, then propagates; the rollback's outcome is
    appended to `failures` (when given) in either case."""
    async with _migration_uri(config) as uri:
        try:
            with trio.fail_after(ROLLBACK_SECONDS):
                source_status = await _status(source)
                dest_status = await _status(dest)
        except trio.TooSlowError:
            raise UserError("a QEMU does not answer query-status") from None
        if source_status not in ("running", "paused"):
            raise UserError(f"source QEMU is {source_status!r}, not running or paused")
        if dest_status != "inmigrate":
            raise UserError(
                f"destination QEMU is {dest_status!r}: start it with `-incoming defer`"
            )
        source_was_running = source_status == "running"
        started = time.monotonic()
        source_completed = False
        try:
            with trio.fail_after(config.timeout_seconds):
                if config.max_bandwidth_bytes is not None:
                    await source.execute(
                        "migrate-set-parameters", {"max-bandwidth": config.max_bandwidth_bytes}
                    )
                await dest.execute("migrate-incoming", {"uri": uri})
                started = time.monotonic()
                await source.execute("migrate", {"uri": uri})
                info = await _poll_source_migration(source, config.poll_interval_seconds)
                completed_seen = time.monotonic()
                source_completed = info.get("status") == "completed"
                if not source_completed:
                    raise MigrationFailed(
                        f"QEMU says {info.get('status')}: {info.get('error-desc', 'no reason')}",
                        False,
                        False,
                    )
                if switchover is not None:
                    await switchover()
                elif config.state_dir is not None:
                    await trio.to_thread.run_sync(declare_source_frozen, config.state_dir)
                gate_declared = time.monotonic()
                dest_status = await _wait_destination_loaded(dest, config.poll_interval_seconds)
                resumed_by_us = False
                if dest_status != "running":
                    if dest_status not in ("paused", "postmigrate"):
                        raise MigrationFailed(f"destination ended {dest_status!r}", False, False)
                    await dest.execute("cont")
                    resumed_by_us = True
                    dest_status = await _status(dest)
                    if dest_status != "running":
                        raise MigrationFailed(
                            f"destination is {dest_status!r} after cont", False, False
                        )
                running = time.monotonic()
        except (PostcopyError, trio.TooSlowError, OSError, trio.Cancelled) as exc:
            if isinstance(exc, trio.Cancelled):
                reason = "interrupted"
            elif isinstance(exc, MigrationFailed):
                reason = exc.reason
            elif isinstance(exc, trio.TooSlowError):
                reason = f"timed out after {config.timeout_seconds:g} s"
            else:
                reason = str(exc)
            # With shared storage a destination that may have run (it starts by itself once the
            # RAM is in) may have written the disk: resuming the source then would corrupt it.
            shared_storage = config.state_dir is None and switchover is None
            resume_source = not (source_completed and shared_storage)
            if not resume_source:
                reason += "; the destination may have run on the shared disk: source left paused"
            elif source_completed:
                where = config.state_dir or "the destination's state directories"
                reason += f"; the gate of {where} is open: discard that state directory"
            source_resumed = destination_stopped = False
            with trio.move_on_after(ROLLBACK_SECONDS) as cleanup:
                cleanup.shield = True
                source_resumed, destination_stopped = await _rollback(
                    source, dest, source_was_running, resume_source
                )
            failure = MigrationFailed(reason, source_resumed, destination_stopped)
            if failures is not None:
                failures.append(failure)
            if isinstance(exc, trio.Cancelled):
                raise
            raise failure from exc
        ram = info.get("ram", {})
        return MigrationReport(
            status="completed",
            qemu_total_time_ms=int(info.get("total-time", 0)),
            qemu_downtime_ms=int(info.get("downtime", 0)),
            qemu_setup_time_ms=int(info.get("setup-time", 0)),
            ram_transferred_bytes=int(ram.get("transferred", 0)),
            wall_seconds=running - started,
            completed_to_gate_seconds=gate_declared - completed_seen,
            completed_to_running_seconds=running - completed_seen,
            destination_resumed_by_us=resumed_by_us,
        )
