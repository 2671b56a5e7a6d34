"""The C fast path: `plugin/fastpath.c`, in front of the python plugin, serves PRESENT chunks.

Units check the engine's live map (`BlockMap.open(..., live_mirror=True)`): the bytes live in a
shared mapping of `live.map`, which another reader of the file sees change, and which is rebuilt
from the snapshot and journal at every open.  End to end, `postcopy receive` (with the filter `make`
built) serves a slowly drained disk: a chunk the live map shows missing is read through NBD and
returns the source's bytes (the filter hands it to the plugin: a miss), then reads of present
chunks return the source's bytes and are counted as the filter's hits (its stats file, written
when nbdkit exits).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import nbd
import pytest

from postcopy.destination import receive
from postcopy.destination.blockmap import LIVE_MAP_FILENAME, PRESENT, BlockMap, MapIdentity
from postcopy.destination.settings import DestinationSettings
from tests.destination.test_receive import connect, read_range, running_receive
from tests.peers import running_serve, sparse_test_image

MiB = 1024 * 1024
CHUNK = 64 * 1024


def identity(disk_size: int = 64 * CHUNK) -> MapIdentity:
    return MapIdentity(disk_size, CHUNK, disk_size, "", "nbd://source")


def test_live_map_is_shared_and_rebuilt_from_the_journal_at_open(tmp_path: Path) -> None:
    block_map = BlockMap.open(tmp_path, identity(), live_mirror=True)
    live_path = tmp_path / LIVE_MAP_FILENAME
    assert live_path.read_bytes() == bytes(64)
    block_map.mark_present(3, 7)
    block_map.mark_present(10, 11, guest_written=True)
    # another reader of the file (the filter maps it) sees the marks at once
    live = live_path.read_bytes()
    assert [i for i in range(64) if live[i] & PRESENT] == [3, 4, 5, 6, 10]
    assert block_map.all_present(3, 7) and not block_map.all_present(2, 7)
    assert list(block_map.missing_ranges()) == [(0, 3), (7, 10), (11, 64)]
    assert block_map.run_from(3) == (7, True, False)
    assert block_map.present_count == 5 and block_map.guest_written_count == 1
    block_map.make_durable(lambda: None)
    block_map.mark_present(20, 22)
    block_map.make_durable(lambda: None, compact=True)  # a snapshot from the mapped bytes
    block_map.mark_present(30, 31)
    block_map.make_durable(lambda: None)
    block_map.close()
    old_inode = live_path.stat().st_ino
    live_path.write_bytes(b"\x01" * 64)  # not durable state: never read back
    again = BlockMap.open(tmp_path, identity(), live_mirror=True)
    live = live_path.read_bytes()
    expected = [3, 4, 5, 6, 10, 20, 21, 30]
    assert [i for i in range(64) if live[i] & PRESENT] == expected
    assert [i for i in range(64) if again.is_present(i)] == expected
    assert again.present_count == 8 and again.is_guest_written(10)
    assert live_path.stat().st_ino != old_inode
    again.close()
    # without live_mirror (status, receive's checks) the file is left alone
    BlockMap.open(tmp_path, identity()).close()
    assert live_path.read_bytes() == live


def test_live_map_replaces_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    state = tmp_path / "state"
    state.mkdir()
    (state / LIVE_MAP_FILENAME).symlink_to(victim)
    block_map = BlockMap.open(state, identity(), live_mirror=True)
    block_map.mark_present(0, 1)
    block_map.close()
    assert victim.read_bytes() == b"keep"
    assert not (state / LIVE_MAP_FILENAME).is_symlink()


def test_receive_without_the_built_filter_runs_the_plugin_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = DestinationSettings(
        source="nbd://x/", dest=tmp_path / "d.img", state_dir=tmp_path, socket=tmp_path / "s.sock"
    )
    built = receive.fastpath_filter_path()
    assert built is not None, "make did not build the fast path filter"
    with_filter = receive.nbdkit_command(config)
    assert f"--filter={built}" in with_filter
    assert f"fastpath-map={tmp_path / LIVE_MAP_FILENAME}" in with_filter
    assert "fastpath-shift=16" in with_filter
    monkeypatch.setattr(receive, "fastpath_filter_path", lambda: None)
    alone = receive.nbdkit_command(config)
    assert not [arg for arg in alone if "filter" in arg or arg.startswith("fastpath")]
    assert "is not built" in capsys.readouterr().err


def stats(state_dir: Path) -> dict[str, int]:
    words = (state_dir / receive.FASTPATH_STATS_FILENAME).read_text().split()
    return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}


def test_present_reads_are_served_by_the_filter_and_misses_by_the_engine(tmp_path: Path) -> None:
    size = 16 * MiB
    image = tmp_path / "source.img"
    sparse_test_image(image, size, seed=11, data_fraction=1.0)
    live_path = tmp_path / "state" / LIVE_MAP_FILENAME
    # 256 KiB/s: the drain leaves most of the disk missing for the whole test
    with running_serve(f"disk={image}") as serve, running_receive(
        serve.export_uri("disk"), tmp_path, "--bandwidth", "256K"
    ) as receiver:
        handle: nbd.NBD = connect(receiver.uri)
        live = live_path.read_bytes()
        assert len(live) == size // CHUNK
        missing = max(i for i in range(len(live)) if not live[i] & PRESENT)
        # a miss: the filter hands it to the engine, which fetches the source's bytes
        offset = missing * CHUNK + 4096
        assert handle.pread(8192, offset) == read_range(image, offset, 8192)
        assert live_path.read_bytes()[missing] & PRESENT
        # hits: present data, 4 KiB reads all over the fetched chunk
        reads = 0
        for _repeat in range(20):
            for block in range(CHUNK // 4096):
                offset = missing * CHUNK + block * 4096
                assert handle.pread(4096, offset) == read_range(image, offset, 4096)
                reads += 1
        handle.shutdown()
        receiver.process.send_signal(signal.SIGTERM)
        try:
            assert receiver.process.wait(15) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"receive did not stop: {receiver.log()}") from None
    counts = stats(receiver.state_dir)
    assert counts["hits"] >= reads, counts
    assert counts["misses"] >= 1, counts
    # the dest file holds the source's bytes for the fetched chunk
    assert read_range(receiver.dest, missing * CHUNK, CHUNK) == read_range(
        image, missing * CHUNK, CHUNK
    )
