"""A 0-byte disk with the C fast path filter built: `postcopy receive` serves it.

The engine publishes no `live.map` for an empty disk (nothing can be mapped, nothing is ever
present); the filter then finds a 0-byte destination file and hands everything to the plugin.
A guest (libnbd) connects and sees size 0, receive stops cleanly, and a second start of the same
(complete) state directory serves again.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import nbd

from postcopy.destination import receive
from tests.destination.test_receive import connect, running_receive
from tests.peers import running_serve


def test_empty_disk_is_served_with_the_filter_built(tmp_path: Path) -> None:
    assert receive.fastpath_filter_path() is not None, "make did not build the fast path filter"
    image = tmp_path / "empty.img"
    image.write_bytes(b"")
    with running_serve(f"disk={image}") as serve:
        for _start in range(2):  # fresh, then the complete state directory again
            with running_receive(serve.export_uri("disk"), tmp_path) as receiver:
                handle: nbd.NBD = connect(receiver.uri)
                assert handle.get_size() == 0
                handle.flush()
                handle.shutdown()
                assert receiver.wait_complete(30)["size_bytes"] == 0
                receiver.process.send_signal(signal.SIGTERM)
                try:
                    assert receiver.process.wait(15) == 0, receiver.log()
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"receive did not stop: {receiver.log()}") from None
                assert "error" not in receiver.log(), receiver.log()
            assert receiver.dest.stat().st_size == 0
