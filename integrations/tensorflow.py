"""TensorFlow/Keras over Horovod: drop-ins for ``hvd.DistributedOptimizer`` and
``hvd.DistributedGradientTape`` running adaptive (post-)local SGD.

A Keras script changes two lines (the optimizer wrapper and one callback)::

    import adaptive_lsgd.integrations.tensorflow as alsgd   # before hvd.init()
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    hvd.init()
    opt = tf.keras.optimizers.SGD(0.05 * hvd.size(), momentum=0.9)
    opt = alsgd.DistributedOptimizer(opt, config={"warmup": 500})    # was hvd.DistributedOptimizer
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=10,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                         hvd.callbacks.MetricAverageCallback(),
                         alsgd.LocalSGDCallback()])                   # the one new callback
    print(alsgd.summary(opt))   # on every rank: it gathers the per-rank figures

A custom loop changes the tape line and reports each finished step::

    lsgd = alsgd.LocalSGD(model, opt, config={"policy": "fixed", "periods": [4]})

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        tape = alsgd.DistributedGradientTape(tape, lsgd)             # was hvd.DistributedGradientTape
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for x, y in dataset:
        with lsgd.step():                                            # times the step, syncs after it
            train_step(x, y)

(``alsgd.step(model, opt, config)`` after each step does the same without holding an object.)

In the mini-batch phase (the first ``warmup`` steps, or until the first learning-rate drop)
gradients go through Horovod's own reduction code, so the phase *is* Horovod's
``DistributedOptimizer``/``DistributedGradientTape``. In the local phase that reduction is
skipped: the phase is a boolean ``tf.Variable`` read by a ``tf.cond`` in the traced step, so
one trace serves both phases (eagerly, a Python branch). After each local update the core
scheduler (``adaptive_lsgd.Scheduler``) says when to average the model variables over which
process set; this file only moves tensors and times them. Steps are reported eagerly, after
they ran (``step_done`` refuses to run inside a ``tf.function`` or a TF1 graph).

Horovod's ``backward_passes_per_step`` (Keras optimizer) aggregates in both phases through
Horovod's helper, whose reduction follows the phase; only applied updates count as steps.
``process_set`` works as in Horovod: members reduce and average inside the set, other ranks
train locally.

This module sets ``HOROVOD_DYNAMIC_PROCESS_SETS=1`` when imported (unless set), so import it
before ``hvd.init()``; hierarchical topologies need it.
"""

from __future__ import annotations

import os

_HVD_INIT_BEFORE_IMPORT = "HOROVOD_DYNAMIC_PROCESS_SETS" not in os.environ
os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

import contextlib  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import horovod.tensorflow as hvd  # noqa: E402
import horovod.tensorflow.keras as hvd_keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from adaptive_lsgd import agreement  # noqa: E402
from adaptive_lsgd.config import Config, cautions, check_supported, load_config  # noqa: E402
from adaptive_lsgd.integrations._horovod import (  # noqa: E402
    ProcessSets,
    Runtime,
    elastic_job,
    host_name,
    keras_allreduce,
    tf_tape_base,
    warn_if_in_flight,
)
from adaptive_lsgd.scheduler import SyncPlan, SyncResult, starts_local  # noqa: E402
from adaptive_lsgd.summary import combine_summaries  # noqa: E402
from adaptive_lsgd.sync import (  # noqa: E402
    Backend,
    SyncTarget,
    finish_overlapped,
    note_local_start,
    run_sync,
    sync_round,
)

# Horovod was initialised before this module could ask for dynamic process sets.
_HVD_INIT_BEFORE_IMPORT = _HVD_INIT_BEFORE_IMPORT and hvd.is_initialized()

__all__ = ["LocalSGD", "DistributedOptimizer", "DistributedGradientTape",
           "PartialDistributedGradientTape", "LocalSGDCallback",
           "step", "summary", "allow_uneven_steps", "host_name", "process_set_for"]

_PROCESS_SETS = ProcessSets(hvd, "adaptive_lsgd.integrations.tensorflow",
                            init_before_import=_HVD_INIT_BEFORE_IMPORT)
_SHARED: dict = {}  # (config digest, process set id, TF1 graph or None) -> LocalSGD, for the helpers


def _exit_barrier() -> None:
    hvd.allreduce(tf.zeros([1]), op=hvd.Sum, name="alsgd.exit")


def process_set_for(ranks: tuple):
    """The Horovod process set over ``ranks`` (see :class:`ProcessSets`)."""
    return _PROCESS_SETS.get(ranks)


# -- helpers on TensorFlow objects ----------------------------------------------------------------
def _variables_of(obj) -> list:
    """An optimizer's variables: ``variables`` is a method (legacy), a property, or a list."""
    v = obj.variables
    return list(v if isinstance(v, list) else v())


def _floating(variables) -> list:
    return [v for v in variables if v.dtype.is_floating]


def _unique(variables) -> list:
    seen, out = set(), []
    for v in variables:
        if v.ref() not in seen:
            seen.add(v.ref())
            out.append(v)
    return out


@tf.function(reduce_retracing=True)
def _all_finite(tensors):
    return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(t)) for t in tensors]))


def _dtype_groups(items, dtype_of) -> list:
    """Indices of ``items`` per dtype, in a rank-agreed order (by dtype name)."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(dtype_of(item).name, []).append(i)
    return [groups[d] for d in sorted(groups)]


class _Packer:
    """Compiled moves between a fixed list of variables and one flat buffer per dtype: one
    ``tf.function`` each for packing, unpacking (one traced ``assign`` per variable, not one
    eager op each) and zeroing, so a sync of a model of hundreds of variables costs a few
    function calls outside the collectives. Packing and unpacking are called through the
    concrete functions they trace, kept per padding and per buffer shape: a ``tf.function``
    call looks its trace up every time (binding its arguments, hashing every captured
    variable), which costs 0.5-2 ms a sync on MobileNetV2's 262 variables."""

    def __init__(self, variables: list):
        self.variables = variables
        self.groups = _dtype_groups(variables, lambda v: v.dtype)
        self.sizes = [[int(variables[i].shape.num_elements()) for i in idx] for idx in self.groups]
        self._pack, self._unpack = {}, {}

    def pack(self, pad_to: int) -> tuple:
        """The flat buffers and whether they are all finite (one call for both)."""
        if pad_to not in self._pack:
            self._pack[pad_to] = tf.function(lambda: self._packed(pad_to)).get_concrete_function()
        flats, finite = self._pack[pad_to]()
        return list(flats), finite

    def unpack(self, buffers: list, divide_by, since: list | None = None) -> None:
        """Write ``buffers / divide_by`` (plus the progress since ``since``) into the variables."""
        args = [buffers, divide_by] + ([] if since is None else [since])
        key = (tuple(int(b.shape[0]) for b in buffers), since is None)
        if key not in self._unpack:
            traced = self._unpack_fn if since is None else self._unpack_since_fn
            self._unpack[key] = traced.get_concrete_function(*args)
        self._unpack[key](*args)

    def _packed(self, pad_to: int) -> tuple:
        out = []
        for idx, sizes in zip(self.groups, self.sizes):
            flat = tf.concat([tf.reshape(self.variables[i], [-1]) for i in idx], axis=0)
            if sum(sizes) < pad_to:
                flat = tf.concat([flat, tf.zeros([pad_to - sum(sizes)], flat.dtype)], axis=0)
            out.append(flat)
        # (Not the cheaper-looking is_finite(sum(x * 0)): Grappler folds x * 0 to zeros.)
        finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(f)) for f in out]))
        return out, finite

    @tf.function
    def _unpack_fn(self, buffers, divide_by):
        self._assign(buffers, divide_by, None)

    @tf.function
    def _unpack_since_fn(self, buffers, divide_by, since):
        self._assign(buffers, divide_by, since)

    def _assign(self, buffers, divide_by, since) -> None:
        # Per variable: a slice of the buffer times 1 / divide_by, whose fresh result the
        # assign adopts: one pass over the memory (a division of the whole buffer and a split
        # first would be three).
        for k, (idx, sizes) in enumerate(zip(self.groups, self.sizes)):
            scale = 1 / tf.cast(divide_by, buffers[k].dtype)
            offset = 0
            for i, n in zip(idx, sizes):
                var = self.variables[i]
                part = buffers[k][offset:offset + n] * scale
                if since is not None:
                    var.assign_add(tf.reshape(part - since[k][offset:offset + n], var.shape))
                else:
                    var.assign(tf.reshape(part, var.shape))
                offset += n

    @tf.function
    def zero(self):
        for var in self.variables:
            var.assign(tf.zeros_like(var))


_WIRE_DTYPE = {"fp16": tf.float16, "bf16": tf.bfloat16}


class TFBackend(Backend):
    """The core's sync protocol (:mod:`adaptive_lsgd.sync`) over Horovod's TensorFlow
    collectives: compiled packing (:class:`_Packer`), one grouped allreduce per dtype over the
    process set of the stage's ranks. Buffers are immutable tensors, so the in-place ops
    replace the items of the list they are given. An overlapped average (:meth:`start`) runs
    on a thread of its own: Horovod's eager TensorFlow ops block their caller (and release the
    GIL while they wait), so the next round's steps run meanwhile."""

    def __init__(self, process_sets: dict, gpu: bool = False):
        self.process_sets, self.gpu = process_sets, gpu
        self._packers: dict = {}
        self._packed: tuple = (None, None)  # the buffers pack() returned last, their finiteness
        self._thread: ThreadPoolExecutor | None = None

    def start(self, collective):
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alsgd-overlap")
        return self._thread.submit(self.run, collective)

    def poll(self, handle) -> bool:
        return handle.done()

    def wait(self, handle) -> list:
        return handle.result()

    def _packer(self, variables: list) -> _Packer:
        key = tuple(map(id, variables))  # the packer holds them: no id is reused while cached
        if key not in self._packers:
            self._packers[key] = _Packer(list(variables))
        return self._packers[key]

    def pack(self, tensors, pad_to):
        if not tensors:
            return []
        buffers, finite = self._packer(tensors).pack(pad_to)
        self._packed = (buffers, finite)
        return buffers

    def unpack(self, buffers, tensors, divide_by, since=None):
        if not tensors:
            return
        self._packer(tensors).unpack(list(buffers), tf.constant(divide_by, tf.float64),
                                     None if since is None else list(since))

    def all_finite(self, buffers):
        if not buffers:
            return True
        packed, finite = self._packed
        self._packed = (None, None)
        same = packed is not None and len(packed) == len(buffers) and \
            all(a is b for a, b in zip(packed, buffers))
        return bool(finite if same else _all_finite(buffers))

    def scale(self, buffers, factor):
        for i, b in enumerate(buffers):
            buffers[i] = tf.zeros_like(b) if factor == 0 else b * tf.cast(factor, b.dtype)

    def copy(self, buffers):
        return list(buffers)

    def zero_tensors(self, tensors):
        self._packer(tensors).zero()

    def from_numpy(self, values):
        return tf.constant(np.asarray(values, dtype=np.float32))

    def to_numpy(self, buffer):
        return buffer.numpy()

    # -- the wire (compression) ---------------------------------------------------------------
    def to_wire(self, buffers, kind, multiple):
        flat = tf.concat([tf.cast(tf.reshape(b, [-1]), tf.float32) for b in buffers], axis=0)
        return self.pad(tf.bitcast(tf.cast(flat, _WIRE_DTYPE[kind]), tf.int16), multiple)

    def from_wire(self, wire, kind, like):
        flat = tf.cast(tf.bitcast(wire, _WIRE_DTYPE[kind]), tf.float32)
        out, offset = [], 0
        for b in like:
            n = int(b.shape[0])
            out.append(tf.cast(flat[offset:offset + n], b.dtype))
            offset += n
        return out

    def pad(self, buffer, multiple):
        extra = -int(buffer.shape[0]) % multiple
        return tf.concat([buffer, tf.zeros([extra], buffer.dtype)], axis=0) if extra else buffer

    def trim(self, buffer, length):
        return buffer[:length]

    def length(self, buffer):
        return int(buffer.shape[0])

    def sum_pieces(self, buffer, pieces, kind):
        parts = tf.reshape(buffer, [pieces, -1])
        decode = (lambda x: x) if kind is None else \
            (lambda x: tf.cast(tf.bitcast(x, _WIRE_DTYPE[kind]), tf.float32))
        total = decode(parts[0])
        for i in range(1, pieces):
            total = total + decode(parts[i])
        return total if kind is None else tf.bitcast(tf.cast(total, _WIRE_DTYPE[kind]), tf.int16)

    def run(self, c):
        ps = self.process_sets.get(c.ranks, hvd.global_process_set)
        out = list(c.buffers)
        if c.op == "alltoall":
            out = [hvd.alltoall(b, name=f"{c.name}.{k}", process_set=ps) for k, b in enumerate(out)]
        elif c.op == "allreduce":  # Horovod's TF grouped allreduce takes one dtype per call
            for idx in _dtype_groups(out, lambda b: b.dtype):
                summed = hvd.grouped_allreduce([out[i] for i in idx], op=hvd.Sum, process_set=ps,
                                               name=f"{c.name}.{out[idx[0]].dtype.name}")
                for i, t in zip(idx, summed):
                    out[i] = t
        else:
            for k, b in enumerate(out):
                name = f"{c.name}.{k}"
                out[k] = (hvd.reducescatter(b, op=hvd.Sum, name=name, process_set=ps)
                          if c.op == "reducescatter" else hvd.allgather(b, name=name, process_set=ps))
        if self.gpu:
            tf.test.experimental.sync_devices()
        return out


def _current_lr(optimizer) -> float | None:
    """The learning rate the optimizer is using now, as a Python float (None if unknown)."""
    opt = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer
    try:
        lr = opt.learning_rate
    except (AttributeError, ValueError):
        lr = getattr(opt, "lr", None)
    if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
        lr = opt._decayed_lr(tf.float32) if hasattr(opt, "_decayed_lr") else lr(opt.iterations)
    if callable(lr) and not isinstance(lr, (tf.Variable, tf.Tensor)):
        lr = lr()
    try:
        return float(tf.keras.backend.get_value(lr))
    except (TypeError, ValueError):
        return None


class LocalSGD:
    """Adaptive local SGD for one TensorFlow model: config, topology, process sets, scheduler.

    Building it is a collective (an allgather checks that every rank runs the same config):
    create it on every rank at the same point, after ``hvd.init()``. ``model`` is a Keras model,
    a ``tf.Module`` or a list of variables; ``optimizer`` (optional) supplies the learning rate
    and, with ``momentum: average`` or ``reset``, the slot variables. :func:`DistributedOptimizer`
    makes one for you (``opt.alsgd``); custom loops use it directly::

        lsgd = alsgd.LocalSGD(model, opt, config={"policy": "fixed", "periods": [4]})
        for x, y in dataset:
            with lsgd.step():          # or: train_step(x, y); lsgd.step_done()
                train_step(x, y)       # a tf.function using alsgd.DistributedGradientTape(tape, lsgd)
        lsgd.average_now()             # collective: the average model on every rank
        ckpt = lsgd.state_dict()       # JSON-serialisable; lsgd.load_state_dict(ckpt) resumes

    ``allreduce_gradients`` is the boolean variable the traced steps read: True in the
    mini-batch phase. ``scheduler``, ``topology`` and ``config`` are the core objects.

    ``process_set`` (a Horovod process set, as ``hvd.DistributedOptimizer(process_set=...)``):
    its members reduce gradients over the set in the mini-batch phase (Horovod's code) and
    average among themselves, flat inside the set; building it is then a collective over the
    set. On a rank outside the set nothing is reduced or averaged (Horovod's reduction is the
    identity there): the optimizer or tape is a plain local one and ``step_done`` does nothing.
    """

    def __init__(self, model=None, optimizer=None, config: Config | dict | str | None = None,
                 process_set=hvd.global_process_set):
        self.config = load_config(config)
        if process_set is None or process_set.process_set_id == 0:
            process_set = hvd.global_process_set
        elif elastic_job():
            raise ValueError("adaptive-lsgd: process_set in an elastic job is not supported "
                             "(Horovod drops the process sets at every reset); leave process_set "
                             "as hvd.global_process_set")
        self.process_set = process_set
        self.member = bool(process_set.included())
        self._model = None
        self._optimizer = None
        self._lists = None  # (key, (parameters, buffers)): see _variable_lists
        # Rank-local variables (model-parallel shards): never averaged. A tape's
        # register_local_source and a Keras optimizer's register_local_var add to it.
        self.local_refs: set = set()
        self._param_bytes: int | None = None
        self._gpu = bool(tf.config.list_logical_devices("GPU"))
        # Horovod's gradient aggregation (backward_passes_per_step > 1): only every N-th step
        # applies an update, and only those count as steps; the compute time of the others
        # is added to the next applied one.
        self._aggregation = None
        self._pending_s = 0.0
        mini_batch = not (self.member and starts_local(self.config))
        with tf.init_scope():
            self.allreduce_gradients = tf.Variable(mini_batch, trainable=False,
                                                   dtype=tf.bool, name="alsgd_allreduce_gradients")
        self._flag = mini_batch
        self.runtime = None
        self._inflight = None
        if self.member:
            self.build()
        self.attach(model, optimizer)
        self._t = time.perf_counter()

    # -- set-up ---------------------------------------------------------------------------------
    def build(self, carry: dict | None = None) -> None:
        """Agree on the config, build topology, process sets and scheduler (collective over
        the process set)."""
        check_supported(self.config, "tensorflow", elastic=elastic_job())
        ps = self.process_set

        def gather(obj, name):
            return hvd.allgather_object(obj, name=name, process_set=ps)

        self.runtime = Runtime(hvd, _PROCESS_SETS, self.config, self._param_bytes or 0,
                               exit_barrier=_exit_barrier, carry=carry, scope=tf.init_scope,
                               process_set=ps, gather=gather, check_origin=True, can_overlap=True)
        self._backend = TFBackend(self.runtime.process_sets, self._gpu)
        self._inflight = None  # overlap: the average started at the end of the last round
        self._update_flag()

    def _built(self) -> Runtime:
        if self.runtime is None:
            raise RuntimeError(f"adaptive-lsgd: rank {hvd.rank()} is not in this optimizer's "
                               f"process set {list(self.process_set.ranks)}: it trains as a plain "
                               "local optimizer here and has no scheduler")
        return self.runtime

    @property
    def scheduler(self):
        return self._built().scheduler

    @property
    def topology(self):
        return self._built().topology

    @property
    def process_sets(self) -> dict:
        return self._built().process_sets

    @property
    def rank(self) -> int:
        """This rank's position in the process set (the scheduler's rank)."""
        return self._built().rank

    def attach(self, model=None, optimizer=None) -> LocalSGD:
        """Name the model (whose variables are averaged) and the optimizer (learning rate,
        slot variables). Either may be given later; the last one given is used."""
        if model is not None:
            if model is not self._model:
                self._param_bytes = None
            self._model = model
            self._note_origin()
        if optimizer is not None:
            self._optimizer = optimizer
        return self

    def reset(self) -> None:
        """Rebuild topology, process sets and scheduler after Horovod re-initialised (elastic
        reset), carrying the scheduler's phase, step and periods across."""
        carry = self.scheduler.state_dict()
        _PROCESS_SETS.clear()
        self.build(carry)
        self._t = time.perf_counter()

    @property
    def is_local(self) -> bool:
        return self.runtime is not None and self.scheduler.is_local

    # -- the gradient side (used by DistributedOptimizer and DistributedGradientTape) -------------
    @tf.autograph.experimental.do_not_convert
    def reduce_gradients(self, reduce_fn, grads, sparse_as_dense: bool = False) -> list:
        """``reduce_fn(grads)`` (Horovod's reduction) in the mini-batch phase; ``grads`` as they
        are in the local phase. Inside ``tf.function`` a ``tf.cond`` on
        :attr:`allreduce_gradients`, so a traced step follows phase changes without retracing."""
        grads = list(grads)
        if tf.executing_eagerly():
            return list(reduce_fn(grads)) if self._flag else grads
        idx = [i for i, g in enumerate(grads) if g is not None]
        if not idx:
            return list(reduce_fn(grads))

        def mini_batch():
            out = reduce_fn(grads)
            return [out[i] for i in idx]

        def local():
            out = []
            for i in idx:
                g = grads[i]
                if isinstance(g, tf.IndexedSlices):
                    out.append(tf.convert_to_tensor(g) if sparse_as_dense else g)
                else:
                    out.append(tf.identity(g))
            return out

        reduced = tf.cond(self.allreduce_gradients, mini_batch, local)
        merged = list(grads)
        for i, g in zip(idx, reduced):
            merged[i] = g
        return merged

    def _update_flag(self) -> None:
        want = not self.scheduler.is_local
        if want != self._flag:
            self.allreduce_gradients.assign(want)
            self._flag = want

    # -- the step -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self):
        """Time one training step (the body of the ``with``) and report it when it ends."""
        self.begin_step()
        start = time.perf_counter()
        yield self
        self.step_done(self._now() - start)

    def begin_step(self) -> None:
        """Call eagerly before a training step (``with lsgd.step()`` and the Keras callback
        do): before the first local step it notes the model each rank begins from, so that
        the first sync gives every rank rank 0's model if they differ (README, "Start from
        one model"). Without it the first sync is rank 0's model. Not a collective."""
        self._note_origin()

    def _note_origin(self) -> None:
        """Before the first local step is reported, (re)note the model this rank begins from
        (the last note before that step counts: attach, then the step's start)."""
        rt = self.runtime
        if rt is None or self._model is None or not rt.scheduler.origin_pending:
            return
        sched = rt.scheduler
        if not sched.is_local or sched.step != sched.steps_mini_batch:
            return  # not in the local phase yet, or a local step was already reported
        target = SyncTarget(self._parameters, self._buffers)
        if target.parameters():  # an unbuilt Keras model has no variables yet: nothing to note
            sched.origin = None
            note_local_start(sched, self._backend, target)

    def step_done(self, compute_s: float | None = None, lr: float | None = None) -> SyncResult | None:
        """Report a finished training step; run the sync the scheduler asks for (collective
        over the process set). Call it eagerly, after the step (not inside ``tf.function``).

        ``compute_s`` defaults to the time since the previous report ended; ``lr`` to the
        attached optimizer's current learning rate. Returns the sync's result, or None.
        With ``backward_passes_per_step=N`` only every N-th call finds an applied update: the
        others add their time to it and return None (the scheduler counts applied updates).
        On a rank outside the process set it does nothing."""
        if not tf.executing_eagerly():
            raise RuntimeError("adaptive-lsgd: step_done() / step() report a finished step and "
                               "may run a sync: call them eagerly, after the step, not inside a "
                               "tf.function or a TF1 graph")
        now = self._now()
        if compute_s is None:
            compute_s = now - self._t
        if self.runtime is None:  # not in the process set: a plain local optimizer here
            return None
        if not self._update_applied():
            self._pending_s += compute_s
            self._t = time.perf_counter()
            return None
        compute_s, self._pending_s = compute_s + self._pending_s, 0.0
        sched = self.scheduler
        if lr is None and self._optimizer is not None:
            lr = _current_lr(self._optimizer)
        if sched.needs_shared_lr and lr is not None and self.process_set.size() > 1:
            lr = float(hvd.allreduce(tf.constant(lr, tf.float64), op=hvd.Min, name="alsgd.lr",
                                     process_set=self.process_set))
        plan = sched.step_done(compute_s, lr=lr)
        if self._inflight is not None:
            self._inflight.note(self._backend, time.perf_counter())
        result = self._sync(plan) if plan is not None else None
        self._update_flag()
        self._t = time.perf_counter()
        return result

    def _update_applied(self) -> bool:
        """Whether the last training step applied an update. With Horovod's gradient
        aggregation only every N-th does: its counter of backward passes is back at 0 then
        (the optimizer's ``iterations`` counts every pass, applied or not, as in Horovod)."""
        helper = self._aggregation
        counter = getattr(helper, "counter", None)
        return counter is None or int(counter.numpy()) == 0

    def reset_step_timer(self) -> None:
        """Start the next step's compute time now: the time since the last report (an
        evaluation, a checkpoint) is not compute. Not a collective."""
        self._t = time.perf_counter()

    def wait_for_average(self) -> float:
        """With ``overlap``: wait for the average in flight (started at the end of the last
        round) and apply it, ``x <- x + pull * (average - x at the round's end)`` (config key
        ``overlap_pull``), keeping the local steps taken meanwhile. No new collective (every
        rank started this one); nothing to do without overlap or when none is in flight.
        Returns the seconds it waited. Call it before saving, or use :meth:`average_now`,
        which calls it first."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return 0.0
        start = time.perf_counter()
        finish_overlapped(inflight, self.scheduler, self._backend, self._target())
        self._t = time.perf_counter()
        return self._t - start

    def average_now(self) -> SyncResult | None:
        """Average the model over the process set now (collective: call on every rank at the
        same point, e.g. before evaluating or saving). With ``overlap`` it first applies the
        average in flight. Nothing to do in the mini-batch phase or on a rank outside the
        process set."""
        if self.runtime is None:
            return None
        self.wait_for_average()
        plan = self.scheduler.sync_now()
        result = self._sync(plan, blocking=True) if plan is not None else None
        self._t = time.perf_counter()
        return result

    def _now(self) -> float:
        if self._gpu:
            tf.test.experimental.sync_devices()
        return time.perf_counter()

    # -- averaging ------------------------------------------------------------------------------
    def _the_model(self):
        m = self._model
        if m is None:
            raise RuntimeError("adaptive-lsgd has no model to average: pass it to LocalSGD(model, "
                               "...), attach(model) or alsgd.step(model, ...)")
        return m

    def register_local_variables(self, variables) -> None:
        """Variables that stay rank-local (model-parallel shards): never averaged, as
        Horovod never allreduces them (``tape.register_local_source`` and a Keras optimizer's
        ``register_local_var`` register theirs here by themselves)."""
        self.local_refs.update(v.ref() for v in variables)

    def _shared(self, variables) -> list:
        """``variables`` without the rank-local ones."""
        local = set(self.local_refs)
        helper = getattr(self._optimizer, "_agg_helper", None)  # Horovod's Keras optimizer
        for v in [*(getattr(self._optimizer, "_local_vars", ()) or ()),
                  *(getattr(helper, "_local_vars", ()) or ())]:
            local.add(v.ref() if hasattr(v, "ref") else v)
        out = _floating(_unique(variables))
        return [v for v in out if v.ref() not in local] if local else out

    def _variables_key(self) -> tuple:
        """What the averaged variable lists depend on, cheap to read: the model and optimizer,
        the model's top-level layers and whether it is built, and the rank-local variables."""
        m, opt = self._the_model(), self._optimizer
        helper = getattr(opt, "_agg_helper", None)
        # Keras' ``layers`` walks and deduplicates them (1-2 ms on MobileNetV2): the list it
        # walks grows with every layer added, so its length says as much.
        tracked = getattr(m, "_self_tracked_trackables", None)
        layers = len(m) if isinstance(m, (list, tuple)) else \
            len(tracked) if tracked is not None else len(getattr(m, "layers", ()) or ())
        return (id(m), layers, getattr(m, "built", None), id(opt), len(self.local_refs),
                len(getattr(opt, "_local_vars", ()) or ()),
                len(getattr(helper, "_local_vars", ()) or ()))

    def _variable_lists(self) -> tuple:
        """(parameters, buffers), walked again only when :meth:`_variables_key` changes (a
        Keras model walks its layers to list them: 2-6 ms a sync on MobileNetV2)."""
        key = self._variables_key()
        if self._lists is None or self._lists[0] != key:
            m = self._model
            if isinstance(m, (list, tuple)):
                lists = (self._shared(m), [])
            else:
                lists = (self._shared(m.trainable_variables), self._shared(m.non_trainable_variables))
            self._lists = (key, lists)
        return self._lists[1]

    def refresh_variables(self) -> None:
        """Walk the model's variables again at the next sync. Call it (on every rank) if the
        model creates variables after its first sync without adding a top-level layer (the
        lists are kept between syncs, as Horovod broadcasts a model's variables once)."""
        self._lists = None

    def _parameters(self) -> list:
        return list(self._variable_lists()[0])

    def _buffers(self) -> list:
        return list(self._variable_lists()[1])

    def model_variables(self) -> list:
        """Trainable variables, then (``average_buffers``) the floating non-trainable ones."""
        return _unique(SyncTarget(self._parameters, self._buffers).averaged(self.config))

    def slot_variables(self) -> list:
        """The optimizer's per-variable state (momentum, Adam moments), in a rank-agreed order."""
        opt = self._optimizer
        if opt is None:
            return []
        opt = getattr(opt, "inner_optimizer", opt)
        if hasattr(opt, "get_slot_names"):  # legacy (OptimizerV2) optimizers
            out = []
            for var in self._parameters() + self._buffers():
                for name in opt.get_slot_names():
                    try:
                        out.append(opt.get_slot(var, name))
                    except (KeyError, ValueError):
                        pass
            return _floating(_unique(out))
        skip = {opt.iterations.ref()}
        return [v for v in _floating(_variables_of(opt)) if v.ref() not in skip]

    def _target(self) -> SyncTarget:
        return SyncTarget(self._parameters, self._buffers, self.slot_variables)

    def _sync(self, plan: SyncPlan, blocking: bool = False) -> SyncResult | None:
        """Run ``plan`` (with overlap: finish the average in flight, start this one; returns
        the result of the sync that completed now, if any)."""
        target = self._target()
        if self._param_bytes is None:
            self._param_bytes = int(sum(v.shape.num_elements() * v.dtype.size
                                        for v in target.averaged(self.config)))
            self.scheduler.param_bytes = self._param_bytes
        if blocking:
            return run_sync(plan, self.scheduler, self._backend, target)
        result, self._inflight = sync_round(plan, self.scheduler, self._backend, target,
                                            self._inflight)
        return result

    # -- state and figures ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The scheduler's state; save it with your checkpoint. Plain and JSON-serialisable,
        except ``outer_state`` (with ``outer_optimizer`` or ``compression``: the last global
        model and the outer momentum as numpy arrays). Never a collective: with an overlapped
        average in flight it warns (the checkpoint would miss it; call
        :meth:`wait_for_average` on every rank first)."""
        warn_if_in_flight(self._inflight, "wait_for_average()")
        state = self.scheduler.state_dict()
        outer = self.scheduler.outer
        if outer is not None:
            state["outer_state"] = {key: (value if not isinstance(value, list)
                                          else [np.array(t.numpy()) for t in value])
                                    for key, value in outer.state_dict().items()}
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        state = dict(state)
        outer = state.get("outer_state")
        if outer is not None:
            state["outer_state"] = {key: (value if not isinstance(value, list)
                                          else [tf.constant(v) for v in value])
                                    for key, value in outer.items()}
        self.scheduler.load_state_dict(state, strict=strict)
        self._update_flag()

    def summary(self, combine: bool = True) -> dict:
        """This rank's figures (``combine=False``) or the job's (a collective over the process
        set: call it on every member)."""
        local = self.scheduler.summary()
        if not combine:
            return local
        local["rank"] = hvd.rank()
        return combine_summaries(hvd.allgather_object(local, name="alsgd.summary",
                                                      process_set=self.process_set))


def _local_sgd_of(obj) -> LocalSGD | None:
    if isinstance(obj, LocalSGD):
        return obj
    for attr in ("alsgd", "local_sgd"):
        found = getattr(obj, attr, None)
        if isinstance(found, LocalSGD):
            return found
    inner = getattr(obj, "inner_optimizer", None)
    return _local_sgd_of(inner) if inner is not None else None


def _set_id(process_set) -> int:
    return 0 if process_set is None else process_set.process_set_id


def _runtime_for(config, process_set=hvd.global_process_set) -> LocalSGD:
    """A LocalSGD given directly (or held by an optimizer/callback), else the one shared by
    every helper called with the same effective config and process set (built on first use).

    The shared one is built under ``tf.init_scope`` (a tape may ask for it while a
    ``tf.function`` is traced), so its phase variable lives in the outermost context: eager
    execution, or the TF1 graph a graph-mode call is built in. One is shared per context, so
    a graph-mode use and a later eager one in the same process each get their own (the
    graph's variable is out of scope eagerly)."""
    found = _local_sgd_of(config) if config is not None else None
    if found is not None:
        if _set_id(found.process_set) != _set_id(process_set):
            raise ValueError(f"adaptive-lsgd: the LocalSGD given runs over process set "
                             f"{found.process_set.ranks}, the tape over {process_set.ranks}: "
                             "give LocalSGD(..., process_set=...) the tape's process set")
        return found
    cfg = load_config(config)
    with tf.init_scope():
        graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
        key = (agreement.digest(cfg.to_dict()), _set_id(process_set), graph)
        if key not in _SHARED:
            _SHARED[key] = LocalSGD(config=cfg, process_set=process_set)
    return _SHARED[key]


# -- Keras optimizer ------------------------------------------------------------------------------
class _OptimizerMethods:
    """What the Keras optimizer from :func:`DistributedOptimizer` adds (as the PyTorch one)."""

    @property
    def alsgd(self) -> LocalSGD:
        """The runtime: ``.config``, ``.topology``, ``.scheduler``, ``.state_dict()``."""
        return self._alsgd

    def average_now(self) -> None:
        """Average the model over the process set now (collective, e.g. before evaluating)."""
        self._alsgd.average_now()

    def wait_for_average(self) -> float:
        """With ``overlap``: apply the average in flight (see :meth:`LocalSGD.wait_for_average`)."""
        return self._alsgd.wait_for_average()

    def alsgd_reset(self) -> None:
        """Rebuild topology, process sets and scheduler after an elastic reset."""
        self._alsgd.reset()


def _rescale_local(lsgd: LocalSGD, grads, sources, local_refs, size: int) -> list:
    """Horovod divides the gradients of rank-local sources by the process set's size
    (``scale_local_gradients``); in the local phase no gradient is averaged, so undo that
    there: every gradient is the rank's own."""
    factor = tf.where(lsgd.allreduce_gradients, 1.0, float(size))
    out = []
    for s, g in zip(sources, grads):
        if g is not None and s.ref() in local_refs:
            if isinstance(g, tf.IndexedSlices):
                g = tf.IndexedSlices(g.values * tf.cast(factor, g.values.dtype), g.indices, g.dense_shape)
            else:
                g = g * tf.cast(factor, g.dtype)
        out.append(g)
    return out


def DistributedOptimizer(optimizer, config=None, **hvd_kwargs):
    """Wrap a Keras optimizer like ``horovod.tensorflow.keras.DistributedOptimizer``, with
    adaptive local SGD.

    Takes every keyword ``hvd.DistributedOptimizer`` takes (they apply to the mini-batch
    phase, through Horovod's own code) plus ``config`` (a dict, a YAML/JSON path, or None for
    ``ALSGD_CONFIG`` / ``ALSGD_*`` / defaults). Returns an optimizer of the same class whose
    ``alsgd`` attribute is its :class:`LocalSGD`; add :class:`LocalSGDCallback` to ``fit``
    (it reports the steps and runs the syncs). Collective: call it on every rank::

        opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9),
                                         config={"policy": "fixed", "periods": [4]})
        model.compile(optimizer=opt, loss=loss_fn)
        model.fit(x, y, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                                   alsgd.LocalSGDCallback()])
        opt.alsgd.scheduler.periods      # (4,)

    ``backward_passes_per_step=N`` (and ``average_aggregated_gradients``), as Horovod's:
    gradients are summed locally and applied every N-th call, in both phases, through
    Horovod's aggregation; its reduction is Horovod's in the mini-batch phase and skipped in
    the local phase. The scheduler counts applied updates (periods, warm-up, syncs after an
    applied update only); ``iterations`` counts every call, as in Horovod.

    ``process_set``, as Horovod's: members reduce over the set in the mini-batch phase and
    average among themselves (flat inside the set; collective over the set); on a rank
    outside it the optimizer is a plain local one. Not in elastic jobs.
    """
    legacy = getattr(tf.compat.v1.train, "Optimizer", None)
    if legacy is not None and isinstance(optimizer, legacy):
        raise TypeError("adaptive-lsgd's DistributedOptimizer wraps Keras optimizers; a "
                        f"{type(optimizer).__name__} (tf.compat.v1.train.Optimizer, Horovod's "
                        "legacy path) is not supported: use a tf.keras optimizer")
    process_set = hvd_kwargs.get("process_set", hvd.global_process_set)
    lsgd = LocalSGD(optimizer=None, config=config, process_set=process_set)
    sparse_as_dense = bool(hvd_kwargs.get("sparse_as_dense", False))
    horovod_cls = type(hvd_keras.DistributedOptimizer(optimizer, **hvd_kwargs))
    horovod_allreduce = keras_allreduce(horovod_cls)

    @tf.autograph.experimental.do_not_convert
    def _allreduce(self, grads, vars):
        helper = self._agg_helper
        if helper is None:
            return self._alsgd.reduce_gradients(lambda g: horovod_allreduce(self, g, vars), grads,
                                                sparse_as_dense)
        # Aggregation: Horovod's in both phases; its reduction follows the phase (below).
        grads = horovod_allreduce(self, grads, vars)
        if not (helper.scale_local_gradients and helper._local_vars):
            return grads
        return _rescale_local(self._alsgd, grads, vars, helper._local_vars, self.process_set.size())

    namespace = {k: v for k, v in horovod_cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    namespace.update(_allreduce=_allreduce, alsgd=_OptimizerMethods.alsgd,
                     average_now=_OptimizerMethods.average_now,
                     wait_for_average=_OptimizerMethods.wait_for_average,
                     alsgd_reset=_OptimizerMethods.alsgd_reset)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), namespace)
    opt = cls.from_config(optimizer.get_config())
    opt._alsgd = lsgd
    helper = opt._agg_helper
    if helper is not None:  # backward_passes_per_step > 1
        horovod_reduce = helper.allreduce_grads

        @tf.autograph.experimental.do_not_convert
        def reduce_aggregated(grads, vars):
            return lsgd.reduce_gradients(lambda g: horovod_reduce(g, vars), grads, sparse_as_dense)

        helper.allreduce_grads = reduce_aggregated
        lsgd._aggregation = helper
    lsgd.attach(optimizer=opt)
    return opt


# -- gradient tape --------------------------------------------------------------------------------
_TAPE_CLASSES: dict = {}


@tf.autograph.experimental.do_not_convert
def _gradient(self, target, sources, output_gradients=None, use_generic_names=False):
    grads = tf_tape_base(hvd).gradient(self, target, sources, output_gradients,
                                       use_generic_names)
    self._alsgd.local_refs.update(self._local_sources)  # rank-local: never averaged
    if not (self.scale_local_gradients and self._local_sources):
        return grads
    return _rescale_local(self._alsgd, grads, sources, self._local_sources, self.process_set.size())


def _tape_class(base):
    if base not in _TAPE_CLASSES:
        namespace = {k: v for k, v in tf_tape_base(hvd).__dict__.items()
                     if k not in ("__dict__", "__weakref__")}
        namespace["gradient"] = _gradient
        _TAPE_CLASSES[base] = type(base.__name__, (base,), namespace)
    return _TAPE_CLASSES[base]


@tf.autograph.experimental.do_not_convert
def DistributedGradientTape(tape, config=None, device_dense="", device_sparse="",
                            compression=hvd.Compression.none, sparse_as_dense=False, op=hvd.Average,
                            gradient_predivide_factor=1.0, num_groups=0, groups=None,
                            process_set=hvd.global_process_set, scale_local_gradients=True):
    """Wrap a ``tf.GradientTape`` like ``hvd.DistributedGradientTape``, with adaptive local SGD.

    ``config`` is the :class:`LocalSGD` to follow (or an optimizer from
    :func:`DistributedOptimizer`), or a config (dict, path, None) naming the one shared with
    :func:`step`. Gradients are reduced with Horovod's code in the mini-batch phase and left
    local in the local phase; the other arguments are Horovod's. With ``process_set`` its
    members reduce over the set and average among themselves (a :class:`LocalSGD` given must
    have the same set; a config names the one shared for that set); outside it the tape is a
    plain local one, as Horovod's::

        @tf.function
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            tape = alsgd.DistributedGradientTape(tape, lsgd)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return loss
    """
    lsgd = _runtime_for(config, process_set)
    if op == hvd.Adasum:
        raise ValueError("op=hvd.Adasum is not supported by adaptive-lsgd; use hvd.Average or hvd.Sum")
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` "
                      "and will be removed in v0.23.0.", DeprecationWarning, stacklevel=2)
        if groups is None:
            groups = num_groups
    if groups is not None and not (isinstance(groups, list) or groups > 0):
        raise ValueError("groups should be a non-negative integer or a list of list of tf.Variable.")
    cls = _tape_class(tape.__class__)
    out = cls(tape._tape, device_dense, device_sparse, compression, sparse_as_dense, op,
              gradient_predivide_factor, groups, tape._persistent,
              getattr(tape, "_watch_accessed_variables", True), process_set=process_set,
              scale_local_gradients=scale_local_gradients)
    horovod_reduce = out._allreduce_grads

    @tf.autograph.experimental.do_not_convert
    def allreduce_grads(grads, vars=None, use_generic_names=False):
        return lsgd.reduce_gradients(lambda g: horovod_reduce(g, vars, use_generic_names), grads,
                                     sparse_as_dense)

    out._allreduce_grads = allreduce_grads
    out._alsgd = lsgd
    return out


@tf.autograph.experimental.do_not_convert
def PartialDistributedGradientTape(tape, config=None, local_layers=None, **kwargs):
    """``hvd.PartialDistributedGradientTape`` with adaptive local SGD: a
    :func:`DistributedGradientTape` (``kwargs`` are its arguments) whose ``local_layers``'
    trainable weights are rank-local sources: never allreduced, never averaged."""
    if local_layers is None:
        local_layers = []
    elif isinstance(local_layers, tf.keras.layers.Layer):
        local_layers = [local_layers]
    elif not all(isinstance(layer, tf.keras.layers.Layer) for layer in local_layers):
        raise ValueError("All local layers must be of tf.keras.layers.Layer type.")
    out = DistributedGradientTape(tape, config, **kwargs)
    for layer in local_layers:
        for var in layer.trainable_weights:
            out.register_local_source(var)
    return out


def step(model=None, optimizer=None, config=None, compute_s: float | None = None,
         lr: float | None = None, process_set=hvd.global_process_set) -> SyncResult | None:
    """Report a finished training step of a custom loop and sync if it is time (collective).
    Call it eagerly, after the step.

    Follows ``optimizer.alsgd`` when the optimizer came from :func:`DistributedOptimizer`, else
    the :class:`LocalSGD` shared with ``DistributedGradientTape(tape, config, process_set=...)``
    for the same config and process set. The step time is measured from the previous call
    unless ``compute_s`` is given::

        for x, y in dataset:
            train_step(x, y)                                   # uses DistributedGradientTape(tape, cfg)
            alsgd.step(model, opt, config=cfg)
    """
    lsgd = _local_sgd_of(optimizer) if optimizer is not None else None
    if lsgd is None:
        lsgd = _runtime_for(config, process_set)
    lsgd.attach(model, optimizer)
    return lsgd.step_done(compute_s, lr=lr)


# -- Keras callback -------------------------------------------------------------------------------
class LocalSGDCallback(tf.keras.callbacks.Callback):
    """Runs adaptive local SGD in ``model.fit`` for a model compiled with
    :func:`DistributedOptimizer`.

    After each training batch it reports the step (time and learning rate) to the scheduler and,
    when the scheduler says so, averages the model's variables (weights and, unless
    ``average_buffers: false``, non-trainable state such as BatchNorm statistics) over the
    right process set. With ``average_at_end`` the ranks leave ``fit`` holding the average
    model. It works beside Horovod's callbacks (``BroadcastGlobalVariablesCallback``,
    ``MetricAverageCallback``, ``LearningRateWarmupCallback``, ...); every rank must use the same
    callback list. ``config``, when given, must equal the optimizer's::

        cb = alsgd.LocalSGDCallback()
        model.fit(x, y, epochs=5, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), cb])
        state = cb.state_dict()          # the scheduler's state, for a checkpoint
        cb.summary()                     # the job's figures (collective)

    Needs ``steps_per_execution=1`` (one report per batch). With ``backward_passes_per_step=N``
    only every N-th batch applies an update and counts as a step. In ``time_budget`` mode ranks take
    different numbers of steps per round, so ``fit`` with a fixed number of steps per epoch
    ends them on different rounds: use that mode with custom loops that stop on rounds.
    """

    def __init__(self, config=None, average_at_end: bool = True):
        super().__init__()
        self._config = config
        self.average_at_end = average_at_end
        self.local_sgd: LocalSGD | None = None
        self._start: float | None = None
        self._pending_state: tuple | None = None

    def on_train_begin(self, logs=None):
        opt = self.model.optimizer
        lsgd = _local_sgd_of(opt)
        if lsgd is None:
            raise TypeError("LocalSGDCallback needs a model compiled with "
                            "adaptive_lsgd.integrations.tensorflow.DistributedOptimizer(...) "
                            f"(got {type(opt).__name__}); do not also wrap it with "
                            "hvd.DistributedOptimizer")
        if self._config is not None:
            mine = load_config(self._config)
            if mine != lsgd.config:
                diff = sorted(k for k, v in mine.to_dict().items() if lsgd.config.to_dict()[k] != v)
                raise ValueError(f"LocalSGDCallback's config differs from the optimizer's in "
                                 f"{', '.join(diff)}: give the config to DistributedOptimizer only")
        spe = getattr(self.model, "_steps_per_execution", None)
        if spe is not None and int(tf.keras.backend.get_value(spe)) != 1:
            raise ValueError("LocalSGDCallback needs steps_per_execution=1 in model.compile() "
                             "(it reports every step to the scheduler)")
        for caution in cautions(lsgd.config, "fit"):
            warnings.warn(caution, stacklevel=2)
        lsgd.attach(self.model, opt)
        self.local_sgd = lsgd
        if self._pending_state is not None:
            lsgd.load_state_dict(*self._pending_state)
            self._pending_state = None

    def on_train_batch_begin(self, batch, logs=None):
        self.local_sgd.begin_step()
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        lsgd = self.local_sgd
        compute_s = None if self._start is None else lsgd._now() - self._start
        lsgd.step_done(compute_s)

    def on_train_end(self, logs=None):
        if self.local_sgd is None:
            return
        if self.average_at_end:
            self.local_sgd.average_now()
        else:  # the overlapped average in flight, if any (no new collective)
            self.local_sgd.wait_for_average()

    # -- state ----------------------------------------------------------------------------------
    @property
    def alsgd(self) -> LocalSGD | None:
        return self.local_sgd

    def state_dict(self) -> dict:
        """The scheduler's state (after ``fit`` began or with the optimizer's runtime)."""
        lsgd = self.local_sgd or (_local_sgd_of(self.model.optimizer) if self.model else None)
        if lsgd is None:
            raise RuntimeError("LocalSGDCallback has no scheduler yet: call it after fit() began")
        return lsgd.state_dict()

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore a :meth:`state_dict`; before ``fit`` it is applied when training begins."""
        if self.local_sgd is None:
            self._pending_state = (state, strict)
        else:
            self.local_sgd.load_state_dict(state, strict=strict)

    def summary(self, combine: bool = True) -> dict:
        return self.local_sgd.summary(combine)


def summary(obj, combine: bool = True) -> dict:
    """The job's figures, combined over ranks (a collective: call it on every rank); ``obj`` is
    a :class:`LocalSGD`, an optimizer from :func:`DistributedOptimizer` or the callback.
    ``combine=False`` gives this rank's ``Scheduler.summary()`` without communicating."""
    lsgd = _local_sgd_of(obj)
    if lsgd is None:
        raise TypeError(f"{type(obj).__name__} carries no adaptive-lsgd state")
    return lsgd.summary(combine)


def allow_uneven_steps(obj, allow: bool = True) -> None:
    """Declare that the training loop of ``obj`` (an adaptive-lsgd optimizer, tape or
    :class:`LocalSGD`) accepts a different number of steps on each rank: it draws batches from
    a stream and issues no Horovod collectives of its own between syncs, so ``time_budget:
    auto`` may give faster ranks more steps per round. Not for Keras ``fit`` (a fixed number
    of steps per epoch). Call it on every rank; not a collective."""
    lsgd = _local_sgd_of(obj)
    if lsgd is None:
        raise TypeError(f"allow_uneven_steps expects an adaptive-lsgd optimizer, tape or "
                        f"LocalSGD, got {type(obj).__name__}")
    if lsgd.runtime is not None:
        lsgd.runtime.allow_uneven_steps(allow)
