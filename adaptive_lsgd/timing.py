"""Robust timing statistics: a sliding window median that ignores warm-up samples, and the
shared history of such medians that restarts on a step change.

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

import numpy as np

# A shared estimate this many times above or below its history's median is a step change
HISTORY_CHANGE_RATIO = 1.5
HISTORY_CHANGE_RUN = 2  # ... in as many decisions in a row


def ends_in_step_change(values: list, run: int, ratio: float) -> bool:
    """Whether the last ``run`` of ``values`` all lie more than ``ratio`` times above (or all
    below) the median of the ones before them, a positive one (the rule of
    :class:`WindowStat` and :func:`append_restarting`).

    >>> ends_in_step_change([1.0, 1.1, 0.9, 2.5, 2.6], run=2, ratio=2.0)
    True
    >>> ends_in_step_change([1.0, 1.1, 0.9, 2.5, 1.9], run=2, ratio=2.0)
    False
    """
    before, last = statistics.median(values[:-run]), values[-run:]
    return before > 0 and (min(last) > ratio * before or max(last) * ratio < before)


class WindowStat:
    """Median of the last ``window`` samples, after discarding the first ``skip`` ones.

    The median shrugs off single outliers (a GC pause, a page fault) that an average would
    carry for many steps; the window lets it follow a real change within ``window/2`` samples,
    and a step change faster: when the last ``CHANGE_RUN`` samples all lie more than
    ``CHANGE_RATIO`` times above (or below) the median of the samples before them, the older
    ones are dropped (a link that slowed down, a throttled device).

    >>> s = WindowStat(window=16)
    >>> for v in [1.0] * 10 + [5.0] * 3:
    ...     s.add(v)
    >>> s.median()
    5.0
    """

    __slots__ = ("_buf", "_skip", "count")
    CHANGE_RUN = 3
    CHANGE_RATIO = 2.0

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
        buf = self._buf
        buf.append(value)
        self.count += 1
        k = self.CHANGE_RUN
        # A step change needs the newest value beyond CHANGE_RATIO x the older values' median,
        # hence beyond that multiple of the window's min (or max): checked first, in C, so a
        # steady window costs no median per step.
        if len(buf) >= 2 * k and (value > self.CHANGE_RATIO * min(buf)
                                  or value * self.CHANGE_RATIO < max(buf)):
            values = list(buf)
            if ends_in_step_change(values, k, self.CHANGE_RATIO):
                for _ in range(len(values) - k):
                    self._buf.popleft()

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


def column_medians(rows: np.ndarray) -> np.ndarray:
    """The median of each column of a 2-D array of a few rows, as ``np.median(rows, axis=0)``
    (whose overhead is 10x this on a few rows: the shared histories hold at most a dozen).

    >>> column_medians(np.array([[1.0, 4.0], [3.0, 2.0]])).tolist()
    [2.0, 3.0]
    """
    rows = np.sort(rows, axis=0)
    n = len(rows)
    return 0.5 * (rows[(n - 1) // 2] + rows[n // 2])


def append_restarting(history: deque, value, ratio: float = HISTORY_CHANGE_RATIO,
                      run: int = HISTORY_CHANGE_RUN) -> bool:
    """Append ``value`` (a number, or one number per rank) to a history whose median the
    decisions use; when the last ``run`` values all lie more than ``ratio`` times above (or
    all below) the median of the ones before them (for some rank, with per-rank values), the
    history restarts from those ``run`` values and True is returned.

    The values are medians of timing windows, which a single outlier does not move; values
    that moved that far twice in a row are a step change (a slower link, a throttled rank),
    and the median of the history would otherwise follow it only once half the history had
    seen it. One such value alone is not: a stall of the machine can move one rank's window
    for a while (with overlapped averages a 2-core machine measured one rank 2.3x slower for
    one decision, which switched time-budget rounds on in place of the overlap).

    >>> h = deque([1.0, 1.1, 0.9], maxlen=5)
    >>> append_restarting(h, 1.2), append_restarting(h, 3.0), list(h)
    (False, False, [1.0, 1.1, 0.9, 1.2, 3.0])
    >>> append_restarting(h, 3.2), list(h)
    (True, [3.0, 3.2])
    """
    history.append(value)
    if len(history) <= run:
        return False
    if isinstance(value, (int, float)):  # a scalar: plain Python (a decision's hot path)
        values = list(history)
        changed = min(values[-run:]) > 0 and ends_in_step_change(values, run, ratio)
    else:
        values = np.asarray(history, dtype=float)
        before, newest = column_medians(values[:-run]), values[-1]
        # only a rank whose newest value lies that far off can have changed (checked first:
        # a steady history costs two comparisons, not the run's)
        changed = bool(((newest > ratio * before) | (newest * ratio < before)).any())
        if changed:
            lo, hi = values[-run:].min(axis=0), values[-run:].max(axis=0)
            changed = bool(((before > 0) & (lo > 0) & ((lo > ratio * before)
                                                       | (hi * ratio < before))).any())
    if changed:
        keep = list(history)[-run:]
        history.clear()
        history.extend(keep)
        return True
    return False
