"""Hostile inputs, one module per part of the worker, each listing its `CASES`.

`bench/hostile_inputs.py` runs every case in a fresh process (so its peak memory is its own) and prints
the time and memory it costs now beside the unbounded path, where one exists to compare with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    """One hostile input. `bounded` runs it through the product's code as it is now; `unbounded` (optional)
    runs the same input through the path without the bound (plain Pillow, the old algorithm), for the
    side-by-side figure. Each returns a short string for the table (an error code, a count), or None.
    `unbounded_limit_s`: the baseline is stopped after this long and shown as "> N s"."""

    name: str
    bounded: Callable[[], str | None]
    unbounded: Callable[[], str | None] | None = None
    unbounded_limit_s: float = 60.0
