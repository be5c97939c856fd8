"""Several hosts the way users launch them: ``horovodrun -H a:2,b:2`` and ``alsgd-run -H a:2,b:2``
from the root namespace, reaching two emulated hosts over ssh (``EmulatedCluster(ssh=True)``:
one sshd per network namespace, throwaway keys, torn down on every way out).

Nothing here starts a worker itself: the launchers do (ssh, the environment they forward,
Gloo's rendezvous across hosts, their interface discovery), so what reaches a remote worker
(``ALSGD_*``, ``--alsgd-config``, the injected module, the decision log path) is what a user's
job gets. Needs root, ``ip netns``, ``tc`` and openssh-server (``make setup`` as root installs
it); skipped with the reason otherwise.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import stat
import subprocess

import pytest
from conftest import HOROVODRUN, REPO, results
from test_run import _summary

from adaptive_lsgd.decision_log import read_log
from adaptive_lsgd.tools import cluster as emu

PY = os.path.join(os.path.dirname(HOROVODRUN), "python")
ALSGD_RUN = [PY, "-m", "adaptive_lsgd.tools.cli.run"]
BASE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "HOROVOD_GLOO_TIMEOUT_SECONDS": "60"}


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd per emulated host)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs `ip` and `tc` (iproute2)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is not usable here"
    try:
        emu.require_ssh()
    except emu.ClusterError as exc:
        return str(exc)
    if importlib.util.find_spec("horovod") is None or not os.path.exists(HOROVODRUN):
        return "Horovod is not installed (run `make test`, which sets up .venv)"
    return None


WHY_NOT = _why_not()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


def _clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALSGD_", "_ALSGD_"))}
    env.update(BASE_ENV)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def cluster():
    """Two emulated hosts with two slots each, reachable over ssh; unshaped links."""
    with emu.EmulatedCluster(hosts=2, workers_per_host=2, ssh=True, echo=False) as c:
        yield c


def launch(cluster, command: list, env: dict | None = None, timeout: float = 400):
    result = cluster.launch(command, env=_clean_env(env or {}), timeout=timeout, cwd=REPO)
    return result


def _out(result) -> str:
    return (result.stdout + result.stderr)[-12000:]


def addresses(cluster) -> list:
    return [cluster.host_address(h) for h in range(cluster.hosts)]


# -- plain horovodrun: the baseline ---------------------------------------------------------------
def test_plain_horovodrun_reaches_both_hosts_over_ssh(cluster):
    """horovodrun starts two workers on each host over ssh (interfaces found by its own
    discovery) and Gloo connects all four across the hosts."""
    res = launch(cluster, [HOROVODRUN, "-np", "4", "-H", cluster.hosts_arg(), PY,
                           "tests/workers/smoke.py", "torch"], timeout=240)
    assert res.ok, _out(res)
    rows = sorted(results(res)["smoke"], key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1, 2, 3] and {r["size"] for r in rows} == {4}
    for r in rows:  # rank r holds arange(3) + r
        assert r["sum"] == [6.0, 10.0, 14.0] and r["average"] == [1.5, 2.5, 3.5]


# -- alsgd-run on unmodified user scripts -----------------------------------------------------------
CASES = {
    # script and its arguments, config given by, what alsgd-run wraps
    "torch": (["torch_mnist1d.py", "--epochs", "2"], "env", ["horovod.torch.DistributedOptimizer"]),
    "keras": (["keras_mnist1d.py", "--epochs", "2"], "file",
              ["horovod.tensorflow.keras.DistributedOptimizer",
               "tf.keras.Model.fit (LocalSGDCallback added)"]),
    "tf-tape": (["tf2_mnist1d.py", "--steps", "300"], "env",
                ["horovod.tensorflow.DistributedGradientTape"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param("torch", marks=pytest.mark.torch),
                                  pytest.param("keras", marks=pytest.mark.tensorflow),
                                  pytest.param("tf-tape", marks=pytest.mark.tensorflow)])
def test_alsgd_run_over_ssh_finds_the_hosts_and_reaches_remote_workers(cluster, case, tmp_path):
    """``alsgd-run -np 4 -H a:2,b:2`` on an unmodified script: the config (``ALSGD_*`` or
    ``--alsgd-config``) reaches every remote worker, ``topology: auto`` finds two blocks of
    two from the real launch, and the decision log and the summary come back complete."""
    script, given_by, wrapped = CASES[case]
    if importlib.util.find_spec("tensorflow" if case != "torch" else "torch") is None:
        pytest.skip("framework not installed")
    log = tmp_path / "decisions.jsonl"
    config = {"warmup": 0, "max_global_period": 8, "log": str(log)}
    env: dict = {}
    ours = ["--alsgd-run-dir", str(tmp_path / "run")]
    if given_by == "env":
        env.update({f"ALSGD_{k.upper()}": json.dumps(v) if not isinstance(v, str) else v
                    for k, v in config.items()})
    else:
        (tmp_path / "alsgd.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
        ours += ["--alsgd-config", str(tmp_path / "alsgd.yaml")]
    res = launch(cluster, [*ALSGD_RUN, *ours, "-np", "4", "-H", cluster.hosts_arg(), PY,
                           f"tests/user_scripts/{script[0]}", *script[1:]], env=env)
    assert res.ok, _out(res)
    # The script ran to its end and evaluated (how well it trains against plain horovodrun is
    # tests/test_run.py's question, over 8 epochs; 2 epochs on 4 ranks are too few to tell).
    accs = results(res)["accuracy"]
    assert len(accs) >= 1 and all(0.0 <= a["test_acc"] <= 1.0 for a in accs), accs

    # Every rank ran on the host horovodrun put it on, and reported from there.
    summary = _summary(res.stdout)
    a, b = addresses(cluster)
    assert f"[alsgd-run] summary (4 ranks; wrapped: {', '.join(sorted(wrapped))})" in res.stdout
    assert summary["topology"] == (f"hosts {a}: ranks [0, 1], {b}: ranks [2, 3]; levels "
                                   f"[[0, 1], [2, 3]] -> [[0, 1, 2, 3]]"), summary
    # The config reached the remote workers: no warm-up, at most 8 steps between global
    # averages, rank 0's log where the config put it.
    records = read_log(str(log))
    periods = [r["periods"] for r in records if "periods" in r]
    assert records and all(r["phase"] == "local" for r in records if "phase" in r)
    assert all(len(p) == 2 for p in periods) and max(p[0] * p[1] for p in periods) > 1
    assert all(p[0] * p[1] <= 8 for p in periods), periods
    syncs = json.loads(summary["syncs per level"])
    assert syncs == [sum(1 for r in records if r.get("level") == lvl) for lvl in (0, 1)]
    assert summary["final periods"] == str(records[-1]["periods"])
    for key in ("steps", "periods over time", "mechanisms", "communication share", "throughput"):
        assert key in summary, (key, summary)
    assert len(glob.glob(str(tmp_path / "run" / "rank*.json"))) == 4


# -- a host that lacks what the job needs: one line each, before anything starts ---------------------
def test_a_host_lacking_the_package_or_a_file_is_named_before_launch(cluster, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    shutil.copy(os.path.join(REPO, "tests/workers/smoke.py"), job / "smoke.py")
    a, b = addresses(cluster)
    cmd = [*ALSGD_RUN, "-np", "4", "-H", cluster.hosts_arg(), PY, str(job / "smoke.py"), "torch"]
    env = {"ALSGD_WARMUP": "0"}
    with cluster.ssh.hide(1, str(job)), cluster.ssh.hide(1, os.path.join(REPO, "adaptive_lsgd")):
        res = launch(cluster, cmd, env=env, timeout=120)
    assert res.returncode == 2, _out(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("alsgd-run:")]
    assert lines[-1] == "alsgd-run: nothing was launched"
    errors = lines[:-1]
    assert len(errors) == 2 and all(ln.startswith(f"alsgd-run: error: host {b}: ") for ln in errors)
    assert any("cannot import adaptive_lsgd.config" in ln for ln in errors), errors
    assert any(f"the script {job / 'smoke.py'} does not exist there" in ln for ln in errors), errors
    assert a not in res.stderr and "Traceback" not in res.stderr and "RESULT" not in res.stdout
    # and with the host whole again, the same command runs
    res = launch(cluster, cmd, env=env, timeout=240)
    assert res.ok, _out(res)
    assert len(results(res)["smoke"]) == 4


def test_unreachable_host_is_one_line(cluster, tmp_path):
    """A host in -H that no sshd answers on (an address of the cluster's subnet no namespace
    has): one line naming it, not horovodrun's retries."""
    ghost = f"{cluster.subnet}.250"
    res = launch(cluster, [*ALSGD_RUN, "-np", "2", "-H", f"{cluster.host_address(0)}:1,{ghost}:1",
                           PY, "tests/workers/smoke.py", "torch"], timeout=120)
    assert res.returncode == 2, _out(res)
    assert f"alsgd-run: error: host {ghost}: cannot be reached over ssh" in res.stderr
    assert "nothing was launched" in res.stderr


# -- elastic: a host removed and added back -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.torch
def test_elastic_host_removed_and_added_back_over_ssh(cluster, tmp_path):
    """``alsgd-run`` in elastic mode with a discovery script listing both hosts (2 slots each)
    on an unmodified Horovod elastic script: host B leaves the list at step 10 (its workers
    stop, A's go on as one block of two) and comes back at step 25 (two new workers on B get
    rank 0's state); the job ends with two blocks of two again, models equal, and the decision
    log holds both resets."""
    a, b = addresses(cluster)
    steps, commit, remove, add = 45, 5, 10, 25
    (tmp_path / "hosts").write_text(f"{a}:2\n{b}:2\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {tmp_path / 'hosts'}\n")
    discover.chmod(discover.stat().st_mode | stat.S_IEXEC)
    config = tmp_path / "alsgd.json"
    # One block per host (auto is flat in elastic jobs: see Topology.from_config); the
    # adaptive policy picks the periods of whatever hierarchy the hosts give.
    config.write_text(json.dumps({"topology": "hosts", "warmup": 0}))
    run_dir = tmp_path / "run"
    res = launch(cluster, [
        *ALSGD_RUN, "--alsgd-config", str(config), "--alsgd-run-dir", str(run_dir),
        "-np", "4", "--min-np", "2", "--max-np", "4", "--host-discovery-script", str(discover),
        "--start-timeout", "120", "--elastic-timeout", "120", PY, "tests/elastic_workers/train.py"],
        env={"EL_PLAIN": 1, "EL_DIR": tmp_path, "EL_STEPS": steps, "EL_COMMIT": commit,
             "EL_REMOVE_STEP": remove, "EL_REMOVE_HOST": b, "EL_ADD_STEP": add,
             "EL_ADD_HOST": f"{b}:2", "HOROVOD_GLOO_TIMEOUT_SECONDS": "30"}, timeout=480)
    assert res.ok, _out(res)
    assert f"REMOVING {b}" in res.stdout and f"ADDING {b}:2" in res.stdout
    workers = results(res)["elastic"]
    assert sorted(w["host"] for w in workers) == [a, a, b, b]
    old = [w for w in workers if w["host"] == a]
    new = [w for w in workers if w["host"] == b]
    for w in workers:
        assert (w["size"], w["batch"], w["final"]["step"], w["final_equal"]) == (4, steps, steps, True)
        assert w["final"]["levels"] == [[[0, 1], [2, 3]], [[0, 1, 2, 3]]]
    # A's workers went through both resets: 4 -> 2 ranks (one host), then back to 4.
    for w in old:
        assert [r["size"] for r in w["resets"]] == [2, 4], w["resets"]
        gone, back = (r["batch"] for r in w["resets"])
        assert remove < gone <= add < back and gone % commit == 0 and back % commit == 0
        during = [r for r in w["rows"] if r["size"] == 2]
        assert during and all(r["all_equal"] for r in during if r["level"] is not None)
    # B's new workers started from rank 0's committed state at the second reset.
    root = next(w for w in old if w["rank"] == 0)
    for w in new:
        (after,) = w["after_reset"]
        assert after["batch"] == back and after["crc"] == root["commits"][str(back)]["crc"]
    # The decision log (rank 0 stayed on A) holds both resets in order.
    with open(run_dir / "decisions.jsonl", encoding="utf-8") as fh:
        resets = [r for r in map(json.loads, fh) if r.get("event") == "elastic_reset"]
    assert [(r["step"], r["size"], r["previous_size"]) for r in resets] == [(gone, 2, 4), (back, 4, 2)]
    assert "[alsgd-run] summary" in res.stdout
    print(f"elastic over ssh: {b} removed at step {remove} (reset at {gone}), added back at step "
          f"{add} (reset at {back}); {res.elapsed:.1f} s")


# -- teardown ------------------------------------------------------------------------------------
def test_ssh_cluster_leaves_nothing_behind_on_failure():
    c = emu.EmulatedCluster(hosts=2, workers_per_host=1, ssh=True, echo=False)
    with pytest.raises(RuntimeError, match="boom"), c:
        ssh_dir = c.ssh.dir
        sshd = c.ssh.server_pids
        assert c.ssh.ssh(c.host_address(1), ["hostname"]).stdout.strip() == c.namespace(1)
        raise RuntimeError("boom")
    assert not os.path.exists(ssh_dir)
    for pid in sshd:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert c.namespace(0) not in names and c.namespace(1) not in names
    assert not os.path.exists(os.path.expanduser("~/.ssh/known_hosts")) or c.host_address(0) not in open(
        os.path.expanduser("~/.ssh/known_hosts")).read()


# -- the benchmark launched through alsgd-run ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.torch
def test_hierarchical_bench_launched_through_alsgd_run(tmp_path):
    """``alsgd-bench hierarchical --launcher alsgd-run`` at a tiny size: the workers come from
    alsgd-run over ssh, the ``horovod`` variant stays Horovod's own optimizer (an allreduce
    every step, though alsgd-run swaps ``hvd.DistributedOptimizer``), and the default
    ``adaptive`` finds the two hosts (two levels)."""
    out = tmp_path / "hier.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALSGD_", "_ALSGD_"))}
    proc = subprocess.run([PY, "-m", "adaptive_lsgd.tools.bench", "hierarchical", "--launcher",
                           "alsgd-run", "--rounds", "1", "--steps", "8", "--variants",
                           "horovod,adaptive", "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert doc["launcher"] == "alsgd-run" and doc["ranks"] == 4
    # the worker refuses to run a horovod baseline that is not Horovod's optimizer
    assert res["horovod"]["global_syncs"] == 8 and res["horovod"]["samples_per_s"] > 0
    assert len(res["adaptive"]["periods"]) == 2 and res["adaptive"]["samples_per_s"] > 0
