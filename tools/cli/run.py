"""``alsgd-run``: run an unmodified Horovod script under ``horovodrun`` with adaptive local SGD.

::

    alsgd-run -np 4 -H host1:2,host2:2 [--alsgd-config FILE] [--alsgd-dry-run] python train.py

Every option before the command is ``horovodrun``'s (``-np``, ``-H``, ``--gloo``,
``--hostfile``, elastic flags ...) except the ``--alsgd-*`` ones, which are removed. The job
*is* ``horovodrun``: the workers get a ``sitecustomize`` on their PYTHONPATH
(``tools/inject/``) that swaps ``hvd.DistributedOptimizer`` (PyTorch, TF, Keras) and
``hvd.DistributedGradientTape`` for adaptive-lsgd's when the script imports Horovod, and adds
``LocalSGDCallback`` to Keras ``fit``. The config (``--alsgd-config``, ``ALSGD_CONFIG``,
``ALSGD_*``) is checked here and handed to every worker as ``ALSGD_*`` variables. When the
job ends, the figures each worker left in the run directory are combined and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import adaptive_lsgd.tools
from adaptive_lsgd.config import (
    DEFAULTS,
    ENV_FILE,
    ENV_PREFIX,
    KEYS,
    MEANINGS,
    ConfigError,
    load_config,
    read_config_file,
)
from adaptive_lsgd.decision_log import read_log
from adaptive_lsgd.summary import combine_summaries
from adaptive_lsgd.tools.cli.host_check import check_hosts, job_hosts, remote_hosts

# tools/inject/ (package data of adaptive_lsgd.tools): sitecustomize.py and _alsgd_inject.py
INJECT_DIR = os.path.join(os.path.dirname(os.path.abspath(adaptive_lsgd.tools.__file__)), "inject")
TAG = "[alsgd-run]"
WRAPS = [  # (symbol, what it becomes, patterns that all appear in a script that uses it)
    ("horovod.torch.DistributedOptimizer", "adaptive_lsgd.integrations.torch.DistributedOptimizer",
     (r"horovod\.torch|from horovod import torch", r"DistributedOptimizer")),
    ("horovod.tensorflow.DistributedOptimizer (Keras optimizers)",
     "adaptive_lsgd.integrations.tensorflow.DistributedOptimizer",
     (r"horovod\.tensorflow(?!\.keras)", r"DistributedOptimizer")),
    ("horovod.tensorflow.keras.DistributedOptimizer",
     "adaptive_lsgd.integrations.tensorflow.DistributedOptimizer",
     (r"horovod\.tensorflow\.keras", r"DistributedOptimizer")),
    ("horovod.keras.DistributedOptimizer", "adaptive_lsgd.integrations.tensorflow.DistributedOptimizer",
     (r"horovod\.keras", r"DistributedOptimizer")),
    ("horovod.tensorflow.DistributedGradientTape (in a tf.function)",
     "adaptive_lsgd.integrations.tensorflow.DistributedGradientTape",
     (r"horovod\.tensorflow", r"DistributedGradientTape")),
    ("tf.keras.Model.fit (with one of the optimizers above)",
     "fit(..., callbacks=[..., LocalSGDCallback()])",
     (r"horovod\.(tensorflow\.)?keras", r"DistributedOptimizer", r"\.fit\(")),
]
OURS = ("--alsgd-config", "--alsgd-dry-run", "--alsgd-run-dir")


class UsageError(Exception):
    """Wrong usage: one line for the user."""


def _horovod_parser():
    """horovodrun's own argparse parser (``horovod.runner.launch.parse_args`` builds it)."""
    from horovod.runner import launch

    captured = {}

    def grab(self, args=None, namespace=None):
        captured["parser"] = self
        raise _Grabbed

    class _Grabbed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        launch.parse_args()
    except _Grabbed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def _values_of(parser, token: str) -> int:
    """How many of the next tokens horovodrun's option ``token`` (no ``=value``) consumes."""
    actions = parser._option_string_actions
    action = actions.get(token)
    if action is None and token.startswith("--"):
        matches = {actions[o] for o in actions if o.startswith(token)}
        action = matches.pop() if len(matches) == 1 else None
    if action is None:
        raise UsageError(f"unknown horovodrun option {token!r} (see horovodrun --help)")
    return 1 if action.nargs is None else action.nargs if isinstance(action.nargs, int) else 0


def split_argv(argv: list, parser) -> tuple:
    """``(ours, horovodrun_args, command)``: ours is ``{"config", "dry_run", "run_dir"}``."""
    ours = {"config": None, "dry_run": False, "run_dir": None}
    hvd_args: list = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--alsgd-"):
            name, eq, value = tok.partition("=")
            if name not in OURS:
                raise UsageError(f"unknown option {name!r}; alsgd-run's own options are "
                                 f"{', '.join(OURS)}")
            if name == "--alsgd-dry-run":
                if eq:
                    raise UsageError("--alsgd-dry-run takes no value")
                ours["dry_run"] = True
            else:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"{name} needs a value")
                    value = argv[i]
                ours[name[len("--alsgd-"):].replace("-", "_")] = value
        elif tok == "--":
            return ours, hvd_args, argv[i + 1:]
        elif tok.startswith("-") and len(tok) > 1:
            hvd_args.append(tok)
            n = 0 if "=" in tok else _values_of(parser, tok)
            if i + n >= len(argv):
                raise UsageError(f"horovodrun option {tok} needs {n} value(s)")
            hvd_args += argv[i + 1:i + 1 + n]
            i += n
        else:
            return ours, hvd_args, argv[i:]
        i += 1
    return ours, hvd_args, []


def check_horovod_args(parser, hvd_args: list, command: list) -> argparse.Namespace:
    """Let horovodrun's parser judge its options now; its complaint becomes one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(hvd_args + command)
    except SystemExit as exc:
        if exc.code:
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            msg = lines[-1].split("error:", 1)[-1].strip() if lines else "bad horovodrun options"
            raise UsageError(f"horovodrun options: {msg}") from None


def worker_env(config_path: str | None, run_dir: str, env: dict) -> tuple:
    """The workers' environment and their effective config; ConfigError names what is wrong.

    The config file's keys travel as ``ALSGD_*`` variables (a worker on another host needs no
    copy of the file); variables already set win over the file, as in ``load_config``."""
    env = dict(env)
    source = None
    if config_path is not None:
        read_config_file(config_path)  # unreadable or not YAML/JSON: the message names the path as given
        env[ENV_FILE] = os.path.abspath(config_path)
        source = f"config file {config_path} given with --alsgd-config"
    cfg = load_config(None, env=env, env_file_source=source)  # a bad key names that file
    if env.get(ENV_FILE):
        for key, value in read_config_file(env.pop(ENV_FILE)).items():
            env.setdefault(ENV_PREFIX + key.upper(), json.dumps(value))
    if cfg.log is None:
        env[ENV_PREFIX + "LOG"] = os.path.join(run_dir, "decisions.jsonl")
        cfg = load_config(None, env=env)
    assert load_config(None, env=env) == cfg
    env["PYTHONPATH"] = os.pathsep.join([INJECT_DIR] + [p for p in [env.get("PYTHONPATH")] if p])
    env["_ALSGD_INJECT"] = "1"
    env["_ALSGD_RUN_DIR"] = run_dir
    env.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    return env, cfg


_PYTHON = re.compile(r"python(\d+(\.\d+)*)?(\.exe)?$")  # python, python3, python3.11, /x/bin/python
_PY_VALUE_FLAGS = "WX"    # python's one-letter options that take a value (-W arg, -Xdev)
_PY_NO_SCRIPT = "cmhV?"   # -c CMD, -m MODULE, -h, -V: python runs no script file


def python_script(command: list) -> str | None:
    """The script path of ``python [options] SCRIPT ...`` (``python3``, a path to a python;
    options such as ``-u``, ``-W ignore``, ``-X dev`` before it); None for ``-m``/``-c``,
    stdin (``-``) or a command that is not a python interpreter."""
    if not command or not _PYTHON.match(os.path.basename(command[0])):
        return None
    i = 1
    while i < len(command):
        tok = command[i]
        if tok == "-":
            return None
        if tok == "--":
            return command[i + 1] if i + 1 < len(command) else None
        if tok.startswith("--"):
            name, eq, _ = tok.partition("=")
            if name in ("--help", "--version", "--help-env", "--help-xoptions", "--help-all"):
                return None
            i += 2 if name == "--check-hash-based-pycs" and not eq else 1
            continue
        if tok.startswith("-"):
            flags = tok[1:]
            for j, ch in enumerate(flags):
                if ch in _PY_NO_SCRIPT:
                    return None
                if ch in _PY_VALUE_FLAGS:
                    if j == len(flags) - 1:
                        i += 1  # its value is the next token
                    break
            i += 1
            continue
        return tok
    return None


def check_script(command: list) -> None:
    """``python SCRIPT`` where SCRIPT does not exist: one line now, not a traceback per worker."""
    script = python_script(command)
    if script is not None and not os.path.exists(script):
        where = "" if os.path.isabs(script) else f" (relative to {os.getcwd()})"
        raise UsageError(f"script {script!r} does not exist{where}: nothing was launched")


def script_of(command: list) -> str | None:
    """The Python file the command runs (``python x.py``, ``python -m pkg.mod``, ``x.py``)."""
    for i, tok in enumerate(command):
        if tok.endswith(".py") and os.path.isfile(tok):
            return tok
        if tok == "-m" and i + 1 < len(command):
            import importlib.util

            try:
                spec = importlib.util.find_spec(command[i + 1])
            except (ImportError, ValueError):
                return None
            return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None
    return None


def dry_run(cmd: list, env: dict, cfg) -> None:
    shown = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX) or k in (
        "PYTHONPATH", "_ALSGD_INJECT", "_ALSGD_RUN_DIR", "HOROVOD_DYNAMIC_PROCESS_SETS")}
    print(f"{TAG} dry run: nothing is started")
    print(f"{TAG} command: " + " ".join(shlex.quote(c) for c in cmd))
    print(f"{TAG} worker environment:")
    for k in sorted(shown):
        print(f"{TAG}   {k}={shown[k]}")
    print(f"{TAG} effective config: {json.dumps(cfg.to_dict())}")
    script = script_of(cmd[cmd.index("--") + 1:] if "--" in cmd else cmd)
    text = None
    if script is not None:
        with open(script, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    print(f"{TAG} wraps in every worker" + (f" (script {script}):" if script else ":"))
    for symbol, ours, patterns in WRAPS:
        seen = "" if text is None else ("   [the script appears to use it]"
                                        if all(re.search(p, text) for p in patterns)
                                        else "   [not seen in the script]")
        print(f"{TAG}   {symbol} -> {ours}{seen}")


# -- the summary after the job --------------------------------------------------------------------
def read_reports(run_dir: str) -> list:
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "rank*.json"))):
        try:
            with open(path, encoding="utf-8") as fh:
                out.append(json.load(fh))
        except (OSError, ValueError):
            continue
    return out


def periods_over_time(log_path: str | None, limit: int = 10) -> list:
    """``[(step, periods), ...]`` at each change of the periods in the decision log."""
    if not log_path or not os.path.isfile(log_path):
        return []
    changes: list = []
    for rec in read_log(log_path):
        if "periods" in rec and "step" in rec and (not changes or changes[-1][1] != rec["periods"]):
            changes.append((rec["step"], rec["periods"]))
    if len(changes) > limit:
        changes = changes[:limit - 1] + [("...", None), changes[-1]]
    return changes


def _rate(steps_per_s, batch) -> str:
    """Samples/s when the per-rank batch size is known, else honestly steps/s."""
    if steps_per_s is None:
        return "n/a"
    if batch:
        return f"{steps_per_s * batch:,.0f} samples/s"
    return f"{steps_per_s:,.1f} steps/s (batch size unknown)"


def _total_steps(report: dict) -> int:
    return sum(s["steps"] for s in report["summaries"])


def _figures(per_rank: list, batch, log_path: str | None) -> list:
    """The summary lines of one optimizer (one runtime): its figures on every rank."""
    s = combine_summaries(per_rank)
    n = max(1, s["ranks"])
    mb_steps = sum(r.get("mini_batch_steps", 0) for r in per_rank)
    local_steps = s["steps"] - mb_steps
    phase = f"mini-batch phase {mb_steps // n} steps"
    if mb_steps and not local_steps:
        phase += "; the local phase was not reached"
    lines = [f"  steps                {s['steps']} over all ranks ({s['steps'] // n} per rank; {phase})",
             f"  syncs per level      {s['syncs_per_level']}"]
    changes = periods_over_time(log_path)
    if changes:
        lines.append("  periods over time    " + " -> ".join(
            "..." if p is None else f"step {st}: {p}" for st, p in changes))
    lines.append(f"  final periods        {s['periods']}")
    mech = s.get("mechanisms") or {}
    if mech:
        on = [k for k, v in mech.items() if v]
        text = ", ".join(on) if on else "none (step-count rounds, blocking averages)"
        if mech.get("time_budget") and s.get("rank_steps"):
            text += f"; steps per round by rank {s['rank_steps']}"
        lines.append(f"  mechanisms           {text}")
    if local_steps:
        lines.append(f"  communication share  {s['comm_fraction']:.1%} of compute + collective time "
                     f"(local phase)")
    else:
        lines.append("  communication share  n/a (no step in the local phase)")
    rates = []
    if s["local_steps_per_s"] is not None:
        rates.append(f"{_rate(s['local_steps_per_s'], batch)} in the local phase")
    if s["mini_batch_steps_per_s"] is not None:
        rates.append(f"{_rate(s['mini_batch_steps_per_s'], batch)} in the mini-batch phase")
    lines.append(f"  throughput           {', '.join(rates) or 'n/a'} (measured, all ranks)")
    m = s.get("model")
    if m and m.get("compute_s") and m.get("link_s"):
        # The cost model: a local step costs compute + (sync time / steps between syncs);
        # a mini-batch step costs compute + one allreduce of the same size.
        compute, link = m["compute_s"], max(m["link_s"])
        steps_per_sync = 1
        for p in s["periods"]:
            steps_per_sync *= p
        local_est = s["ranks"] / (compute + link / steps_per_sync)
        mb_est = s["ranks"] / (compute + link)
        lines.append(f"  estimated            {_rate(local_est, batch)} at periods {s['periods']} vs "
                     f"{_rate(mb_est, batch)} as mini-batch SGD (x{local_est / mb_est:.2f}; cost model: "
                     f"compute {compute * 1e3:.1f} ms/step, allreduce {link * 1e3:.1f} ms)")
    return lines


def topology_line(by_rank: dict) -> str | None:
    """``topology  hosts A: ranks [0, 1], B: ranks [2, 3]; levels [[0, 1], [2, 3]] -> [[0, 1, 2, 3]]``:
    where the ranks ran and the blocks each level averages (rank 0's runtime)."""
    levels = next((r.get("levels") for _, r in sorted(by_rank.items()) if r.get("levels")), None)
    hosts: dict = {}
    for rank, r in sorted(by_rank.items()):
        if r.get("host"):
            hosts.setdefault(r["host"], []).append(rank)
    if not levels and not hosts:
        return None
    parts = []
    if hosts:
        parts.append("hosts " + ", ".join(f"{h}: ranks {ranks}" for h, ranks in hosts.items()))
    if levels:
        parts.append("levels " + " -> ".join(str(lv) for lv in levels))
    return "  topology             " + "; ".join(parts)


def summarise(reports: list, log_path: str | None, show_log: bool = True) -> list:
    """The lines alsgd-run prints after the job (empty when nothing was wrapped).

    A worker reports one summary per optimizer (runtime) it created, in creation order; the
    k-th of every rank belong together. Those that took steps are shown (one block each when
    several trained), so an optimizer created but never stepped does not hide the one that
    trained."""
    wrapped = [r for r in reports if r["summaries"]]
    if not wrapped:
        return []
    by_rank: dict = {}  # one report per rank: the process that took the most steps (elastic)
    for r in wrapped:
        best = by_rank.get(r["rank"])
        if best is None or _total_steps(r) > _total_steps(best):
            by_rank[r["rank"]] = r
    count = max(len(r["summaries"]) for r in by_rank.values())
    groups = [[dict(r["summaries"][i], rank=rank) for rank, r in sorted(by_rank.items())
               if i < len(r["summaries"])] for i in range(count)]
    trained = [i for i, g in enumerate(groups) if any(x["steps"] > 0 for x in g)] or [0]
    used = sorted({u for r in reports for u in r["used"]})
    batch = next((r["batch_size"] for r in wrapped if r.get("batch_size")), None)
    lines = [f"summary ({len(by_rank)} ranks; wrapped: {', '.join(used)})"]
    topo = topology_line(by_rank)
    if topo:
        lines.append(topo)
    if count > 1:
        def name(i):
            return groups[i][0].get("wrapped") or "optimizer"

        listed = ", ".join(f"#{i + 1} {name(i)} ({sum(x['steps'] for x in groups[i]) // len(groups[i])} "
                           f"steps per rank)" for i in range(count))
        shown = ", ".join(f"#{i + 1}" for i in trained)
        lines.append(f"  optimizers           {count} per rank: {listed}; figures of {shown}")
    for i in trained:
        if len(trained) > 1:
            lines.append(f"  optimizer #{i + 1} ({groups[i][0].get('wrapped') or 'optimizer'}):")
        # The decision log holds one optimizer's periods only when one optimizer trained.
        lines += _figures(groups[i], batch, log_path if len(trained) == 1 else None)
    notes = sorted({n for r in reports for n in r["notes"]})
    if notes:
        lines.append(f"  left to Horovod      {'; '.join(notes)}")
    if show_log and log_path and os.path.isfile(log_path):
        lines.append(f"  decision log         {log_path}")
    return lines


def nothing_wrapped_warning(reports: list) -> str | None:
    if not reports or any(r["used"] for r in reports):
        return None
    direct = sorted({m for r in reports for m in r.get("direct", [])})
    if direct:
        return (f"alsgd-run: warning: nothing was injected: the script uses {', '.join(direct)} "
                f"itself; alsgd-run only passed the config and collected no figures")
    notes = sorted({n for r in reports for n in r["notes"]})
    looked = ", ".join(symbol for symbol, _, _ in WRAPS[:5])
    why = f" ({'; '.join(notes)})" if notes else ""
    return (f"alsgd-run: warning: nothing was injected: the script used none of {looked}{why}; "
            f"it ran as plain Horovod")


# -- help -----------------------------------------------------------------------------------------
USAGE = ("usage: alsgd-run [horovodrun options] [--alsgd-config FILE] [--alsgd-dry-run] "
         "[--alsgd-run-dir DIR] COMMAND ...")
DESCRIPTION = """\
Run an unmodified Horovod script under horovodrun with adaptive local SGD.

Every option before COMMAND is horovodrun's (-np, -H, --hostfile, --gloo, --mpi,
--min-np/--max-np/--host-discovery-script, ...) except the --alsgd-* options below,
which are removed before horovodrun is called. In every worker, Horovod's
DistributedOptimizer (PyTorch, TensorFlow, Keras) and DistributedGradientTape (in a
tf.function) are swapped for adaptive-lsgd's, and Keras fit gets LocalSGDCallback;
the script file is not changed. The config is checked before anything starts. When
the job ends, alsgd-run prints the steps, syncs per level, the periods over time, the
communication share and the throughput.

examples:
  ALSGD_WARMUP=0 alsgd-run -np 2 -H localhost:2 --gloo python train.py
  alsgd-run -np 8 --hostfile hosts --alsgd-config lsgd.yaml python train.py --epochs 90
  alsgd-run -np 2 --alsgd-dry-run python train.py"""


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_keys_help(width: int = 79) -> str:
    """The config keys with their defaults and meanings, as plain text (from the core's
    ``KEYS``, ``DEFAULTS`` and ``MEANINGS``)."""
    import textwrap

    key_w = max(len(k) for k in KEYS) + 2
    def_w = max(len(_default_text(DEFAULTS[k])) for k in KEYS) + 2
    indent = " " * (2 + key_w + def_w)
    lines = ["configuration keys (in a --alsgd-config YAML/JSON file, the file named by",
             "ALSGD_CONFIG, or as ALSGD_<KEY> variables, e.g. ALSGD_WARMUP=500; variables",
             "win over the file):",
             "  " + "key".ljust(key_w) + "default".ljust(def_w) + "meaning"]
    for key in KEYS:
        head = "  " + key.ljust(key_w) + _default_text(DEFAULTS[key]).ljust(def_w)
        lines += textwrap.wrap(MEANINGS[key], width=width, initial_indent=head,
                               subsequent_indent=indent, break_on_hyphens=False)
    return "\n".join(lines) + "\n\nhorovodrun's own options: horovodrun --help"


def help_parser() -> argparse.ArgumentParser:
    """A parser for ``--help`` only (the command line itself is split by :func:`split_argv`)."""
    p = argparse.ArgumentParser(prog="alsgd-run", usage=USAGE[len("usage: "):],
                                description=DESCRIPTION, epilog=config_keys_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("--alsgd-config", metavar="FILE",
                   help="YAML/JSON config file (keys below); checked before launch and handed "
                        "to every worker as ALSGD_* variables")
    p.add_argument("--alsgd-dry-run", action="store_true",
                   help="print the horovodrun command, the workers' environment, the effective "
                        "config and what would be wrapped; start nothing")
    p.add_argument("--alsgd-run-dir", metavar="DIR",
                   help="where the workers write their figures (default: a temporary directory; "
                        "use a shared file system when workers run on other hosts)")
    p.add_argument("command", metavar="COMMAND ...", nargs=argparse.REMAINDER,
                   help="the training command, e.g. python train.py --epochs 90")
    return p


# -- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_parser().format_help().rstrip())
        return 0 if argv else 2
    horovodrun = (shutil.which("horovodrun", path=os.path.dirname(sys.executable))
                  or shutil.which("horovodrun"))
    try:
        if horovodrun is None:
            raise UsageError("horovodrun not found next to this Python or on PATH (install Horovod)")
        parser = _horovod_parser()
        ours, hvd_args, command = split_argv(argv, parser)
        if not command:
            raise UsageError("no command to run (e.g. alsgd-run -np 2 python train.py)")
        hvd_ns = check_horovod_args(parser, hvd_args, command)
        check_script(command)
        if ours["config"] is not None and not os.path.isfile(ours["config"]):
            raise UsageError(f"--alsgd-config {ours['config']!r}: no such file")
        own_dir = ours["run_dir"] is None
        if own_dir:
            run_dir = (os.path.join(tempfile.gettempdir(), "alsgd-run-XXXXXXXX") if ours["dry_run"]
                       else tempfile.mkdtemp(prefix="alsgd-run-"))
        else:
            run_dir = os.path.abspath(ours["run_dir"])
            if not ours["dry_run"]:
                os.makedirs(run_dir, exist_ok=True)
        try:
            env, cfg = worker_env(ours["config"], run_dir, dict(os.environ))
        except ConfigError as exc:
            if own_dir and not ours["dry_run"]:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise UsageError(str(exc)) from None
    except UsageError as exc:
        print(f"alsgd-run: error: {exc}", file=sys.stderr)
        return 2
    cmd = [horovodrun, *hvd_args, *command]
    if ours["dry_run"]:
        dry_run(cmd, env, cfg)
        return 0
    errors, warnings = check_hosts(remote_hosts(job_hosts(hvd_ns)), command, env, INJECT_DIR,
                                   run_dir, hvd_ns.ssh_port, hvd_ns.ssh_identity_file)
    for line in warnings:
        print(f"alsgd-run: warning: {line}", file=sys.stderr, flush=True)
    if errors:
        for line in errors:
            print(f"alsgd-run: error: {line}", file=sys.stderr)
        print("alsgd-run: nothing was launched", file=sys.stderr, flush=True)
        if own_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        return 2
    try:
        rc = subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        rc = 130
    reports = read_reports(run_dir)
    log_path = cfg.log.replace("{rank}", "0") if cfg.log else None
    if log_path and (cfg.log_all_ranks and "{rank}" not in cfg.log):
        root, ext = os.path.splitext(cfg.log)
        log_path = f"{root}.rank0{ext}"
    ours_log = own_dir and log_path and os.path.dirname(os.path.abspath(log_path)) == run_dir
    for line in summarise(reports, log_path, show_log=not ours_log):
        print(f"{TAG} {line}", flush=True)
    warning = nothing_wrapped_warning(reports) if rc == 0 else None
    if warning:
        print(warning, file=sys.stderr, flush=True)
    elif not reports and rc == 0:
        print(f"alsgd-run: note: no worker report in {run_dir} (workers on other hosts write "
              f"theirs there: use --alsgd-run-dir on a shared file system)", file=sys.stderr)
    if own_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
