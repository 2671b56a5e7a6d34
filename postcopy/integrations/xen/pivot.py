"""Switch a running Xen disk from the lazy destination to its local file, under device-mapper.

How it works. On the destination, `block-postcopy` gave blkback the device-mapper device
`postcopy-<target>`: one linear target over a kernel NBD device connected to `postcopy receive`.
Once receive has every block (its status says `complete`), `pivot_xen_disk` points that same dm
device at the local file, so blkback and the guest never notice (the device number blkback opened
stays; the dm-clone "hydration done" pattern):

1. Check everything before changing anything (each refusal is a `PivotRefused`, one line): the dm
   device exists and is ours (UUID `POSTCOPY-<target>`), its table is one linear target over one
   NBD device (a table over a loop device of the local file: already pivoted), the disk's status
   is `complete` for this local file, and the file has the table's size.
2. `losetup --find --show FILE`: a loop device on the local file (read-only when the dm device
   is), made before the suspend so that the guest's I/O pauses as briefly as possible.
3. `dmsetup suspend` (waits for every in-flight request to finish on NBD, so every write receive
   acknowledged is in the file's page cache, which the loop device reads), `dmsetup reload` with
   `0 SECTORS linear /dev/loopN 0`, `dmsetup resume`: queued and later requests go to the loop
   device. If the reload fails, the old table is resumed and the loop device detached
   (`PivotRolledBack`): nothing changed.
4. `nbd-client -d` the NBD device, then stop receive (SIGTERM to the process in the status: nbdkit
   makes the block map durable and exits; `postcopy receive` follows it) and wait for it to go.

The domain's config on the destination is rewritten for its next start with `postcopy config
--xl FILE --local` (`postcopy.integrations.xl.rewrite_xl(local=True)`): its disk then opens the
local file directly.

Errors:
    PostcopyError
    └── PivotError              the pivot did not happen or did not finish
        ├── PivotRefused        the disk is not complete or the device is not ours; no change
        └── PivotRolledBack     device-mapper refused the new table; the old one is back
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postcopy.destination.status import process_alive, read_status
from postcopy.errors import PostcopyError, UserError
from postcopy.integrations.xen.devices import (
    SECTOR,
    SYS,
    DeviceError,
    DmDevice,
    LinearTable,
    dm_name,
    find_dm_device,
    loop_backing_file,
    parse_linear_table,
    run_tool,
)

__all__ = [
    "PivotError",
    "PivotRefused",
    "PivotRolledBack",
    "XenPivotPlan",
    "XenPivotResult",
    "check_pivot",
    "pivot_xen_disk",
]

RECEIVE_STOP_TIMEOUT = 30.0


class PivotError(PostcopyError):
    """The pivot did not happen or did not finish."""


class PivotRefused(PivotError):
    """The disk was not ready or not recognised; nothing was changed."""


class PivotRolledBack(PivotError):
    """device-mapper refused a step; the old table is active again, the loop device detached."""


@dataclass(frozen=True)
class XenPivotPlan:
    """What a pivot will do, all checked (see `check_pivot`)."""

    dm: DmDevice
    table: LinearTable
    nbd_device: str  # /dev/nbdN, under the dm device now
    local_file: Path
    receive_pid: int | None  # the process serving the disk (nbdkit), if it runs
    readonly: bool


@dataclass(frozen=True)
class XenPivotResult:
    dm_name: str
    loop_device: str
    old_device: str
    suspended_seconds: float  # from `dmsetup suspend` to the end of `dmsetup resume`
    receive_stopped: bool


def _refuse(message: str) -> PivotRefused:
    return PivotRefused(message)


def _dm_table(name: str) -> str:
    return run_tool(["dmsetup", "table", name])


def check_pivot(
    target: str,
    local_file: Path,
    state_dir: Path,
    sys_root: Path = SYS,
    read_table: Callable[[str], str] = _dm_table,
) -> XenPivotPlan:
    """Check that the disk `<domain>-<device>` can be pivoted onto `local_file`; the plan.
    (`sys_root` and `read_table`, which gives `dmsetup table NAME`, are for tests.)"""
    name = dm_name(target)
    dm = find_dm_device(name, sys_root=sys_root)
    if dm is None:
        raise _refuse(f"no device-mapper device {name}: disk {target} is not attached here")
    if not dm.is_postcopy:
        raise _refuse(f"device-mapper device {name} is not a postcopy disk (uuid {dm.uuid!r})")
    try:
        table = parse_linear_table(read_table(name))
    except DeviceError as exc:
        raise _refuse(f"{name}: {exc}") from None
    local_file = Path(local_file).absolute()
    if len(dm.slaves) != 1:
        raise _refuse(f"{name} maps {len(dm.slaves)} devices, a postcopy disk maps one")
    slave = dm.slaves[0]
    if slave.startswith("loop"):
        backing = loop_backing_file(slave, sys_root)
        already = " (already pivoted)" if backing and Path(backing) == local_file else ""
        raise _refuse(f"{name} is on /dev/{slave} ({backing}), not on NBD{already}")
    if not slave.startswith("nbd"):
        raise _refuse(f"{name} is on /dev/{slave}, not on an NBD device")
    try:
        status = read_status(state_dir)
    except UserError as exc:
        raise _refuse(f"disk {target}: {exc}") from None
    if status.get("state") != "complete":
        missing = status.get("missing_bytes")
        raise _refuse(
            f"disk {target} is not complete (state {status.get('state')}, {missing} bytes "
            "missing): pivot once every block is local"
        )
    if status.get("dest") and Path(status["dest"]).absolute() != local_file:
        raise _refuse(f"{state_dir} is the state of {status['dest']}, not of {local_file}")
    try:
        size = local_file.stat().st_size
    except OSError as exc:
        raise _refuse(f"local file {local_file}: {exc.strerror}") from None
    if size != table.sectors * SECTOR:
        raise _refuse(
            f"local file {local_file} has {size} bytes, {name} maps {table.sectors * SECTOR}"
        )
    pid = status.get("pid")
    receive_pid = pid if isinstance(pid, int) and process_alive(pid) else None
    readonly = (sys_root / "block" / dm.kernel_name / "ro").read_text().strip() == "1"
    return XenPivotPlan(dm, table, f"/dev/{slave}", local_file, receive_pid, readonly)


def _stop_receive(pid: int, timeout: float) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid) or _is_zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] == "Z"


def pivot_xen_disk(
    target: str,
    local_file: Path,
    state_dir: Path,
    *,
    stop_receive: bool = True,
    receive_timeout: float = RECEIVE_STOP_TIMEOUT,
) -> XenPivotResult:
    """Pivot disk `<domain>-<device>` onto `local_file` (see the module docstring)."""
    plan = check_pivot(target, local_file, state_dir)
    name = plan.dm.name
    losetup = ["losetup", "--find", "--show", *(["--read-only"] if plan.readonly else [])]
    try:
        loop = run_tool([*losetup, str(plan.local_file)]).strip()
    except DeviceError as exc:
        raise PivotRefused(f"cannot attach {plan.local_file}: {exc}") from None
    new_table = LinearTable(plan.table.sectors, loop)
    started = time.monotonic()
    try:
        run_tool(["dmsetup", "suspend", "--noudevsync", name])
    except DeviceError as exc:
        run_tool(["losetup", "-d", loop])
        raise PivotRolledBack(f"{name}: {exc}") from None
    try:
        run_tool(["dmsetup", "reload", "--noudevsync", name, "--table", new_table.text()])
    except DeviceError as exc:
        run_tool(["dmsetup", "resume", "--noudevsync", name])
        run_tool(["losetup", "-d", loop])
        raise PivotRolledBack(f"{name}: {exc}; back on {plan.nbd_device}") from None
    try:
        run_tool(["dmsetup", "resume", "--noudevsync", name])
    except DeviceError as exc:
        raise PivotError(f"{name}: the new table is loaded but {exc}") from None
    suspended = time.monotonic() - started
    try:
        run_tool(["nbd-client", "-d", plan.nbd_device])
    except DeviceError as exc:
        raise PivotError(f"{name} is on {loop} now, but {exc}") from None
    stopped = False
    if stop_receive and plan.receive_pid is not None:
        stopped = _stop_receive(plan.receive_pid, receive_timeout)
        if not stopped:
            raise PivotError(
                f"{name} is on {loop} now, but receive (pid {plan.receive_pid}) did not stop "
                f"within {receive_timeout:g} s"
            )
    return XenPivotResult(name, loop, plan.nbd_device, suspended, stopped)
