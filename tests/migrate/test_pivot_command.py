"""`postcopy pivot` refuses, in one line and changing nothing, a disk it must not pivot.

Real peers: `postcopy serve` exports an image, `postcopy receive` serves it on B's socket, and a
QEMU with no guest (`-machine none`) answers QMP.  A disk that is not complete is refused before
QEMU is asked anything; a complete disk that QEMU does not use is refused by the pivot library
(no nbd node on that socket).  Either way the receive still runs and the state directory is not
marked pivoted.  (The pivot of a real guest's disk is in test_migrate.py.)
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postcopy.destination.gate import declare_source_frozen
from postcopy.destination.pivoted import is_pivoted
from postcopy.kit.guestkit.scenario import ReceiveProcess, run_postcopy_receive, run_postcopy_serve


@pytest.fixture(name="qmp_only_qemu")
def qmp_only_qemu_fixture(short_socket_dir: Path) -> Iterator[Path]:
    socket = short_socket_dir / "q.qmp"
    process = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{socket},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not socket.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        yield socket
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(name="receive")
def receive_fixture(tmp_path: Path, short_socket_dir: Path) -> Iterator[ReceiveProcess]:
    image = tmp_path / "a.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
        f.write(b"A" * (1 << 20))
    with (
        run_postcopy_serve(image, short_socket_dir / "a.sock", tmp_path) as source,
        run_postcopy_receive(
            source, tmp_path / "b.img", tmp_path / "state", short_socket_dir / "b.sock", tmp_path
        ) as receive,
    ):
        yield receive


def _pivot(state_dir: Path, qmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postcopy.cli", "pivot", "--state-dir", str(state_dir),
         "--qmp", str(qmp)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_pivot_refuses_a_disk_that_is_not_complete(
    receive: ReceiveProcess, qmp_only_qemu: Path
) -> None:
    deadline = time.monotonic() + 20
    while receive.status().get("state") != "waiting-for-source":  # the gate is never opened
        assert time.monotonic() < deadline, receive.status()
        time.sleep(0.05)
    result = _pivot(receive.state_dir, qmp_only_qemu)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "not complete" in result.stderr, result.stderr
    assert not is_pivoted(receive.state_dir)
    assert receive.process.poll() is None


def test_pivot_refuses_a_disk_the_domain_does_not_use(
    receive: ReceiveProcess, qmp_only_qemu: Path
) -> None:
    declare_source_frozen(receive.state_dir)
    deadline = time.monotonic() + 30
    while receive.status().get("state") != "complete":
        assert time.monotonic() < deadline, receive.status()
        time.sleep(0.05)
    result = _pivot(receive.state_dir, qmp_only_qemu)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "no nbd block node" in result.stderr, result.stderr
    assert not is_pivoted(receive.state_dir)
    assert receive.process.poll() is None
