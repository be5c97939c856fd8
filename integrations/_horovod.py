"""What both integrations need from Horovod itself: the host name and one process set per
rank tuple. It takes the framework's ``hvd`` module as an argument and imports no framework.

Example (in an integration, after ``hvd.init()``)::

    sets = ProcessSets(hvd, module="adaptive_lsgd.integrations.torch")
    ps = sets.get((0, 1))        # the same call, in the same order, on every rank
"""

from __future__ import annotations

import os
import socket


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
