"""Source block status, read the way the NBD spec defines `base:allocation`: HOLE alone means
"not allocated" (the bytes may be anything, say a backing file's), only ZERO means "reads as zeros".

The source is real nbdkit: the `pattern` plugin (every byte is data, no zeros) behind the
`extentlist` filter, which declares extents the test chooses.  `postcopy receive` drains it, and
the destination must equal the source byte for byte: a HOLE-only extent is copied; a HOLE|ZERO
extent over data that really reads as zeros (the `zero` region of a `data` plugin) is skipped.
"""

from __future__ import annotations

from pathlib import Path

import nbd

from tests.destination.test_receive import running_receive
from tests.peers import running_nbdkit

MiB = 1024 * 1024
SIZE = 8 * MiB


def source_bytes(uri: str) -> bytes:
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        return b"".join(bytes(handle.pread(MiB, offset)) for offset in range(0, SIZE, MiB))
    finally:
        handle.shutdown()


def test_hole_only_extents_are_data_and_copied(tmp_path: Path) -> None:
    extents = tmp_path / "extents"
    # data, 3M "hole" (unallocated: not zero, the pattern's bytes are there), data, 3M "hole"
    extents.write_text("0 1M\n1M 3M hole\n4M 1M\n5M 3M hole\n")
    with running_nbdkit(
        ["--filter=extentlist", "pattern", f"size={SIZE}", f"extentlist={extents}"],
        nbdkit_args=["-r"],
    ) as source:
        expected = source_bytes(source)
        zero_block = bytes(4096)  # the pattern (its offsets): data in every block
        assert all(expected[i:i + 4096] != zero_block for i in range(0, SIZE, 4096))
        with running_receive(source, tmp_path) as receiver:
            record = receiver.wait_complete(60)
            assert receiver.dest.read_bytes() == expected
            assert record["transferred_bytes"] == SIZE
            assert record["hole_bytes_skipped"] == 0


def test_zero_extents_are_skipped_and_read_as_zeros(tmp_path: Path) -> None:
    # the data plugin: bytes at 0..1M and 4M..5M, the rest reads as zeros; the extentlist says
    # HOLE|ZERO for [1M, 4M) and ZERO alone (allocated zeros) for [5M, 8M)
    extents = tmp_path / "extents"
    extents.write_text("0 1M\n1M 3M hole,zero\n4M 1M\n5M 3M zero\n")
    data = "( 0x5a 0xa5 0x3c )*349525 0x11 @4194304 ( 0x77 0x88 )*524288"
    with running_nbdkit(
        ["--filter=extentlist", "data", data, f"size={SIZE}", f"extentlist={extents}"],
        nbdkit_args=["-r"],
    ) as source:
        expected = source_bytes(source)
        assert expected[MiB:4 * MiB] == bytes(3 * MiB) and expected[5 * MiB:] == bytes(3 * MiB)
        with running_receive(source, tmp_path) as receiver:
            record = receiver.wait_complete(60)
            assert receiver.dest.read_bytes() == expected
            assert record["hole_bytes_skipped"] == 6 * MiB
            assert record["transferred_bytes"] == 2 * MiB
