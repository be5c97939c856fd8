"""Benchmark (not a test): does ``alsgd-tune`` predict what the emulated cluster measures, for
each mechanism the default config can pick?

Per case (``--cases``, default all):

* ``plain``: 2 hosts x 1 worker at ``--rate-mbit`` (100), blocking averages;
* ``time-budget``: 2 hosts x 1 worker at 1 Gbit/s, host 0 computes 2x slower (an emulated
  slowdown: each of its steps sleeps as long again), the loop accepts per-rank step counts;
* ``overlap``: 2 hosts x 1 worker at 20 Mbit/s, where blocking averages cannot reach the
  target within ``max_period`` and ``overlap: auto`` takes overlapped ones;
* ``chained``: 2 hosts x 2 workers at 50 Mbit/s with blocking averages (``overlap: false``:
  the default would overlap one allreduce over all ranks there instead), where
  ``chained_allreduce: auto`` takes the sliced chained sync.

1. ``alsgd-tune profile`` on this machine (loopback, as many workers as the case has), then
   the what-if recommendation for the case's cluster;
2. the same profile recorded *on* the emulated cluster, and its recommendation;
3. training with each recommendation (its periods and the mechanisms it says the default
   config would pick) on the emulated cluster, ``--repeats`` times: samples/s of all ranks,
   and the cost model the scheduler measured (compute per step of the slowest rank, the
   seconds of one sync per level) against the predicted one.

It prints predicted against measured samples/s and the parts, and whether each is within
10%. Needs root (namespaces)::

    python -m adaptive_lsgd.tools.bench.validate_tune --cases plain,time-budget --json v.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from adaptive_lsgd.tools.launch import SETTINGS_ENV

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
DEFAULT_MODEL = os.path.join(REPO, "tests", "tune_models", "models.py") + ":mlp_1m"
WITHIN = 0.10  # the bar: measured within 10% of predicted

# Each case: the emulated cluster, the recommend flags that describe it beyond its shape, the
# mechanism the default config should pick there, and the config keys that run it as fixed periods.
CASES = {
    "plain": dict(hosts=2, wph=1, rate=None, slowdown=None, ask=[], expect=None,
                  config={"time_budget": False, "overlap": False}),
    "time-budget": dict(hosts=2, wph=1, rate=1000.0, slowdown=[2.0, 1.0],
                        ask=["--slow-host-factor", "2", "--uneven-steps"], expect="time_budget",
                        config={"time_budget": True, "overlap": False}),
    "overlap": dict(hosts=2, wph=1, rate=20.0, slowdown=None, ask=[], expect="overlap",
                    config={"time_budget": False, "overlap": True}),
    "chained": dict(hosts=2, wph=2, rate=50.0, slowdown=None, ask=["--no-overlap"], expect="chained",
                    config={"time_budget": False, "overlap": False, "chained_allreduce": "sliced"}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="validate_tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rate-mbit", type=float, default=100.0, help="the plain case's link")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, from {', '.join(CASES)} (default: all)")
    p.add_argument("--rounds", type=int, default=4, help="global rounds timed per run")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per recommendation")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    return args


def worker(s: dict) -> None:
    """Train with the recommendation on the emulated cluster; rank 0 prints samples/s of all
    ranks and the scheduler's measured cost model."""
    import horovod.torch as hvd
    import torch

    import adaptive_lsgd.integrations.torch as alsgd
    from adaptive_lsgd.tools.cli.tune import build_model
    from adaptive_lsgd.tools.cluster import emulated_slowdown

    hvd.init()
    torch.set_num_threads(1)
    slowdown = emulated_slowdown()
    _, model, loss_fn, (x, y), _, _ = build_model(s["model"])
    idx = torch.arange(s["batch_size"]) % x.shape[0]
    x, y = x[idx], y[idx]
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                     named_parameters=model.named_parameters(), model=model,
                                     config={"policy": "fixed", "periods": s["periods"],
                                             "warmup": 0, **s["config"]})
    if s["config"].get("time_budget"):
        alsgd.allow_uneven_steps(opt)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    sched = opt.alsgd.scheduler

    laps, sync_laps = [], []  # seconds per step in the window: local steps, steps that synced

    def step(record: bool):
        start = time.perf_counter()
        syncs = sched.global_syncs
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if slowdown > 1:  # this host computes slowdown x slower
            time.sleep((slowdown - 1) * (time.perf_counter() - start))
        opt.step()
        if record:
            (sync_laps if sched.global_syncs != syncs else laps).append(time.perf_counter() - start)

    def rounds(n, record=False):  # whole global rounds (ranks may take different numbers of steps)
        target, steps = sched.global_syncs + n, 0
        while sched.global_syncs < target:
            step(record)
            steps += 1
        return steps

    # Warm-up (the first syncs, the allocator, the timing windows), then the window from one
    # sync to the n-th after it on every rank: the same phase of the round at both ends, so an
    # overlapped average is in flight at both (a window opened after a barrier would time the
    # pipeline filling: one round of compute with no average to hide behind).
    rounds(3)
    start = time.perf_counter()
    steps = rounds(s["rounds"], record=True)
    wall = time.perf_counter() - start
    opt.wait_for_average()
    total = hvd.allreduce(torch.tensor([float(steps)]), op=hvd.Sum, name="validate.steps").item()
    walls = hvd.allgather_object(wall, name="validate.wall")
    parts = hvd.allgather_object({"step_s": statistics.mean(laps) if laps else None,
                                  "sync_step_s": statistics.mean(sync_laps) if sync_laps else None},
                                 name="validate.parts")
    summ = sched.summary()
    if hvd.rank() == 0:
        wall = statistics.mean(walls)
        print("RESULT " + json.dumps({
            "samples_per_s": total * s["batch_size"] / wall, "steps": total, "wall_s": wall,
            "model": summ["model"], "mechanisms": summ["mechanisms"],
            "rank_steps": summ["rank_steps"], "rank_parts": parts}), flush=True)


def recommend(profile: str, extra: list) -> dict:
    out = subprocess.run([sys.executable, "-m", "adaptive_lsgd.tools.cli.tune", "recommend",
                          "--profile", profile, "--json", *extra],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"recommend failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def measure(cluster, args, rec: dict, case: dict) -> dict:
    config = dict(case["config"])
    mech = rec.get("mechanisms", {})
    settings = {"model": args.model, "batch_size": args.batch_size, "periods": rec["periods"],
                "rounds": args.rounds, "config": config}
    res = cluster.run([sys.executable, "-m", "adaptive_lsgd.tools.bench.validate_tune", "--worker"],
                      env={SETTINGS_ENV: json.dumps(settings), "OMP_NUM_THREADS": "1"},
                      cwd=REPO, timeout=900)
    if not res.ok:
        raise SystemExit("training run failed:\n" + res.output[-3000:])
    for _, stream, text in res.lines:
        if stream == "stdout" and text.startswith("RESULT "):
            out = json.loads(text.split(" ", 1)[1])
            out["recommended_mechanisms"] = mech
            return out
    raise SystemExit("no RESULT line from rank 0")


def loopback_profile(args, np_: int, tmp: str, cache: dict) -> str:
    """``alsgd-tune profile`` on this machine with ``np_`` workers (once per size)."""
    if np_ not in cache:
        path = os.path.join(tmp, f"profile-loopback-np{np_}.json")
        subprocess.run([sys.executable, "-m", "adaptive_lsgd.tools.cli.tune", "profile",
                        "--model", args.model, "--batch-size", str(args.batch_size),
                        "-np", str(np_), "--out", path], check=True, timeout=1200)
        cache[np_] = path
    return cache[np_]


def _ratio(measured: float, predicted: float) -> float:
    return measured / predicted if predicted else float("nan")


def compare(name: str, rec: dict, details: list) -> dict:
    """Predicted against measured: samples/s (median over the runs), compute per step and the
    allreduce seconds per level (the scheduler's own model, median over the runs)."""
    runs = [d["samples_per_s"] for d in details]
    got = statistics.median(runs)
    models = [d["model"] for d in details if d.get("model")]
    compute = statistics.median(m["compute_s"] for m in models) if models else None
    links = ([statistics.median(m["link_s"][lvl] for m in models)
              for lvl in range(len(models[0]["link_s"]))] if models else [])
    predicted_links = [lv["allreduce_s"] for lv in rec["levels"]]
    ratios = {"samples_per_s": _ratio(got, rec["predicted_samples_per_s"])}
    if compute is not None:
        ratios["compute_s"] = _ratio(compute, rec["compute_s"])
    for lvl, (m, p) in enumerate(zip(links, predicted_links)):
        ratios[f"link_s_level{lvl}"] = _ratio(m, p)
    # Where the time went, per run: the slowest rank's mean local step and mean syncing step
    # (a whole step that ended with a sync: its compute and everything the sync cost it).
    mean_step = [max(p["step_s"] for p in d["rank_parts"] if p["step_s"] is not None)
                 for d in details if d.get("rank_parts")]
    sync_step = [max(p["sync_step_s"] for p in d["rank_parts"] if p["sync_step_s"] is not None)
                 for d in details if d.get("rank_parts")]
    return {"periods": rec["periods"], "mechanisms": rec.get("mechanisms"),
            "measured_mean_step_s": statistics.median(mean_step) if mean_step else None,
            "measured_mean_sync_step_s": statistics.median(sync_step) if sync_step else None,
            "rank_steps": rec.get("rank_steps"),
            "predicted_samples_per_s": rec["predicted_samples_per_s"],
            "measured_samples_per_s": got, "measured_runs": runs,
            "predicted_compute_s": rec["compute_s"], "measured_compute_s": compute,
            "predicted_link_s": predicted_links, "measured_link_s": links,
            "measured_over_predicted": ratios,
            "within": all(abs(r - 1) <= WITHIN for r in ratios.values())}


def run_case(name: str, args, tmp: str, cache: dict) -> dict:
    from adaptive_lsgd.tools.cluster import EmulatedCluster

    case = CASES[name]
    rate = case["rate"] or args.rate_mbit
    shape = ["--hosts", str(case["hosts"]), "--workers-per-host", str(case["wph"])]
    local = loopback_profile(args, case["hosts"] * case["wph"], tmp, cache)
    what_if = recommend(local, shape + ["--inter-gbps", str(rate / 1000.0), *case["ask"]])
    out = {"hosts": case["hosts"], "workers_per_host": case["wph"], "rate_mbit": rate,
           "slowdown": case["slowdown"], "expects": case["expect"]}
    with EmulatedCluster(hosts=case["hosts"], workers_per_host=case["wph"], rate_mbit=rate,
                         slowdown=case["slowdown"] or 1.0, echo=False) as cluster:
        on_cluster = os.path.join(tmp, f"profile-{name}.json")
        settings = {"model": args.model, "batch_size": args.batch_size, "steps": 100, "reps": 10,
                    "out": on_cluster}
        res = cluster.run([sys.executable, "-m", "adaptive_lsgd.tools.cli.tune", "--worker"],
                          env={SETTINGS_ENV: json.dumps(settings), "OMP_NUM_THREADS": "1"},
                          cwd=REPO, timeout=1200)
        if not res.ok:
            raise SystemExit("profiling on the cluster failed:\n" + res.output[-3000:])
        measured_profile = recommend(on_cluster, case["ask"])
        for label, rec in (("what-if from loopback profile", what_if),
                           ("profile recorded on the cluster", measured_profile)):
            if case["expect"] and not rec["mechanisms"].get(case["expect"]):
                print(f"[validate] {name}: {label}: the default config would not pick "
                      f"{case['expect']} here ({rec['why'].get(case['expect'])}); measured with "
                      f"it anyway", flush=True)
            details = [measure(cluster, args, rec, case) for _ in range(args.repeats)]
            fig = out[label] = compare(name, rec, details)
            parts = ", ".join(f"{k} {v:.3f}" for k, v in fig["measured_over_predicted"].items())
            print(f"[validate] {name}: {label}: periods {rec['periods']}, mechanisms "
                  f"{rec.get('mechanisms')}, predicted {fig['predicted_samples_per_s']:.0f} "
                  f"samples/s, measured {fig['measured_samples_per_s']:.0f} (runs "
                  f"{', '.join(f'{r:.0f}' for r in fig['measured_runs'])}); measured/predicted: "
                  f"{parts}; {'all within' if fig['within'] else 'NOT all within'} "
                  f"{WITHIN:.0%}", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(os.environ[SETTINGS_ENV]))
        return 0
    tmp = tempfile.mkdtemp(prefix="alsgd-validate-")
    figures = {"model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
               "repeats": args.repeats, "within": WITHIN, "cases": {}}
    cache: dict = {}
    for name in args.cases:
        figures["cases"][name] = run_case(name, args, tmp, cache)
        if args.json:  # after every case: a long run keeps what it measured
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(figures, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
