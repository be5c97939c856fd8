"""Swap Horovod's optimizer wrappers for adaptive-lsgd's in a worker started by ``alsgd-run``.

``install()`` (called by this folder's ``sitecustomize``) adds a ``sys.meta_path`` finder.
When the script imports ``horovod.torch``, ``horovod.tensorflow``, ``horovod.tensorflow.keras``
or ``horovod.keras``, the module runs as usual and then its ``DistributedOptimizer`` /
``DistributedGradientTape`` are replaced by wrappers that call ours (imported only then, so
torch/tensorflow load only if the script loads them). The TensorFlow side also patches
``tf.keras.Model.fit`` (adds ``LocalSGDCallback`` when the model's optimizer is ours) and
``tf.function`` calls (a traced step that built our tape reports the step when it returns;
only calls made eagerly: a call that builds a TF1 graph leaves its tapes to Horovod).
At exit each worker writes what it wrapped and the local figures of every scheduler it built
(one per optimizer or tape runtime, in creation order; no collective)
to ``$_ALSGD_RUN_DIR/rank<R>-<pid>.json``; ``alsgd-run`` combines them.
"""

from __future__ import annotations

import atexit
import importlib.abc
import inspect
import json
import os
import socket
import sys
import threading

TARGETS = ("horovod.torch", "horovod.tensorflow", "horovod.tensorflow.keras", "horovod.keras")
USED: list = []      # names of the Horovod symbols whose replacement ran
NOTES: list = []     # why a use was left to Horovod
RUNTIMES: list = []  # objects with .scheduler, or _Built (one per wrapped optimizer / tape runtime)
RUNTIME_NAMES: list = []  # the Horovod symbol that created each of RUNTIMES
INFO: dict = {"batch_size": None}
_TLS = threading.local()


def _note_use(name: str, runtime) -> None:
    if name not in USED:
        USED.append(name)
    if runtime is not None and all(r is not runtime for r in RUNTIMES):
        RUNTIMES.append(runtime)
        RUNTIME_NAMES.append(name)


class _Built:
    """A PyTorch optimizer's runtime as it is when asked (None until its first step builds it).

    Not ``opt.alsgd`` at wrap time: building the runtime is a collective, and a worker that
    joins a running elastic job wraps its optimizer before ``state.sync()``, while the workers
    already there rebuild theirs after it; an early collective on the newcomer deadlocks the
    job. Asked at report time, it is also the runtime of the current Horovod world."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def get(self):
        return getattr(self.optimizer, "_alsgd", None)


def _runtimes() -> list:
    """``[(runtime, name), ...]`` of the runtimes built so far, in creation order."""
    out = []
    for runtime, name in zip(RUNTIMES, RUNTIME_NAMES):
        runtime = runtime.get() if isinstance(runtime, _Built) else runtime
        if runtime is not None:
            out.append((runtime, name))
    return out


def _note(text: str) -> None:
    if text not in NOTES:
        NOTES.append(text)


class _Reentry:
    """Our integrations call Horovod's own wrappers: inside one of ours, give the original."""

    def __enter__(self):
        _TLS.depth = getattr(_TLS, "depth", 0) + 1

    def __exit__(self, *exc):
        _TLS.depth -= 1

    @staticmethod
    def active() -> bool:
        return getattr(_TLS, "depth", 0) > 0


def _kwargs(original, args, kwargs, drop=()) -> dict:
    """The call's arguments by name, as ``original``'s signature binds them."""
    bound = inspect.signature(original).bind(*args, **kwargs)
    return {k: v for k, v in bound.arguments.items() if k not in drop}


# -- PyTorch --------------------------------------------------------------------------------------
class _ModelBuffers:
    """A stand-in ``model`` for our torch optimizer (its public ``model`` argument needs
    ``.buffers()``): the floating buffers (BatchNorm statistics) of the state dicts broadcast
    with ``hvd.broadcast_parameters`` *that hold this optimizer's parameters*, i.e. its own
    model's buffers, never another model's (a teacher, an EMA copy, a GAN's other half).

    Only the buffer tensors are kept (views sharing the model's storage), not the dicts."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.tensors: list = []

    def _param_ptrs(self) -> set:
        return {p.data_ptr() for g in self.optimizer.param_groups for p in g["params"]}

    def claim(self, entry: tuple) -> bool:
        """Take a broadcast state dict's buffers if the dict holds one of our parameters."""
        ptrs, buffers = entry
        params = self._param_ptrs()
        if not params & ptrs:
            return False
        have = params | {t.data_ptr() for t in self.tensors}
        for t in buffers:
            if t.data_ptr() not in have:
                have.add(t.data_ptr())
                self.tensors.append(t)
        return True

    def buffers(self):
        return list(self.tensors)


_TORCH_HOLDERS: list = []    # one _ModelBuffers per wrapped optimizer, in creation order
_TORCH_UNCLAIMED: list = []  # broadcast state dicts no optimizer held yet: (ptrs, buffers)


def _state_dict_entry(state: dict) -> tuple:
    tensors = [t for t in state.values() if hasattr(t, "is_floating_point") and hasattr(t, "data_ptr")]
    return ({t.data_ptr() for t in tensors}, [t for t in tensors if t.is_floating_point()])


def _patch_torch(mod) -> None:
    original = mod.DistributedOptimizer
    original_broadcast = mod.broadcast_parameters

    def DistributedOptimizer(*args, **kwargs):
        if _Reentry.active():
            return original(*args, **kwargs)
        from adaptive_lsgd.integrations import torch as alsgd

        holder = _ModelBuffers(None)  # the public ``model`` argument: it needs .buffers()
        with _Reentry():
            opt = alsgd.DistributedOptimizer(model=holder, **_kwargs(original, args, kwargs))
        holder.optimizer = opt
        _TORCH_HOLDERS.append(holder)
        _TORCH_UNCLAIMED[:] = [e for e in _TORCH_UNCLAIMED if not holder.claim(e)]
        member = opt.process_set.included()  # outside its process set: a plain local optimizer
        _note_use("horovod.torch.DistributedOptimizer", _Built(opt) if member else None)
        return opt

    def broadcast_parameters(params, root_rank, *args, **kwargs):
        if isinstance(params, dict):
            entry = _state_dict_entry(params)
            claimed = [h.claim(entry) for h in _TORCH_HOLDERS]
            if not any(claimed):  # broadcast before its optimizer was made
                _TORCH_UNCLAIMED.append(entry)
        return original_broadcast(params, root_rank, *args, **kwargs)

    DistributedOptimizer.__doc__ = original.__doc__
    broadcast_parameters.__doc__ = original_broadcast.__doc__
    mod.DistributedOptimizer = DistributedOptimizer
    mod.broadcast_parameters = broadcast_parameters

    from torch.utils.data import DataLoader, DistributedSampler

    original_init = DataLoader.__init__

    def __init__(self, *args, **kwargs):  # the per-rank batch size, for samples/s: the first
        original_init(self, *args, **kwargs)  # loader over a DistributedSampler (training's)
        if isinstance(self.sampler, DistributedSampler) and self.batch_size and not INFO["batch_size"]:
            INFO["batch_size"] = self.batch_size

    DataLoader.__init__ = __init__


# -- TensorFlow / Keras ---------------------------------------------------------------------------
_TF: dict = {"broadcasts": [], "steps": {}, "fit_patched": False, "call_patched": False}


class _TapeStep:
    """A ``tf.function`` whose trace built our tape: the runtime its tape follows (the one
    shared for its process set), the variables it differentiates, whether to re-attach."""

    def __init__(self, function, lsgd):
        self.function, self.lsgd = function, lsgd
        self.sources: list = []
        self.dirty = True


def _is_keras_optimizer(opt) -> bool:
    import tensorflow as tf

    classes = [tf.keras.optimizers.Optimizer]
    legacy = getattr(tf.keras.optimizers, "legacy", None)
    if legacy is not None:
        classes.append(legacy.Optimizer)
    return isinstance(opt, tuple(classes))


def _keras_optimizer(original, name: str, drop=()):
    def DistributedOptimizer(*args, **kwargs):
        if _Reentry.active():
            return original(*args, **kwargs)
        call = _kwargs(original, args, kwargs, drop)
        optimizer = call.pop("optimizer")
        if not _is_keras_optimizer(optimizer):
            _note(f"{name} got a {type(optimizer).__name__} (not a Keras optimizer): left to Horovod")
            return original(*args, **kwargs)
        from adaptive_lsgd.integrations import tensorflow as alsgd

        with _Reentry():
            opt = alsgd.DistributedOptimizer(optimizer, **call)
        _note_use(name, opt.alsgd if opt.alsgd.runtime is not None else None)  # None: not in its set
        return opt

    DistributedOptimizer.__doc__ = original.__doc__
    return DistributedOptimizer


def _tf_model_variables(sources: list) -> list:
    """What the tape runtime averages: the broadcast list holding every differentiated
    variable (model.variables: weights and BatchNorm statistics), else those variables."""
    refs = {v.ref() for v in sources}
    for variables in _TF["broadcasts"]:
        if refs and refs <= {v.ref() for v in variables}:
            return variables
    return sources


def _tf_step_done(step: _TapeStep) -> None:
    if step.dirty:
        step.lsgd.attach(model=_tf_model_variables(step.sources))
        step.dirty = False
    step.lsgd.step_done()


def _leading_dim(value) -> int | None:
    """The first known leading dimension among the tensors, arrays or ``tf.TensorSpec``s of a
    nested value (tuples, lists, dicts), in order; None when none has one."""
    import tensorflow as tf

    for leaf in tf.nest.flatten(value):
        shape = getattr(leaf, "shape", None)
        if shape is None:
            continue
        try:
            dims = list(shape)  # a TensorShape of unknown rank cannot be listed
        except (TypeError, ValueError):
            continue
        if dims and dims[0] is not None:
            try:
                return int(dims[0])
            except (TypeError, ValueError):  # a tf.compat.v1 Dimension holding None
                continue
    return None


def _call_arguments(function, args, kwargs) -> list:
    """A ``tf.function`` call's arguments in the order of its signature (positional and keyword
    alike: ``step(images=x, labels=y)`` counts as ``step(x, y)``)."""
    try:
        bound = inspect.signature(function.python_function).bind(*args, **kwargs)
        return list(bound.arguments.values())
    except (AttributeError, TypeError, ValueError):
        return list(args) + list(kwargs.values())


def _fit_batch_size(x, batch_size) -> int | None:
    """The per-rank batch size of ``fit(x, batch_size=...)`` when it is known before the first
    step: arrays (Keras batches them, 32 unless told) or a ``tf.data.Dataset`` whose element
    spec has a static leading dimension (``batch(n, drop_remainder=True)``)."""
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        return _leading_dim(x.element_spec)
    leaves = tf.nest.flatten(x) if isinstance(x, (list, tuple, dict)) else [x]
    if leaves and all(hasattr(v, "shape") and not isinstance(v, tf.data.Dataset) for v in leaves):
        return batch_size or 32
    return None  # a generator, a keras.utils.Sequence, ...: not known (the summary says steps/s)


def _first_batch_size(dataset) -> int | None:
    """The leading dimension of the dataset's first element (read once, after ``fit``, so the
    training run itself is untouched)."""
    try:
        return _leading_dim(next(iter(dataset.take(1))))
    except Exception:  # an empty dataset, an input pipeline that fails a second time, ...
        return None


def _patch_tf_function() -> None:
    """A top-level ``tf.function`` call whose trace built our tape is one training step.

    Only a call made eagerly runs a step. A call made while a TF1 graph is being built (under
    ``tf.Graph().as_default()``, as in Horovod's graph-mode tests, or from inside a function
    TensorFlow traces by other means) only adds ops to that graph: its tapes are left to
    Horovod and no step is reported (a report would run the sync on symbolic tensors)."""
    if _TF["call_patched"]:
        return
    import tensorflow as tf
    from tensorflow.python.eager.polymorphic_function import polymorphic_function as pf

    original_call = pf.Function.__call__

    def __call__(self, *args, **kwargs):
        if getattr(_TLS, "function", None) is not None:
            return original_call(self, *args, **kwargs)
        if not tf.executing_eagerly():
            _TLS.graph_call = getattr(_TLS, "graph_call", 0) + 1
            try:
                return original_call(self, *args, **kwargs)
            finally:
                _TLS.graph_call -= 1
        _TLS.function = self
        try:
            out = original_call(self, *args, **kwargs)
        finally:
            _TLS.function = None
        step = _TF["steps"].get(id(self))
        if step is not None:
            if INFO["batch_size"] is None:  # the training step's first batched argument
                INFO["batch_size"] = _leading_dim(_call_arguments(self, args, kwargs)) or 0
            _tf_step_done(step)
        return out

    pf.Function.__call__ = __call__
    _TF["call_patched"] = True


def _patch_fit() -> None:
    """``Model.fit`` with our optimizer gets ``LocalSGDCallback`` (unless it has one)."""
    if _TF["fit_patched"]:
        return
    import tensorflow as tf

    original_fit = tf.keras.Model.fit

    def fit(self, *args, **kwargs):
        if not RUNTIMES:
            return original_fit(self, *args, **kwargs)
        from adaptive_lsgd.integrations import tensorflow as alsgd

        if alsgd._local_sgd_of(getattr(self, "optimizer", None)) is None:
            return original_fit(self, *args, **kwargs)
        bound = inspect.signature(original_fit).bind(self, *args, **kwargs)
        callbacks = list(bound.arguments.get("callbacks") or [])
        if not any(isinstance(c, alsgd.LocalSGDCallback) for c in callbacks):
            callbacks.append(alsgd.LocalSGDCallback())
            _note_use("tf.keras.Model.fit (LocalSGDCallback added)", None)
        bound.arguments["callbacks"] = callbacks
        x = bound.arguments.get("x")
        batch = _fit_batch_size(x, bound.arguments.get("batch_size"))
        if batch:
            INFO["batch_size"] = batch
        out = original_fit(*bound.args, **bound.kwargs)
        if not INFO["batch_size"] and isinstance(x, tf.data.Dataset):
            INFO["batch_size"] = _first_batch_size(x)  # batched without drop_remainder
        return out

    fit.__doc__ = original_fit.__doc__
    tf.keras.Model.fit = fit
    _TF["fit_patched"] = True


def _patch_tensorflow(mod) -> None:
    import tensorflow as tf

    mod.DistributedOptimizer = _keras_optimizer(mod.DistributedOptimizer,
                                                "horovod.tensorflow.DistributedOptimizer",
                                                drop=("use_locking",))
    original_tape = mod.DistributedGradientTape
    original_broadcast = mod.broadcast_variables

    @tf.autograph.experimental.do_not_convert
    def DistributedGradientTape(*args, **kwargs):
        if _Reentry.active():
            return original_tape(*args, **kwargs)
        function = getattr(_TLS, "function", None)
        if function is None and getattr(_TLS, "graph_call", 0):
            _note("horovod.tensorflow.DistributedGradientTape in a tf.function called while a TF1 "
                  "graph is built: left to Horovod (no step can be reported from a graph)")
            return original_tape(*args, **kwargs)
        if function is None:
            _note("horovod.tensorflow.DistributedGradientTape used outside tf.function: left to "
                  "Horovod (alsgd-run wraps tapes built in a tf.function training step)")
            return original_tape(*args, **kwargs)
        from adaptive_lsgd.integrations import tensorflow as alsgd

        call = _kwargs(original_tape, args, kwargs)
        tape = call.pop("gradtape")
        lsgd = alsgd._runtime_for(None, call.get("process_set"))  # one per process set
        step = _TF["steps"].get(id(function))
        if step is None or step.lsgd is not lsgd:
            step = _TF["steps"][id(function)] = _TapeStep(function, lsgd)
        step.sources = list(tape.watched_variables())
        step.dirty = True
        _note_use("horovod.tensorflow.DistributedGradientTape", lsgd)
        with _Reentry():
            return alsgd.DistributedGradientTape(tape, lsgd, **call)

    @tf.autograph.experimental.do_not_convert
    def broadcast_variables(variables, *args, **kwargs):
        variables = list(variables)
        if variables and all(hasattr(v, "ref") for v in variables):
            _TF["broadcasts"].append(variables)
            for step in _TF["steps"].values():
                step.dirty = True
        return original_broadcast(variables, *args, **kwargs)

    DistributedGradientTape.__doc__ = original_tape.__doc__
    broadcast_variables.__doc__ = original_broadcast.__doc__
    mod.DistributedGradientTape = DistributedGradientTape
    mod.broadcast_variables = broadcast_variables
    _patch_tf_function()
    _patch_fit()


def _patch_keras(mod, name: str) -> None:
    mod.DistributedOptimizer = _keras_optimizer(mod.DistributedOptimizer, f"{name}.DistributedOptimizer")
    _patch_fit()


PATCHES = {
    "horovod.torch": _patch_torch,
    "horovod.tensorflow": _patch_tensorflow,
    "horovod.tensorflow.keras": lambda m: _patch_keras(m, "horovod.tensorflow.keras"),
    "horovod.keras": lambda m: _patch_keras(m, "horovod.keras"),
}


# -- the import hook ------------------------------------------------------------------------------
class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, name):
        self.loader = loader
        self.name = name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        PATCHES[self.name](module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the target modules with the other finders and patches them once loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


def _rank() -> int:
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return -1


def report() -> dict:
    """What this worker wrapped and its schedulers' local figures (no collective)."""
    summaries = []  # one per runtime, in creation order (alsgd-run shows those that stepped)
    built = _runtimes()
    for runtime, name in built:
        try:
            summaries.append(dict(runtime.scheduler.summary(), wrapped=name))
        except Exception as exc:  # a runtime half-built when the script failed
            NOTES.append(f"no summary: {exc}")
    log = levels = None
    if built:
        log = built[0][0].config.log
        try:
            levels = built[0][0].topology.describe()["levels"]
        except Exception:  # a runtime half-built when the script failed
            levels = None
    direct = [m for m in ("adaptive_lsgd.integrations.torch", "adaptive_lsgd.integrations.tensorflow")
              if m in sys.modules and not USED]  # imported by the script itself, not by us
    return {"rank": _rank(), "pid": os.getpid(), "used": USED, "notes": NOTES, "direct": direct,
            "summaries": summaries, "batch_size": INFO["batch_size"], "log": log,
            "levels": levels, "host": os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()}


def _write_report() -> None:
    run_dir = os.environ.get("_ALSGD_RUN_DIR")
    if not run_dir or not os.path.isdir(run_dir):
        return
    path = os.path.join(run_dir, f"rank{_rank()}-{os.getpid()}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(report(), fh, default=str)
    os.replace(path + ".tmp", path)


def install() -> None:
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    for name in TARGETS:
        if name in sys.modules:  # imported before us (not by a normal script): patch now
            PATCHES[name](sys.modules[name])
    sys.meta_path.insert(0, _Finder())
    atexit.register(_write_report)
