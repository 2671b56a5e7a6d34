"""The guest kit's console reader (`ConsoleLog`), shared by QemuGuest, the libvirt lab's
GuestConsole and the Xen lab's DomuConsole: only whole new lines, each marker read once."""

from __future__ import annotations

from pathlib import Path

from postcopy.kit.guestkit.qemu import ConsoleLog


def test_console_log_reads_the_markers_of_whole_new_lines_once(tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    reader = ConsoleLog(serial)
    assert reader.read_markers() == []  # no file yet
    serial.write_bytes(b"boot noise\nPOSTCOPY-GUEST PASS 4 OK written=9\nPOSTCOPY-GUEST PA")
    assert [(m.pass_number, m.ok, m.detail) for m in reader.read_markers(now=5.0)] == [
        (4, True, "written=9")
    ]
    with open(serial, "ab") as log:
        log.write(b"SS 5 FAIL preboot slot=2\n")
    (marker,) = reader.read_markers(now=7.0)
    assert (marker.pass_number, marker.ok, marker.detail, marker.seen_at) == (
        5, False, "preboot slot=2", 7.0,
    )  # fmt: skip
    assert reader.read_markers() == []  # nothing read twice
