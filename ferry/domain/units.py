"""Parse the sizes, rates and durations users type: '256', '1GiB', '300ms', '200mbit'."""

from __future__ import annotations

import re

from ferry.domain.errors import InvalidInput

_SIZE = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20,
         "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40,
         "kb": 1000, "mb": 10**6, "gb": 10**9}
_BITS = {"bit": 1, "kbit": 1000, "mbit": 10**6, "gbit": 10**9}
_TIME = {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "": 1}
_NUM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    m = _NUM.match(text)
    if not m:
        raise InvalidInput(f"{what} {text!r} is not a number with a unit", f"e.g. {example}")
    return float(m.group(1)), m.group(2).lower()


def parse_size(text: str, default_unit: str = "b") -> int:
    """Bytes in '1GiB', '512M', '100' (in default_unit)."""
    value, unit = _split(text, "size", "512MiB or 2GiB")
    unit = unit or default_unit.lower()
    if unit not in _SIZE:
        raise InvalidInput(f"unknown size unit {unit!r} in {text!r}", "use KiB, MiB or GiB")
    return int(value * _SIZE[unit])


def parse_rate(text: str) -> int:
    """Bytes per second in '200MiB' (per second), '100mbit', '1gbit'."""
    value, unit = _split(text, "rate", "200MiB or 100mbit")
    unit = unit.removesuffix("/s").removesuffix("ps")
    if unit in _BITS:
        return int(value * _BITS[unit] / 8)
    if unit in _SIZE:
        return int(value * _SIZE[unit])
    raise InvalidInput(f"unknown rate unit {unit!r} in {text!r}", "use MiB (per second) or mbit")


def parse_duration_ms(text: str) -> int:
    value, unit = _split(text, "duration", "300ms or 2s")
    if unit not in _TIME:
        raise InvalidInput(f"unknown time unit {unit!r} in {text!r}", "use ms, s, min or h")
    return int(value * _TIME[unit])
