"""One destination per state directory: the lock `postcopy receive` takes before it reads anything.

Real processes throughout: `postcopy serve` as the source, a real running `postcopy receive`
(nbdkit + the plugin), and a real second writer on the same state directory (a second `receive` on
the same socket and on another one, and nbdkit started by hand with the plugin).  The second writer
gets one line naming the holder's pid and exit 2, and changes nothing: every file of the state
directory and the destination file are compared byte for byte while the first engine is stopped
(SIGSTOP, so that it cannot change them itself), and afterwards the first engine still reads,
writes and persists.  kill -9 of the holder frees the directory (the kernel drops the lock).
The units check the lock itself and that the state check of `receive` reads only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postcopy.destination.blockmap import (
    GUEST_WRITTEN,
    JOURNAL_FILENAME,
    PRESENT,
    BlockMap,
    MapIdentity,
)
from postcopy.destination.gate import is_source_frozen
from postcopy.destination.receive import PLUGIN_PATH, check_state, plugin_environment
from postcopy.destination.settings import DestinationSettings
from postcopy.destination.statelock import (
    STATE_LOCK_FILENAME,
    StateDirInUse,
    acquire_state_lock,
    adopt_state_lock,
)
from postcopy.errors import StateError
from tests.destination.test_receive import (
    Receiver,
    connect,
    read_range,
    receive_command,
    running_receive,
)
from tests.peers import running_serve, sparse_test_image

MiB = 1024 * 1024
CHUNK = 64 * 1024
SIZE = 32 * MiB
SECOND_WRITER_TIMEOUT = 30.0


def fingerprint(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (and the roots themselves when they are files)."""
    result = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")] if root.is_dir() else [root]):
            if path.is_file() and not path.is_symlink():
                result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif not path.is_dir():
                result[str(path)] = "not a regular file"
    return result


def holders(state_dir: Path) -> list[tuple[int, str]]:
    lines = (state_dir / STATE_LOCK_FILENAME).read_text().splitlines()
    return [(int(line.split(" ", 1)[0]), line.split(" ", 1)[1]) for line in lines]


def run_second_writer(command: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command that must give up at once; one that starts serving instead is killed after
    SECOND_WRITER_TIMEOUT and reported as exit status -1."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    try:
        _, stderr = process.communicate(timeout=SECOND_WRITER_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate(timeout=10)
        return -1, stderr.decode(errors="replace")
    return process.returncode, stderr.decode(errors="replace")


@pytest.fixture
def source_image(tmp_path: Path) -> Path:
    image = tmp_path / "source.img"
    sparse_test_image(image, SIZE, seed=77, data_fraction=1.0)
    return image


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP `pid` and wait until every one of its threads is stopped (kill() returns before
    the signal is delivered, and a thread still running could change the state)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                stat = (task / "stat").read_text()
                states.append(stat[stat.rindex(")") + 2])
        if states and all(state in "tT" for state in states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} not stopped after {timeout} s: {states}")
        time.sleep(0.01)


def wait_lock_free(state_dir: Path, timeout: float = 30.0) -> None:
    """Until nobody holds the state directory's lock (bounded)."""
    deadline = time.monotonic() + timeout
    fd = os.open(state_dir / STATE_LOCK_FILENAME, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return  # closing the descriptor releases it again
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lock of {state_dir} held after {timeout} s") from None
                time.sleep(0.05)
    finally:
        os.close(fd)


@contextlib.contextmanager
def start_live_engine(uri: str, tmp_path: Path) -> Iterator[tuple[Receiver, int]]:
    """A running receive that has stored a guest write (chunk at 3 MiB) and fetched some data;
    yields it and its nbdkit's pid."""
    with running_receive(uri, tmp_path) as receiver:
        handle = connect(receiver.uri)
        handle.pwrite(b"W" * CHUNK, 3 * MiB)
        handle.flush()
        handle.shutdown()
        record = receiver.wait_status(lambda r: r["present_bytes"] > CHUNK)
        yield receiver, int(record["pid"])


SECOND_WRITERS = (
    "receive-same-socket",
    "receive-other-socket",
    "nbdkit-with-the-plugin",
    "receive-other-state-dir",  # the same --dest: the destination file is locked too
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("second", SECOND_WRITERS)
def test_second_writer_on_a_live_state_dir_is_refused_and_changes_nothing(
    tmp_path: Path, source_image: Path, second: str
) -> None:
    with running_serve(f"disk={source_image}", read_delay=0.05) as serve:
        uri = serve.export_uri("disk")
        with start_live_engine(uri, tmp_path) as (receiver, nbdkit_pid):
            state, dest = receiver.state_dir, receiver.dest
            if second == "receive-same-socket":
                command = receive_command(uri, dest, state, "--socket", str(tmp_path / "d.sock"))
                env = None
            elif second == "receive-other-socket":
                command = receive_command(uri, dest, state, "--socket", str(tmp_path / "e.sock"))
                env = None
            elif second == "receive-other-state-dir":
                command = receive_command(
                    uri, dest, tmp_path / "state2", "--socket", str(tmp_path / "e.sock")
                )
                env = None
            else:
                command = [
                    "nbdkit", "-f", "-U", str(tmp_path / "e.sock"), "python", str(PLUGIN_PATH),
                    f"source={uri}", f"dest={dest}", f"state_dir={state}",
                ]  # fmt: skip
                env = plugin_environment()
            stop_process(nbdkit_pid)  # nothing changes the state behind our back
            try:
                before = fingerprint(state, dest)
                code, stderr = run_second_writer(command, env)
                after = fingerprint(state, dest)
            finally:
                os.kill(nbdkit_pid, signal.SIGCONT)
            if second.startswith("receive"):
                assert code == 2, (code, stderr)
                assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
            else:
                assert code != 0, stderr  # nbdkit reports the plugin's one-line error its way
            assert after == before
            if second == "receive-other-state-dir":
                assert f"destination {dest} is in use by another postcopy receive" in stderr
            else:
                assert f"in use by pid {receiver.process.pid} (postcopy receive)" in stderr
                assert f"pid {nbdkit_pid} (nbdkit)" in stderr, stderr
            assert not (tmp_path / "e.sock").exists()
            assert holders(state) == [
                (receiver.process.pid, "postcopy receive"), (nbdkit_pid, "nbdkit"),
            ]  # fmt: skip
            # the first engine goes on reading, writing and persisting
            handle = connect(receiver.uri)
            handle.pwrite(b"V" * CHUNK, 5 * MiB)
            handle.flush()
            assert handle.pread(CHUNK, 3 * MiB) == b"W" * CHUNK
            assert handle.pread(CHUNK, 5 * MiB) == b"V" * CHUNK
            assert handle.pread(MiB, 20 * MiB) == read_range(source_image, 20 * MiB, MiB)
            handle.shutdown()
        assert receiver.process.returncode == 0, receiver.log()
    on_disk = BlockMap.open_read_only(state, MapIdentity(SIZE, CHUNK, SIZE, "", uri))
    for chunk in (3 * MiB // CHUNK, 5 * MiB // CHUNK):
        assert on_disk.bits(chunk) & (PRESENT | GUEST_WRITTEN) == PRESENT | GUEST_WRITTEN
    assert read_range(dest, 3 * MiB, CHUNK) == b"W" * CHUNK
    assert read_range(dest, 5 * MiB, CHUNK) == b"V" * CHUNK


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victims", ["receive", "receive-and-nbdkit"])
def test_kill9_of_the_holder_frees_the_state_dir_for_the_next_receive(
    tmp_path: Path, source_image: Path, victims: str
) -> None:
    with running_serve(f"disk={source_image}") as serve:
        uri = serve.export_uri("disk")
        with start_live_engine(uri, tmp_path) as (receiver, nbdkit_pid):
            os.kill(receiver.process.pid, signal.SIGKILL)
            if victims == "receive-and-nbdkit":
                os.kill(nbdkit_pid, signal.SIGKILL)
            receiver.process.wait(15)
        wait_lock_free(tmp_path / "state")  # nbdkit follows its parent (--exit-with-parent)
        with running_receive(uri, tmp_path) as again:
            assert holders(again.state_dir)[0] == (again.process.pid, "postcopy receive")
            handle = connect(again.uri)
            assert handle.pread(CHUNK, 3 * MiB) == b"W" * CHUNK
            assert handle.pread(MiB, 9 * MiB) == read_range(source_image, 9 * MiB, MiB)
            handle.shutdown()


@pytest.mark.timeout(120)
def test_the_locks_outlive_receive_while_its_nbdkit_still_runs(
    tmp_path: Path, source_image: Path
) -> None:
    """No window without a holder: receive killed, its nbdkit (stopped, so it cannot follow its
    parent yet) still holds the state directory and the destination."""
    with running_serve(f"disk={source_image}") as serve:
        uri = serve.export_uri("disk")
        with start_live_engine(uri, tmp_path) as (receiver, nbdkit_pid):
            stop_process(nbdkit_pid)
            try:
                os.kill(receiver.process.pid, signal.SIGKILL)
                receiver.process.wait(15)
                state, dest = receiver.state_dir, receiver.dest
                code, stderr = run_second_writer(
                    receive_command(uri, dest, state, "--socket", str(tmp_path / "e.sock"))
                )
                assert code == 2 and f"pid {nbdkit_pid} (nbdkit)" in stderr, (code, stderr)
                code, stderr = run_second_writer(
                    receive_command(
                        uri, dest, tmp_path / "state2", "--socket", str(tmp_path / "e.sock")
                    )
                )
                assert code == 2 and f"destination {dest} is in use" in stderr, (code, stderr)
            finally:
                os.kill(nbdkit_pid, signal.SIGCONT)  # it gets its parent-death SIGTERM now
        wait_lock_free(state)
        with running_receive(uri, tmp_path) as again:
            handle = connect(again.uri)
            assert handle.pread(CHUNK, 3 * MiB) == b"W" * CHUNK
            handle.shutdown()


# ----- units -------------------------------------------------------------------------------------


def test_lock_is_exclusive_names_the_holder_and_is_free_again_after_release(
    tmp_path: Path,
) -> None:
    first = acquire_state_lock(tmp_path, "postcopy receive")
    with pytest.raises(StateDirInUse, match=rf"in use by pid {os.getpid()} \(postcopy receive\)"):
        acquire_state_lock(tmp_path, "postcopy receive")
    assert (tmp_path / STATE_LOCK_FILENAME).read_text() == f"{os.getpid()} postcopy receive\n"
    first.release()
    with acquire_state_lock(tmp_path, "nbdkit"):
        assert (tmp_path / STATE_LOCK_FILENAME).read_text() == f"{os.getpid()} nbdkit\n"


def test_child_adopts_the_inherited_lock_and_the_lock_lives_until_both_are_gone(
    tmp_path: Path,
) -> None:
    lock = acquire_state_lock(tmp_path, "postcopy receive")
    child_code = (
        "import sys, time; from pathlib import Path; "
        "from postcopy.destination.statelock import adopt_state_lock; "
        f"adopt_state_lock(Path({str(tmp_path)!r}), {lock.fd}, 'nbdkit'); "
        "print('adopted', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", child_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        pass_fds=(lock.fd,),
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == b"adopted\n"
        lock.release()  # the child still holds it
        with pytest.raises(StateDirInUse, match=f"pid {child.pid} \\(nbdkit\\)"):
            acquire_state_lock(tmp_path, "postcopy receive")
        child.stdin.close()
        assert child.wait(15) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    acquire_state_lock(tmp_path, "postcopy receive").release()


def test_source_frozen_is_not_refused_by_the_lock_of_a_live_engine(tmp_path: Path) -> None:
    """The gate of a running receive must open: `source-frozen` is not a conflicting writer."""
    with acquire_state_lock(tmp_path, "postcopy receive"):
        lock_file = (tmp_path / STATE_LOCK_FILENAME).read_bytes()
        result = subprocess.run(
            [sys.executable, "-m", "postcopy.cli", "source-frozen", "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert is_source_frozen(tmp_path)
        assert (tmp_path / STATE_LOCK_FILENAME).read_bytes() == lock_file


def test_adopting_a_descriptor_that_is_not_the_lock_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / STATE_LOCK_FILENAME).write_bytes(b"")
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(StateError, match="is not"):
            adopt_state_lock(tmp_path, other, "nbdkit")
    finally:
        os.close(other)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_lock_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / STATE_LOCK_FILENAME
    if kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(b"precious")
        path.symlink_to(tmp_path / "elsewhere")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(StateError, match="not a regular file|cannot open"):
        acquire_state_lock(tmp_path, "postcopy receive")
    if kind == "symlink":
        assert (tmp_path / "elsewhere").read_bytes() == b"precious"


def test_state_check_of_receive_reads_only(tmp_path: Path) -> None:
    """A torn journal tail (a crash in the middle of an append) is the engine's to repair, under
    the lock; the check that runs before must leave it, and must create nothing."""
    dest, state = tmp_path / "dest.img", tmp_path / "state"
    state.mkdir()
    with open(dest, "wb") as f:
        f.truncate(4 * MiB)
    config = DestinationSettings(
        source="nbd://source/", dest=dest, state_dir=state, chunk_size=CHUNK
    )
    identity = MapIdentity(4 * MiB, CHUNK, 4 * MiB, "", "nbd://source/")
    check_state(config, 4 * MiB)
    assert list(state.iterdir()) == []  # a fresh state: no journal created by a check
    block_map = BlockMap.open(state, identity)
    block_map.mark(0, 3, PRESENT | GUEST_WRITTEN)
    block_map.make_durable(lambda: None)
    block_map.close()
    journal = state / JOURNAL_FILENAME
    with journal.open("ab") as f:
        f.write(b"\x01" * 10)  # half a record
    before = fingerprint(state)
    check_state(config, 4 * MiB)
    assert fingerprint(state) == before
    again = BlockMap.open_read_only(state, identity)
    assert again.present_count == 3 and again.guest_written_count == 3
