"""An in-process fake of the collectives the integrations run, driving N Scheduler replicas.

Each rank's model is a numpy vector; every sync runs the core's own protocol
(:func:`adaptive_lsgd.sync.sync_protocol`, the code the integrations run) over
:class:`~adaptive_lsgd.sync.NumpyBackend`, and :func:`~adaptive_lsgd.sync.run_in_process`
matches the ranks' collectives as a real transport does: a Sum over the stage's members
(``hvd.grouped_allreduce_(..., op=hvd.Sum, process_set=...)``), a reduce-scatter leaving the
member at link position ``i`` the ``i``-th ``np.array_split`` piece (Horovod gives the first
``n % k`` members one element more), an allgather concatenating in link order. A schedule
that would deadlock raises instead of hanging.
"""

from __future__ import annotations

import numpy as np

from adaptive_lsgd import DecisionLog, Scheduler
from adaptive_lsgd.sync import (
    Deadlock,
    NumpyBackend,
    SyncTarget,
    finish_overlapped,
    run_in_process,
    stage_collectives,
    start_overlapped,
    sync_protocol,
)

__all__ = ["MemoryLog", "Deadlock", "run_stages", "FakeCluster"]


class MemoryLog(DecisionLog):
    """A decision log that keeps its records in a list (no file)."""

    def __init__(self):
        super().__init__(None)
        self.records = []

    @property
    def writes(self) -> bool:
        return True

    def write(self, record: dict) -> None:
        self.records.append(dict(record))


def run_stages(plans: list, buffers: list) -> list:
    """Sum one buffer per rank over the plans' stages (in place); returns the stages each
    rank ran."""
    backend = NumpyBackend()

    def one(r, plan):
        out, times = yield from stage_collectives(plan, r, backend, [buffers[r]])
        buffers[r] = out[0]
        return len(times)

    return run_in_process([None if p is None else one(r, p) for r, p in enumerate(plans)],
                          lambda rank, collective: 0.0)


class _FakeAsync(NumpyBackend):
    """A rank's backend with the overlapped allreduce: the sum is taken over the buffers the
    members handed in at ``start`` (as a real collective sums what it was given) and is
    complete once every member has started it. ``waited`` is the time ``wait`` reports."""

    def __init__(self, rank: int, pending: dict):
        super().__init__()
        self.rank, self.pending, self.now, self.waited = rank, pending, 0.0, 0.0

    def clock(self) -> float:
        return self.now

    def start(self, collective):
        self.pending.setdefault(collective.ranks, {})[self.rank] = [b.copy() for b in collective.buffers]
        return collective.ranks

    def poll(self, handle) -> bool:
        return len(self.pending.get(handle, {})) == len(handle)

    def wait(self, handle) -> list:
        assert self.poll(handle), f"rank {self.rank} waits on {handle}, which not all members started"
        members = self.pending[handle]
        sums = [np.sum([members[m][i] for m in handle], axis=0) for i in range(len(members[self.rank]))]
        self.now += self.waited
        return sums


class FakeCluster:
    """``size`` ranks, each with its own Scheduler, a model vector and an in-memory log.

    ``scheduler_kw`` go to every rank's Scheduler (``uneven_steps``, ``can_overlap``, ...).
    ``stage_time(rank, stage, plan)`` gives the wall time a rank measured for a stage
    (default: ``link_s[stage.link_level]``, half of it for the sliced sync's reduce-scatters
    and allgathers).
    """

    def __init__(self, config, topology, link_s=None, stage_time=None, param_len: int = 3,
                 models=None, **scheduler_kw):
        self.topology = topology
        self.size = topology.size
        self.logs = [MemoryLog() for _ in range(self.size)]
        self.scheds = [Scheduler(config, topology, r, param_bytes=4 * param_len, log=self.logs[r],
                                 **scheduler_kw)
                       for r in range(self.size)]
        self.link_s = list(link_s) if link_s is not None else [0.01] * topology.num_levels
        self.stage_time = stage_time or self._default_stage_time
        if models is None:
            models = [np.full(param_len, float(r)) for r in range(self.size)]
        self.models = [np.asarray(m, dtype=np.float64).copy() for m in models]
        self.targets = [SyncTarget(lambda r=r: [self.models[r]]) for r in range(self.size)]
        self.syncs = []  # (step of rank 0, level, [SyncResult per rank])
        self.inflight = None  # overlap: (the ranks' InFlight, their backends)

    def _default_stage_time(self, rank, stage, plan) -> float:
        """The link's allreduce time; half of it for a reduce-scatter or an allgather."""
        half = stage.kind in ("reducescatter", "allgather")
        return self.link_s[stage.link_level] * (0.5 if half else 1.0)

    # -- driving ------------------------------------------------------------------------------
    def step_all(self, compute_s, lr=None, healthy=None):
        """One local step on every rank; runs the sync if one is due. Returns the results or
        None. ``compute_s`` is one number or one per rank."""
        cs = compute_s if isinstance(compute_s, (list, tuple, np.ndarray)) else [compute_s] * self.size
        plans = [s.step_done(float(c), lr=lr) for s, c in zip(self.scheds, cs)]
        if all(p is None for p in plans):
            return None
        assert all(p is not None for p in plans), f"only some ranks sync: {plans}"
        return self.sync(plans, healthy)

    def run_round(self, compute_s, lr=None, healthy=None, max_steps: int = 10_000):
        """Every rank steps until its scheduler asks for a sync (ranks may take different
        numbers of steps: mixed-speed mode), then the sync runs. ``compute_s(rank)`` or one
        number per rank gives each step's time."""
        plans = []
        for r, s in enumerate(self.scheds):
            plan = None
            for _ in range(max_steps):
                c = compute_s(r) if callable(compute_s) else compute_s[r]
                plan = s.step_done(float(c), lr=lr)
                if plan is not None:
                    break
            assert plan is not None, f"rank {r} never synced"
            plans.append(plan)
        return self.sync(plans, healthy)

    def sync(self, plans, healthy=None):
        """Run the core's sync protocol on every rank; ``healthy[r] = False`` makes rank r's
        finiteness check fail."""
        healthy = [True] * self.size if healthy is None else list(healthy)
        levels = {p.level for p in plans}
        assert len(levels) == 1, f"ranks sync at different levels {levels}"
        plan_of = dict(enumerate(plans))
        gens = [sync_protocol(p, s, NumpyBackend(healthy=h), t)
                for p, s, h, t in zip(plans, self.scheds, healthy, self.targets)]
        results = run_in_process(gens, lambda r, col: self.stage_time(r, col.stage, plan_of[r]))
        self.syncs.append((plans[0].step, plans[0].level, results))
        return results

    # -- overlap: the sync started at a round's end completes at the next round's end ---------
    def step_all_overlapped(self, compute_s, healthy=None, waited_s=0.0):
        """One local step on every rank with ``overlap``: at a round's end first finish the
        sync in flight (:meth:`finish_inflight`), then start this one
        (:func:`~adaptive_lsgd.sync.start_overlapped`). Returns the finished sync's results,
        or None."""
        cs = compute_s if isinstance(compute_s, (list, tuple, np.ndarray)) else [compute_s] * self.size
        plans = [s.step_done(float(c)) for s, c in zip(self.scheds, cs)]
        if all(p is None for p in plans):
            return None
        assert all(p is not None for p in plans), f"only some ranks sync: {plans}"
        results = self.finish_inflight(waited_s)
        self._start_inflight(plans, healthy)
        return results

    def step_all_auto(self, compute_s):
        """One local step on every rank (``compute_s(rank)`` gives its time) under ``overlap:
        auto``: at a round's end finish the sync in flight, then start this one in the
        background or run it, as the plans say (the same on every rank). Returns the plans'
        ``overlap`` flag, or None where no round ended."""
        plans = [s.step_done(float(compute_s(r))) for r, s in enumerate(self.scheds)]
        if plans[0] is None:
            assert all(p is None for p in plans), f"only some ranks sync: {plans}"
            return None
        assert len({p.overlap for p in plans}) == 1, plans
        self.finish_inflight()
        if plans[0].overlap:
            self._start_inflight(plans)
        else:
            self.sync(plans)
        return plans[0].overlap

    def _start_inflight(self, plans, healthy=None):
        healthy = [True] * self.size if healthy is None else list(healthy)
        pending: dict = {}
        backends = [_FakeAsync(r, pending) for r in range(self.size)]
        for b, h in zip(backends, healthy):
            b.healthy = h
        self.inflight = ([start_overlapped(p, s, b, t) for p, s, b, t
                          in zip(plans, self.scheds, backends, self.targets)], backends)

    def finish_inflight(self, waited_s=0.0):
        """Complete the sync in flight (None if there is none) and apply it: the transfer is
        seen complete after the stage time, the wait lasts ``waited_s`` (or ``waited_s(r)``)."""
        if self.inflight is None:
            return None
        (flights, backends), self.inflight = self.inflight, None
        results = []
        for r, (s, f, b, t) in enumerate(zip(self.scheds, flights, backends, self.targets)):
            f.done_t = f.start + self.stage_time(r, f.plan.stages[0], f.plan)
            b.waited = waited_s(r) if callable(waited_s) else waited_s
            results.append(finish_overlapped(f, s, b, t))
        self.syncs.append((flights[0].plan.step, flights[0].plan.level, results))
        return results

    # -- views --------------------------------------------------------------------------------
    @property
    def periods(self) -> list:
        return [s.periods for s in self.scheds]

    def records(self, rank: int, drop=("time",)) -> list:
        return [{k: v for k, v in rec.items() if k not in drop} for rec in self.logs[rank].records]
