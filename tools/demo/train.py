"""The main job (``make demo``): real post-local, adaptive local SGD on MNIST-1D.

Trains a small 1-D CNN on 4 local workers under ``horovodrun --gloo``: one epoch of mini-batch
SGD (Horovod's gradient allreduce), then local SGD with the period chosen online by the
scheduler. Rank 0 prints each decision as it is taken (periods per level, measured compute
and collective time, predicted communication share) and a final summary.

Run it::

    python -m adaptive_lsgd.tools.demo            # launches horovodrun -np 4 itself
    python -m adaptive_lsgd.tools.demo --np 2 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time

from adaptive_lsgd.tools.launch import relaunch, worker_settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="alsgd-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--np", type=int, default=4, help="number of workers (default 4)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="epochs of mini-batch SGD before local SGD (post-local SGD)")
    p.add_argument("--config", default=None, help="a YAML/JSON adaptive-lsgd config")
    p.add_argument("--log", default="demo-decisions.jsonl", help="decision log (JSON lines)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model():
    import torch.nn as nn

    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 10, 10),
    )


def accuracy(model, x, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def worker(args) -> None:
    import horovod.torch as hvd
    import torch

    import adaptive_lsgd.integrations.torch as alsgd
    from adaptive_lsgd.config import load_config
    from adaptive_lsgd.tools.demo.datasets import load_mnist1d, shard

    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_mnist1d()
    idx = shard(len(data["x"]), hvd.rank(), hvd.size())
    x, y = torch.from_numpy(data["x"][idx]), torch.from_numpy(data["y"][idx])
    x_test, y_test = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])
    steps_per_epoch = len(x) // args.batch_size

    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    config = load_config(args.config).to_dict() if args.config else {}
    config.setdefault("warmup", int(args.warmup_epochs * steps_per_epoch))
    config.setdefault("log", args.log)
    config.setdefault("max_period", 16)  # a convergence cap for this small model
    optimizer = alsgd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                           model=model, config=config)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    sched = optimizer.alsgd.scheduler
    say = print if hvd.rank() == 0 else (lambda *a, **k: None)
    say(f"[demo] {hvd.size()} workers, topology {sched.topology.describe()['levels']}, "
        f"{sum(p.numel() for p in model.parameters())} parameters, {steps_per_epoch} steps/epoch, "
        f"mini-batch phase for {config['warmup']} steps, then {sched.config.policy} local SGD",
        flush=True)

    gen = torch.Generator().manual_seed(hvd.rank())
    loss_fn = torch.nn.CrossEntropyLoss()
    seen = sched.global_syncs
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            b = perm[i * args.batch_size:(i + 1) * args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[b]), y[b])
            loss.backward()
            optimizer.step()
            if sched.global_syncs != seen:
                seen = sched.global_syncs
                m = sched.model
                if m is not None and (sched.last_decision == "adapt" or seen % 25 == 0):
                    link = ", ".join(f"L{j} {t * 1e3:.1f} ms" for j, t in enumerate(m.link_s))
                    say(f"[demo] step {sched.step:5d}  periods {list(sched.periods)}  "
                        f"compute {m.compute_s * 1e3:.1f} ms/step  collective {link}  "
                        f"predicted comm share {sched.priced_model.comm_fraction(sched.periods):.1%}"
                        f"{' (overlapped)' if sched.decision.mechanisms.get('overlap') else ''}  "
                        f"({sched.last_decision})", flush=True)
        optimizer.average_now()
        say(f"[demo] epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  "
            f"test acc {accuracy(model, x_test, y_test):.2%}  phase {sched.phase}  "
            f"periods {list(sched.periods)}", flush=True)
    wall = time.perf_counter() - start
    summary = alsgd.summary(optimizer)
    acc = accuracy(model, x_test, y_test)
    samples = hvd.size() * args.epochs * steps_per_epoch * args.batch_size
    if hvd.rank() == 0:
        result = {
            "samples_per_s": samples / wall,
            "comm_fraction": summary["comm_fraction"],
            "test_acc": acc,
            "syncs_per_level": summary["syncs_per_level"],
            "final_periods": summary["periods"],
            "switch_step": summary["switch_step"],
            "wall_s": wall,
        }
        print("[demo] summary")
        print(f"[demo]   samples/s            {result['samples_per_s']:.0f}")
        print(f"[demo]   communication share  {result['comm_fraction']:.1%} "
              f"(of compute + collective time, local phase)")
        print(f"[demo]   test accuracy        {acc:.2%}")
        print(f"[demo]   syncs per level      {result['syncs_per_level']} "
              f"(mini-batch phase: {summary['switch_step']} steps)")
        print(f"[demo]   final periods        {result['final_periods']}")
        print(f"[demo]   decision log         {args.log}")
        print("[demo] json " + json.dumps(result), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(worker_settings(args))
        return 0
    from adaptive_lsgd.tools.demo.datasets import load_mnist1d

    load_mnist1d()  # generate once, before the workers start
    return relaunch("adaptive_lsgd.tools.demo", args.np, vars(args))
