"""PyTorch over Horovod: a drop-in ``DistributedOptimizer`` running adaptive local SGD.

A Horovod script changes one line::

    import horovod.torch as hvd
    import adaptive_lsgd.integrations.torch as alsgd

    hvd.init()
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * hvd.size(), momentum=0.9)
    optimizer = alsgd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                           model=model, config={"warmup": 500})
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    print(alsgd.summary(optimizer))   # on every rank: it gathers the per-rank figures

In the mini-batch phase (the first ``warmup`` steps, or until the first learning-rate drop)
``step()`` *is* Horovod's: gradients are allreduced with Horovod's own code. In the local
phase the gradient hooks stand aside; after the local update the core scheduler says when to
average the parameters (and BatchNorm buffers) over which process set. Every decision comes
from the core (``adaptive_lsgd.Scheduler``); this file only moves tensors and times them.

With ``overlap: true`` an average runs in the background during the next round and is applied
at that round's end (``optimizer.wait_for_average()`` applies it earlier, e.g. before saving).

This module sets ``HOROVOD_DYNAMIC_PROCESS_SETS=1`` when imported (unless set), so import it
before ``hvd.init()``; hierarchical topologies need it.

Elastic Horovod: put the optimizer in ``hvd.elastic.TorchState``; ``state_dict()`` carries the
scheduler state, and after a reset the first hook or ``step()`` rebuilds topology, process sets
and scheduler over the new world (docs/elastic.md).
"""

from __future__ import annotations

import os

_INIT_BEFORE_IMPORT = "HOROVOD_DYNAMIC_PROCESS_SETS" not in os.environ
os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

import copy  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402
from horovod.torch.optimizer import _DistributedOptimizer  # noqa: E402

from adaptive_lsgd import agreement  # noqa: E402
from adaptive_lsgd.config import Config, ConfigError, load_config  # noqa: E402
from adaptive_lsgd.integrations._horovod import (  # noqa: E402
    ProcessSets,
    elastic_job,
    host_name,
    install_exit_barrier,
)
from adaptive_lsgd.scheduler import Scheduler, SyncPlan  # noqa: E402
from adaptive_lsgd.summary import combine_summaries  # noqa: E402
from adaptive_lsgd.topology import Topology  # noqa: E402

__all__ = ["DistributedOptimizer", "summary", "host_name", "process_set_for"]

_INIT_BEFORE_IMPORT = _INIT_BEFORE_IMPORT and hvd.is_initialized()
_NOTHING = object()  # no scheduler state waiting for the next build
_PROCESS_SETS = ProcessSets(hvd, "adaptive_lsgd.integrations.torch",
                            init_before_import=_INIT_BEFORE_IMPORT)


def process_set_for(ranks: tuple):
    """The Horovod process set over ``ranks`` (see :class:`ProcessSets`)."""
    return _PROCESS_SETS.get(ranks)


def _init_token():
    """An object that changes whenever Horovod is (re-)initialised: ``horovod.torch.init()``
    replaces its handle map on every call (an elastic reset is ``shutdown(); init()``)."""
    return hvd.mpi_ops._handle_map


def _exit_barrier() -> None:
    hvd.allreduce(torch.zeros(1), op=hvd.Sum, name="alsgd.exit")


_SETS_TOKEN = [None]  # the init the cached process sets belong to
_WARNED: list = []
_WARNED_CHAINED: list = []
_WARNED_INFLIGHT: list = []


class _InFlight:
    """An overlapped average: its plan, Horovod handle, this rank's tensors at the round's end
    (``snapshot``), the buffers being summed (``send``, then the sum) and the payload."""

    __slots__ = ("plan", "handle", "snapshot", "send", "payload", "healthy", "start", "done_t")

    def __init__(self, plan, handle, snapshot, send, payload, healthy, start):
        self.plan, self.handle, self.snapshot, self.send = plan, handle, snapshot, send
        self.payload, self.healthy, self.start, self.done_t = payload, healthy, start, None


class _Runtime:
    """What one optimizer needs from one Horovod initialisation: config, topology, process
    sets, scheduler. Building it is a collective (an allgather, and with ``share`` a broadcast
    of rank 0's scheduler state ``carry``, which an elastic job's new workers lack, and of
    rank 0's count of Horovod worlds ``world``)."""

    def __init__(self, config: Config, param_bytes: int, carry: dict | None = None,
                 share: bool = False, world: int = 0):
        self.config = config
        self.world = world
        self.param_bytes = param_bytes
        self.token = _init_token()
        if _SETS_TOKEN[0] is not self.token:  # Horovod re-initialised: its process sets are gone
            _PROCESS_SETS.clear()
            _SETS_TOKEN[0] = self.token
        infos = hvd.allgather_object(agreement.rank_info(config, host_name()), name="alsgd.rank_info")
        agreement.check_agreement(infos)
        if share:
            carry, self.world = hvd.broadcast_object((carry, world), root_rank=0,
                                                     name="alsgd.scheduler_state")
        self.topology = Topology.from_config(config.topology, [i["host"] for i in infos],
                                             chained=config.chained_allreduce,
                                             elastic=elastic_job())
        self.process_sets = {ranks: process_set_for(ranks) for ranks in self.topology.process_sets()}
        own_sets = any(ps is not hvd.global_process_set for ps in self.process_sets.values())
        if own_sets:  # block-local last syncs: no rank may shut Horovod down before the others
            install_exit_barrier(_exit_barrier)
        if own_sets and elastic_job() and not _WARNED:
            _WARNED.append(True)
            warnings.warn("adaptive-lsgd: this hierarchical topology uses Horovod process sets; with "
                          "Horovod 0.28.1 and Gloo a worker *failure* then aborts every worker "
                          "(horovod issue #4021). Graceful host changes work; 'topology: auto' (the "
                          "default) is flat in elastic jobs for that reason (see docs/elastic.md)",
                          stacklevel=2)
        topo = self.topology
        if topo.chained and not topo.sliced and topo.num_levels > 1 and not _WARNED_CHAINED:
            _WARNED_CHAINED.append(True)
            warnings.warn("adaptive-lsgd: the chained sync runs in the leaders' form (blocks of "
                          "different sizes, or chained_allreduce: leaders): pass name= to your own "
                          "Horovod collectives. Horovod's "
                          "automatic names count the operations each process enqueued, the block "
                          "leaders enqueue more than the other ranks, and an unnamed collective "
                          "would wait forever (README, 'Known limits')", stacklevel=2)
        self.rank = hvd.rank()
        self.scheduler = Scheduler(config, self.topology, self.rank, param_bytes)
        if carry is not None:
            self.scheduler.load_state_dict(carry, strict=False)
            if share:
                self.scheduler.log.write({"step": self.scheduler.step, "event": "elastic_reset",
                                          "size": self.topology.size, "previous_size": carry["size"],
                                          "periods": list(self.scheduler.periods),
                                          "phase": self.scheduler.phase})

    @property
    def current(self) -> bool:
        """False once Horovod was re-initialised (an elastic reset) since this was built."""
        return self.token is _init_token()

    def load(self, state: dict | None) -> None:
        """Load a scheduler state (None: start the scheduler afresh); not a collective. A state
        saved under another world size (an elastic commit from before a reset) carries the
        phase, step count and periods; statistics start afresh."""
        if state is None:
            self.scheduler.log.close()
            self.scheduler = Scheduler(self.config, self.topology, self.rank, self.param_bytes)
            self.scheduler.log.resume()  # append to the log of this run, do not truncate it
        else:
            self.scheduler.load_state_dict(state, strict=False)


WAIT_MAX_SLEEP_S = 1e-3


def _wait(handle):
    """``hvd.synchronize(handle)`` without its busy wait: Horovod's PyTorch ``synchronize``
    spins on ``sched_yield`` until the collective completes, a core per waiting rank. Averages
    across slow links wait long, and on hosts where ranks share cores the spinning starves the
    background threads and the network stack that do the transfer (on the emulated 2 x 2
    cluster it turned single averages seconds slower). Poll instead, sleeping a twentieth of
    the time waited so far (at least 10 µs, at most ``WAIT_MAX_SLEEP_S``): the latency added
    to a collective stays near 5% of its time, and a short one is polled almost as often as
    the spin would."""
    start = time.perf_counter()
    while not hvd.poll(handle):
        time.sleep(min(WAIT_MAX_SLEEP_S, max(1e-5, 0.05 * (time.perf_counter() - start))))
    return hvd.synchronize(handle)


def _sliced_sum(tensors: list, payload: torch.Tensor, stages: list, process_sets: dict) -> list:
    """Sum ``tensors`` and ``payload`` in place over a sliced chained sync's stages
    (reduce-scatters up, an allreduce of the slices, allgathers down); returns each stage's
    wall time. One flat buffer per dtype (the payload rides in the float32 one), padded so
    that no rank's slice is empty."""
    groups: dict = {torch.float32: []}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    dtypes = sorted(groups, key=str)
    pieces = math.prod(len(st.ranks) for st in stages if st.kind == "reducescatter")
    flats = []
    for dtype in dtypes:
        parts = [t.reshape(-1) for t in groups[dtype]] + ([payload] if dtype == torch.float32 else [])
        flat = torch.cat(parts)
        if flat.numel() < pieces:
            flat = torch.cat([flat, flat.new_zeros(pieces - flat.numel())])
        flats.append(flat)
    times = []
    for stage in stages:
        ps = process_sets.get(stage.ranks, hvd.global_process_set)
        name = f"alsgd.{stage.kind}.{stage.link_level}"
        start = time.perf_counter()
        if stage.kind == "reducescatter":
            flats = _wait(hvd.grouped_reducescatter_async(flats, op=hvd.Sum, name=name, process_set=ps))
        elif stage.kind == "allgather":
            flats = _wait(hvd.grouped_allgather_async(flats, name=name, process_set=ps))
        else:
            _wait(hvd.grouped_allreduce_async_(flats, op=hvd.Sum, name=name, process_set=ps))
        times.append(time.perf_counter() - start)
    for dtype, flat in zip(dtypes, flats):
        offset = 0
        for t in groups[dtype] + ([payload] if dtype == torch.float32 else []):
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return times


class _LocalSGDMixin:
    """Methods that override Horovod's ``_DistributedOptimizer`` in the dynamic class."""

    def _make_hook(self, p):
        horovod_hook = _DistributedOptimizer._make_hook(self, p)

        def hook(*ignore):
            if self._alsgd_runtime().scheduler.is_local:
                return None  # local phase: no gradient communication
            return horovod_hook(*ignore)

        return hook

    def synchronize(self):
        if self._alsgd_runtime().scheduler.is_local:
            self._synchronized = True
            return
        return _DistributedOptimizer.synchronize(self)

    def zero_grad(self, set_to_none: bool = True):
        if self._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() "
                                 "but before optimizer.step() or optimizer.synchronize(). "
                                 "This is prohibited as it can cause a race condition.")
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        rt = self._alsgd_runtime()
        sched = rt.scheduler
        if not sched.is_local:
            lr = self._alsgd_lr()
            handle = None
            if sched.needs_shared_lr and hvd.size() > 1:
                handle = hvd.allreduce_async(torch.tensor([lr], dtype=torch.float64), op=hvd.Min,
                                             name="alsgd.lr")
            loss = _DistributedOptimizer.step(self, closure)
            if handle is not None:
                lr = float(hvd.synchronize(handle)[0])
            now = self._alsgd_now()
            sched.step_done(now - self._alsgd_t, lr=lr)
            self._alsgd_t = now
            return loss
        loss = super(self.__class__, self).step(closure)
        now = self._alsgd_now()
        plan = sched.step_done(now - self._alsgd_t, lr=self._alsgd_lr())
        inflight = self._alsgd_inflight
        if inflight is not None and inflight.done_t is None and hvd.poll(inflight.handle):
            inflight.done_t = now  # the transfer ended during this step (one step's resolution)
        if plan is not None:
            if rt.config.overlap:
                self._alsgd_overlapped_sync(plan)
            else:
                self._alsgd_sync(plan)
            now = self._alsgd_now()
        self._alsgd_t = now
        return loss

    # -- averaging ----------------------------------------------------------------------------
    def _alsgd_tensors(self) -> list:
        """Parameters, then floating buffers, then (momentum 'average') optimizer state."""
        cfg = self._alsgd.config
        tensors = [p for group in self.param_groups for p in group["params"]]
        if cfg.average_buffers and self._alsgd_model is not None:
            tensors += [b for b in self._alsgd_model.buffers() if b.is_floating_point()]
        if cfg.momentum == "average":
            tensors += self._alsgd_state_tensors()
        return [t for t in tensors if t.is_floating_point()]

    def _alsgd_state_tensors(self) -> list:
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                for value in self.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.is_floating_point() and value.shape == p.shape:
                        out.append(value)
        return out

    def _alsgd_contribution(self, plan: SyncPlan) -> tuple:
        """The tensors to average, whether they are all finite (the guard), and the payload."""
        rt = self._alsgd
        tensors = self._alsgd_tensors()
        healthy = True
        if rt.config.nonfinite_guard:
            healthy = all(bool(torch.isfinite(t).all()) for t in tensors)
        return tensors, healthy, torch.from_numpy(rt.scheduler.payload(plan, healthy))

    @torch.no_grad()
    def _alsgd_sync(self, plan: SyncPlan) -> None:
        rt = self._alsgd
        tensors, healthy, payload = self._alsgd_contribution(plan)
        if not healthy:
            torch._foreach_zero_(tensors)
        elif plan.weight != 1.0:
            torch._foreach_mul_(tensors, plan.weight)
        if any(stage.kind == "reducescatter" for stage in plan.stages):
            times = _sliced_sum(tensors, payload, plan.stages, rt.process_sets)
        else:
            times = []
            for stage in plan.stages:
                if stage.kind == "broadcast" and rt.rank != stage.root:
                    torch._foreach_zero_(tensors)
                    payload.zero_()
                start = time.perf_counter()
                _wait(hvd.grouped_allreduce_async_(
                    tensors + [payload], op=hvd.Sum, name=f"alsgd.{stage.kind}.{stage.link_level}",
                    process_set=rt.process_sets.get(stage.ranks, hvd.global_process_set)))
                times.append(time.perf_counter() - start)
        result = rt.scheduler.complete_sync(plan, payload.numpy(), times)
        if result.total_weight != 1.0:
            torch._foreach_div_(tensors, result.total_weight)
        state = self._alsgd_state_tensors() if rt.config.momentum == "reset" or not healthy else []
        if state:  # plain SGD (or no step yet) has no state, and _foreach_zero_ refuses []
            torch._foreach_zero_(state)

    # -- helpers ------------------------------------------------------------------------------
    def _alsgd_lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    def _alsgd_now(self) -> float:
        if self._alsgd_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    # -- overlapped averaging (config key 'overlap') ---------------------------------------
    @torch.no_grad()
    def _alsgd_overlapped_sync(self, plan: SyncPlan) -> None:
        """Finish the average started at the previous round's end, then start this round's in
        the background: every rank issues the same collectives in the same order, one
        grouped allreduce per round, as without overlap."""
        self.wait_for_average()
        if len(plan.stages) != 1:  # a rank alone in its block (or a job of one): nothing to send
            self._alsgd_sync(plan)
            return
        rt = self._alsgd
        tensors, healthy, payload = self._alsgd_contribution(plan)
        snapshot = [t.detach().clone() for t in tensors]
        if not healthy:
            send = [torch.zeros_like(t) for t in tensors]
        else:
            send = [t.clone() for t in snapshot]
            if plan.weight != 1.0:
                torch._foreach_mul_(send, plan.weight)
        stage = plan.stages[0]
        start = time.perf_counter()
        handle = hvd.grouped_allreduce_async_(
            send + [payload], op=hvd.Sum, name=f"alsgd.overlap.{stage.link_level}",
            process_set=rt.process_sets.get(stage.ranks, hvd.global_process_set))
        self._alsgd_inflight = _InFlight(plan, handle, snapshot, send, payload, healthy, start)

    @torch.no_grad()
    def wait_for_average(self) -> float:
        """With ``overlap``: wait for the average in flight (started at the end of the last
        round) and apply it: ``x <- average + (x - x at the round's end)``, so each rank keeps
        the local steps it took meanwhile. No new collective (every rank started this one);
        nothing to do without overlap or when no average is in flight. Returns the seconds
        it waited. Call it before saving a checkpoint, or use :meth:`average_now`, which calls
        it first."""
        inflight, self._alsgd_inflight = self._alsgd_inflight, None
        if inflight is None:
            return 0.0
        rt = self._alsgd
        start = time.perf_counter()
        _wait(inflight.handle)
        end = time.perf_counter()
        transfer = (inflight.done_t or end) - inflight.start
        result = rt.scheduler.complete_sync(inflight.plan, inflight.payload.numpy(), [transfer],
                                            waited_s=end - start)
        average = inflight.send
        if result.total_weight != 1.0:
            torch._foreach_div_(average, result.total_weight)
        tensors = self._alsgd_tensors()
        if inflight.healthy:
            torch._foreach_sub_(tensors, inflight.snapshot)
            torch._foreach_add_(tensors, average)
        else:  # this rank was left out: reset to the healthy ranks' average
            for t, a in zip(tensors, average):
                t.copy_(a)
        state = self._alsgd_state_tensors() if rt.config.momentum == "reset" or not inflight.healthy else []
        if state:
            torch._foreach_zero_(state)
        self._alsgd_t = self._alsgd_now()
        return end - start

    def average_now(self) -> None:
        """Average the model over all ranks now (collective: call on every rank at the same
        point, e.g. before evaluating or saving at the end of training). With ``overlap`` it
        first applies the average in flight."""
        self.wait_for_average()
        plan = self._alsgd_runtime().scheduler.sync_now()
        if plan is not None:
            self._alsgd_sync(plan)
        self._alsgd_t = self._alsgd_now()

    def state_dict(self):
        """The wrapped optimizer's state plus the scheduler's under ``"alsgd"`` (None before
        the first step of an elastic job: a fresh scheduler). Never a collective."""
        state = super(self.__class__, self).state_dict()
        if self._alsgd_inflight is not None and not _WARNED_INFLIGHT:
            _WARNED_INFLIGHT.append(True)
            warnings.warn("adaptive-lsgd: state_dict() while an overlapped average is in flight: "
                          "the checkpoint misses it, and a resume will not repeat this run exactly. "
                          "Call optimizer.wait_for_average() (or average_now()) on every rank "
                          "before saving", stacklevel=2)
        if self._alsgd_pending is not _NOTHING:
            state["alsgd"] = copy.deepcopy(self._alsgd_pending)
        else:
            state["alsgd"] = None if self._alsgd is None else self._alsgd.scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        """Restore a :meth:`state_dict` (``hvd.elastic.TorchState.restore()`` calls this).
        Never a collective: after an elastic reset the state waits for the next build."""
        state_dict = dict(state_dict)
        has_alsgd = "alsgd" in state_dict
        alsgd_state = state_dict.pop("alsgd", None)
        _DistributedOptimizer.load_state_dict(self, state_dict)
        if not has_alsgd:
            return
        if self._alsgd is not None and self._alsgd.current:
            self._alsgd.load(alsgd_state)
        else:
            self._alsgd_pending = copy.deepcopy(alsgd_state)

    def _alsgd_runtime(self) -> _Runtime:
        """The runtime of the current Horovod initialisation, rebuilt (a collective, the same
        point on every rank: the first hook, step or ``alsgd`` access) when there is none yet
        in an elastic job or Horovod was re-initialised. The scheduler continues from rank 0's
        state (the last commit after ``TorchState.restore()``) over the new world."""
        rt = self._alsgd
        if rt is not None and rt.current:
            return rt
        if self._alsgd_pending is not _NOTHING:
            carry = self._alsgd_pending
        else:
            carry = None if rt is None else rt.scheduler.state_dict()
        if rt is not None:
            rt.scheduler.log.close()
        world = 1 if rt is None else rt.world + 1
        self._alsgd = _Runtime(self._alsgd_config, self._alsgd_param_bytes, carry, share=True,
                               world=world)
        if rt is not None:
            self._alsgd.scheduler.log.resume()
        # Gradient allreduces are named per Horovod world (rank 0's count, so a worker that
        # joins later agrees): a hook's enqueue that raced with the old world's shutdown can
        # leave its name in Horovod's tensor table, and the same name in the new world would
        # then fail with "a tensor with the same name ... is currently being processed".
        self._parameter_names = {p: f"{name}.w{self._alsgd.world}"
                                 for p, name in self._alsgd_names.items()}
        self._alsgd_pending = _NOTHING
        self._alsgd_t = self._alsgd_now()
        return self._alsgd

    @property
    def alsgd(self) -> _Runtime:
        """The runtime: ``.config``, ``.topology``, ``.scheduler`` (a collective when it must
        be rebuilt, see :meth:`_alsgd_runtime`)."""
        return self._alsgd_runtime()


def DistributedOptimizer(optimizer, named_parameters=None, config=None, model=None,
                         compression=hvd.Compression.none, backward_passes_per_step=1,
                         op=hvd.Average, gradient_predivide_factor=1.0, num_groups=0, groups=None,
                         sparse_as_dense=False, process_set=hvd.global_process_set):
    """Wrap ``optimizer`` like ``hvd.DistributedOptimizer``, with adaptive local SGD.

    Takes every argument ``hvd.DistributedOptimizer`` takes (they apply to the mini-batch
    phase), plus ``config`` (a dict, a YAML/JSON path, or None for ``ALSGD_CONFIG`` /
    ``ALSGD_*`` / defaults) and ``model`` (whose floating buffers, e.g. BatchNorm statistics,
    are averaged with the parameters unless ``average_buffers: false``).
    """
    cfg = load_config(config)
    if cfg.overlap and elastic_job():
        raise ConfigError("config key 'overlap' is not supported in elastic Horovod jobs (an "
                          "average in flight cannot survive a reset); set overlap: false")
    if op == hvd.Adasum:
        raise ValueError("op=hvd.Adasum is not supported by adaptive-lsgd's DistributedOptimizer; "
                         "use hvd.Average or hvd.Sum")
    if process_set is not hvd.global_process_set:
        raise ValueError("adaptive-lsgd's DistributedOptimizer runs over all ranks: leave "
                         "process_set as hvd.global_process_set (use the 'topology' config key "
                         "for hierarchies)")
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` "
                      "and will be removed in v0.23.0.", DeprecationWarning, stacklevel=2)
        if groups is None:
            groups = num_groups
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")

    namespace = dict(_DistributedOptimizer.__dict__)
    namespace.update({k: v for k, v in _LocalSGDMixin.__dict__.items()
                      if k not in ("__module__", "__dict__", "__weakref__", "__doc__")})
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), namespace)
    opt = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
              gradient_predivide_factor, groups, sparse_as_dense, process_set)
    params = [p for group in opt.param_groups for p in group["params"]]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opt._alsgd_model = model
    opt._alsgd_names = dict(opt._parameter_names)  # Horovod's names for the gradient allreduces
    opt._alsgd_cuda = any(p.is_cuda for p in params)
    opt._alsgd_config, opt._alsgd_param_bytes, opt._alsgd_pending = cfg, param_bytes, _NOTHING
    opt._alsgd_inflight = None  # overlap: the average started at the end of the last round
    # Elastic jobs build on first use: a worker that joins later must not run a collective
    # here, while the others are already in TorchState.sync().
    opt._alsgd = None if elastic_job() else _Runtime(cfg, param_bytes)
    opt._alsgd_t = time.perf_counter()
    return opt


def summary(optimizer) -> dict:
    """The job's figures, combined over ranks (a collective: call it on every rank)."""
    local = optimizer.alsgd.scheduler.summary()
    local["rank"] = hvd.rank()
    return combine_summaries(hvd.allgather_object(local))
