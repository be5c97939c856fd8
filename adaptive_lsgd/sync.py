"""One sync, written once: the protocol every integration runs over its own collectives.

A :class:`~adaptive_lsgd.scheduler.SyncPlan` says *when* and *where* to average; this module
says *how*, for every framework at once:

1. **pack** the tensors to average into one flat buffer per dtype (padded so that no rank's
   slice of a sliced sync is empty);
2. **health**: with ``nonfinite_guard`` a rank whose buffers hold NaN/Inf sends zeros and
   weight 0 (and is reset to the healthy ranks' average);
3. **weighting**: the buffers are scaled by ``plan.weight`` (steps taken, in time-budget rounds);
4. the scheduler's **payload** (its statistics row, weight and health flag) rides as one more
   float32 buffer in the same collectives;
5. the plan's **stages**: a Sum over each stage's ranks (``allreduce``; the sliced form's
   ``reducescatter`` / ``allgather``; the leaders' form's ``reduce`` and ``broadcast`` are
   allreduces, and on a ``broadcast`` stage every member but the root zeroes its buffers first);
6. **division** by the total weight, unpacked into the tensors;
7. the **state rule**: the optimizer state is zeroed after a sync with ``momentum: reset``, and
   on a rank that was reset to the average.

With ``overlap`` steps 1-4 and one asynchronous allreduce start at a round's end
(:func:`start_overlapped`); at the next round's end :func:`finish_overlapped` waits and applies
``x <- x + pull * (average - x at the round's end)`` (``overlap_pull``, 0.5 by default),
keeping the local steps taken meanwhile.

The framework side is a :class:`Backend` (tensor ops on flat buffers, and collectives over a
rank tuple) and a :class:`SyncTarget` (what one optimizer may average). The protocol itself is
a generator that *yields* each :class:`Collective` and receives its result: a real backend
runs them one after another (:func:`run_sync`), an in-process fake runs every rank's
generator in lock-step (:func:`run_in_process`). The whole sync, packing included, is timed as
communication.

Example, two ranks of numpy arrays in one process::

    >>> import numpy as np
    >>> from adaptive_lsgd import Scheduler, Topology, load_config
    >>> from adaptive_lsgd.sync import NumpyBackend, SyncTarget, run_in_process, sync_protocol
    >>> cfg = load_config({"policy": "fixed", "periods": [1]}, env={})
    >>> scheds = [Scheduler(cfg, Topology.flat(2), rank=r) for r in range(2)]
    >>> models = [np.array([0.0, 2.0]), np.array([2.0, 4.0])]
    >>> plans = [s.step_done(compute_s=0.01) for s in scheds]
    >>> gens = [sync_protocol(p, s, NumpyBackend(), SyncTarget(lambda m=m: [m]))
    ...         for p, s, m in zip(plans, scheds, models)]
    >>> results = run_in_process(gens, lambda rank, collective: 0.002)
    >>> models[0].tolist(), models[1].tolist(), results[0].total_weight
    ([1.0, 3.0], [1.0, 3.0], 2.0)
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

# The collective each stage kind runs (all are Sums; ``broadcast`` zeroes the non-roots first).
COLLECTIVE_OF_STAGE = {"allreduce": "allreduce", "reduce": "allreduce", "broadcast": "allreduce",
                       "reducescatter": "reducescatter", "allgather": "allgather"}


@dataclass
class Collective:
    """One grouped collective a rank must run now: ``op`` (the Sums ``allreduce`` and
    ``reducescatter``, ``allgather``, or ``alltoall``: every buffer cut into equal parts,
    member j getting the j-th part of each member's, in member order) over ``ranks`` on
    ``buffers`` (flat, one per dtype, the payload last). ``stage`` is the plan's stage it
    serves; ``name`` the Horovod name."""

    op: str
    ranks: tuple
    buffers: list
    name: str
    stage: Any = None


class SyncTarget:
    """What one optimizer's sync may touch, as the integration finds it (each a callable
    returning a list of floating tensors, in a rank-agreed order, without duplicates).

    The core decides what is averaged: the parameters, the buffers unless
    ``average_buffers: false``, the optimizer state with ``momentum: average``.
    """

    __slots__ = ("parameters", "buffers", "optimizer_state")

    def __init__(self, parameters: Callable[[], list], buffers: Callable[[], list] | None = None,
                 optimizer_state: Callable[[], list] | None = None):
        self.parameters = parameters
        self.buffers = buffers or list
        self.optimizer_state = optimizer_state or list

    def averaged(self, config) -> list:
        """The tensors a sync averages under ``config``."""
        out = list(self.parameters())
        if config.average_buffers:
            out += self.buffers()
        if config.momentum == "average":
            out += self.optimizer_state()
        return out


class Backend:
    """The framework's side of a sync: tensor ops on flat buffers, and collectives.

    A *buffer* is whatever the framework's collectives take (a 1-D tensor). ``pack`` makes
    one per dtype group in a rank-agreed order; the protocol appends the payload buffer.
    Subclasses implement every method; :class:`NumpyBackend` is the reference.
    """

    def pack(self, tensors: list, pad_to: int) -> list:
        """Copies of ``tensors`` as flat buffers, one per dtype (in a rank-agreed order), each
        zero-padded to at least ``pad_to`` elements."""
        raise NotImplementedError

    def unpack(self, buffers: list, tensors: list, divide_by: float, since: list | None = None) -> None:
        """Write ``buffers / divide_by`` into ``tensors`` (the inverse of :meth:`pack`); with
        ``since`` (buffers packed earlier) add each tensor's progress since then:
        ``t <- buffer / divide_by + (t - since)``."""
        raise NotImplementedError

    def all_finite(self, buffers: list) -> bool:
        raise NotImplementedError

    def scale(self, buffers: list, factor: float) -> None:
        """Multiply in place (factor 0 writes zeros, also over NaN/Inf)."""
        raise NotImplementedError

    def copy(self, buffers: list) -> list:
        raise NotImplementedError

    def zero_tensors(self, tensors: list) -> None:
        raise NotImplementedError

    def from_numpy(self, values: np.ndarray):
        """A float32 buffer holding ``values`` (the payload)."""
        raise NotImplementedError

    def to_numpy(self, buffer) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self, tensors: list) -> np.ndarray:
        """A digest of ``tensors``' values as exactly representable float32s (equal values,
        equal digest on every rank)."""
        digest = hashlib.blake2b(digest_size=8)
        for b in self.pack(tensors, 1):
            digest.update(np.ascontiguousarray(self.to_numpy(b)).tobytes())
        return np.frombuffer(digest.digest(), dtype=np.uint16).astype(np.float32)

    # -- the reference model and the wire (outer optimizer, compression) ----------------------
    def store_state(self, buffers: list) -> list:
        """Where the outer state is kept (the identity; the CPU with ``outer_state_on_cpu``)."""
        return buffers

    def load_state(self, buffers: list) -> list:
        """The outer state as buffers the sync can compute with (inverse of :meth:`store_state`)."""
        return buffers

    def to_wire(self, buffers: list, kind: str, multiple: int):
        """``buffers`` concatenated, rounded to ``kind`` (fp16/bf16) and reinterpreted as one
        int16 buffer, zero-padded to a multiple of ``multiple`` elements."""
        raise NotImplementedError

    def from_wire(self, wire, kind: str, like: list) -> list:
        """The inverse of :meth:`to_wire`: buffers of the lengths and dtypes of ``like``."""
        raise NotImplementedError

    def pad(self, buffer, multiple: int):
        """``buffer`` zero-padded to a multiple of ``multiple`` elements (itself if it is one)."""
        raise NotImplementedError

    def trim(self, buffer, length: int):
        """The first ``length`` elements of ``buffer``."""
        raise NotImplementedError

    def length(self, buffer) -> int:
        raise NotImplementedError

    def sum_pieces(self, buffer, pieces: int, kind: str | None):
        """``buffer`` cut into ``pieces`` equal parts summed in float32 (parts on the wire in
        ``kind`` are decoded first and the sum encoded again), in part order."""
        raise NotImplementedError

    # -- collectives (real backends) ------------------------------------------------------------
    def run(self, collective: Collective) -> list:
        """Run ``collective`` to completion; the result buffers."""
        raise NotImplementedError

    def start(self, collective: Collective):
        """Start an allreduce without waiting (overlap); a handle for :meth:`poll`/:meth:`wait`."""
        raise NotImplementedError

    def poll(self, handle) -> bool:
        raise NotImplementedError

    def wait(self, handle) -> list:
        raise NotImplementedError

    def clock(self) -> float:
        return time.perf_counter()


class NumpyBackend(Backend):
    """Buffers are float64 numpy arrays, tensors are numpy arrays updated in place; no
    collectives of its own (drive it with :func:`run_in_process`). ``healthy=False`` makes
    :meth:`all_finite` report a fault whatever the values (a test hook)."""

    def __init__(self, healthy: bool = True):
        self.healthy = healthy

    def clock(self) -> float:
        return 0.0  # in-process ranks: the driver reports each collective's time

    def pack(self, tensors, pad_to):
        if not tensors:
            return []
        flat = np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in tensors])
        if flat.size < pad_to:
            flat = np.concatenate([flat, np.zeros(pad_to - flat.size)])
        return [flat]

    def unpack(self, buffers, tensors, divide_by, since=None):
        if not tensors:
            return
        flat, offset = buffers[0], 0
        old = since[0] if since is not None else None
        for t in tensors:
            n = t.size
            value = flat[offset:offset + n].reshape(t.shape) / divide_by
            if old is not None:
                value = value + (t - old[offset:offset + n].reshape(t.shape))
            t[...] = value
            offset += n

    def all_finite(self, buffers):
        return self.healthy and all(bool(np.isfinite(b).all()) for b in buffers)

    def scale(self, buffers, factor):
        for b in buffers:
            if factor == 0:
                b[...] = 0.0
            else:
                b *= factor

    def copy(self, buffers):
        return [b.copy() for b in buffers]

    def zero_tensors(self, tensors):
        for t in tensors:
            t[...] = 0.0

    def from_numpy(self, values):
        return np.asarray(values, dtype=np.float64).copy()

    def to_numpy(self, buffer):
        return np.asarray(buffer, dtype=np.float32)

    def to_wire(self, buffers, kind, multiple):
        flat = np.concatenate([np.asarray(b, dtype=np.float32).ravel() for b in buffers])
        return self.pad(encode_wire(flat, kind), multiple)

    def from_wire(self, wire, kind, like):
        flat = decode_wire(np.asarray(wire), kind)
        out, offset = [], 0
        for b in like:
            out.append(flat[offset:offset + b.size].astype(b.dtype))
            offset += b.size
        return out

    def pad(self, buffer, multiple):
        extra = -buffer.size % multiple
        return buffer if not extra else np.concatenate([buffer, np.zeros(extra, buffer.dtype)])

    def trim(self, buffer, length):
        return buffer[:length]

    def length(self, buffer):
        return int(buffer.size)

    def sum_pieces(self, buffer, pieces, kind):
        parts = np.asarray(buffer).reshape(pieces, -1)
        decode = (lambda x: x) if kind is None else (lambda x: decode_wire(x, kind))
        total = decode(parts[0]).copy()
        for part in parts[1:]:
            total += decode(part)
        return total if kind is None else encode_wire(total, kind)


def encode_wire(values: np.ndarray, kind: str) -> np.ndarray:
    """float32 values rounded to fp16 or bf16 (round to nearest even), as int16 bit patterns."""
    values = np.asarray(values, dtype=np.float32)
    if kind == "fp16":
        with np.errstate(over="ignore"):  # beyond fp16's range: inf, as a GPU's cast gives
            return values.astype(np.float16).view(np.int16)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    rounded[nan] = (bits[nan] >> 16) | 0x40  # keep NaN a (quiet) NaN
    return rounded.astype(np.uint16).view(np.int16)


def decode_wire(wire: np.ndarray, kind: str) -> np.ndarray:
    """The float32 values of int16 bit patterns of fp16 or bf16 (exact)."""
    wire = np.asarray(wire, dtype=np.int16)
    if kind == "fp16":
        return wire.view(np.float16).astype(np.float32)
    return (wire.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def pieces_of(plan) -> int:
    """How many slices a sliced sync cuts each buffer into (1 without reduce-scatters)."""
    return math.prod(len(st.ranks) for st in plan.stages if st.kind == "reducescatter")


def _payload_buffer(backend: Backend, values: np.ndarray, pad_to: int):
    if values.size < pad_to:
        values = np.concatenate([values, np.zeros(pad_to - values.size, dtype=values.dtype)])
    return backend.from_numpy(values)


@dataclass
class Contribution:
    """What this rank sends: the tensors in groups (one group; with a reference model the
    parameters and the rest), their packed buffers, its health, the padding, and how the
    parameters travel on the top-level links (``wire``: ``none``, ``fp16`` or ``bf16``:
    then ``buffers[0]`` hold ``x - prev``)."""

    tensors: list
    buffers: list
    healthy: bool
    pad: int
    wire: str = "none"

    @property
    def flat(self) -> list:
        return [b for group in self.buffers for b in group]

    def split(self, flat: list) -> list:
        """``flat`` (buffers in :attr:`flat` order) cut back into groups."""
        out, i = [], 0
        for group in self.buffers:
            out.append(flat[i:i + len(group)])
            i += len(group)
        return out


def _reference(plan, scheduler):
    """The rank's :class:`~adaptive_lsgd.outer.OuterState` if ``plan`` uses it (global syncs)."""
    return scheduler.outer if plan.is_global else None


def _contribution(plan, scheduler, backend: Backend, target: SyncTarget) -> Contribution:
    """Steps 1-2: this rank's buffers (not weighted yet), its health, the padding."""
    pad = pieces_of(plan)
    tensors = target.averaged(scheduler.config)
    ref = _reference(plan, scheduler)
    groups = [tensors] if ref is None else [tensors[:len(target.parameters())],
                                            tensors[len(target.parameters()):]]
    buffers = [backend.pack(g, pad) for g in groups]
    flat = [b for group in buffers for b in group]
    healthy = backend.all_finite(flat) if scheduler.config.nonfinite_guard else True
    wire = ref.compression if ref is not None and ref.ready else "none"
    return Contribution(groups, buffers, healthy, pad, wire)


def _weigh(plan, backend: Backend, contrib: Contribution, scheduler) -> list:
    """Steps 2-4: the buffers to send (the update since ``prev`` on a compressed sync),
    weighted, the payload last."""
    if contrib.wire != "none":
        prev = backend.load_state(scheduler.outer.prev)
        contrib.buffers[0] = [x - p for x, p in zip(contrib.buffers[0], prev)]
    buffers = contrib.flat
    if not contrib.healthy:
        backend.scale(buffers, 0.0)
    elif plan.weight != 1.0:
        backend.scale(buffers, plan.weight)
    return buffers + [_payload_buffer(backend, scheduler.payload(plan, contrib.healthy),
                                      contrib.pad)]


def _finish(plan, scheduler, backend: Backend, target: SyncTarget, contrib: Contribution,
            buffers: list, since: list | None):
    """Steps 6-7: divide, the outer step (with a reference model), unpack (keeping progress
    ``since`` with overlap), the state rule. Returns the reduced payload."""
    payload = backend.to_numpy(buffers[-1])[:plan.payload_len]
    total = scheduler.total_weight(plan, payload)
    sums = contrib.split(buffers[:-1])
    keep = contrib.split(since) if since is not None and contrib.healthy else None
    pull = scheduler.config.overlap_pull
    ref = _reference(plan, scheduler)
    if ref is None:
        values, divide_by = _pulled(sums[0], total, keep and keep[0], pull)
        backend.unpack(values, contrib.tensors[0], divide_by, since=keep and keep[0])
    else:
        averaged = sums[0]
        backend.scale(averaged, 1.0 / total)
        if contrib.wire != "none":
            averaged = [a + p for a, p in zip(averaged, backend.load_state(ref.prev))]
        new = ref.advance(backend, averaged, lr=scheduler.sync_lr(plan, payload))
        for k, (values, divide_by) in enumerate([(new, 1.0), (sums[1], total)]):
            values, divide_by = _pulled(values, divide_by, keep and keep[k], pull)
            backend.unpack(values, contrib.tensors[k], divide_by, since=keep and keep[k])
    if scheduler.resets_state(contrib.healthy):
        state = target.optimizer_state()
        if state:
            backend.zero_tensors(state)
    return payload


def _pulled(values: list, divide_by: float, since: list | None, pull: float) -> tuple:
    """``(buffers, divide_by)`` for :meth:`Backend.unpack` such that a late average moves each
    tensor by ``pull`` times its correction: ``x <- x + pull * (values / divide_by - since)``
    (unpack writes ``buffers / divide_by + (x - since)``). A correction measured a round ago
    and applied whole overshoots where the local steps already pull the ranks together (a
    large step size), and the ranks' difference then grows from round to round; half of it
    damps that and keeps most of the averaging."""
    if since is None or pull == 1.0:
        return values, divide_by
    return [v * (pull / divide_by) + s * (1.0 - pull) for v, s in zip(values, since)], 1.0


def stage_collectives(plan, rank: int, backend: Backend, buffers: list, wire: tuple = ("none", 0)
                      ) -> Generator[Collective, tuple, tuple]:
    """Step 5 alone: the plan's stages over ``buffers`` (a generator as :func:`sync_protocol`);
    returns the summed buffers and each stage's seconds. ``wire = (kind, n)``: on the
    top-level links the first ``n`` buffers travel as ``kind`` (:func:`compressed_sum`)."""
    times = []
    kind, count = wire
    for stage in plan.stages:
        if stage.kind == "broadcast" and rank != stage.root:
            backend.scale(buffers, 0.0)
        if kind != "none" and count and stage.kind == "allreduce" and \
                stage.link_level == plan.level:
            buffers, seconds = yield from compressed_sum(stage, backend, buffers, kind, count)
        else:
            buffers, seconds = yield Collective(COLLECTIVE_OF_STAGE[stage.kind], stage.ranks,
                                                buffers, f"alsgd.{stage.kind}.{stage.link_level}",
                                                stage)
        times.append(seconds)
    return buffers, times


def compressed_sum(stage, backend: Backend, buffers: list, kind: str, count: int
                   ) -> Generator[Collective, tuple, tuple]:
    """A Sum over ``stage.ranks`` with the first ``count`` buffers on the wire as ``kind``:
    an alltoall (each member gets its part of every member's buffers), a float32 sum of
    the parts in member order, rounded again, and an allgather of the summed parts: the
    bytes of a ring allreduce at half the width. Every member ends with the same sums.
    Returns the summed buffers and the seconds of both collectives."""
    k = len(stage.ranks)
    head, tail = buffers[:count], buffers[count:]
    sent = [backend.to_wire(head, kind, k)] + [backend.pad(b, k) for b in tail]
    name = f"alsgd.{kind}.{stage.link_level}"
    parts, t_scatter = yield Collective("alltoall", stage.ranks, sent, f"{name}.scatter", stage)
    mine = [backend.sum_pieces(parts[0], k, kind)] + [backend.sum_pieces(p, k, None)
                                                      for p in parts[1:]]
    full, t_gather = yield Collective("allgather", stage.ranks, mine, f"{name}.gather", stage)
    out = backend.from_wire(full[0], kind, head) + [
        backend.trim(f, backend.length(b)) for f, b in zip(full[1:], tail)]
    return out, t_scatter + t_gather


ORIGIN_MISSING = -1.0  # a fingerprint slot of a rank that noted no local start


def note_local_start(scheduler, backend: Backend, target: SyncTarget) -> None:
    """Call before each local step (cheap after the first): notes, once per scheduler with
    ``check_origin``, a fingerprint of the parameters this rank begins the local phase with."""
    if scheduler.origin_pending and scheduler.origin is None:
        scheduler.origin = backend.fingerprint(list(target.parameters()))


def origin_check(plan, scheduler, backend: Backend) -> Generator[Collective, tuple, Any]:
    """Start from one model: at the first sync of a scheduler with ``check_origin`` (every
    rank reaches it at the same point), an allgather over all ranks of each rank's
    fingerprint (:func:`note_local_start`). If they differ, or a rank noted none, the plan
    becomes :meth:`~adaptive_lsgd.scheduler.Scheduler.from_rank0`. Returns the plan to run."""
    if not scheduler.origin_pending:
        return plan
    scheduler.origin_pending = False
    mine = scheduler.origin
    if mine is None:
        mine = np.full(4, ORIGIN_MISSING, dtype=np.float32)
    everyone = tuple(range(scheduler.size))
    (gathered,), _ = yield Collective("allgather", everyone, [backend.from_numpy(mine)],
                                      "alsgd.origin")
    rows = np.asarray(backend.to_numpy(gathered)).reshape(scheduler.size, -1)
    if (rows == ORIGIN_MISSING).any() or not (rows == rows[0]).all():
        return scheduler.from_rank0(plan)
    return plan


def _checked(plan, scheduler, backend: Backend) -> Generator[Collective, tuple, Any]:
    """:func:`origin_check`; a sync that gives every rank rank 0's model also restarts the
    reference model (the ranks' references may differ then)."""
    checked = yield from origin_check(plan, scheduler, backend)
    if checked is not plan and scheduler.outer is not None:
        scheduler.outer.clear()
    return checked


def sync_protocol(plan, scheduler, backend: Backend, target: SyncTarget
                  ) -> Generator[Collective, tuple, Any]:
    """The whole sync of ``plan`` on this rank, as a generator: it yields each
    :class:`Collective` and must be sent ``(result buffers, seconds)``; its return value is
    the :class:`~adaptive_lsgd.scheduler.SyncResult`. Drive it with :func:`run_sync`."""
    start = backend.clock()
    plan = yield from _checked(plan, scheduler, backend)
    contrib = _contribution(plan, scheduler, backend, target)
    buffers = _weigh(plan, backend, contrib, scheduler)
    buffers, times = yield from stage_collectives(plan, scheduler.rank, backend, buffers,
                                                  (contrib.wire, len(contrib.buffers[0])))
    payload = _finish(plan, scheduler, backend, target, contrib, buffers, None)
    return scheduler.complete_sync(plan, payload, times, sync_s=backend.clock() - start)


def run_sync(plan, scheduler, backend: Backend, target: SyncTarget):
    """Run the sync of ``plan`` over ``backend``'s collectives, one after another (what a
    real integration does); returns the :class:`~adaptive_lsgd.scheduler.SyncResult`."""
    gen = sync_protocol(plan, scheduler, backend, target)
    try:
        collective = next(gen)
        while True:
            t0 = backend.clock()
            out = backend.run(collective)
            collective = gen.send((out, backend.clock() - t0))
    except StopIteration as stop:
        return stop.value


def _run_now(gen, backend: Backend):
    """Drive a protocol generator over ``backend``'s blocking collectives; its return value."""
    try:
        collective = next(gen)
        while True:
            collective = gen.send((backend.run(collective), 0.0))
    except StopIteration as stop:
        return stop.value


class Deadlock(RuntimeError):
    """In-process ranks wait on collectives that can never match (a real job would hang)."""


def run_in_process(generators: list, seconds: Callable[[int, Collective], float]) -> list:
    """Drive the sync generators of every rank of a job held in one process, matching their
    collectives as a real transport does: a link's collective runs once every member has it
    next (same op, same ranks). ``generators[r]`` is rank r's (None: r does not sync);
    ``seconds(rank, collective)`` is the time r reports for it. A reduce-scatter leaves the
    member at link position i the i-th ``np.array_split`` piece of each buffer's sum (as
    Horovod does); an allgather concatenates the members' buffers in link order. Returns
    each rank's result; raises :class:`Deadlock` instead of hanging."""
    n = len(generators)
    results: list = [None] * n
    waiting: dict = {}
    for r, gen in enumerate(generators):
        if gen is not None:
            _advance(r, gen, None, waiting, results)
    while waiting:
        progressed = False
        for r in sorted(waiting):
            if r not in waiting:
                continue
            col = waiting[r]
            members = col.ranks
            if not all(m in waiting and waiting[m].ranks == members and waiting[m].op == col.op
                       for m in members):
                continue
            outs = _combine(col.op, [waiting[m].buffers for m in members])
            for m, out in zip(members, outs):
                sent = (out, float(seconds(m, waiting[m])))
                del waiting[m]
                _advance(m, generators[m], sent, waiting, results)
            progressed = True
        if not progressed:
            raise Deadlock("collectives cannot proceed: rank -> (op, ranks) "
                           + str({r: (c.op, c.ranks) for r, c in waiting.items()}))
    return results


def _advance(rank, gen, sent, waiting, results) -> None:
    try:
        waiting[rank] = gen.send(sent) if sent is not None else next(gen)
    except StopIteration as stop:
        results[rank] = stop.value


def _combine(op: str, per_member: list) -> list:
    """The result buffers of a Sum collective for each member, given each member's buffers."""
    counts = {len(bufs) for bufs in per_member}
    if len(counts) != 1:
        raise Deadlock(f"{op}: members hand in different numbers of buffers {sorted(counts)}")
    k = len(per_member)
    if op == "alltoall":  # member j gets the j-th part of every member's buffers, in member order
        return [[np.concatenate([np.array_split(bufs[i], k)[pos] for bufs in per_member])
                 for i in range(len(per_member[0]))] for pos in range(k)]
    if op == "allgather":
        gathered = [np.concatenate([bufs[i] for bufs in per_member]) for i in range(counts.pop())]
        return [[g.copy() for g in gathered] for _ in range(k)]
    sums = []
    for i in range(counts.pop()):
        lengths = {len(bufs[i]) for bufs in per_member}
        if len(lengths) != 1:
            raise Deadlock(f"{op}: buffer {i} has lengths {sorted(lengths)} on the members")
        sums.append(np.sum([bufs[i] for bufs in per_member], axis=0))
    if op == "reducescatter":
        return [[np.array_split(s, k)[pos].copy() for s in sums] for pos in range(k)]
    return [[s.copy() for s in sums] for _ in range(k)]


# -- overlap ---------------------------------------------------------------------------------
class InFlight:
    """An overlapped average on its way: the plan, the backend's handle, this rank's buffers
    at the round's end (``snapshot``), its :class:`Contribution` and when it started;
    ``done_t`` is when the transfer was first seen complete (:meth:`note`)."""

    __slots__ = ("plan", "handle", "snapshot", "contrib", "start", "done_t")

    def __init__(self, plan, handle, snapshot, contrib, start):
        self.plan, self.handle, self.snapshot = plan, handle, snapshot
        self.contrib, self.start, self.done_t = contrib, start, None

    def note(self, backend: Backend, now: float) -> None:
        """Call after each local step: notes when the transfer completed (one step's resolution)."""
        if self.done_t is None and backend.poll(self.handle):
            self.done_t = now


def start_overlapped(plan, scheduler, backend: Backend, target: SyncTarget) -> InFlight:
    """Steps 1-4 and the start of one asynchronous allreduce of the buffers (the plan has
    exactly one stage: overlap refuses chained syncs). Every rank issues one collective per
    round, as without overlap."""
    plan = _run_now(_checked(plan, scheduler, backend), backend)
    (stage,) = plan.stages
    contrib = _contribution(plan, scheduler, backend, target)
    if contrib.wire != "none":  # pragma: no cover - load_config refuses overlap + compression
        raise ValueError("an overlapped average cannot be compressed")
    snapshot = backend.copy(contrib.flat)
    buffers = _weigh(plan, backend, contrib, scheduler)
    start = backend.clock()
    handle = backend.start(Collective("allreduce", stage.ranks, buffers,
                                      f"alsgd.overlap.{stage.link_level}", stage))
    return InFlight(plan, handle, snapshot, contrib, start)


def finish_overlapped(inflight: InFlight, scheduler, backend: Backend, target: SyncTarget):
    """Wait for ``inflight`` and apply it: ``x <- x + pull * (average - x at the round's end)`` (a
    rank that was left out is reset to the average). The transfer time (start to the first
    completed poll) feeds the link statistics, the time blocked here the communication
    accounting. Returns the :class:`~adaptive_lsgd.scheduler.SyncResult`."""
    t0 = backend.clock()
    buffers = backend.wait(inflight.handle)
    end = backend.clock()
    transfer = (inflight.done_t or end) - inflight.start
    payload = _finish(inflight.plan, scheduler, backend, target, inflight.contrib, buffers,
                      inflight.snapshot)
    return scheduler.complete_sync(inflight.plan, payload, [transfer],
                                   waited_s=backend.clock() - t0)


def sync_round(plan, scheduler, backend: Backend, target: SyncTarget,
               inflight: InFlight | None = None) -> tuple:
    """What an integration runs when the scheduler returns ``plan`` at a round's end: first
    finish the overlapped average in flight (if any), then start this round's in the
    background (``plan.overlap``) or run it. Returns ``(result, inflight)``: the result of the
    sync that completed now (None if none did) and the average now in flight (or None)."""
    done = finish_overlapped(inflight, scheduler, backend, target) if inflight is not None else None
    if plan.overlap:
        return done, start_overlapped(plan, scheduler, backend, target)
    return run_sync(plan, scheduler, backend, target), None


__all__ = ["Backend", "NumpyBackend", "SyncTarget", "Collective", "sync_protocol", "run_sync",
           "Contribution", "compressed_sum", "encode_wire", "decode_wire",
           "stage_collectives", "sync_round", "note_local_start", "origin_check",
           "run_in_process", "Deadlock", "InFlight", "start_overlapped", "finish_overlapped",
           "pieces_of", "COLLECTIVE_OF_STAGE"]
