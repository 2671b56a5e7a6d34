"""The QEMU pivot (postcopy/integrations/qemu_pivot.py) against a real QEMU over a real NBD server.

Real peers: `nbdkit file` with its log filter serves the "NBD disk" image on a Unix socket (standing
in for `postcopy receive`; the log shows when QEMU connects and disconnects); a paused TCG
qemu-system-x86_64 opens it with `-blockdev` nodes as `postcopy config --qemu-args` emits them; the
"local file" is a copy that differs from the served image in a marked region, so every read says
which of the two QEMU reads. Reads and writes go through QEMU's own block layer (HMP `qemu-io` over
QMP).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from postcopy.integrations import qemu as qemu_args
from postcopy.integrations import qemu_pivot
from postcopy.integrations.qemu_pivot import PivotRefused, PivotRolledBack, pivot_disk, read_disks
from postcopy.integrations.qmp import QMPClient, open_qmp
from postcopy.policy import NbdEndpoint, parse_config
from tests.peers import fill_bytes, running_until_ready, unix_socket_accepts

MiB = 1 << 20
KiB = 1 << 10
SIZE = 8 * MiB


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


@dataclass
class Disk:
    served: Path  # what the NBD server serves
    local: Path  # the local file the pivot switches to
    socket: Path
    log: Path


@pytest.fixture
def raw_disk(short_dir: Path) -> Disk:
    """Served: 0xAB at [0, 64k). Local: the same, plus 0xCD at [1M, 1M+64k) (only it has it)."""
    served = short_dir / "served.raw"
    with open(served, "wb") as handle:
        handle.truncate(SIZE)
    fill_bytes(served, 0, 64 * KiB, 0xAB)
    local = short_dir / "local.raw"
    shutil.copyfile(served, local)
    fill_bytes(local, MiB, 64 * KiB, 0xCD)
    return Disk(served, local, short_dir / "nbd.sock", short_dir / "nbdkit.log")


@contextmanager
def nbdkit_serving(disk: Disk) -> Iterator[subprocess.Popen[bytes]]:
    command = [
        "nbdkit", "-f", "--exit-with-parent", "-U", str(disk.socket),
        "--filter=log", "file", str(disk.served), f"logfile={disk.log}",
    ]  # fmt: skip
    ready = partial(unix_socket_accepts, disk.socket)
    output = disk.log.with_name("nbdkit.out")
    with running_until_ready(command, output, ready, 10, "nbdkit") as process:
        yield process


def _nbd_blockdevs(disk: Disk, fmt: str = "raw", extra: str = "") -> list[str]:
    return [
        "-blockdev",
        f"driver=nbd,node-name=d0-nbd,server.type=unix,server.path={disk.socket},export=",
        "-blockdev",
        f"driver={fmt},node-name=d0,file=d0-nbd{extra}",
    ]


@dataclass
class Qemu:
    qmp: Path
    output: Path  # QEMU's stdout: HMP `qemu-io` prints its results there, not to the monitor


@contextmanager
def qemu_running(workdir: Path, disk_args: list[str], machine: str = "none") -> Iterator[Qemu]:
    """A paused TCG QEMU with these disk arguments, its stdout line-buffered into a file."""
    qmp = workdir / "qmp.sock"
    output = workdir / "qemu.out"
    command = [
        "stdbuf", "-oL", "qemu-system-x86_64", "-accel", "tcg", "-machine", machine,
        "-nodefaults", "-display", "none", "-S", "-qmp", f"unix:{qmp},server=on,wait=off",
        *disk_args,
    ]  # fmt: skip
    ready = partial(unix_socket_accepts, qmp)
    with running_until_ready(command, output, ready, 20, "QEMU"):
        yield Qemu(qmp, output)


@asynccontextmanager
async def qmp_session(qemu: Qemu) -> AsyncIterator[QMPClient]:
    with trio.fail_after(60):
        async with open_qmp(qemu.qmp) as client:
            yield client


async def qemu_io(client: QMPClient, qemu: Qemu, node: str, command: str) -> str:
    """Run one qemu-io command in QEMU on `node` (`-d QDEV` for a device's own backend); return
    what it said (errors come back on the monitor, results are printed on stdout)."""
    start = qemu.output.stat().st_size
    line = f'qemu-io {node} "{command}"'
    answer = str(await client.execute("human-monitor-command", {"command-line": line}))
    with open(qemu.output, "rb") as handle:
        handle.seek(start)
        printed = handle.read().decode(errors="replace")
    assert answer or printed, f"qemu-io {command!r} said nothing"
    return answer + printed


def _pattern_ok(output: str) -> bool:
    """qemu-io's read -P found the pattern (or its write succeeded)."""
    failed = "Pattern verification failed" in output or "error" in output.lower()
    return not failed and ("read " in output or "wrote " in output)


async def _node_summary(client: QMPClient) -> list[tuple[str, str, str]]:
    nodes = await client.execute("query-named-block-nodes", {"flat": True})
    return sorted((n["node-name"], n["drv"], n["image"]["filename"]) for n in nodes)


def _log_lines(disk: Disk, word: str) -> int:
    return sum(word in line for line in disk.log.read_text().splitlines())


async def _wait_disconnect(disk: Disk, seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while _log_lines(disk, "Disconnect") == 0:
            await trio.sleep(0.02)


# --- the pivot of a recognised disk -----------------------------------------------------------


async def test_pivot_moves_a_raw_disk_onto_the_local_file(short_dir: Path, raw_disk: Disk) -> None:
    extra = ",discard=unmap,detect-zeroes=unmap"
    args = [*_nbd_blockdevs(raw_disk, extra=extra), "-device", "virtio-blk-pci,drive=d0,id=vd0"]
    with nbdkit_serving(raw_disk), qemu_running(short_dir, args, machine="q35") as qemu:
        async with qmp_session(qemu) as client:
            # Before: QEMU reads the served image (no 0xCD at 1M).
            assert _pattern_ok(await qemu_io(client, qemu, "d0", "read -P 0 1M 64k"))
            assert _log_lines(raw_disk, "Connect") == 1
            assert _log_lines(raw_disk, "Disconnect") == 0

            endpoint = NbdEndpoint(socket=raw_disk.socket)
            result = await pivot_disk(client, endpoint, raw_disk.local)
            assert (result.format_node, result.old_nbd_node) == ("d0", "d0-nbd")
            vd0 = "/machine/peripheral/vd0/virtio-backend"  # the qdev path QEMU reports
            assert result.devices == (vd0,)

            nodes = await _node_summary(client)
            assert nodes == [
                ("d0", "raw", str(raw_disk.local)),
                (result.file_node, "file", str(raw_disk.local)),
            ]
            disks = await read_disks(client)
            assert [(d.node, d.device, d.protocol_driver, d.filename) for d in disks] == [
                ("d0", vd0, "file", str(raw_disk.local))
            ]
            block = (await client.execute("query-block"))[0]["inserted"]
            assert block["node-name"] == "d0" and block["detect_zeroes"] == "unmap"
            await _wait_disconnect(raw_disk)

            # After: reads come from the local file, and the check really compares bytes.
            assert _pattern_ok(await qemu_io(client, qemu, "d0", "read -P 0xcd 1M 64k"))
            assert _pattern_ok(await qemu_io(client, qemu, "d0", "read -P 0xab 0 64k"))
            assert not _pattern_ok(await qemu_io(client, qemu, "d0", "read -P 0xab 1M 4k"))
            # Writes land in the local file, not in the served image.
            assert _pattern_ok(
                await qemu_io(client, qemu, "-d vd0/virtio-backend", "write -P 0x5a 2M 64k")
            )
            flush = 'qemu-io -d vd0/virtio-backend "flush"'
            assert await client.execute("human-monitor-command", {"command-line": flush}) == ""
    assert _read(raw_disk.local, 2 * MiB, 64 * KiB) == b"\x5a" * (64 * KiB)
    assert _read(raw_disk.served, 2 * MiB, 64 * KiB) == bytes(64 * KiB)
    assert _log_lines(raw_disk, "Connect") == 1  # QEMU never went back to NBD


async def test_pivot_keeps_a_qcow2_format_node(short_dir: Path) -> None:
    served = short_dir / "served.qcow2"
    local = short_dir / "local.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(served), "4M"], check=True)
    io = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x11 1M 64k"]
    subprocess.run([*io, str(served)], check=True, capture_output=True)
    shutil.copyfile(served, local)  # the local copy: same clusters, one rewritten in place
    io = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 64k", str(local)]
    subprocess.run(io, check=True, capture_output=True)
    disk = Disk(served, local, short_dir / "nbd.sock", short_dir / "nbdkit.log")
    with nbdkit_serving(disk), qemu_running(short_dir, _nbd_blockdevs(disk, "qcow2")) as qemu:
        async with qmp_session(qemu) as client:
            assert _pattern_ok(await qemu_io(client, qemu, "d0", "read -P 0x11 1M 64k"))
            result = await pivot_disk(client, NbdEndpoint(socket=disk.socket), local)
            assert [(n, d) for n, d, _ in await _node_summary(client)] == [
                ("d0", "qcow2"),
                (result.file_node, "file"),
            ]
            assert _pattern_ok(await qemu_io(client, qemu, "d0", "read -P 0x22 1M 64k"))
            assert _pattern_ok(await qemu_io(client, qemu, "d0", "read -P 0x11 0 64k"))
            await _wait_disconnect(disk)


async def test_a_relative_local_path_means_ours_not_qemus(
    short_dir: Path, raw_disk: Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    with nbdkit_serving(raw_disk), qemu_running(short_dir, _nbd_blockdevs(raw_disk)) as qemu:
        monkeypatch.chdir(short_dir)  # QEMU runs in another directory
        async with qmp_session(qemu) as client:
            result = await pivot_disk(
                client, NbdEndpoint(socket=raw_disk.socket), Path(raw_disk.local.name)
            )
            assert result.local_file == raw_disk.local
            assert (result.file_node, "file", str(raw_disk.local)) in await _node_summary(client)


# --- disks the pivot does not recognise: one-line error, nothing changed ----------------------


async def test_unknown_socket_is_refused_and_changes_nothing(
    short_dir: Path, raw_disk: Disk
) -> None:
    with nbdkit_serving(raw_disk), qemu_running(short_dir, _nbd_blockdevs(raw_disk)) as qemu:
        async with qmp_session(qemu) as client:
            before = await _node_summary(client)
            other = NbdEndpoint(socket=short_dir / "other.sock")
            with pytest.raises(PivotRefused) as refused:
                await pivot_disk(client, other, raw_disk.local)
            message = str(refused.value)
            assert "no nbd block node connected to" in message and "other.sock" in message
            assert "\n" not in message
            assert await _node_summary(client) == before
            assert _pattern_ok(
                await qemu_io(client, qemu, "d0", "read -P 0 1M 64k")
            )  # still on NBD
    assert _log_lines(raw_disk, "Connect") == 1


async def test_drive_with_generated_node_names_is_refused(short_dir: Path, raw_disk: Disk) -> None:
    drive = (
        f"-drive if=none,id=disk0,format=raw,file.driver=nbd,file.server.type=unix,"
        f"file.server.path={raw_disk.socket},file.export="
    ).split(" ", 1)
    with nbdkit_serving(raw_disk), qemu_running(short_dir, drive) as qemu:
        async with qmp_session(qemu) as client:
            before = await _node_summary(client)
            with pytest.raises(PivotRefused, match="QEMU-generated node names") as refused:
                await pivot_disk(client, NbdEndpoint(socket=raw_disk.socket), raw_disk.local)
            assert "\n" not in str(refused.value)
            assert await _node_summary(client) == before
            assert _log_lines(raw_disk, "Disconnect") == 0


@pytest.mark.parametrize(
    ("disk_args", "message"),
    [
        (
            lambda d: [
                *_nbd_blockdevs(d)[:2],
                "-blockdev",
                "driver=copy-on-read,node-name=d0,file=d0-nbd",
            ],
            "node d0 above d0-nbd is a copy-on-read node; the pivot handles raw and qcow2",
        ),
        (
            lambda d: [*_nbd_blockdevs(d)[:2], "-device", "virtio-blk-pci,drive=d0-nbd"],
            "is used by a device or job (root); expected one format node's file",
        ),
        (
            # -drive with explicit names: not on the command line as -blockdev, so the options
            # blockdev-reopen needs are unknown.
            lambda d: [
                "-drive",
                "if=none,id=x,node-name=d0,format=raw,file.node-name=d0-nbd,file.driver=nbd,"
                f"file.server.type=unix,file.server.path={d.socket},file.export=",
            ],
            "node d0 is not a -blockdev of QEMU's command line",
        ),
    ],
    ids=["filter-node", "no-format-node", "drive-with-names"],
)
async def test_disks_of_other_shapes_are_refused_unchanged(
    short_dir: Path, raw_disk: Disk, disk_args: Any, message: str
) -> None:
    with nbdkit_serving(raw_disk), qemu_running(short_dir, disk_args(raw_disk), "q35") as qemu:
        async with qmp_session(qemu) as client:
            before = await _node_summary(client)
            with pytest.raises(PivotRefused) as refused:
                await pivot_disk(client, NbdEndpoint(socket=raw_disk.socket), raw_disk.local)
            assert message in str(refused.value) and "\n" not in str(refused.value)
            assert await _node_summary(client) == before
            assert _log_lines(raw_disk, "Disconnect") == 0


async def test_the_disk_of_a_rewritten_drive_line_can_be_pivoted(short_dir: Path) -> None:
    """`postcopy config --qemu-args` output (from a -drive line) is what the pivot recognises."""
    image = short_dir / "guest.raw"
    with open(image, "wb") as handle:
        handle.truncate(SIZE)
    fill_bytes(image, 0, 64 * KiB, 0x3C)
    policy = parse_config(
        f'[domains.qg]\nmode = "postcopy"\nsocket_dir = "{short_dir}"\n'
        f'disks = [{{device = "vda", source_image = "{image}", dest_file = "{image}"}}]\n',
        "t.toml",
    ).domain("qg")
    line = f"-M q35 -drive file={image},format=raw,if=virtio,cache=none,discard=unmap"
    argv, _ = qemu_args.parse_qemu_args(qemu_args.rewrite_qemu_args(line, policy).text)
    endpoint = policy.dest_endpoint(policy.disk("vda"))
    assert endpoint.socket is not None
    served = short_dir / "served.raw"
    shutil.copyfile(image, served)
    fill_bytes(image, MiB, 64 * KiB, 0xC3)  # only the local file has it
    disk = Disk(served, image, endpoint.socket, short_dir / "nbdkit.log")
    with nbdkit_serving(disk), qemu_running(short_dir, argv[2:], "q35") as qemu:
        async with qmp_session(qemu) as client:
            result = await pivot_disk(client, endpoint, image)
            assert result.format_node == "vda" and result.old_nbd_node == "vda-nbd"
            [state] = await read_disks(client)
            assert (state.protocol_driver, state.filename) == ("file", str(image))
            assert state.device is not None and "virtio-backend" in state.device
            nodes = await client.execute("query-named-block-nodes", {"flat": True})
            assert {n["node-name"]: n["cache"]["direct"] for n in nodes} == {
                "vda": True,
                result.file_node: True,
            }
            assert _pattern_ok(await qemu_io(client, qemu, "vda", "read -P 0xc3 1M 64k"))
            await _wait_disconnect(disk)


async def test_local_file_of_another_size_is_refused(short_dir: Path, raw_disk: Disk) -> None:
    with open(raw_disk.local, "r+b") as handle:
        handle.truncate(SIZE - 512)
    with nbdkit_serving(raw_disk), qemu_running(short_dir, _nbd_blockdevs(raw_disk)) as qemu:
        async with qmp_session(qemu) as client:
            before = await _node_summary(client)
            with pytest.raises(PivotRefused, match="has 8388096 bytes, the NBD disk 8388608"):
                await pivot_disk(client, NbdEndpoint(socket=raw_disk.socket), raw_disk.local)
            assert await _node_summary(client) == before


async def test_a_refused_reopen_removes_the_added_file_node(
    short_dir: Path, raw_disk: Disk
) -> None:
    """QEMU refuses the reopen (an option it does not know): the new file node goes again."""
    args = _nbd_blockdevs(raw_disk)
    with nbdkit_serving(raw_disk), qemu_running(short_dir, args) as qemu:
        async with qmp_session(qemu) as client:
            before = await _node_summary(client)
            claimed = [*args[:3], args[3] + ",no-such-option=1"]  # what the caller says QEMU ran
            with pytest.raises(PivotRolledBack, match="refused to reopen d0") as refused:
                await pivot_disk(
                    client,
                    NbdEndpoint(socket=raw_disk.socket),
                    raw_disk.local,
                    command_line=claimed,
                )
            assert "\n" not in str(refused.value)
            assert await _node_summary(client) == before
            assert _pattern_ok(
                await qemu_io(client, qemu, "d0", "read -P 0 1M 64k")
            )  # still on NBD
            assert _log_lines(raw_disk, "Disconnect") == 0


# --- units --------------------------------------------------------------------------------------


def test_blockdev_options_are_read_typed_from_both_forms() -> None:
    argv = [
        "qemu-system-x86_64",
        "-blockdev",
        "driver=nbd,node-name=n,server.type=inet,server.host=::1,server.port=10809,export=e",
        "-blockdev",
        "driver=raw,node-name=d,file=n,read-only=on,cache.direct=off,offset=4096,discard=unmap",
        "--blockdev",
        '{"driver":"qcow2","node-name":"q","file":"f","backing":null,"lazy-refcounts":true}',
        "-drive",
        "file=/x.img,node-name=ignored",
    ]
    found = qemu_pivot.blockdev_options_from_args(argv)
    assert found == {
        "n": {
            "driver": "nbd",
            "node-name": "n",
            "server": {"type": "inet", "host": "::1", "port": 10809},
            "export": "e",
        },
        "d": {
            "driver": "raw",
            "node-name": "d",
            "file": "n",
            "read-only": True,
            "cache": {"direct": False},
            "offset": 4096,
            "discard": "unmap",
        },
        "q": {
            "driver": "qcow2",
            "node-name": "q",
            "file": "f",
            "backing": None,
            "lazy-refcounts": True,
        },
    }


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("nbd+unix:///e1?socket=/run/pc/a.sock", NbdEndpoint("e1", socket=Path("/run/pc/a.sock"))),
        ("nbd://127.0.0.1:10900/web", NbdEndpoint("web", host="127.0.0.1", port=10900)),
        (
            'json:{"driver":"nbd","server":{"type":"unix","path":"/s"},"reconnect-delay":3}',
            NbdEndpoint("", socket=Path("/s")),
        ),
        ("/var/lib/images/a.raw", None),
    ],
)
def test_nbd_server_is_read_from_the_filename_qemu_reports(
    filename: str, expected: NbdEndpoint | None
) -> None:
    node = qemu_pivot.BlockNode(
        "n", "nbd", filename, 0, False, False, False, "off", children={}, parents=()
    )
    assert qemu_pivot.nbd_server_of(node) == expected
