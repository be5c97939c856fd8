"""The auto mechanisms (``time_budget: auto``, ``overlap: auto``): taken at top-level syncs
from shared values only, the same on every rank under per-rank timing noise, logged with
their reasons, followed when the cluster changes, and resumed exactly from a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from fake_collective import FakeCluster, MemoryLog

from adaptive_lsgd import Scheduler, Topology, load_config
from adaptive_lsgd.cost_model import CostModel, rank_split, wasted_share
from adaptive_lsgd.policies import make_policy


def cfg(**kw):
    return load_config(kw, env={})


def noisy_times(rng, jitter):
    def times(base):
        return float(base * max(0.05, 1 + jitter * rng.standard_normal()))
    return times


def run_rounds(cluster, compute, rounds, noise):
    """``rounds`` rounds with per-rank step times ``compute`` (noisy); returns every rank's
    (periods, rank_steps, mechanisms) after each round."""
    out = []
    for _ in range(rounds):
        cluster.run_round(lambda r: noise(compute[r]))
        out.append([(s.periods, tuple(s.rank_steps or ()), tuple(sorted(s.decision.mechanisms.items())))
                    for s in cluster.scheds])
    return out


# -- time_budget: auto -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_time_budget_auto_follows_a_rank_that_slows_down_and_recovers(seed):
    rng = np.random.default_rng(seed)
    noise = noisy_times(rng, 0.15)
    c = FakeCluster(cfg(history=3), Topology.flat(3), link_s=[0.002], uneven_steps=True,
                    stage_time=lambda r, stage, plan: noise(0.002))
    even = [0.02, 0.02, 0.02]
    throttled = [0.02, 0.02, 0.04]  # rank 2 computes 2x slower (thermal throttling, say)
    phases = [("even", even, 16), ("throttled", throttled, 20), ("recovered", even, 20)]
    states = {}
    for name, compute, rounds in phases:
        states[name] = run_rounds(c, compute, rounds, noise)
    for rows in states.values():  # every rank took the same decision at every sync
        for row in rows:
            assert len(set(row)) == 1, row

    def tb(row):
        return dict(row[0][2])["time_budget"]

    assert not any(tb(row) for row in states["even"])
    on_at = next(i for i, row in enumerate(states["throttled"]) if tb(row))
    # followed within a few syncs: the window median moves after window/2 steps (rounds of one
    # step here), the shared history's median (history=3) after 2 more syncs
    follow = 16 // 2 + 3 + 1
    assert on_at <= follow
    assert all(tb(row) for row in states["throttled"][on_at:])
    split = states["throttled"][-1][0][1]  # settled: the slow rank takes about half the steps
    assert min(split[0], split[1]) >= 1.6 * split[2], split
    off_at = next(i for i, row in enumerate(states["recovered"]) if not tb(row))
    assert off_at <= follow and not any(tb(row) for row in states["recovered"][off_at:])
    assert states["recovered"][-1][0][1] == ()  # step-count rounds again: no split

    # the log says why, at each switch, the same on every rank
    for r in range(3):
        switches = [rec for rec in c.records(r, drop=("time", "step")) if "mechanism_reason" in rec]
        assert [rec["mechanism"]["time_budget"] for rec in switches] == [True, False]
        assert "slowest/fastest compute" in switches[0]["mechanism_reason"]["time_budget"]
        assert switches == [rec for rec in c.records(0, drop=("time", "step"))
                            if "mechanism_reason" in rec]


def test_time_budget_auto_switches_on_at_the_second_decision_past_the_threshold():
    """One window past skew_threshold (a busy machine for a moment) leaves the rounds as they
    are and says so; a second decision in a row switches them on; a one-off decision (no
    previous one: alsgd-tune's prediction) needs no confirmation."""
    policy = make_policy(cfg(), 1)
    link = CostModel(0.04, [0.0001])
    kw = dict(settled=True, compute=np.array([0.03, 0.045]), lr=None, uneven_ok=True)
    once = policy.decide(link, (1,), previous=policy.first(), **kw)
    assert once.mechanisms["time_budget"] is False and once.rank_steps is None
    assert once.pending == ("time_budget",) and "next sync" in once.why["time_budget"]
    twice = policy.decide(link, (1,), previous=once, **kw)
    assert twice.mechanisms["time_budget"] is True and twice.pending == ()
    assert twice.rank_steps is not None and "next sync" not in twice.why["time_budget"]
    calm = policy.decide(link, (1,), previous=once, **{**kw, "compute": np.array([0.04, 0.041])})
    assert calm.mechanisms["time_budget"] is False and calm.pending == ()
    assert policy.decide(link, (1,), **kw).mechanisms["time_budget"] is True


def test_a_pending_switch_resumes_from_a_checkpoint():
    config = cfg(timing_warmup=0, window=4)
    a = FakeCluster(config, Topology.flat(2), uneven_steps=True)
    for _ in range(20):
        a.run_round([0.01, 0.03])
        if a.scheds[0].decision.pending:
            break
    assert a.scheds[0].decision.pending == ("time_budget",)
    assert not a.scheds[0].decision.mechanisms["time_budget"]
    b = FakeCluster(config, Topology.flat(2), uneven_steps=True)
    for s, st in zip(b.scheds, [s.state_dict() for s in a.scheds]):
        s.load_state_dict(st)
        assert s.decision.pending == ("time_budget",)
    b.models = [m.copy() for m in a.models]
    for cl in (a, b):
        cl.run_round([0.01, 0.03])
        assert cl.scheds[0].decision.mechanisms["time_budget"]  # confirmed after the resume
    np.testing.assert_array_equal(a.models[0], b.models[0])


def test_time_budget_auto_weighs_the_average_by_steps():
    c = FakeCluster(cfg(timing_warmup=0, window=4), Topology.flat(2), uneven_steps=True,
                    models=[np.zeros(3), np.zeros(3)])
    for _ in range(4):
        c.run_round([0.01, 0.03])
    n_fast, n_slow = c.scheds[0].rank_steps
    assert n_fast == 3 * n_slow
    for r in range(2):
        c.models[r][:] = 1.0 if r == 0 else 5.0
    plans = []
    for r, s in enumerate(c.scheds):  # one more round: 3 n steps on rank 0, n on rank 1
        plan = None
        while plan is None:
            plan = s.step_done([0.01, 0.03][r])
        plans.append(plan)
    assert [p.weight for p in plans] == [3.0 * n_slow, 1.0 * n_slow]
    c.sync(plans)
    np.testing.assert_allclose(c.models[0], (3 * 1.0 + 1 * 5.0) / 4)


def test_time_budget_auto_needs_every_rank_to_accept_uneven_steps():
    c = FakeCluster(cfg(timing_warmup=0, window=4), Topology.flat(2), uneven_steps=True)
    c.scheds[1].uneven_steps = False  # one rank's loop takes a fixed number of steps
    for _ in range(6):
        c.step_all([0.01, 0.03])
    for s in c.scheds:
        assert s.rank_steps is None and s.decision.mechanisms["time_budget"] is False
        assert "same number of steps on every rank" in s.decision.why["time_budget"]
    c.scheds[1].uneven_steps = True  # declared later (allow_uneven_steps): the next syncs engage
    for _ in range(3):
        c.run_round([0.01, 0.03])
    splits = [s.rank_steps for s in c.scheds]
    assert splits[0] == splits[1] and splits[0][0] == 3 * splits[0][1]


def test_time_budget_false_and_true_are_kept_whatever_the_skew():
    for value in (False, True):
        c = FakeCluster(cfg(time_budget=value, timing_warmup=0, window=4), Topology.flat(2),
                        uneven_steps=True)
        for _ in range(5):
            c.run_round([0.01, 0.03])
        split = c.scheds[0].rank_steps
        assert split is None if not value else split[0] == 3 * split[1]
        assert c.scheds[0].decision.why["time_budget"] == "configured"


def test_split_rounds_to_the_nearest_step_and_caps_the_staleness():
    assert rank_split(1, [0.0204, 0.0404], max_ratio=4) == [2, 1]  # floor would give [1, 1]
    assert rank_split(4, [0.01, 0.1], max_ratio=4) == [16, 4]  # 40 steps capped at 4 x 4
    assert rank_split(4, [0.01, 0.1], max_ratio=8) == [32, 4]
    free = CostModel(0.04, [0.0], rank_compute_s=[0.02, 0.04])
    assert wasted_share(free, (1,), [2, 1]) == pytest.approx(0.0)
    # 2 steps in 0.04 s against 1/0.03 + 1/0.04 steps per second: 1/7 of the work lost
    assert wasted_share(free.with_compute([0.03, 0.04]), (1,), [1, 1]) == pytest.approx(1 / 7)
    policy = make_policy(cfg(max_step_ratio=2), 1)
    d = policy.decide(CostModel(0.04, [0.0001]), (1,), settled=True,
                      compute=np.array([0.01, 0.04]), lr=None, uneven_ok=True)
    assert d.mechanisms["time_budget"] and max(d.rank_steps) <= 2 * min(d.rank_steps)


def test_time_budget_round_is_long_enough_for_an_even_split():
    """Short rounds of a skew that is no whole ratio idle the fast ranks (1 step each at
    0.03 s against 0.04 s: 1/7 of the work lost): the policy takes the shortest longer round
    whose idling and syncs together waste at most target_comm_fraction (0.05 here; 2 rounds of
    the slow rank: [3, 2] steps, 4.8%), not the first one that splits exactly ([4, 3])."""
    policy = make_policy(cfg(target_comm_fraction=0.05), 1)
    link = CostModel(0.04, [0.0001])
    d = policy.decide(link, (1,), settled=True, compute=np.array([0.03, 0.04]), lr=None,
                      uneven_ok=True)
    assert d.periods == (2,) and d.rank_steps == [3, 2]
    priced = link.with_compute([0.03, 0.04])
    assert wasted_share(priced, d.periods, d.rank_steps) <= 0.05 < wasted_share(priced, (1,), [1, 1])
    capped = policy.decide(CostModel(0.04, [0.0001]), (1,), settled=True,
                           compute=np.array([0.03, 0.04]), lr=None, uneven_ok=True,
                           previous=None)
    assert capped == d
    with_cap = make_policy(cfg(max_global_period=2, target_comm_fraction=0.05), 1).decide(
        CostModel(0.04, [0.0001]), (1,), settled=True, compute=np.array([0.03, 0.04]), lr=None,
        uneven_ok=True)
    assert with_cap.periods[0] <= 2


def test_time_budget_rounds_count_the_syncs_with_the_idling():
    """The same skew where a sync costs 4 ms: the round that splits into [3, 2] idles the
    slow rank 4.8% and syncs 4.3% of the time; a longer one keeps both under 5% together
    (target_comm_fraction 0.05)."""
    link = CostModel(0.04, [0.004])
    policy = make_policy(cfg(target_comm_fraction=0.05), 1)
    d = policy.decide(link, (1,), settled=True, compute=np.array([0.03, 0.04]), lr=None,
                      uneven_ok=True)
    priced = link.with_compute([0.03, 0.04])
    assert wasted_share(priced, (2,), [3, 2]) > 0.05
    assert d.periods[0] > 2 and wasted_share(priced, d.periods, d.rank_steps) <= 0.05
    shorter = [h for h in range(2, d.periods[0])
               if wasted_share(priced, (h,), policy.split(h, np.array([0.03, 0.04]))) <= 0.05]
    assert shorter == []


def test_the_cost_model_prices_stragglers():
    m = CostModel(0.04, [0.004], rank_compute_s=[0.02, 0.04])
    step_count = m.job_steps_per_s([8])
    budget = m.job_steps_per_s([8], rank_steps=rank_split(8, [0.02, 0.04], 4))
    assert step_count == pytest.approx(16 / (8 * 0.04 + 0.004))
    assert budget == pytest.approx(24 / (8 * 0.04 + 0.004))
    assert budget / step_count == pytest.approx(1.5)


# -- overlap: auto -----------------------------------------------------------------------------
def test_overlap_auto_engages_only_when_blocking_averages_miss_the_target():
    slow_link = CostModel(0.008, [0.366])  # 4.2 MB at 100 Mbit/s, 8 ms steps
    policy = make_policy(cfg(target_comm_fraction=0.1), 1)
    d = policy.decide(slow_link, (1,), settled=True, compute=np.array([0.008, 0.008]), lr=None,
                      can_overlap=True)
    assert d.mechanisms["overlap"] is True
    assert slow_link.with_overlap().comm_fraction(d.periods) <= 0.1
    assert "overlapped" in d.why["overlap"]
    off = policy.decide(slow_link, (1,), settled=True, compute=np.array([0.008, 0.008]), lr=None,
                        can_overlap=False)
    assert off.mechanisms["overlap"] is False and off.periods == (64,)
    cheap = policy.decide(CostModel(0.05, [0.01]), (1,), settled=True,
                          compute=np.array([0.05, 0.05]), lr=None, can_overlap=True)
    assert cheap.mechanisms["overlap"] is False  # the target is reachable blocking
    # blocking at the cap spends 23% (0.15 s per 64 x 8 ms): overlap would promise 1.17x the
    # steps per second, under OVERLAP_MIN_GAIN (1.3): a stale average is not worth that
    modest = policy.decide(CostModel(0.008, [0.15]), (1,), settled=True,
                           compute=np.array([0.008, 0.008]), lr=None, can_overlap=True)
    assert modest.mechanisms["overlap"] is False and modest.periods == (64,)
    assert "x the steps per second (< 1.3)" in modest.why["overlap"], modest.why
    assert "x the steps per second (>= 1.3)" in d.why["overlap"]
    # the comm-bound benchmark's case (4.2 MB at 100 Mbit/s, 11.6 ms steps): blocking at the cap
    # spends 32%, overlap promises 1.37x: on (under a 1.5x bar it waited for a noisier reading)
    bound = policy.decide(CostModel(0.0116, [0.35]), (1,), settled=True,
                          compute=np.array([0.0116, 0.0116]), lr=None, can_overlap=True)
    assert bound.mechanisms["overlap"] is True and bound.periods == (28,), bound.why
    assert "1.37x the steps per second (>= 1.3)" in bound.why["overlap"]
    # 1.24x: not enough to start overlapping, enough to stay on (1 + 0.3 x (1 - hysteresis))
    mid = CostModel(0.0116, [0.25])
    fresh = policy.decide(mid, (1,), settled=True, compute=np.array([0.0116, 0.0116]), lr=None,
                          can_overlap=True)
    held = policy.decide(mid, (28,), settled=True, compute=np.array([0.0116, 0.0116]), lr=None,
                         can_overlap=True, previous=bound)
    assert fresh.mechanisms["overlap"] is False and held.mechanisms["overlap"] is True, held.why
    assert "1.24x the steps per second (>= 1.23)" in held.why["overlap"], held.why
    # a mixed cluster on a slow link: overlap hides 0.37 s of 0.88 s per round, time-budget
    # rounds gain the fast rank's idle 0.26 s: the cost model takes overlap
    both = policy.decide(slow_link, (1,), settled=True, compute=np.array([0.006, 0.008]), lr=None,
                         can_overlap=True, uneven_ok=True)
    assert both.mechanisms == {"time_budget": False, "overlap": True}, both.why
    assert "overlapped averages" in both.why["time_budget"]
    # a cheap link and a 4x straggler: time-budget rounds are worth more than hiding the link
    cheap = CostModel(0.02, [0.05])
    tb = policy.decide(cheap, (1,), settled=True, compute=np.array([0.005, 0.02]), lr=None,
                       can_overlap=True, uneven_ok=True, previous=None)
    assert tb.mechanisms["time_budget"] is True
    forced = make_policy(cfg(time_budget=True), 1).decide(
        slow_link, (1,), settled=True, compute=np.array([0.006, 0.008]), lr=None,
        can_overlap=True, uneven_ok=True)
    assert forced.mechanisms == {"time_budget": True, "overlap": False}


@pytest.mark.parametrize("seed", [0, 1])
def test_overlap_auto_is_the_same_on_every_rank_and_runs_overlapped(seed):
    rng = np.random.default_rng(seed)
    noise = noisy_times(rng, 0.3)
    c = FakeCluster(cfg(window=4, history=3), Topology.flat(3), can_overlap=True,
                    stage_time=lambda r, stage, plan: noise(0.8))
    overlapped = 0
    for _ in range(400):
        overlapped += bool(c.step_all_auto(lambda r: noise(0.008)))
        state = {(s.periods, tuple(sorted(s.decision.mechanisms.items()))) for s in c.scheds}
        assert len(state) == 1, state
    assert overlapped >= 3
    assert all(s.overlapping for s in c.scheds)
    logs = [c.records(r) for r in range(3)]
    assert logs[1] == logs[0] and logs[2] == logs[0]
    assert any("mechanism_reason" in rec and rec["mechanism"]["overlap"] for rec in logs[0])
    # the log (and the demo) give the share the decision priced: overlapped, not blocking
    s = c.scheds[0]
    last = c.logs[0].records[-1]
    assert last["predicted_comm_fraction"] == pytest.approx(
        s.model.with_overlap().comm_fraction(s.periods))
    assert last["predicted_comm_fraction"] < s.model.comm_fraction(s.periods)


def test_overlap_auto_is_never_taken_with_a_chained_hierarchy():
    topo = Topology.from_config("2x2", ["a", "a", "b", "b"], chained=True)
    s = Scheduler(cfg(), topo, 0, can_overlap=True)
    assert s.can_overlap is False


# -- resume ------------------------------------------------------------------------------------
def test_mechanisms_resume_exactly_from_a_checkpoint():
    config = cfg(timing_warmup=0, window=4)
    a = FakeCluster(config, Topology.flat(2), uneven_steps=True)
    for _ in range(6):
        a.run_round([0.01, 0.03])
    assert a.scheds[0].decision.mechanisms["time_budget"]
    states = [s.state_dict() for s in a.scheds]
    b = FakeCluster(config, Topology.flat(2), uneven_steps=True)
    for s, st in zip(b.scheds, states):
        s.load_state_dict(st)
        assert s.decision.mechanisms == a.scheds[0].decision.mechanisms
        assert s.rank_steps == a.scheds[0].rank_steps
    b.models = [m.copy() for m in a.models]
    n_a = [len(log.records) for log in a.logs]
    for cl in (a, b):
        for compute in ([0.01, 0.03], [0.01, 0.01], [0.01, 0.01], [0.01, 0.01], [0.01, 0.01]):
            cl.run_round(compute)
    for r in range(2):
        tail_a = [{k: v for k, v in rec.items() if k != "time"} for rec in a.logs[r].records[n_a[r]:]]
        assert tail_a == b.records(r)
        np.testing.assert_array_equal(a.models[r], b.models[r])
    assert b.scheds[0].decision.mechanisms["time_budget"] is False  # the skew went away


def test_a_state_without_mechanisms_loads_with_the_configured_ones():
    s = Scheduler(cfg(), Topology.flat(2), 0, log=MemoryLog())
    state = s.state_dict()
    del state["mechanisms"], state["why"]
    fresh = Scheduler(cfg(), Topology.flat(2), 0, log=MemoryLog())
    fresh.load_state_dict(state)
    assert fresh.decision.mechanisms == {"time_budget": False, "overlap": False}
