"""`block-postcopy` (the xl block hotplug script), its disk table and the Xen pivot's checks.

The unmarked tests run the installed script itself (POSIX sh) against fake device programs
(tests/integrations/xen_fake_tools.py: xenstore, nbd-client, dmsetup and losetup acting on a
made-up sysfs and xenstore) and a real policy, receive socket and state directory; they check
what the kernel and xenstore would show afterwards, and what a failure leaves (nothing).
The tests marked `xen` run in the nested Xen lab (`make test-xen`): see the second half.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postcopy.destination.gate import is_source_frozen
from postcopy.errors import UserError
from postcopy.integrations.xen.devices import (
    DeviceError,
    find_dm_device,
    free_nbd_devices,
    linear_table,
    parse_linear_table,
    physical_device_value,
)
from postcopy.integrations.xen.disktable import render_disk_table
from postcopy.integrations.xen.install import install_block_script
from postcopy.integrations.xen.pivot import PivotRefused, check_pivot
from postcopy.policy import parse_config

FAKE_TOOLS = Path(__file__).with_name("xen_fake_tools.py")
BACKEND = "backend/vbd/5/51712"  # libxl's XENBUS_PATH is relative
DISK_SECTORS = 131072  # 64 MiB


@dataclass
class Host:
    """A made-up dom0: fake sysfs and xenstore, real policy, socket dir and state root."""

    root: Path
    script: Path
    policy: Path
    env: dict[str, str]

    @property
    def block(self) -> Path:
        return self.root / "sys" / "block"

    def xs(self, path: str) -> str | None:
        key = self.root / "xs" / path.lstrip("/")
        return key.read_text() if key.is_file() else None

    def set_xs(self, path: str, value: str) -> None:
        key = self.root / "xs" / path.lstrip("/")
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text(value)

    def run(self, command: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.script), command], env={**self.env, **extra}, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip

    def connected_nbd(self) -> list[str]:
        return sorted(p.parent.name for p in self.block.glob("nbd*/pid"))


def _policy_text(root: Path) -> str:
    return (
        f'[defaults]\nstate_root = "{root}/state"\nsocket_dir = "{root}/run"\n'
        'source = "unix:/run/a.sock"\n'
        '[domains.du]\nmode = "postcopy"\n'
        f'[[domains.du.disks]]\ndevice = "xvda"\nsource_image = "{root}/a/du.img"\n'
        f'dest_file = "{root}/b/du.img"\n'
        '[[domains.du.disks]]\ndevice = "xvdb"\nsource_image = "/a/data.img"\n'
        'listen = "127.0.0.1:10900"\n'
    )


@pytest.fixture(name="host")
def host_fixture(tmp_path: Path) -> Iterator[Host]:
    root = tmp_path
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name in ("xenstore-read", "xenstore-write", "nbd-client", "dmsetup", "losetup"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_TOOLS} {name} "$@"\n')
        (bin_dir / name).chmod(0o755)
    for number in range(4):
        nbd = root / "sys/block" / f"nbd{number}"
        nbd.mkdir(parents=True)
        (nbd / "size").write_text("0\n")
        (nbd / "dev").write_text(f"43:{number * 32}\n")
    for sub in ("a", "b", "run", "state/du/xvda", "scripts", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "a/du.img").write_bytes(b"\0" * 4096)
    policy = root / "domains.toml"
    policy.write_text(_policy_text(root))
    script = install_block_script(root / "scripts", policy)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_ROOT": str(root),
        "FAKE_DISK_SECTORS": str(DISK_SECTORS),
        "XENBUS_PATH": BACKEND,
        "BLOCK_POSTCOPY_SYSFS": str(root / "sys"),
        "BLOCK_POSTCOPY_LOG": str(root / "log/xen-hotplug.log"),
        "BLOCK_POSTCOPY_LOCK": str(root / "run/hotplug.lock"),
    }
    host = Host(root, script, policy, env)
    host.set_xs(f"{BACKEND}/params", "du-xvda")
    host.set_xs(f"{BACKEND}/frontend-id", "5")
    host.set_xs(f"{BACKEND}/mode", "w")
    host.set_xs("/local/domain/5/name", "du--incoming")
    yield host


@pytest.fixture(name="receive_socket")
def receive_socket_fixture(host: Host) -> Iterator[Path]:
    """A listening Unix socket where `postcopy receive` would serve du's xvda."""
    path = host.root / "run/du-xvda.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    yield path
    listener.close()


def test_incoming_add_puts_a_postcopy_dm_device_over_nbd_and_opens_the_gate(
    host: Host, receive_socket: Path
) -> None:
    done = host.run("add")
    assert done.returncode == 0, done.stderr
    assert host.connected_nbd() == ["nbd0"]
    dm = find_dm_device("postcopy-du-xvda", sys_root=host.root / "sys")
    assert dm is not None and dm.uuid == "POSTCOPY-du-xvda" and dm.slaves == ("nbd0",)
    assert (host.block / dm.kernel_name / "table").read_text().strip() == (
        f"0 {DISK_SECTORS} linear /dev/nbd0 0"
    )
    assert host.xs(f"{BACKEND}/physical-device") == "fe:0"  # 254:0 in hex, as blkback reads it
    assert host.xs(f"{BACKEND}/physical-device-path") == "/dev/dm-0"
    assert host.xs(f"{BACKEND}/hotplug-status") == "connected"
    assert is_source_frozen(host.root / "state/du/xvda")
    assert "add du-xvda: /dev/dm-0 (lazy destination) for du--incoming" in done.stderr
    assert done.stderr.count("\n") == 1 and (host.root / "log/xen-hotplug.log").exists()

    removed = host.run("remove")
    assert removed.returncode == 0, removed.stderr
    assert host.connected_nbd() == [] and not list(host.block.glob("dm-*"))


def test_incoming_add_without_receive_fails_in_xenstore_and_leaves_nothing(host: Host) -> None:
    done = host.run("add")
    assert done.returncode == 1
    error = host.xs(f"{BACKEND}/hotplug-error") or ""
    assert "is not a socket: is postcopy receive running for du-xvda?" in error
    assert host.xs(f"{BACKEND}/hotplug-status") == "error"
    assert host.xs(f"{BACKEND}/physical-device") is None
    assert host.connected_nbd() == [] and not list(host.block.glob("dm-*"))
    assert not is_source_frozen(host.root / "state/du/xvda")  # the source keeps running on A
    assert done.stderr.count("\n") == 1 and error in done.stderr


def test_a_failing_dmsetup_disconnects_nbd_again_and_keeps_the_gate_shut(
    host: Host, receive_socket: Path
) -> None:
    done = host.run("add", FAKE_FAIL="dmsetup create")
    assert done.returncode == 1
    assert "dmsetup create: device-mapper: create ioctl" in (
        host.xs(f"{BACKEND}/hotplug-error") or ""
    )
    assert host.connected_nbd() == [] and not list(host.block.glob("dm-*"))
    assert not is_source_frozen(host.root / "state/du/xvda")


def test_incoming_add_needs_the_state_directory(host: Host, receive_socket: Path) -> None:
    (host.root / "state/du/xvda").rmdir()
    assert host.run("add").returncode == 1
    assert "state directory" in (host.xs(f"{BACKEND}/hotplug-error") or "")
    assert host.connected_nbd() == []


def test_fresh_start_attaches_the_image_through_a_loop_device(host: Host) -> None:
    host.set_xs("/local/domain/5/name", "du")
    done = host.run("add")
    assert done.returncode == 0, done.stderr
    assert (host.block / "loop0/loop/backing_file").read_text().strip() == str(
        host.root / "a/du.img"
    )
    assert host.xs(f"{BACKEND}/physical-device") == "7:0"
    assert host.xs(f"{BACKEND}/physical-device-path") == "/dev/loop0"
    assert (host.block / "loop0/ro").read_text().strip() == "0"
    assert host.connected_nbd() == [] and not is_source_frozen(host.root / "state/du/xvda")
    assert host.run("remove").returncode == 0
    assert not (host.block / "loop0").exists()


def test_read_only_disk_gets_a_read_only_loop_device(host: Host) -> None:
    host.set_xs("/local/domain/5/name", "du")
    host.set_xs(f"{BACKEND}/mode", "r")
    assert host.run("add").returncode == 0
    assert (host.block / "loop0/ro").read_text().strip() == "1"


def test_unknown_target_and_bad_arguments_are_one_line_errors(host: Host) -> None:
    host.set_xs(f"{BACKEND}/params", "other-xvda")
    done = host.run("add")
    assert done.returncode == 1
    assert "target 'other-xvda' names no disk of a postcopy domain" in (
        host.xs(f"{BACKEND}/hotplug-error") or ""
    )
    usage = host.run("attach")
    assert usage.returncode == 1 and "usage: block-postcopy add|remove" in usage.stderr
    unset = subprocess.run(
        [str(host.script), "add"], env={k: v for k, v in host.env.items() if k != "XENBUS_PATH"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert unset.returncode == 1 and "usage" in unset.stderr


def test_remove_refuses_a_dm_device_that_is_not_ours(host: Host) -> None:
    dm = host.block / "dm-0"
    (dm / "dm").mkdir(parents=True)
    (dm / "dm/name").write_text("vg-root\n")
    (dm / "dm/uuid").write_text("LVM-abc\n")
    host.set_xs(f"{BACKEND}/physical-device-path", "/dev/dm-0")
    done = host.run("remove")
    assert done.returncode == 1
    assert "is dm device vg-root, not a postcopy disk" in (
        host.xs(f"{BACKEND}/hotplug-error") or ""
    )
    assert dm.exists()


def test_remove_with_nothing_attached_succeeds(host: Host) -> None:
    assert host.run("remove").returncode == 0


def test_the_disk_table_is_rebuilt_when_the_policy_is_newer(
    host: Host, receive_socket: Path
) -> None:
    table = host.root / "scripts/block-postcopy.disks"
    text = host.policy.read_text().replace('device = "xvda"', 'device = "xvdc"')
    host.policy.write_text(text)
    os.utime(table, (1, 1))  # the table is older than the policy now
    host.set_xs(f"{BACKEND}/params", "du-xvdc")
    (host.root / "state/du/xvdc").mkdir()
    (host.root / "run/du-xvda.sock").rename(host.root / "run/du-xvdc.sock")
    done = host.run("add")
    assert done.returncode == 0, done.stderr
    assert "'du-xvdc')" in table.read_text() or "du-xvdc)" in table.read_text()
    assert is_source_frozen(host.root / "state/du/xvdc")


def test_disk_table_quotes_values_and_names_the_tcp_listener(tmp_path: Path) -> None:
    text = _policy_text(tmp_path).replace(f"{tmp_path}/a/du.img", "/a/it's here.img")
    table = render_disk_table(parse_config(text, tmp_path / "domains.toml"))
    assert "image='/a/it'\"'\"'s here.img'" in table
    assert "du-xvdb) domain=du device=xvdb socket='' listen='127.0.0.1 10900'" in table
    probe = subprocess.run(
        ["sh", "-c", '. /dev/stdin; postcopy_disk du-xvda && echo "$image|$socket|$state_dir"'
         "; postcopy_disk nope || echo none"],
        input=table, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert probe.stdout.splitlines() == [
        f"/a/it's here.img|{tmp_path}/run/du-xvda.sock|{tmp_path}/state/du/xvda",
        "none",
    ]


# ---- the device helpers and the pivot's refusals, without a lab -----------------------------


def test_linear_tables_are_built_and_parsed() -> None:
    assert linear_table(64 << 20, "/dev/loop3").text() == "0 131072 linear /dev/loop3 0"
    assert parse_linear_table("0 131072 linear 43:0 0\n").device == "43:0"
    with pytest.raises(DeviceError):
        linear_table(1000, "/dev/loop3")
    for bad in ("", "0 10 linear 7:0 0\n10 10 linear 7:1 0\n", "0 10 striped 2 8 7:0 0 7:1 0"):
        with pytest.raises(DeviceError):
            parse_linear_table(bad)
    assert physical_device_value(254, 17) == "fe:11"


def test_free_nbd_devices_skips_connected_ones_and_partitions(host: Host) -> None:
    (host.block / "nbd1/pid").write_text("1\n")
    (host.block / "nbd0p1").mkdir()
    (host.block / "nbd12").mkdir()
    (host.block / "nbd12/size").write_text("0\n")
    (host.block / "nbd3/size").write_text("8\n")  # size set, no pid yet: being set up
    assert free_nbd_devices(host.root / "sys") == ["nbd0", "nbd2", "nbd12"]


def test_pivot_refuses_an_absent_foreign_or_incomplete_disk(
    host: Host, receive_socket: Path
) -> None:
    sys_root = host.root / "sys"
    state = host.root / "state/du/xvda"
    with pytest.raises(PivotRefused, match="no device-mapper device postcopy-du-xvda"):
        check_pivot("du-xvda", host.root / "b/du.img", state, sys_root)
    assert host.run("add").returncode == 0
    # dmsetup table is the real program here, so the table check needs a real dm device: the
    # status check comes first in these refusals.
    with pytest.raises((PivotRefused, UserError)):
        check_pivot("du-xvda", host.root / "b/du.img", state, sys_root)
