"""Switch a running QEMU disk from the lazy NBD destination to its local file, over QMP.

How it works. A postcopy disk in QEMU is a format node (raw or qcow2, explicit node-name) whose
`file` child is an nbd node connected to `postcopy receive`'s socket (what `postcopy config
--qemu-args` emits). `pivot_disk` finds that pair by what it is, not by a naming convention:

1. Read the block graph: `query-named-block-nodes` (each node's driver, options QEMU reports,
   and `image.filename`, which for an nbd node names its server) and `x-debug-query-block-graph`
   (the parent/child edges; QEMU 7.2's node list has no `children`). The nbd node whose server
   is this disk's socket (or host:port) is the old protocol node; its only parent, through a
   `file` edge, is the format node.
2. Check everything before changing anything (each refusal is a `PivotRefused`, one line):
   exactly one such nbd node; explicit node names (QEMU 7.2 refuses to reopen a node with a
   generated `#blockNNN` name: "Cannot change the option 'node-name'"); a raw or qcow2 format
   node whose only children are `file` (and qcow2's `backing`); the local file exists and has
   the nbd export's size; and the format node's full option set is known.
3. `blockdev-add` a `file` node on the local file (a fresh node name; cache, discard and
   read-only as the format node has them, so the new leaf behaves as the old one did).
4. `blockdev-reopen` the format node with every option it had and `file` set to the new node.
   blockdev-reopen resets every option it is not given (qapi/block-core.json), and QEMU's node
   report lacks some (`discard`, `force-share`, `auto-read-only`, driver options such as raw's
   `offset`), so the option set is the node's `-blockdev` from QEMU's own command line (read
   from /proc through the QMP socket's peer credentials, or given by the caller), with the
   values QEMU reports (read-only, cache, detect-zeroes) taking precedence. QEMU drains the
   node during the reopen: in-flight guest requests complete on NBD, later ones go to the file.
   If the reopen fails, the added node is deleted again, so nothing is left.
5. `blockdev-del` the nbd node (when it was created inline it is already gone): QEMU closes its
   NBD connection, and the receive may stop.

`read_disks` reports each node with its protocol leaf, for the check after a pivot: the format
node now sits on a `file` node and no nbd node remains.

Errors:
    PostcopyError
    └── PivotError              the pivot did not happen or did not finish
        ├── PivotRefused        the disk was not recognised; nothing was changed
        └── PivotRolledBack     QEMU refused a step; what was added was removed again
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postcopy.errors import PostcopyError
from postcopy.integrations.qemu import split_qemu_opts
from postcopy.integrations.qmp import QMPClient, QMPCommandError
from postcopy.policy import NbdEndpoint

__all__ = [
    "BlockNode",
    "PivotError",
    "PivotRefused",
    "PivotResult",
    "PivotRolledBack",
    "blockdev_options_from_args",
    "find_pivot_plan",
    "pivot_disk",
    "read_block_graph",
    "read_disks",
]

FORMAT_DRIVERS = ("raw", "qcow2")
# Children a format node may have besides `file` (qcow2's backing chain stays as it is).
_ALLOWED_CHILDREN = {"raw": {"file"}, "qcow2": {"file", "backing"}}
# Types of the -blockdev key=value options the pivot carries over (QMP wants typed JSON).
_BOOL_KEYS = {
    "read-only", "auto-read-only", "force-share", "cache.direct", "cache.no-flush",
    "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot", "pass-discard-other",
}  # fmt: skip
_INT_KEYS = {
    "offset", "size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
    "cache-clean-interval", "cache-size", "server.port",
}  # fmt: skip
_TRUE = ("on", "true", "yes", "")
_FALSE = ("off", "false", "no")


class PivotError(PostcopyError):
    """The pivot of a QEMU disk did not happen or did not finish."""


class PivotRefused(PivotError):
    """The disk is not one the pivot recognises or can switch; QEMU was not changed."""


class PivotRolledBack(PivotError):
    """QEMU refused a step of the pivot; the node added for it was removed again."""


@dataclass(frozen=True)
class BlockNode:
    """One node of QEMU's block graph, as QEMU reports it."""

    name: str
    driver: str
    filename: str
    virtual_size: int
    read_only: bool
    cache_direct: bool
    cache_no_flush: bool
    detect_zeroes: str
    children: dict[str, str] = field(default_factory=dict)  # edge name -> child node name
    parents: tuple[tuple[str, str], ...] = ()  # (parent node name, edge name)

    @property
    def generated_name(self) -> bool:
        """QEMU names the nodes it creates for `-drive` (and inline children) `#blockNNN`."""
        return self.name.startswith("#")


@dataclass(frozen=True)
class PivotPlan:
    """What `pivot_disk` will do: checked against QEMU, nothing changed yet."""

    format_node: BlockNode
    nbd_node: BlockNode
    file_node_name: str
    file_options: dict[str, Any]
    reopen_options: dict[str, Any]
    devices: tuple[str, ...]  # qdev ids or BlockBackend names attached to the format node


@dataclass(frozen=True)
class PivotResult:
    format_node: str
    old_nbd_node: str
    file_node: str
    local_file: Path
    devices: tuple[str, ...]
    reopen_seconds: float  # the blockdev-reopen round trip: QEMU drains the node and switches


@dataclass(frozen=True)
class DiskState:
    """A root node QEMU uses (a device's disk, or a node with no parent) and its protocol leaf."""

    node: str
    device: str | None
    format: str
    protocol_node: str
    protocol_driver: str
    filename: str


# --- reading QEMU's state ---------------------------------------------------------------------


async def read_block_graph(client: QMPClient) -> dict[str, BlockNode]:
    """Every named node, with its children and parents."""
    reported = await client.execute("query-named-block-nodes", {"flat": True})
    graph = await client.execute("x-debug-query-block-graph")
    names_by_id = {
        item["id"]: item["name"] for item in graph["nodes"] if item.get("type") == "block-driver"
    }
    children: dict[str, dict[str, str]] = {}
    parents: dict[str, list[tuple[str, str]]] = {}
    for edge in graph["edges"]:
        parent = names_by_id.get(edge["parent"])
        child = names_by_id.get(edge["child"])
        if child is None:
            continue
        if parent is None:  # a BlockBackend or a job holds this node
            parents.setdefault(child, []).append(("", edge["name"]))
            continue
        children.setdefault(parent, {})[edge["name"]] = child
        parents.setdefault(child, []).append((parent, edge["name"]))
    nodes: dict[str, BlockNode] = {}
    for info in reported:
        name = info["node-name"]
        image = info.get("image", {})
        cache = info.get("cache", {})
        nodes[name] = BlockNode(
            name=name,
            driver=info["drv"],
            filename=str(image.get("filename", info.get("file", ""))),
            virtual_size=int(image.get("virtual-size", 0)),
            read_only=bool(info.get("ro", False)),
            cache_direct=bool(cache.get("direct", False)),
            cache_no_flush=bool(cache.get("no-flush", False)),
            detect_zeroes=str(info.get("detect_zeroes", "off")),
            children=children.get(name, {}),
            parents=tuple(parents.get(name, ())),
        )
    return nodes


def nbd_server_of(node: BlockNode) -> NbdEndpoint | None:
    """The server an nbd node connects to, from the filename QEMU reports for it."""
    text = node.filename
    if text.startswith("json:"):
        try:
            options = json.loads(text[len("json:") :])
        except ValueError:
            return None
        server = options.get("server", {})
        export = str(options.get("export", ""))
        if server.get("type") == "unix":
            return NbdEndpoint(export, socket=Path(server["path"]))
        if server.get("type") == "inet":
            return NbdEndpoint(export, host=server["host"], port=int(server.get("port", 10809)))
        return None
    url = urllib.parse.urlsplit(text)
    export = urllib.parse.unquote(url.path.lstrip("/"))
    if url.scheme == "nbd+unix":
        sockets = urllib.parse.parse_qs(url.query).get("socket")
        return NbdEndpoint(export, socket=Path(sockets[0])) if sockets else None
    if url.scheme in ("nbd", "nbd+tcp") and url.hostname:
        return NbdEndpoint(export, host=url.hostname, port=url.port or 10809)
    return None


def _same_server(found: NbdEndpoint, wanted: NbdEndpoint) -> bool:
    if wanted.export and found.export != wanted.export:
        return False
    if wanted.socket is not None:
        return found.socket is not None and os.path.realpath(found.socket) == os.path.realpath(
            wanted.socket
        )
    return found.socket is None and (found.host, found.port) == (wanted.host, wanted.port)


async def _devices_of(client: QMPClient, node: str) -> tuple[str, ...]:
    devices = []
    for block in await client.execute("query-block"):
        inserted = block.get("inserted")
        if inserted and inserted.get("node-name") == node:
            devices.append(str(block.get("qdev") or block.get("device") or ""))
    return tuple(devices)


async def read_disks(client: QMPClient) -> list[DiskState]:
    """Each root node (a device's disk or a node nothing uses) with the protocol node it ends on."""
    nodes = await read_block_graph(client)
    attached = {}
    for block in await client.execute("query-block"):
        inserted = block.get("inserted")
        if inserted:
            attached[inserted["node-name"]] = str(block.get("qdev") or block.get("device") or "")
    states = []
    for node in nodes.values():
        if any(parent for parent, _ in node.parents):
            continue  # not a root
        leaf = node
        for _ in range(len(nodes)):  # follow `file` down to the protocol node
            child = leaf.children.get("file")
            if child is None or child not in nodes:
                break
            leaf = nodes[child]
        states.append(
            DiskState(
                node=node.name,
                device=attached.get(node.name),
                format=node.driver,
                protocol_node=leaf.name,
                protocol_driver=leaf.driver,
                filename=leaf.filename,
            )
        )
    return states


# --- the node's options, from QEMU's command line ---------------------------------------------


def _typed(key: str, value: str) -> Any:
    if key in _BOOL_KEYS:
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    if key in _INT_KEYS and value.isdigit():
        return int(value)
    if key == "backing" and value in ("", "null"):
        return None
    return value


def _nest(flat: Sequence[tuple[str, str]]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in flat:
        *path, last = key.split(".")
        target = options
        for part in path:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"option {key} conflicts with an earlier one")
        target[last] = _typed(key, value)
    return options


def blockdev_options_from_args(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The options of every `-blockdev` in a QEMU command line, by node name (QMP typed)."""
    found: dict[str, dict[str, Any]] = {}
    for option, value in zip(argv, argv[1:], strict=False):
        if "-" + option.lstrip("-") != "-blockdev":
            continue
        try:
            options = json.loads(value) if value.lstrip().startswith("{") else None
            if options is None:
                options = _nest(split_qemu_opts(value))
        except ValueError:
            continue
        if isinstance(options, dict) and isinstance(options.get("node-name"), str):
            found[options["node-name"]] = options
    return found


def qmp_peer_command_line(client: QMPClient) -> list[str] | None:
    """QEMU's argv, through the QMP Unix socket's peer credentials and /proc; None if unknown."""
    pid = client.peer_pid()
    if pid is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="surrogateescape") for arg in raw.split(b"\0")[:-1]]


# --- the pivot --------------------------------------------------------------------------------


def _unique_name(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    for number in range(2, 1000):
        candidate = f"{base}-{number}"
        if candidate not in taken:
            return candidate
    raise PivotRefused(f"no free node name like {base!r}")


async def find_pivot_plan(
    client: QMPClient,
    endpoint: NbdEndpoint,
    local_file: Path,
    *,
    command_line: Sequence[str] | None = None,
    aio: str | None = None,
) -> PivotPlan:
    """Find the disk served on `endpoint` and check that it can be pivoted; change nothing."""
    local_file = Path(os.path.abspath(local_file))  # QEMU's working directory is not ours
    where = endpoint.uri()
    nodes = await read_block_graph(client)
    matches = []
    for node in nodes.values():
        server = nbd_server_of(node) if node.driver == "nbd" else None
        if server is not None and _same_server(server, endpoint):
            matches.append(node)
    if not matches:
        raise PivotRefused(f"QEMU has no nbd block node connected to {where}")
    if len(matches) > 1:
        names = ", ".join(sorted(m.name for m in matches))
        raise PivotRefused(f"QEMU has {len(matches)} nbd nodes on {where} ({names}); expected one")
    nbd = matches[0]
    if len(nbd.parents) != 1 or nbd.parents[0][1] != "file" or not nbd.parents[0][0]:
        users = ", ".join(f"{p or 'a device or job'} ({e})" for p, e in nbd.parents) or "nothing"
        raise PivotRefused(
            f"nbd node {nbd.name} on {where} is used by {users}; expected one format node's file"
        )
    fmt = nodes[nbd.parents[0][0]]
    if fmt.generated_name or nbd.generated_name:
        raise PivotRefused(
            f"the disk on {where} has QEMU-generated node names ({fmt.name}, {nbd.name}), as "
            "-drive makes, which QEMU cannot reopen: start QEMU with the -blockdev arguments "
            "of `postcopy config --qemu-args`"
        )
    if fmt.driver not in FORMAT_DRIVERS:
        raise PivotRefused(
            f"node {fmt.name} above {nbd.name} is a {fmt.driver} node; the pivot handles raw "
            "and qcow2"
        )
    extra = set(fmt.children) - _ALLOWED_CHILDREN[fmt.driver]
    if extra:
        raise PivotRefused(
            f"node {fmt.name} has children the pivot does not carry over: "
            f"{', '.join(sorted(extra))}"
        )
    if not local_file.is_file():
        raise PivotRefused(f"local file {local_file} does not exist")
    size = local_file.stat().st_size
    if size != nbd.virtual_size:
        raise PivotRefused(
            f"local file {local_file} has {size} bytes, the NBD disk {nbd.virtual_size}"
        )
    if command_line is None:
        command_line = qmp_peer_command_line(client)
    if command_line is None:
        raise PivotRefused(
            f"cannot read QEMU's command line for the options of node {fmt.name} (QMP is not "
            "a local Unix socket); pass it"
        )
    given = blockdev_options_from_args(command_line).get(fmt.name)
    if given is None:
        raise PivotRefused(
            f"node {fmt.name} is not a -blockdev of QEMU's command line, so its options "
            "(blockdev-reopen resets the ones it is not given) are unknown"
        )
    devices = await _devices_of(client, fmt.name)

    file_name = _unique_name(f"{fmt.name}-local", set(nodes))
    cache = {"direct": fmt.cache_direct, "no-flush": fmt.cache_no_flush}
    file_options: dict[str, Any] = {
        "driver": "file",
        "node-name": file_name,
        "filename": str(local_file),
        "read-only": fmt.read_only,
        "cache": cache,
        "discard": given.get("discard", "ignore"),
    }
    if aio is not None:
        file_options["aio"] = aio
    reopen = {key: value for key, value in given.items() if key != "file"}
    reopen.update(
        {
            "node-name": fmt.name,
            "driver": fmt.driver,
            "read-only": fmt.read_only,
            "cache": cache,
            "detect-zeroes": fmt.detect_zeroes,
            "file": file_name,
        }
    )
    if fmt.driver == "qcow2":
        # blockdev-reopen wants `backing` always: the current child (kept as is) or null.
        reopen["backing"] = fmt.children.get("backing")
    return PivotPlan(fmt, nbd, file_name, file_options, reopen, devices)


async def pivot_disk(
    client: QMPClient,
    endpoint: NbdEndpoint,
    local_file: Path,
    *,
    command_line: Sequence[str] | None = None,
    aio: str | None = None,
) -> PivotResult:
    """Switch the disk QEMU reads from `endpoint` onto `local_file` (see the module docstring)."""
    plan = await find_pivot_plan(client, endpoint, local_file, command_line=command_line, aio=aio)
    local_file = Path(plan.file_options["filename"])
    try:
        await client.execute("blockdev-add", plan.file_options)
    except QMPCommandError as exc:
        raise PivotRefused(f"QEMU cannot open {local_file}: {exc.description}") from None
    started = time.monotonic()
    try:
        await client.execute("blockdev-reopen", {"options": [plan.reopen_options]})
        reopen_seconds = time.monotonic() - started
    except QMPCommandError as exc:
        try:
            await client.execute("blockdev-del", {"node-name": plan.file_node_name})
        except QMPCommandError as cleanup:
            raise PivotError(
                f"QEMU refused to reopen {plan.format_node.name} ({exc.description}) and to "
                f"remove the added node {plan.file_node_name} ({cleanup.description})"
            ) from None
        raise PivotRolledBack(
            f"QEMU refused to reopen {plan.format_node.name} on {local_file}: {exc.description}"
        ) from None
    remaining = {node["node-name"] for node in await client.execute("query-named-block-nodes")}
    if plan.nbd_node.name in remaining:
        try:
            await client.execute("blockdev-del", {"node-name": plan.nbd_node.name})
        except QMPCommandError as exc:
            raise PivotError(
                f"{plan.format_node.name} now runs on {local_file}, but QEMU kept nbd node "
                f"{plan.nbd_node.name}: {exc.description}"
            ) from None
    return PivotResult(
        plan.format_node.name,
        plan.nbd_node.name,
        plan.file_node_name,
        local_file,
        plan.devices,
        reopen_seconds,
    )
