"""The disk table of `block-postcopy`: the policy's postcopy disks as a shell function.

How it works. The hotplug script runs inside a migration's downtime, where a Python start in a
loaded dom0 costs seconds, so it never parses the policy itself. `render_disk_table` turns every
disk of every postcopy domain into one branch of a POSIX shell function, keyed by the script's
target `<domain>-<device>`:

    postcopy_disk() {
        case $1 in
        'web1-xvda') domain='web1' device='xvda' socket='/run/postcopy/web1-xvda.sock'
            listen='' state_dir='/var/lib/postcopy/web1/xvda' image='/srv/xen/web1-root.img' ;;
        *) return 1 ;;
        esac
    }

(`listen` is `HOST PORT` for a disk that `postcopy receive` serves on TCP; `socket` is then
empty.) The script sources the table (no process is started) and calls the function. `postcopy
install-xl-script` writes it next to the script; the script rewrites it (`python -m
postcopy.integrations.xen.disktable`, the slow path) when the policy file is newer than the
table, so the policy stays the one place that says where each disk lives. Every value is quoted
with `shlex.quote`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from postcopy.errors import UserError
from postcopy.fsutil import write_file_atomically
from postcopy.policy import PolicyConfig, load_config

__all__ = ["disk_target", "render_disk_table", "write_disk_table"]


def disk_target(domain_name: str, device: str) -> str:
    """The script target of a disk: `<domain>-<device>`."""
    return f"{domain_name}-{device}"


def render_disk_table(policy: PolicyConfig) -> str:
    """The table's shell text for every postcopy disk of `policy`."""
    q = shlex.quote
    lines = [
        f"# block-postcopy's disk table, made by postcopy from {policy.path}: do not edit",
        "postcopy_disk() {",
        "    case $1 in",
    ]
    seen: dict[str, str] = {}
    for domain, disk in policy.postcopy_disks():
        target = disk_target(domain.name, disk.device)
        if target in seen:
            raise UserError(
                f"{policy.path}: disks {seen[target]} and {domain.name} {disk.device} both have "
                f"the block script target {target!r}"
            )
        seen[target] = f"{domain.name} {disk.device}"
        endpoint = domain.dest_endpoint(disk)
        socket = str(endpoint.socket) if endpoint.socket is not None else ""
        listen = f"{endpoint.host} {endpoint.port}" if endpoint.socket is None else ""
        lines.append(
            f"    {q(target)}) domain={q(domain.name)} device={q(disk.device)} "
            f"socket={q(socket)} listen={q(listen)}\n"
            f"        state_dir={q(str(domain.state_dir(disk)))} "
            f"image={q(str(disk.source_image))} ;;"
        )
    lines += ["    *) return 1 ;;", "    esac", "}", ""]
    return "\n".join(lines)


def write_disk_table(policy: PolicyConfig, path: Path) -> None:
    """Replace the table at `path` atomically (the script may be reading the old one)."""
    try:
        write_file_atomically(path, render_disk_table(policy).encode(), mode=0o644)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def main(argv: list[str] | None = None) -> int:
    """`python -m postcopy.integrations.xen.disktable --config FILE --output TABLE`."""
    parser = argparse.ArgumentParser(prog="postcopy.integrations.xen.disktable")
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        write_disk_table(load_config(args.config), args.output)
    except UserError as exc:
        print(f"block-postcopy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
