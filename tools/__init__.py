"""The programs around the core (installed as ``adaptive_lsgd.tools``), one subpackage each.

* ``cli``: the user commands ``alsgd-tune`` (:mod:`.cli.tune`), ``alsgd-run`` (:mod:`.cli.run`)
  and ``alsgd-sim`` (:mod:`.cli.sim`, the simulator's command line);
* ``inject``: not a package; the ``sitecustomize`` hook that ``alsgd-run`` puts on the
  workers' ``PYTHONPATH`` to swap Horovod's optimizers for ours;
* ``cluster``: the emulated multi-host cluster (network namespaces, shaped links; root),
  ``python -m adaptive_lsgd.tools.cluster``;
* ``bench``: the benchmark harness, ``alsgd-bench`` (:mod:`.bench.cli`), its workers, the results
  page, and the stand-alone benchmarks ``bench.sync`` and ``bench.validate_tune``;
* ``demo``: ``make demo`` (``python -m adaptive_lsgd.tools.demo``) and the MNIST-1D data that
  the demo, the benchmarks and the tests train on;
* :mod:`.launch`: relaunching a module under ``horovodrun --gloo`` and handing it its settings
  (used by the demo, ``alsgd-tune`` and the benchmarks).

``tools/dev/`` in the checkout (set-up script, scheduler micro-benchmark) is not installed.
"""
