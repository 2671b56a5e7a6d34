"""Corrupt, truncated and wrong-typed state directories: `postcopy receive` (run in-process against
a real `postcopy serve`) refuses each with one line on stderr and exit 2 before nbdkit starts,
and neither the destination file nor any state file changes.  A garbage status record does not
stop the engine (it is a live view, rewritten), and `fetch-progress` reports it in one line."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postcopy.destination.blockmap import (
    JOURNAL_FILENAME,
    PRESENT,
    SNAPSHOT_FILENAME,
    BlockMap,
    MapIdentity,
)
from postcopy.destination.engine import Engine, EngineConfig
from postcopy.destination.statelock import STATE_LOCK_FILENAME
from postcopy.destination.status import read_status
from tests.fakes import FakeSource
from tests.peers import RunningServe, run_cli, running_serve, sparse_test_image

MiB = 1024 * 1024
CHUNK = 64 * 1024
SIZE = 8 * MiB


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServe, str]]:
    image = tmp_path_factory.mktemp("hostile") / "source.img"
    sparse_test_image(image, SIZE, seed=51, data_fraction=1.0)
    with running_serve(f"disk={image}") as serve:
        yield serve, serve.export_uri("disk")


def make_state(workdir: Path, uri: str, *, snapshot: bool) -> tuple[Path, Path]:
    """A destination with real data and a real state (snapshot and/or journal records)."""
    dest, state = workdir / "dest.img", workdir / "state"
    state.mkdir()
    dest.write_bytes(os.urandom(SIZE))
    block_map = BlockMap.open(state, MapIdentity(SIZE, CHUNK, SIZE, "", uri))
    block_map.mark(0, 40, PRESENT)
    block_map.make_durable(lambda: None, compact=snapshot)
    block_map.mark(40, 50, PRESENT)
    block_map.make_durable(lambda: None)
    block_map.close()
    return dest, state


def fingerprint(*paths: Path) -> dict[str, str]:
    """Every file's digest, except the state-directory lock file (receive takes the lock, and
    records its pid there, before it reads the state it then refuses)."""
    result = {}
    for root in paths:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.name == STATE_LOCK_FILENAME:
                continue
            if path.is_file() and not path.is_symlink():
                result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                result[str(path)] = "not a file"
    return result


def truncate_snapshot(state: Path) -> None:
    path = state / SNAPSHOT_FILENAME
    path.write_bytes(path.read_bytes()[: 30])


def garbage_journal(state: Path) -> None:
    (state / JOURNAL_FILENAME).write_bytes(os.urandom(300))


def wrong_magic(state: Path) -> None:
    path = state / SNAPSHOT_FILENAME
    path.write_bytes(b"NOTAMAP!" + path.read_bytes()[8:])


def corrupt_journal_record(state: Path) -> None:
    path = state / JOURNAL_FILENAME
    data = bytearray(path.read_bytes())
    data.extend(data[-24:])  # two records; the first one of them gets a bad byte
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))


def snapshot_is_a_directory(state: Path) -> None:
    (state / SNAPSHOT_FILENAME).unlink()
    (state / SNAPSHOT_FILENAME).mkdir()


def journal_is_a_fifo(state: Path) -> None:
    (state / JOURNAL_FILENAME).unlink()
    os.mkfifo(state / JOURNAL_FILENAME)


def snapshot_is_a_fifo(state: Path) -> None:
    (state / SNAPSHOT_FILENAME).unlink()
    os.mkfifo(state / SNAPSHOT_FILENAME)


def snapshot_deleted(state: Path) -> None:
    (state / SNAPSHOT_FILENAME).unlink()


def journal_deleted(state: Path) -> None:
    (state / JOURNAL_FILENAME).unlink()


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated-snapshot": (truncate_snapshot, "corrupt"),
    "garbage-journal": (garbage_journal, "not a postcopy block map"),
    "wrong-magic": (wrong_magic, "corrupt"),
    "corrupt-journal-record": (corrupt_journal_record, "corrupt"),
    "snapshot-directory": (snapshot_is_a_directory, "not a regular file"),
    "journal-fifo": (journal_is_a_fifo, "not a regular file"),
    "snapshot-fifo": (snapshot_is_a_fifo, "not a regular file"),
    # either would silently forget PRESENT/GUEST_WRITTEN bits: stale source data over writes
    "snapshot-deleted": (snapshot_deleted, "missing"),
    "journal-deleted": (journal_deleted, "missing"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_state_is_refused_in_one_line_and_nothing_changes(
    tmp_path: Path, source: tuple[RunningServe, str], damage: str
) -> None:
    _, uri = source
    dest, state = make_state(tmp_path, uri, snapshot=True)
    spoil, expected = DAMAGE[damage]
    spoil(state)
    before = fingerprint(dest, state)
    code, stderr = run_cli([
        "receive", "--source", uri, "--dest", str(dest), "--state-dir", str(state),
        "--socket", str(tmp_path / "d.sock"),
    ])  # fmt: skip
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and expected in stderr, stderr
    assert "Traceback" not in stderr
    assert fingerprint(dest, state) == before
    assert not (tmp_path / "d.sock").exists()  # nothing started


@pytest.mark.timeout(30)
def test_state_dir_that_is_a_file_or_dest_that_is_a_directory_is_refused(
    tmp_path: Path, source: tuple[RunningServe, str]
) -> None:
    _, uri = source
    not_a_dir = tmp_path / "state-file"
    not_a_dir.write_bytes(b"precious")
    dest = tmp_path / "dest.img"
    code, stderr = run_cli([
        "receive", "--source", uri, "--dest", str(dest), "--state-dir", str(not_a_dir),
        "--socket", str(tmp_path / "d.sock"),
    ])  # fmt: skip
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert not_a_dir.read_bytes() == b"precious" and not dest.exists()
    dest_dir = tmp_path / "dest-dir"
    dest_dir.mkdir()
    code, stderr = run_cli([
        "receive", "--source", uri, "--dest", str(dest_dir), "--state-dir",
        str(tmp_path / "state"), "--socket", str(tmp_path / "d.sock"),
    ])  # fmt: skip
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert dest_dir.is_dir() and not any(dest_dir.iterdir())


def test_garbage_status_record_is_one_line_for_readers_and_rewritten_by_the_engine(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "status.json").write_bytes(b"\x00{garbage")
    code, stderr = run_cli(["fetch-progress", "--state-dir", str(state), "--json"])
    assert code in (1, 2) and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    dest = tmp_path / "disk.img"
    dest.write_bytes(b"")
    os.truncate(dest, 1 * MiB)
    config = EngineConfig(
        source_uri="nbd://fake/", dest_path=dest, state_dir=state, chunk_size=CHUNK,
        drain=False, status_interval=0.05,
    )  # fmt: skip
    engine = Engine(config, source_opener=FakeSource(bytes(1 * MiB)).open_client)
    engine.start()
    engine.stop()
    assert read_status(state)["size_bytes"] == 1 * MiB
