"""`postcopy serve` against real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-io, fio, libnbd,
and hostile raw-socket clients.  The server runs as a subprocess (tests/peers.py)."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from nbdsrv import constants as k
from nbdsrv import wire
from tests.peers import (
    RunningServe,
    file_extents,
    files_identical,
    recv_exact,
    require_tools,
    running_serve,
    sparse_test_image,
)

IMAGE_SIZE = 256 * 1024 * 1024
TOOLS = ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "fio", "cmp")


@pytest.fixture(scope="module")
def sparse_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools(*TOOLS)
    path = tmp_path_factory.mktemp("image") / "source.img"
    sparse_test_image(path, IMAGE_SIZE, seed=2)
    return path


@pytest.fixture(scope="module")
def served(sparse_image: Path) -> Iterator[RunningServe]:
    with running_serve(sparse_image, f"second={sparse_image}") as serve:
        yield serve


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True)


def connect(uri: str, *, strict: bool = True) -> nbd.NBD:
    handle = nbd.NBD()
    if not strict:
        handle.set_strict_mode(0)
    handle.add_meta_context(k.BASE_ALLOCATION)
    handle.connect_uri(uri)
    return handle


def errno_of(error: nbd.Error) -> int:
    """The numeric errno of a libnbd error (its `errno` attribute is the symbolic name)."""
    return int(error.args[1])


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        probe = bytearray(1)
        with pytest.raises(BlockingIOError):  # the first page is really gone
            os.preadv(fd, [probe], 0, os.RWF_NOWAIT)
    finally:
        os.close(fd)


# -- read-only acceptance --------------------------------------------------------------------


def test_nbdinfo_json_shows_size_read_only_and_base_allocation(served: RunningServe) -> None:
    info = json.loads(run("nbdinfo", "--json", served.uri).stdout)
    export = info["exports"][0]
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is True
    assert "base:allocation" in export["contexts"]
    assert info["structured"] is True
    assert export["can_multi_conn"] is True


def test_nbdinfo_map_reports_the_files_data_and_holes(
    served: RunningServe, sparse_image: Path
) -> None:
    reported = [
        (int(entry["offset"]), int(entry["length"]), entry["type"] == 0)
        for entry in json.loads(run("nbdinfo", "--map", "--json", served.uri).stdout)
    ]
    assert reported == file_extents(sparse_image)
    assert any(is_data for *_, is_data in reported) and any(not d for *_, d in reported)


def test_nbdinfo_lists_named_exports(served: RunningServe) -> None:
    listing = json.loads(run("nbdinfo", "--list", "--json", served.uri).stdout)
    assert sorted(e["export-name"] for e in listing["exports"]) == ["", "second"]


def test_nbdcopy_copy_is_byte_identical(
    served: RunningServe, sparse_image: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.img"
    run("nbdcopy", served.export_uri("second"), str(copy))
    assert os.path.getsize(copy) == IMAGE_SIZE
    assert files_identical(sparse_image, copy)


def test_qemu_img_convert_copy_is_byte_identical(
    served: RunningServe, sparse_image: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "convert.img"
    drop_from_page_cache(sparse_image)  # exercise the cold path: reads in worker threads
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, str(copy))
    assert files_identical(sparse_image, copy)
    # holes were sent as holes: the copy is about as sparse as the source
    assert os.stat(copy).st_blocks <= os.stat(sparse_image).st_blocks * 1.05 + 2048


def test_qemu_img_map_agrees_with_file_allocation(
    served: RunningServe, sparse_image: Path
) -> None:
    mapped = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", served.uri).stdout)
    runs: list[tuple[int, int, bool]] = []
    for entry in mapped:
        is_data = bool(entry["data"])
        if runs and runs[-1][2] == is_data and runs[-1][0] + runs[-1][1] == entry["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + entry["length"], is_data)
        else:
            runs.append((entry["start"], entry["length"], is_data))
    assert runs == file_extents(sparse_image)


def test_read_only_export_refuses_writes_with_eperm(served: RunningServe) -> None:
    handle = connect(served.uri, strict=False)
    try:
        with pytest.raises(nbd.Error) as caught:
            handle.pwrite(b"x" * 512, 0)
        assert errno_of(caught.value) == errno.EPERM
        with pytest.raises(nbd.Error) as caught:
            handle.trim(512, 0)
        assert errno_of(caught.value) == errno.EPERM
        assert len(handle.pread(512, 0)) == 512  # still usable
    finally:
        handle.shutdown()


def test_invalid_requests_get_the_specs_errors_and_the_connection_survives(
    served: RunningServe, sparse_image: Path
) -> None:
    expected = sparse_image.read_bytes()[4096:8192]
    handle = connect(served.uri, strict=False)
    cases = [
        ("zero-length read", lambda: handle.pread(0, 0), errno.EINVAL),
        ("read past the end", lambda: handle.pread(4096, IMAGE_SIZE - 512), errno.EINVAL),
        ("read at the end", lambda: handle.pread(512, IMAGE_SIZE), errno.EINVAL),
        ("unaligned offset", lambda: handle.pread(512, 1), errno.EINVAL),
        ("unaligned length", lambda: handle.pread(100, 0), errno.EINVAL),
        ("oversized read", lambda: handle.pread(33 * 1024 * 1024, 0), errno.EINVAL),
        ("flush not offered", lambda: handle.flush(), errno.EINVAL),
        ("unknown flag", lambda: handle.pread(512, 0, flags=1 << 7), errno.EINVAL),
        ("block status past the end",
         lambda: handle.block_status(4096, IMAGE_SIZE, lambda *a: 0), errno.EINVAL),
    ]
    try:
        for label, call, wanted in cases:
            with pytest.raises(nbd.Error) as caught:
                call()
            assert errno_of(caught.value) == wanted, label
            assert handle.pread(4096, 4096) == expected, f"unusable after {label}"
    finally:
        handle.shutdown()


def test_block_status_req_one_gives_exactly_one_extent(served: RunningServe) -> None:
    handle = connect(served.uri)
    seen: list[list[int]] = []

    def callback(context: str, offset: int, entries: list[int], error: int) -> int:
        seen.append(list(entries))
        return 0

    try:
        handle.block_status(IMAGE_SIZE, 0, callback, flags=nbd.CMD_FLAG_REQ_ONE)
        assert len(seen) == 1 and len(seen[0]) == 2
        seen.clear()
        handle.block_status(IMAGE_SIZE, 0, callback)
        assert len(seen[0]) > 2
    finally:
        handle.shutdown()


def test_reads_over_simple_replies_and_with_df_return_the_right_bytes(
    served: RunningServe, sparse_image: Path
) -> None:
    image = sparse_image.read_bytes()
    runs = file_extents(sparse_image)
    boundary = next(offset for offset, _, is_data in runs[1:] if not is_data)  # data -> hole
    start, length = boundary - 65536, 131072  # half data, half hole
    simple = nbd.NBD()
    simple.set_request_structured_replies(False)
    simple.connect_uri(served.uri)
    structured = connect(served.uri)
    try:
        assert not simple.get_structured_replies_negotiated()
        assert simple.pread(length, start) == image[start : start + length]
        with pytest.raises(nbd.Error) as caught:
            simple.pread(4096, IMAGE_SIZE)
        assert errno_of(caught.value) == errno.EINVAL
        assert simple.pread(512, 0) == image[:512]
        assert structured.can_df()
        chunks: list[tuple[int, int, int]] = []

        def chunk(data: bytes, offset: int, status: int, error: list[int]) -> int:
            chunks.append((offset, len(data), status))
            return 0

        got = structured.pread_structured(length, start, chunk, flags=nbd.CMD_FLAG_DF)
        assert got == image[start : start + length]
        assert chunks == [(start, length, nbd.READ_DATA)]  # one chunk, zeroes included
        chunks.clear()
        structured.pread_structured(length, start, chunk)
        assert sorted(chunks) == [
            (start, 65536, nbd.READ_DATA), (boundary, 65536, nbd.READ_HOLE)
        ]
    finally:
        simple.shutdown()
        structured.shutdown()


def test_unknown_export_is_refused(served: RunningServe) -> None:
    handle = nbd.NBD()
    handle.set_export_name("nosuch")
    uri = served.uri
    with pytest.raises(nbd.Error):
        handle.connect_unix(uri.split("socket=", 1)[1])


# -- raw clients -------------------------------------------------------------------------------


def raw_connect(path: str, *, structured: bool = False) -> socket.socket:
    """Handshake by hand (EXPORT_NAME of ""), leaving the socket in transmission."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    recv_exact(sock, wire.SERVER_GREETING_SIZE)
    sock.sendall(wire.build_client_flags(k.ClientFlag.FIXED_NEWSTYLE | k.ClientFlag.NO_ZEROES))
    if structured:
        sock.sendall(wire.build_option(k.Option.STRUCTURED_REPLY))
        header = wire.parse_option_reply_header(recv_exact(sock, wire.OPTION_REPLY_HEADER_SIZE))
        assert header.reply_type == k.OptionReply.ACK
    sock.sendall(wire.build_option(k.Option.EXPORT_NAME, b""))
    recv_exact(sock, wire.EXPORT_NAME_REPLY_SIZE)
    return sock


def request(command: int, offset: int, length: int, cookie: int = 7, flags: int = 0) -> bytes:
    return wire.build_request_header(wire.Request(flags, command, cookie, offset, length))


def socket_path(serve: RunningServe) -> str:
    assert serve.socket_path is not None
    return serve.socket_path


def assert_still_serving(serve: RunningServe, image: Path) -> None:
    handle = connect(serve.uri)
    try:
        assert handle.pread(65536, 0) == image.read_bytes()[:65536]
    finally:
        handle.shutdown()


def test_unknown_command_gets_einval_and_connection_stays_usable(
    served: RunningServe, sparse_image: Path
) -> None:
    with raw_connect(socket_path(served)) as sock:
        sock.sendall(request(99, 0, 512, cookie=41))
        reply = wire.parse_simple_reply(recv_exact(sock, wire.SIMPLE_REPLY_SIZE))
        assert (reply.cookie, reply.error) == (41, errno.EINVAL)
        sock.sendall(request(k.Command.READ, 0, 512, cookie=42))
        reply = wire.parse_simple_reply(recv_exact(sock, wire.SIMPLE_REPLY_SIZE))
        assert (reply.cookie, reply.error) == (42, 0)
        assert recv_exact(sock, 512) == sparse_image.read_bytes()[:512]


def test_hostile_clients_lose_only_their_connection(
    served: RunningServe, sparse_image: Path
) -> None:
    path = socket_path(served)
    # wrong magic
    with raw_connect(path) as sock:
        sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))
        assert sock.recv(1) == b""  # closed by the server
    # truncated frame, then the client vanishes
    with raw_connect(path) as sock:
        sock.sendall(request(k.Command.READ, 0, 512)[:13])
    # a write of 4 GiB - 1 announced on a read-only export: one error, then the server closes
    with raw_connect(path) as sock:
        sock.sendall(request(k.Command.WRITE, 0, 0xFFFFFFFF, cookie=5) + b"x" * 1000)
        reply = wire.parse_simple_reply(recv_exact(sock, wire.SIMPLE_REPLY_SIZE))
        assert reply.cookie == 5 and reply.error != 0
        assert sock.recv(1) == b""
    # vanishing mid-request: half a write payload
    with raw_connect(path) as sock:
        sock.sendall(request(k.Command.WRITE, 0, 65536) + b"y" * 1000)
    # garbage instead of client flags
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        recv_exact(sock, wire.SERVER_GREETING_SIZE)
        sock.sendall(b"\xff" * 64)
        assert sock.recv(1) == b""
    assert_still_serving(served, sparse_image)
    deadline = time.monotonic() + 5
    while "bad request magic" not in served.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = served.log()
    assert log.count("bad request magic") == 1
    assert "unknown client flags" in log
    assert served.process.poll() is None


def test_refused_write_payload_is_consumed_to_stay_in_sync(
    served: RunningServe, sparse_image: Path
) -> None:
    with raw_connect(socket_path(served), structured=True) as sock:
        # a payload that looks like a request header must not be parsed as one
        payload = request(k.Command.DISC, 0, 0) * (4096 // 28) + bytes(4096 % 28)
        sock.sendall(request(k.Command.WRITE, 0, 4096, cookie=1) + payload)
        sock.sendall(request(k.Command.READ, 4096, 512, cookie=2))
        errors, data = {}, {}
        for _ in range(2):
            header = wire.parse_structured_reply_header(
                recv_exact(sock, wire.STRUCTURED_REPLY_HEADER_SIZE)
            )
            body = recv_exact(sock, header.length)
            if header.reply_type == k.ReplyType.ERROR:
                errors[header.cookie] = struct.unpack(">I", body[:4])[0]
            else:
                assert header.reply_type == k.ReplyType.OFFSET_DATA
                data[header.cookie] = body[8:]
        assert errors == {1: errno.EPERM}
        assert data == {2: sparse_image.read_bytes()[4096:4608]}


def test_garbage_client_does_not_disturb_an_nbdcopy(
    served: RunningServe, sparse_image: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.img"
    process = subprocess.Popen(["nbdcopy", served.uri, str(copy)])
    try:
        for round_number in range(20):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(socket_path(served))
                sock.sendall(os.urandom(4096 + round_number))
                try:
                    while sock.recv(65536):
                        pass
                except OSError:
                    pass
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert files_identical(sparse_image, copy)


# -- writable ---------------------------------------------------------------------------------


@pytest.fixture
def writable_image(tmp_path: Path) -> Path:
    path = tmp_path / "rw.img"
    sparse_test_image(path, 64 * 1024 * 1024, seed=3)
    return path


def test_qemu_io_write_read_zero_discard_flush(writable_image: Path) -> None:
    with running_serve(writable_image, writable=True) as serve:
        commands = [
            "write -P 0xab 0 1M",
            "write -P 0xcd -f 1M 64k",  # -f: FUA
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 64k",
            "write -z 2M 1M",
            "read -P 0 2M 1M",
            "discard 4M 1M",
            "read -P 0 4M 1M",
            "flush",
        ]
        args = ["qemu-io", "-f", "raw"]
        for command in commands:
            args += ["-c", command]
        result = run(*args, serve.uri)
        assert "Pattern verification failed" not in result.stdout + result.stderr
        assert result.stdout.count("read ") >= 4
    data = writable_image.read_bytes()
    assert data[: 1 << 20] == b"\xab" * (1 << 20)
    assert data[1 << 20 : (1 << 20) + 65536] == b"\xcd" * 65536
    assert data[2 << 20 : 3 << 20] == bytes(1 << 20)
    assert data[4 << 20 : 5 << 20] == bytes(1 << 20)
    # zero (without NO_HOLE) and discard punched holes
    holes = [(o, n) for o, n, is_data in file_extents(writable_image) if not is_data]
    assert any(o <= 4 << 20 and o + n >= 5 << 20 for o, n in holes)


def test_fio_random_writes_verify_at_iodepth_16(writable_image: Path) -> None:
    with running_serve(writable_image, writable=True) as serve:
        result = subprocess.run(
            [
                "fio", "--name=verify", "--ioengine=nbd", f"--uri={serve.uri}",
                "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                "--verify_state_save=0", "--output-format=json",
            ],
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("{"):])
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] == 4096
    assert job["read"]["total_ios"] == 4096  # the verify pass read everything back
    assert "verify" not in result.stderr.lower()


def test_writable_export_handles_out_of_range_and_flags(writable_image: Path) -> None:
    size = os.path.getsize(writable_image)
    with running_serve(writable_image, writable=True) as serve:
        handle = connect(serve.uri, strict=False)
        try:
            with pytest.raises(nbd.Error) as caught:
                handle.pwrite(b"z" * 4096, size - 512)
            assert errno_of(caught.value) == errno.ENOSPC
            with pytest.raises(nbd.Error) as caught:
                handle.zero(4096, size)
            assert errno_of(caught.value) == errno.ENOSPC
            with pytest.raises(nbd.Error) as caught:
                handle.trim(4096, size)
            assert errno_of(caught.value) == errno.EINVAL
            with pytest.raises(nbd.Error) as caught:
                handle.pwrite(b"", 0)
            assert errno_of(caught.value) == errno.EINVAL
            handle.pwrite(b"q" * 4096, 8192, flags=nbd.CMD_FLAG_FUA)
            handle.zero(4096, 16384, flags=nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
            handle.flush()
            assert handle.pread(4096, 8192) == b"q" * 4096
            assert handle.pread(4096, 16384) == bytes(4096)
        finally:
            handle.shutdown()
