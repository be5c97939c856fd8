"""An in-process fake of the collectives the integrations run, driving N Scheduler replicas.

Each rank holds a buffer ``[weight * model, payload]``; every stage of a sync is a Sum over
the stage's link members, exactly as ``hvd.grouped_allreduce_(..., op=hvd.Sum,
process_set=...)`` does it, and on a ``broadcast`` stage every member but the root zeroes its
buffer first. The sliced chained sync's stages move slices like Horovod's collectives: a
``reducescatter`` leaves the member at link position ``i`` the ``i``-th of the sum's
``np.array_split`` pieces (Horovod gives the first ``n % k`` members one element more, as
``array_split`` does), an ``allgather`` concatenates the members' buffers in link order.
Stages are matched the way a real collective matches them: a link's stage runs once every
member has it next, so a schedule that would deadlock raises instead of hanging.
"""

from __future__ import annotations

import numpy as np

from adaptive_lsgd import DecisionLog, Scheduler


class MemoryLog(DecisionLog):
    """A decision log that keeps its records in a list (no file)."""

    def __init__(self):
        super().__init__(None)
        self.records = []

    def write(self, record: dict) -> None:
        self.records.append(dict(record))


class Deadlock(AssertionError):
    pass


def run_stages(plans: list, buffers: list) -> list:
    """Sum the buffers stage by stage; returns the number of stages each rank ran."""
    pos = [0] * len(plans)
    remaining = sum(len(p.stages) for p in plans if p is not None)
    while remaining:
        progressed = False
        for r, plan in enumerate(plans):
            if plan is None or pos[r] >= len(plan.stages):
                continue
            stage = plan.stages[pos[r]]
            if r != min(stage.ranks):  # the link's lowest rank drives it (any member would do)
                continue
            ready = all(plans[m] is not None and pos[m] < len(plans[m].stages)
                        and plans[m].stages[pos[m]].ranks == stage.ranks
                        and plans[m].stages[pos[m]].kind == stage.kind for m in stage.ranks)
            if not ready:
                continue
            if stage.kind == "allgather":
                results = [np.concatenate([buffers[m] for m in stage.ranks])] * len(stage.ranks)
            else:
                if stage.kind == "broadcast":
                    for m in stage.ranks:
                        if m != stage.root:
                            buffers[m] = np.zeros_like(buffers[m])
                lengths = {len(buffers[m]) for m in stage.ranks}
                assert len(lengths) == 1, f"{stage.kind} over {stage.ranks}: lengths {lengths}"
                total = np.sum([buffers[m] for m in stage.ranks], axis=0)
                if stage.kind == "reducescatter":
                    results = np.array_split(total, len(stage.ranks))
                else:
                    results = [total] * len(stage.ranks)
            for m, result in zip(stage.ranks, results):
                buffers[m] = np.array(result, dtype=np.float64)
                pos[m] += 1
            remaining -= len(stage.ranks)
            progressed = True
        if not progressed:
            raise Deadlock(f"stages cannot proceed: positions {pos}")
    return pos


class FakeCluster:
    """``size`` ranks, each with its own Scheduler, a model vector and an in-memory log.

    ``stage_time(rank, stage, plan)`` gives the wall time a rank measured for a stage
    (default: ``link_s[stage.link_level]``, half of it for the sliced sync's reduce-scatters
    and allgathers).
    """

    def __init__(self, config, topology, link_s=None, stage_time=None, param_len: int = 3,
                 models=None):
        self.topology = topology
        self.size = topology.size
        self.logs = [MemoryLog() for _ in range(self.size)]
        self.scheds = [Scheduler(config, topology, r, param_bytes=4 * param_len, log=self.logs[r])
                       for r in range(self.size)]
        self.link_s = list(link_s) if link_s is not None else [0.01] * topology.num_levels
        self.stage_time = stage_time or self._default_stage_time
        if models is None:
            models = [np.full(param_len, float(r)) for r in range(self.size)]
        self.models = [np.asarray(m, dtype=np.float64).copy() for m in models]
        self.syncs = []  # (step of rank 0, level, [SyncResult per rank])
        self.inflight = None  # overlap: (plans, summed buffers, models at the start, health)

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

    def _buffers(self, plans, healthy) -> list:
        """Each rank's ``[weight * model (zeros if unhealthy), payload]``."""
        n = len(self.models[0])
        buffers = []
        for r, (s, p) in enumerate(zip(self.scheds, plans)):
            model = self.models[r] * p.weight if healthy[r] else np.zeros(n)
            buffers.append(np.concatenate([model, s.payload(p, healthy[r]).astype(np.float64)]))
        return buffers

    def sync(self, plans, healthy=None):
        healthy = [True] * self.size if healthy is None else list(healthy)
        levels = {p.level for p in plans}
        assert len(levels) == 1, f"ranks sync at different levels {levels}"
        n = len(self.models[0])
        buffers = self._buffers(plans, healthy)
        ran = run_stages(plans, buffers)
        results = []
        for r, (s, p) in enumerate(zip(self.scheds, plans)):
            assert ran[r] == len(p.stages)
            assert len(buffers[r]) == n + p.payload_len, f"rank {r} ends with {len(buffers[r])} values"
            times = [self.stage_time(r, st, p) for st in p.stages]
            result = s.complete_sync(p, buffers[r][n:].astype(np.float32), times)
            self.models[r] = buffers[r][:n] / result.total_weight
            results.append(result)
        self.syncs.append((plans[0].step, plans[0].level, results))
        return results

    # -- overlap: the sync started at a round's end completes at the next round's end ---------
    def step_all_overlapped(self, compute_s, healthy=None, waited_s=0.0):
        """One local step on every rank with ``overlap``: at a round's end first finish the
        sync in flight (:meth:`finish_inflight`), then start this one. The sums are taken at
        the start (a real collective sums the buffers the ranks handed it then); each rank's
        model keeps what it did meanwhile: ``x <- average + (x - x at the start)``. Returns the
        finished sync's results, or None."""
        cs = compute_s if isinstance(compute_s, (list, tuple, np.ndarray)) else [compute_s] * self.size
        plans = [s.step_done(float(c)) for s, c in zip(self.scheds, cs)]
        if all(p is None for p in plans):
            return None
        assert all(p is not None for p in plans), f"only some ranks sync: {plans}"
        results = self.finish_inflight(waited_s)
        healthy = [True] * self.size if healthy is None else list(healthy)
        buffers = self._buffers(plans, healthy)
        run_stages(plans, buffers)
        self.inflight = (plans, buffers, [m.copy() for m in self.models], healthy)
        return results

    def finish_inflight(self, waited_s=0.0):
        """Complete the sync in flight (None if there is none) and apply it."""
        if self.inflight is None:
            return None
        (plans, buffers, snapshots, healthy), self.inflight = self.inflight, None
        n = len(self.models[0])
        results = []
        for r, (s, p) in enumerate(zip(self.scheds, plans)):
            times = [self.stage_time(r, st, p) for st in p.stages]
            waited = waited_s(r) if callable(waited_s) else waited_s
            result = s.complete_sync(p, buffers[r][n:].astype(np.float32), times, waited_s=waited)
            average = buffers[r][:n] / result.total_weight
            self.models[r] = self.models[r] - snapshots[r] + average if healthy[r] else average
            results.append(result)
        self.syncs.append((plans[0].step, plans[0].level, results))
        return results

    # -- views --------------------------------------------------------------------------------
    @property
    def periods(self) -> list:
        return [s.periods for s in self.scheds]

    def records(self, rank: int, drop=("time",)) -> list:
        return [{k: v for k, v in rec.items() if k not in drop} for rec in self.logs[rank].records]
