"""Verification before release (`postcopy.destination.verify`): a destination built by hand (a real
block map and a real file) to pin each rule, and a disk really migrated by `postcopy serve` ->
`postcopy receive`, verified while receive runs, then corrupted on purpose."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import nbd
import pytest

from postcopy.destination.blockmap import GUEST_WRITTEN, PRESENT, BlockMap, MapIdentity
from postcopy.destination.statelock import acquire_state_lock, lock_destination
from postcopy.destination.status import write_status
from postcopy.destination.verify import (
    DestinationInUseError,
    DestinationNotComplete,
    VerifyInputError,
    VerifyReport,
    verify_destination,
)
from postcopy.errors import StateError
from postcopy.source.digest import compute_digests
from tests.destination.test_receive import running_receive
from tests.destination.test_state_lock import fingerprint
from tests.peers import running_qemu_nbd, running_serve, sparse_test_image

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 64 * KiB


def make_destination(
    tmp_path: Path,
    source: Path,
    *,
    guest_written: tuple[int, ...] = (),
    missing: tuple[int, ...] = (),
    chunk_size: int = CHUNK,
    sparse: bool = True,
) -> tuple[Path, Path]:
    """A state directory whose map says every chunk is PRESENT (but `missing`), the chunks
    `guest_written` written by the guest, made durable; and B's file, a copy of `source` (its zeros
    made holes when `sparse`, else every byte allocated)."""
    dest, state_dir = tmp_path / "dest.img", tmp_path / "state"
    how = "--sparse=always" if sparse else "--sparse=never"
    subprocess.run(["cp", how, str(source), str(dest)], check=True)
    state_dir.mkdir()
    size = source.stat().st_size
    identity = MapIdentity(size, chunk_size, size, "", "nbd://a/")
    block_map = BlockMap.open(state_dir, identity)
    try:
        chunk = 0
        for hole in sorted(missing):
            block_map.mark_present(chunk, hole)
            chunk = hole + 1
        block_map.mark_present(chunk, block_map.chunk_count)
        for written in guest_written:
            block_map.mark(written, written + 1, PRESENT | GUEST_WRITTEN)
        block_map.make_durable(lambda: None)
    finally:
        block_map.close()
    return state_dir, dest


def overwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    image = tmp_path / "source.img"
    sparse_test_image(image, 8 * MiB + 5000, seed=3, max_run=MiB)  # a short last chunk
    return image


def test_an_exact_copy_matches_and_every_chunk_is_compared(tmp_path: Path, source: Path) -> None:
    state_dir, dest = make_destination(tmp_path, source)
    digests = compute_digests(source, CHUNK)
    report = verify_destination(state_dir, digests, dest=dest)
    assert report.matched and report.mismatch_count == 0 and report.mismatch_offsets == ()
    assert report.chunks_compared == digests.chunk_count == 129
    assert report.chunks_skipped_guest_written == 0 and not report.receive_running
    assert report.bytes_read == digests.bytes_read  # the same chunks are data on both sides
    assert report.hole_chunks == digests.hole_chunks > 0


def test_one_corrupted_chunk_is_a_mismatch_at_exactly_its_offset(
    tmp_path: Path, source: Path
) -> None:
    state_dir, dest = make_destination(tmp_path, source)
    digests = compute_digests(source, CHUNK)
    overwrite(dest, 37 * CHUNK + 1234, b"\xff")  # one byte
    report = verify_destination(state_dir, digests, dest=dest)
    assert not report.matched
    assert report.mismatch_count == 1 and report.mismatch_offsets == (37 * CHUNK,)
    assert "0x250000" in report.summary() and "keep the source" in report.summary()


def test_a_corrupted_short_last_chunk_is_named(tmp_path: Path, source: Path) -> None:
    state_dir, dest = make_destination(tmp_path, source)
    overwrite(dest, source.stat().st_size - 1, b"\x5a")
    report = verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest)
    assert report.mismatch_offsets == (128 * CHUNK,)


def test_many_mismatches_are_counted_and_the_first_ones_listed(
    tmp_path: Path, source: Path
) -> None:
    state_dir, dest = make_destination(tmp_path, source)
    for chunk in range(0, 120, 2):
        overwrite(dest, chunk * CHUNK, b"\x01\x02")
    report = verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest, max_listed=5)
    assert report.mismatch_count == 60
    assert report.mismatch_offsets == tuple(chunk * CHUNK for chunk in range(0, 10, 2))
    assert "and 55 more" in report.summary()
    record = report.to_record()
    assert record["mismatch_offsets_truncated"] is True and record["result"] == "mismatch"
    assert VerifyReport.from_record(json.loads(json.dumps(record))) == report


def test_a_guest_written_chunk_that_differs_is_skipped_not_a_mismatch(
    tmp_path: Path, source: Path
) -> None:
    state_dir, dest = make_destination(tmp_path, source, guest_written=(5, 128))
    overwrite(dest, 5 * CHUNK, b"guest data" * 100)
    overwrite(dest, 128 * CHUNK, b"guest tail")
    report = verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest)
    assert report.matched
    assert report.chunks_skipped_guest_written == 2 and report.chunks_compared == 127
    # the same corruption in a chunk the guest did not write is found
    overwrite(dest, 6 * CHUNK, b"not the guest")
    report = verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest)
    assert report.mismatch_offsets == (6 * CHUNK,)


def test_holes_on_a_and_zeros_on_b_match_and_the_reverse(tmp_path: Path) -> None:
    size = 2 * MiB + 777
    holes, zeros = tmp_path / "holes.img", tmp_path / "zeros.img"
    with open(holes, "wb") as f:
        f.truncate(size)
        f.seek(MiB)
        f.write(b"d" * 100)
    content = bytearray(size)
    content[MiB:MiB + 100] = b"d" * 100
    zeros.write_bytes(content)
    # A has holes, B has the zeros written out
    a_side = tmp_path / "a"
    a_side.mkdir()
    state_dir, dest = make_destination(a_side, zeros, sparse=False)
    report = verify_destination(state_dir, compute_digests(holes, CHUNK), dest=dest)
    assert report.matched and report.bytes_read == size and report.hole_chunks == 0
    # A has the zeros written out, B has holes
    b_side = tmp_path / "b"
    b_side.mkdir()
    state_dir, dest = make_destination(b_side, holes)
    report = verify_destination(state_dir, compute_digests(zeros, CHUNK), dest=dest)
    assert report.matched and report.bytes_read == CHUNK
    # and a hole on B where A has data is a mismatch
    os.truncate(dest, 0)
    os.truncate(dest, size)
    report = verify_destination(state_dir, compute_digests(zeros, CHUNK), dest=dest)
    assert report.mismatch_offsets == (MiB,)


def test_the_destination_comes_from_the_status_record(tmp_path: Path, source: Path) -> None:
    state_dir, dest = make_destination(tmp_path, source)
    with pytest.raises(VerifyInputError, match="no status"):
        verify_destination(state_dir, compute_digests(source, CHUNK))
    write_status(state_dir, {"state": "complete", "dest": str(dest)})
    assert verify_destination(state_dir, compute_digests(source, CHUNK)).matched


# ----- bad input: one line, nothing changed ------------------------------------------------------


def test_digests_of_another_chunk_size_or_image_are_refused(tmp_path: Path, source: Path) -> None:
    state_dir, dest = make_destination(tmp_path, source)
    before = fingerprint(state_dir, dest)
    with pytest.raises(VerifyInputError, match="--chunk-size 65536"):
        verify_destination(state_dir, compute_digests(source, 128 * KiB), dest=dest)
    other = tmp_path / "other.img"
    other.write_bytes(source.read_bytes()[:-1])
    with pytest.raises(VerifyInputError, match="not the same disk"):
        verify_destination(state_dir, compute_digests(other, CHUNK), dest=dest)
    os.truncate(dest, source.stat().st_size + 1)
    with pytest.raises(VerifyInputError, match="has 8393609 bytes"):
        verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest)
    os.truncate(dest, source.stat().st_size)
    assert fingerprint(state_dir, dest) == before


def test_a_disk_that_is_not_complete_is_refused(tmp_path: Path, source: Path) -> None:
    state_dir, dest = make_destination(tmp_path, source, missing=(9, 10))
    before = fingerprint(state_dir, dest)
    with pytest.raises(DestinationNotComplete, match=r"128 KiB .* not durably present"):
        verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest)
    assert fingerprint(state_dir, dest) == before


def test_a_missing_state_dir_destination_or_map_is_refused(tmp_path: Path, source: Path) -> None:
    digests = compute_digests(source, CHUNK)
    with pytest.raises(VerifyInputError, match="does not exist"):
        verify_destination(tmp_path / "nowhere", digests, dest=source)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StateError, match="holds no block map"):
        verify_destination(tmp_path / "empty", digests, dest=source)
    state_dir, _ = make_destination(tmp_path, source)
    with pytest.raises(VerifyInputError, match="cannot open destination"):
        verify_destination(state_dir, digests, dest=tmp_path / "gone.img")


def test_a_destination_open_as_a_disk_image_elsewhere_is_in_use(
    tmp_path: Path, source: Path
) -> None:
    """A hypervisor holding image locks on the file (as QEMU does after a pivot) writes around
    the block map: refused.  QEMU's own lock kind (OFD) is used, on its permission bytes."""
    state_dir, dest = make_destination(tmp_path, source)
    fd = os.open(dest, os.O_RDONLY)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 100)
        with pytest.raises(DestinationInUseError, match="after a pivot"):
            verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest)
    finally:
        os.close(fd)
    assert verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest).matched


def test_a_destination_opened_by_qemu_is_in_use(tmp_path: Path, source: Path) -> None:
    """The real thing: qemu-nbd (QEMU's block layer, as B's QEMU after a pivot) holds the file."""
    state_dir, dest = make_destination(tmp_path, source)
    before = fingerprint(state_dir, dest)
    with (
        running_qemu_nbd(dest, read_only=False),
        pytest.raises(DestinationInUseError, match="locks it as a disk image"),
    ):
        verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest)
    assert fingerprint(state_dir, dest) == before


def test_a_destination_served_under_another_state_dir_is_in_use(
    tmp_path: Path, source: Path
) -> None:
    state_dir, dest = make_destination(tmp_path, source)
    with lock_destination(dest):  # another receive's lock; ours is free
        with pytest.raises(DestinationInUseError, match="another state directory"):
            verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest)
        with acquire_state_lock(state_dir, "postcopy receive"):  # now it is this dir's receive
            report = verify_destination(state_dir, compute_digests(source, CHUNK), dest=dest)
            assert report.matched and report.receive_running


def test_while_receive_runs_the_live_map_counts_fresh_guest_writes(
    tmp_path: Path, source: Path
) -> None:
    """A guest write whose bit is in the engine's live map but not yet in the journal: skipped
    while the state lock is held (a running receive), a mismatch when nobody runs."""
    state_dir, dest = make_destination(tmp_path, source)
    chunk_count = 129
    live = bytearray([PRESENT]) * chunk_count
    live[40] |= GUEST_WRITTEN
    (state_dir / "live.map").write_bytes(bytes(live))
    overwrite(dest, 40 * CHUNK, b"fresh guest write")
    digests = compute_digests(source, CHUNK)
    assert verify_destination(state_dir, digests, dest=dest).mismatch_offsets == (40 * CHUNK,)
    with acquire_state_lock(state_dir, "postcopy receive"):
        report = verify_destination(state_dir, digests, dest=dest)
    assert report.matched and report.receive_running
    assert report.chunks_skipped_guest_written == 1


# ----- a real migration --------------------------------------------------------------------------


def test_a_disk_migrated_by_serve_and_receive_verifies_then_a_corrupted_chunk_fails(
    tmp_path: Path,
) -> None:
    image = tmp_path / "a.img"
    size = 24 * MiB + 4096  # a short last chunk
    sparse_test_image(image, size, seed=11)
    digests = compute_digests(image, CHUNK)
    written_offset = 3 * MiB + 100  # inside chunk 48
    with running_serve(image) as serve, running_receive(serve.uri, tmp_path) as receiver:
        handle = nbd.NBD()
        handle.connect_uri(receiver.uri)
        try:
            handle.pwrite(b"written on B" * 10, written_offset)
            handle.flush()
        finally:
            handle.shutdown()
        receiver.wait_complete(timeout=60)
        # while receive still runs (A is released only after verification)
        report = verify_destination(receiver.state_dir, digests)
        assert report.matched, report.summary()
        assert report.receive_running
        assert report.chunks_skipped_guest_written == 1
        assert report.chunks_compared == digests.chunk_count - 1
        # the negative control: one chunk of B's file corrupted on purpose
        overwrite(receiver.dest, 200 * CHUNK + 17, b"\x00\xff\x00")
        report = verify_destination(receiver.state_dir, digests)
        assert report.mismatch_offsets == (200 * CHUNK,) and report.mismatch_count == 1
    # and after receive stopped, the same
    stopped = verify_destination(receiver.state_dir, digests)
    assert not stopped.receive_running and stopped.mismatch_offsets == (200 * CHUNK,)
    shutil.rmtree(receiver.state_dir)
