"""`block-postcopy` (the xl block hotplug script), its disk table and the Xen pivot's checks.

The unmarked tests run the installed script itself (POSIX sh) against fake device programs
(tests/integrations/xen_fake_tools.py: xenstore, nbd-client, dmsetup and losetup acting on a
made-up sysfs and xenstore) and a real policy, receive socket and state directory; they check
what the kernel and xenstore would show afterwards, and what a failure leaves (nothing).
The tests marked `xen` run in the nested Xen lab (`make test-xen`): see the second half.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from postcopy.destination.gate import is_source_frozen
from postcopy.destination.status import write_status
from postcopy.integrations import xl
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
from postcopy.integrations.xen.pivot import PivotRefused, XenPivotPlan, check_pivot
from postcopy.kit.guestkit.build import ensure_guest_boot_files
from postcopy.kit.guestkit.qemu import GuestLayout, expected_preboot_bytes, prepare_disk_image
from postcopy.kit.xenlab.build import ensure_lab
from postcopy.kit.xenlab.lab import (
    CommandResult,
    DomuConsole,
    LabError,
    XenLab,
    domu_config,
    run_xen_lab,
)
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


def test_an_unwritable_lock_file_is_reported_like_any_failure(
    host: Host, receive_socket: Path
) -> None:
    done = host.run("add", BLOCK_POSTCOPY_LOCK=str(host.root / "a/du.img/lock"))
    assert done.returncode == 1
    assert "cannot open" in (host.xs(f"{BACKEND}/hotplug-error") or ""), done.stderr
    assert host.connected_nbd() == []


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


def _status_record(state: str, dest: Path, missing: int = 0) -> dict[str, Any]:
    return {"state": state, "dest": str(dest), "missing_bytes": missing, "pid": 0}


def test_pivot_checks_refuse_what_is_not_a_complete_postcopy_disk_on_nbd(
    host: Host, receive_socket: Path
) -> None:
    sys_root = host.root / "sys"
    state = host.root / "state/du/xvda"
    local = host.root / "b/du.img"

    def table(name: str) -> str:
        dm = find_dm_device(name, sys_root=sys_root)
        assert dm is not None
        return (host.block / dm.kernel_name / "table").read_text()

    def check() -> object:
        return check_pivot("du-xvda", local, state, sys_root, table)

    with pytest.raises(PivotRefused, match="no device-mapper device postcopy-du-xvda"):
        check()
    assert host.run("add").returncode == 0  # postcopy-du-xvda over nbd0
    (host.block / "dm-0/ro").write_text("0\n")
    with pytest.raises(PivotRefused, match="no status in"):
        check()
    write_status(state, _status_record("fetching", local, missing=1 << 20))
    with pytest.raises(PivotRefused, match=r"not complete \(state fetching, 1048576 bytes missing"):
        check()
    write_status(state, _status_record("complete", host.root / "elsewhere.img"))
    with pytest.raises(PivotRefused, match="is the state of .*elsewhere.img, not of"):
        check()
    write_status(state, _status_record("complete", local))
    with pytest.raises(PivotRefused, match="local file .*: No such file"):
        check()
    local.write_bytes(b"\0" * 4096)
    with pytest.raises(PivotRefused, match=f"has 4096 bytes, postcopy-du-xvda maps {64 << 20}"):
        check()
    os.truncate(local, 64 << 20)
    plan = check_pivot("du-xvda", local, state, sys_root, table)
    assert isinstance(plan, XenPivotPlan)
    assert (plan.nbd_device, plan.table.sectors, plan.readonly) == (
        "/dev/nbd0",
        DISK_SECTORS,
        False,
    )
    assert plan.receive_pid is None  # pid 0: no receive to stop

    # Already on a loop device of the local file, or not ours at all: refused.
    (host.block / "dm-0/slaves/nbd0").unlink()
    (host.block / "dm-0/slaves/loop0").touch()
    (host.block / "loop0/loop").mkdir(parents=True)
    (host.block / "loop0/loop/backing_file").write_text(f"{local}\n")
    with pytest.raises(PivotRefused, match=r"not on NBD \(already pivoted\)"):
        check()
    (host.block / "dm-0/dm/uuid").write_text("LVM-xyz\n")
    with pytest.raises(PivotRefused, match="is not a postcopy disk"):
        check()


# ---- in the nested Xen lab (make test-xen) --------------------------------------------------
#
# One lab for the module, dom0 running this checkout's postcopy (shared over 9p).  "Host A" and
# "Host B" are two directories of the same dom0 (A's image in /ctl/host-a, B's file in
# /ctl/host-b, B's state in dom0's /var/lib/postcopy), and `xl migrate ... localhost` through the
# lab's ssh stand-in moves the domain between them, as Xen's own localmigrate test does.  Every
# Python start in dom0 takes tens of seconds under TCG on a loaded machine, hence the bounds.

POLICY_IN_LAB = """\
[defaults]
state_root = "/var/lib/postcopy"
socket_dir = "/run/postcopy"
source = "unix:/run/postcopy-a.sock"

[domains.du]
mode = "postcopy"
[[domains.du.disks]]
device = "xvda"
source_image = "/ctl/host-a/du.img"
dest_file = "/ctl/host-b/du.img"
"""
LAB_PYTHON_TIMEOUT = 600  # one postcopy command in dom0 (its Python start dominates)
LAB_START_TIMEOUT = 900  # serve or receive until it listens
LAB_MIGRATE_TIMEOUT = 600
LAB_DRAIN_TIMEOUT = 900
LAB_BOOT_TIMEOUT = 600  # a domU to its first passes
PASSES = 3
STATE_DIR = "/var/lib/postcopy/du/xvda"
RECEIVE_SOCKET = "/run/postcopy/du-xvda.sock"
LAB_TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module", name="xen_lab")
def xen_lab_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XenLab]:
    files = ensure_lab()
    workdir = tmp_path_factory.mktemp("xenblock")
    checkout = Path(__file__).resolve().parents[2]
    try:
        with run_xen_lab(files, workdir, boot_timeout=LAB_BOOT_TIMEOUT, project=checkout) as lab:
            LAB_TIMINGS["boot: QEMU start to dom0 ready"] = lab.boot_seconds
            yield lab
    finally:
        report = "".join(f"{name}: {value:.1f}\n" for name, value in LAB_TIMINGS.items())
        (workdir / "xenblock-timings.txt").write_text(report)
        print("\nxen-block timings\n" + report)


POSTCOPY = f"{Path(__file__).resolve().parents[2]}/.venv/bin/postcopy"  # dom0 sees the same path


def _run_polling(
    lab: XenLab, script: str, limit: float, consoles: list[DomuConsole], check: bool = True
) -> CommandResult:
    """Run a dom0 command while reading the domUs' consoles (so markers get their real time)."""
    pending = lab.start(script, limit)
    deadline = time.monotonic() + limit + 30
    while (done := lab.result(pending)) is None:
        for console in consoles:
            console.poll()
        if time.monotonic() > deadline:
            return lab.wait(pending, check=check)  # raises with the details
        time.sleep(0.05)
    for console in consoles:
        console.poll()
    if check and done.returncode != 0:
        return lab.wait(pending, check=True)
    return done


def _wait_new_passes(
    lab: XenLab, console: DomuConsole, count: int, after: float, timeout: float
) -> None:
    """Wait for `count` PASS markers seen after `after`; any FAIL fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        console.poll()
        failures = [m for m in console.markers if not m.ok]
        if failures:
            raise LabError(f"{console.name}: workload FAIL {failures[0]}\n{console.text()}")
        if len([m for m in console.markers if m.seen_at >= after]) >= count:
            return
        if time.monotonic() > deadline:
            raise LabError(f"{console.name}: {count} passes not seen in {timeout:g} s\n"
                           f"{console.text()}\n{lab.console_tail()}")  # fmt: skip
        time.sleep(0.1)


def _longest_gap(console: DomuConsole, start: float, end: float) -> float:
    """The longest time between two markers around [start, end] (the guest-visible pause)."""
    seen = [m.seen_at for m in console.markers]
    before = [t for t in seen if t < start][-1:]
    window = before + [t for t in seen if t >= start]
    after_end = [t for t in window if t > end]
    window = [t for t in window if t <= end] + after_end[:1]
    return max(b - a for a, b in zip(window, window[1:], strict=False))


def _status(lab: XenLab) -> dict[str, Any]:
    return json.loads(lab.run(f"cat {STATE_DIR}/status.json", timeout=60).output)


def _start_daemon(lab: XenLab, name: str, command: str, socket_path: str) -> None:
    """Start a dom0 daemon in its own session (pid in /run/NAME.pid, log in /ctl/NAME.log) and
    wait until it listens on `socket_path`."""
    lab.run(
        f"rm -f {socket_path}; setsid -f sh -c 'echo $$ > /run/{name}.pid; "
        f"exec env POSTCOPY_LISTEN_TIMEOUT={LAB_START_TIMEOUT} {command} "
        f">/ctl/{name}.log 2>&1'\n"
        f"for i in $(seq {LAB_START_TIMEOUT * 2}); do [ -S {socket_path} ] && exit 0; "
        f"kill -0 $(cat /run/{name}.pid) 2>/dev/null || break; sleep 0.5; done\n"
        f"cat /ctl/{name}.log; exit 1\n",
        timeout=LAB_START_TIMEOUT + 30,
    )


def _receive_command() -> str:
    return (
        f"{POSTCOPY} receive --domain du --source 'nbd+unix:///du-xvda?socket=/run/"
        f"postcopy-a.sock' --dest /ctl/host-b/du.img --state-dir {STATE_DIR} "
        f"--socket {RECEIVE_SOCKET} --source-id du/xvda --wait-for-source"
    )


def _attached_devices(lab: XenLab) -> str:
    """dm tables, loop devices and connected NBD devices in dom0, one per line."""
    return lab.run(
        "dmsetup table 2>&1 | grep -v '^No devices found'; losetup -a\n"
        'for pid in /sys/block/nbd*/pid; do [ -e "$pid" ] && echo "connected ${pid%/pid}"; '
        "done; true",
        timeout=60,
    ).output


def _domain_names(lab: XenLab) -> list[str]:
    return lab.run("xl list | awk 'NR > 1 { print $1 }'", timeout=60).output.split()


@pytest.mark.xen
@pytest.mark.timeout(7200)
def test_xl_migrate_onto_the_lazy_destination_fails_safe_then_drains_and_pivots(
    xen_lab: XenLab,
) -> None:
    """A failed switchover (receive killed; the block script failing) leaves the domain on A;
    then the migration: drain under a running workload, pivot, B's file = A's image + writes."""
    lab = xen_lab
    ctl = lab.ctl
    layout = GuestLayout()
    for host_dir in ("host-a", "host-b"):
        (ctl / host_dir).mkdir()
    image_a = ctl / "host-a/du.img"
    prepare_disk_image(image_a, layout, ensure_guest_boot_files())
    policy_file = ctl / "domains.toml"
    policy_file.write_text(POLICY_IN_LAB)
    policy = parse_config(POLICY_IN_LAB, policy_file).domain("du")
    # The operator's config on A opens the image as a plain file; `postcopy config --xl` turns
    # it into the block-postcopy form, used to start on A (a loop device) and sent with -C to B.
    original = domu_config(
        lab.files, "du", "format=raw, vdev=xvda, access=rw, target=/ctl/host-a/du.img", layout
    )
    rewritten = xl.rewrite_xl(original, policy).text
    assert "'format=raw, vdev=xvda, access=rw, script=block-postcopy, target=du-xvda'" in rewritten
    (ctl / "du.cfg").write_text(rewritten)
    (ctl / "du-local.cfg").write_text(xl.rewrite_xl(rewritten, policy, local=True).text)
    ssh = "/ctl/ssh-localhost.sh"
    migrate = f"xl migrate -C /ctl/du.cfg -s {ssh} du localhost"
    console = lab.console("du")

    started = time.monotonic()
    lab.run(f"{POSTCOPY} install-xl-script --config /ctl/domains.toml",
            timeout=LAB_PYTHON_TIMEOUT)  # fmt: skip
    LAB_TIMINGS["postcopy install-xl-script in dom0"] = time.monotonic() - started
    lab.run("xl create -n /ctl/du.cfg >/dev/null && xl create -n /ctl/du-local.cfg >/dev/null",
            timeout=120)  # the dry runs of both configs pass  # fmt: skip

    created = time.monotonic()
    _run_polling(lab, "xl create /ctl/du.cfg", 300, [console])
    LAB_TIMINGS["xl create (block-postcopy, loop on A)"] = time.monotonic() - created
    _wait_new_passes(lab, console, PASSES, created, LAB_BOOT_TIMEOUT)
    assert "(/ctl/host-a/du.img)" in _attached_devices(lab)

    started = time.monotonic()
    _start_daemon(lab, "serve", f"{POSTCOPY} serve --socket /run/postcopy-a.sock "
                  "du-xvda=/ctl/host-a/du.img", "/run/postcopy-a.sock")  # fmt: skip
    LAB_TIMINGS["postcopy serve until it listens"] = time.monotonic() - started

    # ---- 1. receive on B killed: the block script fails, the domain stays on A ----------------
    lab.run("mkdir -p /run/postcopy", timeout=60)  # the policy's socket_dir, made by the operator
    started = time.monotonic()
    _start_daemon(lab, "receive", _receive_command(), RECEIVE_SOCKET)
    LAB_TIMINGS["postcopy receive until it listens"] = time.monotonic() - started
    lab.run(  # a crash: receive and its nbdkit killed at once
        "kill -9 $(cat /run/receive.pid) $(grep -l '^nbdkit$' /proc/[0-9]*/comm | cut -d/ -f3)"
        "; sleep 1",
        timeout=60,
    )
    attempt = time.monotonic()
    failed = _run_polling(lab, migrate, LAB_MIGRATE_TIMEOUT, [console], check=False)
    assert failed.returncode != 0, failed.output
    assert "block-postcopy: add" in failed.output, failed.output  # the script said why
    _wait_new_passes(lab, console, PASSES, time.monotonic(), LAB_BOOT_TIMEOUT)
    assert _domain_names(lab) == ["Domain-0", "du"]
    devices = _attached_devices(lab)
    assert "postcopy-du-xvda" not in devices and "connected" not in devices, devices
    assert lab.run(f"test ! -e {STATE_DIR}/source-frozen", timeout=60).returncode == 0
    LAB_TIMINGS["failed migration (receive killed)"] = time.monotonic() - attempt

    # ---- 2. the block script fails with receive running: the domain stays on A ---------------
    lab.run(f"rm -rf {STATE_DIR} /ctl/host-b/du.img", timeout=60)
    _start_daemon(lab, "receive", _receive_command(), RECEIVE_SOCKET)
    lab.run("dmsetup create postcopy-du-xvda --noudevsync --table '0 8 error'", timeout=60)
    failed = _run_polling(lab, migrate, LAB_MIGRATE_TIMEOUT, [console], check=False)
    assert failed.returncode != 0 and "exists already" in failed.output, failed.output
    _wait_new_passes(lab, console, PASSES, time.monotonic(), LAB_BOOT_TIMEOUT)
    assert _domain_names(lab) == ["Domain-0", "du"]
    assert _status(lab)["state"] == "waiting-for-source"  # the gate stayed shut
    lab.run("dmsetup remove --noudevsync postcopy-du-xvda", timeout=60)

    # ---- 3. the migration: B's block script attaches the lazy destination ---------------------
    migrating = time.monotonic()
    migrated = _run_polling(lab, migrate, LAB_MIGRATE_TIMEOUT, [console])
    arrived = time.monotonic()
    LAB_TIMINGS["xl migrate onto the lazy destination"] = arrived - migrating
    assert "add du-xvda: /dev/dm-" in migrated.output and "(lazy destination)" in migrated.output
    devices = _attached_devices(lab)
    assert "postcopy-du-xvda: 0 131072 linear 43:" in devices, devices  # over NBD (major 43)
    assert lab.run(f"test -e {STATE_DIR}/source-frozen", timeout=60).returncode == 0
    _wait_new_passes(lab, console, PASSES, arrived, LAB_BOOT_TIMEOUT)
    LAB_TIMINGS["guest-visible pause, block-postcopy"] = _longest_gap(console, migrating, arrived)

    deadline = time.monotonic() + LAB_DRAIN_TIMEOUT
    while (status := _status(lab))["state"] != "complete":
        assert status["state"] in ("fetching", "waiting-for-source"), status
        assert time.monotonic() < deadline, status
        _wait_new_passes(lab, console, 1, time.monotonic(), LAB_BOOT_TIMEOUT)  # passes meanwhile
    LAB_TIMINGS["arrival to complete (drain)"] = time.monotonic() - arrived
    assert not console.failures(), console.text()

    # ---- 4. the pivot onto the local file -----------------------------------------------------
    pivoting = time.monotonic()
    pivot = _run_polling(lab, f"{POSTCOPY} xl-pivot --config /ctl/domains.toml --domain du",
                         LAB_PYTHON_TIMEOUT, [console])  # fmt: skip
    LAB_TIMINGS["postcopy xl-pivot (with its Python start)"] = time.monotonic() - pivoting
    assert "postcopy-du-xvda now on /dev/loop" in pivot.output and "receive stopped" in pivot.output
    devices = _attached_devices(lab)
    loop = devices.split("linear 7:")[1].split()[0] if "linear 7:" in devices else None
    assert loop is not None, devices  # one linear target over a loop device (major 7) ...
    assert f"/dev/loop{loop}: " in devices and "(/ctl/host-b/du.img)" in devices  # ... of B's file
    assert "connected" not in devices, devices  # no NBD device connected
    assert lab.run("kill -0 $(cat /run/receive.pid)", timeout=60, check=False).returncode != 0
    _wait_new_passes(lab, console, PASSES, time.monotonic(), LAB_BOOT_TIMEOUT)
    assert not console.failures(), console.text()

    # ---- 5. the domain goes; the script takes the pivoted device down; B's file -------------
    lab.run("xl destroy du", timeout=120)
    devices = _attached_devices(lab)
    assert "postcopy-du-xvda" not in devices and "host-b" not in devices, devices
    lab.run("kill $(cat /run/serve.pid)", timeout=60)
    a, b = image_a.read_bytes(), (ctl / "host-b/du.img").read_bytes()
    work_start, work_end = layout.work_kib[0] * 1024, sum(layout.work_kib) * 1024
    assert len(a) == len(b) == layout.disk_size
    assert b[:work_start] == a[:work_start] and b[work_end:] == a[work_end:]  # A's image ...
    assert b[work_start:work_end] != a[work_start:work_end]  # ... plus the guest's writes on B
    start, length = layout.preboot_byte_range()
    assert b[start : start + 4096] == expected_preboot_bytes(layout.seed, start, 4096)


@pytest.mark.xen
@pytest.mark.timeout(3600)
def test_the_same_migration_on_a_plain_phy_nbd_disk_for_the_downtime_baseline(
    xen_lab: XenLab,
) -> None:
    """What the block script adds to the guest-visible pause: the same domU migrated on a kernel
    NBD device given as `phy:` (no hotplug work but Xen's own block script)."""
    lab = xen_lab
    ctl = lab.ctl
    layout = GuestLayout()
    image = ctl / "plain.img"
    prepare_disk_image(image, layout, ensure_guest_boot_files())
    lab.run("nbdkit --unix /run/plain.sock --pidfile /run/plain.pid file /ctl/plain.img\n"
            "nbd-client -unix /run/plain.sock /dev/nbd15 -b 512", timeout=120)  # fmt: skip
    (ctl / "dp.cfg").write_text(domu_config(lab.files, "dp", "phy:/dev/nbd15,xvda,w", layout))
    console = lab.console("dp")
    created = time.monotonic()
    _run_polling(lab, "xl create /ctl/dp.cfg", 300, [console])
    LAB_TIMINGS["xl create (phy: NBD)"] = time.monotonic() - created
    _wait_new_passes(lab, console, PASSES, created, LAB_BOOT_TIMEOUT)
    migrating = time.monotonic()
    _run_polling(lab, "xl migrate -s /ctl/ssh-localhost.sh dp localhost", LAB_MIGRATE_TIMEOUT,
                 [console])  # fmt: skip
    arrived = time.monotonic()
    LAB_TIMINGS["xl migrate (phy: NBD)"] = arrived - migrating
    _wait_new_passes(lab, console, PASSES, arrived, LAB_BOOT_TIMEOUT)
    LAB_TIMINGS["guest-visible pause, phy: NBD"] = _longest_gap(console, migrating, arrived)
    assert not console.failures(), console.text()
    lab.run("xl destroy dp; nbd-client -d /dev/nbd15; kill $(cat /run/plain.pid)", timeout=120)
