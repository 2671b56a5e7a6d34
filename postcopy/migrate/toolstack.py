"""The one interface between the orchestration and a toolstack (QEMU today; libvirt, xl later).

The orchestration (`orchestrate.py`) does every postcopy step itself (serve, receive, the gate,
progress, verification, release) and asks the toolstack only for what differs per hypervisor:

    prepare_destination   make B ready to take the domain with its disks on the receives'
                          sockets (QEMU: start B's QEMU from the rewritten arguments, `-incoming
                          defer -S`; or check the one the user named)
    migrate               move the domain's memory and state; call `switchover` once the source
                          is paused for good and before the destination runs; return the figures
                          (a failure before the destination runs leaves the source running)
    guest_io_operations   how many I/O requests the domain made on B so far (time to first I/O)
    pivot                 switch the running domain from the NBD disks to the local files
    persist               write B's persistent definition of the domain on the local files
    release_source        stop what is left of the domain on A after a completed migration
    abort_destination     before switchover: stop B's side of the domain (quit, not pause)

All are coroutines; B is reached through the `AgentSession` the toolstack was given.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

SwitchoverHook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class MigrationFigures:
    """What the toolstack measured of the memory migration."""

    downtime_ms: float  # the toolstack's own downtime figure
    total_ms: float
    ram_bytes: int
    wall_seconds: float  # migration started until the domain runs on B


@dataclass(frozen=True)
class Rollback:
    """A migration that failed or was interrupted before the domain ran on B, and what the
    toolstack's own rollback achieved."""

    reason: str
    source_resumed: bool
    destination_stopped: bool

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class PivotFigures:
    disks: dict[str, dict[str, Any]]  # device -> what the pivot did (node, reopen seconds)
    remote_disks_left: int  # disks of the domain still on a remote (nbd) backend


class Toolstack(Protocol):
    name: str
    rollback: Rollback | None  # set by `migrate` when it failed or was interrupted

    async def prepare_destination(self) -> dict[str, Any]: ...

    async def migrate(self, switchover: SwitchoverHook) -> MigrationFigures: ...

    async def guest_io_operations(self) -> int | None: ...

    async def pivot(self) -> PivotFigures: ...

    async def persist(self) -> str: ...

    async def release_source(self) -> None: ...

    async def abort_destination(self) -> None: ...
