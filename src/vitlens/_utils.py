"""Small helpers shared across vitlens."""

from __future__ import annotations

from collections.abc import Sequence

from vitlens.errors import VitlensError


def pair(v: int | float | Sequence[int | float], name: str = "size", minimum: int = 1) -> tuple[int, int]:
    """``v`` as a (height, width) pair of ints >= ``minimum``: a number means a square, a sequence must have two
    items. ``name`` names the value in the one-line error raised for anything else."""
    try:
        t = (int(v), int(v)) if isinstance(v, (int, float)) else tuple(int(a) for a in v)
    except (TypeError, ValueError):
        t = ()
    if len(t) != 2 or min(t) < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise VitlensError(f"{name} must be a {what} int or (height, width) of {what} ints; got {v!r}")
    return t[0], t[1]
