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
import pickle  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import horovod.torch as hvd  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from adaptive_lsgd.config import check_supported, load_config  # noqa: E402
from adaptive_lsgd.integrations._horovod import (  # noqa: E402
    ProcessSets,
    Runtime,
    elastic_job,
    host_name,
    torch_init_token,
    torch_optimizer_base,
    warn_if_in_flight,
)
from adaptive_lsgd.summary import combine_summaries  # noqa: E402
from adaptive_lsgd.sync import (  # noqa: E402
    Backend,
    SyncTarget,
    finish_overlapped,
    note_local_start,
    run_sync,
    sync_round,
)

__all__ = ["DistributedOptimizer", "summary", "allow_uneven_steps", "host_name", "process_set_for"]

_INIT_BEFORE_IMPORT = _INIT_BEFORE_IMPORT and hvd.is_initialized()
_DistributedOptimizer = torch_optimizer_base()
_NOTHING = object()  # no scheduler state waiting for the next build
_PROCESS_SETS = ProcessSets(hvd, "adaptive_lsgd.integrations.torch",
                            init_before_import=_INIT_BEFORE_IMPORT)


def process_set_for(ranks: tuple):
    """The Horovod process set over ``ranks`` (see :class:`ProcessSets`)."""
    return _PROCESS_SETS.get(ranks)


def _init_token():
    """An object that changes whenever Horovod is (re-)initialised: ``horovod.torch.init()``
    replaces its handle map on every call (an elastic reset is ``shutdown(); init()``)."""
    return torch_init_token(hvd)


def _exit_barrier() -> None:
    hvd.allreduce(torch.zeros(1), op=hvd.Sum, name="alsgd.exit")


def _gather_object(obj, name: str, process_set=hvd.global_process_set) -> list:
    """``hvd.allgather_object`` over ``process_set`` (Horovod's takes none): every member's
    ``obj``, in the set's rank order."""
    if process_set is hvd.global_process_set:
        return hvd.allgather_object(obj, name=name)
    data = torch.from_numpy(np.frombuffer(pickle.dumps(obj), dtype=np.uint8).copy())
    sizes = hvd.allgather(torch.tensor([data.numel()], dtype=torch.int64), name=f"{name}.sizes",
                          process_set=process_set)
    gathered = hvd.allgather(data, name=f"{name}.data", process_set=process_set).numpy()
    out, offset = [], 0
    for n in sizes.tolist():
        out.append(pickle.loads(gathered[offset:offset + n].tobytes()))
        offset += n
    return out


def _runtime(config, param_bytes: int, process_set=hvd.global_process_set, **kw) -> Runtime:
    return Runtime(hvd, _PROCESS_SETS, config, param_bytes, exit_barrier=_exit_barrier,
                   token=_init_token, process_set=process_set, check_origin=True, can_overlap=True,
                   gather=lambda obj, name: _gather_object(obj, name, process_set), **kw)


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


def _dtype_groups(tensors: list) -> list:
    """Indices of ``tensors`` per dtype, in a rank-agreed order (by dtype name)."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return [groups[d] for d in sorted(groups, key=str)]


_WIRE_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    """The core's sync protocol (:mod:`adaptive_lsgd.sync`) over Horovod's PyTorch
    collectives: one flat buffer per dtype, grouped collectives over the process set of the
    stage's ranks, polite waits (:func:`_wait`)."""

    def __init__(self, process_sets: dict, device=None, state_on_cpu: bool = False):
        self.process_sets = process_sets
        self.device = device
        self.state_on_cpu = state_on_cpu and device is not None and torch.device(device).type != "cpu"

    def _ps(self, ranks):
        return self.process_sets.get(ranks, hvd.global_process_set)

    def pack(self, tensors, pad_to):
        out = []
        for idx in _dtype_groups(tensors):
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
            if flat.numel() < pad_to:
                flat = torch.cat([flat, flat.new_zeros(pad_to - flat.numel())])
            out.append(flat)
        return out

    @torch.no_grad()
    def unpack(self, buffers, tensors, divide_by, since=None):
        for k, idx in enumerate(_dtype_groups(tensors)):
            sizes = [tensors[i].numel() for i in idx]
            n = sum(sizes)
            flat = buffers[k][:n]
            if divide_by != 1.0:
                flat = flat / divide_by
            if since is not None:  # x <- buffer + (x - x at the round's end)
                flat = flat - since[k][:n]
            views = torch.split(flat, sizes)
            dst = [tensors[i] for i in idx]
            if since is not None:
                torch._foreach_add_(dst, [v.view_as(t) for v, t in zip(views, dst)])
            else:
                for t, v in zip(dst, views):
                    t.copy_(v.view_as(t))

    def all_finite(self, buffers):
        return all(bool(torch.isfinite(b).all()) for b in buffers)

    def scale(self, buffers, factor):
        if not buffers:
            return
        if factor == 0:
            for b in buffers:
                b.zero_()
        else:
            torch._foreach_mul_(buffers, factor)

    def copy(self, buffers):
        return [b.clone() for b in buffers]

    def zero_tensors(self, tensors):
        torch._foreach_zero_(tensors)

    def from_numpy(self, values):
        out = torch.from_numpy(np.asarray(values, dtype=np.float32))
        return out.to(self.device) if self.device is not None else out

    def to_numpy(self, buffer):
        return buffer.detach().cpu().numpy()

    # -- the reference model and the wire (outer optimizer, compression) ----------------------
    def store_state(self, buffers):
        return [b.cpu() for b in buffers] if self.state_on_cpu else buffers

    def load_state(self, buffers):
        return [b.to(self.device, non_blocking=True) for b in buffers] if self.state_on_cpu \
            else buffers

    def to_wire(self, buffers, kind, multiple):
        flat = torch.cat([b.reshape(-1).float() for b in buffers])
        return self.pad(flat.to(_WIRE_DTYPE[kind]).view(torch.int16), multiple)

    def from_wire(self, wire, kind, like):
        flat = wire.view(_WIRE_DTYPE[kind]).float()
        out, offset = [], 0
        for b in like:
            out.append(flat[offset:offset + b.numel()].to(b.dtype))
            offset += b.numel()
        return out

    def pad(self, buffer, multiple):
        extra = -buffer.numel() % multiple
        return torch.cat([buffer, buffer.new_zeros(extra)]) if extra else buffer

    def trim(self, buffer, length):
        return buffer[:length]

    def length(self, buffer):
        return buffer.numel()

    def sum_pieces(self, buffer, pieces, kind):
        parts = buffer.view(pieces, -1)
        if kind is None:
            total = parts[0].clone()
            for part in parts[1:]:
                total += part
            return total
        total = parts[0].view(_WIRE_DTYPE[kind]).float()
        for part in parts[1:]:
            total = total + part.view(_WIRE_DTYPE[kind]).float()
        return total.to(_WIRE_DTYPE[kind]).view(torch.int16)

    def run(self, c):
        ps = self._ps(c.ranks)
        if c.op == "alltoall":  # no grouped form in Horovod: one per buffer, all in flight
            handles = [hvd.alltoall_async(b, name=f"{c.name}.{i}", process_set=ps)
                       for i, b in enumerate(c.buffers)]
            return [_wait(h)[0] for h in handles]
        if c.op == "reducescatter":
            return list(_wait(hvd.grouped_reducescatter_async(c.buffers, op=hvd.Sum, name=c.name,
                                                              process_set=ps)))
        if c.op == "allgather":
            return list(_wait(hvd.grouped_allgather_async(c.buffers, name=c.name, process_set=ps)))
        _wait(hvd.grouped_allreduce_async_(c.buffers, op=hvd.Sum, name=c.name, process_set=ps))
        return c.buffers

    def start(self, c):
        return hvd.grouped_allreduce_async_(c.buffers, op=hvd.Sum, name=c.name,
                                            process_set=self._ps(c.ranks)), c.buffers

    def poll(self, handle):
        return hvd.poll(handle[0])

    def wait(self, handle):
        _wait(handle[0])
        return handle[1]


def _scheduler_state(scheduler) -> dict:
    """The scheduler's state with the outer state's tensors (copies) under ``outer_state``."""
    state = scheduler.state_dict()
    if scheduler.outer is not None:
        outer = scheduler.outer.state_dict()
        state["outer_state"] = {key: (value if not isinstance(value, list)
                                      else [t.detach().clone() for t in value])
                                for key, value in outer.items()}
    return state


def _outer_to_device(scheduler, device, on_cpu: bool) -> None:
    """Loaded outer state (a checkpoint, rank 0's after an elastic reset) where this rank keeps it."""
    outer = scheduler.outer
    if outer is None or device is None:
        return
    where = torch.device("cpu") if on_cpu else device
    outer.prev = None if outer.prev is None else [t.to(where) for t in outer.prev]
    outer.buf = None if outer.buf is None else [t.to(where) for t in outer.buf]


class StepClock:
    """Per-step compute time without a device synchronize.

    On the CPU each :meth:`lap` returns the wall time since the last one. On CUDA it records
    an event on the current stream and returns None: the step times are the times between
    consecutive events, read by :meth:`drain` when the scheduler needs them (at a sync, where
    the queue is drained anyway), so a GPU job's steps never stall the CPU's kernel queue."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._t = time.perf_counter()
        self._events: list = []
        if cuda:
            self.restart()

    def restart(self) -> None:
        """A new starting point (after a sync, whose time is not compute)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events = [event]
        self._t = time.perf_counter()

    def lap(self) -> float | None:
        if not self.cuda:
            now = time.perf_counter()
            out, self._t = now - self._t, now
            return out
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._events.append(event)
        return None

    @property
    def due(self) -> bool:
        """Many unread steps (a long mini-batch phase): time to :meth:`drain` them."""
        return len(self._events) > 256

    def drain(self, wait: bool = True) -> list:
        """The step times not read yet, in order. ``wait``: wait for the last recorded step
        (at a sync); else read only the steps the device has finished (no stall)."""
        events = self._events
        if not self.cuda or len(events) < 2:
            return []
        if wait:
            events[-1].synchronize()
            last = len(events) - 1
        else:
            last = 0
            while last + 1 < len(events) and events[last + 1].query():
                last += 1
        times = [a.elapsed_time(b) / 1000.0 for a, b in zip(events[:last], events[1:last + 1])]
        self._events = events[last:]
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
        if not self.process_set.included():
            return _DistributedOptimizer.synchronize(self)  # Horovod's: nothing to reduce
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
        if not self.process_set.included():  # as Horovod's: a plain local optimizer here
            return super(self.__class__, self).step(closure)
        rt = self._alsgd_runtime()
        sched, clock = rt.scheduler, self._alsgd_clock
        if not sched.is_local:
            lr = self._alsgd_lr()
            handle = None
            if sched.needs_shared_lr and self.process_set.size() > 1:
                handle = hvd.allreduce_async(torch.tensor([lr], dtype=torch.float64), op=hvd.Min,
                                             name="alsgd.lr", process_set=self.process_set)
            loss = _DistributedOptimizer.step(self, closure)
            if handle is not None:
                lr = float(hvd.synchronize(handle)[0])
            sched.step_done(clock.lap(), lr=lr)
            if clock.due:
                sched.record_compute(clock.drain(wait=False))
            return loss
        note_local_start(sched, self._alsgd_backend, self._alsgd_target)
        loss = super(self.__class__, self).step(closure)
        plan = sched.step_done(clock.lap(), lr=self._alsgd_lr())
        if self._alsgd_inflight is not None:
            self._alsgd_inflight.note(self._alsgd_backend, time.perf_counter())
        if plan is not None:
            sched.record_compute(clock.drain())
            _, self._alsgd_inflight = sync_round(plan, sched, self._alsgd_backend,
                                                 self._alsgd_target, self._alsgd_inflight)
            clock.restart()
        return loss

    # -- what is averaged ---------------------------------------------------------------------
    def _alsgd_parameters(self) -> list:
        return [p for group in self.param_groups for p in group["params"] if p.is_floating_point()]

    def _alsgd_buffers(self) -> list:
        model = self._alsgd_model
        return [] if model is None else [b for b in model.buffers() if b.is_floating_point()]

    def _alsgd_state_tensors(self) -> list:
        """Per-parameter optimizer state of the parameter's shape (momentum, Adam moments)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                for value in self.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.is_floating_point() and value.shape == p.shape:
                        out.append(value)
        return out

    def _alsgd_lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    @property
    def _alsgd_backend(self) -> TorchBackend:
        """The sync backend of the current runtime (built once per runtime, not per step)."""
        sets = self._alsgd_runtime().process_sets
        backend = self._alsgd_tb
        if backend is None or backend.process_sets is not sets:
            backend = self._alsgd_tb = TorchBackend(sets, self._alsgd_device,
                                                    self._alsgd_config.outer_state_on_cpu)
        return backend

    # -- averaging ----------------------------------------------------------------------------
    @torch.no_grad()
    def wait_for_average(self) -> float:
        """With ``overlap``: wait for the average in flight (started at the end of the last
        round) and apply it: ``x <- x + pull * (average - x at the round's end)`` (config key
        ``overlap_pull``, 0.5 by default), so each rank keeps the local steps it took
        meanwhile. No new collective (every rank started this one); nothing to do without
        overlap or when no average is in flight. Returns the seconds it waited. Call it
        before saving a checkpoint, or use :meth:`average_now`, which calls it first."""
        inflight, self._alsgd_inflight = self._alsgd_inflight, None
        if inflight is None:
            return 0.0
        start = time.perf_counter()
        finish_overlapped(inflight, self._alsgd.scheduler, self._alsgd_backend, self._alsgd_target)
        self._alsgd_clock.restart()
        return time.perf_counter() - start

    def reset_step_timer(self) -> None:
        """Start the next step's compute time now: the time since the last step (an
        evaluation, a checkpoint, another model's training) is not this model's compute.
        Not a collective."""
        self._alsgd_clock.restart()

    @torch.no_grad()
    def average_now(self) -> None:
        """Average the model over all ranks now (collective: call on every rank at the same
        point, e.g. before evaluating or saving at the end of training). With ``overlap`` it
        first applies the average in flight."""
        self.wait_for_average()
        sched = self._alsgd_runtime().scheduler
        plan = sched.sync_now()
        if plan is not None:
            sched.record_compute(self._alsgd_clock.drain())
            run_sync(plan, sched, self._alsgd_backend, self._alsgd_target)
        self._alsgd_clock.restart()

    def state_dict(self):
        """The wrapped optimizer's state plus the scheduler's under ``"alsgd"`` (None before
        the first step of an elastic job: a fresh scheduler). Never a collective."""
        state = super(self.__class__, self).state_dict()
        warn_if_in_flight(self._alsgd_inflight, "optimizer.wait_for_average()")
        if self._alsgd_pending is not _NOTHING:
            state["alsgd"] = copy.deepcopy(self._alsgd_pending)
        else:
            state["alsgd"] = None if self._alsgd is None else _scheduler_state(self._alsgd.scheduler)
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
            _outer_to_device(self._alsgd.scheduler, self._alsgd_device,
                             self._alsgd_config.outer_state_on_cpu)
        else:
            self._alsgd_pending = copy.deepcopy(alsgd_state)

    def _alsgd_runtime(self) -> Runtime:
        """The runtime of the current Horovod initialisation, rebuilt (a collective, the same
        point on every rank: the first hook, step or ``alsgd`` access) when there is none yet
        in an elastic job or Horovod was re-initialised. The scheduler continues from rank 0's
        state (the last commit after ``TorchState.restore()``) over the new world."""
        rt = self._alsgd
        if rt is not None and rt.current:
            return rt
        if not self.process_set.included():
            raise RuntimeError(f"adaptive-lsgd: rank {hvd.rank()} is not in this optimizer's "
                               f"process set {list(self.process_set.ranks)}: it steps as a plain "
                               "local optimizer here and has no scheduler")
        if self._alsgd_pending is not _NOTHING:
            carry = self._alsgd_pending
        else:
            carry = None if rt is None else _scheduler_state(rt.scheduler)
        if rt is not None:
            rt.scheduler.log.close()
        world = 1 if rt is None else rt.world + 1
        self._alsgd = _runtime(self._alsgd_config, self._alsgd_param_bytes, self.process_set,
                               carry=carry, share=True, world=world,
                               uneven_steps=self._alsgd_uneven)
        _outer_to_device(self._alsgd.scheduler, self._alsgd_device,
                         self._alsgd_config.outer_state_on_cpu)
        if rt is not None:
            self._alsgd.scheduler.log.resume()
        # Gradient allreduces are named per Horovod world (rank 0's count, so a worker that
        # joins later agrees): a hook's enqueue that raced with the old world's shutdown can
        # leave its name in Horovod's tensor table, and the same name in the new world would
        # then fail with "a tensor with the same name ... is currently being processed".
        self._parameter_names = {p: f"{name}.w{self._alsgd.world}"
                                 for p, name in self._alsgd_names.items()}
        self._alsgd_pending = _NOTHING
        self._alsgd_clock.restart()
        return self._alsgd

    @property
    def alsgd(self) -> Runtime:
        """The runtime: ``.config``, ``.topology``, ``.process_sets``, ``.scheduler`` (a
        collective when it must be rebuilt, see :meth:`_alsgd_runtime`)."""
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

    ``process_set``: as Horovod's, the optimizer works over that set only. Its members run the
    mini-batch phase through Horovod's reduction over the set and average among themselves
    (flat inside the set); on a rank outside it the optimizer is the plain local optimizer.
    """
    cfg = load_config(config)
    check_supported(cfg, "torch", elastic=elastic_job())
    if op == hvd.Adasum:
        raise ValueError("op=hvd.Adasum is not supported by adaptive-lsgd's DistributedOptimizer; "
                         "use hvd.Average or hvd.Sum")
    if process_set is not hvd.global_process_set and elastic_job():
        raise ValueError("adaptive-lsgd: process_set in an elastic job is not supported (Horovod "
                         "drops the process sets at every reset); leave process_set as "
                         "hvd.global_process_set in elastic jobs")
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
    opt._alsgd_device = params[0].device if params else None
    opt._alsgd_clock = StepClock(cuda=any(p.is_cuda for p in params))
    opt._alsgd_target = SyncTarget(opt._alsgd_parameters, opt._alsgd_buffers, opt._alsgd_state_tensors)
    opt._alsgd_config, opt._alsgd_param_bytes, opt._alsgd_pending = cfg, param_bytes, _NOTHING
    opt._alsgd_inflight = None  # overlap: the average started at the end of the last round
    opt._alsgd_tb = None  # the TorchBackend over the current runtime's process sets
    opt._alsgd_uneven = False  # allow_uneven_steps: time_budget: auto may engage
    # Elastic jobs build on first use: a worker that joins later must not run a collective
    # here, while the others are already in TorchState.sync().
    opt._alsgd = (None if elastic_job() or not process_set.included()
                  else _runtime(cfg, param_bytes, process_set))
    return opt


def summary(optimizer) -> dict:
    """The job's figures, combined over ranks (a collective: call it on every rank of the
    optimizer's process set)."""
    local = optimizer.alsgd.scheduler.summary()
    local["rank"] = hvd.rank()
    return combine_summaries(_gather_object(local, "alsgd.summary", optimizer.process_set))


def allow_uneven_steps(optimizer, allow: bool = True) -> None:
    """Declare that this training loop accepts a different number of steps on each rank: it
    draws batches from a stream (not a fixed number per rank and epoch) and issues no Horovod
    collectives of its own between the optimizer's syncs. ``time_budget: auto`` (the default)
    then gives faster ranks more steps per round on a mixed cluster; without it every rank
    takes the same steps (a loop over a fixed shard would otherwise reach its epoch's end, and
    the collectives after it, on different rounds). Call it on every rank; not a collective.

    Example::

        opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         named_parameters=model.named_parameters())
        alsgd.allow_uneven_steps(opt)
        while time.monotonic() < deadline:        # a stream: every rank trains until the deadline
            loss_fn(model(next(batches))).backward(); opt.step(); opt.zero_grad()
        opt.average_now()
    """
    if not hasattr(optimizer, "_alsgd_runtime"):
        raise TypeError(f"allow_uneven_steps expects an adaptive-lsgd DistributedOptimizer, got "
                        f"{type(optimizer).__name__}")
    optimizer._alsgd_uneven = bool(allow)
    rt = optimizer._alsgd
    if rt is not None and rt.current:  # else the next build (elastic) takes it from the optimizer
        rt.allow_uneven_steps(allow)
