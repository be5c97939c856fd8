"""Policies take the decision at each top-level sync, from values every rank shares.

A :class:`Decision` is everything a top-level sync decides: the periods per level, each rank's
level-0 steps (time-budget rounds), the global-period cap in force and the reason.
:meth:`Policy.decide` takes it from the shared cost model, the shared table of per-rank
compute times and the shared learning rate; :meth:`Policy.first` is the decision before any
measurement (the initial periods, or a profile's recommendation). Subclasses override
:meth:`Policy.choose` (the periods) and inherit the rest. Adding a policy means adding a class
here and naming it in :data:`POLICIES`.

Example::

    >>> from adaptive_lsgd.config import load_config
    >>> from adaptive_lsgd.cost_model import CostModel
    >>> from adaptive_lsgd.policies import make_policy
    >>> policy = make_policy(load_config({"target_comm_fraction": 0.1}, env={}), num_levels=1)
    >>> policy.choose(CostModel(0.05, [0.2]), current=(1,), cap=None)   # comm-bound
    ((36,), 'adapt')
    >>> policy.choose(CostModel(0.05, [0.4]), current=(1,), cap=None)   # capped by max_period
    ((64,), 'adapt')
    >>> policy.choose(CostModel(0.5, [0.001]), current=(1,), cap=None)
    ((1,), 'hold')
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from .config import Config, ConfigError
from .cost_model import CostModel, candidate_periods, grid_mesh, rank_split, wasted_share


@dataclass(frozen=True)
class Decision:
    """What one top-level sync decided (identical on every rank).

    ``periods``: one per level; ``rank_steps``: level-0 steps per rank in time-budget rounds
    (None: every rank takes ``periods[0]``); ``cap``: the largest global period allowed
    (``max_global_period``, the quadratic synchronisation rule; None: no cap); ``reason``:
    ``measuring``, ``adapt``, ``hold``, ``fixed`` or ``profile``; ``mechanisms``: the sync
    mechanisms in force (``{"time_budget": bool, "overlap": bool}``, and ``"chained"`` in
    hierarchical topologies) and ``why``: one sentence per mechanism saying why it is on or
    off; ``pending``: the mechanisms this decision saw past their threshold while off, which
    switch on if the next decision sees it again (one noisy window does not switch them)."""

    periods: tuple
    reason: str
    rank_steps: list | None = None
    cap: int | None = None
    mechanisms: dict = field(default_factory=dict)
    why: dict = field(default_factory=dict)
    pending: tuple = ()


# overlap: auto: overlapped averages must promise this many times the blocking ones' steps per
# second (a late average is stale: worth it where communication dominates, not for a few %).
# Measured: the accuracy scenario, where forced overlap cost 10.6-10.8 points when this was set
# (the full runs of 2026-12-07, seeds 0-2: 1.0-1.7 points against the default with blocking
# averages), promises 1.01-1.12x; comm-bound (within 1 point overlapped) 1.45x measured,
# predicted close to 1.5, so a 1.5 bar there engaged at step 704 of 768 of the full run (0.59
# of compute-only)
OVERLAP_MIN_GAIN = 1.3
# chained_allreduce: auto: the sliced chained sync must promise a global sync this many times
# cheaper than one allreduce over all ranks to be switched on (it stays on while it is cheaper)
CHAINED_MIN_GAIN = 1.1


class Policy:
    """Base class: keep the initial periods."""

    name = "base"

    def __init__(self, config: Config, num_levels: int):
        self.config = config
        self.num_levels = num_levels
        self.chained_mode: str | None = None  # set by first()
        maxp = config.max_period
        self.max_period = [maxp] * num_levels if isinstance(maxp, int) else list(maxp)
        if len(self.max_period) != num_levels:
            raise ConfigError(f"config key 'max_period' has {len(self.max_period)} values but the "
                              f"topology has {num_levels} level(s); give one value or one per level")

    def _periods_from_config(self, default: int) -> tuple:
        periods = self.config.periods
        if periods is None:
            return (default,) * self.num_levels
        if len(periods) == 1 and self.num_levels > 1 and self.name == "adaptive":
            return tuple(periods) * self.num_levels
        if len(periods) != self.num_levels:
            raise ConfigError(f"config key 'periods' has {len(periods)} value(s) {periods} but the "
                              f"topology has {self.num_levels} level(s); give one period per level")
        return tuple(periods)

    def initial_periods(self) -> tuple:
        return self._periods_from_config(1)

    def choose(self, model: CostModel | None, current: tuple, cap: int | None,
               settled: bool = True) -> tuple:
        """Return ``(periods, reason)``; ``model`` is None until the levels were measured;
        ``settled`` is False while ``current`` are still the initial periods."""
        return current, "fixed"

    # -- the whole decision ---------------------------------------------------------------------
    def first(self, seed: CostModel | None = None, can_overlap: bool = False,
              chained: str | None = None) -> Decision:
        """The decision before any sync: the initial periods, or with a profile's cost model
        ``seed`` (adaptive, no configured periods) the periods it recommends, overlapped where
        ``overlap: auto`` would overlap them (as ``alsgd-tune recommend`` predicts).
        ``chained``: what ``chained_allreduce`` leaves to decide (``Scheduler._chained_mechanism``:
        None in one-level topologies, ``auto``, ``on``, ``off`` or ``none``); kept for
        :meth:`decide`. The sliced chained sync starts off under ``auto`` (the plain form is
        measured first)."""
        periods = self.initial_periods()
        self.chained_mode = chained
        mech = {"time_budget": self.config.time_budget is True, "overlap": self.config.overlap is True}
        why = {k: ("configured" if getattr(self.config, k) != "auto" else "not measured yet")
               for k in mech}
        if chained is not None:
            mech["chained"] = chained == "on"
            why["chained"] = self._chained_fixed(chained) or "not measured yet"
        if seed is not None and self.name == "adaptive" and self.config.periods is None:
            start = periods
            periods, _ = self.choose(seed, start, None, settled=False)
            if self.config.overlap == "auto":
                mech["overlap"], why["overlap"] = self._overlap(seed, start, None, False,
                                                                can_overlap, False)
                if mech["overlap"]:
                    periods, _ = self.choose(seed.with_overlap(), start, None, settled=False)
            return Decision(tuple(periods), "profile", mechanisms=mech, why=why)
        return Decision(tuple(periods), "initial", mechanisms=mech, why=why)

    def decide(self, model: CostModel | None, current: tuple, settled: bool,
               compute: np.ndarray, lr: float | None, rank_steps: list | None = None, *,
               previous: Decision | None = None, uneven_ok: bool = True,
               can_overlap: bool = False, timing_ready: bool = True,
               chained_model: CostModel | None = None, chained_predicted: bool = False) -> Decision:
        """The decision at a top-level sync. ``compute``: every rank's median step time (the
        shared table's column; negative where not measured yet); ``lr``: the shared learning
        rate (None if unknown); ``rank_steps``: the split in force, kept while some rank has
        no compute time yet; ``previous``: the decision in force (the mechanisms' hysteresis);
        ``uneven_ok``: every rank's loop accepts per-rank step counts (``time_budget: auto``
        needs it); ``can_overlap``: the integration can run an average in the background;
        ``timing_ready``: every rank's timing window is full enough for ``time_budget: auto``
        to switch; ``chained_model``: the sliced chained form's cost model (``chained_allreduce:
        auto``; ``chained_predicted``: some of its links are predicted from ``model``'s, not
        measured). ``model`` is the plain form's; with the chained sync on, the periods
        are chosen from ``chained_model``."""
        cap = self.cap(lr)
        before = previous.mechanisms if previous is not None else {}
        confirmed = None if previous is None else "time_budget" in previous.pending
        time_budget, why_tb, waits = self._time_budget(
            compute if timing_ready else -np.abs(compute), uneven_ok,
            before.get("time_budget", False), confirmed)
        pending = ("time_budget",) if waits else ()
        mode = self.chained_mode
        chained, why_ch = mode == "on", self._chained_fixed(mode)
        if mode == "auto":
            if self.config.overlap is True or before.get("overlap"):
                chained, why_ch = False, "overlapped averages are in force (one collective in flight)"
            else:
                chained, why_ch = self._chained(model, chained_model, chained_predicted,
                                                before.get("chained", False))
                if chained and can_overlap and self.config.overlap == "auto":
                    chained, why_ch = self._chained_or_overlap(model, chained_model, current, cap,
                                                               settled, why_ch)
            if chained:
                model, can_overlap = chained_model, False
        periods, reason = self.choose(model, current, cap, settled=settled)
        overlap, why_ov = self._overlap(model, current, cap, settled, can_overlap,
                                        before.get("overlap", False))
        if time_budget and overlap:  # one or the other: the one the cost model prices faster
            time_budget, why_tb, overlap, why_ov = self._faster_of_two(
                model, periods, current, cap, settled, compute, why_tb, why_ov)
        if overlap and self.config.overlap is not True:
            periods, reason = self.choose(model.with_overlap(), current, cap, settled=settled)
        split = rank_steps
        if time_budget and (compute > 0).all():
            periods, split = self.round_for_split(tuple(periods), compute, cap, model)
        elif not time_budget:
            split = None
        mech = {"time_budget": time_budget, "overlap": overlap}
        why = {"time_budget": why_tb, "overlap": why_ov}
        if mode is not None:
            mech["chained"], why["chained"] = chained, why_ch
        return Decision(tuple(periods), reason, split, cap, mech, why, pending)

    def cap(self, lr: float | None) -> int | None:
        """The largest global period allowed now: ``max_global_period`` and the quadratic
        synchronisation rule ``max(qsr_base, (qsr_alpha / lr)^2)`` (None: no cap). Without
        ``max_global_period`` a hierarchy whose ``max_period`` is one number keeps its global
        period under that number too, as a flat job does (its levels' periods would otherwise
        multiply to ``max_period ** levels`` steps between global averages); per-level caps
        (a list) leave the product."""
        cfg = self.config
        caps = [cfg.max_global_period] if cfg.max_global_period is not None else []
        if cfg.max_global_period is None and self.num_levels > 1 and isinstance(cfg.max_period, int):
            caps.append(cfg.max_period)
        if cfg.qsr_alpha is not None and lr and lr > 0:
            caps.append(max(cfg.qsr_base, int(math.floor((cfg.qsr_alpha / lr) ** 2))))
        return min(caps) if caps else None

    def split(self, base: int, compute: np.ndarray) -> list:
        """Time-budget rounds: each rank takes as many steps as fit in the slowest rank's
        ``base`` steps (the nearest count, at least 1, at most ``max_step_ratio x base``)."""
        return rank_split(base, compute.tolist(), self.config.max_step_ratio)

    # -- the mechanisms (each a function of shared values only) ------------------------------------
    def _time_budget(self, compute: np.ndarray, uneven_ok: bool, was_on: bool,
                     confirmed: bool | None = None) -> tuple:
        """On while the slowest/fastest compute ratio exceeds ``skew_threshold`` (off again
        below half the excess). Switching on takes two decisions in a row past the threshold
        (``confirmed``: the previous one was; None: a one-off prediction, no sequence): one
        window that a busy machine skewed for a moment does not switch the rounds. Returns
        ``(on, why, waits)``; ``waits``: past the threshold once, off until the next decision."""
        cfg = self.config
        if cfg.time_budget != "auto":
            return bool(cfg.time_budget), "configured", False
        if self.name != "adaptive":
            return False, "auto is the adaptive policy's (policy: fixed keeps step-count rounds)", False
        if not uneven_ok:
            return False, ("the training loop takes the same number of steps on every rank "
                           "(declare a stream loop with allow_uneven_steps to let faster ranks "
                           "take more)"), False
        if not (compute > 0).all():
            return was_on, "not every rank measured yet", False
        skew = float(compute.max() / compute.min())
        off_below = 1.0 + (cfg.skew_threshold - 1.0) / 2.0
        on = skew > cfg.skew_threshold or (was_on and skew >= off_below)
        bound = cfg.skew_threshold if not was_on else off_below
        why = (f"slowest/fastest compute {skew:.2f} {'>' if on else '<='} {bound:.3g} "
               f"(skew_threshold {cfg.skew_threshold:g})")
        if on and not was_on and confirmed is False:
            return False, why + ", once: on if the next sync sees it too", True
        return on, why, False

    @staticmethod
    def _chained_fixed(mode: str | None) -> str | None:
        """Why the chained sync is on or off when ``auto`` has nothing to decide (else None)."""
        if mode in ("on", "off"):
            return "configured"
        if mode == "none":
            return ("no sliced form for these blocks (hosts with different numbers of workers, "
                    "or an elastic job): one allreduce over all ranks")
        return None

    def _chained(self, plain, alt, predicted, was_on) -> tuple:
        """``chained_allreduce: auto``: the sliced chained sync while the cost model prices a
        global sync that way at least CHAINED_MIN_GAIN times cheaper than one allreduce over
        all ranks (and while it stays cheaper at all once on)."""
        if self.name != "adaptive":
            return False, "auto is the adaptive policy's (policy: fixed keeps one allreduce per sync)"
        if plain is None or alt is None:
            return was_on, "not measured yet"
        top = plain.num_levels - 1
        one, sliced = plain.sync_s[top], alt.sync_s[top]
        gain = one / max(sliced, 1e-12)
        need = 1.0 if was_on else CHAINED_MIN_GAIN
        on = gain >= need
        return on, (f"a global sync costs {one * 1e3:.1f} ms as one allreduce over all ranks, "
                    f"{sliced * 1e3:.1f} ms sliced ({'predicted' if predicted else 'measured'}: "
                    f"the blocks' reduce-scatter and allgather, the slices' allreduce): "
                    f"{gain:.2f}x ({'>=' if on else '<'} {need:.3g})")

    def _chained_or_overlap(self, plain, alt, current, cap, settled, why_ch) -> tuple:
        """The chained sync blocks (its stages depend on each other); one allreduce over all
        ranks can run in the background instead. Keep the chained sync unless ``overlap: auto``
        would overlap the plain form and the cost model prices that faster than the chained
        sync at its own periods (the overlap then decides the periods, as in a flat job)."""
        overlap, _ = self._overlap(plain, current, cap, settled, True, False)
        if not overlap:
            return True, why_ch
        ch_periods, _ = self.choose(alt, current, cap, settled=settled)
        ov_periods, _ = self.choose(plain.with_overlap(), current, cap, settled=settled)
        ch_rate = alt.steps_per_s(ch_periods)
        ov_rate = plain.with_overlap().steps_per_s(ov_periods)
        on = ch_rate >= ov_rate
        return on, (f"{why_ch}; blocking at {list(ch_periods)} {ch_rate:.1f} steps/s, one "
                    f"allreduce overlapped at {list(ov_periods)} {ov_rate:.1f} steps/s: "
                    f"{'the chained sync' if on else 'overlap'}")

    def _overlap(self, model, current, cap, settled, can_overlap, was_on) -> tuple:
        cfg = self.config
        if cfg.overlap != "auto":
            return bool(cfg.overlap), "configured"
        if self.name != "adaptive":
            return False, "auto is the adaptive policy's (policy: fixed keeps blocking averages)"
        if not can_overlap:
            return False, ("not available here (elastic jobs, chained syncs, compressed syncs and the "
                           "simulator block on averages)")
        if model is None or not hasattr(self, "best"):
            return False, "not measured yet"
        target = cfg.target_comm_fraction
        # the blocking averages' best (no hysteresis hold: a held period may sit above target)
        limit = target if not was_on else target * (1 - cfg.hysteresis)
        best = self.best(model, limit, cap)
        plain = model.comm_fraction(best)
        hidden_periods, _ = self.choose(model.with_overlap(), current, cap, settled=settled)
        hidden = model.with_overlap().comm_fraction(hidden_periods)
        # steps per second, overlapped over blocking: a late average costs accuracy in some
        # jobs (MNIST-1D, 4 ranks: -10.6 points forced on, for 1-12% more samples/s), so auto takes
        # it only where it pays that much
        gain = (1.0 - hidden) / max(1.0 - plain, 1e-12)
        need = OVERLAP_MIN_GAIN if not was_on else 1.0 + (OVERLAP_MIN_GAIN - 1.0) * (1 - cfg.hysteresis)
        on = plain > limit * (1 + 1e-9) and gain >= need
        return on, (f"blocking averages at their best periods {list(best)} spend "
                    f"{plain:.1%} in communication ({'>' if plain > limit else '<='} "
                    f"{limit:.1%}); overlapped: {hidden:.1%} at {list(hidden_periods)}, "
                    f"{gain:.2f}x the steps per second ({'>=' if gain >= need else '<'} {need:.3g})")

    def _faster_of_two(self, model, periods, current, cap, settled, compute, why_tb, why_ov):
        """Time-budget rounds and overlapped averages do not combine (per-rank round lengths,
        one average in flight): a configured one wins, else the one with more useful work per
        second (steps of all ranks) in the cost model, stragglers priced."""
        cfg = self.config
        if cfg.time_budget is True or (cfg.overlap is not True and not (compute > 0).all()):
            # configured, or not every rank priced yet: keep the time-budget rounds in force
            return True, why_tb, False, "time-budget rounds are in force (per-rank round lengths)"
        if cfg.overlap is True:
            return False, "overlap: true is configured (per-rank round lengths do not fit it)", \
                True, why_ov
        times = compute.tolist()
        priced = model.with_overlap(False).with_compute(times)
        tb_periods, split = self.round_for_split(tuple(periods), compute, cap, model)
        tb_rate = priced.job_steps_per_s(tb_periods, rank_steps=split)
        ov_periods, _ = self.choose(model.with_overlap(), current, cap, settled=settled)
        ov_rate = priced.with_overlap().job_steps_per_s(ov_periods)
        said = (f"cost model: time-budget rounds {tb_rate:.1f} steps/s at {list(tb_periods)}, "
                f"overlapped averages {ov_rate:.1f} steps/s at {list(ov_periods)}")
        if tb_rate > ov_rate:
            return True, f"{why_tb}; {said}", False, f"{said}: time-budget rounds"
        return False, f"{why_tb}; {said}: overlap", True, f"{why_ov}; {said}"

    def round_for_split(self, periods: tuple, compute: np.ndarray, cap: int | None,
                        model: CostModel | None) -> tuple:
        """The periods and split of time-budget rounds. Rounding the per-rank steps idles the
        ranks that finish first (short rounds, a skew that is not a whole ratio); that idling
        and the syncs together must waste at most ``target_comm_fraction`` of the ranks' time
        (:func:`wasted_share`: what the job does against the sum of every rank's rate). Where
        they waste more, the smallest longer level-0 period (at most 4x the chosen one, within
        ``max_period`` and the cap) that does not, or the one that wastes least (``model``
        None: the links not measured yet, priced free)."""
        times = compute.tolist()
        if model is None:
            model = CostModel(max(times), [0.0] * len(periods))
        priced = model.with_overlap(False).with_compute(times)
        split = self.split(periods[0], compute)
        target = self.config.target_comm_fraction
        waste = wasted_share(priced, periods, split)
        if waste <= target or self.name != "adaptive":
            return periods, split
        rest = math.prod(periods[1:])
        limit = min(self.max_period[0], 4 * periods[0])  # a longer round, not a different regime
        if cap is not None:
            limit = min(limit, max(periods[0], cap // rest))
        best = (waste, periods[0], split)
        for h0 in candidate_periods(limit):
            if h0 <= periods[0]:
                continue
            cand = self.split(h0, compute)
            waste = wasted_share(priced, (h0,) + tuple(periods[1:]), cand)
            if waste < best[0] - 1e-12:
                best = (waste, h0, cand)
            if waste <= target:
                break
        return (best[1],) + tuple(periods[1:]), best[2]


class FixedPolicy(Policy):
    """The configured periods, always (``policy: fixed``, ``periods: [H0, H1, ...]``)."""

    name = "fixed"


class AdaptivePolicy(Policy):
    """Smallest global period whose predicted communication share is under the target.

    Among the periods (one per level, each up to ``max_period``, their product up to the
    convergence cap) whose share is at most ``target_comm_fraction``, take the smallest
    global period (steps between global averages), then the smallest lower-level periods
    (more frequent cheap averaging). If none reaches the target, take the lowest share.
    Hysteresis: the current periods stay while their global period lies between the choices
    for the target loosened and tightened by ``hysteresis``, so noise does not flap them.
    """

    name = "adaptive"

    def initial_periods(self) -> tuple:
        """Level 0 at 1, upper levels at 2 (unless configured): every level then has syncs of
        its own, so each link gets measured before the first decision."""
        if self.config.periods is not None:
            return self._periods_from_config(1)
        return (1,) + (2,) * (self.num_levels - 1)

    def __init__(self, config: Config, num_levels: int):
        super().__init__(config, num_levels)
        self._cands = [candidate_periods(m) for m in self.max_period]
        # The grid and its orders never change: built once per process, not at every sync.
        (self._mesh, self._total, self._counts, self._order_feasible, self._total_feasible,
         self._order_total) = _grid_orders(tuple(tuple(c) for c in self._cands))
        self._last: tuple = (None, None, None)  # (model, grid fractions, the same in that order)

    def _fractions(self, model: CostModel) -> tuple:
        if self._last[0] is not model:  # choose() asks thrice about one model
            frac = model.grid_fraction(self._total, self._counts, self._mesh[:, 0])
            self._last = (model, frac, frac[self._order_feasible])
        return self._last[1], self._last[2]

    def best(self, model: CostModel, target: float, cap: int | None) -> tuple:
        frac, frac_ordered = self._fractions(model)
        total = self._total
        # The allowed points (global period <= cap) are a prefix of the feasible order.
        if cap is None:
            n_allowed = len(total)
        else:
            n_allowed = int(np.searchsorted(self._total_feasible, cap, side="right"))
            if n_allowed == 0:  # the cap is below every combination: the smallest one
                n_allowed = int(np.searchsorted(self._total_feasible, self._total_feasible[0],
                                                side="right"))
        ok = frac_ordered[:n_allowed] <= target
        first = int(np.argmax(ok))
        if ok[first]:
            pick = self._order_feasible[first]
        else:  # none reaches the target: the lowest share; among (near-)equal shares the
            # largest global period, so a slower link can never shorten it
            order = self._order_total
            shares = frac[order]
            if n_allowed < len(total):
                shares = np.where(total[order] <= self._total_feasible[n_allowed - 1], shares, np.inf)
            lowest = float(shares.min())
            near = np.flatnonzero(shares <= lowest * (1 + 1e-9) + 1e-15)
            pick = order[int(near[-1])]
        return tuple(int(h) for h in self._mesh[pick])

    def choose(self, model, current, cap, settled: bool = True):
        if model is None:
            return current, "measuring"
        target = self.config.target_comm_fraction
        best = self.best(model, target, cap)
        if best == tuple(current):
            return best, "hold"
        h = self.config.hysteresis
        p_cur = math.prod(current)
        # Hold only settled periods whose own share is within the loosened target: the
        # initial periods are a placeholder, and an equal global period is no reason to keep
        # a split of it that misses the target.
        if (h > 0 and settled and (cap is None or p_cur <= cap)
                and model.comm_fraction(current) <= target * (1 + h)):
            p_lo = math.prod(self.best(model, min(target * (1 + h), 0.999), cap))
            p_hi = math.prod(self.best(model, target * (1 - h), cap))
            if p_lo <= p_cur <= p_hi:
                return tuple(current), "hold"
        return best, "adapt"


@functools.lru_cache(maxsize=64)
def _grid_orders(cands: tuple) -> tuple:
    mesh, total, counts = grid_mesh(cands)
    # Feasible pick: the smallest global period, then the smallest H_0, H_1, ...
    order_feasible = np.lexsort([mesh[:, lvl] for lvl in reversed(range(len(cands)))] + [total])
    # Fallback: the lowest share, ties to the smallest global period (a stable sort).
    order_total = np.argsort(total, kind="stable")
    total_feasible = total[order_feasible]  # ascending
    for arr in (order_feasible, total_feasible, order_total):
        arr.flags.writeable = False
    return mesh, total, counts, order_feasible, total_feasible, order_total


POLICIES = {"adaptive": AdaptivePolicy, "fixed": FixedPolicy}


def make_policy(config: Config, num_levels: int) -> Policy:
    return POLICIES[config.policy](config, num_levels)
