"""The nbdkit plugin's own promises, seen by real clients: honest extents, zero and trim that punch
holes (the local file stays sparse), errors with a real errno while the source is down."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from postcopy.destination.receive import PLUGIN_PATH, plugin_environment
from tests.destination.test_receive import (
    CHUNK,
    MiB,
    allocated_bytes,
    connect,
    read_range,
    running_receive,
    seconds_until_eio,
)
from tests.peers import file_extents, require_tools, running_serve, sparse_test_image


def nbdinfo_map(uri: str) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) runs as `nbdinfo --map` reports base:allocation."""
    result = subprocess.run(
        ["nbdinfo", "--map", "--json", uri], capture_output=True, text=True, timeout=30,
        check=True,
    )  # fmt: skip
    runs: list[tuple[int, int, bool]] = []
    for entry in json.loads(result.stdout):
        is_data = not entry["type"] & 1
        offset, length = entry["offset"], entry["length"]
        if runs and runs[-1][2] == is_data and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + length, is_data)
        else:
            runs.append((offset, length, is_data))
    return runs


def test_extents_zero_and_trim_keep_the_local_file_sparse(tmp_path: Path) -> None:
    require_tools("nbdinfo", "qemu-img")
    image = tmp_path / "source.img"
    data_runs = sparse_test_image(image, 64 * MiB, seed=11, data_fraction=0.5)
    data_bytes = sum(length for _, length in data_runs)
    with running_serve(f"disk={image}") as serve, running_receive(
        serve.export_uri("disk"), tmp_path
    ) as receiver:
        receiver.wait_complete()
        # honest extents: the local allocation, which mirrors the source's holes
        assert nbdinfo_map(receiver.uri) == file_extents(image)
        allocated = allocated_bytes(receiver.dest)
        assert data_bytes <= allocated <= data_bytes + CHUNK  # (plus file system metadata)
        handle = connect(receiver.uri)
        first_offset, first_length = data_runs[0]
        handle.zero(first_length, first_offset)  # write-zeroes, holes allowed: punched
        assert handle.pread(first_length, first_offset) == bytes(first_length)
        assert allocated_bytes(receiver.dest) <= allocated - first_length
        second_offset, second_length = data_runs[1]
        handle.trim(2 * CHUNK, second_offset)
        assert allocated_bytes(receiver.dest) <= allocated - first_length - 2 * CHUNK
        handle.flush()
        handle.shutdown()
        # qemu-img writing an all-zero image into the disk leaves the local file empty
        zeros = tmp_path / "zeros.img"
        zeros.write_bytes(b"")
        subprocess.run(["truncate", "-s", str(64 * MiB), str(zeros)], check=True)
        subprocess.run(
            ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(zeros), receiver.uri],
            check=True, timeout=60,
        )  # fmt: skip
        assert allocated_bytes(receiver.dest) <= CHUNK
        assert nbdinfo_map(receiver.uri) == [(0, 64 * MiB, False)]
    assert read_range(receiver.dest, 0, 64 * MiB) == bytes(64 * MiB)


def test_missing_data_fails_with_eio_while_source_is_down(tmp_path: Path) -> None:
    image = tmp_path / "source.img"
    sparse_test_image(image, 64 * MiB, seed=12, data_fraction=1.0)
    # a slow source keeps most of the disk missing when it goes away
    with running_serve(f"disk={image}", read_delay=1.0) as serve, running_receive(
        serve.export_uri("disk"), tmp_path, "--unreachable-timeout", "0.5"
    ) as receiver:
        handle = connect(receiver.uri)
        handle.pwrite(b"P" * CHUNK, 40 * MiB)  # a whole chunk: present without a fetch
        serve.process.terminate()
        serve.process.wait(10)
        assert 0.4 < seconds_until_eio(handle, 4096, 50 * MiB) < 5  # missing, the source down
        assert handle.pread(CHUNK, 40 * MiB) == b"P" * CHUNK  # present data still served
        record = receiver.wait_status(lambda r: r["state"] == "source-unreachable")
        assert record["source_down_seconds"] > 0 and record["error"]
        handle.shutdown()


def test_nbdkit_refuses_a_bad_parameter_before_listening_naming_its_key(tmp_path: Path) -> None:
    """The plugin reads its parameters with the settings contract: a value it cannot read, or a
    key it does not know, stops nbdkit before it listens, and the message names the key."""
    dest, state, sock = tmp_path / "d.img", tmp_path / "state", tmp_path / "p.sock"
    dest.write_bytes(bytes(CHUNK))
    state.mkdir()
    source = f"nbd+unix:///?socket={tmp_path}/none.sock"
    base = [f"source={source}", f"dest={dest}", f"state_dir={state}"]
    for extra, expected in [
        ("unreachable_timeout=soon", "SettingError: source_timeout: 'soon' is not a number of"),
        ("chunk_size=48K", "SettingError: chunk_size: chunk size 49152 must be a power of two"),
        ("bogus=1", "SettingError: unknown parameter 'bogus' (known: source, dest, state_dir,"),
    ]:
        result = subprocess.run(
            ["nbdkit", "-f", "-U", str(sock), "python", str(PLUGIN_PATH), *base, extra],
            capture_output=True, text=True, timeout=60, env=plugin_environment(),
        )  # fmt: skip
        assert result.returncode != 0, result.stderr
        assert expected in result.stderr, result.stderr
        assert not sock.exists()
    assert list(state.iterdir()) == []  # refused before the state directory was touched
