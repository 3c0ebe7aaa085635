"""Sizes as people write them (`8G`, `512M`, `50%`) and as they are shown; the option error they raise."""

from __future__ import annotations

import re
from collections.abc import Callable


class OptionError(ValueError):
    """A device or budget that cannot be understood (reported at start-up, before any job)."""


def parse_size(text: str | int, total: Callable[[], int]) -> int:
    """`8G`, `512M`, `1.5GiB`, `1073741824` or `50%` (of `total()`, asked only for percentages) as bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b?|b)?\s*", text.lower())
    if not match:
        raise OptionError(f"{text!r} is not a size: use bytes (8G, 512M, 1073741824) or a percentage (50%)")
    number, unit = float(match.group(1)), match.group(2) or "b"
    if unit == "%":
        if number > 100:
            raise OptionError(f"{text!r}: a percentage above 100")
        return int(total() * number / 100)
    return int(number * 1024 ** "bkmgt".index(unit[0]))


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")
