"""`postcopy serve` whose every read takes a while: for tests that need reads held in flight.

    python -m tests.delayed_serve SECONDS [serve options] EXPORT...

runs the real `postcopy serve` command (`postcopy.commands.serve.run`, same options, same ready
line, same signals) with each image's `FileBackend` wrapped in a `DelayingBackend`: every read
sleeps SECONDS first, in its worker thread, and takes the plain read path (nothing answered from
the page cache, no sendfile), so a slow source is slow for every read.  `tests.peers.running_serve`
starts it for `read_delay=`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from nbdsrv.backend import Backend, FileBackend
from nbdsrv.extent import Extent
from postcopy.cli import build_parser, one_line
from postcopy.commands import serve as serve_command
from postcopy.errors import UserError


class DelayingBackend:
    """A Backend whose reads sleep `delay` seconds first; everything else is `inner`'s."""

    def __init__(self, inner: Backend, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def can_multi_conn(self) -> bool:
        return self.inner.can_multi_conn

    def read_into(self, offset: int, buffer: memoryview) -> None:
        time.sleep(self.delay)
        self.inner.read_into(offset, buffer)

    def read_cached(self, offset: int, buffer: memoryview) -> int:
        return 0  # never "already in memory": every read goes through read_into, delayed

    def sendfile_source(self, offset: int, length: int) -> int | None:
        return None  # no sendfile: the data is read (late) into a buffer

    def extents(self, offset: int, length: int, limit: int = 1024) -> list[Extent]:
        return self.inner.extents(offset, length, limit)

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.inner.write(offset, data, fua)

    def flush(self) -> None:
        self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.inner.trim(offset, length, fua)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool = False
    ) -> None:
        self.inner.write_zeroes(offset, length, may_trim=may_trim, fast_only=fast_only, fua=fua)

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def close(self) -> None:
        self.inner.close()


def main(argv: Sequence[str]) -> int:
    delay, *serve_args = argv
    seconds = float(delay)

    def open_delayed(path: str, writable: bool) -> Backend:
        return DelayingBackend(FileBackend(path, writable=writable), seconds)

    args = build_parser().parse_args(["serve", *serve_args])
    try:
        return serve_command.run(args, open_backend=open_delayed)
    except UserError as exc:
        print(f"postcopy serve: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
