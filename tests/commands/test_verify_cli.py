"""`postcopy digest` and `postcopy verify` as an operator (or `postcopy migrate`) runs them: real
processes, the digest file passed as a file and through a pipe, exit statuses 0 / 1 / 2, and every
bad input answered with one line that changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from postcopy.source.digest import compute_digests
from tests.destination.test_receive import running_receive
from tests.destination.test_state_lock import fingerprint
from tests.destination.test_verify import CHUNK, MiB, make_destination, overwrite
from tests.peers import running_serve, sparse_test_image

POSTCOPY = [sys.executable, "-m", "postcopy.cli"]


def postcopy(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*POSTCOPY, *args], input=stdin, capture_output=True, timeout=120)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    image = tmp_path / "source.img"
    sparse_test_image(image, 6 * MiB + 999, seed=5, max_run=MiB)
    return image


def test_digest_file_then_verify_matches(tmp_path: Path, source: Path) -> None:
    state_dir, dest = make_destination(tmp_path, source)
    digest_file = tmp_path / "a.digests"
    made = postcopy("digest", "--chunk-size", "64K", "--output", str(digest_file), str(source))
    assert made.returncode == 0, made.stderr
    assert made.stdout == b""
    assert digest_file.read_bytes() == compute_digests(source, CHUNK).encode()
    assert b"97 chunks of 64 KiB" in made.stderr
    checked = postcopy("verify", "--state-dir", str(state_dir), "--digests", str(digest_file),
                       "--dest", str(dest))  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.decode().startswith("postcopy verify: match: ")
    assert "97 of 97 chunks compared" in checked.stdout.decode()


def test_digests_through_a_pipe_and_a_json_report_of_a_mismatch(
    tmp_path: Path, source: Path
) -> None:
    state_dir, dest = make_destination(tmp_path, source, guest_written=(2,))
    overwrite(dest, 2 * CHUNK, b"the guest's own")
    overwrite(dest, 90 * CHUNK + 5, b"bit rot")
    overwrite(dest, 96 * CHUNK, b"tail rot")  # the short last chunk
    digest = subprocess.Popen([*POSTCOPY, "digest", str(source)], stdout=subprocess.PIPE)
    assert digest.stdout is not None
    checked = subprocess.run(
        [*POSTCOPY, "verify", "--state-dir", str(state_dir), "--digests", "-", "--dest",
         str(dest), "--json"],
        stdin=digest.stdout, capture_output=True, timeout=120,
    )  # fmt: skip
    digest.stdout.close()
    assert digest.wait(60) == 0
    assert checked.returncode == 1, checked.stderr
    record = json.loads(checked.stdout)
    assert record["result"] == "mismatch"
    assert record["mismatch_offsets"] == [90 * CHUNK, 96 * CHUNK]
    assert record["mismatch_count"] == 2 and record["mismatch_offsets_truncated"] is False
    assert record["chunks_skipped_guest_written"] == 1 and record["chunks_compared"] == 96


def test_a_mismatch_names_at_most_n_offsets_and_the_count(tmp_path: Path, source: Path) -> None:
    state_dir, dest = make_destination(tmp_path, source)
    for chunk in (1, 3, 5, 7):
        overwrite(dest, chunk * CHUNK, b"x")
    digest_file = tmp_path / "a.digests"
    digest_file.write_bytes(compute_digests(source, CHUNK).encode())
    checked = postcopy("verify", "--state-dir", str(state_dir), "--digests", str(digest_file),
                       "--dest", str(dest), "--max-listed", "2")  # fmt: skip
    assert checked.returncode == 1
    line = checked.stdout.decode()
    assert "MISMATCH: 4 chunk(s)" in line and "0x10000, 0x30000 and 2 more" in line
    assert line.count("\n") == 1


def bad_inputs(tmp_path: Path, source: Path, state_dir: Path, dest: Path) -> list[list[str]]:
    good = compute_digests(source, CHUNK).encode()
    files = {
        "truncated": good[:-5],
        "corrupt": good[:60] + bytes([good[60] ^ 4]) + good[61:],
        "other-chunk": compute_digests(source, 128 * 1024).encode(),
        "empty": b"",
        "good": good,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    verify = ["verify", "--state-dir", str(state_dir), "--dest", str(dest), "--digests"]
    return [
        [*verify, str(tmp_path / "truncated")],
        [*verify, str(tmp_path / "corrupt")],
        [*verify, str(tmp_path / "other-chunk")],
        [*verify, str(tmp_path / "empty")],
        [*verify, str(tmp_path / "absent")],
        [*verify, str(tmp_path / "corrupt"), "--max-listed", "-1"],
        ["verify", "--state-dir", str(tmp_path / "nowhere"), "--digests", str(tmp_path / "good")],
        ["digest", "--chunk-size", "3K", "-o", str(tmp_path / "out"), str(source)],
        ["digest", "--chunk-size", "lots", "-o", str(tmp_path / "out"), str(source)],
        ["digest", "-o", str(tmp_path / "out"), str(tmp_path / "absent.img")],
        ["digest", "-o", str(tmp_path / "no" / "such" / "dir"), str(source)],
    ]


def test_bad_inputs_are_one_line_errors_with_exit_2_that_change_nothing(
    tmp_path: Path, source: Path
) -> None:
    state_dir, dest = make_destination(tmp_path, source)
    cases = bad_inputs(tmp_path, source, state_dir, dest)
    before = fingerprint(tmp_path)
    for args in cases:
        result = postcopy(*args)
        stderr = result.stderr.decode()
        assert result.returncode == 2, (args, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("postcopy"), (args, stderr)
        assert result.stdout == b"", args
    assert fingerprint(tmp_path) == before
    assert not (tmp_path / "out").exists()


def test_verify_of_a_disk_that_is_not_complete_is_exit_2(tmp_path: Path, source: Path) -> None:
    state_dir, dest = make_destination(tmp_path, source, missing=(4,))
    digest_file = tmp_path / "a.digests"
    digest_file.write_bytes(compute_digests(source, CHUNK).encode())
    before = fingerprint(state_dir, dest)
    result = postcopy("verify", "--state-dir", str(state_dir), "--digests", str(digest_file),
                      "--dest", str(dest))  # fmt: skip
    assert result.returncode == 2
    assert b"not durably present yet (1 chunks)" in result.stderr
    as_json = postcopy("verify", "--state-dir", str(state_dir), "--digests", str(digest_file),
                       "--dest", str(dest), "--json")  # fmt: skip
    assert as_json.returncode == 2 and as_json.stderr.count(b"\n") == 1
    record = json.loads(as_json.stdout)
    assert record["result"] == "error" and record["kind"] == "not-complete"
    assert fingerprint(state_dir, dest) == before


def test_digest_refuses_to_write_binary_to_a_terminal(tmp_path: Path, source: Path) -> None:
    leader, follower = os.openpty()
    try:
        result = subprocess.run([*POSTCOPY, "digest", str(source)], stdout=follower,
                                stderr=subprocess.PIPE, timeout=60)  # fmt: skip
    finally:
        os.close(follower)
        os.close(leader)
    assert result.returncode == 2 and b"binary" in result.stderr


def test_a_real_migration_verifies_with_the_commands_then_a_corrupted_chunk_is_exit_1(
    tmp_path: Path,
) -> None:
    """serve -> receive, then `postcopy digest` on A's image piped into `postcopy verify` on B's
    state directory while receive still runs (the destination comes from its status record)."""
    image = tmp_path / "a.img"
    sparse_test_image(image, 16 * MiB, seed=21)
    workdir = tmp_path / "b"
    workdir.mkdir()
    with running_serve(image) as serve, running_receive(serve.uri, workdir) as receiver:
        receiver.wait_complete(timeout=60)
        digest_file = tmp_path / "a.digests"
        assert postcopy("digest", "-o", str(digest_file), str(image)).returncode == 0
        verify = ["verify", "--state-dir", str(receiver.state_dir), "--digests", "-"]
        matched = postcopy(*verify, stdin=digest_file.read_bytes())
        assert matched.returncode == 0, matched.stderr
        assert b"match: " in matched.stdout
        overwrite(receiver.dest, 100 * CHUNK + 3, b"\x99")
        mismatched = postcopy(*verify, "--json", stdin=digest_file.read_bytes())
        assert mismatched.returncode == 1, mismatched.stderr
        record = json.loads(mismatched.stdout)
        assert record["mismatch_offsets"] == [100 * CHUNK] and record["receive_running"]
