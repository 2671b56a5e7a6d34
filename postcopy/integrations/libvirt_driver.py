"""Move a libvirt domain onto the lazy destination with libvirt's own API (python3-libvirt).

How it works, in the order of a migration (Host A runs the domain, Host B runs one `postcopy
receive --wait-for-source` per disk):

1. `destination_xml`: the domain's XML from A with VIR_DOMAIN_XML_MIGRATABLE (the live one and
   the persistent definition), rewritten by `integrations.libvirt.rewrite_libvirt`: each policy
   disk becomes `<disk type='network'>` with `<source protocol='nbd'>` on its receive's socket
   (or host and port).
2. `LibvirtMigration.run`: one libvirt migration with that XML (VIR_MIGRATE_PARAM_DEST_XML, and
   the rewritten definition as VIR_MIGRATE_PARAM_PERSIST_XML: without it libvirt would give B
   A's definition, its disks on A's image paths), flags LIVE, PERSIST_DEST, UNDEFINE_SOURCE,
   PAUSED and UNSAFE, plus PEER2PEER in p2p mode (A's libvirtd talks to B's) or none in direct
   mode (this process drives both daemons).
   UNSAFE because libvirt refuses to migrate a disk on a local filesystem that it does not copy
   itself ("Migration without shared storage is unsafe"); postcopy moves that disk, and A's
   image does not change once A's QEMU is paused.  The blocking call runs in a worker thread;
   meanwhile a watcher notes when A's domain pauses (for the downtime) and runs the caller's
   `check` (say: every receive still runs).  The call returns when B's libvirt has finished the
   incoming migration: A's QEMU is gone and its definition removed, B's domain is persistent
   and paused (it has not run a guest instruction).  Then the switchover hook runs (`postcopy
   source-frozen` for each disk: from now on B keeps what it fetches) and B's domain resumes.
3. Abort.  Until libvirt's job has completed, a failing check, a libvirt error or a
   cancellation (Ctrl-C) aborts libvirt's job (virDomainAbortJob, repeated until the job is
   gone: a job still in its first phase cannot be aborted yet); libvirt resumes A and removes
   B's incoming domain.  Then both hosts are checked and put right: A's domain running (resumed
   if libvirt left it paused), no domain of this UUID on B (a leftover is destroyed and
   undefined).  `MigrationRolledBack` says what was found.  After libvirt's job completed there
   is no way back to A: a failing hook leaves the domain paused on B (`SwitchoverFailed`), and
   a cancellation that came too late finishes the switchover before it goes on.
4. `pivot_disks`: the running domain on B switches from the NBD disks to the local files with
   `integrations.qemu_pivot.pivot_disk`, over `LibvirtMonitor`: libvirt's QEMU monitor
   passthrough (libvirt_qemu.qemuMonitorCommand) behind the `execute(command, arguments)` of
   the QMP client.  The disk's format node is the node libvirt attached to the disk's device
   (its alias in the live XML, the qdev in `query-block`), checked against the node the pivot
   finds above the nbd node.  The pivot reads the format node's options from QEMU's command
   line: the monitor's `peer_pid` is QEMU's pid from libvirt's pid file
   (/run/libvirt/qemu/DOMAIN.pid on B, `qemu_pid`).  libvirt marks a domain whose monitor was
   used this way tainted (custom-monitor); the result's notes say so.  Run it on B (the pid
   file and /proc are B's).
5. `persist_local_disks`: B's persistent definition rewritten by
   `integrations.libvirt.rewrite_libvirt_local` (each NBD disk a file disk on its dest_file, the
   rest as it was) and defined again (virDomainDefineXML), so that B boots from its own files.

libvirt's errors reach the caller as `LibvirtCallFailed`, libvirt's own message on one line.

Errors:
    PostcopyError
    └── LibvirtDriverError       the step did not happen; one line
        ├── LibvirtCallFailed    libvirt refused or failed (its message)
        ├── MigrationRolledBack  before libvirt's job completed; `.rollback` says what A and B hold
        └── SwitchoverFailed     libvirt's job completed, the hook or the resume failed: the
                                 domain is paused on B and exists nowhere else
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from postcopy.errors import PostcopyError, UserError
from postcopy.integrations import Rewrite
from postcopy.integrations.libvirt import rewrite_libvirt, rewrite_libvirt_local
from postcopy.integrations.qemu_pivot import PivotResult, find_pivot_plan, pivot_disk
from postcopy.integrations.qmp import QMPClient, QMPCommandError
from postcopy.policy import DomainPolicy, NbdEndpoint

__all__ = [
    "LibvirtCallFailed",
    "LibvirtDriverError",
    "LibvirtMigration",
    "LibvirtMonitor",
    "MigrationFigures",
    "MigrationRolledBack",
    "PivotTarget",
    "DestinationXML",
    "Rollback",
    "SwitchoverFailed",
    "destination_xml",
    "guest_io_operations",
    "libvirt_call",
    "open_connection",
    "persist_local_disks",
    "pivot_disks",
    "qemu_pid",
]

T = TypeVar("T")
SwitchoverHook = Callable[[], Awaitable[None]]
CheckHook = Callable[[], Awaitable[None]]

WATCH_SECONDS = 0.02  # how often the watcher looks at A's domain during libvirt's job
CHECK_SECONDS = 0.25  # how often the caller's check runs during the job
ABORT_RETRY_SECONDS = 0.1
ABORT_SECONDS = 60.0  # how long the abort waits for libvirt's job to end
PID_FILE_DIR = Path("run/libvirt/qemu")  # under the root of B's mount namespace
TAINT_NOTE = (
    "libvirt now marks domain {name} tainted (custom-monitor): the pivot went through its QEMU "
    "monitor passthrough"
)


class LibvirtDriverError(PostcopyError):
    """A step of the libvirt driver did not happen; the message is one line."""


class LibvirtCallFailed(LibvirtDriverError):
    """libvirt refused or failed a call; the message is libvirt's own."""


@dataclass(frozen=True)
class Rollback:
    """What a migration that did not complete left on both hosts."""

    reason: str
    source_running: bool  # A's domain runs (libvirt resumed it, or we did)
    destination_clean: bool | None  # B has no domain of this UUID; None: B did not answer
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.reason


class MigrationRolledBack(LibvirtDriverError):
    """The migration failed or was interrupted before libvirt's job completed."""

    def __init__(self, rollback: Rollback) -> None:
        super().__init__(rollback.reason)
        self.rollback = rollback


class SwitchoverFailed(LibvirtDriverError):
    """libvirt moved the domain (A's copy is gone), but the hook or B's resume failed: the
    domain is paused on B."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise UserError(
            "python3-libvirt is not importable (install python3-libvirt; a venv needs "
            "--system-site-packages)"
        ) from None
    # libvirt prints every error to stderr by default; the driver reports its own.
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    return libvirt


def _error_code(error: BaseException) -> int | None:
    get = getattr(error, "get_error_code", None)
    return get() if callable(get) else None


def libvirt_call(what: str, call: Callable[..., T], *args: Any) -> T:
    """Run one libvirt call; its libvirtError becomes LibvirtCallFailed('WHAT: MESSAGE')."""
    libvirt = _libvirt()
    try:
        return call(*args)
    except libvirt.libvirtError as error:
        message = error.get_error_message() or str(error)
        raise LibvirtCallFailed(f"{what}: {_one_line(message)}") from None


def open_connection(uri: str) -> Any:
    """A libvirt connection (virConnect) to `uri`, e.g. qemu+ssh://host-b/system."""
    libvirt = _libvirt()
    return libvirt_call(f"libvirt on {uri}", libvirt.open, uri)


async def _in_thread(what: str, call: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(libvirt_call, what, call, *args)


# --- 1. the destination XML -------------------------------------------------------------------


@dataclass(frozen=True)
class DestinationXML:
    """The domain's XML for B: what it runs with, and what B keeps as its persistent definition
    (both with every policy disk on its receive)."""

    live: str
    persistent: str | None  # None: the domain is not persistent on A
    changed: tuple[str, ...]  # the devices now on NBD
    notes: tuple[str, ...] = ()


def destination_xml(source_domain: Any, policy: DomainPolicy) -> DestinationXML:
    """A's migratable XML of the domain, live and persistent, with each policy disk on its
    receive (step 1).  The persistent one matters: with VIR_MIGRATE_PERSIST_DEST libvirt makes
    B's definition from A's inactive definition unless it is given one, and that would start
    the domain on B from A's image path."""
    libvirt = _libvirt()
    name = libvirt_call("libvirt on A", source_domain.name)
    if not policy.is_postcopy:
        raise UserError(f"domain {name!r} is in {policy.mode.value} mode, not postcopy")
    flags = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE
    text = libvirt_call(f"libvirt on A: XML of {name}", source_domain.XMLDesc, flags)
    live = rewrite_libvirt(text, policy, f"the migratable XML of {name}")
    persistent = None
    if libvirt_call("libvirt on A", source_domain.isPersistent):
        flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        text = libvirt_call(f"libvirt on A: definition of {name}", source_domain.XMLDesc, flags)
        persistent = rewrite_libvirt(text, policy, f"the definition of {name}").text
    return DestinationXML(live.text, persistent, live.changed, live.notes)


# --- 2. and 3. the migration and its abort ----------------------------------------------------


@dataclass(frozen=True)
class MigrationFigures:
    """What one migration measured; times in ms unless named otherwise."""

    mode: str  # p2p or direct
    wall_seconds: float  # the migration call started until B's domain runs
    job_ms: float  # libvirt's time_elapsed of the job
    libvirt_downtime_ms: float  # libvirt's downtime: A paused until B's libvirt finished
    switchover_ms: float  # the call returned until B's domain runs: the hook and the resume
    downtime_ms: float | None  # A seen paused until B's domain runs: the guest's real pause
    memory_bytes: int  # guest memory libvirt sent


@dataclass
class LibvirtMigration:
    """One migration of `source_domain` (on A) to B (see steps 2 and 3 of the module docstring).

    `dest_connection` is this process's connection to B's libvirtd (the switchover resumes the
    domain through it, the rollback checks B through it).  With `dest_uri` (B's libvirt URI as A's
    libvirtd reaches it) the migration is peer-to-peer; without, direct.  `migrate_uri` is where
    A's QEMU sends the memory (VIR_MIGRATE_PARAM_URI); `bandwidth_mib` caps it (MiB/s)."""

    source_domain: Any
    dest_connection: Any
    dest_xml: DestinationXML
    dest_uri: str | None = None
    migrate_uri: str | None = None
    bandwidth_mib: int | None = None
    check: CheckHook | None = None
    rollback: Rollback | None = None  # set when `run` rolled back
    figures: MigrationFigures | None = None  # set when the domain runs on B
    dest_domain: Any = None  # B's domain, once libvirt's job completed
    _paused_at: float | None = field(default=None, repr=False)
    _name: str = field(default="", repr=False)
    _uuid: bytes = field(default=b"", repr=False)

    @property
    def mode(self) -> str:
        return "p2p" if self.dest_uri is not None else "direct"

    def _flags(self) -> int:
        libvirt = _libvirt()
        flags = (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            | libvirt.VIR_MIGRATE_PAUSED
            | libvirt.VIR_MIGRATE_UNSAFE
        )
        if self.dest_uri is not None:
            flags |= libvirt.VIR_MIGRATE_PEER2PEER
        return flags

    def _params(self) -> dict[str, Any]:
        libvirt = _libvirt()
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: self.dest_xml.live}
        if self.dest_xml.persistent is not None:
            params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = self.dest_xml.persistent
        if self.migrate_uri is not None:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = self.migrate_uri
        if self.bandwidth_mib is not None:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = self.bandwidth_mib
        return params

    def _migrate_blocking(self) -> Any:
        """The libvirt call (in a worker thread); returns B's domain."""
        where = "B" if self.dest_uri is None else self.dest_uri
        what = f"libvirt migration of {self._name} to {where}"
        if self.dest_uri is not None:
            libvirt_call(
                what, self.source_domain.migrateToURI3, self.dest_uri, self._params(), self._flags()
            )
            return libvirt_call(
                f"libvirt on B: {self._name}", self.dest_connection.lookupByUUID, self._uuid
            )
        return libvirt_call(
            what, self.source_domain.migrate3, self.dest_connection, self._params(), self._flags()
        )

    async def run(self, switchover: SwitchoverHook) -> MigrationFigures:
        """Migrate, run `switchover`, resume B's domain; the figures.  Raises MigrationRolledBack
        (the domain runs on A) or SwitchoverFailed (it is paused on B).  A cancellation or a
        KeyboardInterrupt while libvirt's job runs aborts it and goes on as itself (no
        exception group: there is no nursery here)."""
        self._name = await _in_thread("libvirt on A", self.source_domain.name)
        self._uuid = await _in_thread("libvirt on A", self.source_domain.UUID)
        await self._preflight()
        started = time.monotonic()
        finished = threading.Event()  # libvirt's call returned
        outcome: dict[str, Any] = {}

        def job() -> None:
            try:
                outcome["domain"] = self._migrate_blocking()
            except LibvirtDriverError as error:
                outcome["error"] = error
            finally:
                finished.set()

        threading.Thread(target=job, name=f"migrate {self._name}", daemon=True).start()
        try:
            await self._watch(finished, outcome)
        except BaseException:  # a cancellation or Ctrl-C while libvirt's job runs
            with trio.CancelScope(shield=True):
                await self._abort(finished)
                if "domain" in outcome:  # too late: the job completed, A is gone
                    await self._switch_over(outcome["domain"], switchover, started)
                else:
                    self.rollback = await self._roll_back("interrupted (Ctrl-C or cancel)")
            raise
        if "domain" not in outcome:
            reason = str(outcome.get("check") or outcome["error"])
            self.rollback = await self._roll_back(reason)
            raise MigrationRolledBack(self.rollback)
        return await self._switch_over(outcome["domain"], switchover, started)

    async def _preflight(self) -> None:
        """B answers and holds no domain of this name or UUID; nothing is changed."""
        libvirt = _libvirt()
        for lookup, key in (
            (self.dest_connection.lookupByUUID, self._uuid),
            (self.dest_connection.lookupByName, self._name),
        ):
            try:
                await trio.to_thread.run_sync(lookup, key)
            except libvirt.libvirtError as error:
                if _error_code(error) == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                message = _one_line(error.get_error_message() or str(error))
                raise LibvirtCallFailed(f"libvirt on B: {message}") from None
            raise LibvirtDriverError(
                f"B already has a domain {self._name!r} (or its UUID): nothing was changed"
            )

    async def _watch(self, finished: threading.Event, outcome: dict[str, Any]) -> None:
        """Until libvirt's call returned: note when A's domain stops running; run the caller's
        check, and abort the job when it fails."""
        libvirt = _libvirt()
        next_check = time.monotonic() + CHECK_SECONDS
        while not finished.is_set():
            if self._paused_at is None:
                try:
                    state, _ = await trio.to_thread.run_sync(self.source_domain.state)
                except libvirt.libvirtError:
                    state = None  # undefined already: the job completed
                if state != libvirt.VIR_DOMAIN_RUNNING:
                    self._paused_at = time.monotonic()
            if self.check is not None and "check" not in outcome and time.monotonic() >= next_check:
                try:
                    await self.check()
                except PostcopyError as error:
                    outcome["check"] = f"aborted: {error}"
                    with trio.CancelScope(shield=True):
                        await self._abort(finished)
                next_check = time.monotonic() + CHECK_SECONDS
            await trio.sleep(WATCH_SECONDS)

    async def _abort(self, finished: threading.Event) -> None:
        """virDomainAbortJob until libvirt's job is over (its call returned)."""
        deadline = time.monotonic() + ABORT_SECONDS
        while not finished.is_set():
            with contextlib.suppress(LibvirtDriverError):  # no job yet, or over already
                await _in_thread("libvirt on A: abort", self.source_domain.abortJob)
            await trio.to_thread.run_sync(finished.wait, ABORT_RETRY_SECONDS)
            if time.monotonic() > deadline:
                raise LibvirtDriverError(
                    f"libvirt's migration job of {self._name} did not end within {ABORT_SECONDS} s "
                    "of the abort"
                )

    async def _roll_back(self, reason: str) -> Rollback:
        """After a job that did not complete: A's domain running, B without the domain."""
        libvirt = _libvirt()
        notes: list[str] = []
        source_running = False
        try:
            state, why = await trio.to_thread.run_sync(self.source_domain.state)
            if state == libvirt.VIR_DOMAIN_PAUSED and why == libvirt.VIR_DOMAIN_PAUSED_MIGRATION:
                await trio.to_thread.run_sync(self.source_domain.resume)
                notes.append(f"resumed {self._name} on A (libvirt left it paused, reason {why})")
                state, _ = await trio.to_thread.run_sync(self.source_domain.state)
            source_running = state == libvirt.VIR_DOMAIN_RUNNING
        except libvirt.libvirtError as error:
            notes.append(f"A: {_one_line(error.get_error_message() or str(error))}")
        destination_clean: bool | None = True
        try:
            leftover = await trio.to_thread.run_sync(self.dest_connection.lookupByUUID, self._uuid)
        except libvirt.libvirtError as error:
            if _error_code(error) != libvirt.VIR_ERR_NO_DOMAIN:
                destination_clean = None
                notes.append(f"B not checked: {_one_line(error.get_error_message() or '')}")
        else:
            destination_clean = await self._remove_from_b(leftover, notes)
        return Rollback(_one_line(reason), source_running, destination_clean, tuple(notes))

    async def _remove_from_b(self, domain: Any, notes: list[str]) -> bool:
        libvirt = _libvirt()
        try:
            if await trio.to_thread.run_sync(domain.isActive):
                await trio.to_thread.run_sync(domain.destroy)
            if await trio.to_thread.run_sync(domain.isPersistent):
                await trio.to_thread.run_sync(domain.undefine)
        except libvirt.libvirtError as error:
            if _error_code(error) != libvirt.VIR_ERR_NO_DOMAIN:
                notes.append(f"B: leftover {self._name} not removed: {error.get_error_message()}")
                return False
        notes.append(f"removed a leftover {self._name} from B")
        return True

    async def _switch_over(
        self, dest_domain: Any, switchover: SwitchoverHook, started: float
    ) -> MigrationFigures:
        libvirt = _libvirt()
        self.dest_domain = dest_domain
        returned = time.monotonic()
        stats = await _in_thread(
            "libvirt on B: job statistics",
            dest_domain.jobStats,
            libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED,
        )
        try:
            # Shielded: a Ctrl-C now would leave the guest paused, and A's copy is gone already.
            with trio.CancelScope(shield=True):
                await switchover()
                await _in_thread(f"libvirt on B: resume {self._name}", dest_domain.resume)
        except Exception as error:
            raise SwitchoverFailed(
                f"{self._name} moved to B and is paused there (A's copy is gone), but the "
                f"switchover failed: {error}"
            ) from None
        running = time.monotonic()
        self.figures = MigrationFigures(
            mode=self.mode,
            wall_seconds=running - started,
            job_ms=float(stats.get("time_elapsed", 0)),
            libvirt_downtime_ms=float(stats.get("downtime", 0)),
            switchover_ms=(running - returned) * 1000,
            downtime_ms=None if self._paused_at is None else (running - self._paused_at) * 1000,
            memory_bytes=int(stats.get("memory_processed", 0)),
        )
        return self.figures


def guest_io_operations(domain: Any, devices: Sequence[str]) -> int:
    """Read and write requests the domain made on these disks (virDomainBlockStats)."""
    total = 0
    for device in devices:
        rd_req, _, wr_req, _, _ = libvirt_call(
            f"block stats of {device}", domain.blockStats, device
        )
        total += rd_req + wr_req
    return total


# --- 4. the pivot through libvirt's monitor passthrough ---------------------------------------


def qemu_pid(domain_name: str, root: Path = Path("/")) -> int:
    """QEMU's pid from libvirt's pid file, under `root` (B's root: `/` on B itself, or
    /proc/LIBVIRTD_PID/root from outside B's mount namespace); checked against /proc."""
    path = root / PID_FILE_DIR / f"{domain_name}.pid"
    try:
        pid = int(path.read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError) as error:
        raise LibvirtDriverError(f"no QEMU of {domain_name} from {path}: {error}") from None
    names = [
        value.decode(errors="replace").split(",")[0]
        for option, value in zip(argv, argv[1:], strict=False)
        if option == b"-name"
    ]
    if names != [f"guest={domain_name}"]:
        raise LibvirtDriverError(f"process {pid} of {path} is not the QEMU of {domain_name}")
    return pid


class LibvirtMonitor:
    """QMP through libvirt (libvirt_qemu.qemuMonitorCommand) with the `execute` of QMPClient,
    so that qemu_pivot works unchanged; `peer_pid` is QEMU's pid (for its command line)."""

    def __init__(self, domain: Any, pid: int | None = None) -> None:
        self.domain = domain
        self.pid = pid
        self.commands = 0

    def peer_pid(self) -> int | None:
        return self.pid

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        import libvirt_qemu

        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        text = await _in_thread(
            f"libvirt QEMU monitor: {command}",
            libvirt_qemu.qemuMonitorCommand,
            self.domain,
            json.dumps(request),
            0,
        )
        self.commands += 1
        reply = json.loads(text)
        if "error" in reply:
            error = reply["error"]
            raise QMPCommandError(command, str(error.get("class")), str(error.get("desc")))
        return reply.get("return")


@dataclass(frozen=True)
class PivotTarget:
    """One disk to pivot: its guest device (`<target dev>`), the receive's endpoint, the local
    file (the path QEMU opens)."""

    device: str
    endpoint: NbdEndpoint
    local_file: Path


@dataclass(frozen=True)
class DomainPivot:
    results: dict[str, PivotResult]  # device -> what the pivot did
    notes: tuple[str, ...]


def _aliases(live_xml: str) -> dict[str, str]:
    """Target dev -> libvirt's device alias (virtio-disk0 ...), from the live XML."""
    import xml.etree.ElementTree as ET

    aliases = {}
    for disk in ET.fromstring(live_xml).iter("disk"):
        target, alias = disk.find("target"), disk.find("alias")
        if target is not None and alias is not None:
            aliases[target.get("dev", "")] = alias.get("name", "")
    return aliases


async def _attached_node(monitor: LibvirtMonitor, alias: str) -> str | None:
    for block in await monitor.execute("query-block"):
        qdev = str(block.get("qdev", ""))
        inserted = block.get("inserted")
        if inserted and alias and (qdev == alias or f"/{alias}/" in qdev):
            return str(inserted["node-name"])
    return None


async def pivot_disks(
    domain: Any, targets: Sequence[PivotTarget], *, pid: int | None
) -> DomainPivot:
    """Switch each disk of the running `domain` (on B) from its receive to its local file (see
    step 4 of the module docstring)."""
    name = await _in_thread("libvirt on B", domain.name)
    live_xml = await _in_thread(f"libvirt on B: XML of {name}", domain.XMLDesc, 0)
    aliases = _aliases(live_xml)
    monitor = LibvirtMonitor(domain, pid)
    client = cast(QMPClient, monitor)  # the pivot uses execute() and peer_pid() only
    results: dict[str, PivotResult] = {}
    for target in targets:
        alias = aliases.get(target.device)
        if alias is None:
            raise LibvirtDriverError(f"{name} has no disk {target.device} in its live XML")
        attached = await _attached_node(monitor, alias)
        plan = await find_pivot_plan(client, target.endpoint, target.local_file)
        if attached != plan.format_node.name:
            raise LibvirtDriverError(
                f"disk {target.device} ({alias}) of {name} uses node {attached}, but the nbd "
                f"node on {target.endpoint.uri()} is under {plan.format_node.name}"
            )
        results[target.device] = await pivot_disk(client, target.endpoint, target.local_file)
    notes = (TAINT_NOTE.format(name=name),) if monitor.commands else ()
    return DomainPivot(results, notes)


# --- 5. B's persistent definition on the local files ------------------------------------------


def persist_local_disks(dest_connection: Any, domain_name: str, policy: DomainPolicy) -> Rewrite:
    """Define B's domain again with each policy disk a file disk on its dest_file (step 5)."""
    libvirt = _libvirt()
    domain = libvirt_call(f"libvirt on B: {domain_name}", dest_connection.lookupByName, domain_name)
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    text = libvirt_call(f"libvirt on B: XML of {domain_name}", domain.XMLDesc, flags)
    rewrite = rewrite_libvirt_local(text, policy, f"B's definition of {domain_name}")
    libvirt_call(f"libvirt on B: define {domain_name}", dest_connection.defineXML, rewrite.text)
    return rewrite
