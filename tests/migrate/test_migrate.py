"""`postcopy migrate` end to end: the real guest moved between two network namespaces.

Real peers all the way: the TCG test guest with its self-checking workload runs in Host A's
namespace; `postcopy migrate --json` runs there too, serves the disk over TCP through the shaped
veth, and reaches Host B through an ssh-like wrapper that runs B's side in B's namespace.  The
tests assert what both hosts hold afterwards: processes (by command line), sockets, state
directories, files, and the guest's markers (OK/FAIL) on A and on B.

- one command moves the guest; B ends on its local file (no nbd node), nothing of postcopy
  runs on either host, the guest passes on B after the pivot, B's file equals A's image outside
  the guest's own slots, and B's persisted arguments boot the guest again;
- a failure injected at each step before the switchover (serve killed, receive killed, B's
  QEMU killed, Ctrl-C; B unreachable) leaves the guest running and passing on A and B empty;
- after the switchover, Ctrl-C detaches, receive is killed -9 on B, and `--resume` restarts
  it, drains, pivots and releases: the guest never says FAIL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.guestkit.qemu import QemuGuest
from postcopy.kit.guestkit.scenario import same_bytes
from tests.migrate.lab import Domain, Lab, open_lab, qmp

PASS_TIMEOUT = 60.0


@pytest.fixture(scope="module", name="lab")
def lab_fixture(
    guest_boot_files: GuestBootFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    with open_lab(guest_boot_files, tmp_path_factory.mktemp("migrate")) as lab:
        yield lab


def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state == "Z":
            return
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def _assert_b_holds_nothing(lab: Lab, domain: Domain, guest_a: QemuGuest) -> None:
    assert not domain.migration_dir_b.exists(), sorted(domain.migration_dir_b.rglob("*"))
    assert not domain.dest_b.exists()
    assert not domain.socket_b.exists()
    assert not domain.qmp_b.exists()
    assert not (domain.record_dir_a / f"{domain.name}.json").exists()
    running = lab.processes_of(domain.name)
    assert [p for p in running if not p.startswith(f"{guest_a.process.pid}:")] == []


def _nodes(socket: Path) -> list[tuple[str, str, str]]:
    nodes = qmp(socket, "query-named-block-nodes", {"flat": True})
    return [(n["node-name"], n["drv"], n.get("image", {}).get("filename", "")) for n in nodes]


def _same_outside_work_region(lab: Lab, domain: Domain) -> bool:
    start, length = lab.layout.work_kib[0] * 1024, lab.layout.work_kib[1] * 1024
    size = lab.layout.disk_size
    return same_bytes(domain.image_a, domain.dest_b, 0, start) and same_bytes(
        domain.image_a, domain.dest_b, start + length, size - start - length
    )


def test_one_command_migrates_the_guest_onto_b_local_disk(lab: Lab) -> None:
    domain = lab.domain("web")
    pki_a, pki_b = lab.pki()
    with lab.guest_on_a(domain) as guest_a:
        guest_a.wait_for_marker(PASS_TIMEOUT, ok=True, min_pass=2)
        migration = lab.start_migration(
            domain, "--tls-pki", str(pki_a), "--remote-tls-pki", str(pki_b)
        )
        code = migration.finish()
        released = time.monotonic()
        assert code == 0, f"{migration.events}\n{migration.stderr()}\n{lab.logs_of_b(domain)}"
        # The disk crossed the link over TLS with client certificates: no plaintext warning.
        assert migration.wait_event("preflight", "done")["tls"] is True
        assert migration.wait_event("serve", "done")["uri"].startswith("nbds://")
        assert not migration.named("warning") or all(
            "PLAINTEXT" not in w.get("message", "") for w in migration.named("warning")
        )
        summary = migration.wait_event("summary", "done")
        print(f"\nsummary: {summary['message']}")
        assert summary["disk_bytes"] == lab.layout.disk_size
        assert 0 < summary["moved_data_bytes"] < lab.layout.disk_size  # holes are not moved
        assert summary["downtime_ms"] is not None and summary["drain_seconds"] is not None
        assert summary["verification"] == "match", migration.wait_event("verify", "done")
        assert migration.wait_event("pivot", "done")["remote_disks_left"] == 0
        guest_a.process.wait(timeout=15)  # the domain's remains on A are stopped
        assert guest_a.failures() == []

        pid_b = migration.wait_event("destination", "done")["pid"]
        guest_b = lab.guest_on_b(domain, pid_b)
        try:
            # B's QEMU: the disk on the local file, no nbd node left.
            nodes = _nodes(domain.qmp_b)
            assert not [n for n in nodes if n[1] == "nbd"], nodes
            assert ("file", str(domain.dest_b)) in [(n[1], n[2]) for n in nodes], nodes
            inserted = [b["inserted"] for b in qmp(domain.qmp_b, "query-block") if "inserted" in b]
            assert [i["file"] for i in inserted] == [str(domain.dest_b)]
            # Nothing of postcopy runs on either host; the receive's socket is gone.
            assert [p for p in lab.processes_of(domain.name) if not p.startswith(f"{pid_b}:")] == []
            assert not domain.socket_b.exists()
            # The workload passes on B after the pivot.
            after = guest_b.wait_for_passes(3, PASS_TIMEOUT, after=released)
            assert all(m.ok for m in after) and guest_b.failures() == [], guest_b.console_tail()
            # B's file: A's image, plus what the guest wrote into its own slots.
            assert _same_outside_work_region(lab, domain)
            qmp(domain.qmp_b, "quit")
            _wait_gone(pid_b)
        finally:
            if Path(f"/proc/{pid_b}").exists():
                os.kill(pid_b, signal.SIGKILL)
    # The state directory is pivoted: a receive refuses to serve that file again.
    refused = subprocess.run(
        [sys.executable, "-m", "postcopy.cli", "receive", "--source", "nbd://127.0.0.1:9/x",
         "--dest", str(domain.dest_b), "--state-dir", str(domain.state_dir_b),
         "--socket", str(domain.socket_b)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and "pivoted" in refused.stderr, refused.stderr
    assert not domain.socket_b.exists()
    # B's persisted arguments boot the guest again from the local file, its data intact.
    persisted = Path(summary["persisted"])
    args = persisted.read_text().splitlines()
    assert "-incoming" not in args and not any("nbd" in a for a in args), args
    domain.serial_b.rename(domain.serial_b.with_suffix(".first"))
    with open(persisted.with_suffix(".stderr"), "wb") as err:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                   start_new_session=True)  # fmt: skip
    try:
        rebooted = lab.guest_on_b(domain, process.pid)
        rebooted.wait_for_marker(PASS_TIMEOUT, ok=None, min_pass=2)
        assert rebooted.failures() == [], rebooted.console_tail()
        assert [n[2] for n in _nodes(domain.qmp_b) if n[1] == "file"] == [str(domain.dest_b)]
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module", name="faults_domain")
def faults_domain_fixture(lab: Lab) -> Iterator[tuple[Domain, QemuGuest]]:
    """One guest on A that every failure before the switchover must leave running."""
    domain = lab.domain("faulty")
    with lab.guest_on_a(domain) as guest_a:
        guest_a.wait_for_marker(PASS_TIMEOUT, ok=True, min_pass=1)
        yield domain, guest_a


def _kill_pid_of(event: dict[str, object]) -> None:
    pids = event["pids"] if "pids" in event else {"one": event["pid"]}
    assert isinstance(pids, dict)
    for pid in pids.values():
        os.kill(int(pid), signal.SIGKILL)


@pytest.mark.parametrize(
    ("step", "state", "fault"),
    [
        ("serve", "done", "kill serve"),
        ("receive", "done", "kill receive"),
        ("destination", "done", "kill B's QEMU"),
        ("migrate", "start", "Ctrl-C"),
    ],
)
def test_failure_before_switchover_leaves_guest_on_a_and_b_empty(
    lab: Lab, faults_domain: tuple[Domain, QemuGuest], step: str, state: str, fault: str
) -> None:
    domain, guest_a = faults_domain
    migration = lab.start_migration(domain)
    event = migration.wait_event(step, state)
    if fault == "Ctrl-C":
        migration.process.send_signal(signal.SIGINT)
    else:
        _kill_pid_of(event)
    code = migration.finish()
    injected = time.monotonic()
    assert code == 1, f"{migration.events}\n{migration.stderr()}"
    assert migration.named("rollback") and not migration.named("switchover"), migration.events
    assert any("PLAINTEXT" in w.get("message", "") for w in migration.named("warning"))
    # The guest runs on A as before, and keeps passing.
    assert qmp(domain.qmp_a, "query-status")["status"] == "running"
    guest_a.wait_for_passes(2, PASS_TIMEOUT, after=injected)
    assert guest_a.failures() == [], guest_a.console_tail()
    _assert_b_holds_nothing(lab, domain, guest_a)


def test_unreachable_b_changes_nothing(lab: Lab, faults_domain: tuple[Domain, QemuGuest]) -> None:
    domain, guest_a = faults_domain
    argv = lab.migrate_command(domain, "--ssh", "false", "--qmp", str(domain.qmp_a),
                               domain.name, lab.hosts.host_b.address)  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "failed" in result.stderr
    assert qmp(domain.qmp_a, "query-status")["status"] == "running"
    _assert_b_holds_nothing(lab, domain, guest_a)


def test_a_corrupted_chunk_on_b_fails_verification_and_keeps_a(
    lab: Lab, faults_domain: tuple[Domain, QemuGuest]
) -> None:
    """The negative control: a chunk of B's file corrupted once the drain is done (in a region
    the guest never touches) makes verification fail with its offset, and A is kept: serve
    runs, A's paused QEMU and the record stay, B is not pivoted.  (Last user of the guest.)"""
    domain, guest_a = faults_domain
    offset = lab.layout.disk_size - 4 * 1024 * 1024  # a hole on A the workload never reads
    migration = lab.start_migration(domain)
    migration.wait_event("drain", "done")
    with open(domain.dest_b, "r+b") as dest:
        os.pwrite(dest.fileno(), b"corrupted on purpose", offset)
    code = migration.finish()
    assert code == 4, f"{migration.events}\n{migration.stderr()}"
    failed = migration.wait_event("verify", "failed")
    assert failed["mismatches"] == {"vda": [offset]}, failed
    assert f"{offset:#x}" in failed["message"]
    assert not migration.named("pivot") and not migration.named("release")
    serve_pid = migration.wait_event("serve", "done")["pid"]
    assert Path(f"/proc/{serve_pid}").exists()  # A is kept
    assert guest_a.process.poll() is None
    assert qmp(domain.qmp_a, "query-status")["status"] == "postmigrate"
    assert (domain.record_dir_a / f"{domain.name}.json").exists()
    assert [n for n in _nodes(domain.qmp_b) if n[1] == "nbd"]  # B still reads through NBD


def test_receive_killed_after_switchover_is_restarted_and_resume_finishes(lab: Lab) -> None:
    """kill -9 of receive on B while migrate watches: migrate restarts it (B's QEMU held the
    guest's I/O meanwhile); Ctrl-C detaches; kill -9 of receive again; `--resume` restarts it
    from its state directory, drains, pivots and releases.  The guest never FAILs."""
    domain = lab.domain("resumed", bandwidth="4M")  # a drain of ~8 s: time to break it
    with lab.guest_on_a(domain) as guest_a:
        guest_a.wait_for_marker(PASS_TIMEOUT, ok=True, min_pass=1)
        migration = lab.start_migration(domain)
        migration.wait_event("migrate", "done")
        pid_b = migration.wait_event("destination", "done")["pid"]
        guest_b = lab.guest_on_b(domain, pid_b)
        try:
            (receive_pid,) = migration.wait_event("receive", "done")["pids"].values()
            guest_b.wait_for_marker(PASS_TIMEOUT, ok=None)
            os.kill(receive_pid, signal.SIGKILL)
            assert migration.wait_event("receive", "restart")["disks"] == ["vda"]
            restarted = migration.wait_for(
                lambda e: e.get("event") == "receive" and bool(e.get("restarted")), what="restart"
            )
            (second_pid,) = restarted["pids"].values()
            assert second_pid != receive_pid
            migration.process.send_signal(signal.SIGINT)  # detach: the drain goes on
            assert migration.finish() == 3, migration.stderr()
            detach = migration.wait_event("detach", "done")
            assert f"--resume {domain.name}" in detach["message"]
            assert qmp(domain.qmp_b, "query-status")["status"] == "running"
            os.kill(second_pid, signal.SIGKILL)  # nobody watches B now
            _wait_gone(second_pid)
            resumed = lab.resume(domain)
            code = resumed.finish(timeout=180)
            finished = time.monotonic()
            assert code == 0, f"{resumed.events}\n{resumed.stderr()}"
            assert resumed.wait_event("receive", "restart")["disks"] == ["vda"]
            resumed.wait_event("drain", "done")
            assert resumed.wait_event("pivot", "done")["remote_disks_left"] == 0
            assert not [n for n in _nodes(domain.qmp_b) if n[1] == "nbd"]
            guest_b.wait_for_passes(2, PASS_TIMEOUT, after=finished)
            assert guest_b.failures() == [] and guest_a.failures() == [], guest_b.console_tail()
            assert [p for p in lab.processes_of(domain.name) if not p.startswith(f"{pid_b}:")] == []
            assert not domain.socket_b.exists()
            assert _same_outside_work_region(lab, domain)
        finally:
            if Path(f"/proc/{pid_b}").exists():
                os.kill(pid_b, signal.SIGKILL)
