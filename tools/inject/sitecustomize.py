"""adaptive-lsgd's worker-side hook, put first on the workers' PYTHONPATH by ``alsgd-run``.

In a Horovod worker (``_ALSGD_INJECT`` set and a rank variable present) it installs the
import hook of ``_alsgd_inject``; in any other process (``horovodrun`` itself) it does nothing.
Then it runs the ``sitecustomize`` this one shadows, if there is one.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")

if os.environ.get("_ALSGD_INJECT") and any(v in os.environ for v in _RANK_VARS):
    sys.path.insert(0, _HERE)
    try:
        import _alsgd_inject

        _alsgd_inject.install()
    finally:
        sys.path.remove(_HERE)


def _chain() -> None:
    """Run the next ``sitecustomize`` on sys.path (the user's), as ``sitecustomize``."""
    rest = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_chain()
