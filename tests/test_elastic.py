"""Horovod elastic (``horovodrun --min-np/--max-np --host-discovery-script``): a worker killed
mid-run (fixed and adaptive periods, and under ``alsgd-run``), a host removed from a
hierarchical job, a worker joining. The job goes on from the last commit with the scheduler
state intact, syncs continue over the new world, and every worker's decision log agrees.

One machine, several "hosts": Horovod runs a host locally, without ssh, when its name resolves
to one of this machine's addresses, and blacklists a failed worker's *host* name. So the
discovery script prints a hosts file listing names that all mean this machine
(``localhost``, ``127.0.0.1``, the host name, ...); tests/elastic_workers/train.py kills
itself, or edits the hosts file, at a chosen step.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import stat
import subprocess
import sys
import time

import psutil
import pytest
from conftest import HOROVODRUN, REPO, results

pytestmark = pytest.mark.torch
WORKER = "tests/elastic_workers/train.py"


def local_host_names(n: int) -> list:
    """``n`` distinct names that resolve to an address of this machine (Horovod then starts
    their workers locally), or skip."""
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family == socket.AF_INET}
    names = []
    for name in ["localhost", "127.0.0.1", socket.gethostname(), *sorted(local)]:
        try:
            if socket.gethostbyname(name) in local and name not in names:
                names.append(name)
        except OSError:
            continue
    if len(names) < n:
        pytest.skip(f"need {n} names for this machine, found {names}")
    return names[:n]


def elastic_run(tmp_path, slots: dict, min_np: int, env: dict, max_np: int | None = None,
                timeout: int = 420, launcher: list | None = None):
    """Run the worker under elastic horovodrun (or ``launcher``, which takes horovodrun's
    arguments) on ``slots`` ({host: slots}); return the process and its wall time."""
    if not os.path.exists(HOROVODRUN):
        pytest.skip("horovodrun is not installed (run `make test`, which sets up .venv)")
    (tmp_path / "hosts").write_text("".join(f"{h}:{n}\n" for h, n in slots.items()))
    script = tmp_path / "discover.sh"  # prints the hosts file, which a worker may change
    script.write_text(f"#!/bin/sh\ncat {tmp_path / 'hosts'}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    np_ = sum(slots.values())
    cmd = [*(launcher or [HOROVODRUN]), "-np", str(np_), "--min-np", str(min_np),
           "--max-np", str(max_np or np_), "--host-discovery-script", str(script), "--gloo",
           "--start-timeout", "120", "--elastic-timeout", "120",
           os.path.join(os.path.dirname(HOROVODRUN), "python"), WORKER]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ALSGD_")}
    full_env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
                    OMP_NUM_THREADS="1", HOROVOD_GLOO_TIMEOUT_SECONDS="30", EL_DIR=str(tmp_path),
                    **{k: str(v) for k, v in env.items()})
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        pytest.fail(f"horovodrun exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-20000:]}")
    return proc, wall


def decision_log(tmp_path, worker: dict) -> list:
    """A worker's decision records in order (its rank, hence its file, may change at a reset)."""
    records = []
    for path in glob.glob(str(tmp_path / f"decisions.{worker['host']}.{worker['pid']}.*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            records += [json.loads(line) for line in fh if line.strip()]
    records.sort(key=lambda r: r["time"])
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def check_resumed(proc, tmp_path, *, steps, restored, size_before, size_after, killed=True,
                  logs=True):
    """What every elastic case asserts; returns the survivors' records. ``restored``: the
    commit the job went on from. After a failure (``killed``) every survivor takes rank 0's
    committed model (``TorchState.sync``); after a graceful removal each keeps its own."""
    survivors = results(proc)["elastic"]
    assert len(survivors) == size_after
    new_root = next(w for w in survivors if w["rank"] == 0)
    for w in survivors:
        # The job finished on the smaller world, step counters agreeing.
        assert (w["size"], w["batch"], w["final"]["step"]) == (size_after, steps, steps)
        assert w["final"]["size"] == size_after and w["final_equal"]
        # One reset, back to the last commit.
        assert [(r["batch"], r["size"]) for r in w["resets"]] == [(restored, size_after)]
        (after,) = w["after_reset"]
        committed = w["commits"][str(restored)]["scheduler"]
        sched = after["scheduler"]
        assert after["batch"] == sched["step"] == committed["step"] == restored
        for key in ("phase", "periods", "switch_step"):
            assert sched[key] == committed[key], key
        assert committed["size"] == size_before and sched["size"] == size_after
        # Parameters: the committed model, rank 0's after a failure.
        assert after["crc"] == (new_root if killed else w)["commits"][str(restored)]["crc"]
        # Syncs after the reset run over the new world and leave the models agreeing.
        post = [r for r in w["rows"] if r["size"] == size_after]
        assert [r["batch"] for r in post] == list(range(restored + 1, steps + 1))
        assert all(r["step"] == r["batch"] for r in w["rows"])
        top = len(sched["levels"]) - 1
        synced = [r for r in post if r["level"] is not None]
        assert synced, "no sync after the reset"
        assert all(r["block_equal"] for r in synced)
        assert all(r["all_equal"] for r in synced if r["level"] == top)
    if logs:
        check_logs(tmp_path, survivors, restored, size_before, size_after)
    return survivors


def check_logs(tmp_path, survivors, restored, size_before, size_after):
    """Every survivor wrote the same decisions, including the reset record."""
    logs = [decision_log(tmp_path, w) for w in survivors]
    assert logs[0] and all(log == logs[0] for log in logs)
    resets = [r for r in logs[0] if r.get("event") == "elastic_reset"]
    assert [(r["step"], r["size"], r["previous_size"]) for r in resets] == \
        [(restored, size_after, size_before)]
    cut = logs[0].index(resets[0])
    assert any(r.get("level") is not None and r["step"] > restored for r in logs[0][cut:])
    # The killed worker's log is the survivors' up to its death (minus the replayed steps).
    for path in glob.glob(str(tmp_path / "decisions.*.jsonl")):  # none if it died before a sync
        if not any(f".{w['pid']}." in path for w in survivors):
            with open(path, encoding="utf-8") as fh:
                dead = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in fh]
            assert dead == logs[0][:len(dead)]


def synced(worker: dict, size: int) -> list:
    """The steps after which ``worker`` synced while the world had ``size`` ranks."""
    return [r["batch"] for r in worker["rows"] if r["size"] == size and r["level"] is not None]


def report(name, wall, event, survivors, commit):
    reset_at = survivors[0]["resets"][0]
    print(f"\n{name}: wall {wall:.1f} s, {event}, went on from the commit at step "
          f"{reset_at['batch']} (every {commit}) with {reset_at['size']} workers; final periods "
          f"{survivors[0]['final']['periods']}, syncs per level since the reset "
          f"{survivors[0]['summary']['syncs_per_level']}")


def kill_run(tmp_path, slots, config, *, steps, commit, kill):
    """Kill the worker on the last host at step ``kill``; check the job went on from the last
    commit over the others."""
    hosts = list(slots)
    proc, wall = elastic_run(tmp_path, slots, min_np=sum(slots.values()) - slots[hosts[-1]], env={
        "EL_STEPS": steps, "EL_COMMIT": commit, "EL_KILL_STEP": kill, "EL_KILL_HOST": hosts[-1],
        "EL_CONFIG": json.dumps(config)})
    assert "KILLING" in proc.stdout and (tmp_path / "killed").exists(), "no worker was killed"
    size = sum(slots.values())
    survivors = check_resumed(proc, tmp_path, steps=steps, restored=kill // commit * commit,
                              size_before=size, size_after=size - slots[hosts[-1]])
    return survivors, wall


def test_fixed_periods_worker_killed_in_local_phase(tmp_path):
    """3 hosts x 1 slot, post-local SGD (6 mini-batch steps, then H=3); the worker on the
    third host dies at step 13, inside a sync; the two others go on from the commit at 10."""
    steps, commit, kill = 30, 5, 13
    survivors, wall = kill_run(tmp_path, dict.fromkeys(local_host_names(3), 1),
                               {"policy": "fixed", "periods": [3], "warmup": 6},
                               steps=steps, commit=commit, kill=kill)
    for w in survivors:
        assert synced(w, 3) == [9, 12]  # local from step 7: every 3 steps, over 3 ranks
        assert synced(w, 2) == list(range(13, steps + 1, 3))  # a fresh round from step 10
    report("fixed H=3", wall, f"worker killed at step {kill}", survivors, commit)


def test_adaptive_worker_killed_in_mini_batch_phase(tmp_path):
    """Adaptive periods after 12 mini-batch steps; the third worker dies at step 8, inside
    Horovod's own gradient allreduce; the switch to local SGD happens after the reset."""
    steps, commit, kill = 40, 5, 8
    survivors, wall = kill_run(tmp_path, dict.fromkeys(local_host_names(3), 1),
                               {"policy": "adaptive", "periods": [2], "warmup": 12, "max_period": 8},
                               steps=steps, commit=commit, kill=kill)
    for w in survivors:
        assert w["after_reset"][0]["scheduler"]["phase"] == "mini-batch"
        assert w["final"]["switch_step"] == 12 and w["final"]["phase"] == "local"
        assert synced(w, 3) == [] and synced(w, 2)[0] == 14  # H=2 from the switch at 12
    report("adaptive", wall, f"worker killed at step {kill}", survivors, commit)


def test_hierarchical_host_removed_rebuilds_process_sets(tmp_path):
    """Hosts A:2, B:1, C:1: two levels (A's pair every H_0 steps, everyone every H_1 rounds),
    so a process set for A's pair. C leaves the discovery list at step 10 (a graceful
    removal: Horovod interrupts at the next commit); the others rebuild the process set in
    the new Horovod world and go on with the same periods."""
    hosts = local_host_names(3)
    steps, commit, remove = 60, 5, 10
    proc, wall = elastic_run(tmp_path, {hosts[0]: 2, hosts[1]: 1, hosts[2]: 1}, min_np=3, env={
        "EL_STEPS": steps, "EL_COMMIT": commit, "EL_REMOVE_STEP": remove,
        "EL_CONFIG": json.dumps({"policy": "fixed", "periods": [2, 3], "warmup": 0,
                                "topology": "hosts"})})
    assert "REMOVING" in proc.stdout
    survivors = results(proc)["elastic"]
    restored = survivors[0]["resets"][0]["batch"]
    assert restored > remove and restored % commit == 0
    survivors = check_resumed(proc, tmp_path, steps=steps, restored=restored, size_before=4,
                              size_after=3, killed=False)
    for w in survivors:
        levels = w["after_reset"][0]["scheduler"]["levels"]
        assert len(levels) == 2 and sorted(len(b) for b in levels[0]) == [1, 2]
        assert w["after_reset"][0]["sets_registered"]  # made anew, not the dropped ones
        post = [r for r in w["rows"] if r["size"] == 3 and r["level"] is not None]
        assert {r["level"] for r in post} == {0, 1}
    before = next(iter(survivors[0]["commits"].values()))["scheduler"]["levels"][0]
    after = survivors[0]["after_reset"][0]["scheduler"]["levels"][0]
    pair = [[b for b in blocks if len(b) == 2][0] for blocks in (before, after)]
    report("hierarchical fixed [2, 3]", wall, f"a host removed at step {remove} (the pair's "
           f"ranks {pair[0]} -> {pair[1]})", survivors, commit)


@pytest.mark.parametrize("outer", [False, True])
def test_worker_joins_and_receives_the_scheduler_state(tmp_path, outer):
    """Hosts A:1, B:1; C:1 is added to the discovery list at step 10. Horovod interrupts at
    the next commit; the new worker builds its runtime on its first step, receiving rank 0's
    scheduler state, and all three go on with the same periods and the same decisions.
    ``outer``: with the outer Nesterov step over bf16 syncs, the joining worker also receives
    rank 0's committed outer state (last global model, momentum): same state on all three,
    models equal at the end (a worker without it would sync in another format and hang, or
    step differently)."""
    hosts = local_host_names(3)
    steps, commit, add = 40, 5, 10
    config = {"policy": "fixed", "periods": [3], "warmup": 6}
    if outer:
        config.update(outer_optimizer="nesterov", compression="bf16")
    proc, wall = elastic_run(tmp_path, {hosts[0]: 1, hosts[1]: 1}, min_np=2, max_np=3, env={
        "EL_STEPS": steps, "EL_COMMIT": commit, "EL_ADD_STEP": add, "EL_ADD_HOST": f"{hosts[2]}:1",
        "EL_CONFIG": json.dumps(config)})
    assert "ADDING" in proc.stdout
    workers = results(proc)["elastic"]
    assert len(workers) == 3
    old = [w for w in workers if w["resets"]]
    (new,) = [w for w in workers if not w["resets"]]
    assert len(old) == 2 and new["host"] == hosts[2]
    joined = old[0]["resets"][0]["batch"]
    assert joined > add and joined % commit == 0
    root = next(w for w in workers if w["rank"] == 0)
    committed = root["commits"][str(joined)]
    for w in workers:
        assert (w["size"], w["batch"], w["final"]["step"], w["final_equal"]) == (3, steps, steps, True)
        (after,) = w["after_reset"]
        assert after["batch"] == after["scheduler"]["step"] == joined
        for key in ("phase", "periods", "switch_step"):
            assert after["scheduler"][key] == committed["scheduler"][key], key
        assert after["scheduler"]["size"] == 3 and after["crc"] == committed["crc"]
        if outer:  # rank 0's committed outer state, on the new worker too
            assert after["scheduler"]["outer"] == committed["scheduler"]["outer"]
            assert committed["scheduler"]["outer"]["ready"]
            assert w["final"]["outer"]["steps"] > committed["scheduler"]["outer"]["steps"]
        assert synced(w, 3) == list(range(joined + 3, steps + 1, 3))
        assert all(r["all_equal"] for r in w["rows"] if r["size"] == 3 and r["level"] is not None)
    logs = [decision_log(tmp_path, w) for w in workers]
    tails = [log[next(i for i, r in enumerate(log) if r.get("event") == "elastic_reset"):]
             for log in logs]
    assert len(tails[0]) > 1 and all(t == tails[0] for t in tails)
    assert (tails[0][0]["step"], tails[0][0]["size"], tails[0][0]["previous_size"]) == (joined, 3, 2)
    report("join", wall, f"host {hosts[2]} added at step {add}", old, commit)


def test_alsgd_run_unmodified_elastic_script_worker_killed(tmp_path):
    """The same kill under ``alsgd-run``: an unmodified Horovod elastic script
    (``hvd.DistributedOptimizer``, ``hvd.elastic.TorchState``) gets adaptive-lsgd's optimizer
    from alsgd-run, and the job goes on from the last commit with the scheduler state."""
    hosts = local_host_names(3)
    steps, commit, kill = 30, 5, 13
    config = tmp_path / "alsgd.json"
    config.write_text(json.dumps({"policy": "fixed", "periods": [3], "warmup": 6}))
    run_dir = tmp_path / "run"
    launcher = [sys.executable, "-m", "adaptive_lsgd.tools.cli.run", "--alsgd-config", str(config),
                "--alsgd-run-dir", str(run_dir)]
    proc, wall = elastic_run(tmp_path, dict.fromkeys(hosts, 1), min_np=2, launcher=launcher, env={
        "EL_PLAIN": 1, "EL_STEPS": steps, "EL_COMMIT": commit, "EL_KILL_STEP": kill,
        "EL_KILL_HOST": hosts[-1]})
    assert "KILLING" in proc.stdout
    survivors = check_resumed(proc, tmp_path, steps=steps, restored=kill // commit * commit,
                              size_before=3, size_after=2, logs=False)
    for w in survivors:
        assert synced(w, 3) == [9, 12] and synced(w, 2) == list(range(13, steps + 1, 3))
    # alsgd-run's decision log (rank 0's, which survived) holds the reset.
    with open(run_dir / "decisions.jsonl", encoding="utf-8") as fh:
        resets = [r for r in map(json.loads, fh) if r.get("event") == "elastic_reset"]
    assert [(r["step"], r["size"], r["previous_size"]) for r in resets] == [(10, 2, 3)]
    assert "[alsgd-run] summary" in proc.stdout
    report("alsgd-run fixed H=3", wall, f"worker killed at step {kill}", survivors, commit)
