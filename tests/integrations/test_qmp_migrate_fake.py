"""`migrate_qemu_domain`'s decisions against fake QEMUs: the cases real QEMU rarely produces.

Each `FakeQemu` listens on a Unix socket and keeps a small model of QEMU's run state and
migration state, changed by the commands it receives (`cont` makes it run, `quit` stops it,
`migrate` moves the source through a scripted sequence of `query-migrate` answers).  Tests
assert on that model, the state directory and the raised error: what a real operator would see.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from postcopy.destination.gate import is_source_frozen
from postcopy.integrations.qemu_migrate import MigrationConfig, MigrationFailed, migrate_qemu_domain
from postcopy.integrations.qmp import QMPLineParser


class FakeQemu:
    def __init__(self, status: str, migration_script: list[dict[str, Any]] | None = None) -> None:
        self.status = status
        self.migration_script = list(migration_script or [])
        self.migration: dict[str, Any] = {"status": "none"}
        self.status_after_load: str | None = None  # destination: status once the RAM is in
        self.quit = False
        self.migration_started = False

    def answer(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        if command == "query-status":
            if self.status == "inmigrate" and self.status_after_load and self.migration_started:
                self.status = self.status_after_load
            return {"return": {"status": self.status, "running": self.status == "running"}}
        if command == "migrate-incoming":
            self.migration_started = True
            return {"return": {}}
        if command == "migrate":
            self.migration = self.migration_script.pop(0)
            return {"return": {}}
        if command == "query-migrate":
            current = self.migration
            if current.get("status") == "completed":
                self.status = "postmigrate"
            elif current.get("status") == "failed":
                self.status = "running"  # QEMU restarts a source whose migration failed
            if self.migration_script:
                self.migration = self.migration_script.pop(0)
            return {"return": current}
        if command == "migrate_cancel":
            self.migration = {"status": "cancelled"}
            return {"return": {}}
        if command == "cont":
            self.status = "running"
            return {"return": {}}
        if command == "quit":
            self.quit = True
            self.status = "shutdown"
            return {"return": {}}
        if command in ("qmp_capabilities", "migrate-set-parameters"):
            return {"return": {}}
        return {"error": {"class": "CommandNotFound", "desc": command}}

    async def serve(self, path: Path, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(str(path))
        listener.listen(1)
        task_status.started()
        sock, _ = await listener.accept()
        stream = trio.SocketStream(sock)
        parser = QMPLineParser()
        greeting: dict[str, Any] = {"QMP": {"version": {}, "capabilities": []}}
        await stream.send_all(json.dumps(greeting).encode() + b"\n")
        while not self.quit:
            data = await stream.receive_some(65536)
            if not data:
                break
            for request in parser.feed(data):
                reply = self.answer(request["execute"], request.get("arguments", {}))
                reply["id"] = request["id"]
                await stream.send_all(json.dumps(reply).encode() + b"\r\n")
        await stream.aclose()
        listener.close()


@asynccontextmanager
async def fake_pair(
    source: FakeQemu, dest: FakeQemu
) -> AsyncIterator[tuple[Path, Path]]:
    with tempfile.TemporaryDirectory(prefix="pcg-fake-") as directory:
        source_path, dest_path = Path(directory) / "a.qmp", Path(directory) / "b.qmp"
        async with trio.open_nursery() as nursery:
            await nursery.start(source.serve, source_path)
            await nursery.start(dest.serve, dest_path)
            yield source_path, dest_path
            nursery.cancel_scope.cancel()


COMPLETED = {"status": "completed", "total-time": 500, "downtime": 20, "ram": {"transferred": 1}}


async def test_a_destination_that_dies_after_the_ram_resumes_the_source_and_flags_the_state(
    tmp_path: Path,
) -> None:
    source = FakeQemu("running", [{"status": "active"}, COMPLETED])
    dest = FakeQemu("inmigrate")
    dest.status_after_load = "internal-error"
    async with fake_pair(source, dest) as (source_qmp, dest_qmp):
        with trio.fail_after(10), pytest.raises(MigrationFailed) as caught:
            await migrate_qemu_domain(MigrationConfig(source_qmp, dest_qmp, tmp_path))
    assert "internal-error" in caught.value.reason
    assert "discard that state directory" in caught.value.reason
    assert is_source_frozen(tmp_path)  # the gate was opened: hence the warning above
    assert source.status == "running" and caught.value.source_resumed
    assert dest.quit and caught.value.destination_stopped


async def test_shared_storage_destination_that_may_have_run_keeps_the_source_paused() -> None:
    source = FakeQemu("running", [COMPLETED])
    dest = FakeQemu("inmigrate")
    dest.status_after_load = "internal-error"
    async with fake_pair(source, dest) as (source_qmp, dest_qmp):
        with trio.fail_after(10), pytest.raises(MigrationFailed) as caught:
            await migrate_qemu_domain(MigrationConfig(source_qmp, dest_qmp, None))
    assert "source left paused" in caught.value.reason
    assert source.status == "postmigrate" and not caught.value.source_resumed
    assert dest.quit


async def test_a_failed_ram_migration_reports_qemus_reason_and_keeps_the_gate_shut(
    tmp_path: Path,
) -> None:
    source = FakeQemu("running", [{"status": "failed", "error-desc": "Unable to write to socket"}])
    dest = FakeQemu("inmigrate")
    async with fake_pair(source, dest) as (source_qmp, dest_qmp):
        with trio.fail_after(10), pytest.raises(MigrationFailed) as caught:
            await migrate_qemu_domain(MigrationConfig(source_qmp, dest_qmp, tmp_path))
    assert "Unable to write to socket" in caught.value.reason
    assert not is_source_frozen(tmp_path)
    assert source.status == "running" and caught.value.source_resumed
    assert dest.quit


async def test_a_paused_destination_is_resumed_after_the_gate_opens(tmp_path: Path) -> None:
    source = FakeQemu("running", [{"status": "active"}, {"status": "active"}, COMPLETED])
    dest = FakeQemu("inmigrate")
    dest.status_after_load = "paused"  # started with -S
    async with fake_pair(source, dest) as (source_qmp, dest_qmp):
        with trio.fail_after(10):
            report = await migrate_qemu_domain(MigrationConfig(source_qmp, dest_qmp, tmp_path))
    assert report.destination_resumed_by_us
    assert (report.qemu_total_time_ms, report.qemu_downtime_ms) == (500, 20)
    assert is_source_frozen(tmp_path)
    assert dest.status == "running" and source.status == "postmigrate"


def test_cli_says_in_one_line_when_a_qmp_socket_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from postcopy.cli import main

    code = main(
        [
            "qemu-migrate", "--source-qmp", str(tmp_path / "absent-a.qmp"),
            "--dest-qmp", str(tmp_path / "absent-b.qmp"), "--state-dir", str(tmp_path),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "cannot connect to QMP socket" in err
    assert not is_source_frozen(tmp_path)
