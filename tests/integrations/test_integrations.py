"""The config rewriters (xl, libvirt, QEMU) and `postcopy config`, on real-looking configs.

The real-peer checks (QEMU opening the rewritten disks over NBD) are in
tests/test_integrations_qemu.py."""

from __future__ import annotations

import io
import json
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postcopy.cli import main
from postcopy.errors import UserError
from postcopy.integrations import libvirt, qemu, xl
from postcopy.integrations.qemu import join_qemu_opts, parse_qemu_args, split_qemu_opts
from postcopy.integrations.xl import parse_disk_spec
from postcopy.policy import DomainPolicy, load_config, parse_config

DATA = Path(__file__).parents[1] / "data"
POLICY = DATA / "domains.toml"


@pytest.fixture(scope="module")
def policy_text() -> str:
    return POLICY.read_text()


def domain(name: str) -> DomainPolicy:
    return load_config(POLICY, environ={}).domain(name)


# --- xl -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "/dev/vg/guest-volume,,hda",
        "/dev/vg/guest-volume,raw,hda,rw",
        "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
        "raw:/dev/vg/guest-volume,hda,w",
        "phy:/dev/vg/guest-volume,hda,w",
    ],
)
def test_xl_disk_spec_forms_from_the_manual_are_equivalent(spec: str) -> None:
    disk = parse_disk_spec(spec)
    assert (disk.target, disk.vdev) == ("/dev/vg/guest-volume", "hda")
    assert disk.format in (None, "raw")
    assert disk.access in (None, "rw", "w")


@pytest.mark.parametrize(
    "spec",
    [
        "/root/image.iso,,hdc,cdrom",
        "/root/image.iso,,hdc,,cdrom",
        "/root/image.iso,raw,hdc,devtype=cdrom",
        "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
        "raw:/root/image.iso,hdc:cdrom,ro",
    ],
)
def test_xl_cdrom_spec_forms_are_equivalent(spec: str) -> None:
    disk = parse_disk_spec(spec)
    assert (disk.target, disk.vdev, disk.devtype) == ("/root/image.iso", "hdc", "cdrom")


def test_xl_target_keyword_takes_the_rest_including_commas() -> None:
    disk = parse_disk_spec("vdev=xvda, target=nbd+unix:///a,b?socket=/run/x,y.sock")
    assert disk.target == "nbd+unix:///a,b?socket=/run/x,y.sock"
    assert disk.vdev == "xvda"


def test_xl_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="given twice"):
        parse_disk_spec("/a.img,raw,xvda,rw,vdev=xvdb")
    with pytest.raises(ValueError, match="access"):
        parse_disk_spec("/a.img,raw,xvda,sometimes")


def test_xl_rewrite_touches_only_the_policy_disks_strings() -> None:
    original = (DATA / "web1.xl.cfg").read_text()
    result = xl.rewrite_xl(original, domain("web1"), "web1.xl.cfg")
    assert result.changed == ("xvda", "xvdb")
    before, after = original.splitlines(), result.text.splitlines()
    assert len(before) == len(after)
    changed_lines = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed_lines == [16, 17]  # the two disk strings, nothing else
    # The comment after the first disk string and the indentation survive.
    assert after[16].startswith("    '") and after[16].endswith("',  # root fs")
    assert after[16] == (
        "    'format=raw, vdev=xvda, access=rw, script=block-postcopy, target=web1-xvda',"
        "  # root fs"
    )
    assert (
        after[17]
        == '    "format=raw, vdev=xvdb, access=rw, script=block-postcopy, target=web1-xvdb",'
    )
    assert any("replaced script=block by block-postcopy" in note for note in result.notes)
    assert "nbd" not in result.text and "qdisk" not in result.text  # the old form is gone
    assert xl.domain_name(result.text) == "web1"


def test_xl_rewrite_is_idempotent() -> None:
    once = xl.rewrite_xl((DATA / "web1.xl.cfg").read_text(), domain("web1")).text
    twice = xl.rewrite_xl(once, domain("web1"))
    assert twice.text == once and twice.changed == ("xvda", "xvdb")


def _policy(extra: str = "", mode: str = "postcopy") -> DomainPolicy:
    text = (
        f'[domains.g]\nmode = "{mode}"\nsocket_dir = "/run/pc"\n'
        '[[domains.g.disks]]\ndevice = "xvda"\nsource_image = "/img/g.qcow2"\n' + extra
    )
    return parse_config(text, "t.toml").domain("g")


def test_xl_rewrite_keeps_options_and_names_the_disk_whatever_its_endpoint() -> None:
    cfg = (
        'name="g"\n'
        'disk=["tap:aio:/img/g.qcow2,xvda,w,discard", "/img/swap.img,raw,xvdb"];memory=512\n'
    )
    # A disk served on TCP has the same spec: the hotplug script finds the listener in the policy.
    result = xl.rewrite_xl(cfg, _policy('listen = "127.0.0.1:10900"\n'))
    assert result.text == (
        'name="g"\n'
        'disk=["format=raw, vdev=xvda, access=rw, script=block-postcopy, discard, '
        'target=g-xvda", "/img/swap.img,raw,xvdb"];memory=512\n'
    )


def test_xl_rewrite_refuses_a_disk_that_is_not_raw() -> None:
    """The phy backend a block script forces serves raw blocks: a qcow2 disk cannot be one."""
    with pytest.raises(UserError, match=r"^t.cfg:1: disk xvda is qcow2: .* convert the image"):
        xl.rewrite_xl("disk = [ 'tap:qcow2:/img/g.qcow2,xvda,w' ]\n", _policy(), "t.cfg")


def test_xl_local_rewrite_opens_the_destination_file_for_the_next_start() -> None:
    postcopy_form = xl.rewrite_xl((DATA / "web1.xl.cfg").read_text(), domain("web1")).text
    local = xl.rewrite_xl(postcopy_form, domain("web1"), local=True)
    assert local.changed == ("xvda", "xvdb")
    assert "'format=raw, vdev=xvda, access=rw, target=/srv/xen/web1-root.img',  # root fs" in (
        local.text
    )
    assert '"format=raw, vdev=xvdb, access=rw, target=/srv/xen/incoming/web1-data.img",' in (
        local.text
    )
    assert "script=" not in local.text
    # The original form (before any rewrite) gives the same local config.
    original = xl.rewrite_xl((DATA / "web1.xl.cfg").read_text(), domain("web1"), local=True)
    assert original.text == local.text


def test_xl_rewrite_matches_by_path_when_device_names_differ() -> None:
    cfg = "disk = [ '/img/g.qcow2,raw,hda,rw' ]\n"
    result = xl.rewrite_xl(cfg, _policy())
    assert result.changed == ("xvda",)
    assert "vdev=hda" in result.text and "target=g-xvda" in result.text
    # Rewriting it again finds the disk by its block script target (no path to match any more).
    again = xl.rewrite_xl(result.text, _policy())
    assert again.text == result.text and again.changed == ("xvda",)


def test_xl_missing_policy_disk_is_an_error() -> None:
    with pytest.raises(UserError, match="no disk for xvda of domain 'g'"):
        xl.rewrite_xl("disk = [ '/other.img,raw,xvdb' ]\n", _policy())
    with pytest.raises(UserError, match="no 'disk = \\[...\\]'"):
        xl.rewrite_xl("name = 'g'\n", _policy())


def test_xl_precopy_domain_is_unchanged_with_a_note() -> None:
    cfg = (DATA / "web1.xl.cfg").read_text()
    result = xl.rewrite_xl(cfg, domain("build"))
    assert result.text == cfg and result.changed == ()
    assert "precopy mode" in result.notes[0]


def test_xl_syntax_error_names_the_line() -> None:
    with pytest.raises(UserError, match=r"^x.cfg:2: unexpected '\$'"):
        xl.rewrite_xl("name = 'g'\n$disk = []\n", _policy(), "x.cfg")


# --- libvirt ------------------------------------------------------------------------------------


def _without_disks(text: str) -> str:
    return re.sub(r"<disk .*?</disk>", "<disk/>", text, flags=re.S)


def test_libvirt_rewrite_changes_only_the_matched_disks() -> None:
    original = (DATA / "db-primary.libvirt.xml").read_text()
    result = libvirt.rewrite_libvirt(original, domain("db-primary"), "db.xml")
    assert result.changed == ("vda", "vdb")
    # Byte for byte equal outside the <disk> elements: comments, declaration, quoting, order.
    assert _without_disks(result.text) == _without_disks(original)
    # The CD-ROM disk is untouched.
    cdrom = re.findall(r"<disk type='file' device='cdrom'>.*?</disk>", original, flags=re.S)
    assert len(cdrom) == 1 and cdrom[0] in result.text

    old_disks = ET.fromstring(original.encode()).findall("./devices/disk")
    new_disks = ET.fromstring(result.text.encode()).findall("./devices/disk")
    root, wal, iso = new_disks
    assert root.get("type") == "network" and root.get("device") == "disk"
    source = root.find("source")
    assert source is not None and source.attrib == {"protocol": "nbd", "name": "db-primary-vda"}
    hosts = source.findall("host")
    assert [h.attrib for h in hosts] == [
        {"transport": "unix", "socket": "/run/postcopy/db-primary-vda.sock"}
    ]
    wal_source = wal.find("source")
    assert wal_source is not None
    assert [h.attrib for h in wal_source.findall("host")] == [
        {"name": "127.0.0.1", "port": "10811"}
    ]
    # Driver (qcow2 stays qcow2), target, boot order and PCI address are kept as they were.
    for old, new in zip(old_disks[:2], new_disks[:2], strict=True):
        for tag in ("driver", "target", "address", "boot"):
            old_child, new_child = old.find(tag), new.find(tag)
            assert (old_child is None) == (new_child is None)
            if old_child is not None and new_child is not None:
                assert new_child.attrib == old_child.attrib
    assert ET.tostring(iso) == ET.tostring(old_disks[2])
    # The new elements follow the document's indentation and quote style.
    assert (
        "      <source protocol='nbd' name='db-primary-vda'>\n"
        "        <host transport='unix' socket='/run/postcopy/db-primary-vda.sock'/>\n"
        "      </source>\n" in result.text
    )
    assert '<disk type="network" device="disk">' in result.text


def test_libvirt_rewrite_is_idempotent_and_reads_the_name() -> None:
    original = (DATA / "db-primary.libvirt.xml").read_text()
    once = libvirt.rewrite_libvirt(original, domain("db-primary")).text
    assert libvirt.rewrite_libvirt(once, domain("db-primary")).text == once
    assert libvirt.domain_name(once) == "db-primary"


def test_libvirt_disk_without_driver_or_type_gets_raw_nbd() -> None:
    xml = (
        "<domain type='kvm'><name>g</name><devices>\n"
        "  <disk device='disk'>\n"
        "    <source file='/img/g.qcow2'/>\n"
        "    <target dev='xvda' bus='xen'/>\n"
        "  </disk>\n"
        "</devices></domain>\n"
    )
    result = libvirt.rewrite_libvirt(xml, _policy())
    assert result.text == (
        "<domain type='kvm'><name>g</name><devices>\n"
        "  <disk type='network' device='disk'>\n"
        "    <driver name='qemu' type='raw'/>\n"
        "    <source protocol='nbd' name='g-xvda'>\n"
        "      <host transport='unix' socket='/run/pc/g-xvda.sock'/>\n"
        "    </source>\n"
        "    <target dev='xvda' bus='xen'/>\n"
        "  </disk>\n"
        "</devices></domain>\n"
    )


def test_libvirt_errors_name_the_problem() -> None:
    with pytest.raises(UserError, match="not well-formed"):
        libvirt.rewrite_libvirt("<domain><devices>", _policy(), "d.xml")
    with pytest.raises(UserError, match="root element is not <domain>"):
        libvirt.rewrite_libvirt("<network/>", _policy(), "d.xml")
    with pytest.raises(UserError, match="no disk for xvda"):
        libvirt.rewrite_libvirt("<domain><devices/></domain>", _policy(), "d.xml")


def test_libvirt_shared_domain_is_unchanged() -> None:
    original = (DATA / "db-primary.libvirt.xml").read_text()
    result = libvirt.rewrite_libvirt(original, domain("nfs-guest"))
    assert result.text == original and "shared mode" in result.notes[0]


# --- QEMU ---------------------------------------------------------------------------------------


def test_qemu_opts_split_and_join_with_escaped_commas() -> None:
    pairs = split_qemu_opts("file=/a,,b.img,if=virtio,readonly")
    assert pairs == [("file", "/a,b.img"), ("if", "virtio"), ("readonly", "")]
    assert join_qemu_opts(pairs) == "file=/a,,b.img,if=virtio,readonly"


def _qemu_policy() -> DomainPolicy:
    return parse_config(
        '[domains.qemu-guest]\nmode = "postcopy"\nsocket_dir = "/run/pc"\n'
        '[[domains.qemu-guest.disks]]\ndevice = "disk0"\n'
        'source_image = "/var/lib/images/qemu-guest.raw"\n'
        '[[domains.qemu-guest.disks]]\ndevice = "home"\n'
        'source_image = "/var/lib/images/qemu-guest-home.qcow2"\n',
        "q.toml",
    ).domain("qemu-guest")


def test_qemu_rewrite_gives_each_disk_named_blockdev_nodes() -> None:
    original = (DATA / "qemu-guest.args.sh").read_text()
    result = qemu.rewrite_qemu_args(original, _qemu_policy())
    assert result.changed == ("disk0", "home")
    old_args, _ = parse_qemu_args(original)
    new_args, style = parse_qemu_args(result.text)
    assert style == "shell"
    drive = old_args.index("-drive")
    # The -drive becomes an nbd node and a raw node named after its id, in its place; the
    # -device that names drive=disk0 is unchanged.
    assert new_args[:drive] == old_args[:drive]
    assert new_args[drive : drive + 4] == [
        "-blockdev",
        "driver=nbd,node-name=disk0-nbd,server.type=unix,"
        "server.path=/run/pc/qemu-guest-disk0.sock,export=qemu-guest-disk0,"
        "cache.direct=on,cache.no-flush=off,discard=unmap",
        "-blockdev",
        "driver=raw,node-name=disk0,file=disk0-nbd,cache.direct=on,cache.no-flush=off,"
        "discard=unmap",
    ]
    assert new_args[drive + 4 :] == [
        json.dumps(
            {
                "driver": "nbd",
                "server": {"type": "unix", "path": "/run/pc/qemu-guest-home.sock"},
                "export": "qemu-guest-home",
                "node-name": "home-file",
                "cache": {"direct": True},
            },
            separators=(",", ":"),
        )
        if arg.startswith('{"driver":"file"')
        else arg
        for arg in old_args[drive + 2 :]
    ]
    assert result.notes == ("-drive of disk0: no -blockdev form for aio=native: dropped",)
    assert "console=ttyS0 root=/dev/vda1" in new_args  # a value with a space stays one argument
    assert qemu.rewrite_qemu_args(result.text, _qemu_policy()).text == result.text


def test_qemu_blockdev_keyvalue_form_and_hd_shorthand() -> None:
    policy = _qemu_policy()
    args = (
        "-blockdev driver=file,filename=/var/lib/images/qemu-guest-home.qcow2,node-name=h,"
        "aio=io_uring,read-only=on "
        "-blockdev driver=qcow2,file=h,node-name=home-fmt "
        "-hda /var/lib/images/qemu-guest.raw"
    )
    result = qemu.rewrite_qemu_args(args, policy)
    new_args, _ = parse_qemu_args(result.text)
    assert new_args == [
        "-blockdev",
        "driver=nbd,server.type=unix,server.path=/run/pc/qemu-guest-home.sock,"
        "export=qemu-guest-home,node-name=h,read-only=on",
        "-blockdev",
        "driver=qcow2,file=h,node-name=home-fmt",
        "-blockdev",
        "driver=nbd,node-name=disk0-nbd,server.type=unix,"
        "server.path=/run/pc/qemu-guest-disk0.sock,export=qemu-guest-disk0",
        "-blockdev",
        "driver=raw,node-name=disk0,file=disk0-nbd",
        "-device",
        "ide-hd,drive=disk0,bus=ide.0,unit=0",
    ]


def test_qemu_drive_devices_keep_their_bus_unit_and_slot_order() -> None:
    """if=ide: the bus and unit of its index (one unit a bus on q35); drives left as -drive get
    the index QEMU gave them; if=virtio: virtio-blk-pci after every -device, as QEMU orders it."""
    policy = _qemu_policy()
    args = (
        "-M q35 -drive file=/x.iso,media=cdrom "
        "-hdb /var/lib/images/qemu-guest.raw "
        "-drive file=/var/lib/images/qemu-guest-home.qcow2,format=qcow2,if=virtio,"
        "cache=writethrough,bps=100,serial=HOME1,addr=0x7 "
        "-device e1000"
    )
    result = qemu.rewrite_qemu_args(args, policy)
    new_args, _ = parse_qemu_args(result.text)
    assert new_args == [
        "-M", "q35",
        "-drive", "file=/x.iso,media=cdrom,index=0",
        "-blockdev",
        "driver=nbd,node-name=disk0-nbd,server.type=unix,"
        "server.path=/run/pc/qemu-guest-disk0.sock,export=qemu-guest-disk0",
        "-blockdev", "driver=raw,node-name=disk0,file=disk0-nbd",
        "-device", "ide-hd,drive=disk0,bus=ide.1,unit=0",
        "-blockdev",
        "driver=nbd,node-name=home-nbd,server.type=unix,"
        "server.path=/run/pc/qemu-guest-home.sock,export=qemu-guest-home,"
        "cache.direct=off,cache.no-flush=off",
        "-blockdev",
        "driver=qcow2,node-name=home,file=home-nbd,cache.direct=off,cache.no-flush=off",
        "-device", "e1000",
        "-device", "virtio-blk-pci,drive=home,addr=0x7,serial=HOME1,write-cache=off",
    ]  # fmt: skip
    assert result.notes == (
        "-drive of disk0: no format given, raw (assumed: the image is not readable here; "
        "add format= if it is not raw)",
        "-drive of home: no -blockdev form for bps=100: dropped",
    )


def test_qemu_virtio_drive_left_alone_keeps_its_slot_before_a_converted_one() -> None:
    args = (
        "-drive file=/shared.img,format=raw,if=virtio "
        "-drive file=/var/lib/images/qemu-guest.raw,format=raw,if=virtio "
        "-drive file=/scratch.img,format=raw,if=virtio,addr=0x9 "
        "-device e1000 -hdb /var/lib/images/qemu-guest-home.qcow2"
    )
    result = qemu.rewrite_qemu_args(args, _qemu_policy())
    new_args, _ = parse_qemu_args(result.text)
    devices = [new_args[i + 1] for i, arg in enumerate(new_args) if arg == "-device"]
    drives = [new_args[i + 1] for i, arg in enumerate(new_args) if arg == "-drive"]
    assert drives == [
        "file=/shared.img,format=raw,if=none,id=virtio0",
        "file=/scratch.img,format=raw,if=virtio,addr=0x9",  # after the converted one: as it was
    ]
    assert devices == [
        "e1000",
        "ide-hd,drive=home,bus=ide.0,unit=1",
        "virtio-blk-pci,drive=virtio0",
        "virtio-blk-pci,drive=disk0",
    ]
    assert qemu.rewrite_qemu_args(result.text, _qemu_policy()).text == result.text


def test_qemu_drive_without_format_gets_the_format_of_its_image(tmp_path: Path) -> None:
    """-hdX gives no format; a format node must name one, and raw over qcow2 would be wrong."""
    home = tmp_path / "home.qcow2"
    root = tmp_path / "root.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(home), "1M"], check=True)
    root.write_bytes(bytes(4096))
    policy = parse_config(
        f'[domains.g]\nmode = "postcopy"\nsocket_dir = "/run/pc"\n'
        f'disks = [{{device = "hda", source_image = "{root}"}}, '
        f'{{device = "hdb", source_image = "{home}"}}]\n',
        "q.toml",
    ).domain("g")
    result = qemu.rewrite_qemu_args(f"-hda {root} -hdb {home}", policy)
    new_args, _ = parse_qemu_args(result.text)
    assert "driver=raw,node-name=hda,file=hda-nbd" in new_args
    assert "driver=qcow2,node-name=hdb,file=hdb-nbd" in new_args
    assert result.notes == (
        "-drive of hda: no format given, raw (the image has no qcow2 header)",
        "-drive of hdb: no format given, qcow2 (from the image's header)",
    )


def test_qemu_drive_on_a_bus_qemu_builds_itself_keeps_the_drive_form() -> None:
    args = "-drive file=/var/lib/images/qemu-guest.raw,if=scsi,format=raw,aio=native"
    policy = _qemu_policy()
    result = qemu.rewrite_qemu_args(args + " -hdd /var/lib/images/qemu-guest-home.qcow2", policy)
    new_args, _ = parse_qemu_args(result.text)
    assert new_args[:2] == [
        "-drive",
        "file.driver=nbd,file.server.type=unix,file.server.path=/run/pc/qemu-guest-disk0.sock,"
        "file.export=qemu-guest-disk0,if=scsi,format=raw",
    ]
    assert new_args[-2:] == ["-device", "ide-hd,drive=home,bus=ide.1,unit=1"]
    assert result.notes[0] == (
        "-drive of disk0: if=scsi kept as -drive (QEMU makes its controller), so "
        "`postcopy pivot` cannot switch it to the local file"
    )
    assert len(result.notes) == 3  # and aio=native dropped, home's format assumed raw


def test_qemu_one_argument_per_line_stays_that_way() -> None:
    original = (DATA / "qemu-guest.args").read_text()
    policy = parse_config(
        '[domains.qemu-guest]\nmode = "postcopy"\nsocket_dir = "/run/pc"\n'
        '[[domains.qemu-guest.disks]]\ndevice = "hda"\n'
        'source_image = "/var/lib/images/qemu-guest.raw"\nlisten = "127.0.0.1:10900"\n',
        "q.toml",
    ).domain("qemu-guest")
    result = qemu.rewrite_qemu_args(original, policy)
    assert qemu.domain_name(original) == "qemu-guest"
    assert result.text == original.replace(
        "-hda\n/var/lib/images/qemu-guest.raw\n",
        "-blockdev\ndriver=nbd,node-name=hda-nbd,server.type=inet,server.host=127.0.0.1,"
        "server.port=10900,export=qemu-guest-hda\n"
        "-blockdev\ndriver=raw,node-name=hda,file=hda-nbd\n"
        "-device\nide-hd,drive=hda,bus=ide.0,unit=0\n",
    )


def test_qemu_image_opts_and_uri_for_a_disk() -> None:
    policy = _qemu_policy()
    endpoint = policy.dest_endpoint(policy.disk("home"))
    assert qemu.image_opts(endpoint) == (
        "driver=nbd,server.type=unix,server.path=/run/pc/qemu-guest-home.sock,"
        "export=qemu-guest-home"
    )
    assert qemu.image_opts(endpoint, "qcow2") == (
        "driver=qcow2,file.driver=nbd,file.server.type=unix,"
        "file.server.path=/run/pc/qemu-guest-home.sock,file.export=qemu-guest-home"
    )
    assert qemu.nbd_uri(endpoint) == (
        "nbd+unix:///qemu-guest-home?socket=/run/pc/qemu-guest-home.sock"
    )


# --- postcopy config ----------------------------------------------------------------------------


def test_cli_prints_the_rewritten_config(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["config", "--config", str(POLICY), "--xl", str(DATA / "web1.xl.cfg")])
    out, err = capsys.readouterr()
    assert status == 0
    assert out == xl.rewrite_xl((DATA / "web1.xl.cfg").read_text(), domain("web1")).text
    assert "replaced script=block by block-postcopy" in err


def test_cli_in_place_keeps_a_backup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "db.xml"
    original = (DATA / "db-primary.libvirt.xml").read_text()
    target.write_text(original)
    target.chmod(0o640)
    status = main(
        ["config", "--config", str(POLICY), "--domain", "db-primary", "--libvirt", str(target),
         "--in-place"]
    )  # fmt: skip
    assert status == 0
    backup = tmp_path / "db.xml.postcopy-bak"
    assert backup.read_text() == original
    assert target.read_text() == libvirt.rewrite_libvirt(original, domain("db-primary")).text
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.xml", "db.xml.postcopy-bak"]
    assert "rewrote vda, vdb" in capsys.readouterr().err


def test_cli_precopy_domain_leaves_the_file_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "build.cfg"
    target.write_text("name = 'build'\ndisk = [ '/img/build.img,raw,xvda' ]\n")
    status = main(["config", "--config", str(POLICY), "--xl", str(target), "--in-place"])
    assert status == 0
    assert target.read_text() == "name = 'build'\ndisk = [ '/img/build.img,raw,xvda' ]\n"
    assert not (tmp_path / "build.cfg.postcopy-bak").exists()
    assert "precopy mode" in capsys.readouterr().err


def test_cli_reads_stdin_and_uses_the_environment_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POSTCOPY_CONFIG", str(POLICY))
    monkeypatch.setattr("sys.stdin", io.StringIO((DATA / "qemu-guest.args").read_text()))
    status = main(["config", "--domain", "qemu-guest", "--qemu-args", "-"])
    out, _ = capsys.readouterr()
    assert status == 0
    assert "server.path=/run/postcopy/qemu-guest-disk0.sock" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--domain", "other", "--xl", str(DATA / "web1.xl.cfg")], "config of domain 'web1'"),
        (["--qemu-args", "-", "--in-place"], "--in-place needs a file"),
        (["--xl", "/nonexistent/x.cfg"], "cannot read /nonexistent/x.cfg"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "--config", str(POLICY), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_bad_policy_file_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "domains.toml"
    bad.write_text('[domains.web1]\nmode = "postcopy"\ndisks = []\nchunk_size = "3K"\n')
    assert main(["config", "--config", str(bad), "--xl", str(DATA / "web1.xl.cfg")]) == 2
    assert f"{bad}:4: domains.web1.chunk_size" in capsys.readouterr().err


def _virt_xml_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, timeout=60
    )


def test_libvirt_rewritten_xml_passes_libvirts_own_schema(tmp_path: Path) -> None:
    """libvirt's RelaxNG domain schema (virt-xml-validate) accepts every rewrite we produce."""
    original = (DATA / "db-primary.libvirt.xml").read_text()
    rewritten = tmp_path / "db.xml"
    rewritten.write_text(libvirt.rewrite_libvirt(original, domain("db-primary")).text)
    result = _virt_xml_validate(rewritten)
    assert result.returncode == 0, result.stdout + result.stderr
    no_driver = tmp_path / "g.xml"
    no_driver.write_text(
        libvirt.rewrite_libvirt(
            "<domain type='kvm'><name>g</name><memory>65536</memory><os><type>hvm</type></os>"
            "<devices><disk device='disk'><source file='/img/g.qcow2'/>"
            "<target dev='xvda' bus='xen'/></disk></devices></domain>",
            _policy(),
        ).text
    )
    result = _virt_xml_validate(no_driver)
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator is strict: a wrong protocol fails, so the check above means something.
    broken = tmp_path / "broken.xml"
    broken.write_text(rewritten.read_text().replace("protocol='nbd'", "protocol='nbdx'"))
    assert _virt_xml_validate(broken).returncode != 0


def test_cli_plan_lists_the_commands_of_a_migration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--config", str(POLICY), "--domain", "web1", "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    assert commands == [
        "postcopy serve --listen host-a.example:10809 "
        "web1-xvda=/srv/xen/web1-root.img web1-data=/srv/xen/web1-data.img",
        "postcopy receive --domain web1 --source nbd://host-a.example:10809/web1-xvda "
        "--dest /srv/xen/web1-root.img --state-dir /var/lib/postcopy/web1/xvda "
        "--socket /run/postcopy/web1-xvda.sock --chunk-size 262144 --bandwidth 209715200 "
        "--source-id web1/xvda --wait-for-source",
        "postcopy receive --domain web1 --source nbd://host-a.example:10809/web1-data "
        "--dest /srv/xen/incoming/web1-data.img --state-dir /var/lib/postcopy/web1/xvdb "
        "--socket /run/postcopy/web1-xvdb.sock --chunk-size 262144 --bandwidth 209715200 "
        "--source-id web1/xvdb --wait-for-source",
        "postcopy source-frozen --state-dir /var/lib/postcopy/web1/xvda",
        "postcopy source-frozen --state-dir /var/lib/postcopy/web1/xvdb",
    ]
    assert "#   xvda: nbd+unix:///web1-xvda?socket=/run/postcopy/web1-xvda.sock" in lines


def test_cli_plan_json_for_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["config", "--config", str(POLICY), "--domain", "db-primary", "--plan", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["serve"][:4] == ["postcopy", "serve", "--socket", "/run/postcopy/tunnel-a.sock"]
    wal = plan["disks"][1]
    assert wal["dest_uri"] == "nbd://127.0.0.1:10811/db-primary-vdb"
    assert wal["receive"][-7:] == [
        "--listen",
        "127.0.0.1:10811",
        "--chunk-size",
        "65536",
        "--source-id",
        "db-primary/vdb",
        "--wait-for-source",
    ]
    assert main(["config", "--config", str(POLICY), "--domain", "build", "--plan", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["disks"] == []


def test_libvirt_disk_on_one_line_stays_on_one_line() -> None:
    xml = (
        '<domain><name>g</name><devices><disk type="file" device="disk">'
        '<source file="/img/g.qcow2"/><target dev="xvda"/></disk>'
        '<disk type="file" device="disk"><target dev="xvdz"/></disk></devices></domain>'
    )
    result = libvirt.rewrite_libvirt(xml, _policy())
    assert result.text == (
        '<domain><name>g</name><devices><disk type="network" device="disk">'
        '<driver name="qemu" type="raw"/><source protocol="nbd" name="g-xvda">'
        '<host transport="unix" socket="/run/pc/g-xvda.sock"/></source><target dev="xvda"/>'
        '</disk><disk type="file" device="disk"><target dev="xvdz"/></disk></devices></domain>'
    )


def test_qemu_drive_with_nested_file_options_is_matched_by_filename() -> None:
    args = "-drive driver=raw,file.driver=file,file.filename=/var/lib/images/qemu-guest.raw,if=ide"
    policy = parse_config(
        '[domains.q]\nmode = "postcopy"\nsocket_dir = "/run/pc"\n'
        'disks = [{device = "d0", source_image = "/var/lib/images/qemu-guest.raw"}]\n',
        "q.toml",
    ).domain("q")
    new_args, _ = parse_qemu_args(qemu.rewrite_qemu_args(args, policy).text)
    assert new_args == [
        "-blockdev",
        "driver=nbd,node-name=d0-nbd,server.type=unix,server.path=/run/pc/q-d0.sock,export=q-d0",
        "-blockdev",
        "driver=raw,node-name=d0,file=d0-nbd",
        "-device",
        "ide-hd,drive=d0,bus=ide.0,unit=0",
    ]


def test_xl_disk_append_statement_is_rewritten_too() -> None:
    cfg = "disk = [ '/other.img,raw,xvdb' ]\ndisk += [ '/img/g.qcow2,raw,xvda' ]\n"
    result = xl.rewrite_xl(cfg, _policy())
    assert result.text == (
        "disk = [ '/other.img,raw,xvdb' ]\n"
        "disk += [ 'format=raw, vdev=xvda, access=rw, script=block-postcopy, target=g-xvda' ]\n"
    )


_SPEC_VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._-", min_size=1, max_size=12)


@given(
    target=_SPEC_VALUE.map(lambda s: "/" + s),
    fmt=st.sampled_from([None, "raw", "qcow2", "vhd"]),
    vdev=st.sampled_from(["xvda", "hda", "sdb", "xvdz"]),
    access=st.sampled_from([None, "rw", "ro"]),
    devtype=st.sampled_from([None, "cdrom"]),
    options=st.lists(st.tuples(st.sampled_from(["backend", "script", "colo-host"]), _SPEC_VALUE)),
    flags=st.lists(st.sampled_from(["discard", "no-discard", "direct-io-safe"]), max_size=2),
    target_tail=st.sampled_from(["", ",with,commas", "?socket=/a,b"]),
)
def test_xl_disk_spec_round_trips(
    target: str,
    fmt: str | None,
    vdev: str,
    access: str | None,
    devtype: str | None,
    options: list[tuple[str, str]],
    flags: list[str],
    target_tail: str,
) -> None:
    spec = xl.XlDiskSpec(target + target_tail, fmt, vdev, access, devtype, options, flags)
    parsed = parse_disk_spec(spec.to_text())
    assert parsed.target == target + target_tail  # target= last keeps its commas
    assert (parsed.format, parsed.vdev, parsed.devtype) == (fmt, vdev, devtype)
    assert parsed.access == (access or "rw")
    assert parsed.options == options and parsed.flags == flags
