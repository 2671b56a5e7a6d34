"""During a source outage, requests waiting for the source never stall the rest of their
connection: reads of PRESENT data and whole-chunk writes on the same connection are answered at
once, however many reads of missing data and sub-chunk writes into missing chunks wait.

nbdkit reads a connection's next request only when one of its worker threads is free, and a
request that waits for the source holds its thread (up to `--source-timeout`).  So `postcopy
receive` runs as many threads per connection as a client keeps requests in flight (QEMU at most
16, the Linux kernel's nbd driver 128).  Each test kills `postcopy serve`, keeps N misses and N
sub-chunk writes into MISSING chunks in flight on one libnbd connection (its aio API), then sends
a read of a PRESENT chunk and a whole-chunk write into a MISSING chunk behind them: both must be
answered within a second, while every waiting request is still waiting.  Then the source comes
back; every waiting request completes, and each byte reads back as the source's or the guest's.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import nbd
import pytest

from postcopy.destination.blockmap import LIVE_MAP_FILENAME, PRESENT
from tests.destination.test_receive import CHUNK, MiB, read_range, running_receive
from tests.peers import running_serve, sparse_test_image

SIZE = 32 * MiB
SOURCE_TIMEOUT = 60  # misses wait (and hold their nbdkit thread) for the whole test
ANSWER_WITHIN = 1.0


def wait_done(handle: nbd.NBD, cookies: list[int], timeout: float) -> bool:
    """Poll until every command in `cookies` completed (raising if one failed), or time out."""
    deadline = time.monotonic() + timeout
    pending = list(cookies)
    while pending:
        pending = [cookie for cookie in pending if not handle.aio_command_completed(cookie)]
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        handle.poll(max(1, int(remaining * 1000)))
    return not pending


@pytest.mark.parametrize("waiting", [8, 60])
def test_present_reads_and_whole_chunk_writes_go_on_behind_waiting_requests(
    tmp_path: Path, waiting: int
) -> None:
    image = tmp_path / "source.img"
    sparse_test_image(image, SIZE, seed=31, data_fraction=1.0)
    socket_path = str(tmp_path / "source.sock")
    uri = f"nbd+unix:///disk?socket={socket_path}"
    with contextlib.ExitStack() as stack:
        serve = stack.enter_context(running_serve(f"disk={image}", socket_path=socket_path))
        receiver = stack.enter_context(
            running_receive(
                uri, tmp_path, "--source-timeout", str(SOURCE_TIMEOUT), "--bandwidth", "64K"
            )
        )
        handle = nbd.NBD()
        handle.connect_uri(receiver.uri)
        present_chunk = 3
        handle.pread(CHUNK, present_chunk * CHUNK)  # fetched: PRESENT from now on
        serve.process.kill()
        serve.process.wait(10)
        live = (receiver.state_dir / LIVE_MAP_FILENAME).read_bytes()
        assert live[present_chunk] & PRESENT
        missing = [c for c in range(len(live) - 1, -1, -1) if not live[c] & PRESENT]
        assert len(missing) >= 2 * waiting + 1
        read_chunks = missing[:waiting]
        write_chunks = missing[waiting:2 * waiting]
        whole_chunk = missing[2 * waiting]
        reads = {c: nbd.Buffer(4096) for c in read_chunks}
        waiting_cookies = [handle.aio_pread(buf, c * CHUNK + 8192) for c, buf in reads.items()]
        guest = {c: bytes([c % 251 + 1]) * 4096 for c in write_chunks}
        waiting_cookies += [
            handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), c * CHUNK + 4096)
            for c, data in guest.items()
        ]
        assert not wait_done(handle, waiting_cookies[:1], 0.3), "a miss did not wait"
        # behind them, on the same connection
        present = nbd.Buffer(CHUNK)
        whole = bytes([0x5C]) * CHUNK
        started = time.monotonic()
        probes = [
            handle.aio_pread(present, present_chunk * CHUNK),
            handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(whole)), whole_chunk * CHUNK),
        ]
        answered = wait_done(handle, probes, ANSWER_WITHIN)
        took = time.monotonic() - started
        still_waiting = sum(not handle.aio_command_completed(c) for c in waiting_cookies)
        print(f"\n{2 * waiting} waiting: present read + whole-chunk write answered in {took:.3f}s")
        assert answered, f"stalled behind {2 * waiting} waiting requests ({took:.1f}s)"
        assert still_waiting == 2 * waiting, "the outage ended early: the test proves nothing"
        assert bytes(present.to_bytearray()) == read_range(image, present_chunk * CHUNK, CHUNK)
        # the source comes back: everything that waited completes with the right bytes
        stack.enter_context(running_serve(f"disk={image}", socket_path=socket_path))
        assert wait_done(handle, waiting_cookies, 60), "waiting requests never completed"
        for chunk, buf in reads.items():
            assert bytes(buf.to_bytearray()) == read_range(image, chunk * CHUNK + 8192, 4096)
        for chunk, data in guest.items():
            expected = read_range(image, chunk * CHUNK, CHUNK)
            expected = expected[:4096] + data + expected[8192:]
            assert handle.pread(CHUNK, chunk * CHUNK) == expected, f"chunk {chunk}"
        assert handle.pread(CHUNK, whole_chunk * CHUNK) == whole
        handle.shutdown()
