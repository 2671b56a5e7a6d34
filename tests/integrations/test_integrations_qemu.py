"""QEMU really opens the disks the rewriters and `image_opts()`/`nbd_uri()` produce.

Real peers: the NBD server is `nbdkit file` on the socket (or port) the policy assigns to the
disk, standing in for `postcopy receive`, which serves the same kind of endpoint; the clients are
qemu-img, qemu-io, nbdinfo and a paused qemu-system-x86_64 whose drives we read and write through
its monitor's `qemu-io` command. When `postcopy receive` exists, `nbd_server` below can start it
instead of nbdkit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from postcopy.integrations import qemu
from postcopy.integrations.qmp import QMPClient, open_qmp
from postcopy.policy import DomainPolicy, NbdEndpoint, parse_config
from tests.peers import fill_bytes, running_until_ready, unix_socket_accepts

MiB = 1 << 20
IMAGE_SIZE = 8 * MiB


@pytest.fixture
def raw_image(short_dir: Path) -> Path:
    """8 MiB raw: 1 MiB of 0xab, a hole, and 64 KiB of 0x5c at the end."""
    path = short_dir / "guest.raw"
    with open(path, "wb") as handle:
        handle.truncate(IMAGE_SIZE)
    fill_bytes(path, 0, MiB, 0xAB)
    fill_bytes(path, IMAGE_SIZE - 64 * 1024, 64 * 1024, 0x5C)
    return path


@pytest.fixture
def qcow2_image(short_dir: Path) -> Path:
    """A 4 MiB qcow2 whose first 128 KiB read as 0xcd."""
    path = short_dir / "home.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M"], check=True, timeout=30
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 0 128k", str(path)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ready(endpoint: NbdEndpoint) -> bool:
    if endpoint.socket is not None:
        return unix_socket_accepts(endpoint.socket)
    with socket.socket(socket.AF_INET) as probe:
        try:
            probe.connect((str(endpoint.host), endpoint.port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def nbd_server(endpoint: NbdEndpoint, image: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Serve `image` on `endpoint` with nbdkit (the stand-in for `postcopy receive`)."""
    command = ["nbdkit", "-f", "--exit-with-parent"]
    if endpoint.socket is not None:
        endpoint.socket.parent.mkdir(parents=True, exist_ok=True)
        endpoint.socket.unlink(missing_ok=True)  # nbdkit does not remove a stale socket
        command += ["-U", str(endpoint.socket)]
    else:
        command += ["-i", str(endpoint.host), "-p", str(endpoint.port)]
    command += ["file", str(image)]
    log = image.with_name(f"nbdkit-{image.name}.log")  # beside the image, in the test's directory
    with running_until_ready(command, log, lambda: _ready(endpoint), 10, "nbdkit") as process:
        yield process


def _policy(socket_dir: Path, disks: str) -> DomainPolicy:
    text = f'[domains.qg]\nmode = "postcopy"\nsocket_dir = "{socket_dir}"\n{disks}'
    return parse_config(text, "test.toml").domain("qg")


def _qemu_io(image_opts: str, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "--image-opts", image_opts]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_image_opts_open_the_disk_on_its_unix_socket(short_dir: Path, raw_image: Path) -> None:
    policy = _policy(
        short_dir / "run", f'disks = [{{device = "vda", source_image = "{raw_image}"}}]\n'
    )
    endpoint = policy.dest_endpoint(policy.disk("vda"))
    assert endpoint.socket == short_dir / "run" / "qg-vda.sock"
    opts = qemu.image_opts(endpoint)
    with nbd_server(endpoint, raw_image):
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", "--image-opts", opts],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert json.loads(info.stdout)["virtual-size"] == IMAGE_SIZE

        good = _qemu_io(opts, "read -P 0xab 0 1M", "read -P 0 1M 6M", "read -P 0x5c 8128k 64k")
        assert good.returncode == 0, good.stdout + good.stderr
        assert "Pattern verification failed" not in good.stdout
        # The same check fails when the bytes differ, so it really compares data.
        bad = _qemu_io(opts, "read -P 0x00 0 4k")
        assert "Pattern verification failed" in bad.stdout


def test_uri_opens_with_qemu_img_and_nbdinfo(short_dir: Path, raw_image: Path) -> None:
    policy = _policy(short_dir, f'disks = [{{device = "vda", source_image = "{raw_image}"}}]\n')
    endpoint = policy.dest_endpoint(policy.disk("vda"))
    uri = qemu.nbd_uri(endpoint)
    assert uri == f"nbd+unix:///qg-vda?socket={short_dir}/qg-vda.sock"
    with nbd_server(endpoint, raw_image):
        size = subprocess.run(
            ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30, check=True
        )
        assert int(size.stdout) == IMAGE_SIZE
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", uri],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert json.loads(info.stdout)["virtual-size"] == IMAGE_SIZE


def test_qcow2_image_through_nbd_keeps_its_format(short_dir: Path, qcow2_image: Path) -> None:
    policy = _policy(short_dir, f'disks = [{{device = "home", source_image = "{qcow2_image}"}}]\n')
    endpoint = policy.dest_endpoint(policy.disk("home"))
    with nbd_server(endpoint, qcow2_image):
        opts = qemu.image_opts(endpoint, "qcow2")
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", "--image-opts", opts],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert json.loads(info.stdout)["format"] == "qcow2"
        assert json.loads(info.stdout)["virtual-size"] == 4 * MiB
        result = _qemu_io(opts, "read -P 0xcd 0 128k", "read -P 0 128k 128k")
        assert result.returncode == 0 and "Pattern verification failed" not in result.stdout


def test_tcp_listen_endpoint_opens_over_loopback(short_dir: Path, raw_image: Path) -> None:
    port = _free_port()
    policy = _policy(
        short_dir,
        f'disks = [{{device = "vda", source_image = "{raw_image}", '
        f'listen = "127.0.0.1:{port}"}}]\n',
    )
    endpoint = policy.dest_endpoint(policy.disk("vda"))
    assert qemu.nbd_uri(endpoint) == f"nbd://127.0.0.1:{port}/qg-vda"
    with nbd_server(endpoint, raw_image):
        result = _qemu_io(qemu.image_opts(endpoint), "read -P 0xab 0 1M")
        assert result.returncode == 0 and "Pattern verification failed" not in result.stdout


def _monitor(argv: list[str], hmp_commands: list[str]) -> list[str]:
    """Run a paused QEMU, send HMP commands over QMP on stdio, return each command's output."""
    lines = [json.dumps({"execute": "qmp_capabilities"})]
    lines += [
        json.dumps({"execute": "human-monitor-command", "arguments": {"command-line": command}})
        for command in hmp_commands
    ]
    lines.append(json.dumps({"execute": "quit"}))
    completed = subprocess.run(
        [*argv, "-qmp", "stdio"], input="\n".join(lines) + "\n",
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    outputs: list[str] = []
    current = ""
    replies = 0
    for line in completed.stdout.splitlines():
        if line.startswith("{"):
            message = json.loads(line)
            if "return" in message:
                replies += 1
                if 1 < replies <= len(hmp_commands) + 1:  # skip qmp_capabilities and quit
                    outputs.append(current + str(message["return"]))
                current = ""
        else:
            current += line + "\n"
    assert len(outputs) == len(hmp_commands), completed.stdout
    return outputs


def test_qemu_runs_the_rewritten_command_line_on_nbd(
    short_dir: Path, raw_image: Path, qcow2_image: Path
) -> None:
    iso = short_dir / "install.iso"
    iso.write_bytes(b"\x42" * 65536)
    args_file = short_dir / "qg.args"
    args_file.write_text(
        "# the domain's command line, as its unit file would run it\n"
        "qemu-system-x86_64 \\\n"
        "    -name guest=qg \\\n"
        "    -machine pc,accel=tcg -nodefaults -display none -S \\\n"
        f"    -drive file={raw_image},format=raw,if=none,id=disk0,cache=writeback,aio=threads \\\n"
        "    -device virtio-blk-pci,drive=disk0,id=vd0 \\\n"
        f'    -blockdev \'{{"driver":"file","filename":"{qcow2_image}",'
        '"node-name":"home-file"}\' \\\n'
        "    -blockdev driver=qcow2,file=home-file,node-name=home \\\n"
        "    -device virtio-blk-pci,drive=home,id=vd1 \\\n"
        f"    -drive file={iso},format=raw,media=cdrom,if=ide,index=2,readonly=on\n"
    )
    policy = _policy(
        short_dir / "run",
        f'[[domains.qg.disks]]\ndevice = "disk0"\nsource_image = "{raw_image}"\n'
        f'[[domains.qg.disks]]\ndevice = "home"\nsource_image = "{qcow2_image}"\n',
    )
    result = qemu.rewrite_qemu_args(args_file.read_text(), policy, str(args_file))
    assert result.changed == ("disk0", "home")
    assert str(raw_image) not in result.text and str(qcow2_image) not in result.text
    assert str(iso) in result.text  # the CD-ROM is not a policy disk
    argv, _ = qemu.parse_qemu_args(result.text)

    with (
        nbd_server(policy.dest_endpoint(policy.disk("disk0")), raw_image),
        nbd_server(policy.dest_endpoint(policy.disk("home")), qcow2_image),
    ):
        outputs = _monitor(
            argv,
            [
                'qemu-io disk0 "read -P 0xab 0 1M"',
                'qemu-io disk0 "read -P 0x5c 8128k 64k"',
                'qemu-io -d vd0/virtio-backend "write -P 0x11 2M 64k"',  # the device's own
                'qemu-io -d vd1/virtio-backend "read -P 0xcd 0 128k"',
                'qemu-io disk0 "read -P 0x77 0 4k"',  # must fail: proves the data is compared
            ],
        )
    for output in outputs[:4]:
        assert "Pattern verification failed" not in output and "Error" not in output, output
        assert " bytes at offset " in output, output  # it ran (a refusal prints only why)
    assert "Pattern verification failed" in outputs[4]
    # The guest's write went through nbdkit into the image.
    with open(raw_image, "rb") as handle:
        handle.seek(2 * MiB)
        assert handle.read(64 * 1024) == b"\x11" * 65536
    assert os.path.getsize(raw_image) == IMAGE_SIZE


def test_xl_block_script_target_resolves_to_a_socket_qemu_opens(
    short_dir: Path, raw_image: Path
) -> None:
    """An xl disk reaches the lazy destination through `block-postcopy` (QEMU's xen-block cannot
    open an NBD URI): its `target=` names the disk, and the script's disk table, sourced by a
    real shell as the script does, maps that name to the receive socket, which QEMU opens."""
    from postcopy.integrations import xl
    from postcopy.integrations.xen.disktable import render_disk_table

    disks = f'disks = [{{device = "xvda", source_image = "{raw_image}"}}]\n'
    config = parse_config(
        f'[domains.qg]\nmode = "postcopy"\nsocket_dir = "{short_dir}"\n{disks}', "test.toml"
    )
    policy = config.domain("qg")
    cfg = f"name = 'qg'\ndisk = [ '{raw_image},raw,xvda,w' ]\n"
    spec = xl.parse_disk_spec(xl.rewrite_xl(cfg, policy).text.split("'")[3])
    assert spec.target == "qg-xvda"
    assert ("script", "block-postcopy") in spec.options
    table = short_dir / "disks.sh"
    table.write_text(render_disk_table(config))
    looked_up = subprocess.run(
        ["sh", "-c", f'. {table} && postcopy_disk "$1" && printf %s "$socket"', "sh", spec.target],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert looked_up.returncode == 0, looked_up.stderr
    socket_path = looked_up.stdout
    assert socket_path == f"{short_dir}/qg-xvda.sock"
    with nbd_server(policy.dest_endpoint(policy.disk("xvda")), raw_image):
        reads = ["-c", "read -P 0xab 0 1M", "-c", "read -P 0 1M 4k"]
        result = subprocess.run(
            ["qemu-io", "-f", "raw", *reads, f"nbd+unix:///qg-xvda?socket={socket_path}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Pattern verification failed" not in result.stdout


async def _guest_layout(qmp: QMPClient, images: dict[str, str]) -> tuple[list[Any], list[Any]]:
    """The PCI functions, and where each disk sits: (PCI devfn or IDE bus and unit, its image).
    `images` maps an NBD socket path to the image it serves, so both sides name disks alike."""
    pci = await qmp.execute("query-pci")
    functions = [
        (d["slot"], d["function"], d["id"]["vendor"], d["id"]["device"])
        for bus in pci
        for d in bus["devices"]
    ]
    placed = []
    for block in await qmp.execute("query-block"):
        if not block.get("inserted") or not block.get("qdev"):
            continue
        filename = block["inserted"]["file"]
        image = next((i for sock, i in images.items() if sock in filename), filename)
        qdev = block["qdev"]
        if qdev.endswith("/virtio-backend"):
            proxy = qdev.rsplit("/", 1)[0]
            devfn = await qmp.execute("qom-get", {"path": proxy, "property": "addr"})
            placed.append((f"pci devfn {devfn}", image))
        else:
            bus = await qmp.execute("qom-get", {"path": qdev, "property": "parent_bus"})
            unit = await qmp.execute("qom-get", {"path": qdev, "property": "unit"})
            placed.append((f"{bus.rsplit('/', 1)[1]} unit {unit}", image))
    return functions, sorted(placed)


@pytest.mark.parametrize("machine", ["pc", "q35"])
async def test_converted_drives_accept_a_migration_from_the_drive_command_line(
    short_dir: Path, raw_image: Path, machine: str
) -> None:
    """A QEMU started from the original -drive/-hdX line migrates into one started from the
    rewritten -blockdev line: the devices sit at the same PCI slots and IDE bus/unit."""
    second = short_dir / "second.raw"
    shutil.copyfile(raw_image, second)
    shared = short_dir / "shared.raw"  # a virtio disk that is not a policy disk, before one
    shutil.copyfile(raw_image, shared)
    original = [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", machine, "-nodefaults",
        "-display", "none", "-S",
        "-drive", f"file={shared},format=raw,if=virtio",
        "-drive", f"file={raw_image},format=raw,if=virtio,cache=writeback",
        "-device", "virtio-rng-pci",
        "-drive", f"file={second},format=raw,media=disk",  # if=ide, the first free index
        "-hdc", str(second.with_name("third.raw")),
    ]  # fmt: skip
    shutil.copyfile(raw_image, second.with_name("third.raw"))
    policy = _policy(
        short_dir / "run",
        f'[[domains.qg.disks]]\ndevice = "vda"\nsource_image = "{raw_image}"\n'
        f'[[domains.qg.disks]]\ndevice = "hdc"\nsource_image = "{second.with_name("third.raw")}"\n',
    )
    result = qemu.rewrite_qemu_args(shlex.join(original), policy)
    assert result.changed == ("vda", "hdc")
    rewritten, _ = qemu.parse_qemu_args(result.text)
    assert "-hdc" not in rewritten and sum(arg == "-blockdev" for arg in rewritten) == 4
    assert f"file={shared},format=raw,if=none,id=virtio0" in rewritten

    migration = short_dir / "migration.sock"
    with (
        nbd_server(policy.dest_endpoint(policy.disk("vda")), raw_image),
        nbd_server(policy.dest_endpoint(policy.disk("hdc")), second.with_name("third.raw")),
        _qemu_process(short_dir / "a", original) as source_qmp,
        _qemu_process(short_dir / "b", [*rewritten, "-incoming", f"unix:{migration}"]) as dest_qmp,
    ):
        with trio.fail_after(120):
            async with open_qmp(source_qmp) as source, open_qmp(dest_qmp) as dest:
                images = {
                    str(policy.dest_endpoint(disk).socket): str(disk.source_image)
                    for disk in policy.disks
                }
                source_layout = await _guest_layout(source, images)
                assert len(source_layout[1]) == 4  # 2 virtio (one not a policy disk), 2 IDE
                await source.execute("migrate", {"uri": f"unix:{migration}"})
                while True:
                    status = (await source.execute("query-migrate")).get("status")
                    if status in ("completed", "failed", "cancelled"):
                        break
                    await trio.sleep(0.05)
                assert status == "completed"
                while (await dest.execute("query-migrate")).get("status") != "completed":
                    await trio.sleep(0.05)
                assert await _guest_layout(dest, images) == source_layout


@contextlib.contextmanager
def _qemu_process(workdir: Path, argv: list[str]) -> Iterator[Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    qmp = workdir / "qmp.sock"
    command = [*argv, "-qmp", f"unix:{qmp},server=on,wait=off"]
    ready = partial(unix_socket_accepts, qmp)
    with running_until_ready(command, workdir / "qemu.log", ready, 30, "QEMU"):
        yield qmp
