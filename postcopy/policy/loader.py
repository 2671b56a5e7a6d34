"""Per-domain migration policy, the loader: find the TOML file, parse it, check it, build it.

How it works. `load_config()` finds the file (`--config`, else `$POSTCOPY_CONFIG`, else
`/etc/postcopy/domains.toml`), parses it with the standard library's `tomllib`, then checks every
table and key against the schema (`postcopy.policy.schema`) and builds frozen dataclasses:
`PolicyConfig` holding one `DomainPolicy` per listed domain, each with its `DiskPolicy`s. tomllib
reports syntax errors with a line and column, but gives no positions for values it parsed fine; for
the semantic checks (unknown key, bad size, duplicate disk, bad mode, wrong type) `_TomlKeyLines`
scans the text once and maps every key path to the line that defines it, so each error names file,
line and problem:

    domains.toml:14: domains.web1.disks[1].device: duplicate disk 'xvda' (first on line 9)

The file's keys and the objects built from them are in `postcopy.policy.schema`.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from postcopy.policy.schema import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MODE,
    DEFAULT_SOCKET_DIR,
    DEFAULT_STATE_ROOT,
    DEVICE_PATTERN,
    MAX_CHUNK_SIZE,
    MAX_UNIX_SOCKET_PATH,
    MIN_CHUNK_SIZE,
    NAME_PATTERN,
    ConfigError,
    DiskPolicy,
    DomainPolicy,
    MigrationMode,
    NbdEndpoint,
    PolicyConfig,
    parse_host_port,
    parse_nbd_address,
)
from postcopy.units import UnitError, parse_rate, parse_size

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "add_config_argument",
    "load_config",
    "parse_config",
    "resolve_config_path",
]

DEFAULT_CONFIG_PATH = Path("/etc/postcopy/domains.toml")
CONFIG_ENV_VAR = "POSTCOPY_CONFIG"

# --- Finding lines: map each key path of a valid TOML text to the line defining it. -----------

KeyPath = tuple[str | int, ...]
_T = TypeVar("_T")


class _TomlKeyLines:
    """Scans valid TOML (tomllib accepted it) and records the line of every table and key.

    Paths use ints for array elements: `("domains", "web1", "disks", 1, "device")`. Arrays of
    tables are counted per parent element; inline tables and arrays are walked the same way.
    """

    _BARE = re.compile(r"[A-Za-z0-9_-]+")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[KeyPath, int] = {}
        self._array_tables: dict[KeyPath, int] = {}
        self._scan()

    def line_of(self, path: Iterable[str | int]) -> int | None:
        """The line of `path`, or of its nearest recorded ancestor."""
        key = tuple(path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return None

    # -- low-level reading
    def _line(self) -> int:
        return self.text.count("\n", 0, self.pos) + 1

    def _peek(self, count: int = 1) -> str:
        return self.text[self.pos : self.pos + count]

    def _skip_blank(self, newlines: bool) -> None:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\r" or (newlines and char == "\n"):
                self.pos += 1
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def _read_string(self) -> str:
        """Read a string at pos (any of the four TOML kinds) and return its value."""
        start = self.pos
        for quote_mark in ('"""', "'''"):
            if self._peek(3) == quote_mark:
                end = _closing_quote(self.text, quote_mark, self.pos + 3)
                # Up to two extra quotes may close the string ("""a"""" is 'a"').
                while self.text[end + 3 : end + 4] == quote_mark[0]:
                    end += 1
                self.pos = end + 3
                return str(tomllib.loads("v = " + self.text[start : self.pos])["v"])
        quote_mark = self.text[self.pos]
        self.pos = _closing_quote(self.text, quote_mark, self.pos + 1) + 1
        return str(tomllib.loads("v = " + self.text[start : self.pos])["v"])

    def _read_key(self) -> list[str]:
        parts: list[str] = []
        while True:
            self._skip_blank(newlines=False)
            if self._peek() in ('"', "'"):
                parts.append(self._read_string())
            else:
                match = self._BARE.match(self.text, self.pos)
                if match is None:  # pragma: no cover - tomllib accepted the text
                    raise ValueError(f"no key at line {self._line()}")
                parts.append(match.group())
                self.pos = match.end()
            self._skip_blank(newlines=False)
            if self._peek() != ".":
                return parts
            self.pos += 1

    # -- structure
    def _resolve(self, keys: list[str]) -> KeyPath:
        """Turn header keys into a path, entering the current element of each array of tables."""
        path: KeyPath = ()
        for key in keys:
            path = (*path, key)
            if path in self._array_tables:
                path = (*path, self._array_tables[path] - 1)
        return path

    def _record(self, path: KeyPath, line: int) -> None:
        for end in range(1, len(path) + 1):
            self.lines.setdefault(path[:end], line)

    def _scan(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip_blank(newlines=True)
            if self.pos >= len(self.text):
                return
            line = self._line()
            if self._peek(2) == "[[":
                self.pos += 2
                keys = self._read_key()
                parent = self._resolve(keys[:-1])
                array_path = (*parent, keys[-1])
                index = self._array_tables.get(array_path, 0)
                self._array_tables[array_path] = index + 1
                table = (*array_path, index)
                self.pos = self.text.index("]]", self.pos) + 2
                self._record(table, line)
            elif self._peek() == "[":
                self.pos += 1
                table = self._resolve(self._read_key())
                self.pos = self.text.index("]", self.pos) + 1
                self._record(table, line)
            else:
                self._key_value(table)

    def _key_value(self, table: KeyPath) -> None:
        line = self._line()
        path = (*table, *self._read_key())
        self._record(path, line)
        self._skip_blank(newlines=False)
        self.pos += 1  # "="
        self._skip_blank(newlines=False)
        self._value(path)

    def _value(self, path: KeyPath) -> None:
        char = self._peek()
        if char in ('"', "'"):
            self._read_string()
        elif char == "[":
            self.pos += 1
            index = 0
            while True:
                self._skip_blank(newlines=True)
                if self._peek() == "]":
                    self.pos += 1
                    return
                self._record((*path, index), self._line())
                self._value((*path, index))
                index += 1
                self._skip_blank(newlines=True)
                if self._peek() == ",":
                    self.pos += 1
        elif char == "{":
            self.pos += 1
            while True:
                self._skip_blank(newlines=True)
                if self._peek() == "}":
                    self.pos += 1
                    return
                self._key_value(path)
                self._skip_blank(newlines=True)
                if self._peek() == ",":
                    self.pos += 1
        else:
            match = re.compile(r"[^,\]}\s#]+").match(self.text, self.pos)
            self.pos = match.end() if match else self.pos + 1
            # Dates with a space ("1979-05-27 07:32:00") are one value in two words.
            if re.match(r" \d\d:\d\d", self.text[self.pos : self.pos + 6]):
                self.pos += 1
                match = re.compile(r"[^,\]}\s#]+").match(self.text, self.pos)
                self.pos = match.end() if match else self.pos


def _closing_quote(text: str, quote_mark: str, start: int) -> int:
    """Where `quote_mark` (one or three quotes) next closes a string, searching from `start`;
    in a basic ("...") string a quote after an odd run of backslashes is escaped and skipped.
    ValueError when nothing closes it."""
    end = start
    while True:
        end = text.index(quote_mark, end)
        if quote_mark[0] == '"' and _escaped(text, end):
            end += 1
            continue
        return end


def _escaped(text: str, index: int) -> bool:
    """Whether the character at `index` follows an odd number of backslashes."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


# --- Checking the parsed document against the schema. ------------------------------------------

_POLICY_KEYS = ("mode", "chunk_size", "bandwidth", "state_root", "socket_dir", "source")
_DISK_KEYS = ("device", "source_image", "dest_file", "export", "listen")


def _dotted(path: KeyPath) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            shown = part if _TomlKeyLines._BARE.fullmatch(part) else f'"{part}"'
            text += f".{shown}" if text else shown
    return text


class _Checker:
    """Walks the parsed document; every problem becomes a `ConfigError` with its line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text
        self._lines: _TomlKeyLines | None = None

    def line_of(self, key: KeyPath) -> int | None:
        if self._lines is None:
            try:
                self._lines = _TomlKeyLines(self.text)
            except (ValueError, IndexError, tomllib.TOMLDecodeError):
                # A construct the scanner misreads must not hide the real problem: report it
                # without a line rather than fail.
                return None
        return self._lines.line_of(key)

    def fail(self, key: KeyPath, problem: str) -> ConfigError:
        prefix = f"{_dotted(key)}: " if key else ""
        return ConfigError(self.path, self.line_of(key), prefix + problem)

    def table(self, value: Any, key: KeyPath) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, not {_type_name(value)}")
        return value

    def unknown_keys(self, table: Mapping[str, Any], allowed: Iterable[str], key: KeyPath) -> None:
        allowed = tuple(allowed)
        for name in table:
            if name not in allowed:
                raise self.fail((*key, name), f"unknown key {name!r} (known: {', '.join(allowed)})")

    def string(self, value: Any, key: KeyPath) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {_type_name(value)}")
        return value

    def absolute_path(self, value: Any, key: KeyPath) -> Path:
        text = self.string(value, key)
        if not text.startswith("/"):
            raise self.fail(key, f"{text!r} must be an absolute path")
        return Path(os.path.normpath(text))

    def mode(self, value: Any, key: KeyPath) -> MigrationMode:
        text = self.string(value, key)
        try:
            return MigrationMode(text)
        except ValueError:
            modes = ", ".join(m.value for m in MigrationMode)
            raise self.fail(key, f"mode {text!r} is not one of {modes}") from None

    def chunk_size(self, value: Any, key: KeyPath) -> int:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise self.fail(key, f'must be a size like "64K", not {_type_name(value)}')
        try:
            size = parse_size(value)
        except UnitError as exc:
            raise self.fail(key, str(exc)) from None
        if size & (size - 1) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
            raise self.fail(key, f"chunk size {value!r} must be a power of two from 4K to 64M")
        return size

    def bandwidth(self, value: Any, key: KeyPath) -> int | None:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise self.fail(key, f'must be a rate like "200M", not {_type_name(value)}')
        try:
            return parse_rate(value)
        except UnitError as exc:
            raise self.fail(key, str(exc)) from None

    def source(self, value: Any, key: KeyPath) -> NbdEndpoint:
        try:
            return parse_nbd_address(self.string(value, key))
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)  # fmt: skip


def _policy_fields(
    checker: _Checker, table: Mapping[str, Any], key: KeyPath, base: DomainPolicy
) -> DomainPolicy:
    """A copy of `base` with the policy keys `table` sets (mode, sizes, paths, source)."""

    def setting(name: str, check: Callable[[Any, KeyPath], _T]) -> _T:
        """The key `name` of `table`, checked, else `base`'s (the key names the field)."""
        return check(table[name], (*key, name)) if name in table else getattr(base, name)

    mode = setting("mode", checker.mode)
    chunk = setting("chunk_size", checker.chunk_size)
    bandwidth = setting("bandwidth", checker.bandwidth)
    state_root = setting("state_root", checker.absolute_path)
    socket_dir = setting("socket_dir", checker.absolute_path)
    source = setting("source", checker.source)
    return DomainPolicy(
        base.name, mode, base.disks, chunk, bandwidth, state_root, socket_dir, source,
        base.listed, base.config_file,
    )  # fmt: skip


def _disks(checker: _Checker, value: Any, key: KeyPath, domain: str) -> tuple[DiskPolicy, ...]:
    if not isinstance(value, list):
        raise checker.fail(
            key, f"must be an array of tables ([[{_dotted(key)}]]), not {_type_name(value)}"
        )
    disks: list[DiskPolicy] = []
    first_line: dict[tuple[str, str], tuple[str, int | None]] = {}
    for index, item in enumerate(value):
        item_key = (*key, index)
        table = checker.table(item, item_key)
        checker.unknown_keys(table, _DISK_KEYS, item_key)
        for required in ("device", "source_image"):
            if required not in table:
                raise checker.fail(item_key, f"disk needs {required!r}")
        device = checker.string(table["device"], (*item_key, "device"))
        if not DEVICE_PATTERN.match(device):
            raise checker.fail((*item_key, "device"), f"{device!r} is not a device name like 'vda'")
        source_image = checker.absolute_path(table["source_image"], (*item_key, "source_image"))
        dest_file = (
            checker.absolute_path(table["dest_file"], (*item_key, "dest_file"))
            if "dest_file" in table
            else source_image
        )
        export = (
            checker.string(table["export"], (*item_key, "export"))
            if "export" in table
            else f"{domain}-{device}"
        )
        if len(export.encode()) > 4096:
            raise checker.fail((*item_key, "export"), "export names are at most 4096 bytes")
        listen = None
        if "listen" in table:
            try:
                listen = parse_host_port(checker.string(table["listen"], (*item_key, "listen")))
            except ValueError as exc:
                raise checker.fail((*item_key, "listen"), str(exc)) from None
        for what, seen in (("disk", device), ("export", export)):
            field = "device" if what == "disk" else "export"
            if (what, seen) in first_line:
                _, line = first_line[(what, seen)]
                raise checker.fail(
                    (*item_key, field), f"duplicate {what} {seen!r} (first on line {line})"
                )
            first_line[(what, seen)] = (seen, checker.line_of((*item_key, field)))
        disks.append(DiskPolicy(device, source_image, dest_file, export, listen))
    return tuple(disks)


def parse_config(text: str, path: Path | str = "<config>") -> PolicyConfig:
    """Build the policy from TOML text; `path` is only used in error messages."""
    path = Path(path)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        position = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        problem = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        if position:
            problem = f"column {position[2]}: {problem}"
        raise ConfigError(
            path, int(position[1]) if position else None, f"TOML syntax: {problem}"
        ) from None
    checker = _Checker(path, text)
    checker.unknown_keys(document, ("defaults", "domains"), ())

    base = DomainPolicy(
        "", DEFAULT_MODE, (), DEFAULT_CHUNK_SIZE, None, DEFAULT_STATE_ROOT, DEFAULT_SOCKET_DIR,
        None, listed=False, config_file=path,
    )  # fmt: skip
    defaults_table = checker.table(document.get("defaults", {}), ("defaults",))
    checker.unknown_keys(defaults_table, _POLICY_KEYS, ("defaults",))
    defaults = _policy_fields(checker, defaults_table, ("defaults",), base)
    if defaults.mode is MigrationMode.POSTCOPY:
        raise checker.fail(
            ("defaults", "mode"),
            "the default mode cannot be postcopy: a postcopy domain needs its disks listed "
            "in [[domains.NAME.disks]]",
        )

    domains: list[DomainPolicy] = []
    dest_files: dict[Path, tuple[str, int | None]] = {}
    listens: dict[tuple[str, int], str] = {}
    domains_table = checker.table(document.get("domains", {}), ("domains",))
    for name, value in domains_table.items():
        key: KeyPath = ("domains", name)
        if not NAME_PATTERN.match(name):
            raise checker.fail(key, f"{name!r} is not a valid domain name")
        table = checker.table(value, key)
        checker.unknown_keys(table, (*_POLICY_KEYS, "disks"), key)
        template = DomainPolicy(
            name, defaults.mode, (), defaults.chunk_size, defaults.bandwidth, defaults.state_root,
            defaults.socket_dir, defaults.source, listed=True, config_file=path,
        )  # fmt: skip
        domain = _policy_fields(checker, table, key, template)
        disks = _disks(checker, table["disks"], (*key, "disks"), name) if "disks" in table else ()
        domain = DomainPolicy(
            name, domain.mode, disks, domain.chunk_size, domain.bandwidth, domain.state_root,
            domain.socket_dir, domain.source, listed=True, config_file=path,
        )  # fmt: skip
        if domain.is_postcopy and not disks:
            raise checker.fail(key, f"postcopy domain {name!r} lists no [[domains.{name}.disks]]")
        for index, disk in enumerate(disks):
            disk_key = (*key, "disks", index)
            if disk.dest_file in dest_files:
                other, line = dest_files[disk.dest_file]
                field = "dest_file" if "dest_file" in table["disks"][index] else "source_image"
                raise checker.fail(
                    (*disk_key, field),
                    f"duplicate disk: {str(disk.dest_file)!r} is also the destination of {other} "
                    f"(line {line})",
                )
            dest_files[disk.dest_file] = (f"{name}/{disk.device}", checker.line_of(disk_key))
            if disk.listen is not None:
                if disk.listen in listens:
                    raise checker.fail(
                        (*disk_key, "listen"),
                        f"{disk.listen[0]}:{disk.listen[1]} is also used by {listens[disk.listen]}",
                    )
                listens[disk.listen] = f"{name}/{disk.device}"
            elif domain.is_postcopy:
                socket = domain.dest_socket(disk)
                if len(os.fsencode(socket)) > MAX_UNIX_SOCKET_PATH:
                    raise checker.fail(
                        (*key, "socket_dir") if "socket_dir" in table else disk_key,
                        f"socket path {str(socket)!r} is longer than {MAX_UNIX_SOCKET_PATH} bytes; "
                        "choose a shorter socket_dir",
                    )
        domains.append(domain)
    return PolicyConfig(path, defaults.mode, defaults, tuple(domains))


def resolve_config_path(
    cli_path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> tuple[Path, bool]:
    """The policy file to read and whether it was named explicitly (option or environment)."""
    environ = os.environ if environ is None else environ
    if cli_path:
        return Path(cli_path), True
    if environ.get(CONFIG_ENV_VAR):
        return Path(environ[CONFIG_ENV_VAR]), True
    return DEFAULT_CONFIG_PATH, False


def load_config(
    cli_path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> PolicyConfig:
    """Read and check the policy file (see the module docstring for where it is looked up)."""
    path, explicit = resolve_config_path(cli_path, environ)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(path, None, "no such file") from None
        return parse_config("", path)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, line, "not UTF-8 text") from None
    return parse_config(text, path)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add the shared `--config FILE` option (default: $POSTCOPY_CONFIG, then the system file)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"per-domain policy file (default: ${CONFIG_ENV_VAR}, else {DEFAULT_CONFIG_PATH})",
    )
