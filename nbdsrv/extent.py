"""A block-status extent: a run of bytes that share `base:allocation` flags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    flags: int  # nbdsrv.constants.BlockStatusFlag bits: HOLE = 1, ZERO = 2

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_hole(self) -> bool:
        return bool(self.flags & 1)

    @property
    def is_zero(self) -> bool:
        return bool(self.flags & 2)
