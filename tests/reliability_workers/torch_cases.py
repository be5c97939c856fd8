"""Reliability cases for the PyTorch integration, run under horovodrun (or the emulated
cluster): ``python torch_cases.py CASE [CASE ...]``. Each case prints ``RESULT <case> <json>``
on every rank; tests/test_reliability.py asserts on them. Files go to ``$REL_CASE_DIR``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn as nn

import adaptive_lsgd.integrations.torch as alsgd  # before hvd.init(): dynamic process sets
from adaptive_lsgd import ConfigMismatchError
from adaptive_lsgd.config import load_config
from adaptive_lsgd.scheduler import Scheduler

hvd.init()
torch.set_num_threads(1)
RANK, SIZE = hvd.rank(), hvd.size()
CASE_DIR = os.environ.get("REL_CASE_DIR", ".")
# Keys of a decision record that depend on measured time (everything else is deterministic
# under a fixed policy).
TIMED = ("time", "compute_s", "comm_s", "link_s", "predicted_comm_fraction")


def report(case: str, **values) -> None:
    print(f"RESULT {case} " + json.dumps({"rank": RANK, **values}), flush=True)


def make_model(seed: int = 0, width: int = 16, inputs: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, 3))


def batches(n: int, seed: int, inputs: int = 8):
    """Rank-specific data, reproducible from (seed, rank)."""
    g = torch.Generator().manual_seed(seed * 1000 + RANK)
    for _ in range(n):
        x = torch.randn(16, inputs, generator=g)
        yield x, (x[:, 0] * 3).long().clamp(-1, 1) + 1


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def gathered(t: torch.Tensor) -> torch.Tensor:
    """(size, n): every rank's copy (a global collective, on every rank)."""
    return hvd.allgather(t.unsqueeze(0).clone())


def train_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def read_log(path: str) -> list:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# -- item 1: start-up agreement ------------------------------------------------------------------
def _build_expecting_mismatch(case: str, config=None):
    model = make_model()
    torch.optim.SGD(model.parameters(), lr=0.1)  # the first optimizer imports torch internals: not ours
    print(f"MARK {case} {RANK} {time.time():.6f}", flush=True)  # before the collective check
    try:
        alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), config=config)
    except ConfigMismatchError as exc:
        print(f"MISMATCH {case} {RANK} {time.time():.6f} {exc}", flush=True)
        raise
    report(case, built=True)  # never reached when the ranks disagree


def mismatch_config():
    """A config key that differs per rank (passed as ``config=``)."""
    _build_expecting_mismatch("mismatch_config", {"max_period": 8 + RANK})


def mismatch_env_topology():
    """A topology that differs per rank, set through ``ALSGD_TOPOLOGY`` before building."""
    os.environ["ALSGD_TOPOLOGY"] = "2x2" if RANK < 2 else "flat"
    _build_expecting_mismatch("mismatch_env_topology")


def invalid_on_one_rank():
    """One rank's config is invalid: it fails before the check, the others must not hang."""
    _build_expecting_mismatch("invalid_on_one_rank", {"max_period": 0 if RANK == 1 else 8})


# -- item 2: non-finite guard ---------------------------------------------------------------------
# step -> (bad rank, injected value); 2x2 with periods [2, 2]: blocks sync at 2, 6, 10, 14, ...,
# all ranks at 4, 8, 12, 16, ...
INJECT = {6: (3, "nan"), 8: (1, "inf"), 10: (0, "inf"), 12: (2, "nan"), 14: (1, "-inf")}


def nonfinite():
    """Inject NaN/Inf into one rank's parameters just before level-0 and level-1 syncs; the
    sync must give every rank of the block the average of the healthy members only."""
    lr, steps = 0.05, 20
    path = os.path.join(CASE_DIR, "nf.{rank}.jsonl")
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr),
                                     named_parameters=model.named_parameters(), model=model,
                                     config={"policy": "fixed", "periods": [2, 2], "topology": "2x2",
                                             "log": path})
    # The same injections into a run with momentum: the bad rank's momentum must be reset too,
    # or its next local steps are non-finite again.
    model_m = make_model()
    opt_m = alsgd.DistributedOptimizer(torch.optim.SGD(model_m.parameters(), lr=lr, momentum=0.9),
                                       named_parameters=model_m.named_parameters(), model=model_m,
                                       config={"policy": "fixed", "periods": [2, 2], "topology": "2x2"})
    topo = opt.alsgd.topology
    params = list(model.parameters())
    events = []
    momentum_finite_steps = 0
    for step, (x, y) in enumerate(batches(steps, seed=3), start=1):
        bad = INJECT.get(step)
        if bad is not None and bad[0] == RANK:
            with torch.no_grad():  # between syncs: one weight of this rank goes non-finite
                params[0][1, 2] = float(bad[1])
                next(model_m.parameters())[1, 2] = float(bad[1])
        train_step(model_m, opt_m, x, y)
        momentum_finite_steps += bool(torch.isfinite(gathered(flat(model_m.parameters()))).all())
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if bad is not None:
            # What this rank holds after its local SGD update, before the average.
            pre = gathered(flat([p - lr * p.grad for p in params]))
        opt.step()
        post = gathered(flat(params))
        assert bool(torch.isfinite(post).all()), f"non-finite parameters after step {step}"
        if bad is None:
            continue
        level = 0 if step % 4 == 2 else 1
        diffs, healthy_counts = [], []
        for r in range(SIZE):
            block = topo.block_of(level, r)
            healthy = [m for m in block if bool(torch.isfinite(pre[m]).all())]
            healthy_counts.append(len(healthy))
            expected = pre[healthy].double().mean(0)
            diffs.append(float((post[r].double() - expected).abs().max()))
        events.append({"step": step, "level": level, "bad_rank": bad[0], "value": bad[1],
                       "pre_finite": [bool(torch.isfinite(pre[r]).all()) for r in range(SIZE)],
                       "healthy_in_block": healthy_counts, "max_diff": max(diffs),
                       "bad_equals_block": bool((post[bad[0]] == post[topo.block_of(level, bad[0])[0]])
                                                .all())})
    opt.average_now()
    final = gathered(flat(params))
    report("nonfinite", events=events, log=path.replace("{rank}", str(RANK)),
           final_finite=bool(torch.isfinite(final).all()),
           final_identical=bool((final - final[0]).abs().max() == 0),
           syncs=opt.alsgd.scheduler.syncs, momentum_finite_steps=momentum_finite_steps)


# -- item 5: checkpoint and resume ----------------------------------------------------------------
def _ckpt_path(name: str, step: int) -> str:
    return os.path.join(CASE_DIR, f"ckpt.{name}.t{step}.rank{RANK}.pt")


def _ckpt_run(name: str, config: dict, n: int, save_at=(), stop_at=None, resume_from=None,
              milestones=(), spy=False):
    """Train ``n`` steps (or stop after ``stop_at``), saving per-rank checkpoints after the steps
    in ``save_at``; with ``resume_from`` start from that step's checkpoint instead of step 0."""
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                     named_parameters=model.named_parameters(), model=model,
                                     config=config)
    lr_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.5)
    sched = opt.alsgd.scheduler
    start = 0
    restored = None
    if resume_from is not None:
        ckpt = torch.load(_ckpt_path(name, resume_from), weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        start = resume_from
        restored = sched.state_dict() == ckpt["optimizer"]["alsgd"]
    calls = []
    if spy:  # record the scheduler's inputs (the real methods still run)
        step_done, complete_sync = sched.step_done, sched.complete_sync

        def spy_step_done(compute_s, lr=None):
            calls.append(("step", compute_s, lr))
            return step_done(compute_s, lr=lr)

        def spy_complete_sync(plan, reduced, times, **timing):  # sync_s / waited_s
            calls.append(("sync", plan.level, np.array(reduced, dtype=np.float32).copy(), list(times),
                          dict(timing)))
            return complete_sync(plan, reduced, times, **timing)

        sched.step_done, sched.complete_sync = spy_step_done, spy_complete_sync
    for step, (x, y) in enumerate(batches(n, seed=11), start=1):
        if step <= start:
            continue
        train_step(model, opt, x, y)
        lr_sched.step()
        if step in save_at:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "lr_scheduler": lr_sched.state_dict()}, _ckpt_path(name, step))
        if step == stop_at:
            break
    return model, opt, restored, calls


def _deterministic(records: list) -> list:
    return [{k: v for k, v in rec.items() if k not in TIMED} for rec in records]


def _ckpt_config(name: str, run: str, policy: str) -> dict:
    path = os.path.join(CASE_DIR, f"log.{name}.{run}.{{rank}}.jsonl")
    if policy == "fixed":
        return {"policy": "fixed", "periods": [2, 3], "topology": "2x2",
                "warmup": "first_lr_decay", "log": path}
    # overlap: false: the twin below replays step/sync calls in their blocking order (at the
    # max_period 4 cap, overlap: auto would otherwise overlap this loopback job's averages)
    return {"policy": "adaptive", "topology": "2x2", "warmup": 5, "timing_warmup": 0, "window": 4,
            "max_period": 4, "log": path, "overlap": False}


FIXED_N, FIXED_SAVES, FIXED_MILESTONES = 40, (8, 23), (12, 30)
# One optimizer per process (each part of the checkpoint test is its own horovodrun job).
CKPT_PART = os.environ.get("REL_CKPT_PART", "")
ADAPT_N, ADAPT_SAVE = 70, 30


def ckpt_unbroken():
    """Run A: fixed policy, 40 steps without a break (the reference)."""
    model, opt, _, _ = _ckpt_run("fixed", _ckpt_config("fixed", "A", "fixed"), FIXED_N,
                                 milestones=FIXED_MILESTONES)
    report("ckpt_unbroken", params=flat(model.parameters()).tolist(),
           log=_deterministic(read_log(os.path.join(CASE_DIR, f"log.fixed.A.{RANK}.jsonl"))),
           switch_step=opt.alsgd.scheduler.switch_step, syncs=opt.alsgd.scheduler.syncs)


def ckpt_save():
    """Run B: the same run, checkpoints after steps 8 (mini-batch phase: the switch at the LR
    drop comes later) and 23 (local phase, mid-round), then it stops. The adaptive run saves
    its scheduler state after step 30 and stops."""
    if CKPT_PART == "fixed":
        _ckpt_run("fixed", _ckpt_config("fixed", "B", "fixed"), FIXED_N, save_at=FIXED_SAVES,
                  stop_at=max(FIXED_SAVES), milestones=FIXED_MILESTONES)
        report("ckpt_save", part="fixed")
        return
    _, opt, _, _ = _ckpt_run("adaptive", _ckpt_config("adaptive", "B", "adaptive"), ADAPT_N,
                             save_at=(ADAPT_SAVE,), stop_at=ADAPT_SAVE)
    report("ckpt_save", adaptive_phase=opt.alsgd.scheduler.phase,
           adaptive_decisions=[r.get("decision") for r in
                               read_log(os.path.join(CASE_DIR, f"log.adaptive.B.{RANK}.jsonl"))
                               if "decision" in r])


def ckpt_resume():
    """Run C (a fresh process per checkpoint): resume it and continue to the end."""
    out = {}
    for t in [t for t in FIXED_SAVES if CKPT_PART == f"fixed{t}"]:
        model, opt, restored, _ = _ckpt_run("fixed", _ckpt_config("fixed", f"C{t}", "fixed"), FIXED_N,
                                            resume_from=t, milestones=FIXED_MILESTONES)
        out[str(t)] = {"params": flat(model.parameters()).tolist(), "restored": restored,
                       "log": _deterministic(read_log(
                           os.path.join(CASE_DIR, f"log.fixed.C{t}.{RANK}.jsonl"))),
                       "switch_step": opt.alsgd.scheduler.switch_step,
                       "syncs": opt.alsgd.scheduler.syncs}
    if out:
        report("ckpt_resume", fixed=out)
        return
    # Adaptive: decisions depend on measured time, so C is compared with what B's saved
    # scheduler state decides from the very inputs C's scheduler was given.
    cfg = _ckpt_config("adaptive", "C", "adaptive")
    model, opt, restored, calls = _ckpt_run("adaptive", cfg, ADAPT_N, resume_from=ADAPT_SAVE, spy=True)
    saved = torch.load(_ckpt_path("adaptive", ADAPT_SAVE), weights_only=False)["optimizer"]["alsgd"]
    real = opt.alsgd.scheduler
    twin = Scheduler(load_config({**cfg, "log": None}), opt.alsgd.topology, RANK, real.param_bytes,
                     can_overlap=real.can_overlap, uneven_steps=real.uneven_steps)
    twin.load_state_dict(saved)
    twin_decisions, plan, same_plans = [], None, True
    for call in calls:
        if call[0] == "step":
            if plan is not None:
                same_plans = False  # the real scheduler did not sync where the twin said to
            plan = twin.step_done(call[1], lr=call[2])
        else:
            same_plans &= plan is not None and plan.level == call[1]
            result = twin.complete_sync(plan, call[2], call[3], **call[4])
            if result.decision is not None:
                twin_decisions.append([result.decision, list(result.periods)])
            plan = None
    real_log = read_log(os.path.join(CASE_DIR, f"log.adaptive.C.{RANK}.jsonl"))
    real_decisions = [[r["decision"], r["periods"]] for r in real_log if "decision" in r]
    twin_state, real_state = twin.state_dict(), real.state_dict()
    report("ckpt_resume", adaptive={
        "restored": restored, "same_plans": same_plans, "steps_fed": sum(c[0] == "step" for c in calls),
        "twin_decisions": twin_decisions, "real_decisions": real_decisions,
        "same_final_state": twin_state == real_state,
        "differing_keys": sorted(k for k in real_state if twin_state[k] != real_state[k])})


# -- blocks that end apart: Horovod's exit shutdown is global --------------------------------------
def uneven_end():
    """2x2, fixed periods [2, 1000] (after step 0, only block syncs): block (2, 3) is 3 s late
    for its last sync, block (0, 1) leaves the loop and exits at once (no global collective
    after the loop). Without the integration's exit barrier, rank 0's exit shuts Horovod down
    under block (2, 3)'s sync."""
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters(),
                                     config={"policy": "fixed", "periods": [2, 1000],
                                             "topology": "2x2", "warmup": 0})
    for step, (x, y) in enumerate(batches(10, seed=3), start=1):
        if step == 10 and RANK >= 2:
            time.sleep(3.0)
        train_step(model, opt, x, y)
    report("uneven_end", syncs=opt.alsgd.scheduler.syncs, t=time.time())


def crash_in_block():
    """2x2 as above, rank 3 raises at step 6 while rank 0 trains on: the job must end with
    Horovod's error promptly (the exit barrier is skipped after an uncaught exception)."""
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters(),
                                     config={"policy": "fixed", "periods": [2, 4],
                                             "topology": "2x2", "warmup": 0})
    print(f"MARK crash_in_block {RANK} {time.time():.6f}", flush=True)
    for step, (x, y) in enumerate(batches(100000, seed=3), start=1):
        if step == 6 and RANK == 3:
            raise RuntimeError("injected failure on rank 3")
        train_step(model, opt, x, y)
        time.sleep(0.01)


# -- item 3: no deadlock under noise (emulated cluster) -------------------------------------------
def noise():
    """Adaptive policy, 5,000 steps, random per-rank sleeps; the link changes speed mid-run
    (the test drives the emulated cluster)."""
    steps = int(os.environ.get("REL_STEPS", "5000"))
    path = os.path.join(CASE_DIR, "noise.{rank}.jsonl")
    model = make_model(width=128, inputs=64)  # 8.7k parameters, 35 KB per sync
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.02),
                                     named_parameters=model.named_parameters(),
                                     config={"log": path, "warmup": 50, "max_period": 16})
    rng = random.Random(1000 + RANK)
    start = time.time()
    for x, y in batches(steps, seed=5, inputs=64):
        time.sleep(0.02 if rng.random() < 0.02 else rng.uniform(0.0, 0.003))
        train_step(model, opt, x, y)
    opt.average_now()
    wall = time.time() - start
    g = gathered(flat(model.parameters()))
    report("noise", steps=opt.alsgd.scheduler.step, wall_s=wall, start=start,
           periods=list(opt.alsgd.scheduler.periods), syncs=opt.alsgd.scheduler.syncs,
           log=path.replace("{rank}", str(RANK)), final_identical=bool((g - g[0]).abs().max() == 0))


if __name__ == "__main__":
    for name in sys.argv[1:]:
        globals()[name]()
