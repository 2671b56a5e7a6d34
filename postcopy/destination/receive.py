"""`postcopy receive`: serve a lazily fetched disk on the destination host through nbdkit.

How it works.  `run_receive` first locks the state directory (`postcopy.destination.statelock`: a
second receive on it is refused before anything there is read), then checks everything an operator
can get wrong before anything listens (nbdkit and its python plugin installed, the source reachable
and its size, the destination file's size, the state directory's identity, read-only), creates the
sparse destination file when it does not exist, then starts `nbdkit -f --exit-with-parent` with
`plugin/postcopy_plugin.py`, the disk's settings as `key=value` parameters (written and read back
by `postcopy.destination.settings`) and the lock's descriptor inherited (the plugin adopts it, so
the lock lives as long as receive and nbdkit do).
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
import errno
import importlib.resources
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import TextIO

import trio

import nbdsrv
import postcopy
from nbdsrv import listeners
from nbdsrv.uri import format_host_port
from postcopy.destination.blockmap import (
    JOURNAL_FILENAME,
    LIVE_MAP_FILENAME,
    SNAPSHOT_FILENAME,
    BlockMap,
    MapIdentity,
    check_chunk_size,
)
from postcopy.destination.engine import EngineConfig
from postcopy.destination.pivoted import check_not_pivoted
from postcopy.destination.settings import DestinationSettings, plugin_parameters
from postcopy.destination.statelock import StateLock, acquire_state_lock, lock_destination
from postcopy.errors import StateError, UserError

# `plugin/` of the checkout, installed as the package `postcopy_plugin` (see pyproject.toml)
PLUGIN_PACKAGE = "postcopy_plugin"
FASTPATH_FILTER_NAME = "postcopy-fastpath.so"
# where the fast path filter's hit and miss counts land when nbdkit exits (tests read them)
FASTPATH_STATS_FILENAME = "fastpath.stats"
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


def nbd_uri(settings: DestinationSettings) -> str:
    """The URI a hypervisor opens: nbd+unix:///?socket=PATH or nbd://HOST:PORT/."""
    if settings.socket is not None:
        return f"nbd+unix:///?socket={settings.socket}"
    assert settings.listen is not None
    return f"nbd://{format_host_port(*settings.listen)}/"


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


def map_identity(settings: DestinationSettings, size: int) -> MapIdentity:
    """The identity the engine will give the block map (`EngineConfig.map_identity`)."""
    return EngineConfig.from_settings(settings).map_identity(size)


def lock_state_dir(settings: DestinationSettings) -> StateLock:
    """Create the state directory if needed and lock it (`StateDirInUse` naming the holder when
    another receive has it); nothing else in it is read or written before this."""
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {settings.state_dir}: {exc.strerror}") from None
    return acquire_state_lock(settings.state_dir, "postcopy receive")


def check_state(settings: DestinationSettings, size: int, *, dest_exists: bool = True) -> None:
    """Refuse a state directory that belongs to another disk, or whose map says data is present
    in a destination file that is gone (StateError, one line).  Reads only: the engine, which
    opens the map for real, is the one that may repair a torn journal tail."""
    block_map = BlockMap.open_read_only(settings.state_dir, map_identity(settings, size))
    try:
        if not dest_exists and block_map.present_count:
            raise StateError(
                f"state directory {settings.state_dir} records {block_map.present_bytes} bytes "
                f"present in {settings.dest}, which does not exist (use a new state directory)"
            )
    finally:
        block_map.close()


def completed_size(settings: DestinationSettings) -> int | None:
    """The disk size when the destination is already complete (else None).  Reads only."""
    if not settings.dest.is_file() or not settings.state_dir.is_dir():
        return None
    map_files = (settings.state_dir / SNAPSHOT_FILENAME, settings.state_dir / JOURNAL_FILENAME)
    if not any(path.exists() for path in map_files):
        return None  # no map yet (an empty map of a 0-byte file would look complete)
    size = settings.dest.stat().st_size
    try:
        block_map = BlockMap.open_read_only(settings.state_dir, map_identity(settings, size))
    except UserError:
        return None
    try:
        return size if block_map.is_complete else None
    finally:
        block_map.close()


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on (nbdkit would not replace it); UserError for a
    live socket or another kind of file."""
    try:
        listeners.remove_stale_socket(str(path))
    except FileExistsError:
        raise UserError(f"{path} exists and is not a socket") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"socket {path} is in use by another server") from None
        raise UserError(f"cannot check socket {path}: {exc.strerror or exc}") from None


def fastpath_filter_path() -> Path | None:
    """The built fast path filter, in the lib directory of this interpreter's environment (where
    `make venv` builds it from the plugin package's `fastpath.c`); None when it is not built."""
    candidate = Path(sys.prefix) / "lib" / FASTPATH_FILTER_NAME
    return candidate if candidate.is_file() else None


def nbdkit_command(settings: DestinationSettings, state_lock_fd: int | None = None) -> list[str]:
    """nbdkit's command line; with `state_lock_fd`, the plugin adopts that inherited descriptor
    as its state-directory lock (without it, the plugin takes the lock itself)."""
    command = ["nbdkit", "-f", "--exit-with-parent", "-t", str(settings.threads)]
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
    if settings.socket is not None:
        command += ["-U", str(settings.socket)]
    else:
        assert settings.listen is not None
        host, port = settings.listen
        command += ["-i", host, "-p", str(port)]
    command += ["python", str(PLUGIN_PATH)]
    parameters = plugin_parameters(settings, state_lock_fd)
    if fastpath is not None:
        parameters["fastpath-map"] = str(settings.state_dir / LIVE_MAP_FILENAME)
        parameters["fastpath-file"] = str(settings.dest)
        parameters["fastpath-shift"] = str(settings.chunk_size.bit_length() - 1)
        parameters["fastpath-stats"] = str(settings.state_dir / FASTPATH_STATS_FILENAME)
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
    settings: DestinationSettings, state_lock: StateLock, dest_lock: StateLock
) -> subprocess.Popen[bytes]:
    """Start nbdkit, sharing our locks with it (the plugin adopts the state-directory lock; the
    destination's descriptor just stays open in nbdkit), and wait until it accepts connections."""
    process = subprocess.Popen(
        nbdkit_command(settings, state_lock.fd),
        env=plugin_environment(),
        pass_fds=(state_lock.fd, dest_lock.fd),
    )
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while not _accepts(nbd_uri(settings)):
        code = process.poll()
        if code is not None:
            raise UserError(f"nbdkit exited with status {code} before listening (see above)")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise UserError(f"nbdkit did not listen within {LISTEN_TIMEOUT:.0f}s")
        time.sleep(0.02)
    return process


def run_receive(settings: DestinationSettings, out: TextIO | None = None) -> int:
    """Lock, check, start nbdkit, print the URI, serve until SIGINT/SIGTERM.  Returns the exit
    code."""
    out = out or sys.stdout
    check_chunk_size(settings.chunk_size)
    check_nbdkit()
    with contextlib.ExitStack() as locks:
        state_lock = locks.enter_context(lock_state_dir(settings))  # before anything is read
        check_not_pivoted(settings.state_dir)  # the domain uses the file directly by now
        size = completed_size(settings)  # a complete disk needs no source: never probe it
        if size is None:
            size = probe_source(settings.source, settings.export_name)
        dest_existed = settings.dest.exists()
        check_state(settings, size, dest_exists=dest_existed)
        if settings.socket is not None:
            remove_stale_socket(settings.socket)
        prepare_dest(settings.dest, size)
        dest_lock = locks.enter_context(lock_destination(settings.dest))
        return _serve(settings, state_lock, dest_lock, out)


def _serve(
    settings: DestinationSettings, state_lock: StateLock, dest_lock: StateLock, out: TextIO
) -> int:
    stopping: list[int] = []
    process: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        process = start_nbdkit(settings, state_lock, dest_lock)
        if stopping:
            process.send_signal(signal.SIGTERM)
        print(nbd_uri(settings), file=out, flush=True)
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
