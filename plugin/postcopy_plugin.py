# nbdkit python plugin of postcopy's lazy destination.  `postcopy receive` runs it like this:
#
#   PYTHONPATH=<project root>:<venv site-packages> \
#   nbdkit -f --exit-with-parent -t 128 -U /run/disk.sock python plugin/postcopy_plugin.py \
#       source=nbd://host-a:10809/disk dest=/var/lib/vm/disk.img state_dir=/var/lib/vm/disk.state \
#       chunk_size=65536 wait_for_source=1 unreachable_timeout=180 request_timeout=10 \
#       bandwidth=209715200
#
# The script is a thin shell: every callback hands the request to one
# `postcopy.destination.engine.Engine` per nbdkit process (so every connection sees the same disk:
# can_multi_conn is true).  The engine is created in config_complete (a bad state directory stops
# nbdkit before it listens) and its trio thread is started in after_fork (a thread started before
# nbdkit forks would be lost in the child).  Errors reach the client with the engine's errno via
# nbdkit.set_error.  Before the engine opens anything, config_complete takes the state directory's
# lock (postcopy.destination.statelock): it adopts the descriptor `postcopy receive` passes as
# state_lock_fd=N, or locks it itself when nbdkit is started by hand; the lock is held until the
# process exits.

import errno
import os
from pathlib import Path

import nbdkit

from postcopy.destination.engine import Engine, EngineConfig
from postcopy.destination.statelock import StateLock, acquire_state_lock, adopt_state_lock

API_VERSION = 2

_REQUIRED = ("source", "dest", "state_dir")
_settings: dict[str, str] = {}
_engine: Engine | None = None
_engine_pid = 0
_state_lock: StateLock | None = None  # held for the life of the process, never released


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    known = _REQUIRED + (
        "chunk_size", "wait_for_source", "export_name", "source_id", "unreachable_timeout",
        "drain_requests", "drain_request_size", "request_timeout", "bandwidth",
        "drain_requests_during_faults", "blocking_misses", "state_lock_fd",
    )
    if key not in known:
        raise ValueError(f"unknown parameter {key!r} (known: {', '.join(known)})")
    _settings[key] = value


def config_complete():
    global _engine, _state_lock
    missing = [key for key in _REQUIRED if key not in _settings]
    if missing:
        raise ValueError(f"missing parameter(s): {', '.join(missing)}")
    state_dir = Path(_settings["state_dir"])
    if "state_lock_fd" in _settings:
        _state_lock = adopt_state_lock(state_dir, int(_settings["state_lock_fd"]), "nbdkit")
    else:
        _state_lock = acquire_state_lock(state_dir, "nbdkit")
    engine_config = EngineConfig(
        source_uri=_settings["source"],
        dest_path=Path(_settings["dest"]),
        state_dir=Path(_settings["state_dir"]),
        wait_for_source=_settings.get("wait_for_source", "0") in ("1", "true", "yes"),
        export_name=_settings.get("export_name"),
        source_id=_settings.get("source_id"),
    )
    if "chunk_size" in _settings:
        engine_config.chunk_size = nbdkit.parse_size(_settings["chunk_size"])
    if "unreachable_timeout" in _settings:
        engine_config.unreachable_timeout = float(_settings["unreachable_timeout"])
    if "request_timeout" in _settings:
        engine_config.request_timeout = float(_settings["request_timeout"])
    if "bandwidth" in _settings:
        engine_config.bandwidth = int(_settings["bandwidth"]) or None
    if "drain_requests" in _settings:
        engine_config.drain_requests_in_flight = int(_settings["drain_requests"])
    if "drain_requests_during_faults" in _settings:
        engine_config.drain_requests_during_faults = int(_settings["drain_requests_during_faults"])
    if "blocking_misses" in _settings:
        engine_config.blocking_misses = _settings["blocking_misses"] in ("1", "true", "yes")
    if "drain_request_size" in _settings:
        engine_config.drain_request_bytes = nbdkit.parse_size(_settings["drain_request_size"])
    _engine = Engine(engine_config)


def after_fork():
    global _engine_pid
    _engine_pid = os.getpid()
    _engine.start()


def cleanup():
    if _engine is not None and _engine_pid == os.getpid():
        _engine.stop()


def open(readonly):
    return 1


def get_size(h):
    return _engine.size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_extents(h):
    return True


def can_multi_conn(h):
    return True


def is_rotational(h):
    return False


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def _fail(exc):
    nbdkit.set_error(exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO)


def pread(h, buf, offset, flags):
    try:
        _engine.pread_into(buf, offset)
    except Exception as exc:
        _fail(exc)
        raise


def pwrite(h, buf, offset, flags):
    try:
        _engine.pwrite(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _fail(exc)
        raise


def flush(h, flags):
    try:
        _engine.flush()
    except Exception as exc:
        _fail(exc)
        raise


def trim(h, count, offset, flags):
    try:
        _engine.trim(offset, count, fua=bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _fail(exc)
        raise


def zero(h, count, offset, flags):
    try:
        _engine.zero(
            offset,
            count,
            may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
            fua=bool(flags & nbdkit.FLAG_FUA),
            fast_only=bool(flags & nbdkit.FLAG_FAST_ZERO),
        )
    except Exception as exc:
        _fail(exc)
        raise


def cache(h, count, offset, flags):
    try:
        _engine.cache(offset, count)
    except Exception as exc:
        _fail(exc)
        raise


def extents(h, count, offset, flags):
    try:
        found = _engine.extents(offset, count)
    except Exception as exc:
        _fail(exc)
        raise
    if flags & nbdkit.FLAG_REQ_ONE:
        return found[:1]
    return found
