"""Source outages against real processes: `postcopy serve` killed, gone for longer than the
window, or stalled (SIGSTOP: TCP alive, no replies), while a guest works on `postcopy receive`.

Each test checks what the guest sees (fio's crc32c verification, libnbd errnos, bytes read back),
what `fetch-progress` would show (the status record: state, source_down_seconds, reconnects,
stalls), and that the finished disk equals the source outside the regions the guest wrote.
Timings (reconnect and recovery) are printed; run with `-s` to see them.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import nbd

from tests.destination.conftest import EngineFactory
from tests.destination.test_receive import (
    CHUNK,
    MiB,
    assert_equal_outside,
    connect,
    read_range,
    running_receive,
    seconds_until_eio,
)
from tests.fakes import FakeSource
from tests.peers import require_tools, running_serve, sparse_test_image


def fio_command(uri: str, offset: int, size: int) -> list[str]:
    return [
        "fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=4k",
        "--iodepth=8", f"--offset={offset}", f"--size={size}", "--verify=crc32c",
        "--verify_fatal=1", "--verify_state_save=0", "--do_verify=1", "--randrepeat=0",
        "--output-format=json",
    ]  # fmt: skip


def read_missing_in_thread(
    uri: str, offset: int, length: int
) -> tuple[threading.Thread, list[Any]]:
    """A guest read on its own connection and thread (it may wait for the source)."""
    result: list[Any] = []

    def run() -> None:
        handle = connect(uri)
        try:
            result.append(handle.pread(length, offset))
        except nbd.Error as exc:
            result.append(exc)
        finally:
            handle.shutdown()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_source_killed_mid_drain_and_back_3s_later_fio_verifies_and_drain_completes(
    tmp_path: Path,
) -> None:
    require_tools("fio")
    image = tmp_path / "source.img"
    sparse_test_image(image, 64 * MiB, seed=21, data_fraction=0.8)
    socket_path = str(tmp_path / "source.sock")
    uri = f"nbd+unix:///disk?socket={socket_path}"
    fio_offset, fio_size = 40 * MiB, 16 * MiB
    with contextlib.ExitStack() as stack:
        serve = stack.enter_context(
            running_serve(f"disk={image}", socket_path=socket_path, read_delay=0.03)
        )
        receiver = stack.enter_context(
            running_receive(uri, tmp_path, "--source-timeout", "30", "--bandwidth", "16M")
        )
        fio = subprocess.Popen(
            fio_command(receiver.uri, fio_offset, fio_size),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        stack.callback(lambda: fio.poll() is None and fio.kill())
        receiver.wait_status(lambda r: r["transferred_bytes"] > 4 * MiB)
        serve.process.kill()  # the source host dies with fetches in flight
        serve.process.wait(10)
        killed_at = time.monotonic()
        assert fio.poll() is None, "fio finished before the outage: the test proves nothing"
        record = receiver.wait_status(lambda r: r["state"] == "source-unreachable")
        # a guest read of data the drain has not reached waits for the source
        waiting_reader, waited = read_missing_in_thread(receiver.uri, 60 * MiB, 8192)
        time.sleep(max(0.0, 3.0 - (time.monotonic() - killed_at)))
        record = receiver.status()
        assert record["state"] == "source-unreachable" and record["source_down_seconds"] >= 2
        assert record["error"]
        with running_serve(f"disk={image}", socket_path=socket_path, read_delay=0.03):
            restarted_at = time.monotonic()
            waiting_reader.join(30)
            read_recovered = time.monotonic() - restarted_at
            assert waited == [read_range(image, 60 * MiB, 8192)]
            record = receiver.wait_status(
                lambda r: r["state"] == "fetching" and r["reconnects"] >= 1, timeout=30
            )
            status_recovered = time.monotonic() - restarted_at
            out, err = fio.communicate(timeout=90)
            assert fio.returncode == 0, err.decode()[-2000:]
            job = json.loads(out[out.index(b"{"):])["jobs"][0]
            assert job["error"] == 0
            assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
            record = receiver.wait_complete(timeout=60)
        print(
            f"\nsource back -> waiting guest read answered in {read_recovered:.2f}s; "
            f"status fetching again in {status_recovered:.2f}s; reconnects {record['reconnects']}"
        )
        assert read_recovered < 3.0  # back-off is at most 1 s, a waiting read retries at once
        assert record["reconnects"] >= 1
    assert_equal_outside(receiver.dest, image, [(fio_offset, fio_size)])


def test_source_gone_past_the_window_fails_missing_reads_with_eio_then_recovers(
    tmp_path: Path,
) -> None:
    image = tmp_path / "source.img"
    sparse_test_image(image, 32 * MiB, seed=22, data_fraction=1.0)
    socket_path = str(tmp_path / "source.sock")
    uri = f"nbd+unix:///disk?socket={socket_path}"
    written = b"W" * 5000
    with contextlib.ExitStack() as stack:
        serve = stack.enter_context(
            running_serve(f"disk={image}", socket_path=socket_path, read_delay=0.5)
        )
        receiver = stack.enter_context(
            running_receive(uri, tmp_path, "--source-timeout", "2")
        )
        handle = connect(receiver.uri)
        assert handle.pread(CHUNK, 0) == read_range(image, 0, CHUNK)  # now present
        serve.process.kill()
        serve.process.wait(10)
        waited = seconds_until_eio(handle, 4096, 30 * MiB)  # missing data, the source gone
        assert 1.5 < waited < 4.0, waited  # the 2 s window
        # past the window, reads of missing data fail at once (a short grace, not the window)
        assert seconds_until_eio(handle, 4096, 29 * MiB) < 1.8
        # present data and guest writes keep working
        assert handle.pread(CHUNK, 0) == read_range(image, 0, CHUNK)
        handle.pwrite(written, 100)  # inside a present chunk
        handle.pwrite(b"Z" * CHUNK, 20 * MiB)  # a whole missing chunk: no fetch needed
        handle.flush()
        assert handle.pread(CHUNK, 20 * MiB) == b"Z" * CHUNK
        record = receiver.wait_status(lambda r: r["source_down_seconds"] > 2.5)
        assert record["state"] == "source-unreachable" and record["error"]
        with running_serve(f"disk={image}", socket_path=socket_path):
            restarted_at = time.monotonic()
            assert handle.pread(4096, 30 * MiB) == read_range(image, 30 * MiB, 4096)
            recovered = time.monotonic() - restarted_at
            record = receiver.wait_complete(timeout=60)
        print(f"\nsource back after the window: first missing read served in {recovered:.2f}s")
        assert handle.pread(len(written), 100) == written
        handle.shutdown()
        assert record["reconnects"] >= 1
    assert_equal_outside(receiver.dest, image, [(100, len(written)), (20 * MiB, CHUNK)])


def test_stalled_source_is_detected_by_the_request_deadline_and_recovered(
    tmp_path: Path,
) -> None:
    image = tmp_path / "source.img"
    sparse_test_image(image, 32 * MiB, seed=23, data_fraction=1.0)
    socket_path = str(tmp_path / "source.sock")
    uri = f"nbd+unix:///disk?socket={socket_path}"
    with contextlib.ExitStack() as stack:
        serve = stack.enter_context(
            running_serve(f"disk={image}", socket_path=socket_path, read_delay=0.02)
        )
        stack.callback(lambda: serve.process.send_signal(signal.SIGCONT))
        receiver = stack.enter_context(
            running_receive(uri, tmp_path, "--request-timeout", "1", "--bandwidth", "8M")
        )
        handle = connect(receiver.uri)
        assert handle.pread(CHUNK, 0) == read_range(image, 0, CHUNK)  # now present
        receiver.wait_status(lambda r: r["drain_bytes"] > 0)
        serve.process.send_signal(signal.SIGSTOP)  # TCP alive, nothing answers
        stopped_at = time.monotonic()
        reader, result = read_missing_in_thread(receiver.uri, 28 * MiB, 8192)
        record = receiver.wait_status(lambda r: r["stalls"] >= 1, timeout=10)
        detected = time.monotonic() - stopped_at
        record = receiver.wait_status(lambda r: r["state"] == "source-unreachable", timeout=10)
        # down since the stall began (the request deadline ago), not since it was noticed
        assert record["source_down_seconds"] >= 1.0, record
        assert handle.pread(CHUNK, 0) == read_range(image, 0, CHUNK)  # present data served
        time.sleep(0.5)
        assert reader.is_alive()  # the guest read waits for the source, it is not lost
        serve.process.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        reader.join(30)
        recovered = time.monotonic() - resumed_at
        assert result == [read_range(image, 28 * MiB, 8192)]
        record = receiver.wait_complete(timeout=60)
        handle.shutdown()
        print(f"\nstall detected after {detected:.2f}s; guest read answered {recovered:.2f}s "
              f"after SIGCONT; stalls {record['stalls']}, reconnects {record['reconnects']}")
        assert detected < 4.0
        assert record["reconnects"] >= 1
    assert_equal_outside(receiver.dest, image, [])


def test_fetch_pending_on_a_stalled_connection_is_resent_on_the_next_one(
    make_engine: EngineFactory,
) -> None:
    """In-process: the source accepts a read and never answers; the request deadline drops the
    connection, the fetch is sent again on a new one, and the guest's read completes once the
    source answers again.  Present data is served meanwhile."""
    data = bytes(range(256)) * (16 * MiB // 256)
    source = FakeSource(data)
    engine = make_engine(source, chunk_size=CHUNK, request_timeout=0.3, sync_interval=1.0)
    try:
        first = bytearray(CHUNK)
        engine.pread_into(memoryview(first), 0)
        source.pause()  # from now on reads are accepted and not answered
        result: list[Any] = []

        def guest_read() -> None:
            buf = bytearray(4096)
            engine.pread_into(memoryview(buf), 5 * MiB)
            result.append(bytes(buf))

        reader = threading.Thread(target=guest_read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 5
        while engine.statistics()["stalls"] < 2:  # dropped, re-sent, dropped again
            assert time.monotonic() < deadline, engine.statistics()
            present = bytearray(CHUNK)
            engine.pread_into(memoryview(present), 0)
            assert present == first
            time.sleep(0.02)
        assert reader.is_alive()
        source.resume()
        reader.join(5)
        assert result == [data[5 * MiB:5 * MiB + 4096]]
        sent = [request for request in source.read_requests if request[0] == 5 * MiB]
        assert len(sent) >= 3  # the same fetch, sent on three connections
        record = engine.statistics()
        assert record["reconnects"] >= 2 and record["state"] == "fetching"
    finally:
        source.resume()  # before the fixture stops the engine
