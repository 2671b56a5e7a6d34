"""The block map: range queries, persistence, durability order, refusal of foreign state."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from postcopy.destination.blockmap import (
    JOURNAL_FILENAME,
    SNAPSHOT_FILENAME,
    BlockMap,
    MapIdentity,
)
from postcopy.errors import StateError

CHUNK = 64 * 1024


def identity(
    disk_size: int = 100 * CHUNK + 1234, chunk_size: int = CHUNK, **kw: object
) -> MapIdentity:
    fields: dict[str, object] = dict(
        disk_size=disk_size, chunk_size=chunk_size, source_size=disk_size,
        export_name="", source_id="nbd://src/",
    )
    fields.update(kw)
    return MapIdentity(**fields)  # type: ignore[arg-type]


def test_fresh_map_is_all_missing_and_coalesces(tmp_path: Path) -> None:
    bm = BlockMap.open(tmp_path, identity())
    assert bm.chunk_count == 101
    assert list(bm.missing_ranges()) == [(0, 101)]
    bm.mark_present(3, 5)
    bm.mark_present(10, 11, guest_written=True)
    assert list(bm.missing_ranges()) == [(0, 3), (5, 10), (11, 101)]
    assert list(bm.missing_ranges(4, 12)) == [(5, 10), (11, 12)]
    assert list(bm.present_ranges()) == [(3, 5), (10, 11)]
    assert list(bm.guest_written_ranges()) == [(10, 11)]
    assert bm.all_present(3, 5) and not bm.all_present(3, 6) and bm.is_present(10)
    assert bm.next_missing_range(3) == (5, 10)
    assert bm.present_count == 3 and bm.present_bytes == 3 * CHUNK
    assert not bm.is_complete


def test_short_last_chunk_counts_its_real_size(tmp_path: Path) -> None:
    bm = BlockMap.open(tmp_path, identity())
    bm.mark_present(100, 101)
    assert bm.present_bytes == 1234
    assert bm.chunk_bounds(100) == (100 * CHUNK, 100 * CHUNK + 1234)
    bm.mark_present(0, 101)
    assert bm.is_complete and bm.present_bytes == 100 * CHUNK + 1234
    assert bm.mark_present(0, 101) == 0  # idempotent: nothing newly present


def test_source_hole_knowledge_keeps_chunk_missing(tmp_path: Path) -> None:
    bm = BlockMap.open(tmp_path, identity())
    bm.note_source_hole(20, 30)
    assert bm.is_source_hole(25) and not bm.is_present(25)
    assert list(bm.missing_ranges(0, 40)) == [(0, 40)]
    bm.mark_present(20, 30, source_hole=True)
    assert list(bm.missing_ranges(0, 40)) == [(0, 20), (30, 40)]


def test_only_durable_changes_survive_reopen(tmp_path: Path) -> None:
    bm = BlockMap.open(tmp_path, identity())
    bm.mark_present(0, 4)
    synced: list[str] = []
    bm.make_durable(lambda: synced.append("data"))
    assert synced == ["data"]
    bm.mark_present(50, 60, guest_written=True)  # never made durable: lost on a crash
    bm.close()
    again = BlockMap.open(tmp_path, identity())
    assert list(again.present_ranges()) == [(0, 4)]
    assert again.present_count == 4


def test_map_persisted_only_after_data_sync(tmp_path: Path) -> None:
    bm = BlockMap.open(tmp_path, identity())
    bm.mark_present(7, 9)

    def failing_sync() -> None:
        raise OSError(5, "EIO")

    with pytest.raises(OSError):
        bm.make_durable(failing_sync)
    assert BlockMap.open(tmp_path, identity()).present_count == 0  # bit not persisted
    # a failed data sync is never retried into a success (see test_durability_failures.py)
    with pytest.raises(OSError) as failed_again:
        bm.make_durable(lambda: None)
    assert failed_again.value.errno == errno.EIO
    bm.close()
    assert BlockMap.open(tmp_path, identity()).present_count == 0


def test_compaction_writes_snapshot_and_empties_journal(tmp_path: Path) -> None:
    bm = BlockMap.open(tmp_path, identity())
    for chunk in range(0, 100, 2):
        bm.mark_present(chunk, chunk + 1)
        bm.make_durable(lambda: None)
    journal_size = (tmp_path / JOURNAL_FILENAME).stat().st_size
    bm.mark_present(99, 100, guest_written=True)
    bm.make_durable(lambda: None, compact=True)
    assert (tmp_path / SNAPSHOT_FILENAME).exists()
    assert (tmp_path / JOURNAL_FILENAME).stat().st_size < journal_size
    bm.mark_present(1, 2)
    bm.make_durable(lambda: None)  # journal after snapshot
    bm.close()
    again = BlockMap.open(tmp_path, identity())
    assert again.present_count == 52
    assert list(again.guest_written_ranges()) == [(99, 100)]
    assert again.is_present(1) and again.is_present(98) and not again.is_present(97)


def test_torn_last_journal_record_is_dropped(tmp_path: Path) -> None:
    bm = BlockMap.open(tmp_path, identity())
    bm.mark_present(0, 1)
    bm.make_durable(lambda: None)
    bm.mark_present(5, 6)
    bm.make_durable(lambda: None)
    bm.close()
    path = tmp_path / JOURNAL_FILENAME
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # the second record is torn
    again = BlockMap.open(tmp_path, identity())
    assert list(again.present_ranges()) == [(0, 1)]
    again.mark_present(6, 7)  # appending after the dropped tail still works
    again.make_durable(lambda: None)
    again.close()
    assert list(BlockMap.open(tmp_path, identity()).present_ranges()) == [(0, 1), (6, 7)]


@pytest.mark.parametrize(
    "changed",
    [
        {"chunk_size": 2 * CHUNK},
        {"disk_size": 200 * CHUNK, "source_size": 200 * CHUNK},
        {"source_id": "nbd://other/"},
        {"export_name": "disk2"},
    ],
)
@pytest.mark.parametrize("compacted", [True, False])  # refused by the snapshot / the journal
def test_mismatched_state_is_refused(
    tmp_path: Path, changed: dict[str, object], compacted: bool
) -> None:
    bm = BlockMap.open(tmp_path, identity())
    bm.mark_present(0, 1)
    bm.make_durable(lambda: None, compact=compacted)
    bm.close()
    other = identity(**changed)  # type: ignore[arg-type]
    with pytest.raises(StateError, match="belongs to another disk") as info:
        BlockMap.open(tmp_path, other)
    assert "\n" not in str(info.value)


def test_corrupt_snapshot_is_refused(tmp_path: Path) -> None:
    bm = BlockMap.open(tmp_path, identity())
    bm.mark_present(0, 1)
    bm.make_durable(lambda: None, compact=True)
    bm.close()
    path = tmp_path / SNAPSHOT_FILENAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="corrupt"):
        BlockMap.open(tmp_path, identity())


def test_bad_chunk_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="power of two"):
        BlockMap.open(tmp_path, identity(chunk_size=3 * 4096))


def test_one_tib_map_opens_fast(tmp_path: Path) -> None:
    tib = 1 << 40
    started = time.monotonic()
    bm = BlockMap.open(tmp_path, identity(disk_size=tib))
    bm.mark_present(1000, 2000)
    assert bm.all_present(1500, 1600)
    assert bm.next_missing_range(1000) == (2000, bm.chunk_count)
    bm.make_durable(lambda: None, compact=True)
    bm.close()
    again = BlockMap.open(tmp_path, identity(disk_size=tib))
    elapsed = time.monotonic() - started
    assert again.chunk_count == 16 * 1024 * 1024 and again.present_count == 1000
    assert elapsed < 1.0, elapsed
    assert os.path.getsize(tmp_path / SNAPSHOT_FILENAME) < 1024 * 1024


def _journal_header_spoiled(state: Path) -> None:
    path = state / JOURNAL_FILENAME
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF  # inside the identity header: its checksum no longer matches
    path.write_bytes(bytes(data))


def _journal_dangling_link(state: Path) -> None:
    (state / JOURNAL_FILENAME).unlink()
    (state / JOURNAL_FILENAME).symlink_to(state / "elsewhere")


def _journal_of_another_disk(state: Path) -> None:
    (state / JOURNAL_FILENAME).unlink()
    BlockMap.open(state.parent / "other", identity(source_id="nbd://other/")).close()
    os.rename(state.parent / "other" / JOURNAL_FILENAME, state / JOURNAL_FILENAME)


def _snapshot_gone(state: Path) -> None:
    (state / SNAPSHOT_FILENAME).unlink()


REFUSED_STATES = {
    "journal-missing": (lambda state: (state / JOURNAL_FILENAME).unlink(), "is missing"),
    "journal-header-corrupt": (_journal_header_spoiled, "header checksum mismatch"),
    "journal-dangling-symlink": (_journal_dangling_link, "symbolic link"),
    "journal-of-another-disk": (_journal_of_another_disk, "belongs to another disk"),
    "snapshot-missing-journal-continues-it": (_snapshot_gone, "journal continues it"),
}


@pytest.mark.parametrize("damage", sorted(REFUSED_STATES))
@pytest.mark.parametrize("read_only", [False, True])
def test_open_and_read_only_open_refuse_the_same_state_and_write_nothing(
    tmp_path: Path, damage: str, read_only: bool
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "other").mkdir()
    bm = BlockMap.open(state, identity())
    bm.mark_present(0, 3)
    bm.make_durable(lambda: None, compact=True)
    bm.mark_present(7, 8)
    bm.make_durable(lambda: None)  # a journal that continues the snapshot
    bm.close()
    spoil, expected = REFUSED_STATES[damage]
    spoil(state)
    before = {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() else None)
              for p in state.iterdir()}  # fmt: skip
    opener = BlockMap.open_read_only if read_only else BlockMap.open
    with pytest.raises(StateError, match=expected) as info:
        opener(state, identity())
    assert "\n" not in str(info.value)
    after = {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() else None)
             for p in state.iterdir()}  # fmt: skip
    assert after == before
