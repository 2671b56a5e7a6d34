"""`postcopy receive` end to end: our server as the source, nbdkit + the plugin as the destination,
real clients (fio, libnbd, qemu-img, nbdinfo) as the guest.

Each test starts `postcopy serve` on a sparse random image and `postcopy receive` towards it, and
checks bytes: the guest's own (fio verify, libnbd read-back), the source's for every region the
guest did not write, the local file's allocation, and the status record.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
import pytest

from postcopy.destination.blockmap import BlockMap, MapIdentity
from postcopy.kit.processes import status_record, wait_for_status
from tests.peers import require_tools, running_receive_command, running_serve, sparse_test_image

MiB = 1024 * 1024
CHUNK = 64 * 1024


@dataclass
class Receiver:
    process: subprocess.Popen[bytes]
    uri: str
    state_dir: Path
    dest: Path
    log_path: Path

    def status(self) -> dict[str, Any]:
        return status_record(self.state_dir)

    def wait_status(self, condition: Any, timeout: float = 30.0) -> dict[str, Any]:
        return wait_for_status(
            self.process, self.state_dir, condition, timeout, describe=lambda: f"log {self.log()}"
        )

    def wait_complete(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_status(lambda r: r["state"] == "complete", timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def receive_command(source: str, dest: Path, state_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "postcopy.cli", "receive", "--source", source, "--dest", str(dest),
        "--state-dir", str(state_dir), *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def running_receive(
    source: str, workdir: Path, *extra: str, name: str = "dest", listen: str | None = None
) -> Iterator[Receiver]:
    dest, state_dir, socket_path = workdir / f"{name}.img", workdir / "state", workdir / "d.sock"
    log_path = workdir / f"receive-{time.monotonic_ns()}.log"
    where = ["--listen", listen] if listen else ["--socket", str(socket_path)]
    command = receive_command(source, dest, state_dir, *where, *extra)
    started = running_receive_command(command, log_path, expect=("nbd+unix://", "nbd://"))
    with started as (process, uri):
        yield Receiver(process, uri, state_dir, dest, log_path)


def connect(uri: str) -> nbd.NBD:
    handle = nbd.NBD()
    handle.connect_uri(uri)
    return handle


def seconds_until_eio(handle: nbd.NBD, length: int, offset: int) -> float:
    """Read through `handle`, which must fail with EIO (libnbd names the errno); returns how
    many seconds the failing read took."""
    started = time.monotonic()
    try:
        handle.pread(length, offset)
    except nbd.Error as exc:
        assert exc.errno == errno.errorcode[errno.EIO], exc
        return time.monotonic() - started
    raise AssertionError(f"a read of {length} bytes at {offset} succeeded; EIO was expected")


def read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def assert_equal_outside(dest: Path, source: Path, skip: list[tuple[int, int]]) -> None:
    """Every byte of `dest` outside the `skip` ranges equals `source` (compared in 4 MiB steps)."""
    size = source.stat().st_size
    assert dest.stat().st_size == size
    ranges: list[tuple[int, int]] = []
    position = 0
    for start, length in sorted(skip):
        if start > position:
            ranges.append((position, start - position))
        position = max(position, start + length)
    if position < size:
        ranges.append((position, size - position))
    with open(dest, "rb") as d, open(source, "rb") as s:
        for start, length in ranges:
            done = 0
            while done < length:
                step = min(4 * MiB, length - done)
                d.seek(start + done)
                s.seek(start + done)
                assert d.read(step) == s.read(step), f"differs in [{start + done}, +{step})"
                done += step


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def source_image(tmp_path: Path) -> tuple[Path, int]:
    image = tmp_path / "source.img"
    runs = sparse_test_image(image, 256 * MiB, seed=4, data_fraction=0.5)
    return image, sum(length for _, length in runs)


def test_fio_randrw_verifies_while_draining_and_untouched_regions_match(
    tmp_path: Path, source_image: tuple[Path, int]
) -> None:
    require_tools("fio", "qemu-img", "nbdinfo")
    image, data_bytes = source_image
    fio_offset, fio_size = 96 * MiB, 24 * MiB
    # a little source latency keeps the drain going for a few seconds, as over a real link
    with running_serve(f"disk={image}", read_delay=0.03) as serve, running_receive(
        serve.export_uri("disk"), tmp_path
    ) as receiver:
        fio = subprocess.Popen(
            [
                "fio", "--name=guest", "--ioengine=nbd", f"--uri={receiver.uri}",
                "--rw=randrw", "--bs=4k", "--iodepth=8", f"--offset={fio_offset}",
                f"--size={fio_size}", "--verify=crc32c", "--verify_fatal=1",
                "--do_verify=1", "--verify_state_save=0", "--randrepeat=0", "--output-format=json",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        # reads of untouched regions during the drain return the source's bytes
        handle = connect(receiver.uri)
        rng = random.Random(7)
        during_drain = 0
        for _ in range(32):
            offset = rng.randrange(0, 256 * MiB - 8192) & ~511
            if fio_offset - 8192 < offset < fio_offset + fio_size:
                continue
            draining = receiver.status().get("present_bytes", 0) < 256 * MiB
            assert handle.pread(8192, offset) == read_range(image, offset, 8192)
            during_drain += draining
        handle.shutdown()
        out, err = fio.communicate(timeout=60)
        assert fio.returncode == 0, err.decode()[-2000:]
        job = json.loads(out[out.index(b"{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
        record = receiver.wait_complete()
        assert during_drain > 0  # the checks above really ran while the drain was going on
        assert record["present_bytes"] == record["size_bytes"] == 256 * MiB
        assert record["transferred_bytes"] <= data_bytes + 8 * MiB
        # the source is no longer needed: stop it, the disk is still served from the local file
        serve.process.terminate()
        serve.process.wait(10)
        handle = connect(receiver.uri)
        assert handle.pread(CHUNK, 0) == read_range(image, 0, CHUNK)
        handle.shutdown()
    assert_equal_outside(receiver.dest, image, [(fio_offset, fio_size)])
    assert allocated_bytes(receiver.dest) <= data_bytes + fio_size + 4 * MiB
    assert allocated_bytes(receiver.dest) >= data_bytes - fio_size
    # a complete disk is served again without its source
    with running_receive(serve.export_uri("disk"), tmp_path) as again:
        assert again.wait_complete()["transferred_bytes"] == 0
        handle = connect(again.uri)
        assert handle.pread(CHUNK, 0) == read_range(image, 0, CHUNK)
        handle.shutdown()


def test_guest_writes_during_slow_drain_are_never_lost(tmp_path: Path) -> None:
    image = tmp_path / "source.img"
    sparse_test_image(image, 64 * MiB, seed=5, data_fraction=1.0)
    rng = random.Random(9)
    writes: dict[int, bytes] = {}
    with running_serve(f"disk={image}", read_delay=0.1) as serve, running_receive(
        serve.export_uri("disk"), tmp_path
    ) as receiver:
        handle = connect(receiver.uri)
        receiver.wait_status(lambda r: r["drain_bytes"] > 0)  # from now on 4 fetches in flight
        # whole chunks (they never wait), then partial chunks (they wait for their chunk's
        # fetch), all over the disk: the drain has 4 x 1 MiB requests in flight at any time,
        # each held 0.1 s by the source, so some of these land on chunks being fetched
        for chunk in [*range(1, 1024, 10), *range(0, 1024, 128)]:
            offset = chunk * CHUNK + (0 if chunk % 2 else 1000)
            length = CHUNK if chunk % 2 else 3000
            data = rng.randbytes(length)
            handle.pwrite(data, offset)
            writes[offset] = data
        handle.flush()
        record = receiver.wait_complete(timeout=60)
        for offset, data in writes.items():
            assert handle.pread(len(data), offset) == data
        handle.shutdown()
        assert record["discarded_fetch_bytes"] > 0, json.dumps(record)  # writes won races
    assert_equal_outside(
        receiver.dest, image, [(offset, len(data)) for offset, data in writes.items()]
    )
    for offset, data in writes.items():
        assert read_range(receiver.dest, offset, len(data)) == data


def test_kill9_then_receive_again_transfers_only_what_was_missing(
    tmp_path: Path, source_image: tuple[Path, int]
) -> None:
    image, data_bytes = source_image
    with running_serve(f"disk={image}", read_delay=0.02) as serve:
        uri = serve.export_uri("disk")
        identity = MapIdentity(256 * MiB, CHUNK, 256 * MiB, "", uri)
        with running_receive(uri, tmp_path) as receiver:
            handle = connect(receiver.uri)
            handle.pwrite(b"W" * CHUNK, 200 * MiB)
            handle.flush()
            handle.shutdown()
            first = receiver.wait_status(
                lambda r: 0.3 * data_bytes < r["transferred_bytes"] < 0.8 * data_bytes
            )
            os.kill(first["pid"], signal.SIGKILL)  # nbdkit, halfway through the drain
            receiver.process.wait(15)
            assert receiver.process.returncode != 0
        on_disk = BlockMap.open(tmp_path / "state", identity)
        persisted_present = on_disk.present_bytes
        on_disk.close()
        assert 0 < persisted_present < 256 * MiB
        with running_receive(uri, tmp_path) as again:
            record = again.wait_complete(timeout=60)
            handle = connect(again.uri)
            assert handle.pread(CHUNK, 200 * MiB) == b"W" * CHUNK
            handle.shutdown()
    # only the chunks missing from the persisted map were transferred again
    assert record["transferred_bytes"] <= 256 * MiB - persisted_present
    assert record["transferred_bytes"] < data_bytes
    assert_equal_outside(again.dest, image, [(200 * MiB, CHUNK)])


def test_wait_for_source_passes_through_until_source_frozen(
    tmp_path: Path, source_image: tuple[Path, int]
) -> None:
    require_tools("qemu-io")
    image, _ = source_image
    with running_serve(f"disk={image}") as serve, running_receive(
        serve.export_uri("disk"), tmp_path, "--wait-for-source"
    ) as receiver:
        first_data = next(iter(data_runs_of(image)))
        expected = read_range(image, first_data, 4096)
        pattern_check = subprocess.run(
            ["qemu-io", "-r", "-f", "raw", receiver.uri, "-c", f"read -v {first_data} 4096"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert pattern_check.returncode == 0, pattern_check.stderr
        assert hexdump_bytes(pattern_check.stdout) == expected
        handle = connect(receiver.uri)
        for offset in (0, 100 * MiB + 12345, 255 * MiB):
            assert handle.pread(4096, offset) == read_range(image, offset, 4096)
        record = receiver.wait_status(lambda r: r["passthrough_reads"] >= 4)
        assert record["state"] == "waiting-for-source"
        time.sleep(0.3)
        record = receiver.status()
        assert record["present_bytes"] == 0 and record["drain_bytes"] == 0
        assert allocated_bytes(receiver.dest) == 0
        assert read_range(receiver.dest, first_data, 4096) == bytes(4096)
        subprocess.run(
            [sys.executable, "-m", "postcopy.cli", "source-frozen", "--state-dir",
             str(receiver.state_dir)], check=True, timeout=30,
        )  # fmt: skip
        receiver.wait_complete()
        assert handle.pread(4096, first_data) == expected
        handle.shutdown()
    assert_equal_outside(receiver.dest, image, [])


def data_runs_of(image: Path) -> Iterator[int]:
    fd = os.open(image, os.O_RDONLY)
    try:
        yield os.lseek(fd, 0, os.SEEK_DATA)
    finally:
        os.close(fd)


def hexdump_bytes(qemu_io_output: str) -> bytes:
    """The bytes of `qemu-io read -v` output (lines `00000000:  xx xx ...  text`)."""
    data = bytearray()
    for line in qemu_io_output.splitlines():
        head, sep, rest = line.partition(":  ")
        if not sep or not all(c in "0123456789abcdef" for c in head):
            continue
        data += bytes.fromhex(rest[:48])
    return bytes(data)


def run_receive_expecting_error(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "postcopy.cli", "receive", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_receive_refuses_bad_starts_with_one_line_errors(
    tmp_path: Path, source_image: tuple[Path, int]
) -> None:
    image, _ = source_image
    with running_serve(f"disk={image}") as serve:
        uri = serve.export_uri("disk")
        with running_receive(uri, tmp_path) as receiver:
            receiver.wait_status(lambda r: r["present_bytes"] > 0)
        dest, state = receiver.dest, receiver.state_dir
        sock = str(tmp_path / "x.sock")
        # the same state directory with another chunk size, or for another source
        error = run_receive_expecting_error(
            "--source", uri, "--dest", str(dest), "--state-dir", str(state), "--socket", sock,
            "--chunk-size", "128K",
        )  # fmt: skip
        assert "belongs to another disk" in error and "chunk size" in error
        error = run_receive_expecting_error(
            "--source", uri, "--dest", str(dest), "--state-dir", str(state), "--socket", sock,
            "--source-id", "another-source",
        )  # fmt: skip
        assert "belongs to another disk" in error
        # a destination file of the wrong size
        wrong = tmp_path / "wrong.img"
        wrong.write_bytes(b"x" * 4096)
        error = run_receive_expecting_error(
            "--source", uri, "--dest", str(wrong), "--state-dir", str(tmp_path / "s2"),
            "--socket", sock,
        )  # fmt: skip
        assert "has 4096 bytes" in error
        # the state says data is present in a destination file that is gone
        moved = tmp_path / "moved.img"
        dest.rename(moved)
        error = run_receive_expecting_error(
            "--source", uri, "--dest", str(dest), "--state-dir", str(state), "--socket", sock,
        )  # fmt: skip
        assert "does not exist" in error and not dest.exists()
        moved.rename(dest)
    # the source is gone
    error = run_receive_expecting_error(
        "--source", f"nbd+unix:///?socket={tmp_path}/nothing.sock", "--dest", str(dest),
        "--state-dir", str(state), "--socket", sock,
    )  # fmt: skip
    assert "unreachable" in error
    # nbdkit is not installed
    error = run_receive_expecting_error(
        "--source", uri, "--dest", str(dest), "--state-dir", str(state), "--socket", sock,
        env={**os.environ, "PATH": str(tmp_path / "empty-bin")},
    )  # fmt: skip
    assert "nbdkit is not installed" in error
    assert not Path(sock).exists()


def test_listen_on_tcp_prints_nbd_uri_and_serves(tmp_path: Path) -> None:
    image = tmp_path / "source.img"
    sparse_test_image(image, 16 * MiB, seed=13, data_fraction=0.7)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with running_serve(f"disk={image}") as serve, running_receive(
        serve.export_uri("disk"), tmp_path, listen=f"127.0.0.1:{port}"
    ) as receiver:
        assert receiver.uri == f"nbd://127.0.0.1:{port}/"
        handle = connect(receiver.uri)
        assert handle.pread(MiB, 5 * MiB) == read_range(image, 5 * MiB, MiB)
        handle.shutdown()
        receiver.wait_complete()
        receiver.process.send_signal(signal.SIGINT)  # as Ctrl-C does
        assert receiver.process.wait(15) == 0
    assert_equal_outside(receiver.dest, image, [])
    identity = MapIdentity(16 * MiB, CHUNK, 16 * MiB, "", serve.export_uri("disk"))
    on_disk = BlockMap.open(receiver.state_dir, identity)
    assert on_disk.is_complete  # the map was made durable on the way out
    on_disk.close()


def test_source_restart_midway_reconnects_and_completes(tmp_path: Path) -> None:
    image = tmp_path / "source.img"
    data_runs = sparse_test_image(image, 64 * MiB, seed=14, data_fraction=0.8)
    data_bytes = sum(length for _, length in data_runs)
    socket_path = str(tmp_path / "source.sock")
    uri = f"nbd+unix:///disk?socket={socket_path}"
    with contextlib.ExitStack() as stack:
        serve = stack.enter_context(
            running_serve(f"disk={image}", socket_path=socket_path, read_delay=0.05)
        )
        receiver = stack.enter_context(running_receive(uri, tmp_path))
        receiver.wait_status(lambda r: 0.2 * data_bytes < r["transferred_bytes"])
        serve.process.kill()  # the source host goes away with fetches in flight
        serve.process.wait(10)
        receiver.wait_status(lambda r: r["state"] == "source-unreachable")
        with running_serve(f"disk={image}", socket_path=socket_path):
            record = receiver.wait_complete(timeout=60)
        assert record["reconnects"] >= 1
    assert_equal_outside(receiver.dest, image, [])
