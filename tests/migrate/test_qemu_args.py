"""B's QEMU arguments: what `postcopy migrate` starts on B, and what it persists there.

Pure functions over argument lists (`postcopy.migrate.qemu`), checked on the shapes `postcopy
config --qemu-args` emits: an nbd node on the receive's socket under a named raw node.
"""

from __future__ import annotations

import json

import pytest

from postcopy.errors import UserError
from postcopy.migrate.qemu import destination_args, persistent_args
from postcopy.migrate.records import DiskPlan

DISK = DiskPlan(
    device="vda", source_image="/a/disk.img", export="x", dest_file="/b/disk.img",
    state_dir="/b/state/g/vda", socket="/run/postcopy/g-vda.sock", chunk_size=65536,
    bandwidth=None, source_id="g/vda",
)  # fmt: skip
REWRITTEN = [
    "qemu-system-x86_64", "-m", "128",
    "-qmp", "unix:/old.qmp,server=on,wait=off", "-S",
    "-blockdev", "driver=nbd,server.type=unix,server.path=/run/postcopy/g-vda.sock,"
                 "export=g-vda,node-name=proto0",
    "-blockdev", "driver=raw,node-name=vda,file=proto0",
    "-device", "virtio-blk-pci,drive=vda,id=vda-dev,werror=report",
    "-blockdev", "driver=file,filename=/shared/cd.iso,node-name=cd0",
    "-device", "ide-cd,drive=cd0",
]  # fmt: skip


def _value(args: list[str], option: str, index: int = 0) -> str:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == option][index]


def test_destination_args_wait_for_a_restarted_receive_and_start_incoming() -> None:
    args = destination_args(REWRITTEN, [DISK], "/run/postcopy/g.qmp", reconnect_delay=77)
    assert "reconnect-delay=77" in _value(args, "-blockdev", 0).split(",")
    assert _value(args, "-device", 0).split(",")[-2:] == ["werror=stop", "rerror=stop"]
    assert "werror=report" not in _value(args, "-device", 0)
    assert _value(args, "-device", 1) == "ide-cd,drive=cd0"  # not ours: untouched
    assert args.count("-qmp") == 1 and _value(args, "-qmp") == (
        "unix:/run/postcopy/g.qmp,server=on,wait=off"
    )
    assert args[-3:] == ["-incoming", "defer", "-S"] and args.count("-S") == 1


def test_destination_args_refuse_a_disk_without_a_named_nbd_blockdev() -> None:
    drive = ["qemu-system-x86_64", "-drive", "file.driver=nbd,file.server.type=unix,"
             "file.server.path=/run/postcopy/g-vda.sock,if=virtio"]  # fmt: skip
    with pytest.raises(UserError, match="no -blockdev nbd node for vda"):
        destination_args(drive, [DISK], "/q.qmp")


def test_persistent_args_open_the_local_file_under_the_same_node_name() -> None:
    args = persistent_args(REWRITTEN, [DISK], "/run/postcopy/g.qmp")
    assert _value(args, "-blockdev", 0) == "driver=file,filename=/b/disk.img,node-name=proto0"
    assert _value(args, "-blockdev", 1) == "driver=raw,node-name=vda,file=proto0"
    assert _value(args, "-device", 0) == "virtio-blk-pci,drive=vda,id=vda-dev,werror=report"
    assert "-incoming" not in args and "-S" not in args
    assert _value(args, "-qmp") == "unix:/run/postcopy/g.qmp,server=on,wait=off"


def test_persistent_args_of_a_json_blockdev() -> None:
    node = {"driver": "nbd", "node-name": "proto0", "export": "g-vda",
            "server": {"type": "unix", "path": "/run/postcopy/g-vda.sock"}}  # fmt: skip
    args = persistent_args(["qemu", "-blockdev", json.dumps(node)], [DISK], "/q.qmp")
    assert json.loads(_value(args, "-blockdev")) == {
        "driver": "file",
        "filename": "/b/disk.img",
        "node-name": "proto0",
    }
