"""The drain's bandwidth cap (`receive --bandwidth`): the token bucket alone (autojump clock),
guest misses never held back by it (engine + FakeSource), and the cap's accuracy over a 10 s
drain between real processes (`postcopy serve` -> `postcopy receive --bandwidth 8M`)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import trio

from postcopy.destination.ratelimit import TokenBucket
from tests.destination.conftest import EngineFactory
from tests.destination.test_receive import MiB, running_receive
from tests.fakes import FakeSource
from tests.peers import running_serve, sparse_test_image

CHUNK = 64 * 1024


@pytest.mark.timeout(20)
async def test_token_bucket_holds_the_rate_and_guest_takes_never_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(1000 * 1024, capacity=256 * 1024)
    moved = 0
    started = trio.current_time()
    while trio.current_time() - started < 10:
        await bucket.wait_for_credit()
        bucket.take(100 * 1024)
        moved += 100 * 1024
    elapsed = trio.current_time() - started
    assert moved <= 1000 * 1024 * elapsed + 100 * 1024  # rate * T + one request
    assert moved >= 0.95 * 1000 * 1024 * elapsed
    # a guest take never waits, however deep the debt; the debt is bounded
    before = trio.current_time()
    for _ in range(100):
        bucket.take(1024 * 1024)
    assert trio.current_time() == before
    assert bucket.balance >= -bucket.max_debt


@pytest.mark.timeout(30)
def test_guest_miss_is_not_delayed_by_a_tight_drain_cap(make_engine: EngineFactory) -> None:
    data = random.Random(3).randbytes(16 * MiB)
    source = FakeSource(data)
    engine = make_engine(
        source, chunk_size=CHUNK, bandwidth=256 * 1024, drain=True, sync_interval=1.0
    )
    deadline = time.monotonic() + 5
    while engine.drain_bytes < 1 * MiB:  # the drain is running into its cap
        assert time.monotonic() < deadline
        time.sleep(0.01)
    latencies = []
    for index in range(20):
        offset = (8 * MiB) + index * 256 * 1024 + 777
        buf = bytearray(4096)
        started = time.monotonic()
        engine.pread_into(memoryview(buf), offset)
        latencies.append(time.monotonic() - started)
        assert bytes(buf) == data[offset:offset + 4096]
    # 20 x 256 KiB fetched for the guest = 20 s of the drain's budget, yet no read waited
    assert max(latencies) < 0.5, latencies
    assert engine.drain_bytes < 4 * MiB  # and the drain stayed capped meanwhile


@pytest.mark.timeout(60)
def test_drain_cap_holds_within_ten_percent_over_ten_seconds(tmp_path: Path) -> None:
    image = tmp_path / "source.img"
    sparse_test_image(image, 128 * MiB, seed=31, data_fraction=1.0)
    cap = 8 * MiB
    with running_serve(f"disk={image}") as serve, running_receive(
        serve.export_uri("disk"), tmp_path, "--bandwidth", "8M"
    ) as receiver:
        first = receiver.wait_status(lambda r: r["drain_bytes"] > 0)
        start_bytes, start_time = first["drain_bytes"], first["updated_at"]
        last = receiver.wait_status(lambda r: r["updated_at"] - start_time >= 10.0, timeout=20)
        assert last["state"] == "fetching" and last["missing_bytes"] > 0  # still capped
        rate = (last["drain_bytes"] - start_bytes) / (last["updated_at"] - start_time)
        print(f"\ndrain capped at 8 MiB/s moved {rate / MiB:.3f} MiB/s over "
              f"{last['updated_at'] - start_time:.2f}s ({100 * rate / cap:.1f}% of the cap)")
        assert rate <= 1.10 * cap  # the cap holds
        assert rate >= 0.70 * cap  # and is not wildly below it
