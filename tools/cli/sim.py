"""``alsgd-sim``: the cluster simulator (:mod:`adaptive_lsgd.sim`) from the command line.

Plan a job at a scale no machine here has, with the real scheduler deciding the periods::

    alsgd-sim --hosts 2 --workers-per-host 1 --compute-ms 50 --params 1000000 \\
        --inter-gbps 0.1 --steps 1000 --json

(also ``python -m adaptive_lsgd.tools.cli.sim``).
"""

from __future__ import annotations

import argparse
import json
import sys

from adaptive_lsgd.config import Config, ConfigError, load_config, read_config_file
from adaptive_lsgd.sim import CHECK_MAX_RANKS, SHARE_ABOVE, ClusterSim, SimulationError
from adaptive_lsgd.tools.cli.args import number, positive_int
from adaptive_lsgd.topology import TopologyError


def _int_list(text: str) -> list:
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (e.g. 4 or 4,8), got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers (e.g. 4 or 4,8), got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alsgd-sim",
        description="Simulate a cluster running adaptive local SGD with the real scheduler.")
    c = p.add_argument_group("cluster")
    c.add_argument("--hosts", type=positive_int, default=2, help="number of hosts (default 2)")
    c.add_argument("--workers-per-host", type=positive_int, default=1,
                   help="workers (GPUs) per host (default 1)")
    c.add_argument("--compute-ms", type=number(0, True), default=50.0,
                   help="compute time of one local step in ms (default 50)")
    c.add_argument("--params", type=number(0, False), default=25e6,
                   help="model parameters, averaged as float32 (default 25e6)")
    c.add_argument("--inter-gbps", type=number(0, True), default=10.0,
                   help="bandwidth of links between hosts, Gbit/s (default 10)")
    c.add_argument("--intra-gbps", type=number(0, True), default=100.0,
                   help="bandwidth of links inside a host, Gbit/s (default 100)")
    c.add_argument("--latency-us", type=number(0, False), default=50.0,
                   help="per-hop latency of links between hosts, us (default 50)")
    c.add_argument("--intra-latency-us", type=number(0, False), default=5.0,
                   help="per-hop latency of links inside a host, us (default 5)")
    c.add_argument("--slow-host-factor", type=number(0, True), default=1.0,
                   help="compute-time multiplier of host 0 (a mixed cluster; default 1)")
    c.add_argument("--slow-from-step", type=int, default=0,
                   help="host 0 is slow from this step on (a rank that throttles mid-run; default 0)")
    c.add_argument("--jitter", type=number(0, False), default=0.0,
                   help="relative std of per-step compute noise, e.g. 0.1 (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--steps", type=positive_int, default=200, help="local steps per rank (default 200)")
    r.add_argument("--batch-size", type=positive_int, default=32, help="samples per step (default 32)")
    r.add_argument("--seed", type=int, default=0, help="seed of the compute noise (default 0)")
    s = p.add_argument_group("scheduler config (flags override --config)")
    s.add_argument("--config", metavar="FILE", help="a YAML/JSON adaptive-lsgd config file")
    s.add_argument("--policy", choices=("adaptive", "fixed"), help="default adaptive")
    s.add_argument("--periods", type=_int_list, help="initial/fixed periods, one per level: 4 or 4,8")
    s.add_argument("--target-comm-fraction", type=float,
                   help=f"default {Config.target_comm_fraction}")
    s.add_argument("--max-period", type=_int_list, help="cap per level: 64 or 8,64 (default 64)")
    s.add_argument("--warmup", type=int, help="mini-batch SGD steps before local SGD (default 0)")
    s.add_argument("--hysteresis", type=float, help="default 0.25")
    s.add_argument("--time-budget", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed-speed rounds, faster ranks take more steps per round (default: "
                        "auto, on while the ranks' compute differs by more than skew_threshold)")
    s.add_argument("--chained-allreduce", action="store_true", default=None,
                   help="chained (hierarchical) allreduce, sliced: reduce-scatter up, an allreduce "
                        "of the slices across, allgather down (default: auto, the sliced form once "
                        "the cost model prices a global sync that way cheaper)")
    s.add_argument("--outer-optimizer", choices=("none", "sgd", "nesterov"),
                   help="outer step at global syncs (DiLoCo: nesterov; default none)")
    s.add_argument("--compression", choices=("none", "fp16", "bf16"),
                   help="global syncs send the update in 16 bits: half the bytes across hosts")
    s.add_argument("--log", metavar="FILE", help="write rank 0's decision log (JSON lines)")
    o = p.add_argument_group("output and checks")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    o.add_argument("--decisions", choices=("auto", "per-rank", "shared"), default="auto",
                   help="every rank runs the policy, or one per sync (default: shared above "
                        f"{SHARE_ABOVE} ranks)")
    o.add_argument("--check-agreement", action="store_true",
                   help="full per-rank replicas with full payloads; fail if ranks disagree")
    return p


def config_from_args(args) -> object:
    values = read_config_file(args.config) if args.config else {}
    for key in ("policy", "periods", "target_comm_fraction", "warmup", "hysteresis",
                "time_budget", "chained_allreduce", "log", "outer_optimizer", "compression"):
        v = getattr(args, key)
        if v is not None:
            values[key] = v
    if args.max_period is not None:
        values["max_period"] = args.max_period[0] if len(args.max_period) == 1 else args.max_period
    values["topology"] = "auto"
    return load_config(values, env={})


def simulate(args) -> dict:
    config = config_from_args(args)
    sim = ClusterSim(config, args.hosts, args.workers_per_host, args.compute_ms, int(args.params),
                     args.inter_gbps, args.intra_gbps, args.latency_us, args.intra_latency_us,
                     slow_host_factor=args.slow_host_factor, slow_from_step=args.slow_from_step,
                     jitter=args.jitter, seed=args.seed, batch_size=args.batch_size,
                     decisions=args.decisions, check_agreement=args.check_agreement)
    return sim.run(args.steps)


def _summary(out: dict) -> str:
    lines = [
        f"{out['ranks']} ranks ({out['hosts']} hosts x {out['workers_per_host']}), "
        f"{out['levels']} level(s), {out['steps']} steps",
        f"mechanisms {out['mechanisms']}, rank steps per round {out['rank_steps']}",
        f"periods {out['periods']} after {out['global_syncs']} global syncs "
        f"(syncs per level {out['syncs_per_level']})",
        f"throughput {out['samples_per_s']:.1f} samples/s, compute-only "
        f"{out['compute_only_samples_per_s']:.1f} ({100 * out['efficiency']:.1f}%)",
        f"comm fraction {out['comm_fraction']:.3f}, simulated wall {out['wall_s']:.3f} s, "
        f"link times {[round(t, 6) for t in out['link_s']]} s",
        "periods over time: " + ", ".join(f"step {s}: {p}" for s, p in out["periods_over_time"]),
        f"simulated in {out['sim_runtime_s']:.2f} s ({out['decisions']} decisions)",
    ]
    if "agreement" in out:
        lines.append(f"agreement: all {out['ranks']} ranks took identical decisions at "
                     f"{out['agreement']['global_syncs_checked']} global syncs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    world = args.hosts * args.workers_per_host
    if args.check_agreement and world > CHECK_MAX_RANKS:
        parser.error(f"--check-agreement sums full payloads on every rank: use at most "
                     f"{CHECK_MAX_RANKS} ranks (got {world})")
    try:
        out = simulate(args)
    except (ConfigError, TopologyError) as exc:
        parser.error(str(exc))
    except SimulationError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out) if args.json else _summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
