"""A token bucket for trio: caps the drain's bytes per second without ever holding up a guest.

Tokens are bytes.  They accrue at `rate` per second up to `capacity` (a short burst).  The drain
calls `await bucket.wait_for_credit()` before it starts a request, then `bucket.take(n)` for the
request's size; the balance may go negative (a 1 MiB request at 8 MiB/s leaves a debt), and the
next drain request waits until the debt is paid.  Over any interval T the drain therefore moves at
most `rate * T + capacity + one request` bytes, which is how the cap's accuracy is bounded.

Guest misses also `take` their bytes (so that guest traffic and drain traffic together respect the
cap when the guest is quiet) but never wait: an on-demand fetch is delayed by nothing but its own
transfer.  A burst of guest misses can push the balance down to at most `-max_debt` (a few seconds
of rate), so a guest storm pauses the drain for a bounded time instead of for ever.

The clock is trio's (`trio.current_time`), so tests run it on the autojump clock.
"""

from __future__ import annotations

import trio


class TokenBucket:
    def __init__(self, rate: int, *, capacity: int | None = None, max_debt_seconds: float = 2.0):
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.capacity = capacity if capacity is not None else max(1, rate // 4)
        self.max_debt = int(rate * max_debt_seconds)
        self._tokens = 0.0  # start empty: the first second moves no more than `rate`
        self._updated: float | None = None
        self.waited_seconds = 0.0  # total time the drain spent waiting for credit

    def _refill(self) -> None:
        now = trio.current_time()
        if self._updated is not None:
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    @property
    def balance(self) -> float:
        self._refill()
        return self._tokens

    def take(self, count: int) -> None:
        """Spend `count` bytes now, without waiting (the balance may go negative)."""
        self._refill()
        self._tokens = max(-self.max_debt, self._tokens - count)

    async def wait_for_credit(self) -> None:
        """Wait until the balance is not negative (checkpoints at least once)."""
        self._refill()
        if self._tokens >= 0:
            await trio.lowlevel.checkpoint()
            return
        started = trio.current_time()
        while self._tokens < 0:
            # (at least 1 ms: a float remainder of a byte would sleep for no time at all)
            await trio.sleep(max(-self._tokens / self.rate, 0.001))
            self._refill()
        self.waited_seconds += trio.current_time() - started
