"""The scheduler driven by an in-process fake collective; the cost model and timing stats."""

import json
import math
from collections import deque

import numpy as np
import pytest
from fake_collective import FakeCluster, run_stages

from adaptive_lsgd import (
    LOCAL,
    MINI_BATCH,
    CostModel,
    DesyncError,
    LinkModel,
    NonFiniteModelError,
    Scheduler,
    Topology,
    load_config,
    read_log,
)
from adaptive_lsgd.cost_model import candidate_periods
from adaptive_lsgd.timing import WindowStat, append_restarting


def cfg(**kw):
    return load_config(kw, env={})


def sync_steps(cluster):
    return [(step, level) for step, level, _ in cluster.syncs]


# -- fixed periods --------------------------------------------------------------------------------
def test_fixed_flat_syncs_every_h_steps():
    c = FakeCluster(cfg(policy="fixed", periods=[4]), Topology.flat(3))
    for _ in range(12):
        c.step_all(0.01)
    assert sync_steps(c) == [(4, 0), (8, 0), (12, 0)]
    assert all(s.global_syncs == 3 and s.syncs == [3] for s in c.scheds)
    assert all(np.allclose(m, 1.0) for m in c.models)  # the average of 0, 1, 2


def test_fixed_2x2_levels_and_averages():
    c = FakeCluster(cfg(policy="fixed", periods=[2, 3]), Topology.from_spec("2x2", 4))
    results = []
    for _ in range(12):
        results.append(c.step_all(0.01))
    assert sync_steps(c) == [(2, 0), (4, 0), (6, 1), (8, 0), (10, 0), (12, 1)]
    # After the first level-0 sync each block holds its own average ...
    first = c.syncs[0][2]
    assert [r.total_weight for r in first] == [2.0] * 4
    assert all(s.syncs == [4, 2] and s.global_syncs == 2 for s in c.scheds)
    # ... and after a global sync every rank holds the global average, weight 4.
    assert [r.total_weight for r in c.syncs[2][2]] == [4.0] * 4
    assert all(np.allclose(m, 1.5) for m in c.models)
    assert all(s.periods == (2, 3) for s in c.scheds)


def test_fixed_2x2_block_averages_before_the_global_sync():
    c = FakeCluster(cfg(policy="fixed", periods=[2, 3]), Topology.from_spec("2x2", 4))
    c.step_all(0.01)
    c.step_all(0.01)
    assert [float(m[0]) for m in c.models] == [0.5, 0.5, 2.5, 2.5]


def test_fixed_2x2x2_three_levels():
    c = FakeCluster(cfg(policy="fixed", periods=[1, 2, 2]), Topology.from_spec("2x2x2", 8))
    for _ in range(8):
        c.step_all(0.01)
    assert [lvl for _, lvl in sync_steps(c)] == [0, 1, 0, 2, 0, 1, 0, 2]
    assert all(np.allclose(m, 3.5) for m in c.models)


def test_hierarchical_sum_semantics_broadcast_zeroes_non_roots():
    topo = Topology.from_spec("2x2", 4)
    scheds = [Scheduler(cfg(policy="fixed", periods=[1, 1]), topo, r) for r in range(4)]
    plans = [s.step_done(0.01) for s in scheds]
    assert all(p.is_global for p in plans)
    bufs = [np.array([float(r + 1)]) for r in range(4)]
    run_stages(plans, bufs)
    assert [float(b[0]) for b in bufs] == [10.0] * 4


@pytest.mark.parametrize("spec,size", [("2x2", 4), ("3x2", 6), ("2x3", 6), ("2x2x2", 8)])
def test_sliced_chained_sync_gives_the_weighted_average(spec, size):
    """Reduce-scatters, the allreduce of the slices and the allgathers (uneven slices: 7
    values) restore every rank's whole model: the global average, every statistic of the
    payload, a non-finite rank left out and reset."""
    topo = Topology.from_config(spec, ["h"] * size, chained=True)
    assert topo.sliced
    rng = np.random.default_rng(size)
    models = [rng.standard_normal(7) for _ in range(size)]
    c = FakeCluster(cfg(policy="fixed", periods=[1] * topo.num_levels), topo, param_len=7,
                    models=models)
    results = c.step_all(0.01, healthy=[r != 1 for r in range(size)])
    expected = np.mean([m for r, m in enumerate(models) if r != 1], axis=0)
    assert all(np.allclose(m, expected) for m in c.models)
    assert all(r.total_weight == size - 1 and r.excluded_ranks == [1] for r in results)
    stages = c.scheds[0].step_done(0.01).stages
    assert [st.kind for st in stages][0] == "reducescatter" and stages[-1].kind == "allgather"


def test_payload_row_is_the_rank_slot_of_the_payload():
    topo = Topology.flat(3)
    s = Scheduler(cfg(policy="fixed", periods=[1]), topo, 1)
    for _ in range(4):
        plan = s.step_done(0.02)
        s.complete_sync(plan, np.concatenate([np.zeros(3 * s.cols), [3, 3]]).astype(np.float32),
                        [0.001])
    plan = s.step_done(0.02)
    full = s.payload(plan)
    assert full.dtype == np.float32 and len(full) == plan.payload_len == 3 * s.cols + 2
    np.testing.assert_array_equal(full[s.cols:2 * s.cols], s.payload_row(plan))
    assert not full[:s.cols].any() and not full[2 * s.cols:-2].any()
    assert list(full[-2:]) == [1.0, 1.0]
    assert list(s.payload(plan, healthy=False)[-2:]) == [0.0, 0.0]


# -- warm-up (post-local SGD) ---------------------------------------------------------------------
def test_warmup_steps():
    c = FakeCluster(cfg(policy="fixed", periods=[2], warmup=3), Topology.flat(2))
    for step in range(1, 4):
        assert c.step_all(0.01) is None
        assert all(s.phase == (LOCAL if step == 3 else MINI_BATCH) for s in c.scheds)
    for _ in range(4):
        c.step_all(0.01)
    assert sync_steps(c) == [(5, 0), (7, 0)]
    assert all(s.switch_step == 3 for s in c.scheds)
    switch = [r for r in c.logs[0].records if r.get("event") == "switch"]
    assert len(switch) == 1 and switch[0]["step"] == 3 and switch[0]["phase"] == LOCAL
    summary = c.scheds[0].summary()
    assert summary["mini_batch_steps"] == 3 and summary["steps"] == 7


def test_warmup_until_first_lr_decay():
    c = FakeCluster(cfg(policy="fixed", periods=[2], warmup="first_lr_decay"), Topology.flat(2))
    for _ in range(5):
        assert all(s.needs_shared_lr for s in c.scheds)
        assert c.step_all(0.01, lr=0.1) is None
    assert c.step_all(0.01, lr=0.1) is None and not c.scheds[0].is_local
    assert c.step_all(0.01, lr=0.01) is None  # the drop: switch at step 7
    assert all(s.is_local and s.switch_step == 7 and not s.needs_shared_lr for s in c.scheds)
    c.step_all(0.01, lr=0.01)
    assert c.step_all(0.01, lr=0.01) is not None
    assert sync_steps(c) == [(9, 0)]


def test_warmup_first_lr_decay_without_lr_stays_mini_batch():
    c = FakeCluster(cfg(policy="fixed", periods=[2], warmup="first_lr_decay"), Topology.flat(2))
    for _ in range(20):
        assert c.step_all(0.01) is None
    assert all(s.phase == MINI_BATCH for s in c.scheds)


# -- mixed speeds ---------------------------------------------------------------------------------
def test_time_budget_gives_faster_ranks_more_steps():
    c = FakeCluster(cfg(policy="fixed", periods=[4], time_budget=True), Topology.flat(3),
                    models=[[0.0], [1.0], [2.0]])
    speeds = [0.05, 0.1, 0.025]
    first = c.run_round(speeds)
    assert [r.total_weight for r in first] == [12.0] * 3  # every rank took 4 steps: weight 4
    assert all(s.rank_steps == [8, 4, 16] for s in c.scheds)
    start = [m.copy() for m in c.models]
    second = c.run_round(speeds)
    assert [s.step for s in c.scheds] == [12, 8, 20]
    assert [r.total_weight for r in second] == [28.0] * 3
    expected = (8 * start[0] + 4 * start[1] + 16 * start[2]) / 28
    assert all(np.allclose(m, expected) for m in c.models)


def test_time_budget_plan_weights_are_steps():
    topo = Topology.flat(2)
    s = Scheduler(cfg(policy="fixed", periods=[3], time_budget=True), topo, 0)
    s.rank_steps = [5, 3]
    plans = [s.step_done(0.01) for _ in range(5)]
    assert plans[:4] == [None] * 4 and plans[4].weight == 5.0


# -- non-finite models ----------------------------------------------------------------------------
def test_unhealthy_rank_is_excluded():
    c = FakeCluster(cfg(policy="fixed", periods=[1]), Topology.flat(3))
    results = c.step_all(0.01, healthy=[True, False, True])
    assert all(r.total_weight == 2.0 and r.healthy == 2 and r.excluded_ranks == [1] for r in results)
    assert all(np.allclose(m, 1.0) for m in c.models)  # mean of ranks 0 and 2, restored on 1
    assert c.logs[0].records[-1]["excluded_ranks"] == [1]
    results = c.step_all(0.01)
    assert all(r.total_weight == 3.0 and r.excluded_ranks == [] for r in results)


def test_unhealthy_rank_in_a_block_sync():
    c = FakeCluster(cfg(policy="fixed", periods=[1, 2]), Topology.from_spec("2x2", 4))
    results = c.step_all(0.01, healthy=[True, True, False, True])
    assert [r.total_weight for r in results] == [2.0, 2.0, 1.0, 1.0]
    assert [float(m[0]) for m in c.models] == [0.5, 0.5, 3.0, 3.0]
    assert [c.logs[r].records[-1]["excluded"] for r in range(4)] == [0, 0, 1, 1]


def test_all_unhealthy_raises():
    c = FakeCluster(cfg(policy="fixed", periods=[1]), Topology.flat(2))
    with pytest.raises(NonFiniteModelError, match="non-finite"):
        c.step_all(0.01, healthy=[False, False])


# -- agreement checks -----------------------------------------------------------------------------
def test_desync_is_detected():
    c = FakeCluster(cfg(policy="fixed", periods=[1]), Topology.flat(2))
    c.step_all(0.01)
    c.scheds[1].global_syncs += 1
    with pytest.raises(DesyncError, match=r"different sync counts \[1, 2\]"):
        c.step_all(0.01)


# -- checkpoints ----------------------------------------------------------------------------------
def _inputs(step, rank):
    """Deterministic noisy inputs: compute time of a step and a stage time."""
    rng = np.random.default_rng(1000 * step + rank)
    slowdown = 0.5 if step > 80 else 1.0  # the cluster changes after the resume point
    return 0.05 * slowdown * (1 + 0.2 * rng.random()), rng.random()


def _stage_time(rank, stage, plan):
    base = [0.005, 0.05][stage.link_level]
    return base * (1 + 0.3 * _inputs(plan.step, rank)[1])


def _drive(cluster, steps, lr=None):
    start = cluster.scheds[0].step
    for step in range(start + 1, start + steps + 1):
        cluster.step_all([_inputs(step, r)[0] for r in range(cluster.size)], lr=lr)


def test_state_dict_resume_gives_identical_decisions():
    config = cfg(target_comm_fraction=0.1, hysteresis=0.1, max_period=[16, 16], window=4,
                 history=3, time_budget=False)
    topo = Topology.from_spec("2x2", 4)
    whole = FakeCluster(config, topo, stage_time=_stage_time)
    _drive(whole, 160)

    first = FakeCluster(config, topo, stage_time=_stage_time)
    _drive(first, 57)
    states = [json.loads(json.dumps(s.state_dict())) for s in first.scheds]
    resumed = FakeCluster(config, topo, stage_time=_stage_time, models=first.models)
    for s, st in zip(resumed.scheds, states):
        s.load_state_dict(st)
    _drive(resumed, 103)

    assert whole.scheds[0].global_syncs > 5
    assert len({p for p in whole.periods}) == 1
    changes = [rec["step"] for rec in whole.records(0) if rec.get("decision") == "adapt"]
    assert any(step > 57 for step in changes)  # a decision after the resume point
    for r in range(4):
        assert resumed.scheds[r].state_dict() == whole.scheds[r].state_dict()
        tail = [rec for rec in whole.records(r) if rec["step"] > 57]
        assert resumed.records(r) == tail
    assert [(s, lvl) for s, lvl, _ in resumed.syncs] == [(s, lvl) for s, lvl, _ in whole.syncs
                                                         if s > 57]


def test_state_dict_checks_version_and_topology():
    s = Scheduler(cfg(policy="fixed", periods=[2, 3]), Topology.from_spec("2x2", 4), 0)
    for _ in range(5):
        s.step_done(0.01)
    state = s.state_dict()
    with pytest.raises(ValueError, match="version"):
        Scheduler(cfg(), Topology.from_spec("2x2", 4), 0).load_state_dict({**state, "version": 99})
    other = Scheduler(cfg(policy="fixed", periods=[4]), Topology.flat(4), 0)
    with pytest.raises(ValueError, match="saved with topology"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)  # elastic: carry phase and step, not periods
    assert other.step == 5 and other.periods == (4,)
    same_levels = Scheduler(cfg(policy="fixed", periods=[1, 1]), Topology.from_spec("3x2", 6), 0)
    same_levels.load_state_dict(state, strict=False)
    assert same_levels.periods == (2, 3)


# -- the decision log -----------------------------------------------------------------------------
def test_decision_log_records(tmp_path):
    path = tmp_path / "decisions.jsonl"
    config = cfg(target_comm_fraction=0.1, log=str(path))
    topo = Topology.from_spec("2x2", 4)
    scheds = [Scheduler(config, topo, r, param_bytes=4000) for r in range(4)]
    c = FakeCluster(config, topo, link_s=[0.005, 0.2])
    c.scheds = scheds  # log through the config (rank 0 writes the file)
    for _ in range(80):
        c.step_all(0.05)
    scheds[0].log.close()
    records = [r for r in read_log(str(path)) if "level" in r]
    assert len(records) == len(c.syncs) > 4
    assert not (tmp_path / "decisions.rank1.jsonl").exists()
    for rec in records:
        assert type(rec["step"]) is int and type(rec["level"]) is int
        assert isinstance(rec["periods"], list) and all(type(h) is int for h in rec["periods"])
        for key in ("compute_s", "comm_s", "predicted_comm_fraction", "phase", "time"):
            assert key in rec
    late = records[-1]
    assert isinstance(late["compute_s"], float) and isinstance(late["comm_s"], float)
    assert 0 < late["predicted_comm_fraction"] <= 0.1
    assert records[0]["compute_s"] is None and records[0]["predicted_comm_fraction"] is None
    assert any(r.get("decision") == "adapt" for r in records)


# -- the adaptive policy through the scheduler ----------------------------------------------------
@pytest.mark.parametrize("link, expected", [(0.2, (36,)), (0.4, (64,)), (0.001, (1,))])
def test_adaptive_flat(link, expected):
    c = FakeCluster(cfg(target_comm_fraction=0.1), Topology.flat(2), link_s=[link])
    for _ in range(40):
        c.step_all(0.05)
    assert c.periods == [expected, expected]


def test_qsr_cap_follows_the_shared_lr():
    config = cfg(qsr_alpha=0.01, qsr_base=2, target_comm_fraction=0.1)
    c = FakeCluster(config, Topology.flat(2), link_s=[0.2])
    for _ in range(20):
        c.step_all(0.05, lr=0.1)
    assert c.periods == [(2,), (2,)]  # cap max(2, (0.01 / 0.1) ** 2)
    for _ in range(40):
        c.step_all(0.05, lr=0.001)
    assert c.periods == [(36,), (36,)]  # cap 100 no longer binds


def test_max_global_period_caps_the_product_of_the_periods():
    # flat: the link alone would ask for 36 (see test_adaptive_flat); capped at 16
    c = FakeCluster(cfg(max_global_period=16), Topology.flat(2), link_s=[0.2])
    for _ in range(60):
        c.step_all(0.05)
    assert c.periods == [(16,), (16,)]
    # two levels, slow global link: every split of the cap is allowed, the product is not
    c = FakeCluster(cfg(max_global_period=16), Topology.from_spec("2x2", 4), link_s=[0.005, 0.4])
    for _ in range(120):
        c.step_all(0.05)
    assert len(set(c.periods)) == 1 and math.prod(c.periods[0]) == 16
    # with the quadratic rule the smaller cap wins: (0.05 / 0.1)^2 -> base 4 < 16
    c = FakeCluster(cfg(max_global_period=16, qsr_alpha=0.05, qsr_base=4), Topology.flat(2),
                    link_s=[0.2])
    for _ in range(40):
        c.step_all(0.05, lr=0.1)
    assert c.periods == [(4,), (4,)]


# -- cost model -----------------------------------------------------------------------------------
def test_syncs_per_super_round():
    m = CostModel(0.05, [0.01, 0.2])
    assert m.syncs_per_super_round([2, 3]) == [2, 1]
    assert m.syncs_per_super_round([1, 1]) == [0, 1]
    assert CostModel(0.05, [0.01, 0.02, 0.3]).syncs_per_super_round([2, 2, 3]) == [3, 2, 1]
    assert CostModel(0.05, [0.2]).syncs_per_super_round([7]) == [1]


def test_round_times_and_comm_fraction():
    assert CostModel(0.05, [0.01, 0.2]).sync_s == [0.01, 0.2]  # one allreduce per sync
    m = CostModel(0.05, [0.01, 0.2], chained=True)
    assert m.sync_s == [0.01, 0.22]  # a chained global sync reduces and broadcasts through level 0
    # sliced: a reduce-scatter and an allgather at level 0, half an allreduce each
    assert CostModel(0.05, [0.01, 0.2], chained=True, sliced=True).sync_s == pytest.approx([0.01, 0.21])
    assert CostModel(0.05, [0.01, 0.2], sliced=True).sync_s == [0.01, 0.2]  # not chained
    steps, compute, comm = m.round_times([2, 3])
    assert steps == 6 and math.isclose(compute, 0.3) and math.isclose(comm, 2 * 0.01 + 0.22)
    assert math.isclose(m.comm_fraction([2, 3]), 0.24 / 0.54)
    assert math.isclose(m.comm_fraction((2, 3)), 0.24 / 0.54)  # cached, any sequence type
    assert math.isclose(m.steps_per_s([2, 3]), 6 / 0.54)
    assert CostModel(0.0, [0.0]).comm_fraction([1]) == 0.0
    with pytest.raises(ValueError, match="expected 2 periods"):
        m.round_times([4])


def test_grid_matches_comm_fraction():
    m = CostModel(0.03, [0.004, 0.25])
    mesh, total, frac = m.grid([[1, 2, 5], [1, 3, 8]])
    assert mesh.shape == (9, 2)
    for periods, p, f in zip(mesh.tolist(), total.tolist(), frac.tolist()):
        assert p == periods[0] * periods[1]
        assert math.isclose(f, m.comm_fraction(periods))


def test_link_model_fit():
    assert math.isclose(LinkModel.fit([(1e6, 0.011), (4e6, 0.041)]).predict(2e6), 0.021)
    one = LinkModel.fit([(1e6, 0.012), (1e6, 0.012)], alpha=0.002)
    assert math.isclose(one.alpha, 0.002) and math.isclose(one.predict(1e6), 0.012)
    flat = LinkModel.fit([(1e3, 0.005), (1e6, 0.004)])
    assert flat.beta == math.inf and math.isclose(flat.alpha, 0.0045)
    with pytest.raises(ValueError):
        LinkModel.fit([])


def test_candidate_periods():
    assert candidate_periods(8) == list(range(1, 9))
    big = candidate_periods(1000)
    assert big[:64] == list(range(1, 65)) and big[-1] == 1000 and big == sorted(set(big))


# -- timing ---------------------------------------------------------------------------------------
def test_window_stat():
    s = WindowStat(window=3, skip=2)
    assert s.median() == -1.0 and s.median(default=0.5) == 0.5
    for v in [100.0, 50.0, 1.0, 3.0, 2.0]:
        s.add(v)
    assert s.count == 3 and len(s) == 3 and s.median() == 2.0
    s.add(10.0)  # the window slides: 3, 2, 10
    assert s.median() == 3.0 and s.count == 4
    restored = WindowStat.from_state(json.loads(json.dumps(s.state_dict())))
    assert restored.median() == 3.0 and restored.count == 4
    restored.add(0.0)
    assert restored.median() == 2.0
    with pytest.raises(ValueError):
        WindowStat(window=0)


def test_window_stat_ignores_a_single_outlier():
    s = WindowStat(window=5)
    for v in [0.1, 0.1, 9.0, 0.1, 0.1]:
        s.add(v)
    assert s.median() == 0.1


def test_window_stat_follows_a_step_change_within_three_samples():
    s = WindowStat(window=16)
    for v in [0.1] * 12 + [0.5, 0.1, 0.6, 0.1]:  # isolated slow samples: no change
        s.add(v)
    assert s.median() == 0.1 and len(s) == 16
    for v in [0.7, 0.8]:  # two in a row: not yet
        s.add(v)
    assert s.median() == 0.1
    s.add(0.9)  # the third: the link is slower now
    assert s.median() == 0.8 and len(s) == 3
    for v in [0.1, 0.1, 0.1]:  # and back (below half the median, three times)
        s.add(v)
    assert s.median() == 0.1 and len(s) == 3


def test_shared_history_restarts_on_a_step_change():
    h = deque([0.10, 0.12, 0.09, 0.11], maxlen=5)
    assert not append_restarting(h, 0.14) and len(h) == 5  # within 1.5x of the median
    assert not append_restarting(h, 0.4)  # one estimate that far off: kept in the median
    assert not append_restarting(h, 0.1) and len(h) == 5
    assert not append_restarting(h, 0.4)
    assert append_restarting(h, 0.45) and list(h) == [0.4, 0.45]  # two in a row: a slower link
    per_rank = deque([[0.02, 0.02], [0.021, 0.019], [0.02, 0.02]], maxlen=5)
    assert not append_restarting(per_rank, [0.02, 0.04])
    assert append_restarting(per_rank, [0.02, 0.041])  # one rank throttled
    assert list(per_rank) == [[0.02, 0.04], [0.02, 0.041]]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_slower_link_is_followed_once_the_timing_windows_restart(seed):
    """The link gets 10x slower: every rank's window of sync times restarts after
    CHANGE_RUN slow syncs, and the decision that sees it (one sync later: a sync's time
    travels in the next sync's table) raises the period at once, not once the shared
    history's median (5 decisions) has turned; the same on every rank under noise."""
    rng = np.random.default_rng(seed)
    link = {"s": 0.002}
    c = FakeCluster(load_config({}, env={}), Topology.flat(4), link_s=[0.002],
                    stage_time=lambda r, st, p: link["s"] * (1 + 0.2 * rng.random()))

    def rounds(n):
        out = []
        for _ in range(n):
            c.run_round(lambda r: 0.02 * (1 + 0.2 * rng.random()))
            assert len({s.periods for s in c.scheds}) == 1
            out.append(c.scheds[0].periods[0])
        return out

    before = rounds(12)[-1]
    link["s"] = 0.02
    after = rounds(8)
    raised = next(i for i, h in enumerate(after) if h >= 5 * before) + 1
    # the windows restart at the CHANGE_RUN-th slow sync, its time reaches the table one sync
    # later, and the shared history restarts at the second estimate that far off (one noisy
    # estimate does not): CHANGE_RUN + 2 syncs, against CHANGE_RUN + 3 for the median of 5
    assert raised <= WindowStat.CHANGE_RUN + 2, after
