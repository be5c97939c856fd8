"""Benchmark (not a test): step-time overhead of adaptive-lsgd at H=1 against
``hvd.DistributedOptimizer`` on the same model, variants interleaved in one run.

Variants, each on its own copy of the model, in alternating blocks of steps:

* ``horovod``: ``hvd.DistributedOptimizer`` (gradient allreduce, overlapped with backward);
* ``alsgd-minibatch``: ours in the mini-batch phase (Horovod's code plus our bookkeeping);
* ``alsgd-h1``: ours in the local phase with ``periods: [1]`` (model averaging every step).

Rank 0 prints the median step time of each and the ratios to ``horovod``::

    python -m adaptive_lsgd.tools.bench_overhead            # launches horovodrun -np 2
    python -m adaptive_lsgd.tools.bench_overhead --np 2 --blocks 12 --steps 25 --width 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from adaptive_lsgd.tools.launch import relaunch, worker_settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--blocks", type=int, default=12, help="interleaved blocks per variant")
    p.add_argument("--steps", type=int, default=25, help="steps per block")
    p.add_argument("--width", type=int, default=512, help="hidden width of the MLP")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> None:
    import horovod.torch as hvd
    import torch

    import adaptive_lsgd.integrations.torch as alsgd

    hvd.init()
    torch.set_num_threads(1)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, args.width), torch.nn.ReLU(),
                                   torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
                                   torch.nn.Linear(args.width, 10))

    variants = {}
    m = model()
    variants["horovod"] = (m, hvd.DistributedOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        named_parameters=[("h." + n, p) for n, p in m.named_parameters()]))
    m = model()
    variants["alsgd-minibatch"] = (m, alsgd.DistributedOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        named_parameters=[("m." + n, p) for n, p in m.named_parameters()],
        config={"warmup": 10**9}))
    m = model()
    variants["alsgd-h1"] = (m, alsgd.DistributedOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        named_parameters=[("l." + n, p) for n, p in m.named_parameters()],
        config={"policy": "fixed", "periods": [1], "warmup": 0}))
    x = torch.randn(64, 256)
    y = torch.randint(0, 10, (64,))
    loss_fn = torch.nn.CrossEntropyLoss()
    times = {k: [] for k in variants}
    for block in range(args.blocks + 1):  # block 0 warms up every variant
        for name, (net, opt) in variants.items():
            hvd.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.zero_grad()
                loss_fn(net(x), y).backward()
                opt.step()
            if block > 0:
                times[name].append((time.perf_counter() - start) / args.steps)
    if hvd.rank() == 0:
        params = sum(p.numel() for p in variants["horovod"][0].parameters())
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"[overhead] {hvd.size()} ranks, {params} parameters, {args.blocks} interleaved "
              f"blocks x {args.steps} steps")
        for k, v in med.items():
            print(f"[overhead] {k:16s} median {v * 1e3:7.2f} ms/step   "
                  f"ratio to horovod {v / med['horovod']:.3f}")
        print("[overhead] json " + json.dumps({"median_s": med, "ratio": {
            k: v / med["horovod"] for k, v in med.items()}, "params": params}), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(worker_settings(args))
        return 0
    return relaunch("adaptive_lsgd.tools.bench_overhead", args.np, vars(args))


if __name__ == "__main__":
    sys.exit(main())
