"""Fake device programs for the unit tests of `block-postcopy`: xenstore-read/-write, nbd-client,
dmsetup and losetup acting on a made-up sysfs and xenstore under $FAKE_ROOT.

One file: each program is a two-line shell wrapper that runs it with its name as the first
argument. The state
they keep is what the real kernel and xenstored would show: `sys/block/nbdN/{pid,size}`,
`sys/block/dm-N/{dev,dm/name,dm/uuid,slaves/,table}`, `sys/block/loopN/{dev,loop/backing_file}`,
and one file per xenstore key under `xs/`. `FAKE_FAIL=<program> <subcommand>` makes that call
fail as the real one would, with a message on stderr.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(os.environ["FAKE_ROOT"])
BLOCK = ROOT / "sys" / "block"
XS = ROOT / "xs"
DISK_SECTORS = int(os.environ.get("FAKE_DISK_SECTORS", "131072"))


def die(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(1)


def failing(what: str) -> bool:
    return os.environ.get("FAKE_FAIL") == what


def key(path: str) -> Path:
    return XS / path.lstrip("/")


def xenstore_read(args: list[str]) -> None:
    values = []
    for path in args:
        if not key(path).is_file():
            die(f"xenstore-read: couldn't read path {path}")
        values.append(key(path).read_text())
    print("\n".join(values))


def xenstore_write(args: list[str]) -> None:
    for path, value in zip(args[::2], args[1::2], strict=True):
        key(path).parent.mkdir(parents=True, exist_ok=True)
        key(path).write_text(value)


def nbd_client(args: list[str]) -> None:
    if args[0] == "-d":
        device = BLOCK / args[1].removeprefix("/dev/")
        (device / "pid").unlink(missing_ok=True)
        (device / "size").write_text("0\n")
        return
    if args[0] != "-unix":
        die("the fake nbd-client knows -unix only")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(args[1])
    except OSError as exc:
        die(f"Socket failed: {exc.strerror}")
    finally:
        probe.close()
    device = BLOCK / args[2].removeprefix("/dev/")
    if (device / "pid").exists():
        die("Error: Device or resource busy")
    (device / "pid").write_text("4242\n")
    (device / "size").write_text(f"{DISK_SECTORS}\n")


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def dmsetup(args: list[str]) -> None:
    if failing(f"dmsetup {args[0]}"):
        die(f"device-mapper: {args[0]} ioctl on {args[1]} failed: Invalid argument")
    if args[0] == "create":
        number = len(list(BLOCK.glob("dm-*")))
        device = BLOCK / f"dm-{number}"
        (device / "dm").mkdir(parents=True)
        (device / "dm" / "name").write_text(args[1] + "\n")
        (device / "dm" / "uuid").write_text(_option(args, "--uuid") + "\n")
        (device / "dev").write_text(f"254:{number}\n")
        table = _option(args, "--table")
        (device / "table").write_text(table + "\n")
        (device / "slaves").mkdir()
        (device / "slaves" / table.split()[3].removeprefix("/dev/")).touch()
        return
    if args[0] == "remove":
        name = args[-1]
        for device in BLOCK.glob("dm-*"):
            if (device / "dm" / "name").read_text().strip() == name:
                shutil.rmtree(device)
                return
        die(f"Device {name} not found")
    die(f"the fake dmsetup knows no {args[0]}")


def losetup(args: list[str]) -> None:
    if args[0] == "-d":
        shutil.rmtree(BLOCK / args[1].removeprefix("/dev/"))
        return
    image = args[-1]
    if not Path(image).is_file():
        die(f"losetup: {image}: failed to set up loop device: No such file or directory")
    number = len(list(BLOCK.glob("loop*")))
    device = BLOCK / f"loop{number}"
    (device / "loop").mkdir(parents=True)
    (device / "loop" / "backing_file").write_text(image + "\n")
    (device / "dev").write_text(f"7:{number}\n")
    (device / "ro").write_text("1\n" if "--read-only" in args else "0\n")
    print(f"/dev/loop{number}")


PROGRAMS = {
    "xenstore-read": xenstore_read,
    "xenstore-write": xenstore_write,
    "nbd-client": nbd_client,
    "dmsetup": dmsetup,
    "losetup": losetup,
}

if __name__ == "__main__":
    PROGRAMS[sys.argv[1]](sys.argv[2:])
