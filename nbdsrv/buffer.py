"""A receive buffer for sans-IO protocol cores (the wsproto habit).

The I/O shell appends whatever bytes arrived with `feed()`; the core asks for complete frames with
`take(n)`, which returns exactly n bytes or None when fewer have arrived, and never consumes a
partial frame.  `take_into` copies straight into a caller's buffer (a READ payload into the
destination memory) so large payloads are copied once.
"""

from __future__ import annotations


class ReceiveBuffer:
    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0  # bytes before this index are consumed; compacted lazily

    def __len__(self) -> int:
        return len(self._data) - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._start and self._start == len(self._data):
            self._data.clear()
            self._start = 0
        self._data += data

    def take(self, size: int) -> bytes | None:
        """Remove and return the next `size` bytes, or None (consuming nothing) if not all here."""
        if len(self) < size:
            return None
        chunk = bytes(self._data[self._start : self._start + size])
        self._advance(size)
        return chunk

    def peek(self, size: int) -> bytes | None:
        if len(self) < size:
            return None
        return bytes(self._data[self._start : self._start + size])

    def take_into(self, target: memoryview) -> int:
        """Move up to len(target) bytes into `target`; returns how many were moved."""
        count = min(len(self), len(target))
        with memoryview(self._data) as view:  # a view, not a slice copy: one copy only
            target[:count] = view[self._start : self._start + count]
        self._advance(count)
        return count

    def skip(self, size: int) -> int:
        """Discard up to `size` bytes; returns how many were discarded."""
        count = min(len(self), size)
        self._advance(count)
        return count

    def _advance(self, count: int) -> None:
        self._start += count
        if self._start == len(self._data):
            self._data.clear()
            self._start = 0
        elif self._start > 65536 and self._start > len(self._data) // 2:
            del self._data[: self._start]
            self._start = 0
