"""The steps of `postcopy migrate`, written once for every toolstack.

    preflight    the domain's policy says postcopy; B answers `postcopy --version` with a
                 compatible version; B has room for the data; B holds none of the paths yet
    serve        `postcopy serve` on A, a child in its own session: bound to the address A uses
                 towards B, a random export name per disk, TLS with client certificates when a
                 PKI directory (libvirt's layout) is there, a loud warning in plaintext
    receive      `postcopy receive --wait-for-source` per disk on B (the agent, over ssh)
    destination  the toolstack prepares B (QEMU: B's QEMU from the rewritten arguments)
    migrate      the toolstack's migration; at switchover the agent declares every disk's
                 source frozen and both records turn `switched`
    drain        the disks' progress until every one is complete (a receive that died is
                 restarted from its state directory)
    verify       B proves it holds A's bytes (`verify_step`)
    pivot        the domain switches onto B's local files; the receives stop
    persist      B's persistent definition of the domain on the local files
    release      serve stopped (its socket goes with it), the domain's remains on A stopped,
                 the records removed; the summary

Failure policy.  Until the switchover every failure (B unreachable, a receive or B's QEMU that
dies, the toolstack's migration failing, Ctrl-C) rolls back: the toolstack leaves the domain
running on A, B's agent stops what it started and removes every path it created (unless
`--keep`), serve stops.  After the switchover nothing is undone: a Ctrl-C detaches (serve, the
receives and B's QEMU go on; the command says how to watch and how to finish), and `postcopy
migrate --resume DOMAIN` picks the migration up from A's and B's records (`resume_migration`):
it restarts receives that died and goes on from the drain.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from postcopy.errors import PostcopyError, UserError
from postcopy.migrate.processes import process_running, stop_process
from postcopy.migrate.progress import Progress
from postcopy.migrate.qemu import DEFAULT_RECONNECT_DELAY, QemuToolstack
from postcopy.migrate.records import DiskPlan, load_record, save_record
from postcopy.migrate.remote import AgentError, AgentSession, RemoteHost
from postcopy.migrate.toolstack import MigrationFigures, Toolstack
from postcopy.migrate.verify_step import Verification, verify_disks
from postcopy.policy import DomainPolicy

DEFAULT_RECORD_DIR = Path("/var/lib/postcopy/outgoing")
DEFAULT_PKI_DIR = Path("/etc/pki/postcopy")
DEFAULT_MIGRATE_PORT = 49152
PKI_SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
SERVE_START_SECONDS = 20.0
POLL_SECONDS = 0.25
READY_RE = re.compile(r"^ready (\S+)", re.MULTILINE)
SERVED_RE = re.compile(r"sent (\d+) bytes \((\d+) bytes of read data; (\d+) bytes of holes")
EXIT_DETACHED = 3  # Ctrl-C after switchover: the migration goes on without this command
EXIT_KEPT = 4  # verification failed: A is kept


@dataclass
class MigrateOptions:
    domain: DomainPolicy
    dest_host: str
    source_qmp: Path
    ssh: str = "ssh"
    remote_postcopy: str = "postcopy"
    dest_qemu_args: str | None = None  # B's command line (text); None: A's own
    dest_qmp: Path | None = None  # a QEMU the user started on B (-incoming defer)
    migrate_address: str | None = None  # B's address for the RAM stream (default: dest_host)
    migrate_port: int = DEFAULT_MIGRATE_PORT
    source_address: str | None = None  # what serve binds (default: A's address towards B)
    pki_dir: Path | None = None  # A's: ca-cert.pem, server-cert.pem, server-key.pem
    remote_pki_dir: Path | None = None  # B's: ca-cert.pem, client-cert.pem, client-key.pem
    record_dir: Path = DEFAULT_RECORD_DIR
    persist_path: Path | None = None  # default <state_root>/<domain>/<domain>.qemu-args on B
    keep: bool = False
    as_json: bool = False
    reconnect_delay: int = DEFAULT_RECONNECT_DELAY
    migration_timeout: float = 300.0


@dataclass
class Run:
    """What one run knows; most of it is also in A's record."""

    options: MigrateOptions
    progress: Progress
    record: dict[str, Any]
    record_path: Path
    agent: AgentSession | None = None
    toolstack: Toolstack | None = None
    serve_process: subprocess.Popen[bytes] | None = None
    phase: str = "preparing"
    work_scope: trio.CancelScope | None = None
    interrupted: bool = False
    detached: bool = False
    figures: dict[str, Any] = field(default_factory=dict)


# --- pre-flight -------------------------------------------------------------------------------


def _compatible(ours: str, theirs: str) -> bool:
    """Same major and minor version (the agent protocol may change between minor versions)."""
    return ours.split(".")[:2] == theirs.split(".")[:2]


def resolve_address(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve {host}: {exc.strerror}") from None


def local_address_towards(address: str) -> str:
    """The address of the interface this host uses to reach `address` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, 9))
        except OSError as exc:
            raise UserError(f"no route to {address}: {exc.strerror}") from None
        return str(probe.getsockname()[0])


def plan_disks(domain: DomainPolicy) -> list[DiskPlan]:
    disks = []
    for disk in domain.disks:
        endpoint = domain.dest_endpoint(disk)
        if endpoint.socket is None:
            raise UserError(
                f"disk {disk.device} of {domain.name} listens on TCP on B; "
                "migrate serves the domain's disks on Unix sockets"
            )
        disks.append(DiskPlan(
            device=disk.device,
            source_image=str(disk.source_image),
            export=f"{domain.name}-{disk.device}-{secrets.token_hex(8)}",
            dest_file=str(disk.dest_file),
            state_dir=str(domain.state_dir(disk)),
            socket=str(endpoint.socket),
            chunk_size=domain.chunk_size,
            bandwidth=domain.bandwidth,
            source_id=f"{domain.name}/{disk.device}",
        ))  # fmt: skip
    return disks


def _pki(options: MigrateOptions) -> tuple[Path, Path] | None:
    """(A's PKI dir, B's) when TLS is configured: given, or the default dir exists on A."""
    pki = options.pki_dir
    if pki is None and all((DEFAULT_PKI_DIR / name).exists() for name in PKI_SERVER_FILES):
        pki = DEFAULT_PKI_DIR
    if pki is None:
        return None
    missing = [name for name in PKI_SERVER_FILES if not (pki / name).is_file()]
    if missing:
        raise UserError(f"PKI directory {pki} lacks {', '.join(missing)} (libvirt's layout)")
    return pki, options.remote_pki_dir or pki


def allocated_bytes(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError as exc:
        raise UserError(f"cannot read the domain's image {path}: {exc.strerror}") from None


# --- serve on A -------------------------------------------------------------------------------


def start_serve(
    disks: list[DiskPlan], address: str, pki: tuple[Path, Path] | None, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """`postcopy serve` bound to `address` (a free port), in its own session; (process, the
    `nbd://host:port` it listens on)."""
    host = f"[{address}]" if ":" in address else address
    argv = [sys.executable, "-m", "postcopy.cli", "serve", "--listen", f"{host}:0"]
    if pki is not None:
        own = pki[0]
        argv += ["--tls", "require", "--tls-cert", str(own / "server-cert.pem"),
                 "--tls-key", str(own / "server-key.pem"), "--tls-ca", str(own / "ca-cert.pem"),
                 "--tls-verify-peer"]  # fmt: skip
    argv += [f"{disk.export}={disk.source_image}" for disk in disks]
    with open(log, "ab") as out:
        offset = out.tell()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + SERVE_START_SECONDS
    while True:
        text = log.read_bytes()[offset:].decode(errors="replace")
        match = READY_RE.search(text)
        if match:
            return process, match.group(1)
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process.pid, process)
            lines = [line for line in text.splitlines() if line.strip()]
            raise UserError(f"postcopy serve did not start: {lines[-1] if lines else 'no output'}")
        time.sleep(0.05)


def source_uri(listening: str, export: str, pki: tuple[Path, Path] | None) -> str:
    base = listening.split("://", 1)[1].split("/", 1)[0]
    if pki is None:
        return f"nbd://{base}/{export}"
    return f"nbds://{base}/{export}?tls-certificates={pki[1]}"


# --- the run ----------------------------------------------------------------------------------


async def _watch_signals(run: Run) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if run.interrupted or run.detached:
                run.progress.event("signal", "info", "already stopping; wait")
                continue
            if run.phase == "preparing":
                run.interrupted = True
                run.progress.event("signal", "info", "interrupted before switchover: rolling back")
            else:
                run.detached = True
            if run.work_scope is not None:
                run.work_scope.cancel()


def _save(run: Run) -> None:
    run.record["phase"] = run.phase
    run.record["figures"] = run.figures
    save_record(run.record_path, run.record)


def _agent_argv(domain: DomainPolicy, keep: bool) -> list[str]:
    argv = [
        "migrate-receive",
        "--domain",
        domain.name,
        "--migration-dir",
        str(domain.state_root / domain.name),
    ]
    return [*argv, "--keep"] if keep else argv


def _make_toolstack(
    options: MigrateOptions, disks: list[DiskPlan], agent: AgentSession, record: dict[str, Any]
) -> QemuToolstack:
    return QemuToolstack(
        options.domain, disks, agent, options.source_qmp, record["dest_qmp"],
        record["migrate_uri"], dest_args_text=options.dest_qemu_args,
        user_started_dest=options.dest_qmp is not None, persist_path=record["persist_path"],
        timeout_seconds=options.migration_timeout, reconnect_delay=options.reconnect_delay,
    )  # fmt: skip


async def run_migration(options: MigrateOptions) -> int:
    """Migrate the domain (see the module docstring); the exit status."""
    domain = options.domain
    progress = Progress.for_streams(options.as_json)
    if not domain.is_postcopy:
        raise UserError(
            f"domain {domain.name!r} is in {domain.mode.value} mode in "
            f"{domain.config_file}: postcopy migrate moves postcopy domains only"
        )
    options.record_dir.mkdir(parents=True, exist_ok=True)
    record_path = options.record_dir / f"{domain.name}.json"
    if record_path.exists():
        raise UserError(
            f"a migration of {domain.name} is under way ({record_path}): "
            f"postcopy migrate --resume {domain.name}"
        )
    remote = RemoteHost(options.dest_host, options.ssh, options.remote_postcopy)
    progress.event("preflight", "start", dest=options.dest_host)
    from postcopy.cli import version

    answer = (await remote.run(["--version"])).strip()
    theirs = answer.rpartition(" ")[2]
    if not answer.startswith("postcopy ") or not _compatible(version(), theirs):
        raise UserError(f"B runs {answer!r}, not a version compatible with postcopy {version()}")
    migrate_address = resolve_address(options.migrate_address or options.dest_host)
    source_address = options.source_address or local_address_towards(migrate_address)
    pki = _pki(options)
    disks = plan_disks(domain)
    dest_qmp = str(options.dest_qmp or domain.socket_dir / f"{domain.name}.qmp")
    host = f"[{migrate_address}]" if ":" in migrate_address else migrate_address
    record: dict[str, Any] = {
        "phase": "preparing", "domain": domain.name, "config_file": str(domain.config_file),
        "dest_host": options.dest_host, "ssh": options.ssh,
        "remote_postcopy": options.remote_postcopy, "source_qmp": str(options.source_qmp),
        "dest_qmp": dest_qmp, "migrate_uri": f"tcp:{host}:{options.migrate_port}",
        "disks": [d.as_dict() for d in disks], "keep": options.keep,
        "persist_path": str(options.persist_path
                            or domain.state_root / domain.name / f"{domain.name}.qemu-args"),
    }  # fmt: skip
    run = Run(options, progress, record, record_path)
    async with remote.open_agent(
        _agent_argv(domain, options.keep), options.record_dir / f"{domain.name}.agent.log"
    ) as agent:
        run.agent = agent
        checked = await agent.request("check", disks=record["disks"], qmp_socket=dest_qmp)
        problems = (
            list(checked["problems"])
            if options.dest_qmp is None
            else [p for p in checked["problems"] if "QMP socket" not in p]
        )
        for disk in disks:
            need = allocated_bytes(disk.source_image)
            free = int(checked["free_bytes"][disk.device])
            if need > free:
                problems.append(
                    f"B has {free} bytes free for {disk.dest_file}, the data of "
                    f"{disk.source_image} needs {need}"
                )
        if problems:
            raise UserError("; ".join(problems))
        progress.event(
            "preflight",
            "done",
            remote_version=theirs,
            source_address=source_address,
            migrate_uri=record["migrate_uri"],
            tls=pki is not None,
        )
        if pki is None:
            progress.warn(
                "the disk crosses the network in PLAINTEXT: anyone on the path can read it (put "
                f"ca-cert.pem, server-cert.pem and server-key.pem in {DEFAULT_PKI_DIR} or give "
                "--tls-pki DIR, libvirt's layout, for TLS with client certificates)"
            )
        run.toolstack = _make_toolstack(options, disks, agent, record)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, run)
            try:
                code = await _migrate_steps(run, disks, source_address, pki)
            finally:
                nursery.cancel_scope.cancel()
        return code


async def _migrate_steps(
    run: Run, disks: list[DiskPlan], source_address: str, pki: tuple[Path, Path] | None
) -> int:
    progress, record, options = run.progress, run.record, run.options
    assert run.agent is not None and run.toolstack is not None
    agent, toolstack = run.agent, run.toolstack
    failure: BaseException | None = None
    with trio.CancelScope() as scope:
        run.work_scope = scope
        try:
            progress.event("serve", "start", address=source_address)
            serve_log = options.record_dir / f"{options.domain.name}.serve.log"
            process, listening = start_serve(disks, source_address, pki, serve_log)
            run.serve_process = process
            record["serve"] = {"pid": process.pid, "uri": listening, "log": str(serve_log)}
            _save(run)
            progress.event(
                "serve", "done", pid=process.pid, uri=listening, exports=[d.export for d in disks]
            )
            progress.event("receive", "start")
            uris = {d.device: source_uri(listening, d.export, pki) for d in disks}
            prepared = await agent.request("prepare", disks=record["disks"], source_uris=uris)
            progress.event("receive", "done", pids=prepared["receive_pids"])
            progress.event("destination", "start", toolstack=toolstack.name)
            started = await toolstack.prepare_destination()
            record["dest_args"] = getattr(toolstack, "dest_args", None)
            record["persist_args"] = getattr(toolstack, "persist_args", None)
            _save(run)
            progress.event("destination", "done", **started)
            progress.event("migrate", "start", uri=record["migrate_uri"])

            async def switchover() -> None:
                await agent.request("switchover")
                run.phase = "switched"
                run.figures["switched_at"] = time.time()
                _save(run)
                progress.event("switchover", "done", message="source frozen, B takes over")

            figures: MigrationFigures = await toolstack.migrate(switchover)
        except (PostcopyError, OSError) as exc:
            failure = exc
        except Exception as exc:  # a bug before the switchover still rolls back
            failure = exc
            run.progress.warn(f"internal error {type(exc).__name__}: {exc}")
    rollback = toolstack.rollback
    if rollback is not None or run.phase == "preparing" or failure is not None:
        # The toolstack's migration failed (it resumed A, or says it could not), or something
        # failed before it began: B is undone.  Nothing ran on B (-S until after the switchover).
        reason = (
            "interrupted (Ctrl-C)"
            if run.interrupted or run.detached
            else str(failure or rollback or "cancelled")
        )
        return await _roll_back(run, reason)
    run.figures.update(
        downtime_ms=figures.downtime_ms,
        migration_ms=figures.total_ms,
        ram_bytes=figures.ram_bytes,
        running_on_b_at=time.time(),
    )
    _save(run)
    progress.event(
        "migrate",
        "done",
        downtime_ms=figures.downtime_ms,
        migration_ms=figures.total_ms,
        ram_bytes=figures.ram_bytes,
    )
    return await _after_switchover(run, disks)


async def _roll_back(run: Run, reason: str) -> int:
    """Before switchover (or when the toolstack resumed A): B and A's serve go, A runs on."""
    progress = run.progress
    assert run.agent is not None
    with trio.CancelScope(shield=True):
        progress.event("rollback", "start", message=reason)
        rollback = run.toolstack.rollback if run.toolstack is not None else None
        if rollback is not None and not rollback.source_resumed:
            progress.warn(f"the source was NOT resumed ({rollback}): B is left as it is")
            return 1
        removed: list[str] = []
        try:
            if run.toolstack is not None and not run.agent.gone:
                await run.toolstack.abort_destination()
            if not run.agent.gone:
                answer = await run.agent.request("cleanup", force=True)
                removed = answer.get("removed", [])
        except AgentError as exc:
            progress.warn(
                f"B did not clean up: {exc} (B's migrate-receive cleans up when "
                "its connection closes)"
            )
        serve = run.record.get("serve") or {}
        stop_process(serve.get("pid"), run.serve_process)
        run.record_path.unlink(missing_ok=True)
        progress.event(
            "rollback",
            "done",
            message="the domain runs on A; B holds nothing"
            + (" (--keep: B's files kept)" if run.options.keep else ""),
            removed_on_b=removed,
        )
    return 1


async def _after_switchover(run: Run, disks: list[DiskPlan]) -> int:
    codes: list[int] = []
    with trio.CancelScope() as scope:
        run.work_scope = scope
        codes.append(await _drain_verify_pivot_release(run, disks))
    return codes[0] if codes else _detach(run)


def _detach(run: Run) -> int:
    name = run.options.domain.name
    run.progress.stop_live()
    run.progress.event(
        "detach", "done",
        f"the domain runs on B and its disks go on draining without this command; watch with "
        f"`{shlex.join([*shlex.split(run.options.ssh), run.options.dest_host])} fetch-progress "
        f"--domain {name} --watch`, finish (verify, pivot, release A) with `postcopy migrate "
        f"--resume {name}`",
    )  # fmt: skip
    return EXIT_DETACHED


async def _drain_verify_pivot_release(run: Run, disks: list[DiskPlan]) -> int:
    progress, agent, toolstack = run.progress, run.agent, run.toolstack
    assert agent is not None and toolstack is not None
    name = run.options.domain.name
    progress.event("drain", "start")
    running_on_b = run.figures.get("running_on_b_at")
    first_io_at = run.figures.get("first_io_at")
    statuses: dict[str, Any] = {}
    while True:
        answer = await agent.request("status")
        statuses = answer["disks"]
        if first_io_at is None:
            operations = await toolstack.guest_io_operations()
            if operations:
                first_io_at = run.figures["first_io_at"] = time.time()
        # Even a complete disk needs its receive until the pivot: the domain reads through it.
        down = [d for d, s in statuses.items() if not s["receive_running"]]
        if down:
            progress.stop_live()
            progress.event("receive", "restart", f"receive of {', '.join(down)} on B is gone",
                           disks=down)  # fmt: skip
            ensured = await agent.request("ensure")
            progress.event(
                "receive",
                "done",
                pids=ensured["receive_pids"],
                restarted=ensured["restarted"],
                guest_resumed=ensured["guest_resumed"],
            )
            continue
        if all((s.get("record") or {}).get("state") == "complete" for s in statuses.values()):
            break
        progress.drain(name, statuses)
        await trio.sleep(POLL_SECONDS)
    progress.stop_live()
    switched_at = run.figures.get("switched_at") or time.time()
    run.figures["drain_seconds"] = time.time() - switched_at
    if running_on_b is not None and first_io_at is not None:
        run.figures["first_io_seconds"] = max(0.0, first_io_at - running_on_b)
    _save(run)
    progress.event("drain", "done", seconds=round(run.figures["drain_seconds"], 3))

    progress.event("verify", "start")
    remote = RemoteHost(run.options.dest_host, run.options.ssh, run.options.remote_postcopy)
    verification = await verify_disks(remote, disks)
    run.figures["verification"] = verification.as_dict()
    if verification.status in ("mismatch", "error"):
        progress.event("verify", "failed", verification.detail, **verification.as_dict())
        progress.warn(
            f"verification failed: A is kept (serve runs; fix and run postcopy migrate "
            f"--resume {name})"
        )
        return EXIT_KEPT
    if verification.status == "not-run":
        progress.warn(verification.detail)
    progress.event("verify", "done", **verification.as_dict())

    # From here on a Ctrl-C waits: a pivot or a release cut in the middle helps nobody.
    with trio.CancelScope(shield=True):
        code = await _pivot_persist_release(run, statuses, verification)
    return code


async def _pivot_persist_release(
    run: Run, statuses: dict[str, Any], verification: Verification
) -> int:
    progress, agent, toolstack = run.progress, run.agent, run.toolstack
    assert agent is not None and toolstack is not None
    progress.event("pivot", "start")
    pivot = await toolstack.pivot()
    run.phase = "pivoted"
    _save(run)
    progress.event("pivot", "done", disks=pivot.disks, remote_disks_left=pivot.remote_disks_left)
    progress.event("persist", "start")
    try:
        persisted = await toolstack.persist()
        progress.event("persist", "done", path=persisted)
    except UserError as exc:
        persisted = None
        progress.warn(f"B's persistent definition not written: {exc}")

    progress.event("release", "start")
    serve = run.record.get("serve") or {}
    stop_process(serve.get("pid"), run.serve_process)
    served = _served_bytes(Path(serve.get("log", "/nonexistent")))
    await toolstack.release_source()
    await agent.request("finish")
    run.phase = "done"
    run.record_path.unlink(missing_ok=True)
    progress.event("release", "done", message="serve stopped, A released")
    summary = _summary(run, statuses, served, verification, persisted)
    progress.event("summary", "done", _summary_line(summary), **summary)
    return 0


def _served_bytes(log: Path) -> dict[str, int]:
    try:
        matches = SERVED_RE.findall(log.read_text(errors="replace"))
    except OSError:
        return {}
    if not matches:
        return {}
    sent, data, holes = map(int, matches[-1])
    return {"sent_bytes": sent, "read_data_bytes": data, "hole_bytes": holes}


def _summary(
    run: Run,
    statuses: dict[str, Any],
    served: dict[str, int],
    verification: Verification,
    persisted: str | None,
) -> dict[str, Any]:
    records = [s.get("record") or {} for s in statuses.values()]
    figures = run.figures
    return {
        "domain": run.options.domain.name,
        "downtime_ms": figures.get("downtime_ms"),
        "first_guest_io_seconds": figures.get("first_io_seconds"),
        "drain_seconds": figures.get("drain_seconds"),
        "disk_bytes": sum(int(r.get("size_bytes", 0)) for r in records),
        "moved_bytes": served.get("sent_bytes"),
        "moved_data_bytes": served.get("read_data_bytes"),
        "hole_bytes_not_moved": served.get("hole_bytes"),
        "ram_bytes": figures.get("ram_bytes"),
        "faults": sum(int(r.get("faults", 0)) for r in records),
        "fault_latency_p50_ms": max(
            (r.get("fault_latency_p50_ms") or 0 for r in records), default=None
        ),
        "fault_latency_p99_ms": max(
            (r.get("fault_latency_p99_ms") or 0 for r in records), default=None
        ),
        "verification": verification.status,
        "persisted": persisted,
    }


def _summary_line(summary: dict[str, Any]) -> str:
    def number(value: Any, unit: str, scale: float = 1.0) -> str:
        return "?" if value is None else f"{value * scale:.3g} {unit}"

    return (
        f"{summary['domain']} runs on B from its local disk: downtime "
        f"{number(summary['downtime_ms'], 'ms')}, first guest I/O on B after "
        f"{number(summary['first_guest_io_seconds'], 's')}, drain "
        f"{number(summary['drain_seconds'], 's')}, moved "
        f"{number(summary['moved_bytes'], 'MiB', 1 / 2**20)} for a "
        f"{number(summary['disk_bytes'], 'MiB', 1 / 2**20)} disk, {summary['faults']} faults "
        f"(p50 {number(summary['fault_latency_p50_ms'], 'ms')}, p99 "
        f"{number(summary['fault_latency_p99_ms'], 'ms')}), verification "
        f"{summary['verification']}"
    )


# --- resume -----------------------------------------------------------------------------------


async def resume_migration(domain: DomainPolicy, record_dir: Path, as_json: bool) -> int:
    """Pick up a detached or crashed migration of `domain` from A's and B's records."""
    progress = Progress.for_streams(as_json)
    record_path = record_dir / f"{domain.name}.json"
    record = load_record(record_path)
    options = MigrateOptions(
        domain=domain, dest_host=record["dest_host"], source_qmp=Path(record["source_qmp"]),
        ssh=record["ssh"], remote_postcopy=record["remote_postcopy"], record_dir=record_dir,
        keep=bool(record.get("keep")), as_json=as_json,
        dest_qmp=None,
    )  # fmt: skip
    disks = [DiskPlan.from_dict(d) for d in record["disks"]]
    remote = RemoteHost(options.dest_host, options.ssh, options.remote_postcopy)
    run = Run(
        options,
        progress,
        record,
        record_path,
        phase=record["phase"],
        figures=dict(record.get("figures") or {}),
    )
    progress.event("resume", "start", phase=run.phase)
    async with remote.open_agent(
        _agent_argv(domain, options.keep), record_dir / f"{domain.name}.agent.log"
    ) as agent:
        run.agent = agent
        loaded = await agent.request("load")
        toolstack = _make_toolstack(options, disks, agent, record)
        toolstack.dest_args = list(record.get("dest_args") or [])
        toolstack.persist_args = list(record.get("persist_args") or [])
        run.toolstack = toolstack
        if run.phase == "preparing" or loaded["phase"] == "preparing":
            return await _roll_back(run, "resumed a migration that never switched over")
        serve = record.get("serve") or {}
        if not process_running(serve.get("pid")) and loaded["phase"] == "switched":
            progress.warn(
                f"A's serve (pid {serve.get('pid')}) is gone: the disks can only "
                "complete from what B holds"
            )
        progress.event("resume", "done", phase=loaded["phase"], receives=loaded["receive_pids"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, run)
            try:
                if loaded["phase"] == "pivoted":
                    code = await _release_only(run)
                else:
                    code = await _after_switchover(run, disks)
            finally:
                nursery.cancel_scope.cancel()
        return code


async def _release_only(run: Run) -> int:
    """B already pivoted (the command died after it): persist and release."""
    assert run.agent is not None and run.toolstack is not None
    persisted = await run.toolstack.persist()
    serve = run.record.get("serve") or {}
    stop_process(serve.get("pid"))
    await run.toolstack.release_source()
    await run.agent.request("finish")
    run.record_path.unlink(missing_ok=True)
    run.progress.event("release", "done", persisted=persisted)
    return 0
