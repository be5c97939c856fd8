"""Reliability under real Horovod (issue #9 items 1, 2, 3 and 5). Run with ``-s`` to see figures.

* Agreement (item 1): ranks started with a different config key (``config=``, PyTorch and
  TensorFlow) or a different topology (``ALSGD_TOPOLOGY`` set per rank) all stop with one
  error naming the key and every rank's value; the whole ``horovodrun`` job ends in well under
  30 s (the time is printed). A config that is invalid on one rank only also ends the job
  instead of leaving the others in the start-up collective.
* Non-finite guard (item 2): 4 ranks, topology ``2x2``, periods ``[2, 2]``; NaN, +Inf or -Inf
  is written into one rank's weight right before a level-0 (block) sync and before a level-1
  (global) sync. After the sync every rank of the block holds the average of the *healthy*
  members' pre-sync parameters (computed in the test from the gathered pre-sync values), the
  bad rank included, nothing is non-finite, and the decision log records the exclusion (the
  count of excluded members at a block sync, the excluded ranks at a global sync, and
  ``nonfinite_reset`` on the rank that was reset). PyTorch and TensorFlow.
* No deadlock under noise (item 3): 4 ranks on an emulated 2-host cluster (2 workers per
  host, shaped links), 5,000 steps of the adaptive policy (``max_period`` 16, so at least 19
  global syncs) with random per-rank sleeps (0-3 ms, 2% of steps 20 ms), and the
  inter-host link dropped 10x once rank 0 has logged step 2,500: every rank finishes, the
  models end identical and the four decision logs are identical. Wall time, steps/s and the
  periods before/after the change are printed.
* Ends of hierarchical runs: one block leaves its loop 3 s before the other's last block sync;
  every rank finishes (the integrations' exit barrier), PyTorch and TensorFlow. A rank that
  crashes still ends the job at once.
* Checkpoint and resume (item 5): 4 ranks, PyTorch, fixed periods ``[2, 3]`` on ``2x2``,
  post-local SGD switching at the first LR drop (step 13), momentum, a MultiStepLR. Run A goes
  40 steps unbroken; run B saves per-rank checkpoints (model, optimizer with the scheduler
  state under ``"alsgd"``, LR scheduler) after step 8 (before the switch) and step 23 (local
  phase, mid-round) and stops; a fresh run C resumes each. Parameters equal A's (1e-5;
  the mini-batch phase's fused allreduce may sum in another order) and every decision record
  after the checkpoint equals A's (all keys except measured times). Adaptive policy (decisions
  depend on measured time, so A is not comparable; topology ``2x2``): the scheduler state C
  restores equals what B saved, and a core scheduler loaded from B's saved state, fed the very
  inputs C's scheduler received (step times, learning rates, reduced payloads), takes the same
  sync plans and decisions and ends in the same state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
from conftest import HOROVODRUN, REPO, horovodrun, results

TORCH = "tests/reliability_workers/torch_cases.py"
TF = "tests/reliability_workers/tf_cases.py"
TIMED = ("time", "compute_s", "comm_s", "link_s", "predicted_comm_fraction")


def horovodrun_failing(np: int, args: list, timeout: int = 120) -> tuple:
    """Run a job expected to fail: (returncode, output, seconds)."""
    if not os.path.exists(HOROVODRUN):
        pytest.skip("horovodrun is not installed (run `make test`, which sets up .venv)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALSGD_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    cmd = [HOROVODRUN, "-np", str(np), "-H", f"localhost:{np}", "--gloo", sys.executable, *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def marks(output: str, tag: str, case: str) -> dict:
    """{rank: (unix time, rest of line)} of the worker lines ``TAG case rank time rest``."""
    out = {}
    for m in re.finditer(rf"^\[\d+\]<stdout>:{tag} {case} (\d+) ([\d.]+) ?(.*)$", output, re.M):
        out[int(m.group(1))] = (float(m.group(2)), m.group(3))
    return out


def check_mismatch(np: int, script: str, case: str, key: str, values: list, label: str) -> None:
    rc, out, seconds = horovodrun_failing(np, [script, case])
    ended = time.time()
    assert rc != 0, out[-3000:]
    assert "RESULT" not in out, "a rank went on past the agreement check"
    started, stopped = marks(out, "MARK", case), marks(out, "MISMATCH", case)
    assert sorted(started) == list(range(np)), out[-3000:]
    assert sorted(stopped) == list(range(np)), f"not every rank raised the mismatch:\n{out[-3000:]}"
    shown = ", ".join(f"rank {r}={v!r}" for r, v in enumerate(values))
    for _, msg in stopped.values():
        assert msg == f"ranks disagree on the adaptive-lsgd config: {key}: {shown}", msg
    first_in = min(t for t, _ in started.values())
    check = max(t for t, _ in stopped.values()) - max(t for t, _ in started.values())
    print(f"\n[agreement] {label}: {np} ranks all raised; {check:.2f}s from the last rank entering "
          f"the check to the last rank raising, {ended - first_in:.1f}s from the first rank entering "
          f"it to the end of the job; whole horovodrun job (start-up included) {seconds:.1f}s, "
          f"exit code {rc}")
    assert ended - max(t for t, _ in started.values()) < 30  # start-up skew between ranks excluded


@pytest.mark.torch
def test_config_mismatch_stops_every_rank_torch():
    check_mismatch(2, TORCH, "mismatch_config", "max_period", [8, 9], "torch, max_period via config=")


@pytest.mark.torch
def test_topology_mismatch_from_env_stops_every_rank_torch():
    check_mismatch(4, TORCH, "mismatch_env_topology", "topology", ["2x2", "2x2", "flat", "flat"],
                   "torch, topology via ALSGD_TOPOLOGY")


@pytest.mark.tensorflow
def test_config_mismatch_stops_every_rank_tensorflow():
    check_mismatch(2, TF, "mismatch_config", "max_period", [8, 9], "tensorflow, max_period via config=")


@pytest.mark.torch
def test_config_invalid_on_one_rank_ends_the_job():
    rc, out, seconds = horovodrun_failing(2, [TORCH, "invalid_on_one_rank"])
    ended = time.time()
    assert rc != 0 and "RESULT" not in out
    assert re.search(r"^\[1\]<stderr>:.*max_period", out, re.M), out[-3000:]
    started = marks(out, "MARK", "invalid_on_one_rank")
    assert sorted(started) == [0, 1], out[-3000:]
    last_in = max(t for t, _ in started.values())
    print(f"\n[agreement] torch, max_period=0 on rank 1 only: the job ended {ended - last_in:.1f}s after "
          f"the last rank began building; whole job (start-up included) {seconds:.1f}s, exit {rc}")
    assert ended - last_in < 30


# -- blocks that end apart ------------------------------------------------------------------------
@pytest.mark.parametrize("framework", [pytest.param("torch", marks=pytest.mark.torch),
                                       pytest.param("tensorflow", marks=pytest.mark.tensorflow)])
def test_blocks_that_end_apart_both_finish(framework):
    """2x2: block (2, 3) reaches its last block-local sync 3 s after block (0, 1) has left the
    loop. Horovod's exit shutdown is global, so without the integrations' exit barrier rank 0's
    exit kills block (2, 3)'s sync ("Process set provided does not exist"); with it every rank
    finishes and the early block waits for the late one."""
    script, case = (TORCH, "uneven_end") if framework == "torch" else (TF, "tf_uneven_end")
    worker_case = "uneven_end"
    start = time.time()
    rows = per_rank(results(horovodrun(4, [script, worker_case], timeout=300)), case, 4)
    assert all(r["syncs"] == [5, 0] for r in rows), rows  # steps 2, 4, .., 10: five block syncs
    late = min(r["t"] for r in rows[2:]) - max(r["t"] for r in rows[:2])
    print(f"\n[exit barrier] {framework}: all 4 ranks finished; block (2, 3) left its loop "
          f"{late:.2f}s after block (0, 1); job {time.time() - start:.1f}s")
    assert late > 2.5  # the late block really was late (the barrier, not luck, kept the job alive)


@pytest.mark.torch
def test_a_crash_is_not_held_up_by_the_exit_barrier():
    """Rank 3 raises mid-run while the others train on: the job ends with an error promptly
    (the barrier is skipped after an uncaught exception; it never waits its 120 s)."""
    rc, out, seconds = horovodrun_failing(4, [TORCH, "crash_in_block"], timeout=300)
    ended = time.time()
    assert rc != 0 and "injected failure on rank 3" in out, out[-3000:]
    started = marks(out, "MARK", "crash_in_block")
    assert sorted(started) == [0, 1, 2, 3], out[-3000:]
    after = ended - max(t for t, _ in started.values())
    print(f"\n[exit barrier] rank 3 crashed at step 6: job ended {after:.1f}s after the last rank "
          f"started training (whole job {seconds:.1f}s), exit {rc}")
    assert after < 60


# -- item 2 ---------------------------------------------------------------------------------------
def per_rank(res: dict, case: str, n: int) -> list:
    assert case in res, f"case {case} printed nothing"
    rows = sorted(res[case], key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == list(range(n))
    return rows


def read_log(path: str) -> list:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def check_nonfinite_log(logs: list, events: list, blocks0: list) -> None:
    """The decision logs (one per rank) record each exclusion at the right sync."""
    for ev in events:
        step, level, bad = ev["step"], ev["level"], ev["bad_rank"]
        for rank, log in enumerate(logs):
            rec = next(r for r in log if r["step"] == step and r["level"] == level)
            if level == 1:
                assert rec["excluded_ranks"] == [bad], rec
            else:
                same_block = any(rank in b and bad in b for b in blocks0)
                assert rec["excluded"] == (1 if same_block else 0), rec
            assert rec.get("nonfinite_reset", False) == (rank == bad), rec
        assert all(not r.get("nonfinite_reset") for log in logs for r in log
                   if r["step"] not in {e["step"] for e in events})


@pytest.mark.torch
def test_nonfinite_rank_is_left_out_and_reset_torch(tmp_path):
    proc = horovodrun(4, [TORCH, "nonfinite"], env={"REL_CASE_DIR": str(tmp_path)}, timeout=300)
    rows = per_rank(results(proc), "nonfinite", 4)
    events = rows[0]["events"]
    assert [(e["step"], e["level"], e["value"]) for e in events] == [
        (6, 0, "nan"), (8, 1, "inf"), (10, 0, "inf"), (12, 1, "nan"), (14, 0, "-inf")]
    for r in rows:
        assert r["events"] == events  # the same gathered values on every rank
        assert r["final_finite"] and r["final_identical"]
        assert r["syncs"] == [5, 6]  # 20 steps: blocks at 2, 6, ..., 18; all at 4, ..., 20 and the end
    for e in events:
        assert not e["pre_finite"][e["bad_rank"]] and sum(e["pre_finite"]) == 3  # really injected
        assert e["max_diff"] <= 1e-6, e  # every rank holds the average of the healthy members
        assert e["bad_equals_block"]
        assert e["healthy_in_block"] == ([3] * 4 if e["level"] == 1 else
                                         [1 if e["bad_rank"] // 2 == r // 2 else 2 for r in range(4)])
        print(f"[nonfinite] torch step {e['step']} level {e['level']} rank {e['bad_rank']}={e['value']}: "
              f"max |param - healthy average| = {e['max_diff']:.2e}")
    check_nonfinite_log([read_log(r["log"]) for r in rows], events, [[0, 1], [2, 3]])
    for e in events:  # each reset rank also says so on stderr (the log may be rank 0's only)
        assert (f"[{e['bad_rank']}]<stderr>:adaptive-lsgd: rank {e['bad_rank']} had non-finite "
                f"parameters at step {e['step']}; left out of the level-{e['level']} average") in \
            proc.stdout + proc.stderr
    # The momentum run (same injections): the bad rank's momentum was reset, training stayed finite.
    assert all(r["momentum_finite_steps"] == 20 for r in rows)


@pytest.mark.tensorflow
def test_nonfinite_rank_is_left_out_and_reset_tensorflow(tmp_path):
    res = results(horovodrun(4, [TF, "nonfinite"], env={"REL_CASE_DIR": str(tmp_path)}, timeout=300))
    rows = per_rank(res, "tf_nonfinite", 4)
    events = rows[0]["events"]
    assert [(e["step"], e["level"]) for e in events] == [(6, 0), (8, 1), (10, 0), (12, 1)]
    for e in events:
        assert e["post_finite"] and e["max_diff"] <= 1e-6, e
        print(f"[nonfinite] tensorflow step {e['step']} level {e['level']} rank {e['bad_rank']}="
              f"{e['value']}: max |param - healthy average| = {e['max_diff']:.2e}")
    check_nonfinite_log([read_log(r["log"]) for r in rows], events, [[0, 1], [2, 3]])


# -- item 5 ---------------------------------------------------------------------------------------
@pytest.mark.torch
def test_checkpoint_resume_equals_unbroken_run(tmp_path):
    env = {"REL_CASE_DIR": str(tmp_path)}
    a = per_rank(results(horovodrun(4, [TORCH, "ckpt_unbroken"], env=env, timeout=300)), "ckpt_unbroken", 4)
    def run(case, part):
        proc = horovodrun(4, [TORCH, case], env={**env, "REL_CKPT_PART": part}, timeout=300)
        return per_rank(results(proc), case, 4)

    run("ckpt_save", "fixed")
    b = run("ckpt_save", "adaptive")
    c8, c23, cad = (run("ckpt_resume", part) for part in ("fixed8", "fixed23", "adaptive"))
    c = [{"fixed": {**r8["fixed"], **r23["fixed"]}, "adaptive": rad["adaptive"]}
         for r8, r23, rad in zip(c8, c23, cad)]
    assert all(r["adaptive_phase"] == "local" for r in b)
    for ra, rc in zip(a, c):
        assert ra["switch_step"] == 13 and ra["syncs"] == [9, 4]
        for t, resumed in rc["fixed"].items():
            diff = max(abs(x - y) for x, y in zip(ra["params"], resumed["params"]))
            after = [rec for rec in ra["log"] if rec["step"] > int(t)]
            assert resumed["restored"], "the scheduler state loaded is not the one saved"
            assert len(after) >= 8 and resumed["log"] == after, f"decisions differ after step {t}"
            assert (resumed["switch_step"], resumed["syncs"]) == (13, [9, 4])
            assert diff <= 1e-5, diff
            if ra["rank"] == 0:
                print(f"[resume] fixed, checkpoint after step {t}: {len(after)} decision records "
                      f"equal, max |param diff| vs unbroken = {diff:.2e}")
        ad = rc["adaptive"]
        assert ad["restored"] and ad["same_plans"] and ad["same_final_state"], ad
        assert ad["steps_fed"] == 40 and len(ad["real_decisions"]) >= 2
        assert ad["twin_decisions"] == ad["real_decisions"]
        if ra["rank"] == 0:
            print(f"[resume] adaptive: restored state equal; {ad['steps_fed']} steps replayed, "
                  f"decisions {ad['real_decisions']} equal")


# -- item 3 ---------------------------------------------------------------------------------------
def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


@pytest.mark.cluster
@pytest.mark.torch
@pytest.mark.skipif(not _netns_usable(), reason="needs root, `ip netns` and `tc` (emulated cluster)")
def test_no_deadlock_under_noise_and_a_link_slowdown(tmp_path):
    from adaptive_lsgd.tools import cluster as emu

    steps, change_at, fast, slow = 5000, 2500, 100, 10
    log0 = tmp_path / "noise.0.jsonl"
    with emu.EmulatedCluster(hosts=2, workers_per_host=2, rate_mbit=[fast, fast], echo=False) as cluster:
        out: dict = {}
        runner = threading.Thread(target=lambda: out.update(result=cluster.run(
            [sys.executable, os.path.join(REPO, TORCH), "noise"], cwd=REPO, timeout=540,
            env={"REL_CASE_DIR": str(tmp_path), "REL_STEPS": str(steps), "OMP_NUM_THREADS": "1",
                 "CUDA_VISIBLE_DEVICES": ""})))
        runner.start()
        changed = None
        while runner.is_alive():  # drop the link 10x once rank 0 has logged step 2,500
            if changed is None and log0.exists():
                records = read_log(str(log0))[:-1]  # the last line may be partial
                if records and records[-1]["step"] >= change_at:
                    changed = (time.time(), records[-1]["step"])
                    for host in range(2):
                        cluster.set_rate(host, slow)
            runner.join(0.2)
    result = out["result"]
    assert result.ok, result.output[-4000:]
    assert changed is not None, "the run ended before the link changed"
    rows = {}
    for rank, stream, text in result.lines:
        if stream == "stdout" and text.startswith("RESULT noise "):
            rows[rank] = json.loads(text.split(" ", 2)[2])
    assert sorted(rows) == [0, 1, 2, 3]
    logs = [[{k: v for k, v in rec.items() if k not in ("time",)} for rec in read_log(rows[r]["log"])]
            for r in range(4)]
    for r in range(4):
        assert rows[r]["steps"] == steps and rows[r]["final_identical"]
    assert len(logs[0]) > 50
    assert all(log == logs[0] for log in logs[1:]), "decision logs differ between ranks"
    timed = read_log(rows[0]["log"])
    decisions = [rec for rec in timed if "decision" in rec]
    before = [rec["periods"] for rec in decisions if rec["time"] < changed[0]]
    after = [rec["periods"] for rec in decisions if rec["time"] >= changed[0]]
    assert len(decisions) >= 5000 // (16 * 16)  # max_period 16: a global sync every <= 256 steps
    wall = max(row["wall_s"] for row in rows.values())
    print(f"\n[noise] 4 ranks x {steps} steps on 2 emulated hosts: {wall:.1f}s, "
          f"{steps / wall:.0f} steps/s per rank; job {result.elapsed:.1f}s; "
          f"{len(decisions)} global decisions, syncs per level {rows[0]['syncs']}; "
          f"link {fast} -> {slow} Mbit/s at step {changed[1]}")
    print(f"[noise] periods before the change: last {before[-1] if before else None}, "
          f"distinct {sorted(set(map(tuple, before)))}")
    print(f"[noise] periods after the change:  last {after[-1] if after else None}, "
          f"distinct {sorted(set(map(tuple, after)))}")
    top = [(rec["time"] >= changed[0], rec["link_s"][-1]) for rec in decisions if rec["link_s"]]
    for label, flag in (("before", False), ("after", True)):
        vals = sorted(v for f, v in top if f == flag)
        shown = f"median {vals[len(vals) // 2] * 1e3:.1f} ms over {len(vals)} decisions" if vals else "n/a"
        print(f"[noise] level-1 link estimate {label} the change: {shown}")
    prev = None
    for rec in decisions:
        if rec["periods"] != prev:
            print(f"[noise]   step {rec['step']:5d}: periods {rec['periods']} ({rec['decision']}), "
                  f"link_s {rec['link_s']}, compute_s {rec['compute_s']}")
        prev = rec["periods"]
