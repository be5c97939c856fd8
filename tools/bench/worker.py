"""One rank of an ``alsgd-bench`` scenario (started by :mod:`adaptive_lsgd.tools.bench.scenarios`).

Every variant trains its own copy of the model on the same data stream; the variants run
interleaved: in each round every variant runs one segment, in an order that rotates from
round to round. A segment starts and ends with one tiny allreduce (a barrier that also sums
the steps the ranks took), so its wall time includes waiting for the slowest rank. Rank 0
prints a progress line per segment and, at the end, writes the results (JSON) to
``result_path``.

Settings come as JSON in ``_ALSGD_WORKER_SETTINGS`` (see
:mod:`adaptive_lsgd.tools.bench.scenarios`); run by hand::

    _ALSGD_WORKER_SETTINGS='{"model": "cnn", ...}' horovodrun -np 2 -H localhost:2 --gloo \\
        python -m adaptive_lsgd.tools.bench.worker
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import horovod.torch as hvd  # noqa: I001
import torch
import torch.distributed as dist
from horovod.torch.optimizer import DistributedOptimizer as horovod_optimizer

import adaptive_lsgd.integrations.torch as alsgd  # before hvd.init(): dynamic process sets
from adaptive_lsgd.tools.cluster import emulated_slowdown
from adaptive_lsgd.tools.demo.datasets import load_mnist1d, shard
from adaptive_lsgd.tools.launch import SETTINGS_ENV


def build_model(kind: str, width: int) -> torch.nn.Module:
    """``mlp``: 40-W-W-10 (W=1000 gives about 1.05M parameters); ``cnn``: the demo's 1-D CNN;
    ``lm``: the byte-level transformer of :mod:`adaptive_lsgd.tools.bench.lm` (1.07M)."""
    nn = torch.nn
    if kind == "lm":
        from adaptive_lsgd.tools.bench.lm import ByteTransformer

        return ByteTransformer()
    if kind == "mlp":
        return nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 10))
    from adaptive_lsgd.tools.demo.train import build_model as cnn

    return cnn()


class Variant:
    """One training run: model, optimizer, data stream, and what its segments measured."""

    def __init__(self, spec: dict, s: dict, data: tuple):
        self.name, self.kind = spec["name"], spec["kind"]
        self.H = int(spec.get("H", 1))
        self.spec, self.s = spec, s
        seed = int(s.get("seed", 0))  # alsgd-bench --seed: initialisation and data order
        torch.manual_seed(seed)
        self.model = build_model(s["model"], s["width"])
        self.x, self.y = data
        self.gen = torch.Generator().manual_seed(1000 + hvd.rank() + 10007 * seed)
        self.perm, self.pos = torch.randperm(len(self.x), generator=self.gen), 0
        self.steps = 0             # this rank's optimizer steps (micro-batches)
        self.samples = 0           # over all ranks
        self.rates, self.walls, self.accs, self.trace = [], [], [], []
        self.switches = []  # [t, step, mechanisms, why]: each switch of the auto mechanisms
        self.busy = 0.0            # this variant's own wall time so far
        self.sched = None
        self.net = self.model
        lr, params = s["lr"], self.model.parameters()
        named = [(f"{self.name}.{n}", p) for n, p in self.model.named_parameters()]
        if s.get("optimizer") == "adamw":  # the lm scenario's inner optimizer
            sgd = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        else:
            sgd = torch.optim.SGD(params, lr=lr, momentum=0.9)
        if self.kind == "compute":
            self.opt = sgd
        elif self.kind == "horovod":
            # Horovod's own, also under alsgd-run (which swaps hvd.DistributedOptimizer)
            self.opt = horovod_optimizer(sgd, named_parameters=named,
                                         backward_passes_per_step=self.H)
            if hasattr(self.opt, "alsgd"):
                raise RuntimeError("the horovod baseline got adaptive-lsgd's optimizer")
        elif self.kind == "alsgd" and spec.get("H_from"):
            self.opt = None  # built at its first segment: build_from(the variant it copies)
            self._sgd, self._named = sgd, named
        elif self.kind == "alsgd":
            self._build_alsgd(sgd, named, dict(spec["config"]))
        elif self.kind == "peer":
            self._peer(sgd, spec.get("warmup", 0))
        else:
            raise ValueError(f"unknown variant kind {self.kind!r}")
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)

    def _peer(self, sgd, warmup: int) -> None:
        """PyTorch's post-local SGD: DDP with ``post_localSGD_hook`` (gradient allreduce for
        ``warmup`` steps, then only within a one-rank subgroup, i.e. none) and
        ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager`` (model average every H steps)."""
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState,
            post_localSGD_hook,
        )
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

        subgroup, _ = dist.new_subgroups(group_size=1)
        self.net = torch.nn.parallel.DistributedDataParallel(self.model)
        self.net.register_comm_hook(PostLocalSGDState(process_group=None, subgroup=subgroup,
                                                      start_localSGD_iter=warmup),
                                    post_localSGD_hook)
        sgd = torch.optim.SGD(self.model.parameters(), lr=self.s["lr"], momentum=0.9)
        self.warmup = warmup
        self.opt = PostLocalSGDOptimizer(sgd, PeriodicModelAverager(period=self.H,
                                                                    warmup_steps=warmup))

    # -- training ----------------------------------------------------------------------------
    def batch(self):
        b = self.s["batch"]
        if self.pos + b > len(self.x):
            self.perm, self.pos = torch.randperm(len(self.x), generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + b]
        self.pos += b
        return self.x[idx], self.y[idx]

    def set_lr(self, frac: float) -> None:
        """Step decay: the LR drops 10x at each fraction of the run in ``lr_decay``; with
        ``schedule: cosine`` warm-up and cosine decay over the run's steps (set every step)."""
        if self.s.get("schedule") == "cosine":
            from adaptive_lsgd.tools.bench.lm import cosine_lr

            frac = self.steps / (self.s["rounds"] * self.s["segment_steps"])
            lr = cosine_lr(self.s["lr"], frac)
        else:
            lr = self.s["lr"] * 0.1 ** sum(frac >= d for d in self.s.get("lr_decay", []))
        for g in self.opt.param_groups:
            g["lr"] = lr

    def one_step(self, loss_fn, slowdown: float) -> None:
        start = time.perf_counter()
        if self.s.get("schedule") == "cosine":
            self.set_lr(0.0)
        x, y = self.batch()
        loss = loss_fn(self.net(x), y)
        if self.kind == "horovod" and self.H > 1:
            loss = loss / self.H
        loss.backward()
        # Emulated device: pad the step to at least compute_ms, then stretch it by the host's
        # slowdown (a sleep proportional to the measured compute time).
        spent = time.perf_counter() - start
        target = max(spent, self.s.get("compute_ms", 0) / 1e3) * slowdown
        if target > spent:
            time.sleep(target - spent)
        self.steps += 1
        if self.kind == "horovod" and self.H > 1 and self.steps % self.H:
            return  # accumulate: Horovod allreduces on the H-th backward pass, step() after it
        self.opt.step()
        self.opt.zero_grad()

    def _build_alsgd(self, sgd, named, config: dict) -> None:
        self.opt = alsgd.DistributedOptimizer(sgd, named_parameters=named, model=self.model,
                                              config=config)
        alsgd.allow_uneven_steps(self.opt)  # segments are whole rounds of a batch stream
        self.sched = self.opt.alsgd.scheduler

    def build_from(self, other: Variant) -> None:
        """A fixed period: the global period ``other`` (the adaptive policy) runs with now,
        i.e. the H it chose for the link as it is (changing-network: the starting link).
        Shared state only (every rank's scheduler decided the same), so every rank builds the
        same optimizer at the same point."""
        h = 1
        for p in other.sched.periods:
            h *= p
        self.H = h
        self._build_alsgd(self._sgd, self._named, {**self.spec["config"], "periods": [h]})

    def syncs(self) -> int:
        """Global synchronisations so far (mini-batch allreduces count as syncs)."""
        if self.kind == "compute":
            return 0
        if self.kind == "horovod":
            return self.steps // self.H
        if self.kind == "peer":
            local = max(0, self.steps - self.warmup)
            return min(self.steps, self.warmup) + local // self.H
        return self.sched.global_syncs + self.sched.steps_mini_batch

    def segment(self, steps: int, frac: float, loss_fn, slowdown: float, t_job: float):
        """Run one segment: ``steps`` steps (time-budget variants: of the slowest rank)."""
        self.set_lr(frac)
        barrier = torch.zeros(1)
        hvd.allreduce_(barrier, name="bench.barrier", op=hvd.Sum)
        if self.sched is not None:
            self.opt.reset_step_timer()  # time away from this variant is not compute
        start, steps0 = time.perf_counter(), self.steps
        # ``steps`` steps of the slowest rank. In time-budget rounds (faster ranks take more
        # steps per round) whole rounds: their split is read at each round's start, and they
        # switch on or off only at a sync, at the same step on every rank (shared state only).
        slow_steps = 0
        while slow_steps < steps:
            if self.sched is not None and self.sched.is_local and self.sched.weighs_by_steps:
                per_round = min(self.sched.rank_steps or [self.sched.level_steps()])
                for _ in range(self.sched.steps_to_sync()):
                    self._traced_step(loss_fn, slowdown, t_job)
                slow_steps += per_round
            else:
                self._traced_step(loss_fn, slowdown, t_job)
                slow_steps += 1
        hidden = 0.0
        if self.kind == "alsgd" and self.sched.is_local and self.opt._alsgd_inflight is not None:
            # The average in flight completes here, before the other variants run. In an
            # unbroken run the rest of the current round would have computed meanwhile: the
            # segment is charged only the wait that rest would not have hidden.
            left = self.sched.steps_to_sync()
            step_s = self.sched.model.compute_s if self.sched.model is not None else 0.0
            waited = self.opt.wait_for_average()
            hidden = min(waited, left * step_s)
        own = time.perf_counter() - start - hidden
        # steps of all ranks, and (compute-only) the sum of each rank's own rate: the limit in which
        # no rank ever waits for another
        done = torch.tensor([float(self.steps - steps0), (self.steps - steps0) * self.s["batch"] / own])
        hvd.allreduce_(done, name="bench.steps", op=hvd.Sum)
        wall = time.perf_counter() - start - hidden
        self.busy += wall
        n = int(done[0].item()) * self.s["batch"]
        self.samples += n
        self.walls.append(wall)
        self.rates.append(float(done[1]) if self.kind == "compute" else n / wall)
        return self.rates[-1]

    def _traced_step(self, loss_fn, slowdown: float, t_job: float) -> None:
        before = self.sched.global_syncs if self.sched is not None else None
        self.one_step(loss_fn, slowdown)
        if self.sched is not None and self.sched.global_syncs != before:
            t = round(time.perf_counter() - t_job, 3)
            self.trace.append([t, self.sched.step, list(self.sched.periods)])
            mech = dict(self.sched.decision.mechanisms)
            if not self.switches or self.switches[-1][2] != mech:
                self.switches.append([t, self.sched.step, mech, dict(self.sched.decision.why)])

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def accuracy(self, x_test, y_test) -> float:
        """Test accuracy of the average of the ranks' models (the models are not changed);
        ``lm``: next-byte accuracy, the validation loss kept in :attr:`val_loss`."""
        params = [p.detach().clone() for p in self.model.parameters()]
        hvd.grouped_allreduce_(params, op=hvd.Average, name=f"bench.eval.{self.name}")
        probe = build_model(self.s["model"], self.s["width"])
        for dst, src in zip(probe.parameters(), params):
            dst.copy_(src)
        if self.s["model"] == "lm":
            from adaptive_lsgd.tools.bench.lm import evaluate

            self.val_loss, acc = evaluate(probe, x_test, y_test)
            return acc
        probe.eval()
        return (probe(x_test).argmax(1) == y_test).float().mean().item()

    def finish(self) -> dict:
        out = {"global_syncs": self.syncs()}  # before the final average (taken for evaluation)
        # what one global sync sends per rank: the gradient (horovod, float32), the model or
        # with compression its update (16 bits a parameter)
        params = sum(p.numel() for p in self.model.parameters())
        wire = self.spec.get("config", {}).get("compression", "none")
        out["bytes_per_sync"] = params * (2 if wire in ("fp16", "bf16") else 4)
        if self.kind == "alsgd":
            summ = alsgd.summary(self.opt)
            self.opt.average_now()
            out.update(comm_fraction_summary=summ["comm_fraction"], periods=summ["periods"],
                       mechanisms=summ["mechanisms"], rank_steps=summ["rank_steps"],
                       syncs_per_level=summ["syncs_per_level"], switch_step=summ["switch_step"])
        return out


def main() -> int:
    s = json.loads(os.environ[SETTINGS_ENV])
    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    if any(v["kind"] == "peer" for v in s["variants"]):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", s.get("iface") or "lo")
        dist.init_process_group("gloo", init_method=f"tcp://{s['master_addr']}:{s['master_port']}",
                                rank=rank, world_size=size)
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    if s["model"] == "lm":
        from adaptive_lsgd.tools.bench.lm import rank_data

        train, (x_test, y_test) = rank_data(rank, size)
    else:
        data = load_mnist1d()
        idx = shard(len(data["x"]), rank, size)
        train = torch.from_numpy(data["x"][idx]), torch.from_numpy(data["y"][idx])
        x_test, y_test = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])
    variants = [Variant(spec, s, train) for spec in s["variants"]]
    params = sum(p.numel() for p in variants[0].model.parameters())
    rounds, steps = s["rounds"], s["segment_steps"]
    say(f"[bench] {s['scenario']}: {size} ranks, {params} parameters, {len(variants)} variants x "
        f"{rounds} rounds x {steps} steps (batch {s['batch']} per rank), interleaved")
    loss_fn = torch.nn.CrossEntropyLoss()
    if s["model"] == "lm":
        from adaptive_lsgd.tools.bench.lm import lm_loss as loss_fn
    slowdown = emulated_slowdown()
    _warm_up(s, loss_fn)
    t_job = time.perf_counter()
    drop_at = s.get("drop_after_round")
    drop_t = None
    for r in range(rounds):
        if drop_at is not None and r == drop_at:
            drop_t = _signal_drop(s, rank, t_job)
            say(f"[bench] link rate dropped before round {r + 1} (t={drop_t:.1f}s)")
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:  # rotating order
            if v.kind == "alsgd" and v.opt is None:  # round 1, after the variant it copies
                v.build_from(next(o for o in variants if o.name == v.spec["H_from"]))
            slow = slowdown if r >= s.get("throttle_from_round", 0) else 1.0
            rate = v.segment(steps, r / rounds, loss_fn, slow, t_job)
            line = f"[bench] round {r + 1}/{rounds} {v.name:22s} {rate:9.0f} samples/s"
            if s.get("eval_every_round"):
                v.accs.append([v.samples, v.accuracy(x_test, y_test)])
                if s["model"] == "lm":  # [samples, accuracy, validation loss, busy seconds]
                    v.accs[-1] += [v.val_loss, round(v.busy, 3)]
                    line += f"  val loss {v.val_loss:.4f}"
                line += f"  test acc {v.accs[-1][1]:.2%}"
            say(line + f"  syncs {v.syncs()}  t={time.perf_counter() - t_job:.0f}s")
    out = {"params": params, "ranks": size, "drop_t": drop_t, "wall_s": time.perf_counter() - t_job,
           "variants": {}}
    for v in variants:
        row = v.finish()
        row.update(test_acc=v.accuracy(x_test, y_test), val_loss=getattr(v, "val_loss", None),
                   rates=v.rates, walls=v.walls,
                   samples=v.samples, steps=v.steps, accs=v.accs, trace=v.trace,
                   switches=v.switches,
                   samples_per_s=statistics.median(v.rates), H=v.H, kind=v.kind)
        out["variants"][v.name] = row
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        with open(s["result_path"], "w") as f:
            json.dump(out, f)
    return 0


def _warm_up(s: dict, loss_fn) -> None:
    """A few untimed steps on a throw-away model (kernels, allocator) before round 1."""
    model = build_model(s["model"], s["width"])
    x, y = torch.randn(s["batch"], 40), torch.randint(0, 10, (s["batch"],))
    if s["model"] == "lm":
        from adaptive_lsgd.tools.bench.lm import lm_loss as loss_fn

        x = torch.randint(0, 256, (s["batch"], 64))
        y = x
    for _ in range(3):
        loss_fn(model(x), y).backward()


def _signal_drop(s: dict, rank: int, t_job: float) -> float:
    """Rank 0 asks the launcher to drop the link (a marker file) and waits for its answer."""
    if rank == 0:
        with open(s["drop_marker"], "w") as f:
            f.write("drop\n")
        deadline = time.monotonic() + 60
        while not os.path.exists(s["drop_marker"] + ".done"):
            if time.monotonic() > deadline:
                raise RuntimeError("the launcher did not change the link rate within 60 s")
            time.sleep(0.05)
    hvd.allreduce_(torch.zeros(1), name="bench.drop", op=hvd.Sum)
    return time.perf_counter() - t_job


if __name__ == "__main__":
    sys.exit(main())
