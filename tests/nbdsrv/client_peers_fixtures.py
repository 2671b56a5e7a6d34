"""Real NBD servers for the client's tests: nbdkit, qemu-nbd, nbd-server and `postcopy serve`.

Each `run_*` is a context manager that starts the server in the foreground on a Unix socket in a
given directory, waits a bounded time until it accepts a connection, yields a `Peer` (its URI and
process), and kills it (SIGKILL) in `finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT = 15.0  # seconds a server gets to start accepting connections
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Peer:
    uri: str
    process: subprocess.Popen[bytes]
    socket_path: str | None = None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


def _listening_unix(path: str) -> bool:
    """True when a socket listens on `path`, without connecting to it (/proc/net/unix: flag
    __SO_ACCEPTCON 0x10000): `nbd-server -d` serves one connection only, a probe would eat it."""
    with open("/proc/net/unix") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[-1] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def _accepting_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_tcp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _run(
    argv: Sequence[str], uri: str, ready: Callable[[], bool], socket_path: str | None = None
) -> Iterator[Peer]:
    process = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    peer = Peer(uri, process, socket_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready():
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                raise RuntimeError(f"{argv[0]} exited with {process.returncode}: {output[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start within {READY_TIMEOUT} s")
            time.sleep(0.02)
        yield peer
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


@contextlib.contextmanager
def run_nbdkit(
    directory: Path,
    plugin_args: Sequence[str],
    options: Sequence[str] = (),
    *,
    tcp_port: int | None = None,
    tcp_host: str = "127.0.0.1",
) -> Iterator[Peer]:
    """`nbdkit -f -U sock [options] plugin [args]`, e.g. (["memory", "16M"], ["--no-sr"]); with
    `tcp_port`, on tcp_host:tcp_port (loopback) instead of a Unix socket."""
    base = ["nbdkit", "-f", "--exit-with-parent"]
    if tcp_port is not None:
        argv = [*base, "-i", tcp_host, "-p", str(tcp_port), *options, *plugin_args]
        uri_host = f"[{tcp_host}]" if ":" in tcp_host else tcp_host
        uri = f"nbd://{uri_host}:{tcp_port}/"
        with _run(argv, uri, lambda: _accepting_tcp(tcp_host, tcp_port)) as peer:
            yield peer
        return
    sock = str(directory / "nbdkit.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)  # nbdkit does not remove a stale socket
    argv = [*base, "-U", sock, *options, *plugin_args]
    with _run(argv, f"nbd+unix:///?socket={sock}", lambda: _listening_unix(sock), sock) as peer:
        yield peer


@contextlib.contextmanager
def run_qemu_nbd(directory: Path, image: Path, export: str = "disk") -> Iterator[Peer]:
    """qemu-nbd serving a raw image, several clients at once (nbdinfo and ours)."""
    sock = str(directory / "qemu-nbd.sock")
    argv = [
        "qemu-nbd", "--persistent", "--shared=8", "-f", "raw", "-x", export, "-k", sock,
        str(image),
    ]  # fmt: skip
    ready = lambda: _listening_unix(sock)  # noqa: E731
    with _run(argv, f"nbd+unix:///{export}?socket={sock}", ready, sock) as peer:
        yield peer


@contextlib.contextmanager
def run_nbd_server(directory: Path, image: Path, export: str = "disk") -> Iterator[Peer]:
    """nbd-server 3.24 in the foreground (-d) with its own config, on a Unix socket.  In this mode
    it serves ONE connection (then stops listening): start one per client."""
    sock = str(directory / "nbd-server.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    config = directory / "nbd-server.conf"
    config.write_text(
        "[generic]\n"
        f"    unixsock = {sock}\n"
        "    allowlist = true\n"
        f"[{export}]\n"
        f"    exportname = {image}\n"
        "    flush = true\n"
        "    fua = true\n"
        "    trim = true\n"
    )
    argv = ["nbd-server", "-d", "-C", str(config)]
    ready = lambda: _listening_unix(sock)  # noqa: E731
    with _run(argv, f"nbd+unix:///{export}?socket={sock}", ready, sock) as peer:
        yield peer


@contextlib.contextmanager
def run_postcopy_serve(directory: Path, image: Path, *, writable: bool = False) -> Iterator[Peer]:
    """Our own server: `postcopy serve --socket S IMG` (read-only unless `writable`)."""
    sock = str(directory / "serve.sock")
    argv = [str(Path(sys.executable).parent / "postcopy"), "serve", "--socket", sock, str(image)]
    if writable:
        argv.insert(2, "--writable")
    ready = lambda: _listening_unix(sock)  # noqa: E731
    with _run(argv, f"nbd+unix:///?socket={sock}", ready, sock) as peer:
        yield peer


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    """`nbdinfo --map --json` as (offset, length, flags) with neighbours of equal flags merged."""
    out = subprocess.run(
        ["nbdinfo", "--map", "--json", uri], check=True, capture_output=True, timeout=60
    ).stdout
    return merge_extents((e["offset"], e["length"], e["type"]) for e in json.loads(out))


def merge_extents(extents: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    merged: list[tuple[int, int, int]] = []
    for offset, length, flags in extents:
        if merged and merged[-1][2] == flags and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, flags)
        else:
            merged.append((offset, length, flags))
    return merged


def make_sparse_image(path: Path, size: int, data_ranges: Sequence[tuple[int, int]]) -> bytes:
    """A file of `size` bytes, holes except `data_ranges` (offset, length) of random bytes;
    returns its content for comparisons."""
    content = bytearray(size)
    with open(path, "wb") as image:
        image.truncate(size)
        for offset, length in data_ranges:
            chunk = os.urandom(length)
            image.seek(offset)
            image.write(chunk)
            content[offset : offset + length] = chunk
    return bytes(content)
