"""What both integrations need from Horovod itself: the host name, one process set per rank
tuple, the exit barrier, and the :class:`Runtime` an optimizer builds over one Horovod
initialisation (config agreement, topology, process sets, scheduler). It takes the framework's
``hvd`` module as an argument and imports no framework.

Example (in an integration, after ``hvd.init()``)::

    sets = ProcessSets(hvd, module="adaptive_lsgd.integrations.torch")
    runtime = Runtime(hvd, sets, load_config(None), param_bytes=4 * n_params,
                      exit_barrier=lambda: hvd.allreduce(torch.zeros(1), name="alsgd.exit"))
    runtime.scheduler, runtime.topology, runtime.process_sets[(0, 1)]
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import sys
import threading
import warnings
from collections.abc import Callable

from adaptive_lsgd import agreement
from adaptive_lsgd.config import Config
from adaptive_lsgd.scheduler import Scheduler
from adaptive_lsgd.topology import Topology

_LOG = logging.getLogger("adaptive_lsgd")
EXIT_BARRIER_TIMEOUT_S = 120.0


def elastic_job() -> bool:
    """True in a Horovod elastic job (``horovodrun --min-np/--max-np/...`` sets this)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def host_name() -> str:
    """The host this worker runs on, as Horovod names it (emulated clusters set it)."""
    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()


class ProcessSets:
    """One Horovod process set per distinct rank tuple (Horovod refuses duplicates), the
    global one for all ranks. Collective: every rank must ask for the same tuples in the same
    order. ``init_before_import`` says ``hvd.init()`` ran before the integration could enable
    dynamic process sets, which the error then names."""

    def __init__(self, hvd, module: str, init_before_import: bool = False):
        self.hvd = hvd
        self.module = module
        self.init_before_import = init_before_import
        self._sets: dict = {}

    def get(self, ranks: tuple):
        hvd = self.hvd
        if len(ranks) == hvd.size():
            return hvd.global_process_set
        if ranks not in self._sets:
            try:
                self._sets[ranks] = hvd.add_process_set(list(ranks))
            except ValueError as exc:
                if "duplicate" in str(exc):  # the script registered these ranks itself
                    self._sets[ranks] = registered_process_set(hvd, ranks)
                    return self._sets[ranks]
                if "HOROVOD_DYNAMIC_PROCESS_SETS" not in str(exc):
                    raise
                late = (f" (hvd.init() ran before {self.module} was imported)"
                        if self.init_before_import else "")
                raise RuntimeError(
                    "adaptive-lsgd needs Horovod's dynamic process sets for a hierarchical "
                    f"topology{late}: import {self.module} before hvd.init(), set "
                    "HOROVOD_DYNAMIC_PROCESS_SETS=1, or call hvd.init(process_sets='dynamic')"
                ) from exc
        return self._sets[ranks]

    def clear(self) -> None:
        """Forget the sets (after an elastic reset Horovod has dropped them)."""
        self._sets.clear()

    def renew(self, token) -> None:
        """Forget the sets when ``token`` (an object that changes whenever Horovod is
        re-initialised) differs from the last one seen."""
        if token is not getattr(self, "_token", None):
            self._sets.clear()
            self._token = token


# -- Horovod 0.28.1's private names the integrations build on: the one place to port ----------
def torch_optimizer_base():
    """``horovod.torch``'s ``_DistributedOptimizer`` (its hooks, ``step``, ``synchronize``)."""
    from horovod.torch.optimizer import _DistributedOptimizer
    return _DistributedOptimizer


def torch_init_token(hvd):
    """An object ``horovod.torch.init()`` replaces on every call (its handle map)."""
    return hvd.mpi_ops._handle_map


def registered_process_set(hvd, ranks: tuple):
    """A process set object for ``ranks``, which Horovod already holds (it refuses to add
    the same ranks twice; the script added them itself)."""
    from horovod.common import process_sets

    ids = process_sets._basics._get_process_set_ids_and_ranks()
    (found,) = [i for i, members in ids.items() if tuple(members) == tuple(ranks)]
    ps = hvd.ProcessSet(list(ranks))
    ps.process_set_id = found
    return ps


def tf_tape_base(hvd):
    """``horovod.tensorflow``'s ``_DistributedGradientTape``."""
    return hvd._DistributedGradientTape


def keras_allreduce(horovod_optimizer_class):
    """The gradient reduction of a class ``horovod.tensorflow.keras.DistributedOptimizer``
    made (its ``_allreduce`` method)."""
    return horovod_optimizer_class.__dict__["_allreduce"]


_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


class Runtime:
    """What one optimizer needs from one Horovod initialisation: the config (checked to be
    the same on every rank), the topology, one process set per block and the scheduler.

    Building it is a collective: an allgather of each rank's config digest and host, and with
    ``share`` a broadcast of rank 0's scheduler state ``carry`` and count of Horovod worlds
    ``world`` (an elastic job's new workers lack both). ``token`` changes whenever Horovod is
    re-initialised (:attr:`current` compares it); ``exit_barrier`` is the tiny global
    collective run at exit when the topology uses process sets (:func:`install_exit_barrier`);
    ``scope`` wraps the object collectives (TensorFlow: ``tf.init_scope``).

    ``process_set`` (a Horovod process set this rank belongs to; None: all ranks) is the
    optimizer's own, as ``hvd.DistributedOptimizer(process_set=...)``: every collective of the
    runtime and its syncs runs over it, the scheduler's ranks are positions in it
    (``process_set.rank()``), and the topology is flat inside it (blocks of their own would
    need process sets that every rank of the job registers, members or not). ``gather(obj,
    name)`` allgathers a picklable object over ``process_set`` (the framework's; Horovod's
    PyTorch ``allgather_object`` takes no process set). ``check_origin``: the scheduler's
    (the integration calls :func:`adaptive_lsgd.sync.note_local_start` before local steps).
    ``can_overlap``: the integration can run averages in the background (``overlap: auto``;
    never in elastic jobs); ``uneven_steps``: the loop accepts per-rank step counts
    (``time_budget: auto``; :meth:`allow_uneven_steps` sets it later).
    """

    def __init__(self, hvd, sets: ProcessSets, config: Config, param_bytes: int, *,
                 exit_barrier: Callable[[], object], token: Callable[[], object] = lambda: None,
                 carry: dict | None = None, share: bool = False, world: int = 0,
                 scope: Callable = contextlib.nullcontext, process_set=None,
                 gather: Callable | None = None, check_origin: bool = False,
                 can_overlap: bool = False, uneven_steps: bool = False):
        self.config, self.param_bytes, self.world = config, param_bytes, world
        # overlap: auto needs an asynchronous collective and no elastic reset mid-average
        self.can_overlap = can_overlap and not elastic_job()
        self.uneven_steps = uneven_steps
        self._token_of = token
        self.token = token()
        sets.renew(self.token)
        whole = process_set is None or process_set is hvd.global_process_set
        self.process_set = hvd.global_process_set if whole else process_set
        if not whole and config.topology not in ("auto", "flat"):
            raise ValueError(
                f"adaptive-lsgd: topology {config.topology!r} with process_set="
                f"{list(process_set.ranks)}: inside a process set of its own an optimizer "
                "averages flat over the set (its blocks would need process sets that every "
                "rank of the job registers); use topology 'auto' or 'flat', or the global "
                "process set for a hierarchy")
        if gather is None:
            def gather(obj, name):
                return hvd.allgather_object(obj, name=name)
        with scope():
            infos = gather(agreement.rank_info(config, host_name()), "alsgd.rank_info")
        agreement.check_agreement(infos)
        if share:
            with scope():
                carry, self.world = hvd.broadcast_object((carry, world), root_rank=0,
                                                         name="alsgd.scheduler_state",
                                                         process_set=self.process_set)
        hosts = [i["host"] for i in infos]
        if whole:
            self.topology = topo = Topology.from_config(config.topology, hosts,
                                                        chained=config.chained_allreduce,
                                                        elastic=elastic_job())
            self.process_sets = {ranks: sets.get(ranks) for ranks in topo.process_sets()}
        else:
            self.topology = topo = Topology.from_config("flat", hosts)
            self.process_sets = {tuple(range(topo.size)): process_set}
        own_sets = any(ps is not hvd.global_process_set for ps in self.process_sets.values()) and whole
        if own_sets:  # block-local last syncs: no rank may shut Horovod down before the others
            install_exit_barrier(exit_barrier)
        if own_sets and elastic_job():
            _warn_once("elastic", "adaptive-lsgd: this hierarchical topology uses Horovod process "
                       "sets; with Horovod 0.28.1 and Gloo a worker *failure* then aborts every "
                       "worker (horovod issue #4021). Graceful host changes work; 'topology: auto' "
                       "(the default) is flat in elastic jobs for that reason (see docs/elastic.md)")
        if topo.chained and not topo.sliced and topo.num_levels > 1:
            _warn_once("leaders", "adaptive-lsgd: the chained sync runs in the leaders' form "
                       "(blocks of different sizes, or chained_allreduce: leaders): pass name= to "
                       "your own Horovod collectives. Horovod's automatic names count the "
                       "operations each process enqueued, the block leaders enqueue more than "
                       "the other ranks, and an unnamed collective would wait forever (README, "
                       "'Known limits')")
        self.rank = hvd.rank() if whole else process_set.rank()
        self.check_origin = check_origin
        self.scheduler = Scheduler(config, topo, self.rank, param_bytes, check_origin=check_origin,
                                   can_overlap=self.can_overlap, uneven_steps=uneven_steps)
        if carry is not None:
            self.scheduler.load_state_dict(carry, strict=False)
            if share:  # an elastic rebuild: check again (the reset's broadcast should match)
                self.scheduler.origin_pending = check_origin
                self.scheduler.log.write({"step": self.scheduler.step, "event": "elastic_reset",
                                          "size": topo.size, "previous_size": carry["size"],
                                          "periods": list(self.scheduler.periods),
                                          "phase": self.scheduler.phase})

    def allow_uneven_steps(self, allow: bool = True) -> None:
        """Declare that the training loop accepts per-rank step counts (not a collective; the
        flag reaches the other ranks in the next top-level sync's table)."""
        self.uneven_steps = bool(allow)
        self.scheduler.uneven_steps = bool(allow)

    @property
    def current(self) -> bool:
        """False once Horovod was re-initialised (an elastic reset) since this was built."""
        return self.token is self._token_of()

    def load(self, state: dict | None) -> None:
        """Load a scheduler state (None: start the scheduler afresh); not a collective. A state
        saved under another world size (an elastic commit from before a reset) carries the
        phase, step count and periods; statistics start afresh."""
        if state is None:
            self.scheduler.log.close()
            self.scheduler = Scheduler(self.config, self.topology, self.rank, self.param_bytes,
                                       check_origin=self.check_origin,
                                       can_overlap=self.can_overlap,
                                       uneven_steps=self.uneven_steps)
            self.scheduler.log.resume()  # append to the log of this run, do not truncate it
        else:
            self.scheduler.load_state_dict(state, strict=False)


_EXIT: dict = {"barrier": None, "crashed": False, "hooked": False}


_WARNED_INFLIGHT: list = []  # state_dict() with an average in flight: warned once per process


def warn_if_in_flight(inflight, wait_call: str) -> None:
    """``state_dict()`` while an overlapped average is in flight (``inflight`` not None): warn
    once per process that the checkpoint misses it; ``wait_call`` names what applies it."""
    if inflight is None or _WARNED_INFLIGHT:
        return
    _WARNED_INFLIGHT.append(True)
    warnings.warn("adaptive-lsgd: state_dict() while an overlapped average is in flight: the "
                  "checkpoint misses it, and a resume will not repeat this run exactly. Call "
                  f"{wait_call} (or average_now()) on every rank before saving", stacklevel=3)


def install_exit_barrier(barrier: Callable[[], object],
                         timeout_s: float = EXIT_BARRIER_TIMEOUT_S) -> None:
    """At interpreter exit, before Horovod's own ``shutdown`` (an ``atexit`` handler that
    ``hvd.init()`` registers), run ``barrier`` (a tiny global allreduce) on this rank.

    Why: with a hierarchical topology the last syncs of a run are block-local, so one block can
    finish its loop while another still averages inside its block. Horovod's shutdown is
    global: the first rank to exit would shut Horovod down under the other block's collective
    ("Process set provided does not exist, or has not been registered"). The barrier makes
    every rank wait for the slowest one. It is skipped after an uncaught exception (the
    other ranks then get Horovod's error at once, as without adaptive-lsgd) and in elastic
    jobs; it waits at most ``timeout_s`` (a rank that never arrives, e.g. one that left the
    training loop early, cannot hang the exit). Call after ``hvd.init()``, on every rank;
    calling again replaces the barrier and moves the handler after Horovod's latest one."""
    _EXIT["barrier"] = barrier
    _EXIT["timeout_s"] = float(timeout_s)
    if not _EXIT["hooked"]:
        _EXIT["hooked"] = True
        previous = sys.excepthook

        def excepthook(kind, value, tb):
            _EXIT["crashed"] = True
            previous(kind, value, tb)

        sys.excepthook = excepthook
    atexit.unregister(_run_exit_barrier)
    atexit.register(_run_exit_barrier)  # LIFO: runs before the shutdown hvd.init() registered


def _run_exit_barrier() -> None:
    barrier = _EXIT["barrier"]
    if barrier is None or _EXIT["crashed"] or elastic_job():
        return

    def run():
        try:
            barrier()
        except Exception as exc:  # Horovod already shut down (another rank failed): nothing to wait for
            _LOG.debug("adaptive-lsgd: exit barrier: %s", exc)

    thread = threading.Thread(target=run, name="alsgd-exit-barrier", daemon=True)
    thread.start()
    thread.join(_EXIT["timeout_s"])
    if thread.is_alive():
        _LOG.warning("adaptive-lsgd: not every rank reached the end of the run within %.0f s; "
                     "exiting without waiting for them", _EXIT["timeout_s"])
