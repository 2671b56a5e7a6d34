"""Install `block-postcopy` where xl finds block scripts (Xen's script directory).

How it works. The script ships as package data next to this module with three placeholders: the
Python interpreter (the one installing it, so that a postcopy in a virtualenv works as one in the
system Python: the script needs it only to rebuild its disk table), the policy file (the one
`postcopy` commands read: `--config`, else `$POSTCOPY_CONFIG`, else /etc/postcopy/domains.toml)
and its disk table (`block-postcopy.disks` next to it, see `postcopy.integrations.xen.disktable`).
`install_block_script` writes the table, then the filled-in script (mode 0755), each atomically
and durably. xl looks for a disk's `script=NAME` in its script directory, /etc/xen/scripts.
"""

from __future__ import annotations

import importlib.resources
import shlex
import sys
from pathlib import Path

from postcopy.errors import UserError
from postcopy.fsutil import write_file_atomically
from postcopy.integrations.xen.disktable import write_disk_table
from postcopy.policy import load_config
from postcopy.policy.loader import resolve_config_path

__all__ = ["SCRIPT_NAME", "XEN_SCRIPTS_DIR", "install_block_script", "render_block_script"]

XEN_SCRIPTS_DIR = Path("/etc/xen/scripts")
SCRIPT_NAME = "block-postcopy"
TABLE_NAME = "block-postcopy.disks"


def render_block_script(python: str, config: Path, table: Path) -> str:
    """The script's text with the interpreter, the policy file and the disk table filled in."""
    template = (importlib.resources.files(__package__) / SCRIPT_NAME).read_text()
    for placeholder, value in (("@PYTHON@", python), ("@CONFIG@", str(config)),
                               ("@TABLE@", str(table))):  # fmt: skip
        template = template.replace(placeholder, shlex.quote(value))
    return template


def install_block_script(
    scripts_dir: Path = XEN_SCRIPTS_DIR, config: Path | None = None, python: str | None = None
) -> Path:
    """Write the disk table and the filled-in script into `scripts_dir`; the script's path."""
    if not scripts_dir.is_dir():
        raise UserError(f"{scripts_dir} is not a directory (is Xen's toolstack installed?)")
    config_path, _ = resolve_config_path(config)
    policy = load_config(config_path)
    table = scripts_dir.absolute() / TABLE_NAME
    write_disk_table(policy, table)
    text = render_block_script(python or sys.executable, config_path.absolute(), table)
    target = scripts_dir / SCRIPT_NAME
    try:
        write_file_atomically(target, text.encode(), mode=0o755)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target
