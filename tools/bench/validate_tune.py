"""Benchmark (not a test): does ``alsgd-tune`` predict what the emulated cluster measures?

1. ``alsgd-tune profile`` on this machine (loopback, ``-np 2``), then the what-if
   recommendation for 2 hosts joined by ``--rate-mbit`` (``--inter-gbps``);
2. the same profile recorded *on* the emulated cluster (2 namespaces, tbf-shaped links), and
   its recommendation;
3. training with each recommended fixed period on the emulated cluster (the torch
   integration, the profiled model and batch size), measuring samples/s.

It prints predicted against measured samples/s and their ratio. Needs root (namespaces)::

    python -m adaptive_lsgd.tools.bench.validate_tune --rate-mbit 100 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from adaptive_lsgd.tools.launch import SETTINGS_ENV

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
DEFAULT_MODEL = os.path.join(REPO, "tests", "tune_models", "models.py") + ":mlp_1m"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="validate_tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rate-mbit", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=4, help="global rounds timed per run")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per setting (median)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(s: dict) -> None:
    """Train with fixed periods on the emulated cluster; rank 0 prints samples/s."""
    import horovod.torch as hvd
    import torch

    import adaptive_lsgd.integrations.torch as alsgd
    from adaptive_lsgd.tools.cli.tune import build_model

    hvd.init()
    torch.set_num_threads(1)
    _, model, loss_fn, (x, y), _, _ = build_model(s["model"])
    idx = torch.arange(s["batch_size"]) % x.shape[0]
    x, y = x[idx], y[idx]
    opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                     named_parameters=model.named_parameters(), model=model,
                                     config={"policy": "fixed", "periods": s["periods"], "warmup": 0})
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    period = 1
    for h in s["periods"]:
        period *= h
    steps = period * s["rounds"]

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(period):  # one round of warm-up (first sync, allocator, ...)
        step()
    hvd.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    hvd.barrier()
    wall = time.perf_counter() - start
    if hvd.rank() == 0:
        summ = opt.alsgd.scheduler.summary()  # this rank's own accounting, warm-up round included
        print("RESULT " + json.dumps({
            "samples_per_s": steps * s["batch_size"] * hvd.size() / wall, "steps": steps,
            "wall_s": wall, "compute_s_per_step": summ["compute_s"] / summ["steps"],
            "comm_s_per_sync": summ["comm_s"] / max(1, sum(summ["syncs_per_level"]))}), flush=True)


def recommend(profile: str, extra: list) -> dict:
    out = subprocess.run([sys.executable, "-m", "adaptive_lsgd.tools.cli.tune", "recommend",
                          "--profile", profile, "--json", *extra],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"recommend failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def measure(cluster, args, periods) -> float:
    settings = {"model": args.model, "batch_size": args.batch_size, "periods": periods,
                "rounds": args.rounds}
    res = cluster.run([sys.executable, "-m", "adaptive_lsgd.tools.bench.validate_tune", "--worker"],
                      env={SETTINGS_ENV: json.dumps(settings), "OMP_NUM_THREADS": "1"},
                      cwd=REPO, timeout=900)
    if not res.ok:
        raise SystemExit("training run failed:\n" + res.output[-3000:])
    for _, stream, text in res.lines:
        if stream == "stdout" and text.startswith("RESULT "):
            return json.loads(text.split(" ", 1)[1])
    raise SystemExit("no RESULT line from rank 0")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(os.environ[SETTINGS_ENV]))
        return 0
    import statistics

    from adaptive_lsgd.tools.cluster import EmulatedCluster

    tmp = tempfile.mkdtemp(prefix="alsgd-validate-")
    local = os.path.join(tmp, "profile-loopback.json")
    subprocess.run([sys.executable, "-m", "adaptive_lsgd.tools.cli.tune", "profile", "--model", args.model,
                    "--batch-size", str(args.batch_size), "-np", "2", "--out", local],
                   check=True, timeout=900)
    gbps = args.rate_mbit / 1000.0
    what_if = recommend(local, ["--hosts", "2", "--workers-per-host", "1", "--inter-gbps", str(gbps)])
    figures = {"rate_mbit": args.rate_mbit, "batch_size": args.batch_size, "model": args.model}
    with EmulatedCluster(hosts=2, workers_per_host=1, rate_mbit=args.rate_mbit, echo=False) as cluster:
        on_cluster = os.path.join(tmp, "profile-cluster.json")
        settings = {"model": args.model, "batch_size": args.batch_size, "steps": 30, "reps": 10,
                    "out": on_cluster}
        res = cluster.run([sys.executable, "-m", "adaptive_lsgd.tools.cli.tune", "--worker"],
                          env={SETTINGS_ENV: json.dumps(settings), "OMP_NUM_THREADS": "1"},
                          cwd=REPO, timeout=900)
        if not res.ok:
            raise SystemExit("profiling on the cluster failed:\n" + res.output[-3000:])
        measured_profile = recommend(on_cluster, [])
        for name, rec in (("what-if from loopback profile", what_if),
                          ("profile recorded on the cluster", measured_profile)):
            details = [measure(cluster, args, rec["periods"]) for _ in range(args.repeats)]
            runs = [d["samples_per_s"] for d in details]
            got = statistics.median(runs)
            figures[name] = {"periods": rec["periods"],
                             "predicted_samples_per_s": rec["predicted_samples_per_s"],
                             "measured_samples_per_s": got, "measured_runs": runs,
                             "measured_over_predicted": got / rec["predicted_samples_per_s"],
                             "link_s": [lv["allreduce_s"] for lv in rec["levels"]],
                             "compute_s": rec["compute_s"],
                             "measured_compute_s_per_step": statistics.median(
                                 d["compute_s_per_step"] for d in details),
                             "measured_comm_s_per_sync": statistics.median(
                                 d["comm_s_per_sync"] for d in details)}
            print(f"[validate] {name}: periods {rec['periods']}, predicted "
                  f"{rec['predicted_samples_per_s']:.0f} samples/s, measured {got:.0f} "
                  f"(runs {', '.join(f'{r:.0f}' for r in runs)}), measured/predicted "
                  f"{got / rec['predicted_samples_per_s']:.3f}; compute/step predicted "
                  f"{rec['compute_s'] * 1e3:.1f} ms, measured "
                  f"{figures[name]['measured_compute_s_per_step'] * 1e3:.1f} ms; allreduce predicted "
                  f"{rec['levels'][-1]['allreduce_s'] * 1e3:.0f} ms, measured "
                  f"{figures[name]['measured_comm_s_per_sync'] * 1e3:.0f} ms", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
