"""`postcopy demo --vm` end to end: a real QEMU guest moved with its disk, then nothing left over.

The demo runs as an operator runs it (`python -m postcopy.cli demo --vm --no-live`) with its own
TMPDIR and --workdir, both fresh directories of this test: every process the demo starts names
one of them on its command line (QEMU's serial log, the Unix sockets, the state directory), so
scanning /proc for those paths finds them while they run and proves they are gone afterwards;
the two directories must be empty at the end.  The interrupted run checks the same after a
SIGINT in the middle of the drain.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postcopy.kit.guestkit.build import GuestBootFiles
from postcopy.kit.vm_demo import VmDemoSummary

RUN_TIMEOUT = 60.0
REPO_ROOT = Path(__file__).resolve().parents[2]
SUMMARY_PATTERNS = {
    "boot": r"guest boot on Host A \(QEMU start to first pass\): (\d+\.\d+) s",
    "ram": r"RAM migration: (\d+) ms, downtime (\d+) ms \(QEMU\)",
    "first_ok": r"switchover to the guest's first OK on Host B: (\d+\.\d+) s",
    "drain": r"drain: (\d+\.\d+) s after switchover, complete \((\d+) guest passes during it",
    "passes": r"guest passes: (\d+) OK on Host A, (\d+) OK on Host B \((\d+) after the drain\), "
    r"(\d+) FAIL",
    "compare": r"B's disk equals A's where the guest never wrote: yes",
    "result": r"result: PASSED",
}


def processes_naming(paths: list[Path]) -> dict[int, str]:
    """{pid: command line} of the live processes that mention one of `paths`."""
    found = {}
    needles = [str(path).encode() for path in paths]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline_file:
                cmdline = cmdline_file.read()
        except OSError:
            continue
        if any(needle in cmdline for needle in needles):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


@pytest.fixture(name="demo_dirs")
def demo_dirs_fixture() -> Iterator[tuple[Path, Path]]:
    """(TMPDIR, --workdir) for one demo run: short paths (Unix sockets live in TMPDIR)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="pcvt-"))
    workdir = Path(tempfile.mkdtemp(prefix="pcvw-"))
    try:
        yield tmpdir, workdir
    finally:
        # Only if a test failed: the demo's children run in their own sessions.
        for pid, cmdline in processes_naming([tmpdir, workdir]).items():
            print(f"killing a leftover process: {cmdline}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmpdir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def start_demo(tmpdir: Path, workdir: Path, output: Path, *extra: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "postcopy.cli", "demo", "--vm", "--no-live",
        "--workdir", str(workdir), *extra,
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    with open(output, "wb") as out:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def wait_watching_processes(
    demo: subprocess.Popen[bytes], dirs: list[Path], timeout: float, until: str | None = None,
    output: Path | None = None,
) -> int:
    """Wait for the demo to exit (or, with `until`, for that text in `output`); return the most
    processes naming `dirs` seen at one time meanwhile."""  # fmt: skip
    most = 0
    deadline = time.monotonic() + timeout
    try:
        while demo.poll() is None:
            most = max(most, len(processes_naming(dirs)))
            if until is not None and output is not None and until in output.read_text():
                return most
            if time.monotonic() > deadline:
                raise AssertionError(f"the demo ran past {timeout} s")
            time.sleep(0.1)
    except BaseException:
        os.killpg(demo.pid, signal.SIGKILL)
        demo.wait(timeout=10)
        raise
    return most


def assert_nothing_left(tmpdir: Path, workdir: Path) -> None:
    deadline = time.monotonic() + 5  # killed children may take a moment to be reaped
    while processes_naming([tmpdir, workdir]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_naming([tmpdir, workdir]) == {}
    assert list(tmpdir.iterdir()) == []
    assert list(workdir.iterdir()) == []


def test_vm_demo_migrates_the_guest_passes_and_leaves_nothing_behind(
    guest_boot_files: GuestBootFiles, demo_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    tmpdir, workdir = demo_dirs
    output = tmp_path / "demo.out"
    began = time.monotonic()
    demo = start_demo(tmpdir, workdir, output)
    most = wait_watching_processes(demo, [tmpdir, workdir], RUN_TIMEOUT)
    elapsed = time.monotonic() - began
    text = output.read_text()
    assert demo.returncode == 0, text
    # QEMU A and B, serve, the relay, receive and its nbdkit ran at the same time.
    assert most >= 6, most
    found = {}
    for name, pattern in SUMMARY_PATTERNS.items():
        match = re.search(pattern, text)
        assert match, f"no {name!r} line in:\n{text}"
        found[name] = match.groups()
    ok_a, ok_b, ok_after, fails = (int(value) for value in found["passes"])
    assert fails == 0 and ok_a >= 2 and ok_after >= 3 and ok_b >= ok_after
    assert float(found["boot"][0]) > 0 and float(found["drain"][0]) > 0
    # The markers were shown as they arrived, on both hosts, none of them FAIL.
    assert re.search(r"Host A guest: pass 1 OK", text)
    assert re.search(r"Host B guest: pass \d+ OK \(drain running\)", text), text
    assert re.search(r"Host B guest: pass \d+ OK \(after the drain\)", text)
    assert not re.search(r"guest: pass \d+ FAIL", text)
    assert_nothing_left(tmpdir, workdir)
    print(f"demo --vm: {elapsed:.1f} s; " + "; ".join(f"{k}={v}" for k, v in found.items()))


def test_vm_demo_interrupted_mid_drain_stops_every_process_and_removes_its_files(
    guest_boot_files: GuestBootFiles, demo_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    tmpdir, workdir = demo_dirs
    output = tmp_path / "demo.out"
    # A 100 Mbit/s link: the drain lasts ~14 s, so the interrupt lands in the middle of it.
    demo = start_demo(tmpdir, workdir, output, "--rate", "100M")
    most = wait_watching_processes(
        demo, [tmpdir, workdir], RUN_TIMEOUT, until="(drain running)", output=output
    )
    assert demo.poll() is None, output.read_text()
    running = len(processes_naming([tmpdir, workdir]))
    assert running >= 6, (most, processes_naming([tmpdir, workdir]))
    demo.send_signal(signal.SIGINT)  # what Ctrl-C sends (the demo's own session: only to it)
    try:
        status = demo.wait(timeout=30)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=10)
    text = output.read_text()
    assert status == 130, text
    assert "interrupted: every process of the demo is stopped, its files removed" in text
    assert "result: PASSED" not in text
    assert_nothing_left(tmpdir, workdir)


def test_vm_demo_fails_and_cleans_up_when_the_guest_dies_mid_drain(
    guest_boot_files: GuestBootFiles, demo_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    tmpdir, workdir = demo_dirs
    output = tmp_path / "demo.out"
    demo = start_demo(tmpdir, workdir, output, "--rate", "100M")
    wait_watching_processes(
        demo, [tmpdir, workdir], RUN_TIMEOUT, until="(drain running)", output=output
    )
    dest_qemu = [
        pid for pid, cmdline in processes_naming([workdir]).items()
        if cmdline.startswith("qemu-system") and "hostB.serial.log" in cmdline
    ]  # fmt: skip
    assert len(dest_qemu) == 1, processes_naming([workdir])
    os.kill(dest_qemu[0], signal.SIGKILL)
    wait_watching_processes(demo, [tmpdir, workdir], RUN_TIMEOUT)
    text = output.read_text()
    assert demo.returncode == 1, text
    assert "problem: the drain did not end: QEMU hostB exited" in text
    assert "drain: - after switchover, NOT complete" in text
    assert "result: FAILED" in text
    assert_nothing_left(tmpdir, workdir)


def test_summary_fails_on_a_fail_marker_or_an_unfinished_drain() -> None:
    good = VmDemoSummary(256 << 20, "direct", drain_completed=True, ok_on_a=2, ok_on_b=5)
    assert good.passed and "result: PASSED" in good.lines()
    failed_pass = VmDemoSummary(
        256 << 20, "direct", drain_completed=True, fail_markers=["Host B pass 9: written-data"]
    )
    assert not failed_pass.passed
    assert "result: FAILED" in failed_pass.lines()
    assert any(line.endswith("1 FAIL") for line in failed_pass.lines())
    unfinished = VmDemoSummary(256 << 20, "direct", drain_completed=False)
    assert not unfinished.passed
    assert any("NOT complete" in line for line in unfinished.lines())


def test_vm_demo_refuses_a_disk_too_small_for_the_guest(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "postcopy.cli", "demo", "--vm", "--size", "64M",
         "--workdir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--size must be a multiple of 1M, at least 128M" in done.stderr
    assert list(tmp_path.iterdir()) == []
