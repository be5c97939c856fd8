"""An event-driven cluster simulator that runs the real :class:`~adaptive_lsgd.Scheduler`.

Plan a job at a scale no machine here has: per-worker compute times, per-level links, the
real scheduler code deciding the periods, and the resulting throughput::

    alsgd-sim --hosts 2 --workers-per-host 1 --compute-ms 50 \\
        --params 1000000 --inter-gbps 0.1 --steps 1000 --json

Model
-----
* Ranks are ``hosts x workers-per-host`` (``Topology.from_spec("HxS")``; a level of single
  ranks collapses, so one worker per host or one host is flat). Every rank has a clock.
* A local step of rank ``r`` takes ``compute_ms * f_r * max(0.05, 1 + jitter * N(0, 1))``
  where ``f_r`` is ``--slow-host-factor`` on host 0 and 1 elsewhere; the noise of the k-th
  step of rank r is fixed by ``--seed`` whatever the schedule.
* A collective stage over a link starts when its last member arrives and takes the ring
  allreduce time ``2 (n - 1) latency + 2 (n - 1) / n * bytes / bandwidth`` (``bytes =
  4 * params``; a link inside one host uses ``--intra-gbps`` and ``--intra-latency-us``,
  one across hosts ``--inter-gbps`` and ``--latency-us``). Each member leaves at the stage's
  end, and reports ``end - its own arrival`` to its scheduler, waiting included, as the
  integrations measure it. A sync at level ``l`` runs the stages :meth:`Topology.stages`
  lists: reduce stages up, the allreduce at ``l``, broadcast stages down.
* While the scheduler is in its mini-batch (warm-up) phase every step ends in a global
  gradient allreduce with the cost of a top-level sync, as ``hvd.DistributedOptimizer`` does.
* ``compute_only_samples_per_s`` is the same run (same steps, compute times and syncs) with
  every collective free: ranks still wait for the slowest member at each sync, so the ratio
  to ``samples_per_s`` is what the transfers cost.

What runs per rank and what is shared
-------------------------------------
Every rank has its own :class:`Scheduler` and the simulator calls its ``step_done`` on
every local step, its ``payload_row`` (top-level syncs) and its ``complete_sync`` on every
sync, with that rank's own compute and stage times: counters, timing windows, sync levels,
weights, health accounting and logging are the real per-rank code. Two things are built
once per sync instead of once per rank, to keep 10^4 ranks fast:

* the reduced payload: the sum a Sum-allreduce would give, built directly (the top-level
  table is the stack of the ranks' rows; the trailing weight and health sums are per
  level-``l`` block), not by summing O(world) vectors on every rank;
* with ``--decisions shared`` (the default above 256 ranks) the decision taken from that
  table: the first rank's scheduler computes it, the others adopt its result. This is
  sound because a decision is a pure function of the shared table and the shared history
  (invariant 1), and ``--check-agreement`` tests exactly that: every rank decides on its
  own from the full payload vectors, summed stage by stage with the integrations' semantics
  (non-root members zero their buffer on a broadcast stage), and the run stops with an
  error if two ranks ever hold different periods or decisions.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from .config import Config, check_supported, load_config
from .outer import wire_factor
from .scheduler import MINI_BATCH, DecisionShare, Scheduler
from .sync import NumpyBackend, SyncTarget, run_in_process, sync_protocol
from .topology import Topology

_NO_TENSORS = SyncTarget(list)  # the simulator averages no model, only the payload
SHARE_ABOVE = 256          # --decisions auto: share the decision above this many ranks
CHECK_MAX_RANKS = 4096     # check_agreement sums full O(world) vectors per rank


class SimulationError(RuntimeError):
    """The simulated ranks disagreed (a desync) or the run could not continue."""


class _Level:
    """The multi-member links of one level as flat arrays, for vectorised stage times."""

    def __init__(self, links: list, link_seconds: list):
        keep = [i for i, lk in enumerate(links) if len(lk) > 1]
        links = [links[i] for i in keep]
        self.seconds = np.array([link_seconds[i] for i in keep], dtype=np.float64)
        self.sizes = np.array([len(lk) for lk in links], dtype=np.int64)
        self.members = (np.concatenate([np.asarray(lk, dtype=np.int64) for lk in links])
                        if links else np.zeros(0, dtype=np.int64))
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)


def ring_allreduce_s(n: int, nbytes: float, gbps: float, latency_s: float) -> float:
    """Alpha-beta time of a ring allreduce of ``nbytes`` among ``n`` members."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * latency_s + 2 * (n - 1) / n * nbytes / (gbps * 1e9 / 8)


class ClusterSim:
    """One simulated job: ``hosts * workers_per_host`` ranks, each with its own scheduler.

    Example::

        >>> from adaptive_lsgd.config import load_config
        >>> from adaptive_lsgd.sim import ClusterSim
        >>> sim = ClusterSim(load_config({"policy": "fixed", "periods": [4]}, env={}),
        ...                  hosts=2, workers_per_host=1, compute_ms=10, params=1000,
        ...                  inter_gbps=10)
        >>> out = sim.run(steps=8)
        >>> out["global_syncs"], out["periods"], round(out["wall_s"], 4)
        (2, [4], 0.0802)
    """

    def __init__(self, config, hosts: int, workers_per_host: int, compute_ms: float, params: int,
                 inter_gbps: float, intra_gbps: float = 100.0, latency_us: float = 50.0,
                 intra_latency_us: float = 5.0, slow_host_factor: float = 1.0,
                 slow_from_step: int = 0, jitter: float = 0.0,
                 seed: int = 0, batch_size: int = 32, decisions: str = "auto",
                 check_agreement: bool = False):
        self.config = config = (config if isinstance(config, Config)
                                else load_config(config, env={}))
        check_supported(config, "sim")
        self.hosts, self.wph = hosts, workers_per_host
        self.world = world = hosts * workers_per_host
        self.topology = Topology.from_config(f"{hosts}x{workers_per_host}", ["h"] * world,
                                             chained=config.chained_allreduce)
        self.compute_s = compute_ms / 1000.0
        self.nbytes = 4.0 * params
        self.jitter = float(jitter)
        self.batch_size = batch_size
        self.check = check_agreement
        self._rng = np.random.default_rng(seed)
        self._noise = np.ones((0, world))
        host = np.arange(world) // workers_per_host
        self.base = np.full(world, self.compute_s)
        # Host 0 computes slow_host_factor x slower from its step slow_from_step on.
        self.slow = host == 0
        self.slow_factor, self.slow_from = float(slow_host_factor), int(slow_from_step)
        # Links and their times, per level, for each form the syncs may run (the plain one
        # and, with chained_allreduce: auto, its sliced alternative).
        self.forms = {}
        for topo in (self.topology, self.topology.alternative):
            if topo is None:
                continue
            levels = []
            for lvl in range(topo.num_levels):
                links = topo.links(lvl)
                secs = []
                for lk in links:
                    intra = lk[0] // workers_per_host == lk[-1] // workers_per_host
                    wire = wire_factor(config) if lvl == topo.num_levels - 1 else 1.0
                    secs.append(ring_allreduce_s(len(lk), self.nbytes * topo.model_share(lvl) * wire,
                                                 intra_gbps if intra else inter_gbps,
                                                 (intra_latency_us if intra else latency_us) * 1e-6))
                levels.append(_Level(links, secs))
            self.forms[topo.chained] = (topo, levels)
        self.levels = self.forms[self.topology.chained][1]
        self.link_s = [float(lv.seconds.max()) if len(lv.seconds) else 0.0 for lv in self.levels]
        self.block_ids = []
        for lvl in range(self.topology.num_levels):
            ids = np.empty(world, dtype=np.int64)
            for i, b in enumerate(self.topology.blocks(lvl)):
                ids[list(b)] = i
            self.block_ids.append(ids)
        if decisions == "auto":
            decisions = "shared" if world > SHARE_ABOVE else "per-rank"
        if check_agreement:
            decisions = "per-rank"
        self.decisions = decisions
        self.share = DecisionShare() if decisions == "shared" else None
        # The run so far: per-rank clocks (and the same with free collectives), accounting.
        self.clocks = np.zeros(world)
        self.free_clocks = np.zeros(world)
        self.compute_total = np.zeros(world)
        self.comm_total = np.zeros(world)
        self.done = np.zeros(world, dtype=np.int64)
        self.checked = 0
        self.scheds = []
        for r in range(world):
            # A simulated loop is a stream of batches: time_budget: auto may give ranks
            # different step counts.
            self.scheds.append(Scheduler(config, self.topology, r, param_bytes=int(self.nbytes),
                                         share=self.share, uneven_steps=True))
        self.periods_over_time = [[0, list(self.scheds[0].periods)]]

    # -- the model ----------------------------------------------------------------------------
    def _noise_rows(self, upto: int) -> np.ndarray:
        """Multipliers of compute time, one row per step index, drawn in order from the seed."""
        have = len(self._noise)
        if upto > have:
            grow = max(upto - have, 64)
            if self.jitter > 0:
                rows = np.maximum(0.05, 1.0 + self.jitter * self._rng.standard_normal((grow, self.world)))
            else:
                rows = np.ones((grow, self.world))
            self._noise = np.concatenate([self._noise, rows])
        return self._noise

    def _stage(self, clocks: np.ndarray, free: np.ndarray, lv: _Level, out: dict, key: tuple,
               share: float = 1.0) -> None:
        """Run the level's links ``lv`` as one stage on both clock vectors (``free`` has no
        cost); the stage takes ``share`` of the link's allreduce time."""
        if not len(lv.members):
            return
        m = lv.members
        arrive = clocks[m]
        end = np.repeat(np.maximum.reduceat(arrive, lv.starts) + share * lv.seconds, lv.sizes)
        clocks[m] = end
        free[m] = np.repeat(np.maximum.reduceat(free[m], lv.starts), lv.sizes)
        times = np.full(self.world, np.nan)
        times[m] = end - arrive
        out[key] = times

    def _collective(self, clocks, free, level: int, chained: bool | None = None) -> dict:
        """A sync at ``level``: one allreduce over the level's blocks, or (chained) reduce
        stages up, the top links' allreduce, broadcast stages down (sliced: reduce-scatters up
        and allgathers down, half an allreduce each). ``chained``: the form to run (default:
        the configured topology's)."""
        out: dict = {}
        topo, levels = self.forms[self.topology.chained if chained is None else chained]
        below = range(level) if topo.chained else ()
        up, down, share = (("reducescatter", "allgather", 0.5) if topo.sliced
                           else ("reduce", "broadcast", 1.0))
        for j in below:
            self._stage(clocks, free, levels[j], out, (up, j), share)
        self._stage(clocks, free, levels[level], out, ("allreduce", level))
        for j in reversed(below):
            self._stage(clocks, free, levels[j], out, (down, j), share)
        return out

    # -- the run ------------------------------------------------------------------------------
    def run(self, steps: int) -> dict:
        """Run until every rank has taken ``steps`` local steps in all (a later call goes on
        from there) and return the figures of the whole run so far."""
        started = time.perf_counter()
        world, scheds = self.world, self.scheds
        top = self.topology.num_levels - 1
        clocks, free = self.clocks, self.free_clocks
        compute, comm, done = self.compute_total, self.comm_total, self.done
        cols = np.arange(world)
        s0 = scheds[0]
        periods_over_time = self.periods_over_time
        frozen = gc.isenabled()
        if frozen:
            gc.collect()
            gc.freeze()
        try:
            while done.min() < steps:
                phase = s0.phase
                if phase == MINI_BATCH:
                    k = np.ones(world, dtype=np.int64)
                else:
                    k = np.array([s.steps_to_sync() for s in scheds], dtype=np.int64)
                if s0.rank_steps is None:  # step-count rounds: stop at ``steps`` (every rank
                    k = np.minimum(k, max(1, steps - int(done.min())))  # the same count)
                kmax = int(k.max())
                noise = self._noise_rows(int(done.max()) + kmax)
                idx = done[:, None] + np.arange(kmax)[None, :]
                mask = np.arange(kmax)[None, :] < k[:, None]
                step_s = noise[np.minimum(idx, len(noise) - 1), cols[:, None]] * self.base[:, None]
                if self.slow_factor != 1.0:
                    step_s = np.where(self.slow[:, None] & (idx >= self.slow_from),
                                      step_s * self.slow_factor, step_s)
                step_s = np.where(mask, step_s, 0.0)
                spent = step_s.sum(axis=1)
                clocks += spent
                free += spent
                compute += spent
                done += k
                rows = step_s.tolist()
                plans = [None] * world
                for r, (s, row, kr) in enumerate(zip(scheds, rows, k.tolist())):
                    plan = None
                    for i in range(kr):
                        plan = s.step_done(row[i])
                    plans[r] = plan
                if phase == MINI_BATCH:  # DistributedOptimizer: a gradient allreduce per step
                    for t in self._collective(clocks, free, top).values():
                        comm += np.nan_to_num(t)
                    if self.check:
                        self._check_same(lambda s: s.phase, "phase")
                    continue
                if plans[0] is None:
                    if any(p is not None for p in plans):
                        raise SimulationError("ranks disagree on whether to sync at step "
                                              f"{s0.step}")
                    continue
                self._sync(plans, clocks, free, comm)
                if plans[0].is_global:
                    if self.check:
                        self._check_same(lambda s: (s.periods, s.rank_steps, s.last_decision,
                                                    s.model and (s.model.compute_s, s.model.link_s)),
                                         "decision")
                        self.checked += 1
                    if list(s0.periods) != periods_over_time[-1][1]:
                        periods_over_time.append([s0.step, list(s0.periods)])
        finally:
            if frozen:
                gc.unfreeze()
            for s in scheds:
                s.log.close()
        wall = float(clocks.max())
        wall_free = float(free.max())
        samples = float(self.batch_size * done.sum())
        busy = float(compute.sum() + comm.sum())
        model = s0.model
        out = {
            "ranks": world,
            "hosts": self.hosts,
            "workers_per_host": self.wph,
            "levels": self.topology.num_levels,
            "steps": int(done.min()),
            "steps_per_rank": {"min": int(done.min()), "max": int(done.max())},
            "batch_size": self.batch_size,
            "samples": int(samples),
            "wall_s": wall,
            "samples_per_s": samples / wall if wall > 0 else None,
            "compute_only_samples_per_s": samples / wall_free if wall_free > 0 else None,
            "efficiency": wall_free / wall if wall > 0 else 1.0,
            "comm_fraction": float(comm.sum()) / busy if busy > 0 else 0.0,
            "periods": list(s0.periods),
            "periods_over_time": [[step, list(p)] for step, p in periods_over_time],
            "global_syncs": s0.global_syncs,
            "syncs_per_level": list(s0.syncs),
            "switch_step": s0.switch_step,
            "rank_steps": s0.rank_steps,
            "mechanisms": dict(s0.decision.mechanisms),
            "link_s": list(self.link_s),
            "model": None if model is None else {
                "compute_s": model.compute_s, "link_s": list(model.link_s),
                "predicted_comm_fraction": model.comm_fraction(s0.periods)},
            "decisions": self.decisions,
            "sim_runtime_s": time.perf_counter() - started,
        }
        if self.check:
            out["agreement"] = {"ranks": world, "global_syncs_checked": self.checked}
        return out

    def _sync(self, plans: list, clocks, free, comm) -> None:
        world, scheds = self.world, self.scheds
        level = plans[0].level
        if self.check and any(p is None or p.level != level for p in plans):
            raise SimulationError(f"ranks disagree on the sync at step {scheds[0].step}: levels "
                                  f"{[None if p is None else p.level for p in plans]}")
        times = self._collective(clocks, free, level,
                                 True if plans[0].chained_form else None)
        for t in times.values():
            comm += np.nan_to_num(t)
        tlists = {key: t.tolist() for key, t in times.items()}
        if self.check:  # every rank runs the integrations' sync protocol on its payload
            gens = [sync_protocol(p, s, NumpyBackend(), _NO_TENSORS) for s, p in zip(scheds, plans)]
            run_in_process(gens, lambda r, col: tlists[(col.stage.kind, col.stage.link_level)][r])
            return
        # The sums a Sum-allreduce gives, built directly (O(world), not O(world^2)).
        weights = np.array([p.weight for p in plans])
        if plans[0].is_global:
            table = np.stack([s.payload_row(p, True) for s, p in zip(scheds, plans)])
            full = np.empty(table.size + 2, dtype=np.float32)
            full[:-2] = table.ravel()
            full[-2] = np.float32(weights.sum())
            full[-1] = np.float32(world)
            reduced_per_rank = [full] * world
        else:
            ids = self.block_ids[level]
            red = np.empty((world, 2), dtype=np.float32)
            red[:, 0] = np.bincount(ids, weights)[ids]
            red[:, 1] = np.bincount(ids)[ids]
            reduced_per_rank = red
        for r, (s, p) in enumerate(zip(scheds, plans)):
            s.complete_sync(p, reduced_per_rank[r],
                            [tlists[(st.kind, st.link_level)][r] for st in p.stages])

    def _check_same(self, key, what: str) -> None:
        first = key(self.scheds[0])
        for r, s in enumerate(self.scheds):
            if key(s) != first:
                raise SimulationError(f"rank {r} disagrees with rank 0 on the {what} at step "
                                      f"{s.step}: {key(s)!r} != {first!r}")
