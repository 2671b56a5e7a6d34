"""Host B's side of `postcopy migrate`: `postcopy migrate-receive`, driven over the remote command.

How it works.  A's `postcopy migrate` runs `ssh HOST-B postcopy migrate-receive --domain D
--migration-dir DIR` (like `xl migrate` runs `xl migrate-receive`) and talks to it over the ssh
pipe: one JSON object per line each way, a request `{"op": NAME, ...}` answered by
`{"ok": true, ...}` or `{"ok": false, "error": "one line"}`.  The operations, in the order of a
migration:

    check        version, free space, paths that already exist (nothing is created)
    prepare      create the migration dir and record; start one `postcopy receive
                 --wait-for-source` per disk, detached, each printing its URI into its log
    start_qemu   start B's QEMU from the arguments A sends (detached, `-incoming defer`)
    qmp          one QMP command on B's QEMU (the agent keeps the monitor connection)
    switchover   every receive alive, declare every disk's source frozen, phase `switched`
    status       every disk's status record and whether its receive runs
    ensure       restart the receives that died (same command line; the state dir resumes)
    pivot        switch B's QEMU onto the local files, stop the receives, mark the state
                 dirs pivoted; phase `pivoted`
    persist      write B's persistent arguments of the domain (on the local files)
    cleanup      before switchover only: stop QEMU and the receives, remove every path this
                 migration created (sockets, state dirs, partial files, the record)
    finish       the migration is over: remove the record

Every process it starts runs in its own session with its output in a log file, so it outlives
the agent and the ssh connection.  When the pipe closes (A's migrate died or detached) in phase
`preparing`, the agent cleans up as `cleanup` does (unless `--keep`); in a later phase it leaves
everything running: the domain runs on B and must not be lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import trio

from postcopy.destination.gate import declare_source_frozen
from postcopy.destination.status import read_status
from postcopy.errors import PostcopyError, UserError
from postcopy.fsutil import write_file_atomically
from postcopy.integrations.qmp import QMPClient, QMPCommandError, QMPError, open_qmp
from postcopy.migrate.pivot import lock_holders, pivot_disk_of_state_dir
from postcopy.migrate.processes import process_running, stop_process
from postcopy.migrate.records import INCOMING_RECORD, DiskPlan, load_record, save_record

URI_LINE = re.compile(r"^nbd(\+unix)?://\S+$", re.MULTILINE)
RECEIVE_START_SECONDS = 40.0
QEMU_START_SECONDS = 20.0
LOCK_RETRY_SECONDS = 15.0
RECEIVE_LOG = "receive.log"
ORPHAN_GRACE_SECONDS = 2.5  # > 2 x the engine's sync interval (1 s)
STOP_GRACE_SECONDS = 10.0


def _tail(path: Path, size: int = 600) -> str:
    try:
        text = path.read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line for line in text.splitlines() if line.strip())


class Agent:
    """The B side of one migration; `serve` runs the request loop."""

    def __init__(self, domain: str, migration_dir: Path, keep: bool = False) -> None:
        self.domain = domain
        self.migration_dir = migration_dir
        self.keep = keep
        self.record_path = migration_dir / INCOMING_RECORD
        self.record: dict[str, Any] = {}
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self._nursery: trio.Nursery | None = None
        self._qmp_holder: trio.CancelScope | None = None
        self._qmp: QMPClient | None = None

    # --- the record ------------------------------------------------------------------------

    def _save(self) -> None:
        save_record(self.record_path, self.record)

    def _disks(self) -> list[DiskPlan]:
        return [DiskPlan.from_dict(d) for d in self.record.get("disks", [])]

    @property
    def phase(self) -> str:
        return str(self.record.get("phase", "preparing"))

    def _created(self, path: Path | str) -> None:
        self.record.setdefault("created", []).append(str(path))

    # --- operations ------------------------------------------------------------------------

    async def op_check(self, disks: list[dict[str, Any]], qmp_socket: str) -> dict[str, Any]:
        from postcopy.cli import version

        problems = []
        free: dict[str, int] = {}
        for disk in map(DiskPlan.from_dict, disks):
            for label, path in (
                ("destination file", disk.dest_file),
                ("state directory", disk.state_dir),
                ("socket", disk.socket),
            ):
                if os.path.lexists(path):
                    problems.append(f"{label} {path} exists on B")
            directory = Path(disk.dest_file).parent
            while not directory.exists() and directory != directory.parent:
                directory = directory.parent
            stat = os.statvfs(directory)
            free[disk.device] = stat.f_bavail * stat.f_frsize
        if os.path.lexists(qmp_socket):
            problems.append(f"QMP socket {qmp_socket} exists on B")
        if self.record_path.exists():
            problems.append(
                f"B holds a migration record {self.record_path}: a migration of {self.domain} "
                f"is under way (postcopy migrate --resume {self.domain})"
            )
        return {"version": version(), "problems": problems, "free_bytes": free}

    async def op_prepare(
        self,
        disks: list[dict[str, Any]],
        source_uris: dict[str, str],
        wait_for_receive: bool = True,
    ) -> dict[str, Any]:
        if self.record_path.exists():
            raise UserError(f"{self.record_path} exists: a migration is under way")
        created_dir = not self.migration_dir.exists()
        self.migration_dir.mkdir(parents=True, exist_ok=True)
        self.record = {
            "phase": "preparing",
            "domain": self.domain,
            "disks": disks,
            "created": [],
            "receives": {},
            "qemu": None,
        }
        if created_dir:
            self._created(self.migration_dir)
        self._save()
        pids = {}
        for disk in self._disks():
            argv = self._receive_argv(disk, source_uris[disk.device])
            self.record["receives"][disk.device] = {"argv": argv, "pid": None}
            for path in (disk.state_dir, disk.dest_file, disk.socket):
                self._created(path)
            Path(disk.state_dir).mkdir(parents=True)
            self._save()
            pids[disk.device] = await self._start_receive(disk)
        return {"receive_pids": pids}

    def _receive_argv(self, disk: DiskPlan, source_uri: str) -> list[str]:
        argv = [
            sys.executable, "-m", "postcopy.cli", "receive", "--domain", self.domain,
            "--source", source_uri, "--dest", disk.dest_file, "--state-dir", disk.state_dir,
            "--socket", disk.socket, "--chunk-size", str(disk.chunk_size),
            "--source-id", disk.source_id, "--wait-for-source",
        ]  # fmt: skip
        if disk.bandwidth:
            argv += ["--bandwidth", str(disk.bandwidth)]
        return argv

    async def _start_receive(self, disk: DiskPlan) -> int:
        entry = self.record["receives"][disk.device]
        log = Path(disk.state_dir) / RECEIVE_LOG
        deadline = time.monotonic() + LOCK_RETRY_SECONDS
        while True:
            offset = log.stat().st_size if log.exists() else 0
            with open(log, "ab") as out:
                child = subprocess.Popen(
                    entry["argv"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    start_new_session=True,
                )  # fmt: skip
            self.children[child.pid] = child
            entry["pid"] = child.pid
            self._save()
            started = time.monotonic()
            while True:
                text = log.read_bytes()[offset:].decode(errors="replace")
                if URI_LINE.search(text):
                    return child.pid
                if child.poll() is not None:
                    break
                if time.monotonic() - started > RECEIVE_START_SECONDS:
                    stop_process(child.pid, child)
                    raise UserError(f"receive of {disk.device} did not start: {_tail(log)}")
                await trio.sleep(0.05)
            # A receive killed a moment ago may still hold its lock (nbdkit exits after it).
            if "in use" in text and time.monotonic() < deadline:
                await trio.sleep(0.2)
                continue
            raise UserError(
                f"receive of {disk.device} on B exited {child.returncode}: {_tail(log)}"
            )

    async def op_start_qemu(self, argv: list[str], qmp_socket: str) -> dict[str, Any]:
        log = self.migration_dir / "qemu.log"
        self._created(qmp_socket)
        self._created(log)
        self.record["qemu"] = {"argv": argv, "qmp": qmp_socket, "pid": None}
        self._save()
        with open(log, "ab") as out:
            child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self.children[child.pid] = child
        self.record["qemu"]["pid"] = child.pid
        self._save()
        deadline = time.monotonic() + QEMU_START_SECONDS
        while not os.path.exists(qmp_socket):
            if child.poll() is not None:
                raise UserError(f"B's QEMU exited {child.returncode}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise UserError(f"B's QEMU made no QMP socket in {QEMU_START_SECONDS:g} s")
            await trio.sleep(0.02)
        return {"pid": child.pid}

    async def _client(self) -> QMPClient:
        """The monitor connection to B's QEMU, held open by a task of the agent's nursery (a
        QMP session is a nursery: it cannot be opened in one request and closed in another)."""
        if self._qmp is not None and not self._qmp.is_closed:
            return self._qmp
        if self._qmp_holder is not None:
            self._qmp_holder.cancel()
        qemu = self.record.get("qemu") or {}
        if not qemu.get("qmp"):
            raise UserError("B has no QEMU for this migration")
        pid = int(qemu.get("pid") or 0)
        if pid and not process_running(pid, self.children.get(pid)):
            child = self.children.get(pid)
            code = child.returncode if child is not None else "?"
            raise UserError(f"B's QEMU (pid {pid}) has exited ({code}): "
                            f"{_tail(self.migration_dir / 'qemu.log')}")  # fmt: skip
        assert self._nursery is not None
        self._qmp, self._qmp_holder = await self._nursery.start(self._hold_qmp, qemu["qmp"])
        return self._qmp

    async def _hold_qmp(
        self, path: str, *, task_status: trio.TaskStatus[tuple[QMPClient, trio.CancelScope]]
    ) -> None:
        with trio.CancelScope() as scope:
            async with open_qmp(path) as client:
                task_status.started((client, scope))
                await trio.sleep_forever()

    async def op_qmp(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            client = await self._client()
            return {"return": await client.execute(command, arguments)}
        except QMPCommandError as exc:
            return {"qmp_error": {"class": exc.error_class, "desc": exc.description}}
        except QMPError as exc:
            return {"qmp_closed": str(exc)}

    def _receive_alive(self, device: str) -> bool:
        pid = self.record["receives"][device]["pid"]
        return process_running(pid, self.children.get(pid))

    def _engine_pids(self, disk: DiskPlan) -> list[int]:
        """Live nbdkit processes holding the disk's state directory (the lock file's holders)."""
        return [pid for pid, role in lock_holders(Path(disk.state_dir)) if role == "nbdkit"]

    async def op_switchover(self) -> dict[str, Any]:
        dead = [d.device for d in self._disks() if not self._receive_alive(d.device)]
        if dead:  # before switchover a half-dead receive is a failure: roll back
            raise UserError(f"receive of {', '.join(dead)} on B is not running")
        for disk in self._disks():
            declare_source_frozen(Path(disk.state_dir))
        self.record["phase"] = "switched"
        self.record["switched_at"] = time.time()
        self._save()
        return {}

    async def op_status(self) -> dict[str, Any]:
        disks = {}
        for disk in self._disks():
            try:
                record: dict[str, Any] | None = read_status(Path(disk.state_dir))
                error = None
            except UserError as exc:
                record, error = None, str(exc)
            disks[disk.device] = {
                "record": record,
                "error": error,
                "receive_running": self._receive_alive(disk.device),
                "state_dir": disk.state_dir,
            }
        qemu = self.record.get("qemu") or {}
        pid = int(qemu.get("pid") or 0)
        return {
            "disks": disks,
            "phase": self.phase,
            "qemu_running": process_running(pid, self.children.get(pid)),
        }

    async def op_ensure(self) -> dict[str, Any]:
        """Restart the receive of every disk whose receive died, then let B's QEMU go on.

        A receive killed -9 leaves its nbdkit behind in shutdown: it keeps the domain's
        connection open but answers every request with ESHUTDOWN, and exits only when the client
        goes.  B's QEMU stops the guest on that error (`werror=stop,rerror=stop`, see
        `migrate.qemu`) instead of failing its I/O.  That nbdkit is killed only after
        ORPHAN_GRACE_SECONDS (two of the engine's periodic syncs), so every write it
        acknowledged has its block-map bit durable; then the receive starts again on the same
        state directory, QEMU reconnects (`reconnect-delay`), and `cont` re-runs the stopped
        requests."""
        restarted: list[str] = []
        for disk in self._disks():
            if self._receive_alive(disk.device):
                continue
            engines = self._engine_pids(disk)
            if engines:
                await trio.sleep(ORPHAN_GRACE_SECONDS)
                for engine in engines:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(engine, signal.SIGKILL)
                deadline = time.monotonic() + STOP_GRACE_SECONDS
                while self._engine_pids(disk) and time.monotonic() < deadline:
                    await trio.sleep(0.05)
            await self._start_receive(disk)
            restarted.append(disk.device)
        resumed = False
        if restarted and self.record.get("qemu"):
            answer = await self.op_qmp("query-status")
            if (answer.get("return") or {}).get("status") == "io-error":
                await self.op_qmp("cont")
                resumed = True
        return {
            "restarted": restarted, "guest_resumed": resumed,
            "receive_pids": {d: r["pid"] for d, r in self.record["receives"].items()},
        }  # fmt: skip

    async def op_pivot(self) -> dict[str, Any]:
        from postcopy.integrations.qemu_pivot import read_disks

        client = await self._client()
        qemu_argv = (self.record.get("qemu") or {}).get("argv")
        results: dict[str, dict[str, Any]] = {}
        for disk in self._disks():
            pid = self.record["receives"][disk.device]["pid"]
            results[disk.device] = await pivot_disk_of_state_dir(
                client, Path(disk.state_dir), socket=Path(disk.socket),
                dest=Path(disk.dest_file), command_line=qemu_argv,
                receive=self.children.get(pid),
            )  # fmt: skip
        remaining = [d for d in await read_disks(client) if d.protocol_driver == "nbd"]
        self.record["phase"] = "pivoted"
        self._save()
        return {"disks": results, "nbd_nodes_left": len(remaining)}

    async def op_persist(self, argv: list[str], path: str) -> dict[str, Any]:
        """Write B's persistent arguments of the domain (one argument per line)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(target, "".join(arg + "\n" for arg in argv).encode())
        self.record["persisted"] = str(target)
        self._save()
        return {"persisted": str(target)}

    async def op_cleanup(self, force: bool = False) -> dict[str, Any]:
        if self.phase != "preparing" and not force:
            raise UserError(f"phase {self.phase}: the domain may run on B, nothing is removed")
        return self._cleanup()

    def _cleanup(self) -> dict[str, Any]:
        qemu = self.record.get("qemu") or {}
        stop_process(qemu.get("pid"), self.children.get(qemu.get("pid") or 0))
        for entry in (self.record.get("receives") or {}).values():
            stop_process(entry.get("pid"), self.children.get(entry.get("pid") or 0))
        removed: list[str] = []
        if self.keep:
            return {"removed": removed, "kept": True}
        for path_text in reversed(self.record.get("created", [])):
            path = Path(path_text)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                path.unlink()
            else:
                continue
            removed.append(path_text)
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
        if self.migration_dir.is_dir() and str(self.migration_dir) in self.record.get(
            "created", []
        ):
            shutil.rmtree(self.migration_dir, ignore_errors=True)
        self.record = {}
        return {"removed": removed, "kept": False}

    async def op_finish(self) -> dict[str, Any]:
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
        self.record["phase"] = "done"
        return {}

    async def op_load(self) -> dict[str, Any]:
        self.record = load_record(self.record_path)
        return {
            "phase": self.phase,
            "receive_pids": {d: r["pid"] for d, r in self.record.get("receives", {}).items()},
        }

    # --- the loop --------------------------------------------------------------------------

    async def serve(self, receive: trio.abc.ReceiveStream, reply: Callable[[str], None]) -> None:
        operations: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")
        }
        buffer = b""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                while True:
                    data = await receive.receive_some(65536)
                    if not data:
                        break
                    buffer += data
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        reply(json.dumps(await self._answer(operations, line)))
            finally:
                nursery.cancel_scope.cancel()
                if self.record and self.phase == "preparing":
                    self._cleanup()  # A went away before the switchover: B holds nothing

    async def _answer(self, operations: dict[str, Any], line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            name = request.pop("op")
            operation = operations[name]
        except (ValueError, KeyError, AttributeError, TypeError):
            return {"ok": False, "error": f"bad request {line[:80]!r}"}
        try:
            return {"ok": True, **await operation(**request)}
        except (PostcopyError, OSError) as exc:
            return {"ok": False, "error": str(exc).replace("\n", " ")}
        except Exception as exc:  # a bug must not take B's side down with the domain on it
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}".replace("\n", " ")}


def run_agent(domain: str, migration_dir: Path, keep: bool = False) -> int:
    """Serve requests on stdin/stdout until stdin closes."""
    agent = Agent(domain, migration_dir, keep)
    out = sys.stdout

    def reply(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    async def main() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # A's Ctrl-C is A's to handle
        await agent.serve(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())), reply)

    trio.run(main)
    return 0
