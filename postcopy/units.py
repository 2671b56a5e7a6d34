"""Sizes and rates written the way operators write them: `64K`, `1M`, `200M`, `1.5G`.

`parse_size` reads a byte count. A number may carry one binary suffix: `K`, `M`, `G`, `T`, `P`
(or `KiB`, `MiB`, ... and lowercase forms), each a power of 1024, and an optional trailing `B`;
a bare number is bytes. `64K` is 65536, `1M` is 1048576. A fractional number is allowed when the
result is a whole number of bytes (`1.5K` is 1536, `0.1K` is refused).

`parse_rate` reads a byte rate the same way, with an optional `/s` (`200M` and `200MiB/s` are both
200 MiB/s); `0`, `unlimited`, `none` and `off` mean no cap and give `None`.

`parse_bit_rate` reads a network link rate in bits per second with decimal (SI) prefixes, as `tc`
and link speeds are written: `1G` is 10**9 bit/s, `100M` is 10**8 bit/s.

`format_size` goes the other way for display (`65536` -> `64 KiB`).

Parsers raise `UnitError` (a `ValueError`) with a short message; callers add where the text came
from (the config loader adds file and line, the CLI adds the option).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["UnitError", "format_size", "parse_bit_rate", "parse_rate", "parse_size"]

_BINARY_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_DECIMAL_FACTORS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}

# number, then an optional prefix letter, an optional "i", an optional unit letter.
_QUANTITY = re.compile(
    r"^\s*(?P<number>[0-9]+(?:\.[0-9]+)?)\s*"
    r"(?P<prefix>[kKmMgGtTpP]?)(?P<binary>i?)(?P<unit>[bB]?)\s*$"
)
_NO_LIMIT = {"0", "unlimited", "none", "off"}


class UnitError(ValueError):
    """A size or rate that cannot be read; the message says why, in a few words."""


def _scaled(text: str, factors: dict[str, int], what: str, unit_letter: str) -> int:
    match = _QUANTITY.match(text)
    if match is None or match["binary"] and not match["prefix"]:
        raise UnitError(f"{what} {text!r} is not a number with an optional K/M/G/T suffix")
    prefix = match["prefix"].upper()
    if prefix not in factors:
        raise UnitError(f"{what} {text!r} has an unknown suffix")
    unit = match["unit"]
    if unit and unit != unit_letter and unit_letter != "any":
        raise UnitError(f"{what} {text!r}: the unit must be {unit_letter!r}")
    try:
        number = Decimal(match["number"])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise UnitError(f"{what} {text!r} is not a number") from exc
    value = number * factors[prefix]
    if value != value.to_integral_value():
        raise UnitError(f"{what} {text!r} is not a whole number of units")
    return int(value)


def parse_size(text: str | int) -> int:
    """Bytes from `64K`, `1M`, `4096`, `2GiB` (binary prefixes); raises `UnitError`."""
    if isinstance(text, bool):
        raise UnitError(f"size {text!r} is not a number")
    if isinstance(text, int):
        if text < 0:
            raise UnitError(f"size {text} is negative")
        return text
    return _scaled(text, _BINARY_FACTORS, "size", "any")


def parse_rate(text: str | int) -> int | None:
    """Bytes per second from `200M`, `200MiB/s`, `1048576`; `None` for no cap (`0`, `unlimited`)."""
    if isinstance(text, bool):
        raise UnitError(f"rate {text!r} is not a number")
    if isinstance(text, int):
        if text < 0:
            raise UnitError(f"rate {text} is negative")
        return text or None
    stripped = text.strip()
    if stripped.lower() in _NO_LIMIT:
        return None
    if stripped.lower().endswith("/s"):
        stripped = stripped[:-2]
    return _scaled(stripped, _BINARY_FACTORS, "rate", "any") or None


def parse_bit_rate(text: str | int) -> int:
    """Bits per second from `1G`, `100M`, `1Gbit`, `2.5G` (decimal prefixes, as links are rated)."""
    if isinstance(text, bool):
        raise UnitError(f"bit rate {text!r} is not a number")
    if isinstance(text, int):
        if text <= 0:
            raise UnitError(f"bit rate {text} must be positive")
        return text
    stripped = text.strip()
    for suffix in ("bit/s", "bps", "bit", "b/s"):
        if stripped.lower().endswith(suffix):
            stripped = stripped[: -len(suffix)]
            break
    value = _scaled(stripped, _DECIMAL_FACTORS, "bit rate", "b")
    if value <= 0:
        raise UnitError(f"bit rate {text!r} must be positive")
    return value


def format_size(count: int | float) -> str:
    """A byte count for people: `512 B`, `64 KiB`, `1.5 GiB` (at most one decimal)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B" or value == int(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
