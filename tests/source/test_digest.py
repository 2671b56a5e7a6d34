"""Per-chunk digests of a source image (`postcopy.source.digest`): the file format byte for byte,
every refusal of a damaged file, and the digests of real sparse files checked against hashlib
chunk by chunk (holes unread, the short last chunk, zeros equal whichever way they are stored)."""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from postcopy.errors import UserError
from postcopy.source.digest import (
    DigestFormatError,
    DigestList,
    ImageChangedError,
    allocation_runs,
    compute_digests,
    zero_digest,
)
from tests.peers import file_extents, sparse_test_image

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 64 * KiB

# A 100000-byte image of chunk 0 = 65536 x 0x00 and chunk 1 = 34464 x 0x01, sha256-128, 64 KiB
# chunks: magic, version 1, digest size 16, chunk size 65536, image size 100000, 2 chunks, name
# length 10, "sha256-128", header crc32, the two digests, the trailer.
GOLDEN = bytes.fromhex(
    "5043444947455354" "0100" "1000" "00000100" "a086010000000000" "0200000000000000" "0a00"
    "7368613235362d313238" "79afc96c"
    "de2f256064a0af797747c2b97505dc0b" "083055a37449dcb540d13278603740db"
    "d22d26a37555f17fbf59d6e68faf6e25"
)


def sha256_128(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:16]


def expected_digests(
    path: Path, chunk_size: int, function: Callable[[bytes], bytes] = sha256_128
) -> bytes:
    data = path.read_bytes()
    return b"".join(
        function(data[offset:offset + chunk_size]) for offset in range(0, len(data), chunk_size)
    )


# ----- the format --------------------------------------------------------------------------------


def test_golden_file_parses_and_builds_back_byte_for_byte() -> None:
    golden_digests = sha256_128(bytes(CHUNK)) + sha256_128(b"\x01" * (100000 - CHUNK))
    parsed = DigestList.decode(GOLDEN)
    assert (parsed.algorithm, parsed.chunk_size, parsed.image_size) == ("sha256-128", CHUNK, 100000)
    assert parsed.chunk_count == 2
    assert parsed.digests == golden_digests
    assert parsed.digest(1) == sha256_128(b"\x01" * 34464)
    assert DigestList("sha256-128", CHUNK, 100000, golden_digests).encode() == GOLDEN


def test_golden_image_digests_to_the_golden_file(tmp_path: Path) -> None:
    image = tmp_path / "golden.img"
    with open(image, "wb") as f:
        f.truncate(CHUNK)  # chunk 0: a hole
        f.seek(CHUNK)
        f.write(b"\x01" * (100000 - CHUNK))
    assert compute_digests(image, CHUNK).encode() == GOLDEN


def test_both_algorithms_round_trip_and_an_empty_image_too(tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    image.write_bytes(os.urandom(3 * CHUNK + 5))
    blake = compute_digests(image, CHUNK, algorithm="blake2b-128")
    assert blake.digests == expected_digests(
        image, CHUNK, lambda data: hashlib.blake2b(data, digest_size=16).digest()
    )
    assert DigestList.decode(blake.encode()) == blake
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    nothing = compute_digests(empty, CHUNK)
    assert nothing.chunk_count == 0 and DigestList.decode(nothing.encode()) == nothing


def _with_header_crc(data: bytearray) -> bytes:
    """Re-seal a header edited by a test (so the check under test is the one that fires)."""
    name_end = 34 + data[32]
    data[name_end:name_end + 4] = zlib.crc32(bytes(data[:name_end])).to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:20], "truncated"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d[:-16], "truncated"),
        (lambda d: d + b"\x00", "after its end"),
        (lambda d: d + d, "after its end"),
        (lambda d: b"NOTDIGST" + d[8:], "bad magic"),
        (lambda d: d[:50] + bytes([d[50] ^ 1]) + d[51:], "trailer digest does not match"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 0x80]), "trailer digest does not match"),
        (lambda d: d[:12] + bytes([d[12] ^ 1]) + d[13:], "header checksum"),
        (lambda d: _with_header_crc(bytearray(d[:8] + b"\x02\x00" + d[10:])), "format version 2"),
        (lambda d: _with_header_crc(bytearray(d[:34] + b"md5-128___" + d[44:])), "md5-128___"),
        (lambda d: _with_header_crc(bytearray(d[:24] + b"\x03" + d[25:])), "3 chunks"),
        (lambda d: _with_header_crc(bytearray(d[:12] + b"\x00\x30\x00\x00" + d[16:])),
         "power of two"),
        (lambda d: b"", "truncated"),
    ],
)
def test_a_damaged_digest_file_is_refused_in_one_line(
    damage: Callable[[bytes], bytes], message: str
) -> None:
    with pytest.raises(DigestFormatError) as caught:
        DigestList.decode(damage(GOLDEN))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# ----- digests of real files ---------------------------------------------------------------------


def test_sparse_image_digests_equal_hashlib_per_chunk_and_holes_are_not_read(
    tmp_path: Path,
) -> None:
    image = tmp_path / "sparse.img"
    size = 24 * MiB + 12345  # a short last chunk, inside a data run or a hole depending on seed
    data_runs = sparse_test_image(image, size, seed=7, min_run=CHUNK, max_run=2 * MiB)
    with open(image, "r+b") as f:  # data in the short last chunk
        f.seek(size - 100)
        f.write(b"tail" * 25)
    data_runs.append((size - 100, 100))
    digests = compute_digests(image, CHUNK)
    assert digests.digests == expected_digests(image, CHUNK)
    data_chunks = {
        chunk
        for offset, length in data_runs
        for chunk in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)
    }
    assert digests.hole_chunks == digests.chunk_count - len(data_chunks)
    last = digests.chunk_count - 1
    assert digests.bytes_read == sum(
        CHUNK if chunk != last else size - last * CHUNK for chunk in data_chunks
    )
    assert digests.hole_chunks > 0


def test_holes_and_allocated_zeros_give_the_same_digests(tmp_path: Path) -> None:
    holes, zeros = tmp_path / "holes.img", tmp_path / "zeros.img"
    size = 4 * MiB + 4096 + 17
    with open(holes, "wb") as f:
        f.truncate(size)
        f.seek(MiB + 10)
        f.write(b"data")
    content = bytearray(size)
    content[MiB + 10:MiB + 14] = b"data"
    zeros.write_bytes(content)
    assert sum(length for _, length, is_data in file_extents(zeros) if is_data) == size
    from_holes, from_zeros = compute_digests(holes, CHUNK), compute_digests(zeros, CHUNK)
    assert from_holes.digests == from_zeros.digests == expected_digests(zeros, CHUNK)
    assert from_holes.bytes_read == CHUNK and from_zeros.bytes_read == size
    assert from_holes.digest(from_holes.chunk_count - 1) == zero_digest("sha256-128", 4096 + 17)


def test_a_data_run_ending_inside_a_chunk_makes_that_chunk_data(tmp_path: Path) -> None:
    image = tmp_path / "edge.img"
    with open(image, "wb") as f:
        f.truncate(8 * CHUNK)
        f.seek(2 * CHUNK - 4096)  # the last page of chunk 1
        f.write(b"\x07" * 8192)  # ... and the first page of chunk 2
    fd = os.open(image, os.O_RDONLY)
    try:
        assert list(allocation_runs(fd, 8 * CHUNK, CHUNK, 0, 8)) == [
            (0, 1, False), (1, 3, True), (3, 8, False)
        ]
        assert list(allocation_runs(fd, 8 * CHUNK, CHUNK, 2, 5)) == [(2, 3, True), (3, 5, False)]
    finally:
        os.close(fd)
    assert compute_digests(image, CHUNK).digests == expected_digests(image, CHUNK)


def test_two_threads_and_small_reads_give_the_same_digests(tmp_path: Path) -> None:
    image = tmp_path / "dense.img"
    image.write_bytes(os.urandom(9 * MiB + 3))
    one = compute_digests(image, 4096, threads=1)
    two = compute_digests(image, 4096, threads=2)
    assert one.digests == two.digests == expected_digests(image, 4096)
    assert one.bytes_read == two.bytes_read == 9 * MiB + 3


def test_chunks_larger_than_a_read_block(tmp_path: Path) -> None:
    image = tmp_path / "big-chunks.img"
    image.write_bytes(os.urandom(17 * MiB))
    assert compute_digests(image, 16 * MiB).digests == expected_digests(image, 16 * MiB)


@pytest.mark.parametrize("chunk_size", [0, 1000, 2048, 3 * CHUNK, 128 * MiB])
def test_a_bad_chunk_size_is_refused(tmp_path: Path, chunk_size: int) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(b"x")
    with pytest.raises(UserError, match="power of two"):
        compute_digests(image, chunk_size)


def test_a_missing_image_or_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot open"):
        compute_digests(tmp_path / "absent.img")
    with pytest.raises(UserError, match="neither a regular file"):
        compute_digests(Path("/dev/null"))


@pytest.mark.parametrize("late_change", ["grows", "mtime"])
def test_an_image_written_while_it_is_digested_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late_change: str
) -> None:
    """The domain on A still writing (here: between the read and the final check) is noticed by
    the size or the mtime (set explicitly: a write within one clock tick keeps the mtime)."""
    import postcopy.source.digest as digest_module

    image = tmp_path / "live.img"
    image.write_bytes(os.urandom(4 * CHUNK))
    os.utime(image, ns=(10**18, 10**18))
    real_hash_chunk_runs = digest_module.hash_chunk_runs

    def hash_then_guest_writes(*args, **kwargs):  # type: ignore[no-untyped-def]
        stats = real_hash_chunk_runs(*args, **kwargs)
        if late_change == "grows":
            with open(image, "ab") as f:
                f.write(b"late write")
        else:
            os.utime(image, ns=(10**18, 10**18 + 1))
        return stats

    monkeypatch.setattr(digest_module, "hash_chunk_runs", hash_then_guest_writes)
    with pytest.raises(ImageChangedError, match="is its domain still running"):
        compute_digests(image, CHUNK)
