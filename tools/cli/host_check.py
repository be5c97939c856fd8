"""``alsgd-run``'s check of the remote hosts, before anything is launched.

horovodrun reaches a remote host over ssh and runs the worker command there with the launcher's
environment. When that host lacks what the job needs, the job fails late and far away: a
traceback per worker, or no adaptive-lsgd at all (the injected ``sitecustomize`` is found by a
path that only exists on the launching machine) and plain Horovod runs unnoticed. So before
launching, :func:`check_hosts` opens one ssh session per remote host, the way horovodrun will
(``ssh -o PasswordAuthentication=no -o StrictHostKeyChecking=no HOST``, its ``--ssh-port`` and
``--ssh-identity-file``), and runs the job's Python there with the job's PATH and PYTHONPATH:
it must import Horovod and adaptive-lsgd, load the injected ``sitecustomize``, and see the
script and every file the config names (``profile``). What is missing comes back as one line
per host and nothing is started.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor

from adaptive_lsgd.config import ENV_PREFIX

PROBE = r"""
import importlib, json, os, sys
out = {"python": sys.executable, "imports": {}, "missing": [], "sitecustomize": None}
for name in ("horovod", "adaptive_lsgd.config"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        out["imports"][name] = f"{type(exc).__name__}: {exc}"
site = sys.modules.get("sitecustomize")
out["sitecustomize"] = getattr(site, "__file__", None)
for what, path in json.loads(sys.argv[1]):
    if not os.path.exists(path):
        out["missing"].append([what, path])
out["run_dir"] = os.path.isdir(sys.argv[2]) if sys.argv[2] else None
print("ALSGD-HOST-CHECK " + json.dumps(out))
"""
SSH_TIMEOUT_S = 10


def job_hosts(args) -> list:
    """The host names of the job from horovodrun's parsed options: ``-H``, ``--hostfile``, or
    what ``--host-discovery-script`` prints now (elastic); [] when none is given (localhost)."""
    from horovod.runner.common.util import hosts as hvd_hosts

    if getattr(args, "hosts", None):
        return [h.hostname for h in hvd_hosts.parse_hosts(args.hosts)]
    if getattr(args, "hostfile", None):
        return [h.hostname for h in hvd_hosts.parse_hosts(hvd_hosts.parse_host_files(args.hostfile))]
    script = getattr(args, "host_discovery_script", None)
    if script:
        try:
            proc = subprocess.run(script, shell=True, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return []
        if proc.returncode != 0:
            return []
        return [line.strip().split(":")[0] for line in proc.stdout.splitlines() if line.strip()]
    return []


def remote_hosts(names: list) -> list:
    """Those of ``names`` that horovodrun will reach over ssh (not this machine), in order."""
    from horovod.runner.util import network

    remote = set(network.filter_local_addresses(names))
    return list(dict.fromkeys(n for n in names if n in remote))


def _job_python(command: list) -> str | None:
    from adaptive_lsgd.tools.cli.run import _PYTHON

    return command[0] if command and _PYTHON.match(os.path.basename(command[0])) else None


def needed_paths(command: list, env: dict, inject_dir: str) -> list:
    """``[(what, absolute path), ...]`` that every host must see."""
    from adaptive_lsgd.tools.cli.run import python_script

    paths = [("adaptive-lsgd's injected sitecustomize", os.path.join(inject_dir, "sitecustomize.py"))]
    script = python_script(command)
    if script is not None:
        paths.append(("the script", os.path.abspath(script)))
    profile = env.get(ENV_PREFIX + "PROFILE")
    if profile:
        try:
            profile = json.loads(profile)
        except ValueError:
            pass
        if isinstance(profile, str) and profile:
            paths.append((f"the profile ({ENV_PREFIX}PROFILE)", os.path.abspath(profile)))
    return paths


def _ssh_prefix(host: str, ssh_port, identity_file) -> str:
    parts = ["ssh", "-o", "PasswordAuthentication=no", "-o", "StrictHostKeyChecking=no",
             "-o", f"ConnectTimeout={SSH_TIMEOUT_S}"]
    if ssh_port:
        parts += ["-p", str(ssh_port)]
    if identity_file:
        parts += ["-i", identity_file]
    return " ".join(shlex.quote(p) for p in parts + [host])


def probe_host(host: str, command: list, env: dict, inject_dir: str, run_dir: str | None,
               ssh_port=None, identity_file=None, timeout: float = 60) -> tuple:
    """``(errors, warnings)`` for one remote host: lines that name the host and what is wrong."""
    python = _job_python(command)
    paths = needed_paths(command, env, inject_dir)
    exports = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("PATH", "PYTHONPATH") if env.get(k))
    if python is None:  # not a Python command: only the files can be checked
        remote = " && ".join(f"test -e {shlex.quote(p)}" for _, p in paths) + " && echo ok"
    else:
        remote = (f"{exports} {shlex.quote(python)} -c {shlex.quote(PROBE)} "
                  f"{shlex.quote(json.dumps(paths))} {shlex.quote(run_dir or '')}")
    line = f"cd {shlex.quote(os.getcwd())} > /dev/null 2>&1 ; {remote}"
    cmd = f"{_ssh_prefix(host, ssh_port, identity_file)} {shlex.quote(line)}"
    try:
        proc = subprocess.run(cmd, shell=True, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"host {host}: no answer over ssh within {timeout:g} s"], []
    err = (proc.stderr.strip().splitlines() or [""])[-1]
    if proc.returncode == 255:
        return [f"host {host}: cannot be reached over ssh ({err or 'ssh exited with 255'})"], []
    if python is None:
        if proc.returncode != 0:
            return [f"host {host}: lacks one of " + ", ".join(f"{w} {p}" for w, p in paths)], []
        return [], []
    if proc.returncode == 127:
        return [f"host {host}: the job's Python {python} does not exist there"], []
    report = next((ln.split(" ", 1)[1] for ln in proc.stdout.splitlines()
                   if ln.startswith("ALSGD-HOST-CHECK ")), None)
    if report is None:
        return [f"host {host}: {python} there failed (exit {proc.returncode}: {err})"], []
    found = json.loads(report)
    errors = [f"host {host}: {python} there cannot import {name} ({why})"
              for name, why in found["imports"].items()]
    errors += [f"host {host}: {what} {path} does not exist there" for what, path in found["missing"]]
    expected_site = os.path.join(inject_dir, "sitecustomize.py")
    if expected_site not in [p for _, p in found["missing"]] and found["sitecustomize"] != expected_site:
        errors.append(f"host {host}: {python} there does not load adaptive-lsgd's sitecustomize "
                      f"({expected_site}), it loads {found['sitecustomize']}")
    warnings = []
    if run_dir and found["run_dir"] is False:
        warnings.append(f"host {host} does not see the run directory {run_dir}: its workers' figures "
                        f"(and the decision log, if rank 0 is there) stay on that host; use "
                        f"--alsgd-run-dir on a shared file system")
    return errors, warnings


def check_hosts(hosts: list, command: list, env: dict, inject_dir: str, run_dir: str | None,
                ssh_port=None, identity_file=None) -> tuple:
    """Probe every remote host at once; ``(errors, warnings)`` in host order."""
    if not hosts:
        return [], []
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        found = list(pool.map(lambda h: probe_host(h, command, env, inject_dir, run_dir, ssh_port,
                                                   identity_file), hosts))
    return [e for errs, _ in found for e in errs], [w for _, warns in found for w in warns]
