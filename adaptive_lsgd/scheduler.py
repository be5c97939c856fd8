"""The scheduler: one per rank, it counts local steps, says when to sync at which level, and
re-decides the periods at every top-level sync from statistics all ranks share.

How agreement is kept (no rank ever decides from its own clock):

* A sync is a Sum-allreduce of ``weight * model`` plus a small float payload. At a top-level
  sync the payload holds one row per rank (one-hot slots: every rank writes only its own
  row, so the sum *is* the table of all rows, bit-identical on all ranks): its median step
  compute time, its median stage time per link level, its learning rate, a health flag.
  The trailing two numbers are the total weight and the number of healthy ranks.
* Decisions are a pure function of those tables and of the shared history of earlier ones,
  so every rank takes the same decision at the same sync. Statistics travel with syncs that
  happen anyway: there is no extra collective on any step.

Example, a whole job of two ranks in one process (an integration does the collective)::

    >>> import numpy as np
    >>> from adaptive_lsgd import Scheduler, Topology, load_config
    >>> cfg = load_config({"policy": "fixed", "periods": [2]}, env={})
    >>> ranks = [Scheduler(cfg, Topology.flat(2), rank=r) for r in range(2)]
    >>> plans = [s.step_done(compute_s=0.01) for s in ranks]
    >>> plans
    [None, None]
    >>> plans = [s.step_done(compute_s=0.01) for s in ranks]
    >>> plans[0].level, [st.kind for st in plans[0].stages]
    (0, ['allreduce'])
    >>> reduced = sum(s.payload(p) for s, p in zip(ranks, plans))   # what Sum-allreduce gives
    >>> results = [s.complete_sync(p, reduced, [0.002]) for s, p in zip(ranks, plans)]
    >>> results[0].total_weight, ranks[1].periods
    (2.0, (2,))
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .config import Config, load_config
from .cost_model import CostModel
from .decision_log import DecisionLog
from .outer import OuterState, uses_reference, wire_factor
from .policies import Decision, make_policy
from .profile import level_kinds, load_profile
from .timing import WindowStat, append_restarting, column_medians
from .topology import Stage, Topology

_LOG = logging.getLogger("adaptive_lsgd")
MINI_BATCH = "mini-batch"
LOCAL = "local"

# Columns of a rank's row in the top-level payload; link medians follow.
COL_COMPUTE, COL_STEPS, COL_LR, COL_HEALTHY, COL_SYNC, COL_UNEVEN, COL_SAMPLES = range(7)
BASE_COLS = 7
SPLIT_SAMPLES = 8  # time_budget: auto switches once every rank's window holds this many samples
STATE_VERSION = 1


class NonFiniteModelError(RuntimeError):
    """Every rank taking part in a sync had a non-finite model: nothing healthy to restore."""


class DesyncError(RuntimeError):
    """Ranks reached a top-level sync with different sync counts (a bug or a mixed config)."""


@dataclass
class SyncPlan:
    """What the integration must do now: the stages of a sync at ``level``.

    Scale the model by ``weight`` (1 unless mixed-speed mode), run each stage's Sum-allreduce
    over ``stage.ranks`` with the model tensors and :meth:`Scheduler.payload` (zeroing them
    first on a ``broadcast`` stage unless this rank is its ``root``), then divide by
    :attr:`SyncResult.total_weight`.
    """

    level: int
    stages: list
    weight: float
    is_global: bool
    step: int
    payload_len: int
    overlap: bool = False  # run in the background during the next round (adaptive_lsgd.sync)
    chained_form: bool = False  # the stages are the topology's alternative (chained: auto)


@dataclass
class SyncResult:
    total_weight: float
    healthy: int
    excluded_ranks: list = field(default_factory=list)
    periods: tuple = ()
    decision: str | None = None


def starts_local(config: Config) -> bool:
    """Whether a job with ``config`` starts in the local phase (no mini-batch warm-up)."""
    return config.warmup == 0


class DecisionShare:
    """Lets the ranks of one process (a simulator of thousands of ranks) take each top-level
    decision once. A decision and the statistics behind it are a pure function of the shared
    table and the shared history (invariant 1), so every rank would compute the same: the
    first rank to reach global sync ``k`` computes it, the others adopt that state. Pass one
    instance to every rank's :class:`Scheduler` (``share=``)."""

    __slots__ = ("sync", "state")

    def __init__(self):
        self.sync, self.state = None, None


# The scheduler state one top-level decision writes (what a DecisionShare hands on).
_DECISION_STATE = ("_hist_compute", "_hist_rank", "_hist_forms", "shared_lr", "model", "periods",
                   "rank_steps",
                   "last_decision", "decision")


class Scheduler:
    """Per-rank state machine of (post-)local SGD with periods chosen online.

    ``param_bytes`` (the bytes averaged per sync) only feeds the log and the cost model's
    link fits; ``log`` overrides ``config.log`` with a :class:`DecisionLog`; ``share`` (a
    :class:`DecisionShare`) lets ranks held in one process take each decision once.

    ``check_origin``: the first sync of this scheduler first checks that every rank began the
    local phase from the same model (:func:`adaptive_lsgd.sync.note_local_start`) and, if not,
    is rank 0's model instead of an average (:meth:`from_rank0`), so unrelated initialisations
    never mix. Integrations set it; every rank must give the same value.

    ``can_overlap``: the integration can run an average in the background (``overlap: auto``
    may then pick it); ``uneven_steps``: this rank's training loop accepts per-rank step
    counts (a stream of batches, no collectives of its own between syncs), which
    ``time_budget: auto`` needs on *every* rank (the flag travels in the shared table; set it
    later with :attr:`uneven_steps`).
    """

    def __init__(self, config: Config | dict | None, topology: Topology, rank: int,
                 param_bytes: int = 0, log: DecisionLog | None = None,
                 share: DecisionShare | None = None, check_origin: bool = False,
                 can_overlap: bool = False, uneven_steps: bool = False):
        self.config = load_config(config) if not isinstance(config, Config) else config
        # chained_allreduce: auto: the plain form and its sliced alternative (Topology.from_config);
        # the decision in force says which one the syncs run (:attr:`topology`)
        self._plain, self._alt = topology, topology.alternative
        self.decision: Decision | None = None
        self.rank = rank
        self.size = topology.size
        self.param_bytes = int(param_bytes)
        self.num_levels = topology.num_levels
        self.policy = make_policy(self.config, self.num_levels)
        self.share = share
        self.log = log if log is not None else DecisionLog.from_config(self.config, rank)
        cfg = self.config
        self.cols = BASE_COLS + self.num_levels
        self.phase = LOCAL if starts_local(cfg) else MINI_BATCH
        self.step = 0
        # A tuning-tool profile seeds the cost model until the levels are measured here.
        self.seed = self._seed_model()
        # Compressed syncs are two dependent collectives: never in the background.
        self.can_overlap = bool(can_overlap) and not (topology.chained and topology.num_levels > 1) \
            and cfg.compression == "none"
        # The outer step / compression reference (adaptive_lsgd.outer), or None.
        self.outer = OuterState(cfg) if uses_reference(cfg) else None
        self.decision = self.policy.first(self.seed, can_overlap=self.can_overlap,
                                          chained=self._chained_mechanism())
        self.periods = self.decision.periods
        self.rank_steps: list | None = None  # mixed-speed mode: level-0 steps per rank
        self._hist_rank: deque = deque(maxlen=cfg.history)  # every rank's compute, per decision
        self.uneven_steps = bool(uneven_steps)
        self._counters = [0] * self.num_levels
        self._compute = WindowStat(cfg.window, skip=cfg.timing_warmup)
        # link statistics per form (plain, alternative): level 0 (the blocks) is one and the same
        self._link_forms = self._new_forms(lambda: WindowStat(cfg.window))
        self._lr = -1.0
        self._initial_lr: float | None = None
        self._steps_since_global = 0
        self._steps_in_round = 0
        self.global_syncs = 0
        self.syncs = [0] * self.num_levels
        self._hist_compute: deque = deque(maxlen=cfg.history)
        self._hist_forms = self._new_forms(lambda: deque(maxlen=cfg.history))
        self.shared_lr: float | None = None
        self.model: CostModel | None = None
        self.last_decision: str | None = None
        self._own_healthy = True  # the health flag this rank gave the current sync's payload
        # Start from one model: checked at the first sync of a run (a state loaded from after
        # a sync turns it off: per-rank checkpoints of the local phase differ by design; an
        # elastic rebuild turns it on again). ``origin`` is this rank's fingerprint of the
        # model it began the local phase with.
        self.origin_pending = bool(check_origin)
        self.origin: np.ndarray | None = None
        self.switch_step: int | None = 0 if self.phase == LOCAL else None
        if self.decision.reason == "profile":
            self.model, self.last_decision = self.seed, "profile"
        # Local accounting for summaries (never used for decisions).
        self.time_compute = 0.0
        self.time_comm = 0.0
        self.time_mini_batch = 0.0
        self.steps_mini_batch = 0

    def _new_forms(self, make) -> list:
        """Per-level statistics for the plain form and (chained: auto) the alternative; the
        alternative shares level 0's (the same blocks, the same collective)."""
        plain = [make() for _ in range(self.num_levels)]
        if self._alt is None:
            return [plain]
        return [plain, plain[:1] + [make() for _ in range(1, self.num_levels)]]

    def _chained_mechanism(self) -> str | None:
        """What ``chained_allreduce`` leaves the policy: ``"auto"`` (an alternative to switch
        to), ``"on"``/``"off"`` (configured), ``"none"`` (auto, but no sliced form here: blocks
        of different sizes, or an elastic job), None (one level: no such mechanism)."""
        if self.num_levels < 2:
            return None
        if self._alt is not None:
            return "auto"
        if self._plain.chained:
            return "on"
        return "none" if self.config.chained_allreduce == "auto" else "off"

    @property
    def chained_form(self) -> bool:
        """The syncs run the alternative (sliced chained) form now (``chained_allreduce: auto``)."""
        d = self.decision
        return self._alt is not None and d is not None and bool(d.mechanisms.get("chained"))

    @property
    def topology(self) -> Topology:
        """The form the syncs run now: the plain topology, or its alternative."""
        return self._alt if self.chained_form else self._plain

    @property
    def _links(self) -> list:
        return self._link_forms[1 if self.chained_form else 0]

    @property
    def _hist_links(self) -> list:
        return self._hist_forms[1 if self.chained_form else 0]

    # -- what the integration asks ------------------------------------------------------------
    @property
    def needs_shared_lr(self) -> bool:
        """True while the switch waits for the first LR drop: pass a rank-agreed (allreduced)
        learning rate to :meth:`step_done` then."""
        return self.phase == MINI_BATCH and self.config.warmup == "first_lr_decay"

    @property
    def is_local(self) -> bool:
        return self.phase == LOCAL

    def level_steps(self) -> int:
        """Local steps this rank takes per level-0 round."""
        if self.rank_steps is not None:
            return self.rank_steps[self.rank]
        return self.periods[0]

    def steps_to_sync(self) -> int:
        """Local steps left until this rank's next sync (in the local phase)."""
        return max(1, self.level_steps() - self._steps_in_round)

    # -- the step -----------------------------------------------------------------------------
    def step_done(self, compute_s: float | None, lr: float | None = None) -> SyncPlan | None:
        """Report a finished local step (``compute_s``: from its start to the end of the local
        optimizer update; None when it is not known yet, e.g. a GPU step whose end event has
        not been read: then :meth:`record_compute` gives it later, before the next sync's
        :meth:`payload`). Returns the sync to run now, or None."""
        self.step += 1
        if lr is not None:
            self._lr = float(lr)
        if self.phase == MINI_BATCH:
            self.steps_mini_batch += 1
            if compute_s is not None:
                self.time_mini_batch += compute_s
            self._maybe_switch(lr)
            return None
        if compute_s is not None:
            self.time_compute += compute_s
            self._compute.add(compute_s)
        self._steps_since_global += 1
        self._steps_in_round += 1
        if self._steps_in_round < self.level_steps():
            return None
        level = 0
        for lvl in range(1, self.num_levels):
            self._counters[lvl] += 1
            if self._counters[lvl] < self.periods[lvl]:
                break
            self._counters[lvl] = 0
            level = lvl
        weight = float(self._steps_in_round) if self.weighs_by_steps else 1.0
        self._steps_in_round = 0
        is_global = level == self.num_levels - 1
        stages = self.topology.stages(level, self.rank)
        return SyncPlan(level, stages, weight, is_global, self.step,
                        (self.size * self.cols if is_global else 0) + 2,
                        overlap=self.overlapping and len(stages) == 1,
                        chained_form=self.chained_form)

    @property
    def weighs_by_steps(self) -> bool:
        """Time-budget rounds in force: the average is weighted by each rank's steps."""
        return self.rank_steps is not None or self.config.time_budget is True

    @property
    def overlapping(self) -> bool:
        """Averages run in the background during the next round (``overlap`` in force)."""
        return bool(self.decision.mechanisms.get("overlap"))

    def record_compute(self, times) -> None:
        """The compute times of steps reported with ``compute_s=None``, in step order."""
        for t in times:
            if self.phase == MINI_BATCH:
                self.time_mini_batch += float(t)
            else:
                self.time_compute += float(t)
                self._compute.add(float(t))

    def from_rank0(self, plan: SyncPlan) -> SyncPlan:
        """``plan`` replaced by a top-level sync that gives every rank rank 0's model (weight 1
        on rank 0, 0 elsewhere): the first sync when the ranks began from different models."""
        level = self.num_levels - 1
        self.log.write({"step": self.step, "event": "first_sync_from_rank0",
                        "reason": "the ranks began the local phase from different models (no "
                                  "broadcast from rank 0 before it): rank 0's model, not an average"})
        self._counters = [0] * self.num_levels
        stages = self.topology.stages(level, self.rank)
        return SyncPlan(level, stages, 1.0 if self.rank == 0 else 0.0, True, self.step,
                        self.size * self.cols + 2, overlap=plan.overlap and len(stages) == 1,
                        chained_form=self.chained_form)

    def sync_now(self) -> SyncPlan | None:
        """A top-level sync outside the schedule (e.g. to average the model before evaluation
        or at the end of training). Collective: every rank must call it at the same point.
        Returns None in the mini-batch phase, where the models are already identical."""
        if self.phase != LOCAL:
            return None
        weight = float(max(self._steps_in_round, 1)) if self.weighs_by_steps else 1.0
        self._steps_in_round = 0
        self._counters = [0] * self.num_levels
        level = self.num_levels - 1
        return SyncPlan(level, self.topology.stages(level, self.rank), weight, True, self.step,
                        self.size * self.cols + 2, chained_form=self.chained_form)

    def _maybe_switch(self, lr: float | None) -> None:
        warmup = self.config.warmup
        if warmup == "first_lr_decay":
            if lr is None:
                return
            # Against the peak so far: an LR warm-up ramp (Horovod's LearningRateWarmupCallback)
            # raises the LR first; the first *drop* below the peak ends the mini-batch phase.
            if self._initial_lr is None or lr > self._initial_lr:
                self._initial_lr = float(lr)
            elif lr < self._initial_lr * (1 - 1e-9):
                self._enter_local("first learning-rate drop")
        elif self.step >= warmup:
            self._enter_local(f"warm-up of {warmup} steps done")

    def _enter_local(self, why: str) -> None:
        self.phase = LOCAL
        self.switch_step = self.step
        self.log.write({"step": self.step, "event": "switch", "phase": LOCAL, "reason": why,
                        "periods": list(self.periods)})

    # -- the sync -----------------------------------------------------------------------------
    def payload(self, plan: SyncPlan, healthy: bool = True) -> np.ndarray:
        """This rank's contribution to the payload (float32): its row of statistics at a
        top-level sync, then ``weight`` and the health flag. Unhealthy ranks add weight 0."""
        self._own_healthy = healthy  # logged by complete_sync: this rank was reset
        out = np.zeros(plan.payload_len, dtype=np.float32)
        if plan.is_global:
            out[self.rank * self.cols:(self.rank + 1) * self.cols] = self.payload_row(plan, healthy)
        out[-2] = plan.weight if healthy else 0.0
        out[-1] = 1.0 if healthy else 0.0
        return out

    def payload_row(self, plan: SyncPlan, healthy: bool = True) -> np.ndarray:
        """This rank's row of the top-level table (float32, ``cols`` values): what
        :meth:`payload` writes at slot ``rank`` when ``plan.is_global``. A simulator can stack
        the rows of all ranks into the reduced table without building O(world) vectors."""
        row = np.empty(self.cols, dtype=np.float32)
        row[COL_COMPUTE] = self._compute.median()
        row[COL_STEPS] = self._steps_since_global
        row[COL_LR] = self._lr
        row[COL_HEALTHY] = 1.0 if healthy else 0.0
        row[COL_SYNC] = self.global_syncs
        row[COL_UNEVEN] = 1.0 if self.uneven_steps else 0.0
        row[COL_SAMPLES] = len(self._compute)
        for lvl, stat in enumerate(self._links):
            row[BASE_COLS + lvl] = stat.median()
        return row

    def sync_lr(self, plan: SyncPlan, reduced: np.ndarray) -> float | None:
        """The inner learning rate of a top-level sync every rank agrees on: the smallest the
        ranks reported in the reduced table (None below the top level, or if none reported)."""
        if not plan.is_global:
            return None
        lrs = np.asarray(reduced[COL_LR:self.size * self.cols:self.cols], dtype=np.float64)
        lrs = lrs[lrs > 0]
        return float(lrs.min()) if lrs.size else None

    def total_weight(self, plan: SyncPlan, reduced: np.ndarray) -> float:
        """The sum of the weights in a reduced payload (what the average divides by); raises
        :class:`NonFiniteModelError` when no taking part rank was healthy."""
        total = float(reduced[plan.payload_len - 2])
        if total <= 0:
            raise NonFiniteModelError(
                f"sync at level {plan.level} (step {plan.step}): every taking part rank had "
                f"non-finite parameters, there is no healthy model to restore. Lower the "
                f"learning rate or find the source of the NaN/Inf (with nonfinite_guard: false "
                f"the NaN/Inf is averaged into every rank's model instead)")
        return total

    def resets_state(self, healthy: bool) -> bool:
        """The state rule: zero the optimizer state after this sync (``momentum: reset``, or
        this rank was unhealthy and has just been reset to the average)."""
        return self.config.momentum == "reset" or not healthy

    def complete_sync(self, plan: SyncPlan, reduced: np.ndarray, stage_times,
                      waited_s: float | None = None, sync_s: float | None = None) -> SyncResult:
        """Take the reduced payload and this rank's stage wall times (one per stage it ran).

        ``waited_s``: with ``overlap`` the stage time is the transfer (from the start of the
        asynchronous allreduce to its completion, which the next round hid in part) and
        ``waited_s`` the time this rank was blocked on it, which the summary counts as
        communication. With ``overlap`` the integration calls this one round late, after the
        next round's :meth:`step_done` and before its :meth:`payload`: every rank does the
        same, so decisions stay shared (they take effect one round later).

        ``sync_s``: the wall time of the whole sync (packing, the health check and unpacking
        included, see :mod:`adaptive_lsgd.sync`): the summary counts it as communication, and
        what it spent outside the collectives is added to the level's own stage time, so the
        cost model prices the whole sync."""
        reduced = np.asarray(reduced, dtype=np.float32)
        times = [float(t) for t in stage_times]
        if waited_s is not None:
            comm = float(waited_s)
        else:
            comm = max(float(sync_s or 0.0), sum(times))
            extra = comm - sum(times)
            for i, stage in enumerate(plan.stages):
                if extra > 0 and stage.kind == "allreduce":
                    times[i] += extra
        self.time_comm += comm
        links = self._link_forms[1 if plan.chained_form else 0]  # the form the plan ran
        for stage, seconds in zip(plan.stages, times):
            if stage.kind == "reducescatter":  # half of an allreduce's traffic (ring algorithms)
                links[stage.link_level].add(2.0 * seconds)
            elif stage.kind not in ("broadcast", "allgather"):  # those wait for the levels above
                links[stage.link_level].add(seconds)
        total_weight = self.total_weight(plan, reduced)
        healthy = int(round(float(reduced[-1])))
        self.syncs[plan.level] += 1
        result = SyncResult(total_weight, healthy, periods=self.periods)
        record = {"step": plan.step, "sync": self.global_syncs, "level": plan.level}
        if plan.is_global:
            table = reduced[:self.size * self.cols].reshape(self.size, self.cols)
            if healthy < self.size:  # O(world): only when some rank was unhealthy
                result.excluded_ranks = [int(r) for r in np.flatnonzero(table[:, COL_HEALTHY] == 0)]
            before = self.decision.mechanisms
            result.decision = self._decide(table)
            if self.decision.mechanisms != before:  # a mechanism switched: say why in the log
                record["mechanism_reason"] = dict(self.decision.why)
                _LOG.info("adaptive-lsgd: step %d: mechanisms %s (%s)", plan.step,
                          self.decision.mechanisms, "; ".join(
                              f"{k}: {v}" for k, v in self.decision.why.items()))
            result.periods = self.periods
            self.global_syncs += 1
            self._steps_since_global = 0
            record["decision"] = result.decision
            record["excluded_ranks"] = result.excluded_ranks
        else:
            members = len(self.topology.block_of(plan.level, self.rank))
            record["excluded"] = members - healthy
        if not self._own_healthy:
            record["nonfinite_reset"] = True  # this rank's model was non-finite: reset to the average
            _LOG.warning("adaptive-lsgd: rank %d had non-finite parameters at step %d; left out of "
                         "the level-%d average and reset to the average of %d healthy rank(s)",
                         self.rank, plan.step, plan.level, healthy)
        self._own_healthy = True
        if self.log.writes:  # (the description costs more than the rest of a sync)
            record.update(self._describe(plan.level))
            self.log.write(record)
        return result

    # -- decisions (pure functions of shared tables and shared history) -----------------------
    def _decide(self, table: np.ndarray) -> str:
        syncs = table[:, COL_SYNC]
        if not (syncs == syncs[0]).all():
            raise DesyncError(f"ranks reached a top-level sync with different sync counts "
                              f"{syncs.astype(int).tolist()}: their configs or loops differ")
        share = self.share
        if share is not None and share.sync == self.global_syncs:
            for name, value in zip(_DECISION_STATE, share.state):
                setattr(self, name, value)
            return self.last_decision
        compute = table[:, COL_COMPUTE]
        if (compute >= 0).all():
            append_restarting(self._hist_compute, float(compute.max()))
        for lvl in range(self.num_levels):
            est = self._link_estimate(lvl, table[:, BASE_COLS + lvl])
            if est is not None:
                append_restarting(self._hist_links[lvl], est)
        lrs = table[:, COL_LR]
        if (lrs >= 0).any():
            self.shared_lr = float(lrs[lrs >= 0].min())
        if (compute > 0).all():
            append_restarting(self._hist_rank, compute.tolist())
            # the mechanisms and the split see each rank's median over the shared history:
            # one noisy window neither flips time-budget rounds nor moves the split
            rank_compute = self._rank_compute
            compute = np.asarray(rank_compute)
        else:
            rank_compute = self._rank_compute
        # a window of a few samples is noise: time_budget: auto waits for fuller ones
        ready = bool((table[:, COL_SAMPLES] >= min(self.config.window, SPLIT_SAMPLES)).all())
        plain = self._build_model(rank_compute, form=0)
        alt, predicted = self._alternative_model(rank_compute, plain)
        was_chained = self.chained_form
        self.decision = d = self.policy.decide(
            plain, self.periods, settled=self.last_decision not in (None, "measuring"),
            compute=compute, lr=self.shared_lr, rank_steps=self.rank_steps,
            previous=self.decision, uneven_ok=bool((table[:, COL_UNEVEN] > 0).all()),
            can_overlap=self.can_overlap, timing_ready=ready,
            chained_model=alt, chained_predicted=predicted)
        if was_chained and not self.chained_form:
            # Left because its measured syncs got dearer: the form keeps its last estimate, not
            # a median over the change (which would price it cheaper than it is now, and the
            # next noisy plain sync would switch it back on only to measure it dear again).
            for hist in self._hist_forms[1][1:]:
                if hist:
                    last = hist[-1]
                    hist.clear()
                    hist.append(last)
        self.model = alt if self.chained_form else plain
        self.periods, self.rank_steps, self.last_decision = d.periods, d.rank_steps, d.reason
        if share is not None:
            share.sync, share.state = self.global_syncs, tuple(getattr(self, n) for n in _DECISION_STATE)
        return d.reason

    @property
    def _rank_compute(self) -> list | None:
        """Each rank's median step time over the shared history (None before any)."""
        if not self._hist_rank:
            return None
        if len(self._hist_rank) == 1:
            return [float(c) for c in self._hist_rank[0]]
        return column_medians(np.asarray(self._hist_rank)).tolist()

    def _link_estimate(self, level: int, values: np.ndarray) -> float | None:
        """Transfer time of the level's link: the min over each link's members (the one that
        arrived last waited least), then the slowest link (the top sync waits for it)."""
        arrays = self.topology.link_arrays(level)
        if arrays is None:
            return None
        members, starts = arrays  # vectorised over links: 10^4 ranks make 10^3 links
        vals = values[members]
        measured = vals >= 0
        if measured.all():  # every member measured (after the first syncs: the usual case)
            return float(np.minimum.reduceat(vals, starts).max())
        if (np.add.reduceat(measured.astype(np.int64), starts) == 0).any():
            return None  # a link none of whose members has measured it yet
        per_link = np.minimum.reduceat(np.where(measured, vals, np.inf), starts)
        return float(per_link.max())

    @property
    def priced_model(self):
        """The cost model as the decision in force prices a round: with overlapped averages
        only the part of a sync the next round does not hide counts (None before any)."""
        m = self.model
        if m is not None and self.decision.mechanisms.get("overlap"):
            return m.with_overlap()
        return m

    def _describe(self, level: int) -> dict:
        m = self.model
        priced = self.priced_model
        return {
            "phase": self.phase,
            "periods": list(self.periods),
            "compute_s": None if m is None else m.compute_s,
            "comm_s": None if m is None else m.sync_s[level],
            "link_s": None if m is None else list(m.link_s),
            "predicted_comm_fraction": None if m is None else priced.comm_fraction(self.periods),
            "from_profile": self.seed is not None and (
                not self._hist_compute or not all(self._hist_links)),
            "lr": self.shared_lr,
            "rank_steps": self.rank_steps,
            "mechanism": dict(self.decision.mechanisms),
        }

    # -- summaries and state ------------------------------------------------------------------
    def summary(self) -> dict:
        """This rank's accounting: steps, syncs per level, local compute and comm seconds."""
        busy = self.time_compute + self.time_comm
        return {
            "steps": self.step,
            "switch_step": self.switch_step,
            "syncs_per_level": list(self.syncs),
            "periods": list(self.periods),
            "compute_s": self.time_compute,
            "comm_s": self.time_comm,
            "comm_fraction": self.time_comm / busy if busy > 0 else 0.0,
            "mini_batch_s": self.time_mini_batch,
            "mini_batch_steps": self.steps_mini_batch,
            "mechanisms": dict(self.decision.mechanisms),
            "rank_steps": self.rank_steps,
            "model": None if self.model is None else {
                "compute_s": self.model.compute_s, "link_s": self.model.link_s},
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "size": self.size,
            "levels": self.topology.describe()["levels"],
            "phase": self.phase,
            "step": self.step,
            "periods": list(self.periods),
            "rank_steps": self.rank_steps,
            "counters": list(self._counters),
            "compute": self._compute.state_dict(),
            "links": [s.state_dict() for s in self._link_forms[0]],
            # chained_allreduce: auto: the alternative form's levels above the blocks
            "links_alt": [s.state_dict() for s in self._link_forms[-1][1:]] if self._alt else None,
            "lr": self._lr,
            "initial_lr": self._initial_lr,
            "steps_since_global": self._steps_since_global,
            "steps_in_round": self._steps_in_round,
            "global_syncs": self.global_syncs,
            "syncs": list(self.syncs),
            "hist_compute": list(self._hist_compute),
            "hist_rank_compute": [list(c) for c in self._hist_rank],
            "hist_links": [list(h) for h in self._hist_forms[0]],
            "hist_links_alt": [list(h) for h in self._hist_forms[-1][1:]] if self._alt else None,
            "shared_lr": self.shared_lr,
            "switch_step": self.switch_step,
            "last_decision": self.last_decision,
            "mechanisms": dict(self.decision.mechanisms),
            "why": dict(self.decision.why),
            "pending": list(self.decision.pending),
            # The outer state's tensors are the integration's to save (backend buffers).
            "outer": None if self.outer is None else {"ready": self.outer.ready,
                                                      "steps": self.outer.steps},
            "accounting": [self.time_compute, self.time_comm, self.time_mini_batch,
                           self.steps_mini_batch],
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore a :meth:`state_dict`. With ``strict=False`` a state saved under another
        topology (an elastic job that changed size) carries over the phase, the step count
        and the periods where the number of levels matches; statistics start afresh."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"scheduler state version {state.get('version')!r} is not "
                             f"supported (expected {STATE_VERSION})")
        levels = self.topology.describe()["levels"]
        if state["size"] != self.size or state["levels"] != levels:
            if strict:
                raise ValueError(f"scheduler state was saved with topology {state['levels']} of "
                                 f"{state['size']} ranks; this job has {levels}")
            self.phase = state["phase"]
            self.step = state["step"]
            self.switch_step = state["switch_step"]
            if len(state["periods"]) == self.num_levels:
                self.periods = tuple(state["periods"])
            self._load_outer(state)
            self.log.resume()
            return
        self.phase = state["phase"]
        self.step = state["step"]
        self.periods = tuple(state["periods"])
        self.rank_steps = state["rank_steps"]
        self._counters = list(state["counters"])
        self._compute = WindowStat.from_state(state["compute"])
        plain = [WindowStat.from_state(s) for s in state["links"]]
        self._link_forms = [plain]
        if self._alt is not None:
            alt = state.get("links_alt") or []
            self._link_forms.append(plain[:1] + (
                [WindowStat.from_state(s) for s in alt] if alt
                else [WindowStat(self.config.window) for _ in range(1, self.num_levels)]))
        self._lr = state["lr"]
        self._initial_lr = state["initial_lr"]
        self._steps_since_global = state["steps_since_global"]
        self._steps_in_round = state["steps_in_round"]
        self.global_syncs = state["global_syncs"]
        self.syncs = list(state["syncs"])
        if any(self.syncs):  # resumed past the first sync: the ranks' models differ by design
            self.origin_pending = False
        self._hist_compute = deque(state["hist_compute"], maxlen=self.config.history)
        self._hist_rank = deque(state.get("hist_rank_compute") or [], maxlen=self.config.history)
        history = self.config.history
        hist = [deque(h, maxlen=history) for h in state["hist_links"]]
        self._hist_forms = [hist]
        if self._alt is not None:
            alt = state.get("hist_links_alt") or [[] for _ in range(1, self.num_levels)]
            self._hist_forms.append(hist[:1] + [deque(h, maxlen=history) for h in alt])
        self.shared_lr = state["shared_lr"]
        self.switch_step = state["switch_step"]
        self.last_decision = state["last_decision"]
        self.decision = Decision(self.periods, self.last_decision or "initial", self.rank_steps,
                                 None, dict(state.get("mechanisms", self.decision.mechanisms)),
                                 dict(state.get("why", self.decision.why)),
                                 tuple(state.get("pending", ())))
        (self.time_compute, self.time_comm, self.time_mini_batch,
         self.steps_mini_batch) = state["accounting"]
        self.model = self._build_model(self._rank_compute)
        self._load_outer(state)
        self.log.resume()

    def _load_outer(self, state: dict) -> None:
        """The outer state's tensors, where the integration put them (``"outer_state"``: the
        dict of :meth:`OuterState.state_dict`, in the integration's tensor type)."""
        if self.outer is not None and state.get("outer_state") is not None:
            self.outer.load_state_dict(state["outer_state"])

    def _seed_model(self) -> CostModel | None:
        """The cost model of the configured profile for this topology and model size."""
        if not self.config.profile:
            return None
        prof = load_profile(self.config.profile)
        topo = self.topology
        kinds = level_kinds(self.num_levels, topo.spans_hosts())
        levels = [(kind, topo.link_ranks(lvl)) for lvl, kind in enumerate(kinds)]
        # compressed global syncs send fewer bytes over the top level's links
        shares = [topo.model_share(lvl) * (wire_factor(self.config) if lvl == self.num_levels - 1
                                           else 1.0) for lvl in range(self.num_levels)]
        return prof.cost_model(levels, nbytes=self.param_bytes or None, chained=topo.chained,
                               shares=shares,
                               sliced=topo.sliced, overlap=self.config.overlap is True)

    def _build_model(self, rank_compute: list | None = None, form: int | None = None
                     ) -> CostModel | None:
        """The shared cost model (of the form in force, or ``form``: 0 plain, 1 the
        alternative), once compute and the top link were measured. A lower level
        not measured yet (its syncs may all have been subsumed by higher ones) takes the
        nearest measured level above it: an upper bound, since lower links are the cheap ones.
        With a profile, whatever was not measured yet comes from the profile's model."""
        if form is None:
            form = 1 if self.chained_form else 0
        topo = self._alt if form else self._plain
        hist = self._hist_forms[form]
        seed = self.seed
        if seed is not None and not form:
            compute = statistics.median(self._hist_compute) if self._hist_compute else seed.compute_s
            links = [statistics.median(h) if h else s for h, s in zip(hist, seed.link_s)]
            return CostModel(compute, links, chained=topo.chained, sliced=topo.sliced,
                             overlap=self.config.overlap is True, rank_compute_s=rank_compute)
        if not self._hist_compute or not hist[-1]:
            if form:  # the alternative's top not measured yet: predicted from the plain form
                return self._alternative_model(rank_compute, self._build_model(rank_compute, 0))[0]
            return None
        links = [statistics.median(h) if h else None for h in hist]
        for lvl in reversed(range(len(links) - 1)):
            if links[lvl] is None:
                links[lvl] = links[lvl + 1]
        return CostModel(statistics.median(self._hist_compute), links,
                         chained=topo.chained, sliced=topo.sliced,
                         overlap=self.config.overlap is True, rank_compute_s=rank_compute)

    def _alternative_model(self, rank_compute: list | None, plain: CostModel | None) -> tuple:
        """``(model, predicted)``: the alternative (sliced chained) form's cost model: its
        levels as measured while it ran, the others predicted from the plain form's links
        (:meth:`Topology.link_ratio`); ``(None, False)`` without an alternative or a plain model."""
        if self._alt is None or plain is None:
            return None, False
        hist = self._hist_forms[1]
        links, predicted = [], False
        for lvl, h in enumerate(hist):
            if h:
                links.append(statistics.median(h))
            else:
                links.append(plain.link_s[lvl] * self._plain.link_ratio(lvl))
                predicted = predicted or lvl > 0
        return CostModel(plain.compute_s, links, chained=True, sliced=True,
                         overlap=self.config.overlap is True, rank_compute_s=rank_compute), predicted


__all__ = ["Scheduler", "SyncPlan", "SyncResult", "Stage", "NonFiniteModelError", "DesyncError",
           "DecisionShare",
           "MINI_BATCH", "LOCAL"]
