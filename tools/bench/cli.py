"""``alsgd-bench``: interleaved benchmarks of adaptive local SGD on an emulated cluster.

Runs the scenarios of :mod:`adaptive_lsgd.tools.bench.scenarios` (one Horovod job each, all
variants interleaved; root for the emulated cluster), writes their JSON and prints a table;
``all`` and ``report`` also write the plots and the results page
(:mod:`adaptive_lsgd.tools.bench.report`).

Examples (as root)::

    alsgd-bench comm-bound --json comm-bound.json --quick
    alsgd-bench all --quick --out docs/bench --doc docs/benchmarks.md   # the results page
    alsgd-bench report --out docs/bench --doc docs/benchmarks.md        # re-plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from adaptive_lsgd.tools.bench.scenarios import (
    LAUNCHERS,
    PROG,
    SCENARIOS,
    _log,
    run_scenario,
    seeded_name,
)


def write_json(doc: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def print_table(doc: dict) -> None:
    print(f"[{PROG}] {doc['scenario']}: compute-only {doc['compute_only_samples_per_s']:.0f} samples/s")
    for k, v in doc["results"].items():
        print(f"[{PROG}]   {k:22s} {v['samples_per_s']:9.0f} samples/s  comm {v['comm_fraction']:6.1%}  "
              f"acc {v['test_acc']:6.2%}  global syncs {v['global_syncs']}")
    for g in doc["goals"]:
        val = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        print(f"[{PROG}]   goal: {g['goal']}: {val} -> {'met' if g['met'] else 'MISSED'}")


def parse_args(argv=None):
    names = list(SCENARIOS)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="scenarios: " + "; ".join(f"{k}: {v['about']}"
                                                                 for k, v in SCENARIOS.items()))
    p.add_argument("scenario", choices=names + ["all", "report"],
                   help="a scenario, 'all' (every scenario, then the report) or 'report' (plots and "
                        "the results page from the JSON files in --out)")
    p.add_argument("--json", default=None, help="write the scenario's results here (one scenario)")
    p.add_argument("--quick", action="store_true", help="fewer rounds/steps (comm-bound < 10 min)")
    p.add_argument("--out", default=None, help="folder for SCENARIO.json and the PNG plots")
    p.add_argument("--doc", default=None, help="with all/report: write the results page (markdown)")
    p.add_argument("--rounds", type=int, default=None, help="override the scenario's rounds")
    p.add_argument("--steps", type=int, default=None, help="override the steps per segment")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of variants (compute-only always runs)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the models' initialisation and the data order (default 0); with "
                        "--out, seed N > 0 writes SCENARIO-seedN.json, which the results page "
                        "averages with SCENARIO.json (seed 0)")
    p.add_argument("--timeout", type=float, default=None,
                   help="per scenario, seconds (default: the scenario's own, 3 h for lm, "
                        "else 1 h)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="emulator",
                   help="who starts the workers: the emulator itself (default), or horovodrun / "
                        "alsgd-run from the root namespace over ssh to the emulated hosts")
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error("--seed must be >= 0")
    if args.timeout is not None and args.timeout <= 0:
        p.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    for flag in ("rounds", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if args.scenario in names and not (args.json or args.out):
        p.error(f"{args.scenario}: give --json PATH or --out DIR")
    if args.scenario in ("all", "report") and not args.out:
        p.error(f"{args.scenario}: give --out DIR")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scenario == "report":
        from adaptive_lsgd.tools.bench.report import report

        try:
            report(args.out, args.doc)
        except (OSError, ValueError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        return 0
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    from adaptive_lsgd.tools.cluster import ClusterError

    variants = args.variants.split(",") if args.variants else None
    failed = []
    for name in names:
        start = time.monotonic()
        try:
            doc = run_scenario(name, args.quick, args.rounds, args.steps, variants, args.timeout,
                               launcher=args.launcher, seed=args.seed)
        except (ClusterError, ValueError, RuntimeError) as e:
            print(f"{PROG}: error: {name}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; cluster torn down", file=sys.stderr)
            return 130
        path = (args.json if args.json and len(names) == 1
                else os.path.join(args.out, seeded_name(name, args.seed)))
        write_json(doc, path)
        if args.out and args.json and len(names) == 1:
            write_json(doc, os.path.join(args.out, seeded_name(name, args.seed)))
        print_table(doc)
        _log(f"{name} done in {time.monotonic() - start:.0f}s; wrote {path}")
    if args.scenario == "all":
        from adaptive_lsgd.tools.bench.report import report

        report(args.out, args.doc)
    return 1 if failed else 0
