"""Rewriting hypervisor configs so a domain's disks open the lazy destination over NBD.

One module per toolstack (`xl`, `libvirt`, `qemu`), each with a `rewrite_*(text, domain)` that
returns a `Rewrite`: the new text plus which disks changed and notes for the operator. They all
edit text in place (only the disk definitions change; comments, order and layout stay as they
were) and share the rules here:

- Only a `postcopy` domain's disks change; for any other mode the text comes back unchanged with a
  note.
- A disk in the config is one of the domain's policy disks when its guest device name (xl
  `vdev`, libvirt `<target dev>`, QEMU `id`/`node-name`) equals the policy's `device`, or else when
  its image path equals the policy's `dest_file` or `source_image`. Disks that match no policy
  disk (a CD-ROM, a shared volume) are left alone; a policy disk missing from the config is an
  error.
- The NBD endpoint of each disk comes from the policy (`DomainPolicy.dest_endpoint`): the Unix
  socket `<socket_dir>/<domain>-<device>.sock`, or TCP when the disk sets `listen`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from postcopy.errors import UserError
from postcopy.policy import DiskPolicy, DomainPolicy

__all__ = ["DiskMatcher", "Rewrite", "not_postcopy_note"]


@dataclass(frozen=True)
class Rewrite:
    """A rewritten config: its full text, the devices whose disks now use NBD, notes for stderr."""

    text: str
    changed: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def not_postcopy_note(domain: DomainPolicy) -> str:
    origin = "" if domain.listed else f" (not listed in {domain.config_file}; the default mode)"
    return (
        f"domain {domain.name!r} is in {domain.mode.value} mode{origin}: "
        "its config is unchanged, the toolstack migrates its disks"
    )


class DiskMatcher:
    """Pairs the disks found in a config with the domain's policy disks (see the module rules)."""

    def __init__(self, domain: DomainPolicy, config_name: str) -> None:
        self.domain = domain
        self.config_name = config_name
        self._matched: dict[str, str] = {}  # policy device -> how the config names it

    def match(self, device: str | None, paths: Iterable[str | None] = ()) -> DiskPolicy | None:
        """The policy disk for a config disk with this device name and image path(s), if any."""
        found: DiskPolicy | None = None
        if device:
            found = next((d for d in self.domain.disks if d.device == device), None)
        if found is None:
            wanted = {str(p) for p in paths if p}
            found = next(
                (
                    d
                    for d in self.domain.disks
                    if str(d.dest_file) in wanted or str(d.source_image) in wanted
                ),
                None,
            )
        if found is None:
            return None
        label = device or next((p for p in paths if p), None) or "?"
        if found.device in self._matched:
            raise UserError(
                f"{self.config_name}: disks {self._matched[found.device]!r} and {label!r} both "
                f"match policy disk {found.device!r} of domain {self.domain.name!r}"
            )
        self._matched[found.device] = label
        return found

    def check_all_found(self) -> None:
        """Raise if a policy disk matched no disk of the config."""
        missing = [d.device for d in self.domain.disks if d.device not in self._matched]
        if missing:
            raise UserError(
                f"{self.config_name}: no disk for {', '.join(missing)} of domain "
                f"{self.domain.name!r} (matched by device name, or by image path "
                f"{', '.join(str(d.dest_file) for d in self.domain.disks if d.device in missing)})"
            )
