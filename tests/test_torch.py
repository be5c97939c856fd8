"""PyTorch integration under real Horovod (``horovodrun --gloo``, 2 and 4 processes).

Each launch runs several cases of tests/torch_workers/cases.py (a launch costs seconds);
the tests below assert on what every rank printed.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import horovodrun, results

pytestmark = pytest.mark.torch
WORKER = "tests/torch_workers/cases.py"
TWO = ["minibatch_equals_horovod", "fixed_h4_equals_reference", "peer_periodic_model_averager",
       "optimizer_api", "first_lr_decay", "time_budget", "polite_wait", "overlap_h4_equals_reference",
       "start_from_one_model", "overlap_auto", "outer_reference", "outer_noise_and_resume"]
# process_sets and outer_reference last: in process_sets the set's members run more
# collectives than the other ranks, and outer_reference's leaders' form has the block leaders
# issue more; the chained case runs an unnamed allreduce, which Horovod names by the count of
# operations a process enqueued (README, "Known limits"), so it must come before both.
FOUR = ["hierarchical_2x2", "hierarchical_2x2_chained", "chained_auto", "overlap_instead_of_chained",
        "adaptive_noise", "overlap_adaptive_noise", "auto_mechanisms", "process_sets", "outer_reference"]


@pytest.fixture(scope="module")
def two_ranks():
    return results(horovodrun(2, [WORKER, *TWO], timeout=600))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    case_dir = str(tmp_path_factory.mktemp("torch4"))
    res = results(horovodrun(4, [WORKER, *FOUR], env={"CASE_DIR": case_dir}, timeout=900))
    return res


def per_rank(res, case, n):
    assert case in res, f"case {case} printed nothing"
    rows = sorted(res[case], key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == list(range(n))
    return rows


def test_minibatch_phase_equals_horovod(two_ranks):
    for r in per_rank(two_ranks, "minibatch_equals_horovod", 2):
        assert r["phase"] == "mini-batch" and r["steps"] == 50
        assert r["moved"] > 1e-3          # training really changed the parameters
        assert r["max_diff"] <= 1e-6      # ... exactly as hvd.DistributedOptimizer did
        assert r["rank_spread"] == 0.0    # gradients were allreduced: ranks identical


def test_fixed_h4_equals_reference_local_sgd(two_ranks):
    for r in per_rank(two_ranks, "fixed_h4_equals_reference", 2):
        assert r["max_diff"] <= 1e-6 and r["buffer_diff"] <= 1e-6
        assert r["syncs"] == [10]  # 40 steps / H=4
        assert all(r["identical_after_sync"]), "ranks differ right after a sync"
        assert not any(r["identical_between"]), "ranks identical between syncs: no local steps"


def test_matches_pytorch_periodic_model_averager(two_ranks):
    for r in per_rank(two_ranks, "peer_periodic_model_averager", 2):
        assert r["syncs"] == [7]  # 30 steps / H=4
        assert r["max_diff"] <= 1e-6


def test_optimizer_api(two_ranks):
    for r in per_rank(two_ranks, "optimizer_api", 2):
        assert r["lrs"] == [0.05 * 0.25, 0.1 * 0.25]  # StepLR(5, 0.5) over 12 steps, per group
        assert r["phase"] == "local" and r["step"] == 12
        assert (r["restored_step"], r["restored_phase"], r["restored_syncs"]) == (12, "local", [2])
        assert r["momentum_identical"]  # momentum: average, synced at step 12
        assert r["buffers_identical"]   # BatchNorm running stats averaged with the parameters
        assert r["grads_none"]          # zero_grad(set_to_none=True) works


def test_first_lr_decay_switches_after_the_drop(two_ranks):
    for r in per_rank(two_ranks, "first_lr_decay", 2):
        # MultiStepLR(milestones=[7]): step 8 runs at the lower LR; local SGD from then on
        assert r["switch_step"] == 8 and r["phase"] == "local"
        assert r["syncs"] == [1]  # steps 9..15 with H=4: one sync at step 12


def test_time_budget_gives_the_fast_rank_more_steps(two_ranks):
    rows = per_rank(two_ranks, "time_budget", 2)
    fast, slow = rows
    assert fast["rank_steps"] == slow["rank_steps"]  # a shared decision
    assert fast["rank_steps"][0] > 2 * fast["rank_steps"][1]  # rank 1 sleeps 8x longer
    assert fast["steps"] > 2 * slow["steps"]  # same number of rounds, more local steps
    assert fast["identical"] and slow["identical"]


def test_time_budget_auto_engages_when_a_rank_slows_down(four_ranks):
    """Default config, a stream loop: the last rank computes 2.5x slower from round 30 on, and
    time-budget rounds engage by themselves; every rank took the same decisions (their logs
    are equal but for the clock and the per-rank step counts) and ends on the same model."""
    rows = per_rank(four_ranks, "auto_mechanisms", 4)
    logs = []
    for r in rows:
        assert r["final_identical"]
        with open(r["log"]) as fh:
            logs.append([{k: v for k, v in json.loads(line).items() if k not in ("time", "step")}
                         for line in fh])
    assert all(log == logs[0] for log in logs[1:]), "decision logs differ between ranks"
    switches = [rec for rec in logs[0]
                if "mechanism_reason" in rec and rec["mechanism"]["time_budget"]]
    assert switches and switches[0]["sync"] >= 25  # not before the slowdown at round 30
    assert "slowest/fastest compute" in switches[0]["mechanism_reason"]["time_budget"]
    split = rows[0]["rank_steps"]
    assert all(row["rank_steps"] == split for row in rows)
    assert min(split[:3]) >= 2 * split[3] - 1  # the slow rank takes fewer steps per round
    assert rows[0]["steps"] > rows[3]["steps"]
    assert rows[0]["summary"]["mechanisms"]["time_budget"] is True


def test_overlap_auto_engages_when_averages_cost_more_than_the_steps(two_ranks):
    for r in per_rank(two_ranks, "overlap_auto", 2):
        assert r["mechanisms"]["overlap"] is True, r["why"]
        assert r["seen_inflight"] > 10 and r["final_identical"]
    switch = per_rank(two_ranks, "overlap_auto", 2)[0]["switches"][0]
    assert switch["mechanism"]["overlap"] is True and "overlapped" in switch["mechanism_reason"]["overlap"]


def test_waiting_in_an_average_sleeps_instead_of_spinning(two_ranks):
    waiter, late = per_rank(two_ranks, "polite_wait", 2)
    assert waiter["identical"] and late["identical"]
    assert waiter["wall_s"] >= 1.4  # rank 0 waited for rank 1 ...
    assert waiter["cpu_s"] < 0.3    # ... without burning a core (a spin costs about wall_s)


def test_overlap_applies_each_average_a_round_late(two_ranks):
    for r in per_rank(two_ranks, "overlap_h4_equals_reference", 2):
        assert r["max_diff"] <= 1e-6  # the reference applies the average a round late, exactly so
        # the default overlap_pull (0.5): half of each late correction, as the reference
        assert r["default_pull"] == 0.5 and r["default_pull_diff"] <= 1e-6
        # the average of step 4k completes at step 4(k+1): 9 of 10 done after 40 steps
        assert r["syncs_seen"][3] == 0 and r["syncs_seen"][7] == 1 and r["syncs_seen"][-1] == 9
        # each rank keeps its own last round on top of the average: never identical ...
        assert not any(r["identical_between"])
        # ... until average_now() applies the one in flight and averages once more
        assert r["syncs_after_average"] == [11] and r["final_identical"]
        assert r["warned"]  # state_dict() with an average in flight warns
        assert "'overlap' is not supported in elastic Horovod jobs" in r["elastic_error"]


def agreed_logs(rows: list, steps: int) -> list:
    """Every rank took ``steps`` steps and ends identical; their decision logs (less the clock)
    are equal; rank 0's."""
    logs = []
    for r in rows:
        assert r["steps"] == steps and r["final_identical"]
        with open(r["log"]) as fh:
            logs.append([{k: v for k, v in json.loads(line).items() if k != "time"} for line in fh])
    assert len(logs[0]) > 10
    assert all(log == logs[0] for log in logs[1:]), "decision logs differ between ranks"
    assert any(rec.get("decision") == "adapt" for rec in logs[0])
    return logs[0]


def test_overlap_adaptive_under_random_sleeps_agrees(four_ranks):
    rows = per_rank(four_ranks, "overlap_adaptive_noise", 4)
    agreed_logs(rows, 600)
    assert rows[0]["summary"]["syncs_per_level"][0] >= 10


@pytest.mark.parametrize("case", ["hierarchical_2x2", "hierarchical_2x2_chained"])
def test_hierarchical_2x2_block_and_global_periods(four_ranks, case):
    for r in per_rank(four_ranks, case, 4):
        assert r["levels"] == [[[0, 1], [2, 3]], [[0, 1, 2, 3]]]
        chained = case.endswith("chained")
        # chained (sliced): the ranks holding the same slice, one per host, are the cross link
        assert ([0, 2] in r["process_sets"] and [1, 3] in r["process_sets"]) == chained
        assert r["sliced"] == chained
        assert r["syncs"] == [8, 4]  # 24 steps: blocks every 2 (not at 6k), all every 6
        for row in r["rows"]:
            step = row["step"]
            assert row["unnamed_sum"] == 4.0  # an unnamed allreduce after the step matched
            if step % 6 == 0:
                assert row["all_same"], step
            elif step % 2 == 0:
                assert row["block0_same"] and row["block1_same"] and not row["all_same"], step
            else:
                assert not row["block0_same"] and not row["block1_same"], step


def test_chained_sync_averages_like_one_allreduce(four_ranks):
    """Same seeds and data: the sliced chained sync (reduce-scatter, allreduce, allgather;
    uneven slices of 195 parameters plus the statistics) gives the models one allreduce per
    level gives, up to the order of the float sums."""
    plain = per_rank(four_ranks, "hierarchical_2x2", 4)
    chained = per_rank(four_ranks, "hierarchical_2x2_chained", 4)
    for a, b in zip(plain, chained):
        assert len(a["model"]) == len(b["model"]) == 195
        assert max(abs(x - y) for x, y in zip(a["model"], b["model"])) <= 1e-5


def test_chained_auto_switches_forms_the_same_on_every_rank(four_ranks):
    rows = per_rank(four_ranks, "chained_auto", 4)
    log = agreed_logs(rows, 400)
    for r in rows:
        assert [0, 2] in r["process_sets"] and [1, 3] in r["process_sets"]  # the slices
        assert [0, 1, 2, 3] in r["process_sets"]  # the plain form's top
        assert r["forms"] == rows[0]["forms"]
        assert r["unnamed"] == [4.0]  # every unnamed allreduce after a step matched
        assert "chained" in r["mechanisms"] and "chained" in r["summary"]["mechanisms"]
    forms = rows[0]["forms"]
    assert not forms[0] and any(forms)  # the plain form first, the sliced one taken later
    switches = [rec for rec in log if "mechanism_reason" in rec]
    chained = [rec["mechanism"]["chained"] for rec in switches]
    assert chained[0] is True and "predicted" in switches[0]["mechanism_reason"]["chained"]
    assert "measured" in rows[0]["why"], rows[0]["why"]  # the sliced form's links as it ran


def test_overlap_auto_replaces_the_chained_sync_where_it_prices_faster(four_ranks):
    rows = per_rank(four_ranks, "overlap_instead_of_chained", 4)
    log = agreed_logs(rows, 160)
    for r in rows:
        assert r["mechanisms"] == {"time_budget": False, "overlap": True, "chained": False}, r["why"]
        assert not any(r["forms"])  # no sliced sync ran
        assert r["inflight"] > 10  # averages ran in the background
    first = [rec for rec in log if "mechanism_reason" in rec][0]
    assert first["mechanism"]["overlap"] is True
    assert first["mechanism_reason"]["chained"].endswith(": overlap"), first["mechanism_reason"]


def test_adaptive_under_random_sleeps_agrees(four_ranks):
    rows = per_rank(four_ranks, "adaptive_noise", 4)
    decisions = [rec for rec in agreed_logs(rows, 2000) if "decision" in rec]
    assert all(isinstance(rec["step"], int) and isinstance(rec["periods"], list) for rec in decisions)
    assert os.path.basename(rows[0]["log"]) == "noise.0.jsonl"


def test_first_average_never_mixes_unrelated_initialisations(two_ranks):
    for r in per_rank(two_ranks, "start_from_one_model", 2):
        no_bcast, bcast = r["False"], r["True"]
        assert no_bcast["first_equals_rank0"] and no_bcast["first_identical"]
        assert no_bcast["second_identical"] and not no_bcast["second_equals_rank0_alone"]
        assert bcast["first_identical"] and not bcast["first_equals_rank0"]  # an average
        assert not no_bcast["origin_pending"] and not bcast["origin_pending"]


def test_process_set_works_as_horovods(four_ranks):
    """As hvd.DistributedOptimizer(process_set=...): members reduce over the set in the
    mini-batch phase and average inside it in the local phase; non-members step locally."""
    for r in per_rank(four_ranks, "process_sets", 4):
        rank, member = r["rank"], r["rank"] in (0, 3)
        assert r["member"] == member and r["reused_ids"]
        assert r["minibatch_diff"] <= 1e-6  # equals Horovod's optimizer over the same set
        same = {int(k): v for k, v in r["same_as"].items()}
        if member:
            assert r["plain_diff_minibatch"] > 1e-4  # the set's gradients were averaged
            assert same == {0: True, 1: False, 2: False, 3: True}
            assert r["summary_ranks"] == 2 and r["summary_steps"] == 16
            assert r["not_member_error"] is None
        else:
            assert r["plain_diff_minibatch"] == 0.0  # a plain local optimizer here
            assert same == {q: q == rank for q in range(4)}
            assert "not in this optimizer's process set" in r["not_member_error"]
        own = {int(k): v for k, v in r["own_same_as"].items()}
        assert own == {q: (q in (0, 3)) == member for q in range(4)}  # each set inside itself
        assert r["own_steps"] == 6
        assert "process_set" in r["hierarchy_error"] and "'auto' or 'flat'" in r["hierarchy_error"]


def test_step_clock_reads_cuda_events_only_at_a_sync(monkeypatch):
    """On CUDA the per-step clock records an event per step and reads the step times when
    drained (a sync), never synchronizing the device at a step; the non-blocking drain of a
    long mini-batch phase reads only finished steps. CI has no GPU: torch.cuda.Event is
    replaced by a stand-in on a virtual device clock (recorded times, a 'finished' horizon)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("horovod.torch")
    from adaptive_lsgd.integrations import torch as alsgd

    device = {"now": 0.0, "done": 0.0, "syncs": 0}

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = device["now"]

        def query(self):
            return self.t <= device["done"]

        def synchronize(self):
            device["syncs"] += 1
            device["done"] = max(device["done"], self.t)

        def elapsed_time(self, other):  # milliseconds, as torch's
            assert self.query() and other.query()
            return (other.t - self.t) * 1000.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    clock = alsgd.StepClock(cuda=True)
    for step_s in (0.01, 0.02, 0.03):
        device["now"] += step_s
        assert clock.lap() is None
    assert device["syncs"] == 0
    device["done"] = 0.035  # the device finished the first two steps only
    assert clock.drain(wait=False) == pytest.approx([0.01, 0.02])
    assert device["syncs"] == 0
    assert clock.drain() == pytest.approx([0.03]) and device["syncs"] == 1
    clock.restart()
    device["now"] += 0.5  # the sync: not compute
    assert clock.drain() == []
    cpu = alsgd.StepClock(cuda=False)
    assert cpu.lap() >= 0 and cpu.drain() == []
    import time
    time.sleep(0.05)  # time away from training (what optimizer.reset_step_timer() discards)
    cpu.restart()
    assert cpu.lap() < 0.04


# -- outer optimizer and compressed syncs -------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4])
def test_outer_step_and_compression_equal_the_reference(two_ranks, four_ranks, n):
    """Outer Nesterov/SGD and fp16/bf16 global syncs equal the sync written out in the case
    (each rank's update rounded, summed in float32 in rank order), flat and 2x2 (plain,
    sliced, leaders), on every rank; ranks identical after the run."""
    res = two_ranks if n == 2 else four_ranks
    rows = per_rank(res, "outer_reference", n)
    keys = [k for k in rows[0] if k != "rank"]
    assert len(keys) == (5 if n == 2 else 9)
    for r in rows:
        for key in keys:
            v = r[key]
            outer, comp, topo, _ = key.split("/")
            assert v["identical"], key
            assert v["max_diff"] <= (0.0 if n == 2 else 5e-6), (key, v["max_diff"])
            assert v["globals"] == (8 if topo == "flat" else 4), key
            if outer != "none":
                assert v["outer_steps"] == v["globals"] - 1, key  # the first global sync averages
                assert v["vs_plain"] > 1e-2, key  # the outer step changed the training
            elif comp != "none":
                assert 0 < v["vs_plain"] < 1e-3, key  # rounding in the update only: close


def test_outer_state_agrees_under_noise_and_resumes_exactly(two_ranks):
    for r in per_rank(two_ranks, "outer_noise_and_resume", 2):
        noise = r["noise"]
        assert noise["same_decisions"] and noise["identical"]
        assert noise["outer_steps"] >= 10 and noise["outer_steps"] == sum(noise["syncs"]) - 1
        assert r["saved_outer_steps"] == 6
        assert r["resumed_outer_steps"] == r["outer_steps"] == 15
        assert r["resumed_diff"] == 0.0
