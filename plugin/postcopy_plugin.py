# nbdkit python plugin of postcopy's lazy destination.  `postcopy receive` runs it like this:
#
#   PYTHONPATH=<project root>:<venv site-packages> \
#   nbdkit -f --exit-with-parent -t 128 -U /run/disk.sock python plugin/postcopy_plugin.py \
#       source=nbd://host-a:10809/disk dest=/var/lib/vm/disk.img state_dir=/var/lib/vm/disk.state \
#       chunk_size=65536 bandwidth=209715200 wait_for_source=1 source_timeout=180.0 \
#       request_timeout=10.0 ...
#
# The parameters are the settings of `postcopy.destination.settings.DestinationSettings` (the
# keys are its field names, the same as receive's options: source_timeout is --source-timeout),
# read back by the same code that wrote them; a key or value it cannot read stops nbdkit with
# one line naming the key.
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

import nbdkit

from postcopy.destination.engine import Engine, EngineConfig
from postcopy.destination.settings import from_plugin_parameters, plugin_key
from postcopy.destination.statelock import StateLock, acquire_state_lock, adopt_state_lock

API_VERSION = 2

_parameters: dict[str, str] = {}  # key (an alias as its setting's key) -> text, the last given
_engine: Engine | None = None
_engine_pid = 0
_state_lock: StateLock | None = None  # held for the life of the process, never released


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    _parameters[plugin_key(key)] = value  # an unknown key is refused here


def config_complete():
    global _engine, _state_lock
    settings, state_lock_fd = from_plugin_parameters(_parameters)
    if state_lock_fd is not None:
        _state_lock = adopt_state_lock(settings.state_dir, state_lock_fd, "nbdkit")
    else:
        _state_lock = acquire_state_lock(settings.state_dir, "nbdkit")
    _engine = Engine(EngineConfig.from_settings(settings))


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
