"""Per-domain migration policy, the schema: what one TOML file says about how each domain's
disks move, as frozen dataclasses (`PolicyConfig`, `DomainPolicy`, `DiskPolicy`, `NbdEndpoint`).

The file (every key optional unless marked):

    [defaults]                      # applies to every domain, listed or not
    mode = "precopy"                # postcopy | precopy | shared; the mode of unlisted domains
    chunk_size = "64K"              # power of two, 4 KiB .. 64 MiB
    bandwidth = "unlimited"         # drain cap in bytes/s: "200M" = 200 MiB/s; 0/"unlimited" = none
    state_root = "/var/lib/postcopy"  # per-disk state dir: <state_root>/<domain>/<device>
    socket_dir = "/run/postcopy"    # on B: <socket_dir>/<domain>-<device>.sock
    source = "nbd://host-a:10809"   # how B reaches A's `postcopy serve` (or "unix:/path.sock")

    [domains.web1]                  # the same keys as [defaults], for this domain
    mode = "postcopy"

    [[domains.web1.disks]]          # one table per disk; a postcopy domain needs at least one
    device = "xvda"                 # required: the guest's device name (xvda, vda, sda, hda)
    source_image = "/srv/xen/web1.img"  # required: the image on A
    dest_file = "/srv/xen/web1.img" # the file on B (default: the same path as source_image)
    export = "web1-xvda"            # NBD export name (default: "<domain>-<device>")
    listen = "127.0.0.1:10810"      # B serves this disk on TCP instead of a Unix socket

Domains that are not in the file get `defaults.mode`, which is `precopy` unless set: migrating a
domain post-copy is an explicit choice, and precopy is what every toolstack does by default.
`defaults.mode` may not be `postcopy`, since a postcopy domain needs its disks listed. A missing
file at the default path means "no domains listed"; a missing file named by `--config` or the
environment variable is an error.

The loader (`postcopy.policy.loader`) reads and checks the file and builds these objects.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from nbdsrv.uri import parse_host_port

# the chunk size's default and bounds are the block map's (receive's --chunk-size has them too)
from postcopy.destination.blockmap import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from postcopy.errors import UserError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MODE",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "ConfigError",
    "DiskPolicy",
    "DomainPolicy",
    "MigrationMode",
    "NbdEndpoint",
    "PolicyConfig",
    "parse_host_port",
    "parse_nbd_address",
]

DEFAULT_NBD_PORT = 10809
DEFAULT_STATE_ROOT = Path("/var/lib/postcopy")
DEFAULT_SOCKET_DIR = Path("/run/postcopy")
# sun_path holds 108 bytes on Linux, one of them the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+-]*$")
DEVICE_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class MigrationMode(enum.StrEnum):
    """How a domain's disks move when the domain migrates."""

    POSTCOPY = "postcopy"  # this project: B starts at once, blocks arrive on demand and by drain
    PRECOPY = "precopy"  # the toolstack copies the disk before switchover (its own behaviour)
    SHARED = "shared"  # both hosts see the same storage; nothing is copied


DEFAULT_MODE = MigrationMode.PRECOPY


class ConfigError(UserError):
    """A problem in the policy file; `str()` is `FILE:LINE: problem` (or `FILE: problem`)."""

    def __init__(self, file: Path | str, line: int | None, problem: str) -> None:
        self.file = str(file)
        self.line = line
        self.problem = problem
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class NbdEndpoint:
    """Where an NBD server listens: a Unix socket, or a TCP host and port; plus the export."""

    export: str = ""
    socket: Path | None = None
    host: str | None = None
    port: int = DEFAULT_NBD_PORT
    tls: bool = False

    def uri(self) -> str:
        """The NBD URI (`nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`)."""
        export = quote(self.export, safe="")
        scheme = "nbds" if self.tls else "nbd"
        if self.socket is not None:
            return f"{scheme}+unix:///{export}?socket={quote(str(self.socket), safe='/')}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{export}"

    def with_export(self, export: str) -> NbdEndpoint:
        return NbdEndpoint(export, self.socket, self.host, self.port, self.tls)


def parse_nbd_address(text: str) -> NbdEndpoint:
    """An NBD server address without export: `nbd://HOST[:PORT]`, `nbds://...`,
    `nbd+unix:///?socket=PATH`, `unix:PATH` or an absolute socket path. Raises `ValueError`."""
    text = text.strip()
    if text.startswith("/"):
        return NbdEndpoint(socket=Path(text))
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: the socket path must be absolute")
        return NbdEndpoint(socket=Path(path))
    parts = urlsplit(text)
    if parts.path not in ("", "/"):
        raise ValueError(f"{text!r} names an export; the address must not (each disk adds its own)")
    if parts.scheme in ("nbd+unix", "nbds+unix"):
        sockets = parse_qs(parts.query).get("socket", [])
        if len(sockets) != 1 or not sockets[0].startswith("/"):
            raise ValueError(f"{text!r} needs one absolute ?socket=PATH")
        return NbdEndpoint(socket=Path(sockets[0]), tls=parts.scheme == "nbds+unix")
    if parts.scheme in ("nbd", "nbds"):
        if not parts.hostname:
            raise ValueError(f"{text!r} has no host")
        try:
            port = parts.port or DEFAULT_NBD_PORT
        except ValueError as exc:
            raise ValueError(f"{text!r} has a bad port") from exc
        return NbdEndpoint(host=parts.hostname, port=port, tls=parts.scheme == "nbds")
    raise ValueError(
        f"{text!r} is not nbd://HOST[:PORT], nbds://HOST[:PORT], "
        "nbd+unix:///?socket=PATH or unix:PATH"
    )


@dataclass(frozen=True)
class DiskPolicy:
    """One disk of a domain: its guest device name, where it lives on A and on B."""

    device: str
    source_image: Path
    dest_file: Path
    export: str
    listen: tuple[str, int] | None = None  # B serves it on TCP instead of a Unix socket


@dataclass(frozen=True)
class DomainPolicy:
    """A domain's mode and settings; `listed` is False for a domain the file does not name."""

    name: str
    mode: MigrationMode
    disks: tuple[DiskPolicy, ...]
    chunk_size: int
    bandwidth: int | None  # bytes per second; None means no cap
    state_root: Path
    socket_dir: Path
    source: NbdEndpoint | None
    listed: bool
    config_file: Path

    @property
    def is_postcopy(self) -> bool:
        return self.mode is MigrationMode.POSTCOPY

    def disk(self, device: str) -> DiskPolicy:
        for disk in self.disks:
            if disk.device == device:
                return disk
        known = ", ".join(d.device for d in self.disks) or "none"
        raise UserError(
            f"{self.config_file}: domain {self.name!r} has no disk {device!r} (disks: {known})"
        )

    def state_dir(self, disk: DiskPolicy) -> Path:
        """The disk's state directory on B: `<state_root>/<domain>/<device>`."""
        return self.state_root / self.name / disk.device

    def dest_socket(self, disk: DiskPolicy) -> Path:
        """The Unix socket B serves the disk on: `<socket_dir>/<domain>-<device>.sock`."""
        return self.socket_dir / f"{self.name}-{disk.device}.sock"

    def dest_endpoint(self, disk: DiskPolicy) -> NbdEndpoint:
        """Where the hypervisor on B opens the disk (what `postcopy receive` listens on)."""
        if disk.listen is not None:
            host, port = disk.listen
            return NbdEndpoint(export=disk.export, host=host, port=port)
        return NbdEndpoint(export=disk.export, socket=self.dest_socket(disk))

    def source_endpoint(self, disk: DiskPolicy) -> NbdEndpoint:
        """Where B fetches the disk from: the `source` address plus the disk's export."""
        if self.source is None:
            raise UserError(
                f"{self.config_file}: domain {self.name!r} sets no 'source' "
                "(the address of `postcopy serve` on the source host)"
            )
        return self.source.with_export(disk.export)


@dataclass(frozen=True)
class PolicyConfig:
    """The whole policy file: the defaults and every listed domain, in file order."""

    path: Path
    default_mode: MigrationMode
    defaults: DomainPolicy  # a template: name "", no disks
    domains: tuple[DomainPolicy, ...]

    def domain(self, name: str) -> DomainPolicy:
        """The named domain's policy; an unlisted domain gets the defaults (mode `precopy`)."""
        for domain in self.domains:
            if domain.name == name:
                return domain
        if not name or not NAME_PATTERN.match(name):
            raise UserError(f"{name!r} is not a valid domain name")
        d = self.defaults
        return DomainPolicy(
            name, self.default_mode, (), d.chunk_size, d.bandwidth, d.state_root, d.socket_dir,
            d.source, listed=False, config_file=self.path,
        )  # fmt: skip

    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def postcopy_disks(self) -> list[tuple[DomainPolicy, DiskPolicy]]:
        """Every disk of every postcopy domain, in file order (what a host may be receiving)."""
        return [(d, disk) for d in self.domains if d.is_postcopy for disk in d.disks]
