"""Horovod's own optimizer tests as the specification of drop-in behaviour (a dev script).

Runs chosen tests of Horovod's ``test/parallel/`` three ways and prints a comparison table:

* ``a``: ``horovodrun -np 2 -H localhost:2 --gloo python -m pytest ...`` (the baseline),
* ``b``: ``alsgd-run`` (same options) with ``ALSGD_WARMUP=100000000``: the mini-batch phase for
  ever, which must behave exactly like ``a``,
* ``c``: ``alsgd-run`` with the default config (local SGD from the first step): only tests that
  assert per-step gradient averaging should fail.

::

    python tools/dev/horovod_tests.py [--horovod-src DIR] [--ref v0.28.1] [--select FILE[::EXPR]]...
        [--modes abc] [--np 2] [--test-timeout 600] [--run-timeout 3600] [--out-dir DIR] [--json OUT]

Horovod's tests are not in its PyPI sdist and are never copied into this project. By default
the ``test/`` tree of ``--ref`` is exported with ``git archive`` from the mirror
(``--mirror``, default ``/work/.mirror/horovod+horovod/repo``) into a temporary directory;
``--horovod-src DIR`` uses the ``test/`` of a checkout instead.

How the tests are run is Horovod's CI's (``Dockerfile.test.cpu``'s ``pytest.sh``, Gloo
parallel step): in ``test/parallel``, ``horovodrun -np 2 -H localhost:2 --gloo pytest -v
--capture=no --continue-on-collection-errors --junit-xml=junit.<rank>.xml FILE``. pytest
runs on every rank; the junit path holds ``$HOROVOD_RANK`` (pytest expands variables in it,
horovodrun's Gloo launcher sets it in every worker). The test modules put ``test/utils`` on
``sys.path`` themselves (``common.py``); it is also on ``PYTHONPATH`` here, as
``test/conftest.py`` would put it. Their imports ``mock`` and ``parameterized`` are not in
the project's venv: when missing they are installed with pip into
``~/.cache/adaptive-lsgd/horovod-test-deps`` (``--deps-dir``), which goes on ``PYTHONPATH``,
never into the venv. ``ALSGD_*`` variables of the caller are removed in every mode.

Default selection (``--select`` replaces it; ``FILE`` alone is the whole file, ``EXPR`` is a
pytest ``-k`` expression): the tests of ``test_torch.py`` that build a
``DistributedOptimizer`` or broadcast optimizer state, all of ``test_tensorflow2_keras.py``,
and the ``DistributedOptimizer``/``DistributedGradientTape`` tests of ``test_tensorflow.py``.

Outcome per test: ``passed`` only if it passed on every rank; otherwise ``failed``/``error``
(on any rank), ``skipped`` (on every rank), ``timeout`` (still running on some rank after
``--test-timeout`` s, or when the run passed ``--run-timeout``), ``crashed`` (a rank died in
it, ``--crash-retries`` + 1 times: a test in which a rank died is run again, as Gloo's
re-initialisation between tests, ``hvd.shutdown()`` then ``hvd.init()``, now and then aborts
with ``connect ... Connection refused``; the table says ``passed (after 1 crash)``),
``not run``. A small pytest plugin (written to the work directory, loaded with ``-p``)
records each rank's progress as it goes, so that after a hang or a crash the job is killed,
the test in progress is marked and the run goes on with the tests not yet done
(``--deselect``); before it kills a hung job it has each rank's pytest print every thread's
stack into the log (``faulthandler`` on ``SIGUSR1``). The junit files give the outcomes and
first error lines where they exist; the plugin's record fills in where a rank was killed
before writing its junit file.

Output: a markdown table test -> outcome under each mode, the tests whose outcome differs
between ``a`` and ``b`` with the first error line from ``b``, the tests that do not pass in
``c`` with their first error line, and the time per mode. ``--json OUT`` writes all of it.
Logs of every run are kept under ``--out-dir`` (default: a temporary directory, printed).

One change to the environment, the same in every mode: ``test_broadcast_state``,
``test_broadcast_state_options`` and ``test_force_allreduce`` loop over
``torch.optim.Optimizer.__subclasses__()``, and torch 2.13's ``Muon`` (2-D parameters only)
raises ``ValueError`` on their models before any Horovod behaviour is checked; the plugin hides
it from ``__subclasses__()`` (``--torch-hide-optimizer NAME``, repeatable; ``''`` for none).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

DEFAULT_MIRROR = "/work/.mirror/horovod+horovod/repo"
DEFAULT_REF = "v0.28.1"
DEFAULT_DEPS_DIR = os.path.join(os.path.expanduser("~"), ".cache", "adaptive-lsgd", "horovod-test-deps")
TEST_DEPS = {"mock": "mock", "parameterized": "parameterized"}  # module -> pip requirement

TORCH_K = " or ".join([
    "broadcast_state",            # test_broadcast_state{,_gpu,_options,_no_grad}: optimizer state
    "force_allreduce",
    "model_parallelism",
    "delta_optimizer",
    "duplicate_names",
    "dynamic_requires_grad",
    "gradient_clipping",
    "synchronize_step_warning",
    "named_parameters",           # test_no_/test_missing_/test_optimizer_no_named_parameters
    "sparse_embeddings",
    "optimizer_process_sets",
])
TF_K = "local_gradient_aggregation or partial_distributed_gradient_tape or model_parallel_model"
DEFAULT_SELECTIONS = [
    ("test_torch.py", TORCH_K),
    ("test_tensorflow2_keras.py", None),
    ("test_tensorflow.py", TF_K),
]

MODES = {
    "a": ("horovodrun", {}),
    "b": ("alsgd-run", {"ALSGD_WARMUP": "100000000"}),
    "c": ("alsgd-run", {}),
}
MODE_TITLES = {
    "a": "(a) horovodrun",
    "b": "(b) alsgd-run, warmup 1e8",
    "c": "(c) alsgd-run, defaults",
}
SEVERITY = {"passed": 0, "skipped": 1, "failed": 3, "error": 4}

PLUGIN = r'''
"""Progress of one rank, one JSON line per event (written by tools/dev/horovod_tests.py)."""
import json
import os
import time

_path = os.path.join(os.environ["HVDTEST_PROGRESS_DIR"],
                     "progress.%s.jsonl" % os.environ.get("HOROVOD_RANK", "x"))
_file = open(_path, "a", buffering=1)
_reports = {}


def _write(**event):
    event["t"] = time.time()
    _file.write(json.dumps(event) + "\n")
    _file.flush()


def _message(report):
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        text = crash.message
    elif isinstance(getattr(report, "longrepr", None), tuple):
        text = str(report.longrepr[-1])
    else:
        text = str(getattr(report, "longrepr", "") or "")
    at = ""
    if crash is not None and getattr(crash, "lineno", None) is not None and report.outcome == "failed":
        at = " [at %s:%s]" % (os.path.basename(str(crash.path)), crash.lineno)
    for line in text.splitlines():
        if line.strip():
            return line.strip() + at
    return at.strip()


def pytest_collection_finish(session):
    _hide_torch_optimizers()
    import faulthandler
    import signal

    # the driver sends SIGUSR1 before it kills a job that hung: every thread's stack to stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _write(event="collected", nodeids=[item.nodeid for item in session.items], pid=os.getpid())


def _hide_torch_optimizers():
    """torch.optim.Optimizer.__subclasses__() without the named classes (tests that loop over
    every torch optimizer, on a torch newer than they know)."""
    import sys

    hidden = set(filter(None, os.environ.get("HVDTEST_HIDE_TORCH_OPTIMIZERS", "").split(",")))
    optim = sys.modules.get("torch.optim")
    if not hidden or optim is None:
        return
    subclasses = type.__subclasses__
    optim.Optimizer.__subclasses__ = classmethod(
        lambda cls: [c for c in subclasses(cls) if c.__name__ not in hidden])


def pytest_runtest_logstart(nodeid, location):
    _reports[nodeid] = []
    _write(event="start", nodeid=nodeid)


def pytest_runtest_logreport(report):
    _reports.setdefault(report.nodeid, []).append(
        (report.when, report.outcome, bool(getattr(report, "wasxfail", False)), _message(report)))


def pytest_runtest_logfinish(nodeid, location):
    outcome, message = "passed", ""
    for when, out, _xfail, msg in _reports.pop(nodeid, []):
        if out == "failed":
            new = "failed" if when == "call" else "error"
        elif out == "skipped":
            new = "skipped"
        else:
            continue
        if {"passed": 0, "skipped": 1, "failed": 3, "error": 4}[new] > \
                {"passed": 0, "skipped": 1, "failed": 3, "error": 4}[outcome]:
            outcome, message = new, msg
    _write(event="end", nodeid=nodeid, outcome=outcome, message=message)


def pytest_sessionfinish(session, exitstatus):
    _write(event="finish", exitstatus=int(exitstatus))
'''


# -- preparing the sources and the environment ----------------------------------------------------
def export_tests(mirror: str, ref: str, dest: str) -> str:
    """``git archive REF test/`` of the mirror into DEST; returns DEST/test."""
    if not os.path.isdir(mirror):
        raise SystemExit(f"horovod_tests: no git mirror at {mirror} (give --horovod-src DIR or --mirror DIR)")
    archive = subprocess.run(["git", "-C", mirror, "archive", "--format=tar", ref, "test/"],
                             capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"horovod_tests: git archive {ref} test/ in {mirror} failed: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return os.path.join(dest, "test")


def tool(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"horovod_tests: {name} not found next to {sys.executable} or on PATH")
    return found


def ensure_test_deps(python: str, deps_dir: str, install: bool) -> list:
    """Directories to put on PYTHONPATH so that Horovod's tests find ``mock``/``parameterized``."""
    def missing(extra):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(extra + [os.environ.get("PYTHONPATH", "")]))
        out = []
        for module in TEST_DEPS:
            rc = subprocess.run([python, "-c", f"import {module}"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
            if rc != 0:
                out.append(module)
        return out

    need = missing([])
    if not need:
        return []
    if missing([deps_dir]) and install:
        os.makedirs(deps_dir, exist_ok=True)
        reqs = [TEST_DEPS[m] for m in need]
        print(f"[horovod-tests] installing {' '.join(reqs)} into {deps_dir} (not into the venv)", flush=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--upgrade",
                        "--target", deps_dir, *reqs], check=True)
    still = missing([deps_dir])
    if still:
        print(f"[horovod-tests] warning: {', '.join(still)} not importable; tests that need it "
              "will fail to collect", file=sys.stderr)
    return [deps_dir]


def clean_env(extra_paths: list) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ALSGD_") and not k.startswith("_ALSGD_")}
    env["PYTHONPATH"] = os.pathsep.join(extra_paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# -- one job (a selection in a mode, restarted after a hang or a crash) ---------------------------
def read_progress(progress_dir: str, np_: int) -> dict:
    """rank -> {"collected": [...], "started": {nodeid: t}, "ended": {nodeid: (outcome, msg)},
    "finished": bool, "last": t}."""
    ranks = {}
    for rank in range(np_):
        state = {"collected": None, "started": {}, "ended": {}, "finished": False, "last": None,
                 "pid": None}
        path = os.path.join(progress_dir, f"progress.{rank}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue  # a line being written
                    state["last"] = ev.get("t")
                    if ev["event"] == "collected":
                        state["collected"] = ev["nodeids"]
                        state["pid"] = ev.get("pid")
                    elif ev["event"] == "start":
                        state["started"][ev["nodeid"]] = ev["t"]
                    elif ev["event"] == "end":
                        state["ended"][ev["nodeid"]] = (ev["outcome"], ev["message"])
                    elif ev["event"] == "finish":
                        state["finished"] = True
        ranks[rank] = state
    return ranks


def read_junit(path: str) -> dict:
    """nodeid (``file.py::Class::name``) -> (outcome, first message line) of one rank."""
    out = {}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return out
    for case in root.iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        module, _, cls = classname.rpartition(".")
        if not module:
            module, cls = classname, ""
        nodeid = "::".join(p for p in [module.replace(".", "/") + ".py", cls, name] if p)
        outcome, message = "passed", ""
        for child in case:
            tag = child.tag
            if tag in ("failure", "error", "skipped"):
                new = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                if SEVERITY[new] > SEVERITY[outcome]:
                    text = child.get("message") or (child.text or "")
                    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
                    outcome, message = new, (lines[0] if lines else "")
                    if new != "skipped":
                        message += where(child.text or "")
        prev = out.get(nodeid)
        if prev is None or SEVERITY[outcome] > SEVERITY[prev[0]]:
            out[nodeid] = (outcome, message)
    return out


def where(traceback_text: str) -> str:
    """`` [at FILE:LINE: source]`` from a pytest traceback: where the test's assertion or error
    was (the last ``FILE:LINE: Error`` line and the last ``>`` source line), so that a bare
    ``assert False`` names its line."""
    locs = re.findall(r"^(\S+\.py):(\d+): \w+", traceback_text, re.M)
    src = [ln[1:].strip() for ln in traceback_text.splitlines() if ln.startswith(">")]
    if not locs:
        return ""
    path, line = locs[-1]
    return f" [at {os.path.basename(path)}:{line}" + (f": {src[-1][:160]}" if src else "") + "]"


def dump_stacks(prog: dict) -> None:
    """SIGUSR1 to each rank's pytest (the plugin's faulthandler prints every thread's stack to
    the log), then a few seconds for the output to come through horovodrun."""
    sent = False
    for st in prog.values():
        if st.get("pid") and not st["finished"]:
            try:
                os.kill(st["pid"], signal.SIGUSR1)
                sent = True
            except (ProcessLookupError, PermissionError):
                pass
    if sent:
        time.sleep(5)


def kill_group(proc: subprocess.Popen) -> None:
    """End the job this script started: horovodrun's process group, then any of its
    descendants still alive (horovodrun starts each worker in a session of its own)."""
    try:
        import psutil

        descendants = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing, or horovodrun already gone
        descendants = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue
    for child in descendants:
        try:
            if child.is_running():
                child.kill()
        except Exception:
            pass


def run_job(mode: str, file: str, expr, ctx) -> dict:
    """Run FILE[-k EXPR] in MODE; returns {"tests": {nodeid: result}, "order": [...], "seconds": s,
    "attempts": [...]}."""
    launcher, mode_env = MODES[mode]
    results, order, attempts = {}, [], []
    deselect = []
    crashes = {}  # nodeid -> [message of each crash retried]
    total = 0.0
    job = f"{mode}-{os.path.splitext(file)[0]}"
    for attempt in range(1, ctx.max_attempts + 1):
        work = os.path.join(ctx.out_dir, f"{job}.{attempt}")
        shutil.rmtree(work, ignore_errors=True)  # an earlier invocation's files would be read as ours
        os.makedirs(work)
        junit = os.path.join(work, "junit.rank$HOROVOD_RANK.xml")
        pytest_args = ["-v", "--capture=no", "--continue-on-collection-errors", "-p", "no:cacheprovider",
                       "-p", "alsgd_hvdtest_progress", f"--junitxml={junit}", file]
        if expr:
            pytest_args += ["-k", expr]
        for nodeid in deselect:
            pytest_args += ["--deselect", nodeid]
        hvd_args = ["-np", str(ctx.np), "-H", f"localhost:{ctx.np}", "--gloo"]
        cmd = [ctx.tools[launcher], *hvd_args, ctx.python, "-m", "pytest", *pytest_args]
        env = dict(ctx.env)
        env.update(mode_env)
        env["HVDTEST_PROGRESS_DIR"] = work
        env["HVDTEST_HIDE_TORCH_OPTIMIZERS"] = ",".join(ctx.hide_torch_optimizers)
        env["PYTHONPATH"] = os.pathsep.join([ctx.plugin_dir, env["PYTHONPATH"]])
        log_path = os.path.join(work, "output.log")
        shown = " ".join(f"{k}={v}" for k, v in mode_env.items())
        print(f"[horovod-tests] {MODE_TITLES[mode]}: {file}{' -k ' + repr(expr) if expr else ''}"
              f"{f' (attempt {attempt}, {len(deselect)} deselected)' if attempt > 1 else ''}", flush=True)
        with open(log_path, "w") as log:
            log.write(f"# cwd: {ctx.parallel_dir}\n# env: {shown}\n# " + shlex.join(cmd) + "\n")
            log.flush()
            start = time.time()
            proc = subprocess.Popen(cmd, cwd=ctx.parallel_dir, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            killed = None
            try:
                while proc.poll() is None:
                    time.sleep(2)
                    now = time.time()
                    if now - start > ctx.run_timeout - total:
                        killed = f"run past --run-timeout {ctx.run_timeout:.0f} s"
                        break
                    prog = read_progress(work, ctx.np)
                    for rank, st in prog.items():
                        for nodeid, t0 in st["started"].items():
                            if nodeid not in st["ended"] and now - t0 > ctx.test_timeout:
                                killed = (f"{nodeid} ran past --test-timeout {ctx.test_timeout:.0f} s "
                                          f"on rank {rank}")
                        if killed:
                            break
                    if killed:
                        break
            except BaseException:  # Ctrl-C, SIGTERM: end the job we started, then stop
                kill_group(proc)
                raise
            if killed:
                dump_stacks(read_progress(work, ctx.np))
                kill_group(proc)
            rc = proc.wait()
            seconds = time.time() - start
        total += seconds
        prog = read_progress(work, ctx.np)
        junits = {r: read_junit(os.path.join(work, f"junit.rank{r}.xml")) for r in range(ctx.np)}
        collected = next((st["collected"] for st in prog.values() if st["collected"] is not None), None)
        attempts.append({"attempt": attempt, "rc": rc, "seconds": round(seconds, 1), "killed": killed,
                         "log": log_path, "deselected": list(deselect)})
        if killed:
            print(f"[horovod-tests]   killed: {killed} (each rank's stacks: {log_path})", flush=True)
        if collected is None:  # nothing collected (import error, launch failure)
            if not order:
                line = first_error_line(log_path)
                results.setdefault(f"{file}::<collection>", {
                    "outcome": "timeout" if killed else "error", "ranks": {},
                    "message": killed or line})
                order.append(f"{file}::<collection>")
            break
        for nodeid in collected:
            if nodeid not in order:
                order.append(nodeid)
        progressed = False
        for nodeid in collected:
            if nodeid in results:
                continue
            per_rank = {}
            for r in range(ctx.np):
                if nodeid in junits[r]:
                    per_rank[r] = junits[r][nodeid]
                elif nodeid in prog[r]["ended"]:
                    per_rank[r] = prog[r]["ended"][nodeid]
            if len(per_rank) == ctx.np:
                results[nodeid] = combine(per_rank)
                if nodeid in crashes:
                    results[nodeid]["crashes"] = crashes[nodeid]
                progressed = True
        unfinished = [n for n in collected if n not in results]
        if not unfinished:
            break
        # the test that hung (killed) or in which a rank died: the one in progress on the rank
        # horovodrun names as failed, else the first started but not ended on some rank
        def in_progress(st, unfinished=unfinished):
            return [n for n in unfinished if n in st["started"] and n not in st["ended"]]

        dead_rank, exit_code = (None, None) if killed else failed_process(log_path)
        stuck = None
        if dead_rank is not None and dead_rank in prog and in_progress(prog[dead_rank]):
            stuck = in_progress(prog[dead_rank])[0]
        else:
            stuck = next((n for n in unfinished if any(n in in_progress(st) for st in prog.values())), None)
        if stuck is not None:
            done = {r: prog[r]["ended"][stuck] for r in prog if stuck in prog[r]["ended"]}
            if killed:
                outcome, message = "timeout", killed
            else:
                outcome = "crashed"
                who = f"rank {dead_rank}" if dead_rank is not None else "a rank"
                last = last_error_line(log_path, dead_rank)
                message = f"{who} died in it (exit code {exit_code})" + (f": {last}" if last else "")
            if outcome == "crashed" and len(crashes.get(stuck, [])) < ctx.crash_retries:
                # Gloo's re-initialisation between tests (hvd.shutdown, hvd.init) now and then
                # aborts with "connect ... Connection refused": run the test again
                crashes.setdefault(stuck, []).append(message)
                print(f"[horovod-tests]   {stuck}: {message[:160]}; running it again", flush=True)
            else:
                results[stuck] = {"outcome": outcome, "message": message,
                                  "ranks": {str(r): list(v) for r, v in done.items()}}
                if crashes.get(stuck):
                    results[stuck]["crashes"] = crashes[stuck]
            progressed = True
        if not progressed or attempt == ctx.max_attempts or total >= ctx.run_timeout:
            for nodeid in unfinished:
                if nodeid not in results:
                    results[nodeid] = {"outcome": "not run", "ranks": {},
                                       "message": killed or f"job ended (rc {rc}) before it ran"}
            break
        deselect = [n for n in order if n in results]
    return {"tests": results, "order": order, "seconds": round(total, 1), "attempts": attempts}


def combine(per_rank: dict) -> dict:
    outcomes = {r: o for r, (o, _) in per_rank.items()}
    if all(o == "passed" for o in outcomes.values()):
        outcome, message = "passed", ""
    elif all(o == "skipped" for o in outcomes.values()):
        outcome, message = "skipped", per_rank[min(per_rank)][1]
    else:
        worst = max(per_rank, key=lambda r: (SEVERITY[outcomes[r]], -r))
        outcome = outcomes[worst]
        if outcome == "skipped":  # skipped on some ranks, passed on others
            outcome = "skipped on some ranks"
        message = per_rank[worst][1]
        if outcome in ("failed", "error"):
            bad = sorted(r for r, o in outcomes.items() if o in ("failed", "error"))
            if len(bad) < len(outcomes):
                message = f"[rank {','.join(map(str, bad))} only] {message}"
    return {"outcome": outcome, "ranks": {str(r): list(v) for r, v in per_rank.items()}, "message": message}


def failed_process(log_path: str):
    """(rank, exit code) of the worker horovodrun names as failed, or (None, None)."""
    rank = code = None
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                m = re.search(r"Process (\d+) exit with status code (-?\d+)\.", line)
                if m and code is None and m.group(2) != "0":
                    rank, code = int(m.group(1)), int(m.group(2))
                m = re.match(r"Terminating remaining workers after failure of Process (\d+)\.", line)
                if m:
                    rank = int(m.group(1))
                    break
    except OSError:
        pass
    return rank, code


def last_error_line(log_path: str, rank) -> str:
    """What a rank printed when it died: the first error-looking line after its last test
    verdict (a C++ exception's ``what()`` appended), else its last error-looking line."""
    keys = ("Error", "error", "Exception", "terminate called", "Fatal", "Segmentation", "Aborted",
            "Killed", "signal")
    prefix = re.compile(r"^\[(\d+)\]<std(?:out|err)>:(.*)$")
    verdict = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
    lines = []
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                m = prefix.match(line.rstrip("\n"))
                if m and (rank is None or int(m.group(1)) == rank):
                    lines.append(m.group(2).strip())
    except OSError:
        return ""
    last_verdict = max((i for i, ln in enumerate(lines) if verdict.search(ln)), default=-1)
    tail = lines[last_verdict + 1:]
    hits = [ln for ln in tail if any(k in ln for k in keys)] or \
        [ln for ln in lines if any(k in ln for k in keys)][-1:]
    if not hits:
        return ""
    text = hits[0]
    what = next((ln for ln in tail if ln.startswith("what():")), None)
    if what and what != text:
        text = f"{text} {what}"
    return text[:400]


def first_error_line(log_path: str) -> str:
    """A log's first line that looks like an error (for a job that collected nothing or died)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    keys = ("Error", "error:", "Exception", "Traceback", "Segmentation", "core dumped", "Killed")
    for line in lines:
        if line.startswith("#"):
            continue
        body = line.split(">:", 1)[-1].strip()
        if any(k in body for k in keys) and not body.startswith("Traceback"):
            return body[:300]
    return ""


# -- the report -----------------------------------------------------------------------------------
def short_id(nodeid: str) -> str:
    parts = nodeid.split("::")
    return f"{parts[0]}::{parts[-1]}" if len(parts) > 2 else nodeid


def cell(result) -> str:
    return result["outcome"] if result else "-"


def cell_text(result) -> str:
    """The table's cell: the outcome, and how many crashes were run again before it."""
    if not result:
        return "-"
    n = len(result.get("crashes", []))
    if result["outcome"] == "crashed":
        return f"crashed ({n + 1} runs)" if n else "crashed"
    return result["outcome"] + (f" (after {n} crash{'es' if n > 1 else ''})" if n else "")


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(data: dict) -> str:
    modes = data["modes_run"]
    lines = ["| test | " + " | ".join(MODE_TITLES[m] for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for t in data["tests"]:
        row = " | ".join(cell_text(t["results"].get(m)) for m in modes)
        lines.append(f"| `{short_id(t['id'])}` | {row} |")
    out = ["\n".join(lines), ""]
    if "a" in modes and "b" in modes:
        diff = [t for t in data["tests"] if cell(t["results"].get("a")) != cell(t["results"].get("b"))]
        out.append(f"Tests whose outcome differs between (a) and (b): {len(diff)}")
        for t in diff:
            a, b = t["results"].get("a") or {}, t["results"].get("b") or {}
            message = b.get("message", "") or a.get("message", "")
            out.append(f"* `{short_id(t['id'])}`: (a) {cell(a or None)}, (b) {cell(b or None)}: "
                       f"{md_escape(message)}")
        out.append("")
    if "c" in modes:
        bad = [t for t in data["tests"] if cell(t["results"].get("c")) not in ("passed", "skipped", "-")]
        out.append(f"Tests not passing in (c): {len(bad)}")
        for t in bad:
            c = t["results"]["c"]
            base = f" ((a) {cell(t['results'].get('a'))})" if "a" in modes else ""
            out.append(f"* `{short_id(t['id'])}`: {c['outcome']}{base}: {md_escape(c.get('message', ''))}")
        out.append("")
    if data.get("torch_hidden_optimizers"):
        out.append("torch.optim classes hidden from Optimizer.__subclasses__() in every mode: "
                   + ", ".join(data["torch_hidden_optimizers"]))
    out.append("Time per mode: " + ", ".join(f"{MODE_TITLES[m]} {data['seconds'][m]:.0f} s" for m in modes))
    for m in modes:
        counts = {}
        for t in data["tests"]:
            counts[cell(t["results"].get(m))] = counts.get(cell(t["results"].get(m)), 0) + 1
        out.append(f"{MODE_TITLES[m]}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------------
def parse_select(text: str):
    file, sep, expr = text.partition("::")
    return file, (expr if sep and expr else None)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--horovod-src", metavar="DIR",
                   help="a checkout of Horovod's repository (its test/ is used)")
    p.add_argument("--mirror", default=DEFAULT_MIRROR,
                   help=f"git mirror to export from (default {DEFAULT_MIRROR})")
    p.add_argument("--ref", default=DEFAULT_REF, help=f"tag or commit to export (default {DEFAULT_REF})")
    p.add_argument("--select", action="append", metavar="FILE[::EXPR]",
                   help="a test file of test/parallel and an optional pytest -k expression; repeatable; "
                        "replaces the default selection")
    p.add_argument("--modes", default="abc", help="which of a, b, c to run (default abc), in that order")
    p.add_argument("--np", type=int, default=2, help="workers (default 2, on localhost)")
    p.add_argument("--test-timeout", type=float, default=300.0,
                   help="seconds one test may run on a rank before the job is killed (default 300)")
    p.add_argument("--run-timeout", type=float, default=3600.0,
                   help="seconds one file may take in one mode, restarts included (default 3600)")
    p.add_argument("--max-attempts", type=int, default=12,
                   help="runs of one job (restarts after hangs or crashes), at most (default 12)")
    p.add_argument("--crash-retries", type=int, default=2,
                   help="times a test in which a rank died is run again before it counts as "
                        "crashed (default 2)")
    p.add_argument("--torch-hide-optimizer", action="append", metavar="NAME",
                   help="hide a torch.optim class from torch.optim.Optimizer.__subclasses__() in the "
                        "workers, in every mode (default: Muon; '' for none): test_broadcast_state, "
                        "_options and test_force_allreduce loop over every torch optimizer, and torch "
                        "2.13's Muon rejects their 1-D parameters (ValueError) before any Horovod check")
    p.add_argument("--deps-dir", default=DEFAULT_DEPS_DIR,
                   help="where mock/parameterized are installed if missing (default %(default)s)")
    p.add_argument("--no-install", action="store_true", help="do not pip-install missing test dependencies")
    p.add_argument("--out-dir", help="logs and junit files (default: a new temporary directory)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--markdown", metavar="OUT", help="also write the report (markdown) to OUT")
    args = p.parse_args(argv)

    modes = [m for m in "abc" if m in args.modes]
    if not modes or set(args.modes) - set("abc"):
        p.error("--modes takes letters of abc")
    selections = [parse_select(s) for s in args.select] if args.select else DEFAULT_SELECTIONS
    tmp = tempfile.mkdtemp(prefix="horovod-tests-")
    try:
        if args.horovod_src:
            test_dir = os.path.join(os.path.abspath(args.horovod_src), "test")
            ref = f"checkout {os.path.abspath(args.horovod_src)}"
        else:
            test_dir = export_tests(args.mirror, args.ref, tmp)
            ref = f"{args.ref} of {args.mirror}"
        parallel_dir = os.path.join(test_dir, "parallel")
        for file, _ in selections:
            if not os.path.isfile(os.path.join(parallel_dir, file)):
                raise SystemExit(f"horovod_tests: no {file} in {parallel_dir}")
        out_dir = os.path.abspath(args.out_dir) if args.out_dir else os.path.join(tmp, "runs")
        os.makedirs(out_dir, exist_ok=True)
        plugin_dir = os.path.join(tmp, "plugin")
        os.makedirs(plugin_dir, exist_ok=True)
        with open(os.path.join(plugin_dir, "alsgd_hvdtest_progress.py"), "w") as f:
            f.write(PLUGIN)
        python = sys.executable
        deps = ensure_test_deps(python, args.deps_dir, not args.no_install)
        ctx = argparse.Namespace(
            np=args.np, python=python, parallel_dir=parallel_dir, out_dir=out_dir, plugin_dir=plugin_dir,
            env=clean_env(deps + [os.path.join(test_dir, "utils")]),
            tools={"horovodrun": tool("horovodrun"),
                   "alsgd-run": tool("alsgd-run") if set(modes) - {"a"} else None},
            test_timeout=args.test_timeout, run_timeout=args.run_timeout,
            max_attempts=max(1, args.max_attempts), crash_retries=max(0, args.crash_retries),
            hide_torch_optimizers=[n for n in (args.torch_hide_optimizer
                                               if args.torch_hide_optimizer is not None
                                               else ["Muon"]) if n])
        print(f"[horovod-tests] Horovod tests from {ref}; logs under {out_dir}", flush=True)
        jobs = {}
        seconds = {}
        for mode in modes:  # one mode after the other, one job at a time
            seconds[mode] = 0.0
            for file, expr in selections:
                res = run_job(mode, file, expr, ctx)
                jobs[(mode, file, expr)] = res
                seconds[mode] += res["seconds"]
        tests, seen = [], {}
        for file, expr in selections:
            for mode in modes:
                res = jobs[(mode, file, expr)]
                for nodeid in res["order"]:
                    if nodeid not in seen:
                        seen[nodeid] = {"id": nodeid, "file": file, "results": {}}
                        tests.append(seen[nodeid])
                    if nodeid in res["tests"]:
                        seen[nodeid]["results"][mode] = res["tests"][nodeid]
        data = {
            "horovod_tests": ref, "np": args.np, "modes_run": modes,
            "modes": {m: {"launcher": MODES[m][0], "env": MODES[m][1], "title": MODE_TITLES[m]}
                      for m in modes},
            "selections": [{"file": f, "k": e} for f, e in selections],
            "torch_hidden_optimizers": ctx.hide_torch_optimizers,
            "seconds": {m: round(s, 1) for m, s in seconds.items()},
            "jobs": [{"mode": m, "file": f, "k": e, "seconds": r["seconds"], "attempts": r["attempts"]}
                     for (m, f, e), r in jobs.items()],
            "tests": tests,
        }
        text = report(data)
        print()
        print(text, flush=True)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1)
        return 0
    finally:
        if args.out_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            # keep the logs (printed path); drop the exported sources
            for name in ("test", "plugin"):
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
