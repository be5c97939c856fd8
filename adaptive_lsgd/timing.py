"""Robust timing statistics: a sliding window median that ignores warm-up samples.

Example::

    >>> from adaptive_lsgd.timing import WindowStat
    >>> s = WindowStat(window=4, skip=1)
    >>> for t in [9.0, 0.1, 0.2, 5.0, 0.3]:   # the first sample (warm-up) is dropped
    ...     s.add(t)
    >>> s.median(), s.count
    (0.25, 4)
"""

from __future__ import annotations

import statistics
from collections import deque


class WindowStat:
    """Median of the last ``window`` samples, after discarding the first ``skip`` ones.

    The median shrugs off single outliers (a GC pause, a page fault) that an average would
    carry for many steps; the window lets it follow a real change within ``window/2`` samples.
    """

    __slots__ = ("_buf", "_skip", "count")

    def __init__(self, window: int = 16, skip: int = 0):
        if window < 1:
            raise ValueError("window must be at least 1")
        self._buf: deque = deque(maxlen=window)
        self._skip = skip
        self.count = 0

    def add(self, value: float) -> None:
        if self._skip > 0:
            self._skip -= 1
            return
        self._buf.append(value)
        self.count += 1

    def median(self, default: float = -1.0) -> float:
        return statistics.median(self._buf) if self._buf else default

    def __len__(self) -> int:
        return len(self._buf)

    def state_dict(self) -> dict:
        return {"values": list(self._buf), "skip": self._skip, "count": self.count,
                "window": self._buf.maxlen}

    @classmethod
    def from_state(cls, state: dict) -> WindowStat:
        s = cls(window=state["window"], skip=state["skip"])
        s._buf.extend(state["values"])
        s.count = state["count"]
        return s
