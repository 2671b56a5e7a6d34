"""The settings of one lazily received disk (Host B), declared once: `DestinationSettings`.

A setting travels through three places: the `postcopy receive` command line, the `key=value`
parameters receive hands nbdkit, and the plugin that builds the engine from them.  Each field of
`DestinationSettings` is one setting under one name: `source_timeout` is the option
`--source-timeout` and the nbdkit parameter `source_timeout=`.  Its metadata (`_setting(...)`)
says once what the setting is: its default (the field's), unit, help text, aliases, and its
`Kind`, which reads it from text and writes it back, so every place speaks the same format.
Everything else is derived from the fields:

    RECEIVE_OPTIONS                the `postcopy receive` options (commands/receive.py builds
                                   its argparse parser from them)
    from_options(values)           settings from the options' texts; a bad one is a one-line
                                   UserError naming the option
    receive_arguments(settings)    the receive options that ask for `settings` again (what
                                   `postcopy config --plan` prints)
    plugin_parameters(settings)    nbdkit's key=value parameters (receive's nbdkit command)
    PLUGIN_KEYS, plugin_key(key)   the keys the plugin accepts (an alias gives its setting's key)
    from_plugin_parameters(...)    the settings parsed back in the plugin; a bad one is a
                                   one-line UserError naming the key

Where a setting goes is its scope: most are both a receive option and an nbdkit parameter;
`socket`, `listen`, `threads` (how receive runs nbdkit) and `domain` (informational) are receive
options only; the drain's tuning knobs are nbdkit parameters only (benchmarks and tests set them,
an operator has no reason to).  Besides the settings, the plugin accepts `state_lock_fd=N`, the
state-directory lock receive hands it (not a setting: a descriptor of one process's life).

Paths are made absolute when read (nbdkit works from `/` once it is a daemon).  The engine's own
configuration is built from these settings by `EngineConfig.from_settings`, and its defaults are
these (`setting_default`): no default is written twice.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from nbdsrv.uri import format_host_port, parse_host_port, parse_nbd_uri
from postcopy.destination.blockmap import DEFAULT_CHUNK_SIZE, check_chunk_size
from postcopy.errors import UserError
from postcopy.units import UnitError, format_size, parse_rate, parse_size

STATE_LOCK_FD_KEY = "state_lock_fd"


class SettingError(UserError):
    """A setting's text that cannot be read: `<option or key>: <problem>`, one line."""


class Scope(enum.Flag):
    RECEIVE = enum.auto()  # an option of `postcopy receive`
    PLUGIN = enum.auto()  # a key=value parameter of the nbdkit plugin
    BOTH = RECEIVE | PLUGIN


@dataclass(frozen=True)
class Kind:
    """How one sort of setting is read from text (`parse`: ValueError saying what is wrong with
    the text, without naming the setting) and written back (`format`, which `parse` reads)."""

    metavar: str
    parse: Callable[[str], Any]
    format: Callable[[Any], str] = str
    show: Callable[[Any], str] = str  # a default in the help text


def _text(text: str) -> str:
    return text


def _nbd_uri(text: str) -> str:
    try:
        parse_nbd_uri(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an NBD URI: {exc}") from None
    return text


def _path(text: str) -> Path:
    if not text:
        raise ValueError("an empty path")
    return Path(text).absolute()


def _chunk_size(text: str) -> int:
    size = parse_size(text)
    try:
        check_chunk_size(size)
    except UserError as exc:
        raise ValueError(str(exc)) from None
    return size


def _size(text: str) -> int:
    return parse_size(text)


def _rate(text: str) -> int | None:
    try:
        return parse_rate(text)
    except UnitError as exc:
        raise ValueError(f"{exc} (e.g. 200M for 200 MiB/s)") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a positive number of seconds")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, not {text!r}")
        return value

    return parse


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _flag(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"{text!r} is not one of {', '.join(_TRUE + _FALSE)}")


def _listen(text: str) -> tuple[str, int]:
    return parse_host_port(text, default_host="0.0.0.0", allow_port_zero=True)


TEXT = Kind("TEXT", _text)
NBD_URI = Kind("URI", _nbd_uri)
PATH = Kind("PATH", _path)
CHUNK_SIZE = Kind("SIZE", _chunk_size, show=format_size)
SIZE = Kind("SIZE", _size, show=format_size)
RATE = Kind("RATE", _rate)
SECONDS = Kind("SECONDS", _seconds, format=repr, show=lambda value: f"{value:g}")
THREADS = Kind("N", _count(1))
COUNT = Kind("N", _count(0))
FLAG = Kind("", _flag, format=lambda value: "1" if value else "0")
HOST_PORT = Kind("HOST:PORT", _listen, format=lambda address: format_host_port(*address))


@dataclass(frozen=True)
class Setting:
    """One field's metadata; `name` and `default` are the field's."""

    name: str
    default: Any  # dataclasses.MISSING: required
    kind: Kind
    help: str
    scope: Scope
    unit: str
    unset: str | None  # what a None default means, for the help text
    aliases: tuple[str, ...]  # older names, as field names (`unreachable_timeout`)
    one_of: str | None  # settings sharing this tag: exactly one is given
    explicit: bool  # written out by receive_arguments even at its default

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def option(self) -> str:
        return option_name(self.name)

    @property
    def options(self) -> tuple[str, ...]:
        return (self.option, *map(option_name, self.aliases))

    @property
    def is_flag(self) -> bool:
        return self.kind is FLAG

    def help_text(self) -> str:
        if self.required or self.is_flag:
            return self.help
        if self.default is None:
            return f"{self.help} (default: {self.unset})" if self.unset else self.help
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.help} (default {self.kind.show(self.default)}{unit})"

    def parse(self, text: str, where: str) -> Any:
        """The value of `text`; SettingError `<where>: <problem>` when it cannot be read."""
        return _read(self.kind, text, where)


def _read(kind: Kind, text: str, where: str) -> Any:
    try:
        return kind.parse(text)
    except ValueError as exc:
        raise SettingError(f"{where}: {exc}") from None


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _setting(
    default: Any = MISSING,
    *,
    kind: Kind,
    help: str,
    scope: Scope = Scope.BOTH,
    unit: str = "",
    unset: str | None = None,
    aliases: tuple[str, ...] = (),
    one_of: str | None = None,
    explicit: bool = False,
) -> Any:
    spec = {
        "kind": kind, "help": help, "scope": scope, "unit": unit, "unset": unset,
        "aliases": aliases, "one_of": one_of, "explicit": explicit,
    }  # fmt: skip
    return field(default=default, metadata={"setting": spec})


@dataclass(frozen=True, kw_only=True)
class DestinationSettings:
    """Everything one lazily received disk is run with.  The field order is the order
    `receive_arguments` writes the options in."""

    domain: str | None = _setting(
        None, kind=TEXT, scope=Scope.RECEIVE, help="the domain this disk belongs to (informational)"
    )
    source: str = _setting(kind=NBD_URI, help="the source's NBD URI")
    dest: Path = _setting(kind=PATH, help="the local (sparse) disk file")
    state_dir: Path = _setting(kind=PATH, help="block map and status")
    socket: Path | None = _setting(
        None, kind=PATH, scope=Scope.RECEIVE, one_of="where", help="serve on this Unix socket"
    )
    listen: tuple[str, int] | None = _setting(
        None, kind=HOST_PORT, scope=Scope.RECEIVE, one_of="where",
        help="serve on this TCP address",
    )  # fmt: skip
    # part of the state directory's identity: a plan states it rather than lean on the default
    chunk_size: int = _setting(
        DEFAULT_CHUNK_SIZE, kind=CHUNK_SIZE, explicit=True,
        help="block map chunk size: a power of two from 4K to 64M",
    )  # fmt: skip
    bandwidth: int | None = _setting(
        None, kind=RATE, unset="unlimited",
        help="cap the background drain at RATE bytes/s per disk, e.g. 200M (= 200 MiB/s); "
        "guest misses are never held back",
    )  # fmt: skip
    source_id: str | None = _setting(
        None, kind=TEXT, unset="the URI", help="identifies the source in the state"
    )
    wait_for_source: bool = _setting(
        False, kind=FLAG, help="keep nothing from the source until `postcopy source-frozen`"
    )
    export_name: str | None = _setting(
        None, kind=TEXT, unset="the URI's", help="the source export"
    )
    # nbdkit worker threads per connection.  nbdkit reads a connection's next request only when
    # one of its threads is free, and a request that waits for the source (a read miss, a
    # sub-chunk write into a missing chunk) holds its thread up to --source-timeout during an
    # outage.  So there are as many threads as a client keeps requests in flight: the Linux
    # kernel's nbd driver at most 128 per connection, QEMU 16.  Then waiting requests never keep
    # reads of present data or writes from being read and answered.  Idle threads cost only
    # their (untouched) stacks; threads in use are bounded by the client's queue depth.
    threads: int = _setting(128, kind=THREADS, scope=Scope.RECEIVE, help="nbdkit threads")
    source_timeout: float = _setting(
        180.0, kind=SECONDS, unit="seconds", aliases=("unreachable_timeout",),
        help="how long guest reads of missing data wait for an unreachable source before they "
        "fail with EIO",
    )  # fmt: skip
    request_timeout: float = _setting(
        10.0, kind=SECONDS, unit="seconds",
        help="a source request unanswered this long means a stalled source: reconnect",
    )  # fmt: skip
    # the drain's tuning (nbdkit parameters only)
    drain_requests: int = _setting(
        4, kind=COUNT, scope=Scope.PLUGIN, help="drain requests in flight (0: no drain requests)"
    )
    drain_request_size: int = _setting(
        1024 * 1024, kind=SIZE, scope=Scope.PLUGIN, help="largest drain request"
    )
    # after a guest miss the drain keeps at most this many requests in flight for a while, so
    # that the source and this process answer the guest first (0: the drain yields completely
    # during a burst of misses, but never for more than a second at a time)
    drain_requests_during_faults: int = _setting(
        0, kind=COUNT, scope=Scope.PLUGIN, help="drain requests in flight while the guest misses"
    )
    # serve guest misses on nbdkit's worker threads over blocking connections (plain nbd:// and
    # nbd+unix:// sources; the engine's trio thread otherwise)
    blocking_misses: bool = _setting(
        True, kind=FLAG, scope=Scope.PLUGIN, help="serve misses on nbdkit's worker threads"
    )


def _settings() -> tuple[Setting, ...]:
    settings = tuple(
        Setting(name=f.name, default=f.default, **f.metadata["setting"])
        for f in fields(DestinationSettings)
    )
    for setting in settings:  # a receive flag is an option that turns something on
        assert not (Scope.RECEIVE in setting.scope and setting.is_flag and setting.default), setting
    return settings


SETTINGS = _settings()
_BY_NAME = {setting.name: setting for setting in SETTINGS}
RECEIVE_OPTIONS = tuple(s for s in SETTINGS if Scope.RECEIVE in s.scope)
_PLUGIN_SETTINGS = tuple(s for s in SETTINGS if Scope.PLUGIN in s.scope)
PLUGIN_KEYS = (*(s.name for s in _PLUGIN_SETTINGS), STATE_LOCK_FD_KEY)
_PLUGIN_ALIASES = {alias: s.name for s in _PLUGIN_SETTINGS for alias in s.aliases}


def setting_default(name: str) -> Any:
    """The default of the setting `name` (for the engine's configuration)."""
    default = _BY_NAME[name].default
    assert default is not MISSING, f"{name} has no default"
    return default


# ===== the receive command line ===================================================================


def from_options(values: Mapping[str, str | bool | None]) -> DestinationSettings:
    """The settings that receive options ask for: `values` maps each option's setting name to
    its text (None: not given, the default; a flag's value is a bool).  Checks exactly one of
    each `one_of` group is given (argparse does too)."""
    chosen: dict[str, Any] = {}
    for setting in RECEIVE_OPTIONS:
        value = values.get(setting.name)
        if value is None:
            if setting.required:
                raise SettingError(f"{setting.option} is required")
        elif isinstance(value, bool):
            chosen[setting.name] = value
        else:
            chosen[setting.name] = setting.parse(value, setting.option)
    for group in {s.one_of for s in RECEIVE_OPTIONS if s.one_of}:
        members = [s for s in RECEIVE_OPTIONS if s.one_of == group]
        if sum(s.name in chosen for s in members) != 1:
            raise SettingError(f"give one of {', '.join(s.option for s in members)}")
    return DestinationSettings(**chosen)


def receive_arguments(settings: DestinationSettings) -> list[str]:
    """The `postcopy receive` options that ask for `settings` (read back by `from_options`):
    every receive option whose value is not its default, plus the `explicit` ones."""
    arguments: list[str] = []
    for setting in RECEIVE_OPTIONS:
        value = getattr(settings, setting.name)
        if value is None or (value == setting.default and not setting.explicit):
            continue
        if setting.is_flag:
            arguments.append(setting.option)  # on: a receive flag's default is off
        else:
            arguments += [setting.option, setting.kind.format(value)]
    return arguments


# ===== the nbdkit plugin's parameters ============================================================


def plugin_parameters(
    settings: DestinationSettings, state_lock_fd: int | None = None
) -> dict[str, str]:
    """nbdkit's key=value parameters for the plugin: every plugin setting that is not None (so
    the nbdkit command line states what the engine runs with), and the lock's descriptor."""
    parameters = {
        setting.name: setting.kind.format(getattr(settings, setting.name))
        for setting in _PLUGIN_SETTINGS
        if getattr(settings, setting.name) is not None
    }
    if state_lock_fd is not None:
        parameters[STATE_LOCK_FD_KEY] = str(state_lock_fd)
    return parameters


def plugin_key(key: str) -> str:
    """The parameter `key` as the plugin keeps it (an alias becomes its setting's name); a key
    the plugin does not know is a one-line SettingError listing those it knows."""
    if key in PLUGIN_KEYS:
        return key
    if key in _PLUGIN_ALIASES:
        return _PLUGIN_ALIASES[key]
    raise SettingError(f"unknown parameter {key!r} (known: {', '.join(PLUGIN_KEYS)})")


def from_plugin_parameters(
    parameters: Mapping[str, str],
) -> tuple[DestinationSettings, int | None]:
    """The settings (and the inherited lock's descriptor, None when there is none) that
    `plugin_parameters` wrote; a missing, unknown or bad parameter is a one-line SettingError
    naming its key."""
    given = {plugin_key(key): value for key, value in parameters.items()}
    missing = [s.name for s in _PLUGIN_SETTINGS if s.required and s.name not in given]
    if missing:
        raise SettingError(f"missing parameter(s): {', '.join(missing)}")
    chosen = {
        setting.name: setting.parse(given[setting.name], setting.name)
        for setting in _PLUGIN_SETTINGS
        if setting.name in given
    }
    state_lock_fd = None
    if STATE_LOCK_FD_KEY in given:
        state_lock_fd = _read(COUNT, given[STATE_LOCK_FD_KEY], STATE_LOCK_FD_KEY)
    return DestinationSettings(**chosen), state_lock_fd
