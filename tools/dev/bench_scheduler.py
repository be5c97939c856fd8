"""Benchmark of the scheduler's cost per local step (not a timed test).

One rank's :class:`~adaptive_lsgd.Scheduler` with a realistic config (adaptive policy, links
and compute times that make it settle around H = 8) runs many local steps; every H-th step
it builds its payload, gets a reduced payload back (this rank's row copied into every slot,
as if all ranks measured the same) and completes the sync, so the cost of syncs and of the
decisions they take is amortised over the steps. Prints the median microseconds per local
step over several repeats; the goal is at most 20.

The figure is CPU time of this process (``time.process_time``): what the scheduler costs a
training rank. Wall-clock time is printed too; on a machine shared with other jobs it also
counts the time this process waited for a core, so it can be several times larger.

    python tools/dev/bench_scheduler.py [--ranks 8] [--topology 2x4] [--steps 20000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from adaptive_lsgd import Scheduler, Topology, load_config  # noqa: E402

GOAL_US = 20.0


def build(args):
    config = {"policy": "adaptive", "target_comm_fraction": 0.1}
    log_dir = None
    if args.log:
        log_dir = tempfile.mkdtemp(prefix="alsgd-bench-")
        config["log"] = os.path.join(log_dir, "decisions.jsonl")
    cfg = load_config(config, env={})
    topo = Topology.from_spec(args.topology or "flat", args.ranks)
    sched = Scheduler(cfg, topo, rank=0, param_bytes=4 * 25_000_000)
    rng = np.random.default_rng(args.seed)
    n = args.steps
    # Compute 50 ms +- 5%; a global sync of ~40 ms, so the policy settles at H = 8.
    compute = (0.05 * (1 + 0.05 * rng.standard_normal(n))).tolist()
    per_level = [0.004] * (topo.num_levels - 1) + [0.036]
    stage_noise = (1 + 0.05 * rng.random(n)).tolist()
    return sched, topo, compute, per_level, stage_noise, log_dir


def run_steps(sched, topo, compute, per_level, stage_noise) -> int:
    """The loop an integration runs, with the collective replaced by a copy. Returns syncs."""
    size, cols = sched.size, sched.cols
    step_done, payload, complete = sched.step_done, sched.payload, sched.complete_sync
    reduced_global = np.empty(size * cols + 2, dtype=np.float32)
    syncs = 0
    for i, c in enumerate(compute):
        plan = step_done(c)
        if plan is None:
            continue
        mine = payload(plan)
        if plan.is_global:
            row = mine[:cols]  # rank 0's slot
            reduced_global[:-2].reshape(size, cols)[:] = row
            reduced_global[-2] = size * plan.weight
            reduced_global[-1] = size
            reduced = reduced_global
        else:
            members = len(topo.block_of(plan.level, 0))
            reduced = mine * members
        noise = stage_noise[i]
        complete(plan, reduced, [per_level[st.link_level] * noise for st in plan.stages])
        syncs += 1
    return syncs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8, help="ranks in the job (default 8)")
    p.add_argument("--topology", default=None, help="e.g. 2x4 (default flat)")
    p.add_argument("--steps", type=int, default=20000, help="local steps per repeat (default 20000)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (default 7)")
    p.add_argument("--warmup-steps", type=int, default=2000, help="untimed steps first (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", action="store_true", help="rank 0 writes its decision log to a temp file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.ranks < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--ranks, --steps and --repeats must be positive")

    sched, topo, compute, per_level, noise, log_dir = build(args)
    run_steps(sched, topo, compute[:args.warmup_steps], per_level, noise)  # past the measuring phase
    per_step_us, wall_us, syncs = [], [], 0
    for _ in range(args.repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        syncs = run_steps(sched, topo, compute, per_level, noise)
        per_step_us.append((time.process_time() - cpu) / len(compute) * 1e6)
        wall_us.append((time.perf_counter() - wall) / len(compute) * 1e6)
    median = statistics.median(per_step_us)
    out = {
        "median_us_per_step": median,
        "min_us_per_step": min(per_step_us),
        "max_us_per_step": max(per_step_us),
        "median_wall_us_per_step": statistics.median(wall_us),
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "syncs_per_repeat": syncs,
        "periods": list(sched.periods),
        "ranks": args.ranks,
        "levels": topo.num_levels,
        "goal_us": GOAL_US,
        "meets_goal": median <= GOAL_US,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"scheduler: median {median:.2f} us CPU per local step over {args.repeats} repeats "
              f"of {args.steps} steps (min {out['min_us_per_step']:.2f}, max "
              f"{out['max_us_per_step']:.2f}; wall median {out['median_wall_us_per_step']:.2f}); "
              f"periods {out['periods']}, {syncs} syncs per repeat, {args.ranks} ranks, "
              f"{topo.num_levels} level(s); goal <= {GOAL_US:.0f} us: "
              f"{'met' if out['meets_goal'] else 'NOT met'}")
    if log_dir:
        sched.log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
