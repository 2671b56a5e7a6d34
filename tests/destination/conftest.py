"""The `make_engine` fixture of the engine tests (an in-process Engine over a FakeSource or a real
NBD server's URI, stopped at the end of the test)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from postcopy.destination.engine import Engine, EngineConfig
from tests.fakes import FakeSource

EngineFactory = Callable[..., Engine]


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[EngineFactory]:
    engines: list[Engine] = []

    def factory(
        source: FakeSource | str,
        *,
        state: str = "state",
        disk_size: int | None = None,
        **settings: Any,
    ) -> Engine:
        """An engine over `source`: a FakeSource, or the URI of a real NBD server (then
        `disk_size` is required)."""
        if isinstance(source, str):
            source_uri, opener, source_size = source, None, None
        else:
            source_uri, opener, source_size = "nbd://fake/", source.open_client, len(source.data)
        dest = tmp_path / "disk.img"
        if not dest.exists():
            size = disk_size if disk_size is not None else source_size
            assert size is not None, "a real source needs disk_size"
            with open(dest, "wb") as f:
                f.truncate(size)
        state_dir = tmp_path / state
        state_dir.mkdir(exist_ok=True)
        settings.setdefault("drain", False)
        settings.setdefault("sync_interval", 0.05)
        settings.setdefault("status_interval", 0.05)
        settings.setdefault("chunk_size", 64 * 1024)
        config = EngineConfig(
            source_uri=source_uri, dest_path=dest, state_dir=state_dir, **settings
        )
        engine = Engine(config, source_opener=opener)
        engine.start()
        engines.append(engine)
        return engine

    try:
        yield factory
    finally:
        for engine in engines:
            engine.stop()


