"""The QEMU toolstack of `postcopy migrate`: QMP on both sides, B's QEMU started over ssh.

How it works.
- B's arguments: the domain's QEMU command line for B (`--dest-qemu-args FILE`, or else A's own,
  read from /proc through the QMP socket's peer) goes through `postcopy config --qemu-args`'s
  rewrite (`integrations.qemu.rewrite_qemu_args`): each policy disk becomes an nbd node on its
  receive's socket.  Then `destination_args` makes it B's: every nbd node of ours waits for a
  restarted receive instead of failing the guest's I/O (`reconnect-delay`), the monitor is B's
  QMP socket, and `-incoming defer -S` is appended (B never runs before the switchover is done).
- `prepare_destination` starts that QEMU on B through the agent; or, with `--dest-qmp`, checks
  the QEMU the user started there (it must be `inmigrate`).
- `migrate` is `integrations.qemu_migrate.migrate_with_sessions` over A's local QMP and B's
  monitor through the agent (`remote.RemoteQMP`), the RAM going over TCP to B's address.
- `pivot` is the agent's (`integrations.qemu_pivot` on B); `persist` writes `persistent_args`:
  B's arguments with each of our nbd nodes back on its local file (`driver=file`, same node
  name), without `-incoming` and `-S`, so that B boots the domain from its own disks.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from postcopy.errors import UserError
from postcopy.integrations.qemu import (
    join_qemu_opts,
    parse_qemu_args,
    rewrite_qemu_args,
    split_qemu_opts,
)
from postcopy.integrations.qemu_migrate import MigrationConfig, migrate_with_sessions
from postcopy.integrations.qmp import QMPClient, QMPError, open_qmp
from postcopy.migrate.records import DiskPlan
from postcopy.migrate.remote import AgentSession, RemoteQMP
from postcopy.migrate.toolstack import (
    MigrationFigures,
    PivotFigures,
    Rollback,
    SwitchoverHook,
)
from postcopy.policy import DomainPolicy

# Options that say how QEMU starts rather than what the domain is: B's come from migrate.
_START_OPTIONS_WITH_VALUE = ("-incoming", "-qmp", "-pidfile")
_START_FLAGS = ("-S", "-daemonize")
DEFAULT_RECONNECT_DELAY = 300  # s: how long B's QEMU holds guest I/O while a receive restarts


def _bare(option: str) -> str:
    return "-" + option.lstrip("-") if option.startswith("-") else option


def _strip_start_options(args: Sequence[str]) -> list[str]:
    out: list[str] = []
    index = 0
    while index < len(args):
        bare = _bare(args[index])
        if bare in _START_OPTIONS_WITH_VALUE:
            index += 2
            continue
        if bare in _START_FLAGS:
            index += 1
            continue
        out.append(args[index])
        index += 1
    return out


def _our_nbd_node(value: str, sockets: dict[str, DiskPlan]) -> tuple[Any, DiskPlan] | None:
    """(parsed options, disk) when a -blockdev value is an nbd node on one of our sockets."""
    if value.lstrip().startswith("{"):
        node = json.loads(value)
        server = node.get("server") or {}
        path = str(server.get("path", "")) if node.get("driver") == "nbd" else ""
    else:
        node = split_qemu_opts(value)
        options = dict(node)
        path = options.get("server.path", "") if options.get("driver") == "nbd" else ""
    disk = sockets.get(path)
    return (node, disk) if disk is not None else None


def _node_name(value: str) -> str | None:
    if value.lstrip().startswith("{"):
        name = json.loads(value).get("node-name")
        return str(name) if name else None
    return dict(split_qemu_opts(value)).get("node-name")


def _file_child(value: str) -> str | None:
    if value.lstrip().startswith("{"):
        child = json.loads(value).get("file")
        return child if isinstance(child, str) else None
    return dict(split_qemu_opts(value)).get("file")


def destination_args(
    rewritten: Sequence[str],
    disks: Sequence[DiskPlan],
    qmp_socket: str,
    reconnect_delay: int = DEFAULT_RECONNECT_DELAY,
) -> list[str]:
    """B's QEMU arguments from the rewritten command line (see the module docstring)."""
    sockets = {disk.socket: disk for disk in disks}
    args = _strip_start_options(rewritten)
    found: set[str] = set()
    ours: set[str] = set()  # node names of our nbd nodes and of the format nodes above them
    for index in range(len(args) - 1):
        if _bare(args[index]) != "-blockdev":
            continue
        match = _our_nbd_node(args[index + 1], sockets)
        if match is None:
            continue
        node, disk = match
        found.add(disk.device)
        if isinstance(node, dict):
            node["reconnect-delay"] = reconnect_delay
            args[index + 1] = json.dumps(node, separators=(",", ":"))
        else:
            pairs = [(k, v) for k, v in node if k != "reconnect-delay"]
            args[index + 1] = join_qemu_opts([*pairs, ("reconnect-delay", str(reconnect_delay))])
        name = _node_name(args[index + 1])
        if name:
            ours.add(name)
    missing = [disk.device for disk in disks if disk.device not in found]
    if missing:
        raise UserError(
            f"B's QEMU arguments have no -blockdev nbd node for {', '.join(missing)} (the "
            "pivot needs named -blockdev nodes: see postcopy config --qemu-args)"
        )
    for index in range(len(args) - 1):
        if _bare(args[index]) == "-blockdev" and _file_child(args[index + 1]) in ours:
            name = _node_name(args[index + 1])
            if name:
                ours.add(name)
    # A disk whose receive is gone (a receive killed on B) answers with errors: the device
    # stops the guest on them, and `cont` re-runs them once a receive serves the disk again.
    for index in range(len(args) - 1):
        if _bare(args[index]) != "-device":
            continue
        pairs = split_qemu_opts(args[index + 1])
        if dict(pairs).get("drive") in ours:
            kept = [(k, v) for k, v in pairs if k not in ("werror", "rerror")]
            args[index + 1] = join_qemu_opts([*kept, ("werror", "stop"), ("rerror", "stop")])
    return [*args, "-qmp", f"unix:{qmp_socket},server=on,wait=off", "-incoming", "defer", "-S"]


def persistent_args(
    rewritten: Sequence[str], disks: Sequence[DiskPlan], qmp_socket: str
) -> list[str]:
    """B's arguments on the local files: each of our nbd nodes becomes a file node of the same
    name; the monitor is B's QMP socket."""
    sockets = {disk.socket: disk for disk in disks}
    args = _strip_start_options(rewritten)
    for index in range(len(args) - 1):
        if _bare(args[index]) != "-blockdev":
            continue
        ours = _our_nbd_node(args[index + 1], sockets)
        if ours is None:
            continue
        node, disk = ours
        if isinstance(node, dict):
            kept = {
                k: v
                for k, v in node.items()
                if k not in ("driver", "server", "export", "reconnect-delay", "tls-creds")
            }
            args[index + 1] = json.dumps(
                {"driver": "file", "filename": disk.dest_file, **kept}, separators=(",", ":")
            )
        else:
            kept_pairs = [
                (k, v)
                for k, v in node
                if k not in ("driver", "export", "reconnect-delay", "tls-creds")
                and not k.startswith("server.")
            ]
            args[index + 1] = join_qemu_opts(
                [("driver", "file"), ("filename", disk.dest_file), *kept_pairs]
            )
    return [*args, "-qmp", f"unix:{qmp_socket},server=on,wait=off"]


class QemuToolstack:
    """`Toolstack` for QEMU (see the module docstring)."""

    name = "qemu"

    def __init__(
        self,
        domain: DomainPolicy,
        disks: Sequence[DiskPlan],
        agent: AgentSession,
        source_qmp: Path,
        dest_qmp: str,
        migrate_uri: str,
        *,
        dest_args_text: str | None = None,
        user_started_dest: bool = False,
        persist_path: str,
        timeout_seconds: float = 300.0,
        reconnect_delay: int = DEFAULT_RECONNECT_DELAY,
    ) -> None:
        self.domain = domain
        self.disks = list(disks)
        self.agent = agent
        self.source_qmp = source_qmp
        self.dest_qmp = dest_qmp
        self.migrate_uri = migrate_uri
        self.dest_args_text = dest_args_text
        self.user_started_dest = user_started_dest
        self.persist_path = persist_path
        self.timeout_seconds = timeout_seconds
        self.reconnect_delay = reconnect_delay
        self.dest_args: list[str] = []
        self.persist_args: list[str] = []
        self.remote = RemoteQMP(agent)
        self.rollback: Rollback | None = None

    async def _source_command_line(self) -> str:
        try:
            from postcopy.integrations.qemu_pivot import qmp_peer_command_line
        except ImportError:
            raise UserError("give B's QEMU command line with --dest-qemu-args FILE") from None
        async with open_qmp(self.source_qmp) as client:
            argv = qmp_peer_command_line(client)
        if argv is None:
            raise UserError(
                f"cannot read A's QEMU command line through {self.source_qmp}: give "
                "--dest-qemu-args FILE"
            )
        return "".join(arg + "\n" for arg in argv)

    async def build_destination_args(self) -> list[str]:
        text = self.dest_args_text or await self._source_command_line()
        rewrite = rewrite_qemu_args(text, self.domain, "B's QEMU arguments")
        args, _ = parse_qemu_args(rewrite.text)
        self.dest_args = destination_args(args, self.disks, self.dest_qmp, self.reconnect_delay)
        self.persist_args = persistent_args(args, self.disks, self.dest_qmp)
        return self.dest_args

    async def prepare_destination(self) -> dict[str, Any]:
        if self.user_started_dest:
            status = await self.remote.execute("query-status")
            if status.get("status") != "inmigrate":
                raise UserError(
                    f"B's QEMU is {status.get('status')!r}: start it with -incoming defer"
                )
            return {"pid": None, "args": None}
        args = await self.build_destination_args()
        started = await self.agent.request("start_qemu", argv=args, qmp_socket=self.dest_qmp)
        return {"pid": started["pid"], "args": shlex.join(args)}

    async def migrate(self, switchover: SwitchoverHook) -> MigrationFigures:
        failures: list[Any] = []
        config = MigrationConfig(
            source_qmp=self.source_qmp, dest_qmp=Path(self.dest_qmp), state_dir=None,
            migration_uri=self.migrate_uri, timeout_seconds=self.timeout_seconds,
            poll_interval_seconds=0.05,
        )  # fmt: skip
        async with open_qmp(self.source_qmp) as source:
            try:
                report = await migrate_with_sessions(
                    source, self.remote, config, switchover=switchover, failures=failures
                )
            finally:
                if failures:
                    failed = failures[0]
                    self.rollback = Rollback(
                        failed.reason, failed.source_resumed, failed.destination_stopped
                    )
        return MigrationFigures(
            downtime_ms=report.qemu_downtime_ms,
            total_ms=report.qemu_total_time_ms,
            ram_bytes=report.ram_transferred_bytes,
            wall_seconds=report.wall_seconds,
        )

    async def guest_io_operations(self) -> int | None:
        try:
            stats = await self.remote.execute("query-blockstats")
        except QMPError:
            return None
        total = 0
        for entry in stats:
            numbers = entry.get("stats", {})
            total += int(numbers.get("rd_operations", 0)) + int(numbers.get("wr_operations", 0))
        return total

    async def pivot(self) -> PivotFigures:
        answer = await self.agent.request("pivot")
        return PivotFigures(disks=answer["disks"], remote_disks_left=answer["nbd_nodes_left"])

    async def persist(self) -> str:
        if not self.persist_args:
            raise UserError(
                "B's QEMU arguments are unknown (a QEMU the user started): not persisted"
            )
        answer = await self.agent.request("persist", argv=self.persist_args, path=self.persist_path)
        return str(answer["persisted"])

    async def release_source(self) -> None:
        with contextlib.suppress(QMPError, OSError):
            async with AsyncExitStack() as stack:
                client: QMPClient = await stack.enter_async_context(open_qmp(self.source_qmp))
                status = (await client.execute("query-status")).get("status")
                if status == "postmigrate":  # the migrated domain's remains on A
                    await client.execute("quit")

    async def abort_destination(self) -> None:
        with contextlib.suppress(QMPError):
            await self.remote.execute("quit")
