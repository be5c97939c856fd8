"""The emulated cluster's command line (``python -m adaptive_lsgd.tools.cluster``): run one
command as a Horovod job on an emulated cluster, or ``--cleanup`` what a killed launcher left.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Optional

from adaptive_lsgd.tools.cluster.emulator import EmulatedCluster, Terminated, _rate
from adaptive_lsgd.tools.cluster.network import ClusterError, cleanup_stale, require_root


def _floats(text: str) -> list:
    return [_rate(v) if v.lower() in ("none", "off") else float(v) for v in text.split(",")]


def _schedule(text: str) -> list:
    out = []
    for item in filter(None, text.split(",")):
        try:
            t, host, rate = item.split(":")
            out.append((float(t), int(host), _rate(rate)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad schedule entry {item!r}: expected SECONDS:HOST:MBIT (MBIT may be 'none')"
            ) from None
    return out


def _one_or_list(values: Optional[list]):
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m adaptive_lsgd.tools.cluster",
        description="Run a command as a Horovod (Gloo) job on an emulated multi-host cluster: one "
                    "network namespace per host, shaped links, per-host compute slowdown. Needs root.",
        epilog="example: python -m adaptive_lsgd.tools.cluster --hosts 2 --workers-per-host 2 "
               "--rate-mbit 100 --slowdown 1,2 --schedule 10:0:10 -- python train.py")
    p.add_argument("--hosts", type=int, default=2, help="number of emulated hosts (default 2)")
    p.add_argument("--workers-per-host", type=lambda s: [int(v) for v in s.split(",")], default=[1],
                   help="workers per host: one number or one per host (default 1)")
    p.add_argument("--rate-mbit", type=_floats, default=None,
                   help="link rate per host in Mbit/s, one value or comma-separated per host "
                        "('none' = unshaped; default unshaped)")
    p.add_argument("--slowdown", type=_floats, default=None,
                   help="compute slowdown per host, e.g. 1,2 (exported as _ALSGD_EMU_SLOWDOWN)")
    p.add_argument("--schedule", type=_schedule, default=None,
                   help="rate changes during the run: SECONDS:HOST:MBIT,... (e.g. 10:0:10,30:0:none)")
    p.add_argument("--timeout", type=float, default=None, help="kill the job after this many seconds")
    p.add_argument("--run-id", default=None, help="name of the run's resources ([a-z0-9]{1,6})")
    p.add_argument("--ssh", action="store_true",
                   help="give every host an sshd and run COMMAND in the root namespace as the "
                        "launcher, the way users launch: {hosts} in it becomes horovodrun's -H "
                        "value (ADDRESS:SLOTS,...), e.g. -- horovodrun -np 4 -H {hosts} python train.py")
    p.add_argument("--quiet", action="store_true", help="do not echo worker output")
    p.add_argument("--cleanup", action="store_true",
                   help="remove namespaces/veths/bridges (prefix alsgd) left by crashed runs and exit")
    p.add_argument("--force", action="store_true", help="with --cleanup: also remove live runs")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.cleanup and not args.command:
        p.error("a command is required: ... -- python train.py")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = "adaptive_lsgd.tools.cluster"
    # Like horovodrun: SIGINT and SIGTERM always end the job (and tear the cluster down), even
    # when the shell started us with SIGINT ignored (a background job).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        require_root()
        if args.cleanup:
            removed = cleanup_stale(run_id=args.run_id, force=args.force)
            print(f"removed {len(removed)}: {' '.join(removed)}" if removed else "nothing to remove")
            return 0
        cluster = EmulatedCluster(
            hosts=args.hosts, workers_per_host=_one_or_list(args.workers_per_host),
            rate_mbit=_one_or_list(args.rate_mbit), slowdown=_one_or_list(args.slowdown),
            schedule=args.schedule, run_id=args.run_id, echo=not args.quiet, ssh=args.ssh)
        with cluster:
            if args.ssh:
                command = [c.replace("{hosts}", cluster.hosts_arg()) for c in args.command]
                launched = cluster.launch(command, timeout=args.timeout)
                rc = launched.returncode
                return 124 if launched.timed_out else (rc if rc >= 0 else 128 - rc)
            result = cluster.run(args.command, timeout=args.timeout)
    except (ClusterError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; cluster torn down", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{prog}: {e}; cluster torn down", file=sys.stderr)
        return 128 + e.signum
    if result.timed_out:
        return 124
    return next((rc if rc > 0 else 128 - rc for rc in result.returncodes if rc != 0), 0)
