"""`fetch-progress`: the rendering from hand-made records, the command's forms and errors, and the
live display under a real pseudo-terminal while status records advance.

Rendering tests draw with `Console(record=True, width=120)` and assert on `export_text()`.
Command tests call `postcopy.cli.main` in-process (stdout is not a terminal there, so the
plain forms are used); the live test runs the installed `fetch-progress` script on a pty and
parses the frames it draws."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from postcopy.cli import main as cli_main
from postcopy.destination.status import write_status
from postcopy.progress_display import (
    BAR_WIDTH,
    DiskView,
    domain_totals,
    percent_present,
    render_progress,
)

MiB = 1 << 20
NOW = 1_800_000_000.0
FETCH_PROGRESS = Path(sys.executable).with_name("fetch-progress")


def make_record(**changes: Any) -> dict[str, Any]:
    """A complete status record (every field of `postcopy.destination.status`), fetching 20 of
    64 MiB."""
    record: dict[str, Any] = {
        "state": "fetching",
        "size_bytes": 64 * MiB,
        "present_bytes": 20 * MiB,
        "missing_bytes": 44 * MiB,
        "transferred_bytes": 18 * MiB,
        "demand_fetches": 7,
        "demand_bytes": 2 * MiB,
        "drain_bytes": 16 * MiB,
        "hole_bytes_skipped": 2 * MiB,
        "discarded_fetch_bytes": 0,
        "passthrough_reads": 0,
        "faults": 12,
        "fault_latency_p50_ms": 0.8,
        "fault_latency_p99_ms": 14.2,
        "transfer_rate_bytes_per_second": 30 * MiB,
        "present_rate_bytes_per_second": 11 * MiB,
        "eta_seconds": 4.0,
        "reconnects": 1,
        "source_down_seconds": 0.0,
        "unreachable_timeout_seconds": 30.0,
        "error": None,
        "chunk_size": 65536,
        "guest_written_chunks": 3,
        "source": "nbd://host-a:10809/web1-xvda",
        "dest": "/srv/web1-xvda.img",
        "pid": os.getpid(),
        "started_at": NOW - 10,
        "updated_at": NOW - 0.5,
    }
    record.update(changes)
    if "present_bytes" in changes and "missing_bytes" not in changes:
        record["missing_bytes"] = record["size_bytes"] - record["present_bytes"]
    return record


def view(
    disk: str = "xvda", domain: str | None = "web1", running: bool | None = True, **changes: Any
) -> DiskView:
    path = Path(f"/var/lib/postcopy/{domain}/{disk}")
    return DiskView(domain, disk, path, make_record(**changes), None, running)


def render_text(views: list[DiskView], now: float = NOW) -> str:
    console = Console(record=True, width=120)
    console.print(render_progress(views, now))
    return console.export_text()


def row(text: str, name: str) -> str:
    """The table line of a disk (or `total`) row; the first one if several groups have it."""
    for line in text.splitlines():
        if line.startswith(f"  {name} "):
            return line
    raise AssertionError(f"no row {name!r} in:\n{text}")


@pytest.fixture(autouse=True)
def plain_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs must not depend on the caller's terminal settings."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("POSTCOPY_CONFIG", raising=False)


# -- rendering ---------------------------------------------------------------------------------


def test_disk_row_shows_bar_percent_bytes_rate_eta_faults_latency_state() -> None:
    text = render_text([view()])
    line = row(text, "xvda")
    assert "31.2%" in line
    assert "20 MiB / 64 MiB" in line
    assert "30 MiB/s" in line
    assert " 4s " in line
    assert " 12 " in line  # faults
    assert "0.80/14 ms" in line  # p50/p99
    assert line.rstrip().endswith("fetching")
    bar = re.search(r"[━╸]+", line)
    assert bar is not None and 5 <= len(bar.group()) <= 7  # 31% of a 20-cell bar
    header = text.splitlines()[0].split()
    assert header[:4] == ["Disk", "Progress", "%", "Present"]
    assert {"Rate", "ETA", "Faults", "p50/p99", "Reconn", "State"} <= set(header)


def test_percent_reaches_100_only_when_every_byte_is_present() -> None:
    assert percent_present(64 * MiB - 1, 64 * MiB, complete=False) == 99.9
    assert percent_present(64 * MiB, 64 * MiB, complete=True) == 100.0
    assert percent_present(0, 0, complete=True) == 100.0
    almost = render_text([view(present_bytes=64 * MiB - 4096)])
    assert "99.9%" in row(almost, "xvda") and "100.0%" not in row(almost, "xvda")
    done = render_text([view(state="complete", present_bytes=64 * MiB, eta_seconds=0.0)])
    line = row(done, "xvda")
    assert "100.0%" in line and "64 MiB / 64 MiB" in line and line.rstrip().endswith("complete")
    assert "━" * BAR_WIDTH in line


@pytest.mark.parametrize(
    ("changes", "shown"),
    [
        ({"state": "waiting-for-source", "present_bytes": 0}, "waiting for source"),
        ({"state": "fetching"}, "fetching"),
        ({"state": "complete", "present_bytes": 64 * MiB}, "complete"),
        ({"state": "failed", "error": "source export changed size"}, "failed"),
        # 12 s down when the record was written, 3 s ago.
        (
            {"state": "source-unreachable", "source_down_seconds": 12.0, "updated_at": NOW - 3},
            "source unreachable 15s",
        ),
    ],
)
def test_states_are_named_for_people(changes: dict[str, Any], shown: str) -> None:
    assert row(render_text([view(**changes)]), "xvda").rstrip().endswith(shown)


def test_unreachable_source_note_says_how_long_and_the_read_window() -> None:
    text = render_text(
        [
            view(
                state="source-unreachable",
                source_down_seconds=75.0,
                updated_at=NOW,
                error="connection refused",
            )
        ]  # fmt: skip
    )
    assert (
        "web1/xvda: source unreachable for 1m15s; guest reads of missing data fail after 30s; "
        "last error: connection refused"
    ) in text


def test_failed_disk_shows_the_engine_error() -> None:
    text = render_text([view(state="failed", error="source export changed size", running=False)])
    assert row(text, "xvda").rstrip().endswith("failed")
    assert "web1/xvda: failed: source export changed size" in text


def test_dead_writer_before_completion_is_stopped_but_a_finished_one_is_complete() -> None:
    text = render_text(
        [
            view("xvda", running=False),
            view("xvdb", running=False, state="complete", present_bytes=64 * MiB),
        ]
    )
    assert row(text, "xvda").rstrip().endswith("stopped")
    assert "web1/xvda: stopped: the writer (pid" in text
    assert row(text, "xvdb").rstrip().endswith("complete")
    assert "web1/xvdb" not in text


def test_unreadable_disk_is_an_error_row_with_its_reason() -> None:
    error = DiskView("db", "vdb", Path("/var/lib/postcopy/db/vdb"),
                     error="state directory /var/lib/postcopy/db/vdb does not exist")  # fmt: skip
    text = render_text([view("vda", domain="db"), error])
    line = row(text, "vdb")
    assert line.split() == ["vdb", "error"]
    assert "db/vdb: state directory /var/lib/postcopy/db/vdb does not exist" in text
    assert row(text, "total").rstrip().endswith("0/2 complete, 1 need attention")


def test_stale_record_of_a_live_writer_is_flagged() -> None:
    text = render_text([view(updated_at=NOW - 40)])
    assert "web1/xvda: no status update for 40s" in text


def test_domain_total_row_sums_its_disks_and_each_domain_has_one() -> None:
    views = [
        view("xvda", present_bytes=20 * MiB),
        view("xvdb", present_bytes=44 * MiB, faults=3, reconnects=0),
        view("vda", domain="db", state="complete", present_bytes=64 * MiB),
    ]
    text = render_text(views)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[1:]] == [
        "web1", "xvda", "xvdb", "total", "db", "vda", "total",
    ]  # fmt: skip
    totals = [line for line in lines if line.startswith("  total ")]
    assert len(totals) == 2
    assert "50.0%" in totals[0] and "64 MiB / 128 MiB" in totals[0] and "60 MiB/s" in totals[0]
    assert " 15 " in totals[0] and totals[0].rstrip().endswith("0/2 complete")  # 12 + 3 faults
    assert "100.0%" in totals[1] and totals[1].rstrip().endswith("1/1 complete")
    total = domain_totals(views[:2])
    assert total.size_bytes == 128 * MiB and total.present_bytes == 64 * MiB
    assert total.eta_seconds == pytest.approx(64 * MiB / (22 * MiB))  # missing / summed rates
    assert total.reconnects == 1 and total.faults == 15


def test_explicit_state_directories_are_labelled_by_path() -> None:
    views = [DiskView(None, "xvda", Path("/srv/state/xvda"), make_record(), None, True)]
    text = render_text(views)
    assert row(text, "state/xvda")
    assert "total" not in text  # one disk without a domain needs no total
    deep = Path("/srv/state/a-rather-long-domain-name/and-its-disk")
    text = render_text([DiskView(None, "and-its-disk", deep, error="no status in it")])
    assert row(text, "…omain-name/and-its-disk").split() == ["…omain-name/and-its-disk", "error"]
    assert f"{deep}: no status in it" in text  # the note names the whole directory


# -- the command ------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli_main(["fetch-progress", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_policy(tmp_path: Path) -> Path:
    """Two postcopy domains (web1: xvda, xvdb; db: vda) and a precopy one, state under tmp."""
    policy = tmp_path / "domains.toml"
    policy.write_text(
        f"""
[defaults]
state_root = "{tmp_path}/state"
socket_dir = "{tmp_path}/run"
source = "nbd://127.0.0.1:10809"

[domains.web1]
mode = "postcopy"
[[domains.web1.disks]]
device = "xvda"
source_image = "/srv/web1-xvda.img"
[[domains.web1.disks]]
device = "xvdb"
source_image = "/srv/web1-xvdb.img"

[domains.db]
mode = "postcopy"
[[domains.db.disks]]
device = "vda"
source_image = "/srv/db-vda.img"

[domains.mail]
mode = "precopy"
[[domains.mail.disks]]
device = "vda"
source_image = "/srv/mail-vda.img"
"""
    )
    return policy


def state_dir(tmp_path: Path, domain: str, disk: str) -> Path:
    path = tmp_path / "state" / domain / disk
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_json_of_one_state_dir_is_the_record_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = make_record()
    write_status(tmp_path, record)
    code, out, err = run_cli(capsys, "--state-dir", str(tmp_path), "--json")
    assert (code, err) == (0, "")
    assert out == json.dumps(record, sort_keys=True) + "\n"


def test_one_state_dir_plain_output_is_the_one_line_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_status(tmp_path, make_record(eta_seconds=4.2))
    code, out, _ = run_cli(capsys, "--state-dir", str(tmp_path))
    assert code == 0
    assert out == (
        f"fetching: 31.2% present of {64 * MiB} bytes, {18 * MiB} transferred, "
        "7 demand fetches, eta 4s\n"
    )


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda d: None, "state directory {d} does not exist"),
        (lambda d: d.mkdir(), "no status in {d}"),
        (lambda d: (d / "status.json").mkdir(parents=True), "cannot read {d}/status.json"),
        (lambda d: d.mkdir() or (d / "status.json").write_text("{"), "is not a valid status"),
        (lambda d: d.mkdir() or (d / "status.json").write_bytes(b"\xff{}"), "is not a valid"),
    ],
    ids=["missing", "no-record", "unreadable", "garbage", "not-utf8"],
)
@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["text", "json"])
def test_unusable_state_dir_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prepare: Any, message: str,
    extra: list[str],
) -> None:  # fmt: skip
    directory = tmp_path / "state"
    prepare(directory)
    code, out, err = run_cli(capsys, "--state-dir", str(directory), *extra)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message.format(d=directory) in err
    assert err.startswith("postcopy fetch-progress: error: ")


def test_watch_refuses_a_missing_state_dir_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "--state-dir", str(tmp_path / "typo"), "--watch")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"state directory {tmp_path}/typo does not exist" in err


def test_default_shows_every_postcopy_disk_of_the_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = write_policy(tmp_path)
    write_status(state_dir(tmp_path, "web1", "xvda"), make_record())
    write_status(state_dir(tmp_path, "web1", "xvdb"), make_record(present_bytes=44 * MiB))
    write_status(state_dir(tmp_path, "db", "vda"), make_record(state="complete",
                                                               present_bytes=64 * MiB))  # fmt: skip
    monkeypatch.setenv("POSTCOPY_CONFIG", str(policy))  # the environment names the policy file
    code, out, err = run_cli(capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == [
        "web1", "xvda", "xvdb", "total", "db", "vda", "total",
    ]  # fmt: skip
    assert "mail" not in out  # precopy domains have nothing to show
    assert row(out, "xvdb").split()[1:3] == ["━━━━━━━━━━━━━╸", "68.7%"]


def test_domain_option_shows_only_that_domain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path)
    write_status(state_dir(tmp_path, "db", "vda"), make_record(present_bytes=32 * MiB))
    code, out, _ = run_cli(capsys, "--config", str(policy), "--domain", "db")
    assert code == 0
    assert "web1" not in out and "xvda" not in out
    assert "50.0%" in row(out, "vda") and "1 need attention" not in out


def test_domain_option_refuses_a_domain_that_is_not_postcopy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path)
    for name, why in (("mail", "has mode precopy"), ("nosuch", "is not listed")):
        code, out, err = run_cli(capsys, "--config", str(policy), "--domain", name)
        assert code == 2 and out == "" and err.count("\n") == 1
        assert f"domain {name!r} {why} in {policy}" in err


def test_no_postcopy_domains_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "domains.toml"
    policy.write_text('[domains.mail]\nmode = "shared"\n')
    code, _, err = run_cli(capsys, "--config", str(policy))
    assert code == 2 and f"no postcopy domains in {policy}" in err and err.count("\n") == 1


def test_missing_disk_is_an_error_row_and_the_exit_status_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path)
    write_status(state_dir(tmp_path, "web1", "xvda"), make_record())
    write_status(state_dir(tmp_path, "web1", "xvdb"), make_record())
    code, out, err = run_cli(capsys, "--config", str(policy))
    assert code == 2 and err == ""
    assert row(out, "vda").split() == ["vda", "error"]
    assert f"db/vda: state directory {tmp_path}/state/db/vda does not exist" in out
    assert "31.2%" in row(out, "xvda")  # the readable disks are still shown


def test_failed_or_stopped_disk_gives_exit_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_status(state_dir(tmp_path, "web1", "xvda"), make_record(pid=gone.pid))
    write_status(state_dir(tmp_path, "web1", "xvdb"), make_record())
    write_status(state_dir(tmp_path, "db", "vda"), make_record())
    code, out, _ = run_cli(capsys, "--config", str(policy))
    assert code == 1
    assert row(out, "xvda").rstrip().endswith("stopped")
    assert row(out, "xvdb").rstrip().endswith("fetching")
    write_status(state_dir(tmp_path, "web1", "xvda"), make_record(state="failed", error="boom"))
    code, out, _ = run_cli(capsys, "--config", str(policy), "--domain", "web1")
    assert code == 1 and "web1/xvda: failed: boom" in out
    # The one-record form keeps its old contract: exit 0, the state is in the output.
    code, out, _ = run_cli(capsys, "--state-dir", str(tmp_path / "state/web1/xvda"))
    assert code == 0 and out.startswith("failed: 31.2% present")


def test_json_of_several_disks_is_a_list_with_records_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path)
    xvda = make_record()
    write_status(state_dir(tmp_path, "web1", "xvda"), xvda)
    extra = tmp_path / "extra"
    extra.mkdir()
    extra_record = make_record(state="complete", present_bytes=64 * MiB)
    write_status(extra, extra_record)
    code, out, _ = run_cli(
        capsys, "--config", str(policy), "--domain", "web1", "--state-dir", str(extra), "--json"
    )
    assert code == 2  # web1/xvdb has no state directory
    document = json.loads(out)
    assert document == [
        {"domain": "web1", "disk": "xvda", "state_dir": f"{tmp_path}/state/web1/xvda",
         "writer_running": True, "record": xvda},
        {"domain": "web1", "disk": "xvdb", "state_dir": f"{tmp_path}/state/web1/xvdb",
         "writer_running": None,
         "error": f"state directory {tmp_path}/state/web1/xvdb does not exist"},
        {"domain": None, "disk": "extra", "state_dir": str(extra), "writer_running": True,
         "record": extra_record},
    ]  # fmt: skip


@pytest.mark.timeout(30)  # in-process: a watch that never ends must fail, not hang
def test_watch_ends_with_status_0_when_everything_is_already_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a", "b"):
        (tmp_path / "s" / name).mkdir(parents=True)
        write_status(tmp_path / "s" / name, make_record(state="complete", present_bytes=64 * MiB))
    args = ["--state-dir", str(tmp_path / "s/a"), "--state-dir", str(tmp_path / "s/b"), "--watch"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    assert "100.0%" in row(out, "s/a") and "100.0%" in row(out, "s/b")
    assert row(out, "total").rstrip().endswith("2/2 complete")


@pytest.mark.timeout(60)  # readline() on a silent watcher would block
def test_watch_json_waits_for_the_record_and_prints_a_line_per_refresh_until_complete(
    tmp_path: Path,
) -> None:
    command = [str(FETCH_PROGRESS), "--state-dir", str(tmp_path), "--watch", "--json",
               "--interval", "0.05"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=plain_env()) as watcher:
        try:
            assert watcher.stdout is not None
            # Receive has not written its first record yet: the watcher says so and waits.
            assert json.loads(watcher.stdout.readline()) == {
                "error": f"no status in {tmp_path} (is postcopy receive running?)"
            }
            write_status(tmp_path, make_record(present_bytes=0))
            while (line := json.loads(watcher.stdout.readline())).get("error"):
                pass
            assert line["present_bytes"] == 0
            write_status(tmp_path, make_record(state="complete", present_bytes=64 * MiB))
            assert watcher.wait(timeout=10) == 0
            lines = [json.loads(line) for line in watcher.stdout.read().splitlines()]
        finally:
            watcher.kill()
    assert lines and lines[-1]["state"] == "complete"
    assert all(line["state"] == "fetching" for line in lines[:-1])


# -- the live display on a pseudo-terminal --------------------------------------------------

ANSI_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def frames_of(raw: bytes) -> list[list[str]]:
    """Split what the live display drew into frames (each starts with the header line)."""
    text = ANSI_CONTROL.sub("", raw.decode("utf-8", "replace"))
    frames: list[list[str]] = []
    for line in re.split(r"[\r\n]+", text):
        if line.startswith("Disk "):
            frames.append([])
        elif frames:
            frames[-1].append(line)
    return frames


def bar_and_percent(frame: list[str], name: str) -> tuple[int, float] | None:
    """The filled bar cells and the percentage of a disk row in one frame."""
    for line in frame:
        match = re.match(rf"^  {name}\s+([━╸]*)\s+(\d+\.\d)%", line)
        if match:
            return len(match.group(1)), float(match.group(2))
    return None


@pytest.fixture
def pty_process() -> Iterator[Any]:
    """Start a command on a new pseudo-terminal (130x40); yields (start, read_available)."""
    started: list[tuple[subprocess.Popen[bytes], int]] = []

    def start(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 130, 0, 0))
        process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        started.append((process, master))
        return process, master

    try:
        yield start
    finally:
        for process, master in started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            os.close(master)


def read_pty(master: int, timeout: float) -> bytes:
    """What the terminal received within `timeout` seconds (b"" once the writer is gone)."""
    ready, _, _ = select.select([master], [], [], timeout)
    if not ready:
        return b""
    try:
        return os.read(master, 65536)
    except OSError:  # EIO: every process on the terminal has exited
        return b""


def plain_env() -> dict[str, str]:
    """The environment without what changes rich's output or the policy file looked up."""
    unwanted = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "POSTCOPY_CONFIG")
    return {name: value for name, value in os.environ.items() if name not in unwanted}


def terminal_env() -> dict[str, str]:
    env = plain_env()
    # NO_COLOR: rich then draws only the filled part of a bar, so the filled cells can be
    # counted in the text; everything else (cursor movement, redraws) is the real terminal path.
    env.update(TERM="xterm-256color", NO_COLOR="1")
    return env


def test_watch_on_a_terminal_draws_advancing_bars_until_all_complete(
    tmp_path: Path, pty_process: Any
) -> None:
    policy = write_policy(tmp_path)
    disks = {("web1", "xvda"): 1.0, ("web1", "xvdb"): 0.5, ("db", "vda"): 1.5}  # speeds
    dirs = {key: state_dir(tmp_path, *key) for key in disks}
    steps = 10
    for key in disks:
        write_status(dirs[key], make_record(present_bytes=0, updated_at=time.time()))
    process, master = pty_process([str(FETCH_PROGRESS), "--config", str(policy), "--watch"],
                                  terminal_env())  # fmt: skip
    raw = b""
    deadline = time.monotonic() + 30
    while not frames_of(raw) and time.monotonic() < deadline:  # the first frame, at 0%
        raw += read_pty(master, 0.1)
    # Advance the records over ~2 s: at step i a disk has min(1, i * speed / steps) present;
    # the last step completes every disk.
    for step in range(1, steps + 1):
        step_end = time.monotonic() + 0.2
        while (left := step_end - time.monotonic()) > 0:
            raw += read_pty(master, left)
        for key, speed in disks.items():
            fraction = 1.0 if step == steps else min(1.0, step * speed / steps)
            write_status(dirs[key], make_record(
                state="complete" if fraction == 1.0 else "fetching",
                present_bytes=int(fraction * 64 * MiB),
                updated_at=time.time()))  # fmt: skip
        assert process.poll() is None, raw.decode(errors="replace")  # not before all complete
    while process.poll() is None and time.monotonic() < deadline:
        raw += read_pty(master, 0.1)
    while chunk := read_pty(master, 0.2):
        raw += chunk
    assert process.wait(timeout=1) == 0, raw.decode(errors="replace")
    assert b"\x1b[1A" in raw  # redrawn in place (cursor up), not scrolled
    frames = frames_of(raw)
    assert len(frames) >= 6, raw.decode(errors="replace")
    for name in ("xvda", "xvdb", "vda"):
        seen = [found for frame in frames if (found := bar_and_percent(frame, name))]
        bars = [bar for bar, _ in seen]
        percents = [percent for _, percent in seen]
        assert bars == sorted(bars) and percents == sorted(percents), (name, seen)
        assert len(set(percents)) >= 3, (name, seen)  # it moved while we watched
        assert percents[0] < 50 and bars[0] < BAR_WIDTH / 2, (name, seen)
        assert (bars[-1], percents[-1]) == (BAR_WIDTH, 100.0), (name, seen)
    final = frames[-1]
    assert all(line.rstrip().endswith("complete") for line in final if line.startswith("  "))
    assert [line.split()[-2:] for line in final if line.startswith("  total")] == [
        ["2/2", "complete"], ["1/1", "complete"],
    ]  # fmt: skip


@pytest.mark.parametrize(("signal_number", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_watch_on_a_terminal_stops_quietly_on_ctrl_c_or_sigterm(
    tmp_path: Path, pty_process: Any, signal_number: int, status: int
) -> None:
    write_status(tmp_path, make_record())
    process, master = pty_process(
        [str(FETCH_PROGRESS), "--state-dir", str(tmp_path), "--watch"], terminal_env()
    )
    raw = b""
    deadline = time.monotonic() + 15
    while b"fetching" not in raw and time.monotonic() < deadline:
        raw += read_pty(master, 0.1)
    assert b"fetching" in raw
    assert b"\x1b[?25l" in raw  # the live display hides the cursor while it draws
    os.kill(process.pid, signal_number)
    assert process.wait(timeout=10) == status
    while chunk := read_pty(master, 0.2):
        raw += chunk
    assert b"Traceback" not in raw and b"KeyboardInterrupt" not in raw
    assert raw.rstrip(b"\r\n").endswith(b"\x1b[?25h")  # ... and shows it again at the end
