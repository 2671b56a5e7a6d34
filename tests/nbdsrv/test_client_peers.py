"""The NBD client against real servers: nbdkit (memory, sparse-random, file, filters), qemu-nbd,
nbd-server and our own `postcopy serve`.  Reads are compared byte for byte with what the image
holds (or what nbdcopy reads), block status with `nbdinfo --map --json`."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest
import trio

import nbdsrv
from nbdsrv.constants import OptionReply
from nbdsrv.errors import CommandError, ConnectionClosedError, LocalProtocolError
from tests.nbdsrv.client_peers_fixtures import (
    free_tcp_port,
    make_sparse_image,
    merge_extents,
    nbdinfo_map,
    run_nbd_server,
    run_nbdkit,
    run_postcopy_serve,
    run_qemu_nbd,
)

MiB = 1024 * 1024
pytestmark = pytest.mark.timeout(60)

SPARSE_LAYOUT = [(0, 65536), (MiB, 300_000), (5 * MiB, 4096), (7 * MiB + 512, 1000)]


async def _our_map(client: nbdsrv.Client) -> list[tuple[int, int, int]]:
    return merge_extents(
        [(e.offset, e.length, e.flags) async for e in client.iter_extents(0, client.size)]
    )


@pytest.fixture
def sparse_image(tmp_path: Path) -> tuple[Path, bytes]:
    image = tmp_path / "disk.img"
    return image, make_sparse_image(image, 8 * MiB, SPARSE_LAYOUT)


async def test_nbdkit_memory_writes_read_back_and_map_matches_nbdinfo(tmp_path: Path) -> None:
    rng = random.Random(1)
    with run_nbdkit(tmp_path, ["memory", "16M"]) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            assert client.size == 16 * MiB
            assert client.structured_replies and client.has_base_allocation
            assert not client.read_only
            expected = bytearray(client.size)
            for _ in range(20):  # writes of odd sizes at odd offsets, some large
                length = rng.choice([1, 511, 4096, 65537, 3 * MiB + 7])
                offset = rng.randrange(0, client.size - length)
                data = rng.randbytes(length)
                await client.pwrite(data, offset, fua=rng.random() < 0.3)
                expected[offset : offset + length] = data
            await client.flush()
            await client.trim(4 * MiB, MiB)
            expected[4 * MiB : 5 * MiB] = bytes(MiB)
            await client.write_zeroes(8 * MiB + 100, 5000)
            expected[8 * MiB + 100 : 8 * MiB + 5100] = bytes(5000)
            await client.cache(0, MiB)
            assert await client.pread(0, client.size) == expected
            ours = await _our_map(client)
        assert ours == nbdinfo_map(peer.uri)


async def test_nbdkit_sparse_random_reads_match_nbdcopy_and_map_matches(tmp_path: Path) -> None:
    with run_nbdkit(tmp_path, ["sparse-random", "64M", "seed=7"]) as peer:
        reference = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", peer.uri, str(reference)], check=True, timeout=60)
        async with nbdsrv.open_client(peer.uri) as client:
            assert await client.pread(0, client.size) == reference.read_bytes()
            ours = await _our_map(client)
        theirs = nbdinfo_map(peer.uri)
    assert ours == theirs
    assert any(flags == 3 for _, _, flags in ours) and any(flags == 0 for _, _, flags in ours)


async def test_nbdkit_file_reads_and_map(sparse_image: tuple[Path, bytes], tmp_path: Path) -> None:
    image, content = sparse_image
    with run_nbdkit(tmp_path, ["file", str(image)]) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            assert await client.pread(0, client.size) == content
            assert await client.pread(MiB + 17, 100_000) == content[MiB + 17 : MiB + 100_017]
            ours = await _our_map(client)
        assert ours == nbdinfo_map(peer.uri)


async def test_qemu_nbd_hole_chunks_are_zero_filled(
    sparse_image: tuple[Path, bytes], tmp_path: Path
) -> None:
    image, content = sparse_image
    with run_qemu_nbd(tmp_path, image) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            assert client.export_name == "disk"
            buffer = bytearray(b"\xff" * client.size)  # holes must overwrite this with zeroes
            await client.pread_into(buffer, 0)
            assert buffer == content
            assert client.statistics().hole_chunks > 0  # qemu-nbd really answered with holes
            data = os.urandom(12345)
            await client.pwrite(data, 2 * MiB + 1, fua=True)  # into a hole
            assert await client.pread(2 * MiB, 12347) == b"\0" + data + b"\0"
            ours = await _our_map(client)
            one = await client.block_status(MiB, MiB, req_one=True)
            assert len(one) == 1 and one[0].offset == MiB and one[0].flags == 0
        assert ours == nbdinfo_map(peer.uri)


async def test_nbd_server_simple_replies(sparse_image: tuple[Path, bytes], tmp_path: Path) -> None:
    image, content = sparse_image
    with run_nbd_server(tmp_path, image) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            assert not client.structured_replies and not client.has_base_allocation
            assert await client.pread(0, client.size) == content
            # without base:allocation, the whole range is one data extent
            assert await client.block_status(0, client.size) == [nbdsrv.Extent(0, client.size, 0)]
            data = os.urandom(70_000)
            await client.pwrite(data, 3 * MiB + 5, fua=True)
            await client.flush()
            assert await client.pread(3 * MiB, 70_010) == bytes(5) + data + bytes(5)
    assert image.read_bytes()[3 * MiB + 5 : 3 * MiB + 70_005] == data
    with run_nbd_server(tmp_path, image) as peer:  # -d serves one connection: a fresh one
        # nbdinfo agrees there is no allocation map to compare with
        probe = subprocess.run(["nbdinfo", "--map", peer.uri], capture_output=True, timeout=30)
        assert probe.returncode != 0 and b"base:allocation" in probe.stderr


async def test_postcopy_serve_reads_map_and_refuses_writes(
    sparse_image: tuple[Path, bytes], tmp_path: Path
) -> None:
    image, content = sparse_image
    with run_postcopy_serve(tmp_path, image) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            assert client.read_only
            assert await client.pread(0, client.size) == content
            ours = await _our_map(client)
            with pytest.raises(LocalProtocolError):
                await client.pwrite(b"x" * 512, 0)
        assert ours == nbdinfo_map(peer.uri)
    assert ours[0] == (0, 65536, 0)


async def test_postcopy_serve_writable_writes_read_back(
    sparse_image: tuple[Path, bytes], tmp_path: Path
) -> None:
    image, content = sparse_image
    expected = bytearray(content)
    with run_postcopy_serve(tmp_path, image, writable=True) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            assert not client.read_only
            data = os.urandom(3 * 4096)
            await client.pwrite(data, 2 * MiB, fua=True)  # into a hole
            expected[2 * MiB : 2 * MiB + len(data)] = data
            await client.write_zeroes(0, 8192)
            expected[0:8192] = bytes(8192)
            await client.trim(MiB, 65536)
            expected[MiB : MiB + 65536] = bytes(65536)
            await client.flush()
            assert await client.pread(0, client.size) == expected
            ours = await _our_map(client)
        assert ours == nbdinfo_map(peer.uri)
    assert image.read_bytes() == expected


async def test_nbdkit_without_structured_replies(tmp_path: Path) -> None:
    with run_nbdkit(tmp_path, ["pattern", "8M"], ["--no-sr"]) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            assert not client.structured_replies and not client.has_base_allocation
            data = await client.pread(MiB - 8, 64)
    # nbdkit pattern: every 8-byte word holds its own offset, big-endian
    assert data == b"".join((MiB - 8 + i).to_bytes(8, "big") for i in range(0, 64, 8))


async def test_nbdkit_plain_newstyle_uses_export_name(tmp_path: Path) -> None:
    with run_nbdkit(tmp_path, ["pattern", "8M"], ["--mask-handshake=0"]) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            assert client.size == 8 * MiB and not client.structured_replies
            data = await client.pread(4096, 16)
    assert data == (4096).to_bytes(8, "big") + (4104).to_bytes(8, "big")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_tcp_uri_with_port(tmp_path: Path, host: str) -> None:
    port = free_tcp_port(host)
    with run_nbdkit(tmp_path, ["pattern", "1M"], tcp_port=port, tcp_host=host) as peer:
        assert peer.uri.startswith("nbd://127.0.0.1:" if host == "127.0.0.1" else "nbd://[::1]:")
        async with nbdsrv.open_client(peer.uri) as client:
            assert await client.pread(8, 8) == (8).to_bytes(8, "big")


async def test_server_errors_raise_command_error_and_connection_stays_usable(
    tmp_path: Path,
) -> None:
    inject = tmp_path / "inject"
    options = ["--filter=error"]
    args = [
        "memory", "4M",
        "error-pread=EIO", "error-pread-rate=1", f"error-pread-file={inject}",
        "error-pwrite=ENOSPC", "error-pwrite-rate=1", f"error-pwrite-file={inject}",
    ]  # fmt: skip
    for extra in ([], ["--no-sr"]):  # structured error chunks, then simple error replies
        with run_nbdkit(tmp_path, args, [*options, *extra]) as peer:
            async with nbdsrv.open_client(peer.uri) as client:
                await client.pwrite(b"\x42" * 4096, 0)
                inject.touch()
                with pytest.raises(CommandError) as read_error:
                    await client.pread(0, 4096)
                assert read_error.value.errno == errno.EIO
                with pytest.raises(CommandError) as write_error:
                    await client.pwrite(b"\x43" * 100_000, 0)  # its payload was still consumed
                assert write_error.value.errno == errno.ENOSPC
                inject.unlink()
                assert await client.pread(0, 4096) == b"\x42" * 4096
                assert client.statistics().command_errors == 2


@pytest.mark.parametrize("connections", [1, 3])
async def test_server_killed_mid_read_fails_every_pending_request(
    tmp_path: Path, connections: int
) -> None:
    with run_nbdkit(tmp_path, ["memory", "16M", "rdelay=2"], ["--filter=delay"]) as peer:
        async with nbdsrv.open_client(peer.uri, connections=connections) as client:
            assert client.statistics().connections == connections
            failures: list[BaseException] = []

            async def read(offset: int) -> None:
                try:
                    await client.pread(offset, 65536)
                except ConnectionClosedError as exc:
                    failures.append(exc)

            with trio.fail_after(1.5):  # far less than the 2 s the reads would take
                async with trio.open_nursery() as nursery:
                    for i in range(4):
                        nursery.start_soon(read, i * 65536)
                    await trio.sleep(0.3)
                    assert client.statistics().in_flight == 4
                    peer.kill()
            assert len(failures) == 4
            with pytest.raises(ConnectionClosedError):
                await client.pread(0, 512)


async def test_server_killed_while_idle_fails_the_next_request(tmp_path: Path) -> None:
    with run_nbdkit(tmp_path, ["memory", "1M"]) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            await client.pwrite(b"x" * 512, 0)
            peer.kill()
            with trio.fail_after(2), pytest.raises(ConnectionClosedError):
                await client.pread(0, 512)


async def test_cancelled_read_does_not_desync_or_touch_the_buffer(tmp_path: Path) -> None:
    with run_nbdkit(tmp_path, ["pattern", "16M", "rdelay=500ms"], ["--filter=delay"]) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            abandoned = bytearray(b"\xee" * 65536)
            with trio.move_on_after(0.1) as scope:
                await client.pread_into(abandoned, MiB)
            assert scope.cancelled_caught
            # the next reads on the same connection get their own data, not the abandoned reply
            first, second = await client.pread(2 * MiB, 16), await client.pread(3 * MiB, 8)
            assert first == (2 * MiB).to_bytes(8, "big") + (2 * MiB + 8).to_bytes(8, "big")
            assert second == (3 * MiB).to_bytes(8, "big")
            assert abandoned == b"\xee" * 65536


async def test_many_concurrent_reads_and_a_pool_of_connections(tmp_path: Path) -> None:
    with run_nbdkit(tmp_path, ["memory", "32M"]) as peer:
        async with nbdsrv.open_client(peer.uri, connections=4) as client:
            assert client.can_multi_conn and client.statistics().connections == 4
            content = os.urandom(client.size)
            await client.pwrite(content, 0)  # 32 MiB: split across the pool
            await client.flush()
            results: dict[int, bytes] = {}

            async def read(offset: int, length: int) -> None:
                results[offset] = await client.pread(offset, length)

            rng = random.Random(3)
            spans = [(rng.randrange(0, client.size - 200_000), rng.randrange(1, 200_000))
                     for _ in range(200)]  # fmt: skip
            async with trio.open_nursery() as nursery:
                for offset, length in spans:
                    nursery.start_soon(read, offset, length)
            for offset, length in spans:
                assert results[offset] == content[offset : offset + length]


async def test_reads_larger_than_max_payload_are_split(tmp_path: Path) -> None:
    options = ["--filter=blocksize-policy"]
    args = ["pattern", "8M", "blocksize-maximum=65536", "blocksize-error-policy=error"]
    with run_nbdkit(tmp_path, args, options) as peer:
        async with nbdsrv.open_client(peer.uri) as client:
            assert client.block_size[2] == 65536
            data = await client.pread(4096, MiB)
            assert client.statistics().requests == 16
    assert data == b"".join(i.to_bytes(8, "big") for i in range(4096, 4096 + MiB, 8))


async def test_missing_export_is_a_negotiation_error(tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    image.write_bytes(bytes(4096))
    with (
        run_qemu_nbd(tmp_path, image, export="disk") as peer,
        pytest.raises(nbdsrv.NegotiationError) as refused,
    ):
        async with nbdsrv.open_client(peer.uri, export_name="nope"):
            pass  # pragma: no cover
    assert refused.value.reply_type == OptionReply.ERR_UNKNOWN
