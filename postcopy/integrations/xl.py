"""xl domain configs: point the `disk = [...]` entries of a postcopy domain at the lazy destination.

How it works. `tokenize_xl_config` splits the file the way xl's config lexer does (identifiers,
numbers, single- or double-quoted strings, `#` comments, `=`, `+=`, `[`, `]`, `,`, `;`, newlines),
keeping each token's character span. `rewrite_xl` finds every `disk = [ ... ]` (and `disk += [...]`)
statement, parses each string of the list as a disk spec, and replaces only the spans of the
strings that change; every other byte of the file (keys, comments, blank lines, the list's own
layout) stays as it was.

Disk specs follow xl-disk-configuration(5): comma-separated `key=value` pairs, flags (`cdrom`,
`discard`, ...) and positional parameters, which fill the not-yet-given ones of `target`, `format`,
`vdev`, `access` in that order. `target=` must come last and takes the rest of the string, commas
included. The deprecated forms (`phy:/dev/x`, `tap:aio:/img`, `raw:/img`, `hdc:cdrom`, access `w`)
are understood. A rewritten disk reads

    format=raw, vdev=xvda, access=rw, script=block-postcopy, target=web1-xvda

keeping the disk's access mode, device type and other options. The target names the disk in the
policy (`<domain>-<device>`); libxl hands it to the `block-postcopy` hotplug script
(`postcopy.integrations.xen.hotplug`), which on the destination connects a kernel NBD device to
`postcopy receive` under a device-mapper linear device (and on a fresh start attaches the image
through a loop device). `script=` makes libxl use the phy (blkback) backend, which serves raw
blocks, so a policy disk must be raw: another format is refused.

Why not `backendtype=qdisk, target=nbd+unix:///...` (what this module wrote before): QEMU 7.2's
xen-block backend (hw/block/xen-block.c, `xen_block_drive_create`) `stat()`s the target as a
file and forces the `file` or `host_device` driver, so an NBD URI fails with "Could not stat file"
while `xl create` still returns 0 and the guest waits for a disk that never connects (shown in
the nested Xen lab, tests/kit/test_xenlab.py). A Xen disk reaches a lazy destination as a block
device.

`rewrite_xl(..., local=True)` writes the config for a start on the destination once the disk
is local (after `postcopy.integrations.xen.pivot`): each policy disk (plain, or in the
block-postcopy form) becomes `format=raw, vdev=..., access=..., target=<dest_file>`, which libxl
attaches with Xen's own `block` script (a loop device).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from postcopy.errors import UserError
from postcopy.integrations import DiskMatcher, Rewrite, not_postcopy_note
from postcopy.policy import DiskPolicy, DomainPolicy

__all__ = [
    "BLOCK_SCRIPT",
    "XlDiskSpec",
    "block_script_target",
    "XlToken",
    "domain_name",
    "parse_disk_spec",
    "rewrite_xl",
    "tokenize_xl_config",
]

POSITIONAL = ("target", "format", "vdev", "access")
FLAGS = ("cdrom", "discard", "no-discard", "direct-io-safe", "colo", "trusted", "untrusted")
# Deprecated "prefix:" forms of a positional target, and the format each implies (None: raw).
_TARGET_PREFIXES = {
    "tap:aio:": "raw", "tap:qcow2:": "qcow2", "tap:vhd:": "vhd", "tap:qcow:": "qcow",
    "tap2:aio:": "raw", "tap2:qcow2:": "qcow2", "tap2:vhd:": "vhd",
    "phy:": "raw", "file:": "raw", "aio:": "raw", "raw:": "raw", "qcow2:": "qcow2",
    "qcow:": "qcow", "vhd:": "vhd",
}  # fmt: skip
_ACCESS = {"rw": "rw", "w": "rw", "ro": "ro", "r": "ro", "": "rw"}
# Options that belong to the old backend: the new spec sets its own script (or none).
_DROPPED_KEYS = ("script", "backendtype", "target", "format", "vdev", "access", "devtype")
BLOCK_SCRIPT = "block-postcopy"


@dataclass(frozen=True)
class XlToken:
    kind: str  # ident, number, string, comment, newline, op, space
    text: str
    start: int
    end: int


_TOKEN = re.compile(
    r"""
    (?P<newline>\n)
  | (?P<space>[ \t\r]+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\\n])*"|'[^'\n]*')
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<number>[0-9][0-9A-Za-z_.+-]*)
  | (?P<op>\+=|[=\[\],;])
    """,
    re.VERBOSE,
)


def tokenize_xl_config(text: str, name: str = "<xl config>") -> list[XlToken]:
    """Split an xl config into tokens with their spans; a stray character is a `UserError`."""
    tokens: list[XlToken] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            line = text.count("\n", 0, pos) + 1
            raise UserError(f"{name}:{line}: unexpected {text[pos]!r} in xl config")
        kind = match.lastgroup or "op"
        tokens.append(XlToken(kind, match.group(), pos, match.end()))
        pos = match.end()
    return tokens


def _string_value(token: XlToken) -> str:
    body = token.text[1:-1]
    if token.text[0] == "'":
        return body
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m[1], "\\" + m[1]), body)


def _quote(value: str, like: str) -> str:
    if like == "'" and "'" not in value and "\n" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclass
class XlDiskSpec:
    """A parsed disk spec: the four positional parameters, other options in order, and flags."""

    target: str | None = None
    format: str | None = None
    vdev: str | None = None
    access: str | None = None
    devtype: str | None = None
    options: list[tuple[str, str]] = field(default_factory=list)  # other key=value, in order
    flags: list[str] = field(default_factory=list)

    def device_name(self) -> str | None:
        return self.vdev

    def target_path(self) -> str | None:
        return self.target

    def to_text(self) -> str:
        """The spec in keyword form, `target=` last."""
        parts = []
        if self.format:
            parts.append(f"format={self.format}")
        if self.vdev:
            parts.append(f"vdev={self.vdev}")
        parts.append(f"access={_ACCESS.get(self.access or '', self.access)}")
        if self.devtype:
            parts.append(f"devtype={self.devtype}")
        parts += [f"{key}={value}" for key, value in self.options]
        parts += self.flags
        if self.target is not None:
            parts.append(f"target={self.target}")
        return ", ".join(parts)


def parse_disk_spec(spec: str) -> XlDiskSpec:
    """Parse one xl disk spec string (see xl-disk-configuration(5)); raises `ValueError`."""
    disk = XlDiskSpec()
    given: set[str] = set()

    def give(key: str, value: str) -> None:
        if key in given:
            raise ValueError(f"{key} given twice in disk spec {spec!r}")
        given.add(key)
        if key == "target":
            disk.target = value
        elif key == "format":
            disk.format = value or None
        elif key == "vdev":
            disk.vdev = value or None
        elif key == "access":
            disk.access = value or None
        elif key == "devtype":
            disk.devtype = value or None

    rest = spec
    while True:
        part, comma, after = rest.partition(",")
        item = part.strip()
        if item.startswith("target="):
            # target= takes the rest of the string, commas and all.
            give("target", rest.lstrip()[len("target=") :])
            break
        if "=" in item:
            key, _, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if key in POSITIONAL or key == "devtype":
                give(key, value)
            else:
                disk.options.append((key, value))
        elif item in FLAGS:
            if item == "cdrom":
                give("devtype", "cdrom")
            else:
                disk.flags.append(item)
        else:
            free = [p for p in POSITIONAL if p not in given]
            if not free:
                if item:
                    raise ValueError(f"too many positional parameters in disk spec {spec!r}")
            elif free[0] == "target":
                # A deprecated "raw:", "phy:", "tap:aio:"... prefix gives the format too, so
                # the next positional parameter is the vdev.
                for prefix, implied in _TARGET_PREFIXES.items():
                    if item.startswith(prefix) and "format" not in given:
                        item = item[len(prefix) :]
                        give("format", implied)
                        break
                give("target", item)
            else:
                give(free[0], item)
        if not comma:
            break
        rest = after

    if disk.vdev and disk.vdev.endswith(":cdrom"):
        disk.vdev = disk.vdev[: -len(":cdrom")]
        disk.devtype = disk.devtype or "cdrom"
    if disk.access is not None and disk.access not in _ACCESS:
        raise ValueError(f"access {disk.access!r} is not rw or ro in disk spec {spec!r}")
    return disk


def _statements(tokens: list[XlToken]) -> list[list[XlToken]]:
    """Split tokens into statements (ended by newline or `;` outside brackets), dropping blanks."""
    statements: list[list[XlToken]] = []
    current: list[XlToken] = []
    depth = 0
    for token in tokens:
        if token.kind in ("space", "comment"):
            continue
        if token.kind == "op" and token.text == "[":
            depth += 1
        elif token.kind == "op" and token.text == "]":
            depth = max(0, depth - 1)
        if depth == 0 and (token.kind == "newline" or token.text == ";"):
            if current:
                statements.append(current)
            current = []
        elif token.kind != "newline":
            current.append(token)
    if current:
        statements.append(current)
    return statements


def domain_name(text: str, name: str = "<xl config>") -> str | None:
    """The `name = "..."` of an xl config, if it sets one."""
    for statement in _statements(tokenize_xl_config(text, name)):
        if (
            len(statement) == 3
            and statement[0].text == "name"
            and statement[1].text == "="
            and statement[2].kind == "string"
        ):
            return _string_value(statement[2])
    return None


def block_script_target(domain: DomainPolicy, disk: DiskPolicy) -> str:
    """The `target=` of a postcopy disk in the block-postcopy form: `<domain>-<device>`."""
    return f"{domain.name}-{disk.device}"


def _script_disk(spec: XlDiskSpec, domain: DomainPolicy) -> DiskPolicy | None:
    """The policy disk a spec in the block-postcopy form names by its target, if any."""
    if (dict(spec.options).get("script")) != BLOCK_SCRIPT:
        return None
    return next((d for d in domain.disks if block_script_target(domain, d) == spec.target), None)


def rewrite_xl(
    text: str, domain: DomainPolicy, name: str = "<xl config>", local: bool = False
) -> Rewrite:
    """Rewrite the disk list of an xl config for a postcopy domain (see the module docstring);
    with `local`, for a start on the destination with the disks local."""
    if not domain.is_postcopy:
        return Rewrite(text, (), (not_postcopy_note(domain),))
    matcher = DiskMatcher(domain, name)
    edits: list[tuple[int, int, str]] = []
    changed: list[str] = []
    notes: list[str] = []
    found_disk_list = False
    for statement in _statements(tokenize_xl_config(text, name)):
        if len(statement) < 2 or statement[0].text != "disk":
            continue
        if statement[1].text not in ("=", "+="):
            continue
        found_disk_list = True
        if len(statement) < 3 or statement[2].text != "[":
            line = text.count("\n", 0, statement[0].start) + 1
            raise UserError(f"{name}:{line}: 'disk' must be a list of strings")
        for token in statement[3:]:
            if token.kind != "string":
                continue
            spec_text = _string_value(token)
            line = text.count("\n", 0, token.start) + 1
            try:
                spec = parse_disk_spec(spec_text)
            except ValueError as exc:
                raise UserError(f"{name}:{line}: {exc}") from None
            named = _script_disk(spec, domain)
            policy_disk = matcher.match(named.device if named else spec.vdev, [spec.target])
            if policy_disk is None:
                continue
            if (spec.format or "raw") != "raw":
                raise UserError(
                    f"{name}:{line}: disk {policy_disk.device} is {spec.format}: a Xen postcopy "
                    "disk is a raw block device (phy backend); convert the image to raw"
                )
            script = dict(spec.options).get("script")
            options = [(k, v) for k, v in spec.options if k not in _DROPPED_KEYS]
            if local:
                target, script_options = str(policy_disk.dest_file), []
            else:
                if script not in (None, BLOCK_SCRIPT):
                    notes.append(f"{name}:{line}: replaced script={script} by {BLOCK_SCRIPT}")
                target = block_script_target(domain, policy_disk)
                script_options = [("script", BLOCK_SCRIPT)]
            new_spec = XlDiskSpec(
                target=target,
                format="raw",
                vdev=spec.vdev or policy_disk.device,
                access=_ACCESS.get(spec.access or "", spec.access),
                devtype=spec.devtype,
                options=[*options, *script_options],
                flags=spec.flags,
            )
            new_text = new_spec.to_text()
            if new_text != spec_text:
                edits.append((token.start, token.end, _quote(new_text, token.text[0])))
            changed.append(policy_disk.device)
    if not found_disk_list:
        raise UserError(f"{name}: no 'disk = [...]' setting found")
    matcher.check_all_found()
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return Rewrite(text, tuple(changed), tuple(notes))
