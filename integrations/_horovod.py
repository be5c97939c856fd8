"""What both integrations need from Horovod itself: the host name and one process set per
rank tuple. It takes the framework's ``hvd`` module as an argument and imports no framework.

Example (in an integration, after ``hvd.init()``)::

    sets = ProcessSets(hvd, module="adaptive_lsgd.integrations.torch")
    ps = sets.get((0, 1))        # the same call, in the same order, on every rank
    install_exit_barrier(lambda: hvd.allreduce(torch.zeros(1), name="alsgd.exit"))
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable

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


_EXIT: dict = {"barrier": None, "crashed": False, "hooked": False}


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
