"""FileBackend on real sparse files: allocation from SEEK_DATA/SEEK_HOLE, reads, and the hole
punching behind TRIM and WRITE_ZEROES."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nbdsrv.backend import HOLE_FLAGS, FileBackend
from tests.delayed_serve import DelayingBackend
from tests.peers import file_extents, sparse_test_image

SIZE = 16 * 1024 * 1024


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    sparse_test_image(path, SIZE, seed=11, min_run=64 * 1024, max_run=1024 * 1024)
    return path


def test_extents_match_seek_data_and_cover_any_window(image: Path) -> None:
    expected = [(o, n, 0 if data else HOLE_FLAGS) for o, n, data in file_extents(image)]
    with FileBackend(image) as backend:
        found = [(e.offset, e.length, e.flags) for e in backend.extents(0, SIZE, limit=10_000)]
        assert found == expected
        window = backend.extents(12345, 777_777)
        assert window[0].offset == 12345 and window[-1].end == 12345 + 777_777
        assert all(a.end == b.offset for a, b in zip(window, window[1:], strict=False))
        assert len(backend.extents(0, SIZE, limit=2)) == 2


def test_reads_fill_the_buffer_and_zero_past_the_end(image: Path) -> None:
    data = image.read_bytes()
    with FileBackend(image) as backend:
        buffer = bytearray(100_000)
        backend.read_into(SIZE - 50_000, memoryview(buffer)[:50_000])
        assert buffer[:50_000] == data[-50_000:]
        assert backend.read_cached(4096, memoryview(buffer)) in (0, 100_000)
        assert backend.sendfile_source(0, 4096) in (None, backend.fileno())


def test_a_delaying_backend_reads_the_same_bytes_and_never_from_the_cache(image: Path) -> None:
    data = image.read_bytes()
    with FileBackend(image) as backend:
        delayed = DelayingBackend(backend, 0.01)
        buffer = bytearray(100_000)
        delayed.read_into(SIZE - 100_000, memoryview(buffer))
        assert buffer == data[-100_000:]
        assert backend.read_cached(SIZE - 100_000, memoryview(buffer)) == 100_000  # now cached
        assert delayed.read_cached(SIZE - 100_000, memoryview(buffer)) == 0  # still delayed
        assert delayed.sendfile_source(SIZE - 100_000, 4096) is None
        assert delayed.extents(0, SIZE, limit=10_000) == backend.extents(0, SIZE, limit=10_000)


def test_writes_are_refused_on_a_read_only_backend(image: Path) -> None:
    with FileBackend(image) as backend, pytest.raises(OSError) as caught:
        backend.write(0, b"x")
    assert caught.value.errno == errno.EPERM


def test_trim_and_write_zeroes_punch_holes_unless_no_hole(tmp_path: Path) -> None:
    path = tmp_path / "dense.img"
    path.write_bytes(b"\xff" * SIZE)
    with FileBackend(path, writable=True) as backend:
        backend.trim(1 << 20, 1 << 20)
        backend.write_zeroes(4 << 20, 1 << 20, may_trim=True, fast_only=False, fua=True)
        backend.write_zeroes(8 << 20, 1 << 20, may_trim=False, fast_only=True)
        backend.write(12 << 20, b"abc", fua=True)
        backend.flush()
    data = path.read_bytes()
    assert data[1 << 20 : 2 << 20] == bytes(1 << 20)
    assert data[4 << 20 : 5 << 20] == bytes(1 << 20)
    assert data[8 << 20 : 9 << 20] == bytes(1 << 20)
    assert data[12 << 20 : (12 << 20) + 3] == b"abc"
    assert data[(2 << 20) : (2 << 20) + 10] == b"\xff" * 10
    holes = [(o, n) for o, n, is_data in file_extents(path) if not is_data]
    assert (1 << 20, 1 << 20) in holes and (4 << 20, 1 << 20) in holes
    assert not any(o <= 8 << 20 < o + n for o, n in holes)  # NO_HOLE kept it allocated


def test_fast_zero_fails_with_enotsup_when_only_the_slow_path_is_left(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x01" * 65536)
    with FileBackend(path, writable=True) as backend:
        backend._punch_works = False  # as on a file system without fallocate modes
        backend._zero_range_works = False
        with pytest.raises(OSError) as caught:
            backend.write_zeroes(0, 4096, may_trim=True, fast_only=True)
        assert caught.value.errno == errno.ENOTSUP
        backend.write_zeroes(0, 4096, may_trim=True, fast_only=False)  # writes zeroes instead
    assert path.read_bytes()[:4097] == bytes(4096) + b"\x01"


def test_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        FileBackend(tmp_path)
    assert os.path.isdir(tmp_path)
