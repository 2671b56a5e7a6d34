"""`postcopy serve` as a command: ready line, signals, socket clean-up, and one-line errors."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import nbd
import pytest

from tests.peers import running_serve, serve_command, sparse_test_image


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    sparse_test_image(path, 4 * 1024 * 1024, seed=5)
    return path


def serve_fails(*args: str) -> str:
    """Run `postcopy serve ARGS`, expect a non-zero exit with one line on stderr; return it."""
    result = subprocess.run(
        [*serve_command(), "serve", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_serve_runs_until_a_signal_then_exits_0_and_removes_its_socket(
    image: Path, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    socket_path = str(tmp_path / "serve.sock")
    with running_serve(image, socket_path=socket_path) as serve:
        assert serve.uris == [f"nbd+unix:///?socket={socket_path}"]
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
        handle = nbd.NBD()
        handle.connect_uri(serve.uri)
        assert handle.pread(4096, 0) == image.read_bytes()[:4096]
        handle.shutdown()
        serve.process.send_signal(stop_signal)
        assert serve.process.wait(10) == 0
    assert not os.path.exists(socket_path)


def test_serve_on_tcp_and_unix_with_named_exports(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"o" * 8192)
    socket_path = str(tmp_path / "s.sock")
    with running_serve(
        image, f"other={other}", socket_path=socket_path, listen="127.0.0.1:0"
    ) as serve:
        assert len(serve.uris) == 2
        tcp_uri = next(uri for uri in serve.uris if uri.startswith("nbd://"))
        handle = nbd.NBD()
        handle.connect_uri(tcp_uri + "other")
        assert handle.get_size() == 8192
        assert handle.pread(512, 0) == b"o" * 512
        assert handle.is_read_only()
        handle.shutdown()
        host_port = tcp_uri.removeprefix("nbd://").rstrip("/")
        host, port = host_port.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            assert sock.recv(8) == b"NBDMAGIC"


def test_writable_flag_allows_writes(image: Path) -> None:
    with running_serve(image, writable=True) as serve:
        handle = nbd.NBD()
        handle.connect_uri(serve.uri)
        assert not handle.is_read_only()
        handle.pwrite(b"w" * 512, 1024)
        handle.flush()
        handle.shutdown()
    assert image.read_bytes()[1024:1536] == b"w" * 512


def test_missing_image_is_a_one_line_error(tmp_path: Path) -> None:
    line = serve_fails("--socket", str(tmp_path / "s.sock"), str(tmp_path / "missing.img"))
    assert "missing.img" in line and "No such file" in line
    assert not (tmp_path / "s.sock").exists()


def test_no_export_is_a_one_line_error(tmp_path: Path) -> None:
    assert "no export" in serve_fails("--socket", str(tmp_path / "s.sock"))


def test_no_listener_is_a_one_line_error(image: Path) -> None:
    assert "--listen" in serve_fails(str(image))


def test_duplicate_export_names_are_a_one_line_error(image: Path, tmp_path: Path) -> None:
    line = serve_fails("--socket", str(tmp_path / "s.sock"), f"a={image}", f"a={image}")
    assert "'a'" in line


@pytest.mark.parametrize(
    "address", ["nonsense", "127.0.0.1:99999", "127.0.0.1:x", "no.such.host.invalid:1"]
)
def test_bad_listen_address_is_a_one_line_error(image: Path, address: str) -> None:
    assert "listen" in serve_fails("--listen", address, str(image))


def test_port_in_use_is_a_one_line_error(image: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert "in use" in serve_fails("--listen", f"127.0.0.1:{port}", str(image))


def test_live_socket_is_not_stolen_but_a_stale_one_is_replaced(
    image: Path, tmp_path: Path
) -> None:
    socket_path = str(tmp_path / "s.sock")
    with running_serve(image, socket_path=socket_path):
        assert "in use" in serve_fails("--socket", socket_path, str(image))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(socket_path)
    stale.close()  # leaves the file with nobody listening
    with running_serve(image, socket_path=socket_path) as serve:
        handle = nbd.NBD()
        handle.connect_uri(serve.uri)
        handle.shutdown()


def test_a_delayed_serve_holds_every_read_and_serves_the_same_bytes(tmp_path: Path) -> None:
    """`running_serve(read_delay=...)` (tests.delayed_serve: the serve command with a delaying
    backend) is what the destination's race and outage tests rely on: each read of data waits."""
    path = tmp_path / "dense.img"
    path.write_bytes(os.urandom(64 * 1024))
    with running_serve(path, read_delay=0.3) as serve:
        handle = nbd.NBD()
        handle.connect_uri(serve.uri)
        try:
            for _ in range(2):  # twice: the second read is not answered from the page cache
                start = time.monotonic()
                assert handle.pread(4096, 8192) == path.read_bytes()[8192 : 8192 + 4096]
                assert time.monotonic() - start >= 0.3
        finally:
            handle.shutdown()
