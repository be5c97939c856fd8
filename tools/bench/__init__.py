"""The benchmark harness (not tests).

* :mod:`.cli`: ``alsgd-bench`` (also ``python -m adaptive_lsgd.tools.bench``);
* :mod:`.scenarios`: the scenarios and their variants, how one runs (one interleaved Horovod
  job on the emulated cluster), its JSON document and goals;
* :mod:`.worker`: one rank of a scenario's job;
* :mod:`.report`: the PNG plots and ``docs/benchmarks.md`` from the scenarios' JSON;
* :mod:`.sync`: the wall time of one global average, flat against the chained forms (run it as
  the workers of a job, e.g. on the emulated cluster);
* :mod:`.validate_tune`: ``alsgd-tune``'s predictions against the emulated cluster (root).
"""
