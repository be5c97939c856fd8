"""PyTorch integration cases, run under horovodrun: ``python cases.py CASE [CASE ...]``.

Each case prints ``RESULT <case> <json>`` on every rank; tests/test_torch.py asserts on them.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
import warnings

import horovod.torch as hvd
import torch
import torch.nn as nn

import adaptive_lsgd.integrations.torch as alsgd  # before hvd.init(): dynamic process sets
from adaptive_lsgd import ConfigError

hvd.init()
torch.set_num_threads(1)
RANK, SIZE = hvd.rank(), hvd.size()


def report(case: str, **values) -> None:
    print(f"RESULT {case} " + json.dumps({"rank": RANK, **values}), flush=True)


def make_model(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def batches(n: int, seed: int, rank: int = RANK):
    """Rank-specific data, reproducible from (seed, rank)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    for _ in range(n):
        x = torch.randn(16, 8, generator=g)
        yield x, (x[:, 0] * 3).long().clamp(-1, 1) + 1


def flat(model_or_tensors) -> torch.Tensor:
    ts = model_or_tensors.parameters() if isinstance(model_or_tensors, nn.Module) else model_or_tensors
    return torch.cat([t.detach().reshape(-1) for t in ts])


_GATHERS = [0]


def gathered(t: torch.Tensor) -> torch.Tensor:
    """(size, n): every rank's copy. Named (a user's collectives need not be: the chained cases
    also run unnamed ones)."""
    _GATHERS[0] += 1
    return hvd.allgather(t.unsqueeze(0).clone(), name=f"test.gather.{_GATHERS[0]}")


def train_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


# -- cases ------------------------------------------------------------------------------------
def minibatch_equals_horovod():
    """Warm-up covering the run: parameters equal hvd.DistributedOptimizer's after 50 steps."""
    ref = make_model()
    ours = make_model()
    ref_opt = hvd.DistributedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9),
                                       named_parameters=[("ref." + n, p) for n, p in ref.named_parameters()])
    our_opt = alsgd.DistributedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9),
                                         named_parameters=ours.named_parameters(),
                                         config={"warmup": 10_000})
    for x, y in batches(50, seed=1):
        train_step(ref, ref_opt, x, y)
        train_step(ours, our_opt, x, y)
    spread = gathered(flat(ours))
    report("minibatch_equals_horovod", max_diff=float((flat(ref) - flat(ours)).abs().max()),
           moved=float((flat(ours) - flat(make_model())).abs().max()),
           rank_spread=float((spread - spread[0]).abs().max()),
           phase=our_opt.alsgd.scheduler.phase, steps=our_opt.alsgd.scheduler.step)


def reference_pair(config: dict) -> tuple:
    """Two equal BatchNorm models: one with plain SGD (momentum) for a reference written in the
    case, one with our optimizer and ``config``: ``(ref, ref_opt, ours, our_opt)``."""
    ref, ours = make_model(bn=True), make_model(bn=True)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    our_opt = alsgd.DistributedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9),
                                         named_parameters=ours.named_parameters(), model=ours,
                                         config=config)
    return ref, ref_opt, ours, our_opt


def fixed_h4_equals_reference():
    """Fixed H=4 from step 0 equals plain local SGD + exact model average (written here)."""
    H, steps = 4, 40
    ref, ref_opt, ours, our_opt = reference_pair({"policy": "fixed", "periods": [H], "warmup": 0})
    identical_after_sync, differ_between = [], []
    for step, (x, y) in enumerate(batches(steps, seed=2), start=1):
        train_step(ref, ref_opt, x, y)
        if step % H == 0:
            with torch.no_grad():
                for t in list(ref.parameters()) + [b for b in ref.buffers() if b.is_floating_point()]:
                    t.copy_(hvd.allreduce(t, op=hvd.Average))
        train_step(ours, our_opt, x, y)
        state = flat(list(ours.parameters()) + [b for b in ours.buffers() if b.is_floating_point()])
        g = gathered(state)
        same = bool((g - g[0]).abs().max() == 0)
        (identical_after_sync if step % H == 0 else differ_between).append(same)
    report("fixed_h4_equals_reference", max_diff=float((flat(ref) - flat(ours)).abs().max()),
           buffer_diff=float(max((a - b).abs().max() for a, b in zip(ref.buffers(), ours.buffers())
                                 if a.is_floating_point())),
           identical_after_sync=identical_after_sync, identical_between=differ_between,
           syncs=our_opt.alsgd.scheduler.syncs)


def peer_periodic_model_averager():
    """Same seeds, data and H as torch.distributed's PeriodicModelAverager over Gloo."""
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    port = hvd.broadcast_object(_free_port() if RANK == 0 else None, root_rank=0, name="port")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=RANK, world_size=SIZE)
    H, steps = 4, 30
    peer = make_model()
    ours = make_model()
    peer_opt = torch.optim.SGD(peer.parameters(), lr=0.05, momentum=0.9)
    averager = PeriodicModelAverager(period=H, warmup_steps=H - 1)  # averages after steps H, 2H, ...
    our_opt = alsgd.DistributedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9),
                                         named_parameters=ours.named_parameters(),
                                         config={"policy": "fixed", "periods": [H]})
    for x, y in batches(steps, seed=3):
        train_step(peer, peer_opt, x, y)
        averager.average_parameters(peer.parameters())
        train_step(ours, our_opt, x, y)
    dist.destroy_process_group()
    report("peer_periodic_model_averager", max_diff=float((flat(peer) - flat(ours)).abs().max()),
           syncs=our_opt.alsgd.scheduler.syncs)


def hierarchical_2x2(chained: bool = False):
    """Topology override 2x2, periods [2, 3]: blocks average every 2 steps, all every 6 (chained:
    the sliced sync, reduce-scatter in the block, allreduce across, allgather back). A global
    allgather after every step interleaves with the block and cross-host process sets; chained,
    an *unnamed* allreduce too (Horovod names it by the count of operations this process
    enqueued: it matches only if every rank enqueued as many)."""
    case = "hierarchical_2x2_chained" if chained else "hierarchical_2x2"
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                     named_parameters=model.named_parameters(),
                                     config={"topology": "2x2", "policy": "fixed", "periods": [2, 3],
                                             "chained_allreduce": chained})
    rows = []
    for step, (x, y) in enumerate(batches(24, seed=4), start=1):
        train_step(model, opt, x, y)
        g = gathered(flat(model))
        unnamed = float(hvd.allreduce(torch.ones(1), op=hvd.Sum)) if chained else float(SIZE)
        rows.append({"step": step, "unnamed_sum": unnamed,
                     "block0_same": bool(torch.equal(g[0], g[1])),
                     "block1_same": bool(torch.equal(g[2], g[3])),
                     "all_same": bool(all(torch.equal(g[0], g[r]) for r in range(SIZE)))})
    report(case, rows=rows, syncs=opt.alsgd.scheduler.syncs, model=flat(model).tolist(),
           sliced=opt.alsgd.topology.sliced, levels=opt.alsgd.topology.describe()["levels"],
           process_sets=sorted(list(k) for k in opt.alsgd.process_sets))


def hierarchical_2x2_chained():
    hierarchical_2x2(chained=True)


def chained_auto():
    """``chained_allreduce: auto`` (the default) in a 2x2 topology, one rank sleeping randomly,
    with the switching bar lowered to 0 (``policies.CHAINED_MIN_GAIN``: on loopback the sliced
    sync is rarely cheaper): the scheduler switches between one allreduce over all ranks and
    the sliced chained sync at top-level syncs, the same on every rank, with the slices'
    process sets registered up front; an unnamed allreduce after each step still matches."""
    from adaptive_lsgd import policies

    bar, policies.CHAINED_MIN_GAIN = policies.CHAINED_MIN_GAIN, 0.0
    path = os.path.join(os.environ["CASE_DIR"], "chained_auto.{rank}.jsonl")
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.02),
                                     named_parameters=[("ca." + n, p) for n, p in model.named_parameters()],
                                     config={"log": path, "topology": "2x2", "warmup": 20,
                                             "max_period": 4, "target_comm_fraction": 0.05,
                                             "overlap": False})
    sched = opt.alsgd.scheduler
    rng = random.Random(RANK)
    forms, unnamed = [], []
    for x, y in batches(400, seed=23):
        if RANK == 1:
            time.sleep(rng.choice([0, 0, 0, 0.001, 0.004]))
        train_step(model, opt, x, y)
        forms.append(sched.chained_form)
        unnamed.append(float(hvd.allreduce(torch.ones(1), op=hvd.Sum)))
    opt.average_now()
    policies.CHAINED_MIN_GAIN = bar
    g = gathered(flat(model))
    report("chained_auto", steps=sched.step, forms=forms, unnamed=sorted(set(unnamed)),
           log=path.replace("{rank}", str(RANK)), mechanisms=sched.decision.mechanisms,
           why=sched.decision.why["chained"], process_sets=sorted(list(k) for k in opt.alsgd.process_sets),
           final_identical=bool((g - g[0]).abs().max() == 0), summary=alsgd.summary(opt))


def overlap_instead_of_chained():
    """The default config in a 2x2 topology where one allreduce over all ranks (a few ms)
    hides behind a round of 10 ms steps: ``overlap: auto`` overlaps it instead of taking the
    (blocking) sliced chained sync, the same on every rank under one rank's random sleeps.
    Both switching bars are lowered (on loopback the sliced sync is rarely cheaper, and the
    averages cost little): the choice between the two forms is what is checked."""
    from adaptive_lsgd import policies

    bars = policies.CHAINED_MIN_GAIN, policies.OVERLAP_MIN_GAIN
    policies.CHAINED_MIN_GAIN, policies.OVERLAP_MIN_GAIN = 0.0, 1.0
    path = os.path.join(os.environ["CASE_DIR"], "ov_chained.{rank}.jsonl")
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.02),
                                     named_parameters=[("oc." + n, p) for n, p in model.named_parameters()],
                                     config={"log": path, "topology": "2x2", "warmup": 10,
                                             "max_period": 8, "target_comm_fraction": 0.01})
    sched = opt.alsgd.scheduler
    rng = random.Random(RANK)
    forms, inflight = [], 0
    for x, y in batches(160, seed=29):
        time.sleep(0.01 + (rng.choice([0, 0, 0, 0.001, 0.004]) if RANK == 1 else 0))
        train_step(model, opt, x, y)
        forms.append(sched.chained_form)
        inflight += opt._alsgd_inflight is not None
    opt.average_now()
    policies.CHAINED_MIN_GAIN, policies.OVERLAP_MIN_GAIN = bars
    g = gathered(flat(model))
    report("overlap_instead_of_chained", steps=sched.step, forms=forms, inflight=inflight,
           log=path.replace("{rank}", str(RANK)), mechanisms=sched.decision.mechanisms,
           why=sched.decision.why, final_identical=bool((g - g[0]).abs().max() == 0))


def adaptive_noise(overlap: bool = False):
    """Adaptive policy, 2,000 steps (overlap: 600), one rank sleeping randomly: no hang,
    identical logs."""
    case, steps = ("overlap_adaptive_noise", 600) if overlap else ("adaptive_noise", 2000)
    path = os.path.join(os.environ["CASE_DIR"], ("overlap" if overlap else "noise") + ".{rank}.jsonl")
    model = make_model()
    config = {"log": path, "warmup": 20 if overlap else 50, "max_period": 16,
              "target_comm_fraction": 0.05}
    if overlap:
        config.update(overlap=True, topology="flat")
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.02),
                                     named_parameters=model.named_parameters(), config=config)
    rng = random.Random(RANK)
    for x, y in batches(steps, seed=10 if overlap else 5):
        if RANK == 1:
            time.sleep(rng.choice([0, 0, 0, 0.001, 0.004]))
        train_step(model, opt, x, y)
    opt.average_now()
    g = gathered(flat(model))
    report(case, steps=opt.alsgd.scheduler.step, periods=list(opt.alsgd.scheduler.periods),
           syncs=opt.alsgd.scheduler.syncs, log=path.replace("{rank}", str(RANK)),
           final_identical=bool((g - g[0]).abs().max() == 0), summary=alsgd.summary(opt))


def overlap_adaptive_noise():
    """``overlap: true``: the same with 600 steps, each average applied a round late."""
    adaptive_noise(overlap=True)


def optimizer_api():
    """zero_grad(set_to_none=True), LR scheduler, broadcast_optimizer_state, param groups,
    state_dict round trip carrying the scheduler, momentum policies, BatchNorm buffers."""
    model = make_model(seed=RANK, bn=True)  # different inits: broadcast must align them
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05},
                           {"params": list(model[1].parameters()) + list(model[3].parameters())}],
                          lr=0.1, momentum=0.9)
    opt = alsgd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), model=model,
                                     config={"policy": "fixed", "periods": [3], "warmup": 6,
                                             "momentum": "average"})
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for x, y in batches(12, seed=6):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    state = opt.state_dict()
    path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    torch.save(state, path)
    loaded = torch.load(path, weights_only=False)
    groups = [{"params": model[0].parameters(), "lr": 0.05},
              {"params": list(model[1].parameters()) + list(model[3].parameters())}]
    opt2 = alsgd.DistributedOptimizer(torch.optim.SGD(groups, lr=0.1, momentum=0.9),
                                      named_parameters=model.named_parameters(), model=model,
                                      config={"policy": "fixed", "periods": [3], "warmup": 6,
                                              "momentum": "average"})
    opt2.load_state_dict(loaded)
    moms = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    g_mom = gathered(flat(moms))
    g_buf = gathered(flat([b for b in model.buffers() if b.is_floating_point()]))
    report("optimizer_api", lrs=[g["lr"] for g in opt.param_groups],
           phase=opt.alsgd.scheduler.phase, step=opt.alsgd.scheduler.step,
           restored_step=opt2.alsgd.scheduler.step, restored_phase=opt2.alsgd.scheduler.phase,
           restored_syncs=opt2.alsgd.scheduler.syncs,
           momentum_identical=bool((g_mom - g_mom[0]).abs().max() == 0),
           buffers_identical=bool((g_buf - g_buf[0]).abs().max() == 0),
           grads_none=all(p.grad is None for p in model.parameters()))


def first_lr_decay():
    """warmup 'first_lr_decay': mini-batch until the LR first drops, then local SGD."""
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters(),
                                     config={"warmup": "first_lr_decay", "policy": "fixed",
                                             "periods": [4]})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[7], gamma=0.1)
    for x, y in batches(15, seed=7):
        train_step(model, opt, x, y)
        sched.step()
    report("first_lr_decay", switch_step=opt.alsgd.scheduler.switch_step,
           phase=opt.alsgd.scheduler.phase, syncs=opt.alsgd.scheduler.syncs)


def time_budget():
    """Mixed-speed mode: the slow rank takes fewer local steps per round; one collective per
    round on every rank; the average is weighted by steps."""
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.02),
                                     named_parameters=model.named_parameters(),
                                     config={"policy": "fixed", "periods": [4], "time_budget": True,
                                             "timing_warmup": 0})
    sched = opt.alsgd.scheduler
    steps = 0
    rounds = 0
    while rounds < 12:
        x, y = next(batches(1, seed=8 + steps))
        if RANK == 1:  # 8x slower: a clear ratio even when a loaded machine adds ms per step
            time.sleep(0.040)
        else:
            time.sleep(0.005)
        before = sum(sched.syncs)
        train_step(model, opt, x, y)
        steps += 1
        rounds += sum(sched.syncs) - before
    g = gathered(flat(model))
    report("time_budget", steps=steps, rank_steps=sched.rank_steps,
           identical=bool((g - g[0]).abs().max() == 0))


def polite_wait():
    """Rank 1 reaches the average 1.5 s late: rank 0 waits in it. Horovod's own synchronize
    spins (sched_yield) for all that time; the integration's wait sleeps. The CPU time of the
    waiting thread itself (Horovod's own threads excluded) says which."""
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.02),
                                     named_parameters=model.named_parameters(),
                                     config={"policy": "fixed", "periods": [1000]})
    train_step(model, opt, *next(batches(1, seed=9)))
    hvd.allreduce(torch.zeros(1), name="test.polite.barrier")
    cpu, wall = time.thread_time(), time.perf_counter()
    if RANK == 1:
        time.sleep(1.5)
    opt.average_now()
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    g = gathered(flat(model))
    report("polite_wait", cpu_s=cpu, wall_s=wall, identical=bool((g - g[0]).abs().max() == 0))


def _averaged_state(model):
    """What a sync averages: the parameters and the floating buffers."""
    return list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]


def overlap_h4_equals_reference():
    """``overlap: true``, fixed H=4, momentum, BatchNorm: equals local SGD written here, where
    the average of the models at a round's end is applied at the next round's end as
    ``x <- x + pull * (average - x at the round's end)``: ``overlap_pull: 1`` (the whole
    correction) with the checks below, then the default pull (0.5)."""
    default_diff, _, _, _, first = _overlap_run(None)
    default_pull = first.alsgd.scheduler.config.overlap_pull
    first.average_now()
    diff, identical, syncs_seen, ours, our_opt = _overlap_run(1.0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        our_opt.state_dict()  # an average is in flight: the checkpoint would miss it
    warned = any("in flight" in str(w.message) for w in caught)
    our_opt.average_now()
    g = gathered(flat(_averaged_state(ours)))
    os.environ["HOROVOD_ELASTIC"] = "1"  # refused before any collective: an elastic job
    try:
        alsgd.DistributedOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1),
                                   config={"overlap": True})
        elastic_error = None
    except ConfigError as exc:
        elastic_error = str(exc)
    finally:
        del os.environ["HOROVOD_ELASTIC"]
    report("overlap_h4_equals_reference", max_diff=diff, identical_between=identical,
           syncs_seen=syncs_seen, syncs_after_average=our_opt.alsgd.scheduler.syncs,
           final_identical=bool((g - g[0]).abs().max() == 0), warned=warned,
           elastic_error=elastic_error, default_pull_diff=default_diff,
           default_pull=default_pull)


def _overlap_run(pull):
    """40 steps at H=4 with overlap (``overlap_pull``: ``pull``, None for the default) and the
    reference beside them: ``(max diff, identical per step, syncs per step, model, optimizer)``."""
    H, steps = 4, 40
    config = {"policy": "fixed", "periods": [H], "overlap": True}
    if pull is not None:
        config["overlap_pull"] = pull
    ref, ref_opt, ours, our_opt = reference_pair(config)
    factor = 0.5 if pull is None else pull

    pending = None  # (snapshot, average) of the reference
    identical, syncs_seen = [], []
    for step, (x, y) in enumerate(batches(steps, seed=9), start=1):
        train_step(ref, ref_opt, x, y)
        if step % H == 0:
            with torch.no_grad():
                if pending is not None:
                    for t, snap, avg in zip(_averaged_state(ref), *pending):
                        t.add_(factor * (avg - snap))
                snap = [t.detach().clone() for t in _averaged_state(ref)]
                pending = (snap, [hvd.allreduce(t, op=hvd.Average) for t in snap])
        train_step(ours, our_opt, x, y)
        g = gathered(flat(_averaged_state(ours)))
        identical.append(bool((g - g[0]).abs().max() == 0))
        syncs_seen.append(our_opt.alsgd.scheduler.syncs[0])
    diff = float((flat(_averaged_state(ref)) - flat(_averaged_state(ours))).abs().max())
    return diff, identical, syncs_seen, ours, our_opt


def process_sets():
    """``process_set`` as Horovod's: sets [0, 3] and [1, 2]. An optimizer over the first set
    built on every rank: its mini-batch phase equals hvd.DistributedOptimizer's over that set,
    the even ranks average among themselves, the odd ranks step as plain local SGD. One
    optimizer per rank's own set: each set averages inside itself only. A hierarchy inside a
    set is refused before any collective."""
    even = hvd.add_process_set([0, 3])  # "even": the set the shared optimizer works over
    odd = hvd.add_process_set([1, 2])
    mine = even if RANK in (0, 3) else odd
    # a hierarchy of ours over ranks the script registered itself reuses the script's set
    reused = [alsgd.process_set_for(r).process_set_id for r in ((0, 3), (1, 2))]
    registered = [even.process_set_id, odd.process_set_id]
    cfg = {"policy": "fixed", "periods": [2], "warmup": 4}
    ref, ours, plain = make_model(seed=RANK), make_model(seed=RANK), make_model(seed=RANK)
    def names(prefix, model):
        return [(prefix + n, p) for n, p in model.named_parameters()]

    ref_opt = hvd.DistributedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1),
                                       named_parameters=names("ps.ref.", ref), process_set=even)
    our_opt = alsgd.DistributedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.1),
                                         named_parameters=names("ps.ours.", ours),
                                         process_set=even, config=cfg)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    data = list(batches(8, seed=7))
    for x, y in data[:4]:  # the mini-batch phase
        train_step(ref, ref_opt, x, y)
        train_step(ours, our_opt, x, y)
    minibatch_diff = float((flat(ref) - flat(ours)).abs().max())
    for x, y in data[:4]:
        train_step(plain, plain_opt, x, y)
    plain_diff_mb = float((flat(plain) - flat(ours)).abs().max())
    for x, y in data[4:]:
        train_step(ours, our_opt, x, y)
    g = gathered(flat(ours))
    member = even.included()
    try:
        figures = alsgd.summary(our_opt) if member else None
        not_member_error = None
    except RuntimeError as exc:
        figures, not_member_error = None, str(exc)
    if not member:
        try:
            _ = our_opt.alsgd
        except RuntimeError as exc:
            not_member_error = str(exc)
    own = make_model(seed=RANK)
    own_opt = alsgd.DistributedOptimizer(torch.optim.SGD(own.parameters(), lr=0.1),
                                         named_parameters=names("ps.own.", own), process_set=mine,
                                         config={"policy": "fixed", "periods": [3], "warmup": 0})
    for x, y in batches(6, seed=8):
        train_step(own, own_opt, x, y)
    g_own = gathered(flat(own))
    try:
        alsgd.DistributedOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1),
                                   process_set=mine, config={"topology": "2x1"})
        hierarchy_error = None
    except ValueError as exc:
        hierarchy_error = str(exc)
    report("process_sets", member=member, reused_ids=reused == registered, minibatch_diff=minibatch_diff,
           plain_diff_minibatch=plain_diff_mb,
           same_as={r: bool((g[r] == g[RANK]).all()) for r in range(SIZE)},
           own_same_as={r: bool((g_own[r] == g_own[RANK]).all()) for r in range(SIZE)},
           summary_ranks=None if figures is None else figures.get("ranks"),
           summary_steps=None if figures is None else figures.get("steps"),
           own_steps=own_opt.alsgd.scheduler.step, own_syncs=own_opt.alsgd.scheduler.syncs,
           not_member_error=not_member_error, hierarchy_error=hierarchy_error)


def start_from_one_model():
    """Ranks initialised differently and no broadcast: the first average is rank 0's model
    (what rank 0 reached, recomputed here), not a mix of initialisations; the next ones are
    averages. After a broadcast the first sync is an average."""
    out = {}
    for broadcast in (False, True):
        model = make_model(seed=100 + RANK)
        opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         named_parameters=[(f"origin{broadcast}.{n}", p)
                                                           for n, p in model.named_parameters()],
                                         config={"policy": "fixed", "periods": [2]})
        if broadcast:
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        rank0 = make_model(seed=100)  # rank 0's first round, recomputed on every rank
        rank0_opt = torch.optim.SGD(rank0.parameters(), lr=0.1)
        data, data0 = list(batches(4, seed=11)), list(batches(4, seed=11, rank=0))
        for x, y in data0[:2]:
            train_step(rank0, rank0_opt, x, y)
        for x, y in data[:2]:
            train_step(model, opt, x, y)
        after_first = gathered(flat(model))
        first_equals_rank0 = bool((after_first[RANK] == flat(rank0)).all())
        for x, y in data0[2:]:  # rank 0 alone for the second round
            train_step(rank0, rank0_opt, x, y)
        for x, y in data[2:]:
            train_step(model, opt, x, y)
        after_second = gathered(flat(model))
        out[str(broadcast)] = {
            "first_equals_rank0": first_equals_rank0,
            "first_identical": bool((after_first - after_first[0]).abs().max() == 0),
            "second_identical": bool((after_second - after_second[0]).abs().max() == 0),
            "second_equals_rank0_alone": bool((after_second[RANK] == flat(rank0)).all()),
            "origin_pending": opt.alsgd.scheduler.origin_pending,
        }
    report("start_from_one_model", **out)


def auto_mechanisms():
    """The default config (time_budget: auto) in a stream loop (allow_uneven_steps), every
    rank's step time noisy, the last rank 2.5x slower from round 30 on: time-budget rounds
    engage by themselves, the same on every rank, and the log says why."""
    path = os.path.join(os.environ["CASE_DIR"], "auto.{rank}.jsonl")
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.02),
                                     named_parameters=model.named_parameters(),
                                     config={"log": path})
    alsgd.allow_uneven_steps(opt)
    sched = opt.alsgd.scheduler
    rng = random.Random(RANK)
    data = batches(100000, seed=21)
    rounds = steps = 0
    while rounds < 70:
        slow = 2.5 if RANK == SIZE - 1 and rounds >= 30 else 1.0
        # 20 ms steps: 4 processes on a loaded 2-core machine add ms of real skew per step
        time.sleep(0.02 * slow * rng.uniform(0.8, 1.2))
        before = sum(sched.syncs)
        train_step(model, opt, *next(data))
        steps += 1
        rounds += sum(sched.syncs) - before
    opt.average_now()
    g = gathered(flat(model))
    report("auto_mechanisms", steps=steps, rank_steps=sched.rank_steps,
           mechanisms=sched.decision.mechanisms, log=path.replace("{rank}", str(RANK)),
           final_identical=bool((g - g[0]).abs().max() == 0), summary=alsgd.summary(opt))


def overlap_auto():
    """The default config (overlap: auto) with a model whose average costs far more than its
    steps (4M parameters, tiny steps, periods capped at 4): overlapped averages engage by
    themselves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2000), nn.ReLU(), nn.Linear(2000, 2000), nn.ReLU(),
                          nn.Linear(2000, 3))
    path = os.path.join(tempfile.mkdtemp(), "overlap_auto.jsonl")
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                     named_parameters=model.named_parameters(),
                                     config={"log": path, "max_period": 4})
    sched = opt.alsgd.scheduler
    seen_inflight = 0
    for x, y in batches(160, seed=22):
        train_step(model, opt, x, y)
        seen_inflight += opt._alsgd_inflight is not None
    opt.average_now()
    g = gathered(flat(model))
    records = []
    if RANK == 0:
        with open(path) as fh:
            records = [json.loads(line) for line in fh]
    report("overlap_auto", mechanisms=sched.decision.mechanisms, why=sched.decision.why,
           seen_inflight=seen_inflight, periods=list(sched.periods),
           switches=[r for r in records if "mechanism_reason" in r],
           final_identical=bool((g - g[0]).abs().max() == 0))


# -- outer optimizer and compression ------------------------------------------------------------
OUTER_LR, OUTER_MU = 0.7, 0.9
_WIRE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _reference_sync(rows: torch.Tensor, prev, buf, compression: str, outer: str):
    """The global sync written out: rows are every rank's parameters (fp32). Returns (new, buf)."""
    if prev is None:
        return rows.mean(0), None
    if compression == "none":
        avg = rows.sum(0) / rows.shape[0]
    else:
        total = torch.zeros_like(prev)
        for row in rows:  # each rank's update rounded; summed in float32 in rank order
            total = total + (row - prev).to(_WIRE[compression]).float()
        avg = total.to(_WIRE[compression]).float() * (1.0 / rows.shape[0]) + prev
    if outer == "none":
        return avg, None
    g = prev - avg
    buf = g if buf is None else OUTER_MU * buf + g
    update = g + OUTER_MU * buf if outer == "nesterov" else buf
    return prev - OUTER_LR * update, buf


def _outer_run(config: dict, steps: int, seed: int):
    """Our optimizer and a reference (plain SGD + the sync written out) side by side."""
    model, ref = make_model(), make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                     named_parameters=model.named_parameters(), config=config)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    topo = opt.alsgd.topology
    prev = buf = None
    worst, globals_ = 0.0, 0
    for x, y in batches(steps, seed=seed):
        train_step(model, opt, x, y)
        train_step(ref, ref_opt, x, y)
        syncs = opt.alsgd.scheduler.syncs
        level = None
        if sum(syncs) > _outer_run.seen:
            _outer_run.seen = sum(syncs)
            level = max(lvl for lvl in range(len(syncs)) if syncs[lvl] > _outer_run.last[lvl])
        _outer_run.last = list(syncs)
        if level is not None:
            rows = gathered(flat(ref))
            if level < topo.num_levels - 1:
                block = list(topo.block_of(level, RANK))
                mine = rows[block].mean(0)
            else:
                mine, buf = _reference_sync(rows, prev, buf, config.get("compression", "none"),
                                            config.get("outer_optimizer", "none"))
                prev = mine.clone()
                globals_ += 1
            torch.nn.utils.vector_to_parameters(mine.clone(), ref.parameters())
        worst = max(worst, float((flat(ref) - flat(model)).abs().max()))
    g = gathered(flat(model))
    outer = opt.alsgd.scheduler.outer
    return {"max_diff": worst, "globals": globals_, "outer_steps": getattr(outer, "steps", None),
            "identical": bool((g - g[0]).abs().max() == 0), "model": flat(model)}


def outer_reference():
    """Outer Nesterov / SGD and fp16 / bf16 syncs against the reference written above, flat
    and (4 ranks) hierarchical 2x2, fixed periods."""
    configs = [("nesterov", "none", "flat", False), ("sgd", "none", "flat", False),
               ("nesterov", "bf16", "flat", False), ("none", "fp16", "flat", False),
               ("none", "none", "flat", False)]
    if SIZE == 4:
        configs += [("nesterov", "none", "2x2", False), ("nesterov", "bf16", "2x2", False),
                    ("nesterov", "none", "2x2", "sliced"), ("nesterov", "none", "2x2", "leaders")]
    out = {}
    for outer, comp, topo, chained in configs:
        periods = [3] if topo == "flat" else [2, 3]
        _outer_run.seen, _outer_run.last = 0, [0] * len(periods)
        res = _outer_run({"policy": "fixed", "periods": periods, "topology": topo,
                          "chained_allreduce": chained, "outer_optimizer": outer,
                          "compression": comp, "outer_lr": OUTER_LR, "outer_momentum": OUTER_MU},
                         steps=24, seed=21)
        out[f"{outer}/{comp}/{topo}/{chained}"] = res
    plain = out["none/none/flat/False"]["model"]
    report("outer_reference", **{k: {**{kk: vv for kk, vv in v.items() if kk != "model"},
                                     "vs_plain": float((v["model"] - plain).abs().max())}
                                 for k, v in out.items()})


def outer_noise_and_resume():
    """Adaptive periods with Nesterov + bf16 while rank 1 sleeps randomly: every rank takes the
    same decisions and ends with the same model. Then (fixed periods) a checkpoint taken
    mid-round and loaded into a fresh model and optimizer continues to the bit as the
    uninterrupted run."""
    import copy
    import zlib

    config = {"outer_optimizer": "nesterov", "compression": "bf16", "max_period": 8,
              "target_comm_fraction": 0.05, "window": 4, "timing_warmup": 0}
    model = make_model()
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.02),
                                     named_parameters=model.named_parameters(), config=config)
    rng = random.Random(RANK)
    for x, y in batches(300, seed=22):
        if RANK == 1:
            time.sleep(rng.choice([0, 0, 0.001, 0.003]))
        train_step(model, opt, x, y)
    opt.average_now()
    sched = opt.alsgd.scheduler
    digest = zlib.crc32(json.dumps([sched.periods, sched.syncs, sched.outer.steps,
                                    sched.global_syncs]).encode())
    rows = gathered(torch.tensor([float(digest % 1000003)]))
    g = gathered(flat(model))
    noise = {"same_decisions": bool((rows == rows[0]).all()),
             "identical": bool((g - g[0]).abs().max() == 0), "outer_steps": sched.outer.steps,
             "syncs": sched.syncs}

    fixed = {"policy": "fixed", "periods": [4], "outer_optimizer": "nesterov",
             "compression": "bf16"}
    data = list(batches(64, seed=23))

    def fresh(seed, prefix):
        m = make_model(seed=seed)
        o = alsgd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                                       named_parameters=[(prefix + n, p) for n, p
                                                         in m.named_parameters()], config=fixed)
        return m, o

    model, opt = fresh(0, "whole.")
    for i, (x, y) in enumerate(data):
        train_step(model, opt, x, y)
        if i == 29:  # 30 steps: 7 syncs (6 outer steps) and 2 local steps into a round
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    other, other_opt = fresh(7, "resumed.")
    other.load_state_dict(saved[0])
    other_opt.load_state_dict(saved[1])
    for x, y in data[30:]:
        train_step(other, other_opt, x, y)
    report("outer_noise_and_resume", noise=noise,
           resumed_diff=float((flat(other) - flat(model)).abs().max()),
           outer_steps=opt.alsgd.scheduler.outer.steps,
           resumed_outer_steps=other_opt.alsgd.scheduler.outer.steps,
           saved_outer_steps=saved[1]["alsgd"]["outer_state"]["steps"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    for name in sys.argv[1:]:
        globals()[name]()
