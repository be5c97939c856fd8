"""Benchmark (not a test): the wall time of one global model average, flat against the two
forms of the chained (hierarchical) sync, through the PyTorch integration itself.

Run it as the workers of a Horovod job, e.g. on the emulated cluster (root)::

    python -m adaptive_lsgd.tools.cluster --hosts 2 --workers-per-host 2 --rate-mbit 50 -- \\
        python -m adaptive_lsgd.tools.bench.sync --width 1000 --reps 8

Three optimizers share one model: ``flat`` (``topology: flat``, one allreduce over all
ranks), ``leaders`` and ``sliced`` (``topology: auto`` with ``chained_allreduce: leaders`` /
``sliced``). Each repetition runs ``average_now()`` once per variant, in turn (interleaved),
after a barrier; a variant's time is that of the slowest rank. Rank 0 prints the median per
variant and the median of the per-repetition ratios to ``flat``, and writes them to
``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

VARIANTS = {  # periods: no sync comes due (no training step is taken)
    "flat": {"topology": "flat", "periods": [1000]},
    "leaders": {"topology": "auto", "chained_allreduce": "leaders", "periods": [1000, 1]},
    "sliced": {"topology": "auto", "chained_allreduce": "sliced", "periods": [1000, 1]},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1000, help="MLP width (1000: 1.05M parameters)")
    p.add_argument("--reps", type=int, default=8, help="averages per variant")
    p.add_argument("--json", default=None, help="rank 0 writes the figures here")
    args = p.parse_args(argv)
    if args.reps < 1 or args.width < 1:
        p.error("--reps and --width must be at least 1")

    import warnings

    import horovod.torch as hvd
    import torch

    from adaptive_lsgd.integrations import torch as alsgd  # before hvd.init(): dynamic sets
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(hvd.rank())
    model = torch.nn.Sequential(torch.nn.Linear(40, args.width), torch.nn.ReLU(),
                                torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
                                torch.nn.Linear(args.width, 10))
    params = sum(p.numel() for p in model.parameters())
    opts = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the leaders' form warns about unnamed collectives
        for name, cfg in VARIANTS.items():
            opts[name] = alsgd.DistributedOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.0), model=model,
                named_parameters=[(f"{name}.{n}", q) for n, q in model.named_parameters()],
                config={"policy": "fixed", "max_period": 1000, **cfg})
    times: dict = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        for name, opt in opts.items():
            hvd.allreduce(torch.zeros(1), name=f"bench_sync.barrier.{rep}.{name}")
            start = time.perf_counter()
            opt.average_now()
            elapsed = time.perf_counter() - start
            slowest = hvd.allreduce(torch.tensor([elapsed]), op=hvd.Max,
                                    name=f"bench_sync.time.{rep}.{name}")
            times[name].append(float(slowest[0]))
    if hvd.rank() != 0:
        return 0
    levels = {name: opt.alsgd.topology.describe()["levels"] for name, opt in opts.items()}
    out = {"ranks": hvd.size(), "parameters": params, "bytes": 4 * params, "reps": args.reps,
           "levels": levels, "seconds": times,
           "median_s": {name: statistics.median(t) for name, t in times.items()},
           "ratio_to_flat": {name: statistics.median(f / x for f, x in zip(times["flat"], t))
                             for name, t in times.items() if name != "flat"}}
    for name, t in times.items():
        ratio = out["ratio_to_flat"].get(name)
        print(f"[bench_sync] {name:8s} median {out['median_s'][name]:.3f} s "
              + (f"flat/this {ratio:.2f}x " if ratio else "")
              + "[" + ", ".join(f"{x:.2f}" for x in t) + "]", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
