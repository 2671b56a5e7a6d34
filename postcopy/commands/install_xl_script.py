"""`postcopy install-xl-script`: install the `block-postcopy` hotplug script for xl.

    postcopy install-xl-script [--scripts-dir DIR] [--config FILE]

Writes /etc/xen/scripts/block-postcopy (or DIR/block-postcopy), which libxl runs for a disk
whose spec says `script=block-postcopy` (what `postcopy config --xl` writes). The script runs
this postcopy's Python; with `--config` it reads that policy file unless $POSTCOPY_CONFIG is set.
Run it on every Xen host that starts or receives postcopy domains.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from postcopy.integrations.xen.install import XEN_SCRIPTS_DIR, install_block_script


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "install-xl-script", help="install the block-postcopy hotplug script for xl"
    )
    parser.add_argument(
        "--scripts-dir",
        type=Path,
        default=XEN_SCRIPTS_DIR,
        help=f"xl's hotplug script directory (default {XEN_SCRIPTS_DIR})",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="the policy file to use")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(install_block_script(args.scripts_dir, args.config))
    return 0
