"""The cost model: alpha-beta links per level and the time of a round for given periods.

A sync at level ``l`` costs its link's allreduce, ``sync_s(l) = link_s[l]``; with the leaders'
chained allreduce it also costs the reduce stages below it, once up and once down:
``sync_s(l) = sum_{j<l} 2 * link_s[j] + link_s[l]``; with the sliced one a reduce-scatter up and
an allgather down, half an allreduce each: ``sync_s(l) = sum_{j<l} link_s[j] + link_s[l]``
(``link_s[j]`` is then the allreduce time of the slice that level's links carry). With periods
``(H_0, ..., H_{L-1})`` a *super-round* is ``P = H_0 * ... * H_{L-1}`` local steps that end in
one top-level sync; a lower-level sync happens at every multiple of its own period that is
not also a higher one.

With ``overlap`` (the average runs in the background during the next level-0 round of ``H_0``
steps, see the ``overlap`` config key) a sync costs only what the round does not hide:
``max(0, sync_s(l) - H_0 * compute_s)``.

Stragglers: with ``rank_compute_s`` (every rank's step time) the model prices what a round
costs the *job*: with step-count rounds every rank waits for the slowest (the others idle
``H x (t_slowest - t_rank)``); with time-budget rounds (:func:`rank_split`) each rank takes
as many steps as fit in the slowest rank's ``H`` steps, so the idle time is only the rounding.
:meth:`CostModel.job_steps_per_s` is the useful work per second (steps of all ranks).

Example::

    >>> from adaptive_lsgd.cost_model import CostModel, LinkModel, rank_split
    >>> m = CostModel(compute_s=0.05, link_s=[0.4])
    >>> round(m.comm_fraction([1]), 3), round(m.comm_fraction([8]), 3)
    (0.889, 0.5)
    >>> round(LinkModel.fit([(1e6, 0.011), (4e6, 0.041)]).predict(2e6), 4)
    0.021
    >>> m = CostModel(compute_s=0.05, link_s=[0.4], overlap=True)   # 8 steps hide the 0.4 s
    >>> round(m.comm_fraction([4]), 3), m.comm_fraction([8])
    (0.5, 0.0)
    >>> rank_split(1, [0.0204, 0.0404], max_ratio=4)    # nearest, not floor: 1.98 -> 2 steps
    [2, 1]
    >>> m = CostModel(0.04, [0.004], rank_compute_s=[0.02, 0.04])
    >>> round(m.job_steps_per_s([8]), 1), round(m.job_steps_per_s([8], rank_steps=[16, 8]), 1)
    (49.4, 74.1)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class LinkModel:
    """``t(bytes) = alpha + bytes / beta``: latency ``alpha`` seconds, bandwidth ``beta`` B/s."""

    alpha: float
    beta: float

    def predict(self, nbytes: float) -> float:
        return self.alpha + nbytes / self.beta

    @classmethod
    def fit(cls, samples: Sequence[tuple], alpha: float | None = None) -> LinkModel:
        """Least-squares fit of ``(bytes, seconds)`` samples.

        With one distinct size the intercept cannot be identified: ``alpha`` (a prior, e.g.
        from a tuning-tool profile) or 0 is used and the bandwidth explains the rest.
        """
        x = np.array([float(b) for b, _ in samples])
        y = np.array([float(t) for _, t in samples])
        if len(x) == 0:
            raise ValueError("LinkModel.fit needs at least one (bytes, seconds) sample")
        if len(np.unique(x)) >= 2 and alpha is None:
            slope, intercept = np.polyfit(x, y, 1)
            intercept = max(float(intercept), 0.0)
            slope = float(slope)
            if slope <= 0:  # latency-bound: time does not grow with size
                return cls(alpha=float(np.median(y)), beta=math.inf)
            return cls(alpha=intercept, beta=1.0 / slope)
        a = 0.0 if alpha is None else float(alpha)
        extra = y - a
        per_byte = float(np.sum(extra * x) / np.sum(x * x)) if np.any(x > 0) else 0.0
        return cls(alpha=a, beta=1.0 / per_byte if per_byte > 0 else math.inf)


class CostModel:
    """Predicted round time and communication share for any periods.

    ``compute_s`` is the time of one local step (of the slowest worker: a block waits for
    it); ``link_s[j]`` the allreduce time of the level-``j`` link for the model's bytes.
    """

    def __init__(self, compute_s: float, link_s: Sequence[float], chained: bool = False,
                 sliced: bool = False, overlap: bool = False,
                 rank_compute_s: Sequence[float] | None = None):
        self.compute_s = float(compute_s)
        self.rank_compute_s = None if rank_compute_s is None else [float(t) for t in rank_compute_s]
        self.link_s = [float(t) for t in link_s]
        self.chained = chained
        self.sliced = chained and sliced
        self.overlap = overlap
        below = 1.0 if self.sliced else 2.0  # stages below the top: up and down
        self.sync_s = [sum(below * self.link_s[j] for j in range(lvl) if chained) + self.link_s[lvl]
                       for lvl in range(len(self.link_s))]
        self._fractions: dict = {}  # periods -> comm fraction (the model never changes)
        self._other: CostModel | None = None  # the same model with the other overlap flag

    def with_overlap(self, overlap: bool = True) -> CostModel:
        """The same links and compute with (or without) overlapped averages (built once: a
        decision asks for it several times, and the policy's grid cache keys on the model)."""
        if overlap == self.overlap:
            return self
        if self._other is None:
            self._other = CostModel(self.compute_s, self.link_s, chained=self.chained,
                                    sliced=self.sliced, overlap=overlap,
                                    rank_compute_s=self.rank_compute_s)
            self._other._other = self
        return self._other

    def with_compute(self, compute_s: float | Sequence[float]) -> CostModel:
        """The same links and flags with other step times: one number, or one per rank (then
        ``compute_s`` is their largest: the slowest rank paces a step-count round).

        >>> CostModel(0.01, [0.1]).with_compute([0.02, 0.01]).compute_s
        0.02
        """
        if isinstance(compute_s, (int, float)):
            slowest, ranks = compute_s, None
        else:
            ranks = [float(t) for t in compute_s]
            slowest = max(ranks)
        return CostModel(slowest, self.link_s, chained=self.chained, sliced=self.sliced,
                         overlap=self.overlap, rank_compute_s=ranks)

    def job_steps_per_s(self, periods: Sequence[int], rank_steps: Sequence[int] | None = None) -> float:
        """Useful work per second: local steps of *all* ranks per second of wall time, with
        step-count rounds (``rank_steps`` None: everyone takes ``periods[0]`` steps and waits
        for the slowest) or time-budget rounds (``rank_steps``: level-0 steps per rank)."""
        times = self.rank_compute_s or [self.compute_s]
        steps, _, comm = self.round_times(periods)
        rounds = steps / int(periods[0])
        if rank_steps is None:
            per_round = [int(periods[0])] * len(times)
        else:
            per_round = [int(n) for n in rank_steps]
        round_s = max(n * t for n, t in zip(per_round, times))
        wall = rounds * round_s + comm
        return rounds * sum(per_round) / wall if wall > 0 else math.inf

    @property
    def num_levels(self) -> int:
        return len(self.link_s)

    def syncs_per_super_round(self, periods: Sequence[int]) -> list:
        """How many syncs of each level end inside one super-round (the top one exactly once)."""
        # Plain ints (this runs at every sync): the running products H_0, H_0 H_1, ...
        prefix = list(itertools.accumulate((int(h) for h in periods), operator.mul))
        total = prefix[-1]
        counts = [total // prefix[lvl] - total // prefix[lvl + 1] for lvl in range(len(periods) - 1)]
        return counts + [1]

    def round_times(self, periods: Sequence[int]) -> tuple:
        """``(steps, compute seconds, comm seconds)`` of one super-round."""
        if len(periods) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} periods, got {list(periods)}")
        steps = math.prod(int(h) for h in periods)
        hidden = int(periods[0]) * self.compute_s if self.overlap else 0.0
        comm = sum(n * max(0.0, t - hidden)
                   for n, t in zip(self.syncs_per_super_round(periods), self.sync_s))
        return steps, steps * self.compute_s, comm

    def comm_fraction(self, periods: Sequence[int]) -> float:
        key = tuple(periods)
        frac = self._fractions.get(key)
        if frac is None:
            _, compute, comm = self.round_times(periods)
            total = compute + comm
            frac = self._fractions[key] = comm / total if total > 0 else 0.0
        return frac

    def steps_per_s(self, periods: Sequence[int]) -> float:
        steps, compute, comm = self.round_times(periods)
        return steps / (compute + comm) if compute + comm > 0 else math.inf

    def grid(self, candidates: Sequence[Sequence[int]]) -> tuple:
        """Vectorised over the cartesian product of per-level candidates.

        Returns ``(periods array (n, L), global period (n,), comm fraction (n,))``; the first
        two are cached and read-only.
        """
        mesh, total, counts = grid_mesh(candidates)
        return mesh, total, self.grid_fraction(total, counts, mesh[:, 0])

    def grid_fraction(self, total: np.ndarray, counts: Sequence[np.ndarray],
                      h0: np.ndarray | None = None) -> np.ndarray:
        """The communication share of every grid point of :func:`grid_mesh` (``h0``: the
        points' level-0 periods, needed with ``overlap``)."""
        if self.overlap:
            if h0 is None:
                raise ValueError("grid_fraction of an overlap model needs the level-0 periods h0")
            hidden = h0 * self.compute_s
            sync = [np.maximum(0.0, t - hidden) for t in self.sync_s]
        else:
            sync = self.sync_s
        if self.num_levels == 1:
            comm = np.full(total.shape, sync[-1], dtype=np.float64)
        else:  # (s_top + n_0 s_0) + n_1 s_1 ...: the order the grid always summed in
            comm = counts[0] * sync[0] + sync[-1]
            for lvl in range(1, self.num_levels - 1):
                comm += counts[lvl] * sync[lvl]
        denom = total * self.compute_s + comm
        if self.compute_s > 0 or (not self.overlap and self.sync_s[-1] > 0):  # periods are >= 1
            return comm / denom
        return np.divide(comm, denom, out=np.zeros_like(comm), where=denom > 0)


def rank_split(base: int, compute: Sequence[float], max_ratio: int) -> list:
    """Time-budget rounds: each rank's level-0 steps, as many as fit in the slowest rank's
    ``base`` steps (the nearest whole number, at least 1, at most ``max_ratio x base``)."""
    slowest = max(float(c) for c in compute)
    return [int(min(max(1, math.floor(base * slowest / float(c) + 0.5)), max_ratio * base))
            for c in compute]


def wasted_share(model: CostModel, periods: tuple, rank_steps: list) -> float:
    """The share of the ranks' compute that time-budget rounds of ``periods`` split as
    ``rank_steps`` lose to communication and to ranks idling for the last one: 1 - the job's
    steps per second / the sum of every rank's steps per second (``model.rank_compute_s``)."""
    ideal = sum(1.0 / t for t in model.rank_compute_s)
    return 1.0 - model.job_steps_per_s(periods, rank_steps=rank_steps) / ideal


def grid_mesh(candidates: Sequence[Sequence[int]]) -> tuple:
    """``(periods (n, L), global period (n,), syncs per super-round of each lower level)`` for
    the cartesian product of per-level candidates; cached, since policies ask at every sync."""
    return _grid_mesh(tuple(tuple(int(h) for h in c) for c in candidates))


@functools.lru_cache(maxsize=64)
def _grid_mesh(candidates: tuple) -> tuple:
    mesh = np.stack(np.meshgrid(*[np.asarray(c, dtype=np.int64) for c in candidates],
                                indexing="ij"), axis=-1).reshape(-1, len(candidates))
    prefix = np.cumprod(mesh, axis=1)
    total = prefix[:, -1]
    counts = tuple(total // prefix[:, lvl] - total // prefix[:, lvl + 1]
                   for lvl in range(len(candidates) - 1))
    for arr in (mesh, total, *counts):
        arr.flags.writeable = False
    return mesh, total, counts


def candidate_periods(max_period: int) -> list:
    """Every period up to 64, then a ~1.1x geometric grid up to ``max_period``."""
    cands = set(range(1, min(64, max_period) + 1))
    p = 64.0
    while p < max_period:
        p *= 1.1
        cands.add(min(int(round(p)), max_period))
    return sorted(cands)
