"""Block device helpers of the Xen integration: device-mapper tables, NBD and loop devices, sysfs.

How it works. A postcopy disk on the destination is a device-mapper device named
`postcopy-<target>` (UUID `POSTCOPY-<target>`, where the target is the disk's `<domain>-<device>`)
with one `linear` target over a kernel NBD device (`/dev/nbdN`, connected to `postcopy receive`),
and after the pivot over a loop device of the local file. Everything here reads the kernel's own
view: `/sys/block/dm-N/dm/{name,uuid}` and `/sys/block/dm-N/slaves/` for a dm device,
`/sys/block/nbdN/pid` for a connected NBD device, `/sys/block/loopN/loop/backing_file` for a loop
device; the programs (`dmsetup`, `nbd-client`, `losetup`) only change things. `dmsetup` runs
with `--noudevsync` (dom0 may run no udev; the kernel's devtmpfs makes `/dev/dm-N` by itself).
The sysfs root is a parameter, so that the parsing is tested on a made-up tree.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from postcopy.errors import PostcopyError

__all__ = [
    "DM_NAME_PREFIX",
    "DM_UUID_PREFIX",
    "DeviceError",
    "DmDevice",
    "LinearTable",
    "device_number",
    "dm_name",
    "dm_uuid",
    "find_dm_device",
    "free_nbd_devices",
    "linear_table",
    "loop_backing_file",
    "parse_linear_table",
    "physical_device_value",
    "run_tool",
]

DM_NAME_PREFIX = "postcopy-"
DM_UUID_PREFIX = "POSTCOPY-"
SECTOR = 512
NBD_MAJOR = 43
LOOP_MAJOR = 7
TOOL_TIMEOUT = 60.0
SYS = Path("/sys")


class DeviceError(PostcopyError):
    """A device program failed or a device is not what it should be (one line)."""


def run_tool(argv: Sequence[str], timeout: float = TOOL_TIMEOUT) -> str:
    """Run a device program; its stdout, or `DeviceError` with the last line it complained."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise DeviceError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise DeviceError(f"{' '.join(argv)} took more than {timeout:g} s") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        why = lines[-1] if lines else f"status {done.returncode}"
        raise DeviceError(f"{' '.join(argv)} failed: {why}")
    return done.stdout


def dm_name(target: str) -> str:
    """The device-mapper name of a postcopy disk."""
    return DM_NAME_PREFIX + target


def dm_uuid(target: str) -> str:
    """The device-mapper UUID of a postcopy disk: what marks a dm device as ours."""
    return DM_UUID_PREFIX + target


@dataclass(frozen=True)
class LinearTable:
    """A one-line dm table `0 SECTORS linear DEVICE OFFSET` (DEVICE: a path or MAJOR:MINOR)."""

    sectors: int
    device: str
    offset: int = 0

    def text(self) -> str:
        return f"0 {self.sectors} linear {self.device} {self.offset}"


def linear_table(size_bytes: int, device: str) -> LinearTable:
    """The table mapping a whole disk of `size_bytes` onto `device`, sector for sector."""
    if size_bytes <= 0 or size_bytes % SECTOR:
        raise DeviceError(f"{device}: size {size_bytes} is not a positive multiple of {SECTOR}")
    return LinearTable(size_bytes // SECTOR, device)


def parse_linear_table(text: str) -> LinearTable:
    """Parse `dmsetup table NAME` output; `DeviceError` unless it is one whole linear target."""
    lines = [line.split() for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        raise DeviceError(f"dm table has {len(lines)} targets, a postcopy disk has one: {text!r}")
    fields = lines[0]
    if len(fields) != 5 or fields[2] != "linear" or fields[0] != "0":
        raise DeviceError(f"dm table {text.strip()!r} is not one linear target from sector 0")
    try:
        return LinearTable(int(fields[1]), fields[3], int(fields[4]))
    except ValueError:
        raise DeviceError(f"dm table {text.strip()!r} has a bad number") from None


def physical_device_value(major: int, minor: int) -> str:
    """`physical-device` as blkback and Xen's block-common.sh write it: hex MAJOR:MINOR."""
    return f"{major:x}:{minor:x}"


def device_number(path: str | Path) -> tuple[int, int]:
    """(major, minor) of a block device node; `DeviceError` for anything else."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"{path} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class DmDevice:
    """A device-mapper device as sysfs shows it."""

    name: str
    uuid: str
    kernel_name: str  # dm-N
    major: int
    minor: int
    slaves: tuple[str, ...]  # kernel names of the devices under it (nbd0, loop3)

    @property
    def path(self) -> str:
        return f"/dev/{self.kernel_name}"

    @property
    def is_postcopy(self) -> bool:
        return self.uuid.startswith(DM_UUID_PREFIX)


def _dm_device(block: Path) -> DmDevice:
    major, _, minor = _read(block / "dev").partition(":")
    slaves = block / "slaves"
    return DmDevice(
        name=_read(block / "dm" / "name"),
        uuid=_read(block / "dm" / "uuid"),
        kernel_name=block.name,
        major=int(major or -1),
        minor=int(minor or -1),
        slaves=tuple(sorted(p.name for p in slaves.iterdir())) if slaves.is_dir() else (),
    )


def find_dm_device(
    name: str | None = None, kernel_name: str | None = None, sys_root: Path = SYS
) -> DmDevice | None:
    """The dm device with this dm name (or kernel name `dm-N`), if the kernel has one."""
    if kernel_name is not None:
        block = sys_root / "block" / kernel_name
        return _dm_device(block) if (block / "dm").is_dir() else None
    for block in sorted((sys_root / "block").glob("dm-*")):
        if _read(block / "dm" / "name") == name:
            return _dm_device(block)
    return None


def free_nbd_devices(sys_root: Path = SYS) -> list[str]:
    """Kernel NBD devices no client holds (no `pid` file, size 0), lowest number first."""
    found = []
    for block in (sys_root / "block").glob("nbd*"):
        if not block.name[3:].isdigit():
            continue  # a partition such as nbd0p1
        if (block / "pid").exists() or _read(block / "size") not in ("", "0"):
            continue
        found.append(block.name)
    return sorted(found, key=lambda name: int(name[3:]))


def loop_backing_file(kernel_name: str, sys_root: Path = SYS) -> str | None:
    """The file a loop device reads (`/sys/block/loopN/loop/backing_file`), or None."""
    return _read(sys_root / "block" / kernel_name / "loop" / "backing_file") or None
