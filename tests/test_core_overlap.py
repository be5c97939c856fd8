"""Overlapped averaging (config key ``overlap``) in the core: config checks, the cost model's
hidden communication, the policy's choice, and agreement when syncs complete a round late."""

import math

import numpy as np
import pytest
from fake_collective import FakeCluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_lsgd import CostModel, Topology, load_config
from adaptive_lsgd.config import ConfigError
from adaptive_lsgd.cost_model import candidate_periods, grid_mesh
from adaptive_lsgd.policies import AdaptivePolicy


def cfg(**kw):
    return load_config(kw, env={})


# -- config -----------------------------------------------------------------------------------
def test_overlap_is_auto_by_default_and_read_from_every_source():
    assert cfg().overlap == "auto"
    assert load_config(None, env={"ALSGD_OVERLAP": "no"}).overlap is False
    assert load_config(None, env={"ALSGD_OVERLAP": "yes"}).overlap is True
    assert load_config(None, env={"ALSGD_OVERLAP": "true"}).overlap is True
    with pytest.raises(ConfigError, match="'overlap'.*expected auto, true or false, got 'sometimes'"):
        load_config({"overlap": "sometimes"}, env={})


@pytest.mark.parametrize("other", [{"chained_allreduce": True}, {"chained_allreduce": "leaders"},
                                   {"time_budget": True}])
def test_overlap_refuses_multi_stage_syncs_and_time_budgets(other):
    key = next(iter(other))
    with pytest.raises(ConfigError) as err:
        load_config({"overlap": True}, env={f"ALSGD_{key.upper()}": str(other[key]).lower()})
    msg = str(err.value)
    assert "'overlap' (from the config argument)" in msg
    assert f"cannot be combined with {key}" in msg and f"environment variable ALSGD_{key.upper()}" in msg


# -- cost model -------------------------------------------------------------------------------
def test_overlap_hides_what_the_next_round_covers():
    m = CostModel(0.008, [0.366], overlap=True)
    steps, compute, comm = m.round_times([10])
    assert (steps, compute) == (10, pytest.approx(0.08)) and comm == pytest.approx(0.286)
    assert m.round_times([46])[2] == 0.0  # 46 x 8 ms > 366 ms: all of it hidden
    plain = CostModel(0.008, [0.366])
    for h in (1, 4, 16, 64):
        assert m.comm_fraction([h]) < plain.comm_fraction([h])
    # two levels: each sync is hidden behind the level-0 round that follows it
    m2 = CostModel(0.01, [0.03, 0.5], overlap=True)
    steps, _, comm = m2.round_times([4, 3])  # 2 block syncs (0.03 < 4 x 10 ms) + one global
    assert steps == 12 and comm == pytest.approx(0.5 - 0.04)


def test_overlap_grid_matches_comm_fraction():
    for m in (CostModel(0.004, [0.02, 0.3], overlap=True), CostModel(0.02, [0.4], overlap=True)):
        cands = [candidate_periods(80)] * m.num_levels
        mesh, _, frac = m.grid(cands)
        for i in range(0, len(mesh), 97):
            assert math.isclose(frac[i], m.comm_fraction(mesh[i]), rel_tol=1e-9, abs_tol=1e-15)
    _, total, counts = grid_mesh([[1, 2]])
    with pytest.raises(ValueError, match="level-0 periods"):
        CostModel(0.01, [0.1], overlap=True).grid_fraction(total, counts)


def test_policy_picks_the_smallest_period_that_hides_enough():
    """8 ms steps, a 366 ms average (the comm-bound bench): without overlap the target 0.1
    needs H >= 412 (capped at 64); with overlap H = 42 leaves 10% of the round exposed."""
    policy = AdaptivePolicy(cfg(target_comm_fraction=0.1), 1)
    assert policy.choose(CostModel(0.008, [0.366]), (1,), None)[0] == (64,)
    periods, _ = policy.choose(CostModel(0.008, [0.366], overlap=True), (1,), None)
    assert periods == (42,)
    assert CostModel(0.008, [0.366], overlap=True).comm_fraction([42]) <= 0.1
    assert CostModel(0.008, [0.366], overlap=True).comm_fraction([41]) > 0.1


# -- the scheduler, a round late ----------------------------------------------------------------
def test_overlapped_syncs_apply_the_average_and_keep_local_progress():
    c = FakeCluster(cfg(policy="fixed", periods=[2], overlap=True, overlap_pull=1.0),
                    Topology.flat(3))
    start = [m.copy() for m in c.models]          # ranks hold 0, 1, 2
    assert c.step_all_overlapped(0.01) is None
    assert c.step_all_overlapped(0.01) is None    # round 1 ends: its sync starts, nothing done yet
    assert c.scheds[0].syncs == [0]
    for r in range(3):
        c.models[r] += 10.0 * (r + 1)             # local steps while the sync is in flight
    c.step_all_overlapped(0.01)
    results = c.step_all_overlapped(0.01)         # round 2 ends: round 1's sync completes
    assert [res.total_weight for res in results] == [3.0] * 3
    assert c.scheds[0].syncs == [1]
    average = np.mean(start, axis=0)
    for r in range(3):
        np.testing.assert_allclose(c.models[r], average + 10.0 * (r + 1))
    c.finish_inflight()                           # round 2's sync: the models it started with
    assert c.scheds[0].syncs == [2]
    np.testing.assert_allclose(c.models[0], c.models[2])


def test_the_default_pull_applies_half_of_a_late_correction():
    """``overlap_pull`` (0.5 by default): ``x <- x + pull * (average - x at the round's end)``."""
    assert cfg().overlap_pull == 0.5
    assert load_config(None, env={"ALSGD_OVERLAP_PULL": "0.8"}).overlap_pull == 0.8
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ConfigError, match=r"'overlap_pull'.*expected a number in \(0, 1\]"):
            cfg(overlap_pull=bad)
    c = FakeCluster(cfg(policy="fixed", periods=[2], overlap=True), Topology.flat(3))
    start = [m.copy() for m in c.models]          # ranks hold 0, 1, 2
    c.step_all_overlapped(0.01)
    c.step_all_overlapped(0.01)                   # round 1's sync starts
    for r in range(3):
        c.models[r] += 10.0 * (r + 1)
    c.step_all_overlapped(0.01)
    c.step_all_overlapped(0.01)                   # ... and completes
    average = np.mean(start, axis=0)
    for r in range(3):
        np.testing.assert_allclose(c.models[r], start[r] + 0.5 * (average - start[r]) + 10.0 * (r + 1))


@pytest.mark.parametrize("pull, bounded", [(1.0, False), (0.5, True)])
def test_a_late_correction_applied_whole_overshoots_under_large_steps(pull, bounded):
    """Two ranks on quadratics with different minima, one gradient step per round with
    lr x curvature = 1.3 (each step over-shoots: the ranks' difference flips sign and shrinks
    by 0.3). Blocking averages would stay bounded; the late correction applied whole turns
    the difference's factor per round into 0.3 - 1 - ... = -1.3 and it grows without bound,
    half of it gives -0.8 and it settles."""
    c = FakeCluster(cfg(policy="fixed", periods=[1], overlap=True, overlap_pull=pull),
                    Topology.flat(2), models=[np.zeros(3), np.zeros(3)])
    minima = [np.full(3, -1.0), np.full(3, 1.0)]
    for _ in range(60):
        for r in range(2):
            c.models[r] -= 1.3 * (c.models[r] - minima[r])
        c.step_all_overlapped(0.01)
    spread = float(np.abs(c.models[0] - c.models[1]).max())
    assert (spread < 10.0) == bounded, spread


def test_waited_time_is_the_communication_the_summary_counts():
    """The stage time (the transfer) feeds the link statistics; the summary counts only the
    time a rank was blocked."""
    c = FakeCluster(cfg(policy="fixed", periods=[1], overlap=True, timing_warmup=0),
                    Topology.flat(2), link_s=[0.3])
    for _ in range(6):
        c.step_all_overlapped(0.05, waited_s=0.02)
    s = c.scheds[0]
    assert s.syncs == [5]
    assert s.summary()["comm_s"] == pytest.approx(5 * 0.02)
    assert s._links[0].median() == pytest.approx(0.3)


SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=st.integers(0, 2**16), jitter=st.floats(0.0, 0.8), spec=st.sampled_from(["flat", "2x2"]),
       link=st.floats(0.1, 0.5), target=st.floats(0.02, 0.3), warmup=st.integers(0, 3))
def test_ranks_agree_when_syncs_complete_a_round_late(seed, jitter, spec, link, target, warmup):
    topo = Topology.from_config(spec, ["h"] * 4)
    rng = np.random.default_rng(seed)
    compute = rng.uniform(0.005, 0.02, size=4)  # comm-bound: H must grow

    def noisy(base):
        return float(base * max(0.01, 1 + jitter * rng.standard_normal()))

    config = cfg(overlap=True, target_comm_fraction=target, max_period=16, window=4, history=3,
                 warmup=warmup)
    links = [link / 10, link] if topo.num_levels == 2 else [link]
    c = FakeCluster(config, topo, stage_time=lambda r, stage, plan: noisy(links[stage.link_level]))
    history = []
    for _ in range(200):
        if c.step_all_overlapped([noisy(x) for x in compute],
                                 waited_s=lambda r: noisy(0.001)) is not None:
            history.append({s.periods for s in c.scheds})
    c.finish_inflight()
    assert history and all(len(p) == 1 for p in history)
    logs = [c.records(r) for r in range(4)]
    assert all(log == logs[0] for log in logs[1:])
    assert any(rec.get("decision") == "adapt" for rec in logs[0])
    assert len({s.model.overlap for s in c.scheds}) == 1 and c.scheds[0].model.overlap
