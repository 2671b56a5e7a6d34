"""The C fast path's view of the live map equals the Python block map's view, and the ordering the
filter relies on (a release fence between the data write and the PRESENT store) is there or
the engine refuses to run.

The view test runs real nbdkit with the built filter in front of the `pattern` plugin, over a
destination file that holds only a marker byte and a live map that this test's own `BlockMap`
(live_mirror=True) publishes and changes while nbdkit runs.  A read the filter serves returns the
marker (it saw PRESENT), one it hands on returns the pattern, so every read shows what the
filter believes about its chunks; after each round of marks (PRESENT with every other bit, and
SOURCE_HOLE alone, which is still missing) it must be exactly `BlockMap.is_present`.
"""

from __future__ import annotations

import ctypes.util
import random
from pathlib import Path

import nbd
import pytest

from postcopy.destination import receive
from postcopy.destination.blockmap import LIVE_MAP_FILENAME, BlockMap, MapIdentity
from postcopy.destination.engine import release_fence_for
from postcopy.errors import UserError
from tests.peers import running_nbdkit

CHUNK = 64 * 1024
SHIFT = 16
CHUNKS = 48
SIZE = CHUNKS * CHUNK + 4096  # a partial last chunk
MARKER = 0xAA
PROBE = 512


def pattern(offset: int, length: int) -> bytes:
    """What nbdkit's pattern plugin serves: each 8-byte word is its own offset, big-endian."""
    first = offset - offset % 8
    words = b"".join(word.to_bytes(8, "big") for word in range(first, offset + length + 8, 8))
    return words[offset - first:offset - first + length]


def filter_sees_present(handle: nbd.NBD, offset: int, length: int) -> bool:
    """Did the filter serve this read (from the marker file), or hand it to the plugin?"""
    data = bytes(handle.pread(length, offset))
    if data == bytes([MARKER]) * length:
        return True
    assert data == pattern(offset, length), f"neither the file nor the plugin at {offset}"
    return False


def test_filter_present_bit_equals_the_block_map(tmp_path: Path) -> None:
    built = receive.fastpath_filter_path()
    assert built is not None, "make did not build the fast path filter"
    dest = tmp_path / "dest.img"
    dest.write_bytes(bytes([MARKER]) * SIZE)
    identity = MapIdentity(SIZE, CHUNK, SIZE, "", "nbd://source")
    block_map = BlockMap.open(tmp_path, identity, live_mirror=True)
    rng = random.Random(7)
    try:
        assert block_map.chunk_count == CHUNKS + 1
        with running_nbdkit(
            [
                f"--filter={built}", "pattern", f"size={SIZE}",
                f"fastpath-map={tmp_path / LIVE_MAP_FILENAME}", f"fastpath-file={dest}",
                f"fastpath-shift={SHIFT}",
            ],
            nbdkit_args=["-r"],
        ) as uri:  # fmt: skip
            handle = nbd.NBD()
            handle.connect_uri(uri)
            kinds = [
                lambda c: block_map.mark_present(c, c + 1),
                lambda c: block_map.mark_present(c, c + 1, guest_written=True),
                lambda c: block_map.mark_present(c, c + 1, source_hole=True),
                lambda c: block_map.note_source_hole(c, c + 1),  # still missing
            ]
            for _round in range(6):
                for chunk in rng.sample(range(block_map.chunk_count), 6):
                    rng.choice(kinds)(chunk)
                expected = [block_map.is_present(c) for c in range(block_map.chunk_count)]
                seen = []
                for chunk in range(block_map.chunk_count):
                    start, stop = block_map.chunk_bounds(chunk)
                    first = filter_sees_present(handle, start, PROBE)
                    last = filter_sees_present(handle, stop - PROBE, PROBE)
                    assert first == last, f"chunk {chunk}: the filter's view differs inside it"
                    seen.append(first)
                assert seen == expected
                # a read across two chunks is served by the filter only when both are present
                for chunk in range(block_map.chunk_count - 1):
                    across = block_map.chunk_bounds(chunk)[1] - PROBE
                    assert filter_sees_present(handle, across, 2 * PROBE) == (
                        expected[chunk] and expected[chunk + 1]
                    ), f"chunks {chunk}, {chunk + 1}"
            assert 0 < sum(expected) < block_map.chunk_count
            handle.shutdown()
    finally:
        block_map.close()


def test_release_fence_is_a_no_op_on_x86_and_libatomic_elsewhere() -> None:
    release_fence_for("x86_64", None)()  # TSO: nothing needed, nothing refused
    libatomic = ctypes.util.find_library("atomic")
    assert libatomic is not None, "libatomic1 (a gcc dependency) is not installed"
    release_fence_for("aarch64", libatomic)()  # the real C11 fence, callable
    with pytest.raises(UserError, match="libatomic is missing") as refused:
        release_fence_for("aarch64", None)
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError):
        release_fence_for("riscv64", "/nonexistent/libatomic.so.1")
