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

This module sets ``HOROVOD_DYNAMIC_PROCESS_SETS=1`` when imported (unless set), so import it
before ``hvd.init()``; hierarchical topologies need it.
"""

from __future__ import annotations

import os

_INIT_BEFORE_IMPORT = "HOROVOD_DYNAMIC_PROCESS_SETS" not in os.environ
os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

import time  # noqa: E402
import warnings  # noqa: E402

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402
from horovod.torch.optimizer import _DistributedOptimizer  # noqa: E402

from adaptive_lsgd import agreement  # noqa: E402
from adaptive_lsgd.config import Config, load_config  # noqa: E402
from adaptive_lsgd.integrations._horovod import ProcessSets, host_name  # noqa: E402
from adaptive_lsgd.scheduler import Scheduler, SyncPlan  # noqa: E402
from adaptive_lsgd.summary import combine_summaries  # noqa: E402
from adaptive_lsgd.topology import Topology  # noqa: E402

__all__ = ["DistributedOptimizer", "summary", "host_name", "process_set_for"]

_INIT_BEFORE_IMPORT = _INIT_BEFORE_IMPORT and hvd.is_initialized()
_PROCESS_SETS = ProcessSets(hvd, "adaptive_lsgd.integrations.torch",
                            init_before_import=_INIT_BEFORE_IMPORT)


def process_set_for(ranks: tuple):
    """The Horovod process set over ``ranks`` (see :class:`ProcessSets`)."""
    return _PROCESS_SETS.get(ranks)


class _Runtime:
    """What one optimizer needs from the job: config, topology, process sets, scheduler."""

    def __init__(self, config: Config, param_bytes: int):
        self.config = config
        self.param_bytes = param_bytes
        self.build()

    def build(self, carry: dict | None = None) -> None:
        infos = hvd.allgather_object(agreement.rank_info(self.config, host_name()))
        agreement.check_agreement(infos)
        self.topology = Topology.from_config(self.config.topology, [i["host"] for i in infos],
                                             chained=self.config.chained_allreduce)
        self.process_sets = {ranks: process_set_for(ranks) for ranks in self.topology.process_sets()}
        self.rank = hvd.rank()
        self.scheduler = Scheduler(self.config, self.topology, self.rank, self.param_bytes)
        if carry is not None:
            self.scheduler.load_state_dict(carry, strict=False)


class _LocalSGDMixin:
    """Methods that override Horovod's ``_DistributedOptimizer`` in the dynamic class."""

    def _make_hook(self, p):
        horovod_hook = _DistributedOptimizer._make_hook(self, p)

        def hook(*ignore):
            if getattr(self, "_alsgd", None) is not None and self._alsgd.scheduler.is_local:
                return None  # local phase: no gradient communication
            return horovod_hook(*ignore)

        return hook

    def synchronize(self):
        if self._alsgd.scheduler.is_local:
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
        rt = self._alsgd
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
        if plan is not None:
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

    @torch.no_grad()
    def _alsgd_sync(self, plan: SyncPlan) -> None:
        rt = self._alsgd
        tensors = self._alsgd_tensors()
        healthy = True
        if rt.config.nonfinite_guard:
            healthy = all(bool(torch.isfinite(t).all()) for t in tensors)
        payload = torch.from_numpy(rt.scheduler.payload(plan, healthy))
        if not healthy:
            torch._foreach_zero_(tensors)
        elif plan.weight != 1.0:
            torch._foreach_mul_(tensors, plan.weight)
        times = []
        for stage in plan.stages:
            if stage.kind == "broadcast" and rt.rank != stage.root:
                torch._foreach_zero_(tensors)
                payload.zero_()
            start = time.perf_counter()
            hvd.grouped_allreduce_(tensors + [payload], op=hvd.Sum,
                                   name=f"alsgd.{stage.kind}.{stage.link_level}",
                                   process_set=rt.process_sets.get(stage.ranks, hvd.global_process_set))
            times.append(time.perf_counter() - start)
        result = rt.scheduler.complete_sync(plan, payload.numpy(), times)
        if result.total_weight != 1.0:
            torch._foreach_div_(tensors, result.total_weight)
        if rt.config.momentum == "reset" or not healthy:
            torch._foreach_zero_(self._alsgd_state_tensors())

    # -- helpers ------------------------------------------------------------------------------
    def _alsgd_lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    def _alsgd_now(self) -> float:
        if self._alsgd_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def average_now(self) -> None:
        """Average the model over all ranks now (collective: call on every rank at the same
        point, e.g. before evaluating or saving at the end of training)."""
        plan = self._alsgd.scheduler.sync_now()
        if plan is not None:
            self._alsgd_sync(plan)
        self._alsgd_t = self._alsgd_now()

    def state_dict(self):
        state = super(self.__class__, self).state_dict()
        state["alsgd"] = self._alsgd.scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        alsgd_state = state_dict.pop("alsgd", None)
        _DistributedOptimizer.load_state_dict(self, state_dict)
        if alsgd_state is not None:
            self._alsgd.scheduler.load_state_dict(alsgd_state)

    def alsgd_reset(self) -> None:
        """Rebuild topology, process sets and scheduler after Horovod re-initialised (elastic
        reset), carrying the scheduler's phase, step and periods across."""
        carry = self._alsgd.scheduler.state_dict()
        _PROCESS_SETS.clear()
        self._alsgd.build(carry)
        self._alsgd_t = time.perf_counter()

    @property
    def alsgd(self) -> _Runtime:
        """The runtime: ``.config``, ``.topology``, ``.scheduler``."""
        return self._alsgd


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
    opt._alsgd_cuda = any(p.is_cuda for p in params)
    opt._alsgd = _Runtime(cfg, param_bytes)
    opt._alsgd_t = time.perf_counter()
    return opt


def summary(optimizer) -> dict:
    """The job's figures, combined over ranks (a collective: call it on every rank)."""
    local = optimizer.alsgd.scheduler.summary()
    local["rank"] = hvd.rank()
    return combine_summaries(hvd.allgather_object(local))
