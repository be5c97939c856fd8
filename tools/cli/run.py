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
from adaptive_lsgd.config import ENV_FILE, ENV_PREFIX, ConfigError, load_config, read_config_file
from adaptive_lsgd.decision_log import read_log
from adaptive_lsgd.summary import combine_summaries

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


def check_horovod_args(parser, hvd_args: list, command: list) -> None:
    """Let horovodrun's parser judge its options now; its complaint becomes one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(hvd_args + command)
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
    if config_path is not None:
        env[ENV_FILE] = os.path.abspath(config_path)
    cfg = load_config(None, env=env)
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
    if steps_per_s is None:
        return "n/a"
    if batch:
        return f"{steps_per_s * batch:,.0f} samples/s"
    return f"{steps_per_s:,.1f} steps/s (batch size unknown)"


def summarise(reports: list, log_path: str | None, show_log: bool = True) -> list:
    """The lines alsgd-run prints after the job (empty when nothing was wrapped)."""
    wrapped = [r for r in reports if r["summaries"]]
    if not wrapped:
        return []
    by_rank: dict = {}  # one report per rank: the process that took the most steps (elastic)
    for r in wrapped:
        best = by_rank.get(r["rank"])
        if best is None or r["summaries"][0]["steps"] > best["summaries"][0]["steps"]:
            by_rank[r["rank"]] = r
    per_rank = [dict(r["summaries"][0], rank=rank) for rank, r in sorted(by_rank.items())]
    s = combine_summaries(per_rank)
    used = sorted({u for r in reports for u in r["used"]})
    batch = next((r["batch_size"] for r in wrapped if r.get("batch_size")), None)
    lines = [f"summary ({s['ranks']} ranks; wrapped: {', '.join(used)})",
             f"  steps                {s['steps']} over all ranks "
             f"({s['steps'] // max(1, s['ranks'])} per rank; mini-batch phase {s['switch_step'] or 0} steps)",
             f"  syncs per level      {s['syncs_per_level']}"]
    changes = periods_over_time(log_path)
    if changes:
        lines.append("  periods over time    " + " -> ".join(
            "..." if p is None else f"step {st}: {p}" for st, p in changes))
    lines.append(f"  final periods        {s['periods']}")
    lines.append(f"  communication share  {s['comm_fraction']:.1%} of compute + collective time "
                 f"(local phase)")
    lines.append(f"  throughput           {_rate(s['local_steps_per_s'], batch)} in the local phase "
                 f"(measured, all ranks)"
                 + (f", {_rate(s['mini_batch_steps_per_s'], batch)} in the mini-batch phase"
                    if s["mini_batch_steps_per_s"] is not None else ""))
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


# -- main -----------------------------------------------------------------------------------------
USAGE = ("usage: alsgd-run [horovodrun options] [--alsgd-config FILE] [--alsgd-dry-run] "
         "[--alsgd-run-dir DIR] COMMAND ...")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].rstrip() + "\n\nhorovodrun's options: "
              "horovodrun --help")
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
        check_horovod_args(parser, hvd_args, command)
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
