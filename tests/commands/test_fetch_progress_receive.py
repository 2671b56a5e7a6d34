"""`fetch-progress` against a real `postcopy receive` (nbdkit + the plugin) fed by `postcopy serve`.

The receive runs with `--wait-for-source`, so nothing is kept until the test declares the source
frozen: the display is seen at 0% first, then the drain (slowed by serve's read-delay test hook
to ~2 s for a 48 MiB image) is watched on a pseudo-terminal until the disk is complete.  The
disks come from a policy file whose state root holds the receive's state directory, so the
no-argument form of `fetch-progress` is what is exercised.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postcopy.destination.status import read_status
from postcopy.progress_display import BAR_WIDTH
from tests.commands.test_fetch_progress import (
    FETCH_PROGRESS,
    bar_and_percent,
    frames_of,
    plain_env,
    pty_process,  # noqa: F401  (a fixture)
    read_pty,
    terminal_env,
)
from tests.peers import require_tools, running_receive_command, running_serve, sparse_test_image

MiB = 1 << 20
IMAGE_SIZE = 48 * MiB
SERVE_READ_DELAY = 0.4  # seconds per source read: makes the drain last long enough to watch


def write_policy(root: Path, image: Path, source_uri: str) -> Path:
    policy = root / "domains.toml"
    policy.write_text(
        f"""
[defaults]
state_root = "{root}/state"
socket_dir = "{root}/run"
source = "{source_uri}"

[domains.guest1]
mode = "postcopy"
[[domains.guest1.disks]]
device = "vda"
source_image = "{image}"
dest_file = "{root}/dest.img"
"""
    )
    return policy


@contextlib.contextmanager
def running_receive(source_uri: str, dest: Path, state_dir: Path, socket: Path) -> Iterator[Any]:
    """`postcopy receive --wait-for-source`; returns once it printed its URI; stopped at the end."""
    command = [
        sys.executable, "-m", "postcopy.cli", "receive", "--source", source_uri,
        "--dest", str(dest), "--state-dir", str(state_dir), "--socket", str(socket),
        "--wait-for-source",
    ]  # fmt: skip
    with running_receive_command(command, dest.with_suffix(".receive.log")) as (process, _):
        yield process


def fetch_progress_json(*args: str) -> tuple[int, Any]:
    result = subprocess.run(
        [str(FETCH_PROGRESS), *args, "--json"], capture_output=True, text=True, timeout=30,
        env=plain_env(),
    )  # fmt: skip
    return result.returncode, json.loads(result.stdout) if result.stdout else result.stderr


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_watch_follows_a_real_receive_to_completion(tmp_path: Path, pty_process: Any) -> None:  # noqa: F811
    require_tools("nbdkit")
    image = tmp_path / "source.img"
    sparse_test_image(image, IMAGE_SIZE, seed=6, data_fraction=0.6)
    state_dir = tmp_path / "state" / "guest1" / "vda"
    with running_serve(image, read_delay=SERVE_READ_DELAY) as serve:
        policy = write_policy(tmp_path, image, serve.uri)
        dest = tmp_path / "dest.img"
        with running_receive(serve.uri, dest, state_dir, tmp_path / "d.sock") as receiver:
            wait_for(lambda: (state_dir / "status.json").exists(), 15, "the first status record")
            # --json for tools, against the running receive: the list form (from the policy) and
            # the record itself (one --state-dir) agree.
            code, listed = fetch_progress_json("--config", str(policy))
            assert code == 0, listed
            assert [(e["domain"], e["disk"], e["state_dir"]) for e in listed] == [
                ("guest1", "vda", str(state_dir))
            ]
            record = listed[0]["record"]
            assert listed[0]["writer_running"] is True
            assert record["state"] == "waiting-for-source"
            assert record["size_bytes"] == IMAGE_SIZE and record["present_bytes"] == 0
            code, single = fetch_progress_json("--state-dir", str(state_dir))
            assert code == 0 and single["state"] == "waiting-for-source"
            assert single["pid"] == record["pid"]

            watcher, master = pty_process(
                [str(FETCH_PROGRESS), "--config", str(policy), "--watch"], terminal_env()
            )
            raw = b""
            deadline = time.monotonic() + 60
            while b"waiting for source" not in raw and time.monotonic() < deadline:
                raw += read_pty(master, 0.1)
            assert b"waiting for source" in raw, raw.decode(errors="replace")
            frozen = subprocess.run(
                [sys.executable, "-m", "postcopy.cli", "source-frozen", "--state-dir",
                 str(state_dir)], capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert frozen.returncode == 0, frozen.stderr
            while watcher.poll() is None and time.monotonic() < deadline:
                raw += read_pty(master, 0.1)
            while chunk := read_pty(master, 0.2):
                raw += chunk
            assert watcher.wait(timeout=1) == 0, raw.decode(errors="replace")
            assert receiver.poll() is None  # the destination keeps serving after completion

            seen = [found for frame in frames_of(raw) if (found := bar_and_percent(frame, "vda"))]
            percents = [percent for _, percent in seen]
            bars = [bar for bar, _ in seen]
            assert percents == sorted(percents) and bars == sorted(bars), seen
            assert percents[0] == 0.0 and bars[0] == 0, seen
            assert len({p for p in percents if 0 < p < 100}) >= 2, seen  # seen on its way
            assert (bars[-1], percents[-1]) == (BAR_WIDTH, 100.0), seen
            final = frames_of(raw)[-1]
            assert [line.split()[-1] for line in final if line.startswith("  ")] == [
                "complete",
                "complete",
            ]  # fmt: skip  (the disk and guest1's total)

            code, done = fetch_progress_json("--state-dir", str(state_dir))
            assert code == 0 and done["state"] == "complete"
            assert done["present_bytes"] == IMAGE_SIZE and done["missing_bytes"] == 0
        assert filecmp.cmp(dest, image, shallow=False)  # what was watched is the real copy


@pytest.mark.timeout(120)
def test_a_killed_receive_shows_as_stopped(tmp_path: Path) -> None:
    require_tools("nbdkit")
    image = tmp_path / "source.img"
    sparse_test_image(image, 8 * MiB, seed=7)
    state_dir = tmp_path / "state" / "guest1" / "vda"
    with running_serve(image) as serve:
        policy = write_policy(tmp_path, image, serve.uri)
        with running_receive(serve.uri, tmp_path / "dest.img", state_dir, tmp_path / "d.sock"):
            wait_for(lambda: (state_dir / "status.json").exists(), 15, "the first status record")
            writer = read_status(state_dir)["pid"]
            os.kill(writer, signal.SIGKILL)
            wait_for(lambda: not Path(f"/proc/{writer}").exists(), 10, "the writer to go")
            result = subprocess.run(
                [str(FETCH_PROGRESS), "--config", str(policy)],
                capture_output=True, text=True, timeout=30, env=plain_env(),
            )  # fmt: skip
            assert result.returncode == 1, result
            assert "stopped" in result.stdout.splitlines()[2], result.stdout  # the vda row
            assert f"the writer (pid {writer}) is gone" in result.stdout
