"""QEMU command lines: open a postcopy domain's disks from the lazy destination over NBD.

How it works. The input is a QEMU command line, either shell-quoted (`qemu-system-x86_64 \\` lines,
read with `shlex`) or one argument per line. `rewrite_qemu_args` walks the arguments and rewrites
the disk definitions whose image is one of the domain's policy disks:

- `-drive file=IMG,...` becomes two named nodes and, unless the drive was `if=none` (its
  `-device ...,drive=ID` is already there), the device QEMU would have made for it:
  `-blockdev driver=nbd,node-name=NAME-nbd,server.type=unix,server.path=SOCK,export=EXPORT`,
  `-blockdev driver=FORMAT,node-name=NAME,file=NAME-nbd` and `-device MODEL,drive=NAME,...`,
  where NAME is the drive's `id` (so `-device ...,drive=ID` stays valid) or else the policy's
  device. Explicit node names are what lets `postcopy pivot` later switch the disk to the local
  file with `blockdev-reopen` (QEMU 7.2 refuses to reopen the `#blockNNN` nodes of a `-drive`).
  The guest must see the same device at the same address, which migration needs: `if=virtio`
  becomes `virtio-blk-pci` (with `addr=` if the drive had one), added after every other
  argument since QEMU creates `-drive` devices after the `-device` ones (the PCI slots stay;
  a virtio `-drive` left alone before a converted one becomes `if=none` with its device placed
  the same way, or the converted disk would take its slot);
  `if=ide` (the default) becomes `ide-hd`/`ide-cd` on the bus and unit of its `index`/`bus`/
  `unit` (two units a bus on `pc`, one on `q35`'s AHCI). `cache=` becomes `cache.direct`/
  `cache.no-flush` on both nodes and `write-cache=off` on the device for the writethrough
  modes; `discard`, `read-only` go on both nodes, `detect-zeroes` on the format node, `serial`,
  `werror`, `rerror` on the device. What has no `-blockdev` equivalent here (`aio`, `locking`:
  file-only; throttling, `copy-on-read`, `snapshot`: need filter nodes) is dropped with one
  note per drive; `if=scsi`/`floppy`/... drives, whose controller QEMU makes, keep the old
  `-drive` form with only the protocol layer swapped, and a note that the pivot cannot switch them.
- `-blockdev driver=file,filename=IMG,node-name=N,...` (key=value or JSON form) becomes
  `-blockdev driver=nbd,server.type=unix,server.path=SOCK,export=EXPORT,node-name=N,...`,
  keeping the node name (so a format node `-blockdev driver=qcow2,file=N` above it and the
  `-device ...,drive=` binding stay valid) and the generic block options.
- `-hda IMG` (and `-hdb`..`-hdd`) is converted as `-drive file=IMG,index=N,media=disk`.
  A drive without `format=` gets the format QEMU would probe (qcow2 if the image, where it can
  be read, has a qcow2 header; else raw), with a note: a format node must name its driver.

A disk is matched by `id`/`node-name` (or `hda`..) equal to the policy's device, or by its image
path. `image_opts()` and `nbd_uri()` give the `--image-opts` string and the URI for one disk, for
`qemu-img`/`qemu-io` or for hand-written command lines.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from postcopy.errors import UserError
from postcopy.integrations import DiskMatcher, Rewrite, not_postcopy_note
from postcopy.policy import DiskPolicy, DomainPolicy, NbdEndpoint

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
# -drive cache= modes: (cache.direct, cache.no-flush, the device's write-cache).
_CACHE_MODES = {
    "writeback": (False, False, True),
    "none": (True, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}
# -drive options that become -device properties, and ones with no -blockdev form here.
_DRIVE_DEVICE_OPTIONS = ("serial", "werror", "rerror")
_DRIVE_DROPPED = ("aio", "locking", "copy-on-read", "snapshot", "group")
_DRIVE_DROPPED_PREFIXES = ("throttling.", "bps", "iops")
# -drive options that only say where the device goes or what the drive is.
_DRIVE_PLACEMENT = ("if", "index", "bus", "unit", "media", "id", "addr", "format", "driver")
_NODE_NAME_MAX = 31
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")

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
    def __init__(
        self, domain: DomainPolicy, name: str, q35: bool, virtio_of_policy: list[bool]
    ) -> None:
        self.domain = domain
        self.matcher = DiskMatcher(domain, name)
        self.q35 = q35
        # For each if=virtio -drive in order: is it a policy disk (converted, its device placed
        # explicitly at the end)? A drive left as -drive before one of those must then be
        # placed explicitly too, or the converted device would take its PCI slot.
        self._virtio_of_policy = virtio_of_policy
        self._virtio_seen = 0
        self._virtio_units: set[int] = set()
        self.changed: list[str] = []
        self.notes: list[str] = []
        self.deferred: list[str] = []  # arguments that go after all others
        self._ide_taken: set[int] = set()
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

    def drive(self, option: str, value: str) -> list[str]:
        """A -drive: unchanged (not a policy disk), or its -blockdev (+ -device) replacement."""
        pairs = split_qemu_opts(value)
        options = dict(pairs)
        index = self._ide_index(options)
        virtio_unit = self._virtio_unit(options)
        device = self._already_ours(options, "file.") or options.get("id")
        disk = self.matcher.match(device, [options.get("file"), options.get("file.filename")])
        if disk is None:
            if index is not None and not {"index", "bus", "unit"} & options.keys():
                # Pin the slot QEMU would pick, since converted drives no longer take one.
                return [option, join_qemu_opts([*pairs, ("index", str(index))])]
            if virtio_unit is not None and any(self._virtio_of_policy[self._virtio_seen :]):
                return self._place_virtio_drive(option, pairs, virtio_unit)
            return [option, value]
        self.changed.append(disk.device)
        interface = options.get("if", "ide")
        if interface not in ("none", "virtio", "ide"):
            self.notes.append(
                f"-drive of {disk.device}: if={interface} kept as -drive (QEMU makes its "
                "controller), so `postcopy pivot` cannot switch it to the local file"
            )
            return [option, self._drive_on_nbd(disk, pairs)]
        return self._drive_to_blockdev(disk, options, index)

    def _virtio_unit(self, options: dict[str, str]) -> int | None:
        """The unit of an if=virtio -drive as QEMU assigns it; counts the drive as seen."""
        if options.get("if") != "virtio":
            return None
        self._virtio_seen += 1
        try:
            unit = int(options.get("index", options.get("unit", "-1")))
        except ValueError:
            unit = -1
        if unit < 0:
            unit = 0
            while unit in self._virtio_units:
                unit += 1
        self._virtio_units.add(unit)
        return unit

    def _place_virtio_drive(self, option: str, pairs: Opts, unit: int) -> list[str]:
        """A drive left as -drive, made `if=none` with its virtio-blk-pci placed explicitly
        (under the id QEMU would have given it), in QEMU's order."""
        options = dict(pairs)
        drive_id = options.get("id") or f"virtio{unit}"
        kept = [(k, v) for k, v in pairs if k not in ("if", "addr", "index", "unit")]
        properties: Opts = [("drive", drive_id)]
        if "addr" in options:
            properties.append(("addr", options["addr"]))
        self.deferred += ["-device", join_qemu_opts([("virtio-blk-pci", ""), *properties])]
        new = [*kept, ("if", "none")] + ([] if "id" in options else [("id", drive_id)])
        return [option, join_qemu_opts(new)]

    def _ide_index(self, options: dict[str, str]) -> int | None:
        """The IDE index of an if=ide -drive, as QEMU assigns it (explicit, or the first free)."""
        if options.get("if", "ide") != "ide":
            return None
        per_bus = 1 if self.q35 else 2
        try:
            if "index" in options:
                index = int(options["index"])
            elif "unit" in options:
                index = int(options.get("bus", "0")) * per_bus + int(options["unit"])
            else:
                index = int(options.get("bus", "0")) * per_bus
                while index in self._ide_taken:
                    index += 1
        except ValueError:
            raise UserError(f"-drive {join_qemu_opts(list(options.items()))}: bad index") from None
        self._ide_taken.add(index)
        return index

    def _drive_on_nbd(self, disk: DiskPolicy, pairs: Opts) -> str:
        """The -drive with its protocol layer swapped for nbd (for drives not converted)."""
        nbd = [
            ("file.driver", "nbd"),
            *nbd_blockdev_options(self.domain.dest_endpoint(disk), "file."),
        ]
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

    def _drive_to_blockdev(
        self, disk: DiskPolicy, options: dict[str, str], index: int | None
    ) -> list[str]:
        name = options.get("id") or disk.device
        nbd_name = f"{name}-nbd"
        if not _NODE_NAME.fullmatch(nbd_name):
            raise UserError(
                f"-drive of {disk.device}: {name!r} cannot name a block node (a letter, then "
                f"letters, digits, '-', '.', '_', at most {_NODE_NAME_MAX - 4} characters)"
            )
        fmt = options.get("format") or options.get("driver")
        if not fmt:
            fmt, how = _probe_format(options.get("file") or options.get("file.filename"))
            self.notes.append(f"-drive of {disk.device}: no format given, {fmt} ({how})")
        shared: Opts = []  # options both nodes take, as -drive gave them to the whole chain
        write_cache = True
        mode = options.get("cache")
        if mode is not None:
            if mode not in _CACHE_MODES:
                raise UserError(f"-drive of {disk.device}: unknown cache={mode}")
            direct, no_flush, write_cache = _CACHE_MODES[mode]
            shared += [("cache.direct", _on(direct)), ("cache.no-flush", _on(no_flush))]
        for key in ("cache.direct", "cache.no-flush"):
            if key in options:
                shared = [(k, v) for k, v in shared if k != key] + [(key, options[key])]
        if "cache.writeback" in options:
            write_cache = options["cache.writeback"] in ("on", "true", "yes", "")
        for key in ("readonly", "read-only"):
            if key in options:
                shared.append(("read-only", options[key] or "on"))
        for key in ("discard", "auto-read-only", "force-share"):
            if key in options:
                shared.append((key, options[key]))
        format_only = (
            [("detect-zeroes", options["detect-zeroes"])] if "detect-zeroes" in options else []
        )
        handled = {
            *_DRIVE_PLACEMENT, *_DRIVE_DEVICE_OPTIONS, "cache", "cache.direct", "cache.no-flush",
            "cache.writeback", "readonly", "read-only", "discard", "auto-read-only",
            "force-share", "detect-zeroes", "file", "file.driver", "file.filename",
        }  # fmt: skip
        dropped = [f"{k}={v}" if v else k for k, v in options.items() if k not in handled]
        if dropped:
            self.notes.append(
                f"-drive of {disk.device}: no -blockdev form for {', '.join(dropped)}: dropped"
            )
        endpoint = self.domain.dest_endpoint(disk)
        nbd_node = [("driver", "nbd"), ("node-name", nbd_name), *nbd_blockdev_options(endpoint)]
        format_node = [("driver", fmt), ("node-name", name), ("file", nbd_name)]
        out = [
            "-blockdev", join_qemu_opts(nbd_node + shared),
            "-blockdev", join_qemu_opts(format_node + shared + format_only),
        ]  # fmt: skip
        interface = options.get("if", "ide")
        if interface == "none":  # its -device ...,drive=ID is elsewhere on the command line
            if not write_cache:
                self.notes.append(
                    f"-drive of {disk.device}: cache={mode} is write-through: add "
                    f"write-cache=off to the -device with drive={name}"
                )
            return out
        properties: Opts = [("drive", name)]
        if interface == "virtio":
            model = "virtio-blk-pci"
            if "addr" in options:
                properties.append(("addr", options["addr"]))
        else:
            assert index is not None
            model = "ide-cd" if options.get("media") == "cdrom" else "ide-hd"
            per_bus = 1 if self.q35 else 2
            properties += [("bus", f"ide.{index // per_bus}"), ("unit", str(index % per_bus))]
        properties += [(key, options[key]) for key in _DRIVE_DEVICE_OPTIONS if key in options]
        if not write_cache:
            properties.append(("write-cache", "off"))
        device_arg = ["-device", join_qemu_opts([(model, ""), *properties])]
        if interface == "virtio":
            self.deferred += device_arg  # QEMU makes -drive devices after the -device ones
            return out
        return out + device_arg

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
        endpoint_options = nbd_blockdev_options(self.domain.dest_endpoint(disk))
        if device is not None:  # already an nbd node of ours: renew its server in place
            renewed: Opts = []
            for key, item in pairs:
                if key.startswith("server.") or key == "export":
                    renewed += endpoint_options
                    endpoint_options = []
                else:
                    renewed.append((key, item))
            return join_qemu_opts(renewed + endpoint_options)
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

    def hd_taken(self, index: int) -> None:
        self._ide_taken.add(index)

    def hd(self, option: str, image: str) -> list[str] | None:
        index = _HD_OPTIONS[option]
        self._ide_taken.add(index)
        disk = self.matcher.match(option.lstrip("-"), [image])
        if disk is None:
            return None
        self.changed.append(disk.device)
        options = {"file": image, "index": str(index), "media": "disk"}
        return self._drive_to_blockdev(disk, options, index)


_QCOW2_MAGIC = b"QFI\xfb"


def _probe_format(image: str | None) -> tuple[str, str]:
    """The format QEMU would probe for a -drive without one: qcow2 or raw, and how it was told.
    A -blockdev format node must name its driver, and raw over a qcow2 image would show the
    guest its metadata, so the image's header is read where it can be."""
    try:
        with open(image or "", "rb") as handle:
            magic = handle.read(4)
    except OSError:
        return "raw", "assumed: the image is not readable here; add format= if it is not raw"
    if magic == _QCOW2_MAGIC:
        return "qcow2", "from the image's header"
    return "raw", "the image has no qcow2 header"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _virtio_drives_of_policy(args: list[str], domain: DomainPolicy) -> list[bool]:
    """For each if=virtio -drive in order, whether it is one of the domain's policy disks."""
    peek = DiskMatcher(domain, "<peek>")  # a matcher of its own: the rewrite's stays unused
    found = []
    for option, value in zip(args, args[1:], strict=False):
        if "-" + option.lstrip("-") != "-drive":
            continue
        options = dict(split_qemu_opts(value))
        if options.get("if") != "virtio":
            continue
        try:
            disk = peek.match(
                options.get("id"), [options.get("file"), options.get("file.filename")]
            )
        except UserError:
            disk = None  # the rewrite reports the duplicate
        found.append(disk is not None)
    return found


def _is_q35(args: list[str]) -> bool:
    """Whether `-machine`/`-M` names a q35 machine (whose AHCI has one unit per IDE bus)."""
    for option, value in zip(args, args[1:], strict=False):
        if option.lstrip("-") in ("machine", "M"):
            pairs = split_qemu_opts(value)
            kind = dict(pairs).get("type") or (pairs[0][0] if pairs and not pairs[0][1] else "")
            return "q35" in kind
    return False


def rewrite_qemu_args(text: str, domain: DomainPolicy, name: str = "<qemu args>") -> Rewrite:
    """Rewrite the disk arguments of a QEMU command line (see the module docstring)."""
    if not domain.is_postcopy:
        return Rewrite(text, (), (not_postcopy_note(domain),))
    args, style = parse_qemu_args(text)
    rewriter = _Rewriter(domain, name, _is_q35(args), _virtio_drives_of_policy(args, domain))
    out: list[str] = []
    index = 0
    while index < len(args):
        option = args[index]
        value = args[index + 1] if index + 1 < len(args) else None
        bare = "-" + option.lstrip("-") if option.startswith("-") else option
        if value is not None and bare == "-drive":
            out += rewriter.drive(option, value)
            index += 2
        elif value is not None and bare == "-cdrom":
            rewriter.hd_taken(2)
            out += [option, value]
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
            out += replaced or [option, value]
            index += 2
        else:
            out.append(option)
            index += 1
    out += rewriter.deferred
    rewriter.matcher.check_all_found()
    return Rewrite(format_qemu_args(out, style), tuple(rewriter.changed), tuple(rewriter.notes))
