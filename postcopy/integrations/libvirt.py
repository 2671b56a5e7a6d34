"""libvirt domain XML: turn a postcopy domain's disks into `<disk type='network'>` NBD disks.

How it works. The document is parsed once with expat, which reports the byte offset of every
start and end tag; from those offsets we know the exact text span of each `<disk>` under
`<devices>`, of its `<source>`, `<driver>` and `<target>`. The rewrite then edits only those spans
of the original text, so everything else (comments, attribute quoting, indentation, the XML
declaration, `<address>`, `<boot order>`, other devices) stays byte for byte as it was. A
matched disk becomes

    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd' name='EXPORT'>
        <host transport='unix' socket='PATH'/>
      </source>
      <target dev='vda' bus='virtio'/>            (and every other child, unchanged)
    </disk>

with `<host name='HOST' port='PORT'/>` when the destination listens on TCP. The `<driver>` keeps
its attributes (the format stays what the image is: a qcow2 file is served byte for byte, so it is
still qcow2); a disk without `<driver>` gets `name='qemu' type='raw'`. New elements use the
document's indentation and quote style.

`rewrite_libvirt_local` is the way back, for B's persistent definition once the domain runs on
its local files: each policy disk that is an NBD network disk on its receive's endpoint becomes
`<disk type='file'>` with `<source file='DEST_FILE'/>`, the rest of the disk (driver, target,
geometry, address ...) as it was. A policy disk that is not on that endpoint is an error.
"""

from __future__ import annotations

import re
import xml.parsers.expat
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

from postcopy.errors import UserError
from postcopy.integrations import DiskMatcher, Rewrite, not_postcopy_note
from postcopy.policy import DomainPolicy, NbdEndpoint
from postcopy.policy.schema import DEFAULT_NBD_PORT

__all__ = ["domain_name", "rewrite_libvirt", "rewrite_libvirt_local"]


@dataclass
class _Element:
    name: str
    attributes: dict[str, str]
    start: int  # byte offset of "<"
    start_tag_end: int  # byte offset just after the start tag's ">"
    end: int = -1  # byte offset just after the element's end
    children: list[_Element] = field(default_factory=list)
    text: str = ""


def _tag_end(data: bytes, start: int) -> int:
    """The offset just after the `>` closing the tag that opens at `start` (quotes respected)."""
    quote = 0
    for index in range(start + 1, len(data)):
        byte = data[index]
        if quote:
            if byte == quote:
                quote = 0
        elif byte in (0x22, 0x27):
            quote = byte
        elif byte == 0x3E:  # ">"
            return index + 1
    raise ValueError("unterminated tag")


def _parse(data: bytes, name: str) -> _Element:
    parser = xml.parsers.expat.ParserCreate()
    stack: list[_Element] = []
    root: list[_Element] = []

    def start(tag: str, attributes: dict[str, str]) -> None:
        offset = parser.CurrentByteIndex
        element = _Element(tag, attributes, offset, _tag_end(data, offset))
        if stack:
            stack[-1].children.append(element)
        else:
            root.append(element)
        stack.append(element)

    def end(tag: str) -> None:
        element = stack.pop()
        if data[element.start_tag_end - 2 : element.start_tag_end] == b"/>":
            element.end = element.start_tag_end
        else:
            element.end = _tag_end(data, parser.CurrentByteIndex)

    def text(chunk: str) -> None:
        if stack:
            stack[-1].text += chunk

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as exc:
        raise UserError(f"{name}:{exc.lineno}: not well-formed XML: {exc}") from None
    if not root or root[0].name != "domain":
        raise UserError(f"{name}: not a libvirt domain XML (the root element is not <domain>)")
    return root[0]


def domain_name(text: str, name: str = "<domain XML>") -> str | None:
    """The `<name>` of a libvirt domain XML."""
    root = _parse(text.encode(), name)
    for child in root.children:
        if child.name == "name":
            return child.text.strip()
    return None


def _indent_before(data: bytes, offset: int) -> bytes:
    """The whitespace between the start of `offset`'s line and `offset`."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    prefix = data[line_start:offset]
    return prefix if prefix.strip() == b"" else b""


def _attr(name: str, value: str, quote: str) -> str:
    quoted = quoteattr(value)  # double-quoted, escaped
    if quote == "'" and "'" not in value:
        quoted = "'" + quoted[1:-1].replace("&quot;", '"') + "'"
    return f"{name}={quoted}"


def _source_xml(endpoint: NbdEndpoint, indent: bytes | None, step: bytes, quote: str) -> bytes:
    """The new <source>; on one line when `indent` is None (a disk written on one line)."""
    if endpoint.socket is not None:
        host = (
            f"<host {_attr('transport', 'unix', quote)} "
            f"{_attr('socket', str(endpoint.socket), quote)}/>"
        )
    else:
        host = (
            f"<host {_attr('name', str(endpoint.host), quote)} "
            f"{_attr('port', str(endpoint.port), quote)}/>"
        )
    opening = f"<source {_attr('protocol', 'nbd', quote)} {_attr('name', endpoint.export, quote)}>"
    if endpoint.tls:
        opening = opening[:-1] + f" {_attr('tls', 'yes', quote)}>"
    if indent is None:
        return opening.encode() + host.encode() + b"</source>"
    newline = b"\n"
    return (
        opening.encode() + newline + indent + step + host.encode() + newline + indent + b"</source>"
    )


_TYPE_ATTRIBUTE = re.compile(rb"""(\stype\s*=\s*)(['"])[^'"]*\2""")


def rewrite_libvirt(text: str, domain: DomainPolicy, name: str = "<domain XML>") -> Rewrite:
    """Rewrite a postcopy domain's disks in a libvirt domain XML (see the module docstring)."""
    if not domain.is_postcopy:
        return Rewrite(text, (), (not_postcopy_note(domain),))
    data = text.encode()
    root = _parse(data, name)
    matcher = DiskMatcher(domain, name)
    edits: list[tuple[int, int, bytes]] = []
    changed: list[str] = []
    devices = [child for child in root.children if child.name == "devices"]
    for disk in (d for devs in devices for d in devs.children if d.name == "disk"):
        children = {child.name: child for child in disk.children}
        target = children.get("target")
        source = children.get("source")
        device = target.attributes.get("dev") if target else None
        paths = [source.attributes.get(key) for key in ("file", "dev")] if source else []
        policy_disk = matcher.match(device, paths)
        if policy_disk is None:
            continue
        changed.append(policy_disk.device)
        endpoint = domain.dest_endpoint(policy_disk)
        start_tag = data[disk.start : disk.start_tag_end]
        quote = "'" if b"'" in start_tag else '"'
        disk_indent = _indent_before(data, disk.start)
        first_child = min(disk.children, key=lambda c: c.start) if disk.children else None
        if first_child is not None:
            child_indent = _indent_before(data, first_child.start)
        else:
            child_indent = disk_indent + b"  "
        step = b"  "
        if child_indent.startswith(disk_indent) and len(child_indent) > len(disk_indent):
            step = child_indent[len(disk_indent) :]
        # A disk whose first child follows its tag on the same line is written on one line.
        one_line = (
            first_child is not None and b"\n" not in data[disk.start_tag_end : first_child.start]
        )
        separator = b"" if one_line else b"\n" + child_indent

        # 1. <disk type='network' ...>
        if _TYPE_ATTRIBUTE.search(start_tag):
            new_tag = _TYPE_ATTRIBUTE.sub(
                lambda m: m[1] + m[2] + b"network" + m[2], start_tag, count=1
            )
        else:
            type_network = f"<disk {_attr('type', 'network', quote)}".encode()
            new_tag = start_tag.replace(b"<disk", type_network, 1)
        edits.append((disk.start, disk.start_tag_end, new_tag))

        # 2. <source protocol='nbd' ...> in place of the old source (or before <target>).
        new_source = _source_xml(endpoint, None if one_line else child_indent, step, quote)
        driver = children.get("driver")
        if driver is None:
            driver_xml = f"<driver {_attr('name', 'qemu', quote)} {_attr('type', 'raw', quote)}/>"
            new_source = driver_xml.encode() + separator + new_source
        if source is not None:
            edits.append((source.start, source.end, new_source))
        elif target is not None:
            edits.append((target.start, target.start, new_source + separator))
        else:
            raise UserError(f"{name}: disk {policy_disk.device!r} has no <source> or <target>")
    matcher.check_all_found()
    for start, end, replacement in sorted(edits, reverse=True):
        data = data[:start] + replacement + data[end:]
    return Rewrite(data.decode(), tuple(changed), ())


def _on_endpoint(source: _Element, endpoint: NbdEndpoint) -> bool:
    """Does this `<source protocol='nbd'>` name the receive's endpoint (and export)?"""
    if source.attributes.get("name", "") != endpoint.export:
        return False
    hosts = [child.attributes for child in source.children if child.name == "host"]
    if len(hosts) != 1:
        return False
    host = hosts[0]
    if endpoint.socket is not None:
        return host.get("transport") == "unix" and host.get("socket") == str(endpoint.socket)
    port = host.get("port", str(DEFAULT_NBD_PORT))
    return host.get("transport", "tcp") == "tcp" and (host.get("name"), port) == (
        endpoint.host,
        str(endpoint.port),
    )


def rewrite_libvirt_local(text: str, domain: DomainPolicy, name: str = "<domain XML>") -> Rewrite:
    """Turn a postcopy domain's NBD disks back into file disks on their `dest_file`s (see the
    module docstring)."""
    if not domain.is_postcopy:
        return Rewrite(text, (), (not_postcopy_note(domain),))
    data = text.encode()
    root = _parse(data, name)
    matcher = DiskMatcher(domain, name)
    edits: list[tuple[int, int, bytes]] = []
    changed: list[str] = []
    devices = [child for child in root.children if child.name == "devices"]
    for disk in (d for devs in devices for d in devs.children if d.name == "disk"):
        children = {child.name: child for child in disk.children}
        target = children.get("target")
        source = children.get("source")
        device = target.attributes.get("dev") if target else None
        policy_disk = matcher.match(device, [])
        if policy_disk is None:
            continue
        endpoint = domain.dest_endpoint(policy_disk)
        kind = disk.attributes.get("type", "file")
        if kind != "network" or source is None or source.attributes.get("protocol") != "nbd":
            raise UserError(
                f"{name}: disk {policy_disk.device!r} is a {kind} disk, not an NBD network disk "
                f"on {endpoint.uri()}"
            )
        if not _on_endpoint(source, endpoint):
            raise UserError(
                f"{name}: disk {policy_disk.device!r} is not on postcopy's endpoint "
                f"{endpoint.uri()}"
            )
        changed.append(policy_disk.device)
        start_tag = data[disk.start : disk.start_tag_end]
        quote = "'" if b"'" in start_tag else '"'
        new_tag = _TYPE_ATTRIBUTE.sub(lambda m: m[1] + m[2] + b"file" + m[2], start_tag, count=1)
        edits.append((disk.start, disk.start_tag_end, new_tag))
        new_source = f"<source {_attr('file', str(policy_disk.dest_file), quote)}/>".encode()
        if "driver" not in children:
            driver_xml = f"<driver {_attr('name', 'qemu', quote)} {_attr('type', 'raw', quote)}/>"
            new_source = driver_xml.encode() + b" " + new_source
        edits.append((source.start, source.end, new_source))
    matcher.check_all_found()
    for start, end, replacement in sorted(edits, reverse=True):
        data = data[:start] + replacement + data[end:]
    return Rewrite(data.decode(), tuple(changed), ())
