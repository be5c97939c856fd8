"""The demo (``make demo``, ``python -m adaptive_lsgd.tools.demo``; :mod:`.train`) and its data,
MNIST-1D generated offline (:mod:`.datasets`; the benchmarks and tests train on it too)."""
