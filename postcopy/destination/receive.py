"""`postcopy receive`: serve a lazily fetched disk on the destination host through nbdkit.

How it works.  `run_receive` first locks the state directory (`postcopy.destination.statelock`: a
second receive on it is refused before anything there is read), then checks everything an operator
can get wrong before anything listens (nbdkit and its python plugin installed, the source reachable
and its size, the destination file's size, the state directory's identity, read-only), creates the
sparse destination file when it does not exist, then starts `nbdkit -f --exit-with-parent` with
`plugin/postcopy_plugin.py`, the engine's settings as `key=value` parameters and the lock's
descriptor inherited (the plugin adopts it, so the lock lives as long as receive and nbdkit do).
A destination whose map is already complete is started without touching the source at all: its
size is the local file's, and nothing is probed (an old source address may be gone, stalled, or
serving something else by now).  The embedded Python sees neither the venv nor the project, so
PYTHONPATH carries both.  Once the socket (or port) accepts a connection it prints the NBD URI a
domain's disk config should use as the first line on stdout, then waits in the foreground;
SIGINT/SIGTERM are forwarded to nbdkit (whose plugin makes the map durable on exit).

When `make` has built the C filter `plugin/fastpath.c` (into the venv's lib directory), nbdkit
runs it in front of the plugin: it serves reads of chunks that are PRESENT in the engine's live
map (`live.map` in the state directory) straight from the destination file, without entering
Python; everything else goes on to the plugin.  Without the built filter, receive logs one line
and runs the plugin alone.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import trio

import nbdsrv
import postcopy
from postcopy.destination.blockmap import (
    DEFAULT_CHUNK_SIZE,
    JOURNAL_FILENAME,
    LIVE_MAP_FILENAME,
    SNAPSHOT_FILENAME,
    BlockMap,
    MapIdentity,
    check_chunk_size,
)
from postcopy.destination.statelock import StateLock, acquire_state_lock, lock_destination
from postcopy.errors import StateError, UserError

# `plugin/` of the checkout, installed as the package `postcopy_plugin` (see pyproject.toml)
PLUGIN_PACKAGE = "postcopy_plugin"
FASTPATH_FILTER_NAME = "postcopy-fastpath.so"
# where the fast path filter's hit and miss counts land when nbdkit exits (tests read them)
FASTPATH_STATS_FILENAME = "fastpath.stats"
# nbdkit worker threads per connection.  nbdkit reads a connection's next request only when one of
# its threads is free, and a request that waits for the source (a read miss, a sub-chunk write
# into a missing chunk) holds its thread up to --source-timeout during an outage.  So there are as
# many threads as a client keeps requests in flight: the Linux kernel's nbd driver at most 128 per
# connection, QEMU 16.  Then waiting requests never keep reads of present data or writes from being
# read and answered.  Idle threads cost only their (untouched) stacks; threads in use are bounded
# by the client's queue depth, whatever this number.
DEFAULT_THREADS = 128
SOURCE_PROBE_TIMEOUT = 15.0
# how long nbdkit may take to load the plugin and listen; a slow host (nested emulation: the Xen
# lab's dom0 needs minutes under load) sets POSTCOPY_LISTEN_TIMEOUT (seconds)
LISTEN_TIMEOUT = float(os.environ.get("POSTCOPY_LISTEN_TIMEOUT") or 30.0)


def plugin_file(name: str) -> Path:
    """A file of the installed plugin package (in an editable install, the checkout's `plugin/`).
    nbdkit loads the script by path, so the package must be installed as files."""
    resource = importlib.resources.files(PLUGIN_PACKAGE) / name
    if not isinstance(resource, Path) or not resource.is_file():
        raise UserError(f"{name} of the package {PLUGIN_PACKAGE} is not an installed file")
    return resource


PLUGIN_PATH = plugin_file("postcopy_plugin.py")


@dataclass
class ReceiveConfig:
    source: str
    dest: Path
    state_dir: Path
    socket_path: Path | None = None
    listen: tuple[str, int] | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    wait_for_source: bool = False
    threads: int = DEFAULT_THREADS
    export_name: str | None = None
    source_id: str | None = None
    unreachable_timeout: float | None = None
    request_timeout: float | None = None
    bandwidth: int | None = None  # drain cap in bytes/s
    domain: str | None = None


def nbd_uri(config: ReceiveConfig) -> str:
    """The URI a hypervisor opens: nbd+unix:///?socket=PATH or nbd://HOST:PORT/."""
    if config.socket_path is not None:
        return f"nbd+unix:///?socket={config.socket_path}"
    assert config.listen is not None
    host, port = config.listen
    if ":" in host:
        host = f"[{host}]"
    return f"nbd://{host}:{port}/"


def check_nbdkit() -> None:
    try:
        result = subprocess.run(
            ["nbdkit", "--dump-plugin", "python"], capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        raise UserError("nbdkit is not installed (Debian: apt install nbdkit)") from None
    if result.returncode != 0:
        raise UserError(
            "nbdkit's python plugin is missing (Debian: apt install nbdkit-plugin-python)"
        )


def probe_source(uri: str, export_name: str | None) -> int:
    """Connect once and return the source's size; UserError when it cannot be reached."""
    import nbdsrv

    async def probe() -> int:
        with trio.fail_after(SOURCE_PROBE_TIMEOUT):
            if export_name is None:
                opened = nbdsrv.open_client(uri)
            else:
                opened = nbdsrv.open_client(uri, export_name=export_name)
            async with opened as client:
                return int(client.size)

    try:
        return trio.run(probe)
    except trio.TooSlowError:
        raise UserError(
            f"source {uri} unreachable: no answer in {SOURCE_PROBE_TIMEOUT:.0f}s"
        ) from None
    except (OSError, nbdsrv.NBDError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"source {uri} unreachable: {detail}") from None


def prepare_dest(dest: Path, size: int) -> None:
    """Create the sparse destination file, or check an existing one has the source's size."""
    if dest.exists():
        found = dest.stat().st_size
        if found != size:
            raise UserError(f"destination {dest} has {found} bytes, the source has {size}")
        return
    try:
        with open(dest, "xb") as f:
            f.truncate(size)
    except OSError as exc:
        raise UserError(f"cannot create {dest}: {exc.strerror}") from None


def map_identity(config: ReceiveConfig, size: int) -> MapIdentity:
    """The identity the engine will give the block map (see postcopy.destination.engine.Engine)."""
    return MapIdentity(
        disk_size=size,
        chunk_size=config.chunk_size,
        source_size=size,
        export_name=config.export_name or "",
        source_id=config.source_id or config.source,
    )


def lock_state_dir(config: ReceiveConfig) -> StateLock:
    """Create the state directory if needed and lock it (`StateDirInUse` naming the holder when
    another receive has it); nothing else in it is read or written before this."""
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {config.state_dir}: {exc.strerror}") from None
    return acquire_state_lock(config.state_dir, "postcopy receive")


def check_state(config: ReceiveConfig, size: int, *, dest_exists: bool = True) -> None:
    """Refuse a state directory that belongs to another disk, or whose map says data is present
    in a destination file that is gone (StateError, one line).  Reads only: the engine, which
    opens the map for real, is the one that may repair a torn journal tail."""
    block_map = BlockMap.open_read_only(config.state_dir, map_identity(config, size))
    try:
        if not dest_exists and block_map.present_count:
            raise StateError(
                f"state directory {config.state_dir} records {block_map.present_bytes} bytes "
                f"present in {config.dest}, which does not exist (use a new state directory)"
            )
    finally:
        block_map.close()


def completed_size(config: ReceiveConfig) -> int | None:
    """The disk size when the destination is already complete (else None).  Reads only."""
    if not config.dest.is_file() or not config.state_dir.is_dir():
        return None
    map_files = (config.state_dir / SNAPSHOT_FILENAME, config.state_dir / JOURNAL_FILENAME)
    if not any(path.exists() for path in map_files):
        return None  # no map yet (an empty map of a 0-byte file would look complete)
    size = config.dest.stat().st_size
    try:
        block_map = BlockMap.open_read_only(config.state_dir, map_identity(config, size))
    except UserError:
        return None
    try:
        return size if block_map.is_complete else None
    finally:
        block_map.close()


def remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UserError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a stale socket nbdkit would not replace
        return
    finally:
        probe.close()
    raise UserError(f"socket {path} is in use by another server")


def fastpath_filter_path() -> Path | None:
    """The built fast path filter, in the lib directory of this interpreter's environment (where
    `make venv` builds it from the plugin package's `fastpath.c`); None when it is not built."""
    candidate = Path(sys.prefix) / "lib" / FASTPATH_FILTER_NAME
    return candidate if candidate.is_file() else None


def nbdkit_command(config: ReceiveConfig, state_lock_fd: int | None = None) -> list[str]:
    """nbdkit's command line; with `state_lock_fd`, the plugin adopts that inherited descriptor
    as its state-directory lock (without it, the plugin takes the lock itself)."""
    command = ["nbdkit", "-f", "--exit-with-parent", "-t", str(config.threads)]
    fastpath = fastpath_filter_path()
    if fastpath is None:
        print(
            f"postcopy receive: {Path(sys.prefix) / 'lib' / FASTPATH_FILTER_NAME} is not built "
            "(make venv, or gcc -O2 -fPIC -shared -o THAT_PATH "
            f"{plugin_file('fastpath.c')}): every read goes through the python plugin",
            file=sys.stderr,
        )
    else:
        command.append(f"--filter={fastpath}")
    if config.socket_path is not None:
        command += ["-U", str(config.socket_path)]
    else:
        assert config.listen is not None
        host, port = config.listen
        command += ["-i", host, "-p", str(port)]
    command += ["python", str(PLUGIN_PATH)]
    parameters = {
        "source": config.source,
        "dest": str(config.dest),
        "state_dir": str(config.state_dir),
        "chunk_size": str(config.chunk_size),
        "wait_for_source": "1" if config.wait_for_source else "0",
    }
    if config.export_name is not None:
        parameters["export_name"] = config.export_name
    if config.source_id is not None:
        parameters["source_id"] = config.source_id
    if config.unreachable_timeout is not None:
        parameters["unreachable_timeout"] = str(config.unreachable_timeout)
    if config.request_timeout is not None:
        parameters["request_timeout"] = str(config.request_timeout)
    if config.bandwidth is not None:
        parameters["bandwidth"] = str(config.bandwidth)
    if state_lock_fd is not None:
        parameters["state_lock_fd"] = str(state_lock_fd)
    if fastpath is not None:
        parameters["fastpath-map"] = str(config.state_dir / LIVE_MAP_FILENAME)
        parameters["fastpath-file"] = str(config.dest)
        parameters["fastpath-shift"] = str(config.chunk_size.bit_length() - 1)
        parameters["fastpath-stats"] = str(config.state_dir / FASTPATH_STATS_FILENAME)
    command += [f"{key}={value}" for key, value in parameters.items()]
    return command


def plugin_environment() -> dict[str, str]:
    """The embedded interpreter needs postcopy and nbdsrv (wherever they are imported from: the
    checkout when installed editable) and the environment's packages on its path."""
    roots = [
        str(Path(package.__file__ or "").resolve().parent.parent) for package in (postcopy, nbdsrv)
    ]
    paths = [*roots, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    existing = os.environ.get("PYTHONPATH")
    if existing:
        paths.append(existing)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return environment


def _accepts(uri: str) -> bool:
    """Does the server at `uri` complete an NBD handshake?  (A bare connect would make nbdkit
    log a broken handshake.)"""
    import nbdsrv

    async def probe() -> None:
        with trio.fail_after(2.0):
            async with nbdsrv.open_client(uri):
                pass

    try:
        trio.run(probe)
        return True
    except (OSError, nbdsrv.NBDError, trio.TooSlowError):
        return False


def start_nbdkit(
    config: ReceiveConfig, state_lock: StateLock, dest_lock: StateLock
) -> subprocess.Popen[bytes]:
    """Start nbdkit, sharing our locks with it (the plugin adopts the state-directory lock; the
    destination's descriptor just stays open in nbdkit), and wait until it accepts connections."""
    process = subprocess.Popen(
        nbdkit_command(config, state_lock.fd),
        env=plugin_environment(),
        pass_fds=(state_lock.fd, dest_lock.fd),
    )
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while not _accepts(nbd_uri(config)):
        code = process.poll()
        if code is not None:
            raise UserError(f"nbdkit exited with status {code} before listening (see above)")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise UserError(f"nbdkit did not listen within {LISTEN_TIMEOUT:.0f}s")
        time.sleep(0.02)
    return process


def run_receive(config: ReceiveConfig, out: TextIO | None = None) -> int:
    """Lock, check, start nbdkit, print the URI, serve until SIGINT/SIGTERM.  Returns the exit
    code."""
    out = out or sys.stdout
    check_chunk_size(config.chunk_size)
    check_nbdkit()
    with contextlib.ExitStack() as locks:
        state_lock = locks.enter_context(lock_state_dir(config))  # before anything is read
        size = completed_size(config)  # a complete disk needs no source: never probe it
        if size is None:
            size = probe_source(config.source, config.export_name)
        dest_existed = config.dest.exists()
        check_state(config, size, dest_exists=dest_existed)
        if config.socket_path is not None:
            remove_stale_socket(config.socket_path)
        prepare_dest(config.dest, size)
        dest_lock = locks.enter_context(lock_destination(config.dest))
        return _serve(config, state_lock, dest_lock, out)


def _serve(config: ReceiveConfig, state_lock: StateLock, dest_lock: StateLock, out: TextIO) -> int:
    stopping: list[int] = []
    process: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        process = start_nbdkit(config, state_lock, dest_lock)
        if stopping:
            process.send_signal(signal.SIGTERM)
        print(nbd_uri(config), file=out, flush=True)
        while True:
            try:
                code = process.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        return 0
    if code != 0:
        raise UserError(f"nbdkit exited with status {code}")
    return 0
