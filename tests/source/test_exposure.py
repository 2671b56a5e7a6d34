"""Least exposure (issue 7): what `postcopy serve` lets others reach, checked from the outside.

Unix sockets are 0600 (another user cannot connect) or 0660 owned by `--socket-group` (members
can); TCP listens on the address given only; export names match exactly (no fallback to the
default export); exports stay read-only unless `--writable` (writes fail with EPERM and the image
is untouched).  "Another user" is a child process that drops to uid/gid 65534 (nobody/nogroup)
before connecting.
"""

from __future__ import annotations

import errno
import grp
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.peers import running_serve, sparse_test_image

NOBODY = 65534
TOOL_TIMEOUT = 30


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    sparse_test_image(path, 2 * 1024 * 1024, seed=11)
    return path


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may enter (pytest's tmp_path is 0700), so only the socket's own mode
    decides who can connect."""
    path = Path(tempfile.mkdtemp(prefix="exposure-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def connect_as_nobody(socket_path: str, groups: tuple[int, ...] = ()) -> int:
    """Connect to a Unix socket from a child running as uid 65534 (with `groups` as its group
    list); returns 0 when it could connect, else the errno it got."""
    code = (
        "import os, socket, sys\n"
        f"os.setgroups({list(groups)!r}); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({socket_path!r})\n"
        "except OSError as e:\n"
        "    sys.exit(e.errno)\n"
        "sys.exit(0 if s.recv(8) == b'NBDMAGIC' else 1)\n"
    )
    return subprocess.run([sys.executable, "-c", code], timeout=TOOL_TIMEOUT).returncode


def test_unix_socket_is_0600_and_other_users_cannot_connect(image: Path, open_dir: Path) -> None:
    socket_path = str(open_dir / "s.sock")
    with running_serve(image, socket_path=socket_path):
        info = os.stat(socket_path)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.getuid()
        assert connect_as_nobody(socket_path) == errno.EACCES
        assert connect_as_nobody(socket_path, groups=(NOBODY,)) == errno.EACCES


def test_socket_group_makes_the_socket_0660_for_that_group_only(
    image: Path, open_dir: Path
) -> None:
    group = grp.getgrgid(NOBODY).gr_name  # "nogroup" on Debian
    socket_path = str(open_dir / "s.sock")
    with running_serve(image, socket_path=socket_path, extra_args=["--socket-group", group]):
        info = os.stat(socket_path)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == NOBODY
        assert connect_as_nobody(socket_path) == 0  # its primary group is the socket's
        # a user outside the group: uid nobody, but gid 0's supplementary list only
        other = (
            "import os, socket, sys\n"
            "os.setgroups([]); os.setgid(1); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            f"    s.connect({socket_path!r})\n"
            "except OSError as e:\n"
            "    sys.exit(e.errno)\n"
        )
        result = subprocess.run([sys.executable, "-c", other], timeout=TOOL_TIMEOUT)
        assert result.returncode == errno.EACCES


def test_unknown_socket_group_is_a_one_line_error(image: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "postcopy.cli", "serve", "--socket", str(tmp_path / "s.sock"),
         "--socket-group", "no-such-group-here", str(image)],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-group-here" in lines[0], result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_tcp_listens_only_on_the_address_given(image: Path) -> None:
    with running_serve(image, listen="127.0.0.2:0") as serve:
        assert serve.uri.startswith("nbd://127.0.0.2:")
        port = int(serve.uri.rsplit(":", 1)[1].strip("/"))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with socket.create_connection(("127.0.0.2", port), timeout=5) as sock:
            sock.settimeout(5)
            assert sock.recv(8) == b"NBDMAGIC"
        handle = nbd.NBD()
        handle.connect_uri(serve.uri)
        assert handle.pread(4096, 0) == image.read_bytes()[:4096]
        handle.shutdown()


def nbdinfo(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbdinfo", *args, uri], capture_output=True, text=True, timeout=TOOL_TIMEOUT
    )


def test_export_names_are_exact_with_no_fallback_to_the_default(
    image: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"o" * 8192)
    with running_serve(image, f"other={other}") as serve:
        listing = nbdinfo(serve.uri, "--list")
        assert listing.returncode == 0, listing.stderr
        assert 'export=""' in listing.stdout and 'export="other"' in listing.stdout
        named = nbdinfo(serve.export_uri("other"))
        assert named.returncode == 0, named.stderr
        assert "export-size: 8192" in named.stdout
        default = nbdinfo(serve.uri)
        assert f"export-size: {image.stat().st_size}" in default.stdout
        for wrong in ["Other", "other ", "othe", "other/", "nosuch", "*"]:
            result = nbdinfo(serve.export_uri(wrong))
            assert result.returncode != 0, wrong
            assert "export-size" not in result.stdout
            # NBD_OPT_EXPORT_NAME (no error reply possible) is closed, never served ""
            handle = nbd.NBD()
            handle.set_opt_mode(False)
            handle.set_request_structured_replies(False)
            with pytest.raises(nbd.Error):
                handle.connect_uri(serve.export_uri(wrong))


def test_exports_stay_read_only_without_writable(image: Path) -> None:
    before = image.read_bytes()
    with running_serve(image) as serve:
        handle = nbd.NBD()
        handle.connect_uri(serve.uri)
        assert handle.is_read_only()
        assert not handle.can_trim() and not handle.can_zero()
        handle.set_strict_mode(0)  # send the writes anyway: the server must refuse them
        for write in (
            lambda: handle.pwrite(b"x" * 4096, 0),
            lambda: handle.trim(65536, 0),
            lambda: handle.zero(65536, 65536),
        ):
            with pytest.raises(nbd.Error) as refused:
                write()
            assert refused.value.errno == "EPERM"  # python3-libnbd gives the errno's name
        assert handle.pread(4096, 0) == before[:4096]  # the connection is still usable
        handle.shutdown()
        qemu = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4096", serve.uri],
            capture_output=True, text=True, timeout=TOOL_TIMEOUT,
        )
        assert "wrote" not in qemu.stdout
    assert image.read_bytes() == before
