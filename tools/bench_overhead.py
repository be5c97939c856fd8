"""Benchmark (not a test): the step-time overhead of adaptive-lsgd at H=1 against
``hvd.DistributedOptimizer``. A thin alias of ``alsgd-bench overhead`` (see
:mod:`adaptive_lsgd.tools.bench`), which runs the variants interleaved in one Horovod job on
2 local workers (plain ``horovodrun --gloo``, no root needed)::

    python -m adaptive_lsgd.tools.bench_overhead                    # writes overhead.json
    python -m adaptive_lsgd.tools.bench_overhead --quick --json /tmp/overhead.json
"""

from __future__ import annotations

import sys

from adaptive_lsgd.tools import bench


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--json" not in argv and "--out" not in argv:
        argv += ["--json", "overhead.json"]
    return bench.main(["overhead", *argv])


if __name__ == "__main__":
    sys.exit(main())
