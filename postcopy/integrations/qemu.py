"""QEMU command lines: open a postcopy domain's disks from the lazy destination over NBD.

How it works. The input is a QEMU command line, either shell-quoted (`qemu-system-x86_64 \\` lines,
read with `shlex`) or one argument per line. `rewrite_qemu_args` walks the arguments and rewrites
the disk definitions whose image is one of the domain's policy disks:

- `-drive file=IMG,if=virtio,id=d0,...` keeps every option that binds the drive to its device
  (`if`, `index`, `id`, `media`, `bus`, `unit`, `cache`, `format`, ...) and swaps only the
  protocol layer: `file=IMG` becomes `file.driver=nbd,file.server.type=unix,file.server.path=SOCK,
  file.export=EXPORT`. The guest sees the same device at the same address, which migration needs
  (the destination's devices must equal the source's). File-only options (`aio`, `locking`) go.
- `-blockdev driver=file,filename=IMG,node-name=N,...` (key=value or JSON form) becomes
  `-blockdev driver=nbd,server.type=unix,server.path=SOCK,export=EXPORT,node-name=N,...`,
  keeping the node name (so a format node `-blockdev driver=qcow2,file=N` above it and the
  `-device ...,drive=` binding stay valid) and the generic block options.
- `-hda IMG` (and `-hdb`..`-hdd`) become the equivalent `-drive index=N,media=disk,...` on NBD.

A disk is matched by `id`/`node-name` (or `hda`..) equal to the policy's device, or by its image
path. `image_opts()` and `nbd_uri()` give the `--image-opts` string and the URI for one disk, for
`qemu-img`/`qemu-io` or for hand-written command lines.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from postcopy.errors import UserError
from postcopy.integrations import DiskMatcher, Rewrite, not_postcopy_note
from postcopy.policy import DomainPolicy, NbdEndpoint

__all__ = [
    "domain_name",
    "format_qemu_args",
    "image_opts",
    "join_qemu_opts",
    "nbd_blockdev_options",
    "nbd_uri",
    "parse_qemu_args",
    "rewrite_qemu_args",
    "split_qemu_opts",
]

# Options of -drive that belong to the file protocol layer and mean nothing to nbd.
_DRIVE_FILE_ONLY = ("file", "aio", "locking")
# Options of any -blockdev node, kept when a file node becomes an nbd node.
_BLOCKDEV_GENERIC = (
    "node-name", "discard", "cache.direct", "cache.no-flush", "read-only", "auto-read-only",
    "force-share", "detect-zeroes",
)  # fmt: skip
_FILE_DRIVERS = ("file", "host_device")
_HD_OPTIONS = {"-hda": 0, "-hdb": 1, "-hdc": 2, "-hdd": 3}

Opts = list[tuple[str, str]]


def split_qemu_opts(text: str) -> Opts:
    """Split `a=1,b=x,,y` into `[("a", "1"), ("b", "x,y")]` (`,,` is a literal comma)."""
    items: list[str] = []
    current = ""
    index = 0
    while index < len(text):
        char = text[index]
        if char == ",":
            if text[index + 1 : index + 2] == ",":
                current += ","
                index += 2
                continue
            items.append(current)
            current = ""
        else:
            current += char
        index += 1
    items.append(current)
    pairs: Opts = []
    for item in items:
        if not item:
            continue
        key, sep, value = item.partition("=")
        pairs.append((key, value) if sep else (key, ""))
    return pairs


def join_qemu_opts(pairs: Opts) -> str:
    return ",".join(f"{key}={value.replace(',', ',,')}" if value else key for key, value in pairs)


def nbd_blockdev_options(endpoint: NbdEndpoint, prefix: str = "") -> Opts:
    """The options of an nbd block node for `endpoint`, each key prefixed (e.g. `file.`)."""
    if endpoint.tls:
        raise UserError("a QEMU NBD disk with TLS needs a tls-creds object; use a Unix socket")
    if endpoint.socket is not None:
        server = [("server.type", "unix"), ("server.path", str(endpoint.socket))]
    else:
        server = [
            ("server.type", "inet"),
            ("server.host", str(endpoint.host)),
            ("server.port", str(endpoint.port)),
        ]
    return [(prefix + key, value) for key, value in [*server, ("export", endpoint.export)]]


def image_opts(endpoint: NbdEndpoint, image_format: str | None = None) -> str:
    """The `--image-opts` string for `qemu-img`/`qemu-io`; with a format, a format node on top."""
    if image_format:
        file_layer = [("file.driver", "nbd"), *nbd_blockdev_options(endpoint, "file.")]
        return join_qemu_opts([("driver", image_format), *file_layer])
    return join_qemu_opts([("driver", "nbd"), *nbd_blockdev_options(endpoint)])


def nbd_uri(endpoint: NbdEndpoint) -> str:
    """The NBD URI of the disk (what `postcopy receive` prints)."""
    return endpoint.uri()


# --- reading and writing command lines --------------------------------------------------------


def parse_qemu_args(text: str) -> tuple[list[str], str]:
    """The arguments of a command line, and its style: `lines` (one per line) or `shell`."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    one_per_line = (
        len(lines) > 1
        and not any(line.endswith("\\") for line in lines)
        and all(" " not in line and "\t" not in line for line in lines if line.startswith("-"))
        and not any(line[0] in "'\"" for line in lines)
    )
    if one_per_line:
        return lines, "lines"
    try:
        return shlex.split(text.replace("\\\n", " "), comments=True), "shell"
    except ValueError as exc:
        raise UserError(f"cannot read the QEMU command line: {exc}") from None


def format_qemu_args(args: list[str], style: str) -> str:
    """Write arguments back: one per line, or shell-quoted with one option per line."""
    if style == "lines":
        return "".join(arg + "\n" for arg in args)
    groups: list[list[str]] = []
    for arg in args:
        takes_value = bool(groups) and len(groups[-1]) == 1 and groups[-1][0].startswith("-")
        if arg.startswith("-") or not takes_value:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return " \\\n    ".join(shlex.join(group) for group in groups) + "\n"


def domain_name(text: str) -> str | None:
    """The guest name from `-name NAME` or `-name guest=NAME,...`."""
    args, _ = parse_qemu_args(text)
    for option, value in zip(args, args[1:], strict=False):
        if option in ("-name", "--name"):
            pairs = split_qemu_opts(value)
            for key, item in pairs:
                if key == "guest":
                    return item
            if pairs and not pairs[0][1]:
                return pairs[0][0]
    return None


# --- the rewrite ------------------------------------------------------------------------------


class _Rewriter:
    def __init__(self, domain: DomainPolicy, name: str) -> None:
        self.domain = domain
        self.matcher = DiskMatcher(domain, name)
        self.changed: list[str] = []
        self.notes: list[str] = []
        self._by_socket = {
            str(domain.dest_endpoint(disk).socket): disk.device
            for disk in domain.disks
            if domain.dest_endpoint(disk).socket is not None
        }

    def _already_ours(self, options: dict[str, str], prefix: str) -> str | None:
        """The device of a node that already points at one of our sockets."""
        if options.get(prefix + "driver") != "nbd":
            return None
        return self._by_socket.get(options.get(prefix + "server.path", ""))

    def drive(self, value: str) -> str:
        pairs = split_qemu_opts(value)
        options = dict(pairs)
        device = self._already_ours(options, "file.") or options.get("id")
        disk = self.matcher.match(device, [options.get("file"), options.get("file.filename")])
        if disk is None:
            return value
        self.changed.append(disk.device)
        endpoint = self.domain.dest_endpoint(disk)
        nbd = [("file.driver", "nbd"), *nbd_blockdev_options(endpoint, "file.")]
        rewritten: Opts = []
        for key, item in pairs:
            if key == "file" or key.startswith("file."):
                rewritten += nbd  # where the file layer was
                nbd = []
            elif key in _DRIVE_FILE_ONLY:
                if key in ("aio", "locking"):
                    self.notes.append(f"-drive of {disk.device}: dropped {key}={item} (file-only)")
            else:
                rewritten.append((key, item))
        return join_qemu_opts(rewritten + nbd)

    def blockdev_opts(self, value: str) -> str:
        pairs = split_qemu_opts(value)
        options = dict(pairs)
        device = self._already_ours(options, "")
        if device is None and options.get("driver") not in _FILE_DRIVERS:
            return value
        disk = self.matcher.match(device or options.get("node-name"), [options.get("filename")])
        if disk is None:
            return value
        self.changed.append(disk.device)
        kept = [(k, v) for k, v in pairs if k in _BLOCKDEV_GENERIC]
        return join_qemu_opts(
            [("driver", "nbd"), *nbd_blockdev_options(self.domain.dest_endpoint(disk)), *kept]
        )

    def blockdev_json(self, value: str) -> str:
        try:
            node: dict[str, Any] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"-blockdev {value[:40]!r}...: bad JSON: {exc}") from None
        server = node["server"] if isinstance(node.get("server"), dict) else {}
        device = None
        if node.get("driver") == "nbd":
            device = self._by_socket.get(str(server.get("path", "")))
            if device is None:
                return value
        elif node.get("driver") not in _FILE_DRIVERS:
            return value
        disk = self.matcher.match(device or node.get("node-name"), [node.get("filename")])
        if disk is None:
            return value
        self.changed.append(disk.device)
        endpoint = self.domain.dest_endpoint(disk)
        new: dict[str, Any] = {"driver": "nbd"}
        if endpoint.socket is not None:
            new["server"] = {"type": "unix", "path": str(endpoint.socket)}
        else:
            new["server"] = {"type": "inet", "host": endpoint.host, "port": str(endpoint.port)}
        new["export"] = endpoint.export
        for key, item in node.items():
            if key in _BLOCKDEV_GENERIC or key == "cache":
                new[key] = item
        return json.dumps(new, separators=(",", ":"))

    def hd(self, option: str, image: str) -> tuple[str, str] | None:
        device = option.lstrip("-")
        disk = self.matcher.match(device, [image])
        if disk is None:
            return None
        self.changed.append(disk.device)
        pairs: Opts = [
            ("index", str(_HD_OPTIONS[option])),
            ("media", "disk"),
            ("file.driver", "nbd"),
            *nbd_blockdev_options(self.domain.dest_endpoint(disk), "file."),
        ]
        return "-drive", join_qemu_opts(pairs)


def rewrite_qemu_args(text: str, domain: DomainPolicy, name: str = "<qemu args>") -> Rewrite:
    """Rewrite the disk arguments of a QEMU command line (see the module docstring)."""
    if not domain.is_postcopy:
        return Rewrite(text, (), (not_postcopy_note(domain),))
    args, style = parse_qemu_args(text)
    rewriter = _Rewriter(domain, name)
    out: list[str] = []
    index = 0
    while index < len(args):
        option = args[index]
        value = args[index + 1] if index + 1 < len(args) else None
        bare = "-" + option.lstrip("-") if option.startswith("-") else option
        if value is not None and bare == "-drive":
            out += [option, rewriter.drive(value)]
            index += 2
        elif value is not None and bare == "-blockdev":
            new = (
                rewriter.blockdev_json(value)
                if value.lstrip().startswith("{")
                else rewriter.blockdev_opts(value)
            )
            out += [option, new]
            index += 2
        elif value is not None and bare in _HD_OPTIONS:
            replaced = rewriter.hd(bare, value)
            out += list(replaced) if replaced else [option, value]
            index += 2
        else:
            out.append(option)
            index += 1
    rewriter.matcher.check_all_found()
    return Rewrite(format_qemu_args(out, style), tuple(rewriter.changed), tuple(rewriter.notes))
