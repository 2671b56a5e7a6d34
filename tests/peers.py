"""Helpers for tests that talk to real NBD peers: test images and servers run as subprocesses.

    with running_serve(image, writable=True) as serve:      # `postcopy serve` on a Unix socket
        subprocess.run(["nbdinfo", serve.uri], check=True)
    with running_nbdkit(["memory", "64M"]) as nbdkit: ...   # any nbdkit plugin and arguments
    with running_receive_command(argv, log) as (process, uri): ...  # until it prints its URI

Every server is started with a bounded wait for readiness and is terminated (then killed) when
the `with` block ends, whatever happens inside.  `sparse_test_image` writes a deterministic image of
random data runs and holes; `file_extents` reads a file's allocation back with SEEK_DATA/SEEK_HOLE
(written here independently of nbdsrv.backend so that tests compare two implementations).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from postcopy.kit.processes import read_line, stop_process

CHECKOUT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
RECEIVE_START_TIMEOUT = 60.0  # receive bounds its own start-up; this only guards a hung one
RECEIVE_STOP_TIMEOUT = 15.0


# -- images ------------------------------------------------------------------------------------


def sparse_test_image(
    path: str | os.PathLike[str],
    size: int,
    seed: int,
    *,
    data_fraction: float = 0.5,
    min_run: int = 64 * 1024,
    max_run: int = 4 * 1024 * 1024,
) -> list[tuple[int, int]]:
    """Write a raw image of `size` bytes: runs (multiples of 64 KiB, between min_run and
    max_run) that are random data with probability `data_fraction`, holes otherwise.  The same
    arguments give the same bytes.  Returns the data runs as (offset, length)."""
    rng = random.Random(seed)
    data_runs: list[tuple[int, int]] = []
    step = 64 * 1024
    with open(path, "wb") as image:
        image.truncate(size)
        position = 0
        while position < size:
            run = min(rng.randrange(min_run, max_run + 1, step), size - position)
            if rng.random() < data_fraction:
                image.seek(position)
                image.write(rng.randbytes(run))
                if data_runs and data_runs[-1][0] + data_runs[-1][1] == position:
                    data_runs[-1] = (data_runs[-1][0], data_runs[-1][1] + run)
                else:
                    data_runs.append((position, run))
            position += run
    return data_runs


def file_extents(path: str | os.PathLike[str]) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) runs of a file, from SEEK_DATA/SEEK_HOLE."""
    runs: list[tuple[int, int, bool]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        position = 0
        while position < size:
            try:
                data = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = size
            if data > position:
                runs.append((position, data - position, False))
            if data >= size:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            runs.append((data, hole - data, True))
            position = hole
    finally:
        os.close(fd)
    return runs


def fill_bytes(path: str | os.PathLike[str], offset: int, length: int, byte: int) -> None:
    """Overwrite [offset, offset+length) of an existing file with `byte`."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes([byte]) * length)


def files_identical(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> bool:
    """cmp(1): True when both files have the same bytes."""
    return subprocess.run(["cmp", "-s", os.fspath(first), os.fspath(second)]).returncode == 0


# -- processes ---------------------------------------------------------------------------------


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    return stop_process(process, timeout=STOP_TIMEOUT, kill_timeout=STOP_TIMEOUT, sig=sig)


def unix_socket_accepts(path: str | os.PathLike[str]) -> bool:
    """Does something accept connections on the Unix socket `path` (not just: does it exist)?"""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
        return True


def _wait_for_socket(path: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def serve_command() -> list[str]:
    """The command line that runs `postcopy` from this checkout's interpreter."""
    return [sys.executable, "-m", "postcopy.cli"]


@dataclass
class RunningServe:
    process: subprocess.Popen[bytes]
    uris: list[str]
    socket_path: str | None
    log_path: Path

    @property
    def uri(self) -> str:
        return self.uris[0]

    def export_uri(self, name: str) -> str:
        """The URI of the export `name` on the first listener."""
        base = self.uri
        if base.startswith("nbd+unix:///"):
            return f"nbd+unix:///{name}?" + base.split("?", 1)[1]
        return base.rstrip("/") + "/" + name

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_serve(
    *exports: str | os.PathLike[str],
    writable: bool = False,
    socket_path: str | None = None,
    listen: str | None = None,
    read_delay: float = 0.0,
    extra_args: Sequence[str] = (),
    verbose: bool = False,
) -> Iterator[RunningServe]:
    """Run `postcopy serve` (a Unix socket in a fresh temporary directory unless `socket_path`
    or `listen` is given); waits for its ready line; SIGTERM (then SIGKILL) on exit.  Exports
    are `PATH` or `NAME=PATH` strings as on the command line.  With `read_delay` (seconds) every
    read of the server takes that long (`tests.delayed_serve`, the same command with a delaying
    backend)."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-")))
        if socket_path is None and listen is None:
            socket_path = str(workdir / "nbd.sock")
        if read_delay:
            args = [sys.executable, "-m", "tests.delayed_serve", str(read_delay)]
        else:
            args = [*serve_command(), "serve"]
        if socket_path is not None:
            args += ["--socket", socket_path]
        if listen is not None:
            args += ["--listen", listen]
        if writable:
            args.append("--writable")
        if verbose:
            args.append("--verbose")
        args += [*extra_args, *(os.fspath(e) for e in exports)]
        log_path = workdir / "serve.log"
        log_file = stack.enter_context(open(log_path, "wb"))
        # `python -m tests.delayed_serve` finds `tests` in its working directory, the checkout
        cwd = CHECKOUT if read_delay else None
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log_file, cwd=cwd)
        stack.callback(_stop, process)
        assert process.stdout is not None
        line = read_line(process, READY_TIMEOUT)
        if not line.startswith("ready "):
            _stop(process)
            raise RuntimeError(f"postcopy serve did not start: {line!r}: {log_path.read_text()}")
        yield RunningServe(process, line.split()[1:], socket_path, log_path)


@contextlib.contextmanager
def running_nbdkit(
    plugin_args: Sequence[str],
    *,
    socket_path: str | None = None,
    nbdkit_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run `nbdkit -f -U SOCKET [nbdkit_args] PLUGIN ARGS...`; yields its NBD URI."""
    with contextlib.ExitStack() as stack:
        if socket_path is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="nbdkit-"))
            socket_path = os.path.join(workdir, "nbd.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)  # nbdkit does not replace a stale socket
        process = subprocess.Popen(
            ["nbdkit", "-f", "-U", socket_path, *nbdkit_args, *plugin_args],
            env={**os.environ, **(env or {})},
        )
        stack.callback(_stop, process)
        _wait_for_socket(socket_path, process, READY_TIMEOUT)
        yield f"nbd+unix:///?socket={socket_path}"


@contextlib.contextmanager
def running_qemu_nbd(image: str | os.PathLike[str], *, read_only: bool = True) -> Iterator[str]:
    """Run `qemu-nbd` on a raw image over a Unix socket; yields its NBD URI."""
    with tempfile.TemporaryDirectory(prefix="qemu-nbd-") as workdir:
        socket_path = os.path.join(workdir, "nbd.sock")
        args = ["qemu-nbd", "-f", "raw", "-k", socket_path, "-t", "-e", "8"]
        if read_only:
            args.append("-r")
        process = subprocess.Popen([*args, os.fspath(image)])
        try:
            _wait_for_socket(socket_path, process, READY_TIMEOUT)
            yield f"nbd+unix:///?socket={socket_path}"
        finally:
            _stop(process)


@contextlib.contextmanager
def running_until_ready(
    command: Sequence[str], log_path: Path, ready: Callable[[], bool], timeout: float, what: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` (stdin from /dev/null, stdout and stderr into `log_path`) and wait up to
    `timeout` seconds for `ready()` (e.g. its socket accepts); RuntimeError with the log when it
    exits or the time is up first.  SIGTERM (then SIGKILL) when the `with` block ends."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = log_path.read_text(errors="replace")
                raise RuntimeError(f"{what} did not start: {log_text}")
            time.sleep(0.02)
        yield process
    finally:
        stop_process(process)


@contextlib.contextmanager
def running_receive_command(
    command: Sequence[str],
    log_path: Path,
    *,
    expect: str | tuple[str, ...] = "nbd+unix://",
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run a `postcopy receive` command line (stderr into `log_path`) until it prints its NBD URI
    (which must start with `expect`); yields the process and the URI.  SIGTERM (then SIGKILL)
    and its stdout closed when the `with` block ends."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, cwd=cwd, env=env)
    try:
        try:
            uri = read_line(process, RECEIVE_START_TIMEOUT)
        except TimeoutError as exc:
            log = log_path.read_text()
            raise AssertionError(f"receive printed no URI ({exc}): {log}") from None
        if not uri.startswith(expect):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)  # let it finish writing why
            raise AssertionError(f"no URI printed: {uri!r}: {log_path.read_text()}")
        yield process, uri
    finally:
        stop_process(process, timeout=RECEIVE_STOP_TIMEOUT, kill_timeout=RECEIVE_STOP_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from a blocking socket; ConnectionError when it closes first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`postcopy ARGV...` run in this process (`postcopy.cli.main`): its exit status (a
    SystemExit's too; 2 for one with a message) and what it wrote to stderr (stdout dropped)."""
    from postcopy.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return code, stderr.getvalue()


def require_tools(*names: str) -> None:
    """Fail (never skip: CI installs them) when a peer tool is missing."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise RuntimeError(f"missing test tools {missing}: run `make setup`")
