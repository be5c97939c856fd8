"""The core's one sync protocol (adaptive_lsgd.sync), the Decision the policy returns, and the
pieces the integrations now take from the core (deferred step times, config refusals)."""

import numpy as np
import pytest

from adaptive_lsgd import Scheduler, Topology, load_config
from adaptive_lsgd.config import ConfigError, check_supported
from adaptive_lsgd.policies import Decision, make_policy
from adaptive_lsgd.scheduler import DecisionShare
from adaptive_lsgd.sync import Deadlock, NumpyBackend, SyncTarget, run_in_process, sync_protocol


def cfg(**kw):
    return load_config(kw, env={})


def _job(config, topo, models, states=None, healthy=None):
    """One sync of every rank through the protocol; returns the results."""
    scheds = [Scheduler(config, topo, r) for r in range(topo.size)]
    plans = [s.step_done(0.01) for s in scheds]
    states = states or [[] for _ in models]
    healthy = healthy or [True] * len(models)
    gens = [sync_protocol(p, s, NumpyBackend(healthy=h),
                          SyncTarget(lambda m=m: [m], optimizer_state=lambda st=st: st))
            for p, s, m, st, h in zip(plans, scheds, models, states, healthy)]
    return scheds, run_in_process(gens, lambda rank, col: 0.01)


@pytest.mark.parametrize("chained", [False, "sliced", "leaders"])
def test_every_form_gives_the_same_average_and_state_rule(chained):
    """Flat, sliced and leaders' syncs all restore the healthy ranks' average; the unhealthy
    rank's optimizer state is zeroed, the others' kept (momentum: local)."""
    topo = Topology.from_config("2x2", ["h"] * 4, chained=chained)
    models = [np.arange(5.0) * (r + 1) for r in range(4)]
    models[2][1] = np.nan
    states = [[np.ones(5)] for _ in range(4)]
    _, results = _job(cfg(policy="fixed", periods=[1, 1]), topo, models, states,
                      healthy=[True, True, True, True])
    expected = np.mean([np.arange(5.0) * (r + 1) for r in (0, 1, 3)], axis=0)
    for r in range(4):
        np.testing.assert_allclose(models[r], expected)
        assert float(states[r][0].sum()) == (0.0 if r == 2 else 5.0)
    assert all(res.total_weight == 3.0 and res.excluded_ranks == [2] for res in results)


def test_momentum_reset_zeroes_every_rank_and_average_averages_the_state():
    topo = Topology.flat(2)
    models = [np.zeros(3), np.full(3, 2.0)]
    states = [[np.full(3, 4.0)], [np.full(3, 8.0)]]
    _job(cfg(policy="fixed", periods=[1], momentum="reset"), topo, models, states)
    assert all(float(st[0].sum()) == 0.0 for st in states)
    states = [[np.full(3, 4.0)], [np.full(3, 8.0)]]
    _job(cfg(policy="fixed", periods=[1], momentum="average"), topo, models, states)
    assert all(np.allclose(st[0], 6.0) for st in states)


def test_buffers_are_averaged_unless_configured_off():
    topo = Topology.flat(2)
    for average, want in ((True, [1.0, 1.0]), (False, [0.0, 2.0])):
        bufs = [np.zeros(2), np.full(2, 2.0)]
        scheds = [Scheduler(cfg(policy="fixed", periods=[1], average_buffers=average), topo, r)
                  for r in range(2)]
        plans = [s.step_done(0.01) for s in scheds]
        gens = [sync_protocol(p, s, NumpyBackend(), SyncTarget(list, lambda b=b: [b]))
                for p, s, b in zip(plans, scheds, bufs)]
        run_in_process(gens, lambda rank, col: 0.0)
        assert [float(b[0]) for b in bufs] == want


def test_mismatched_collectives_raise_instead_of_hanging():
    topo = Topology.from_spec("2x2", 4)
    scheds = [Scheduler(cfg(policy="fixed", periods=[1, 2]), topo, r) for r in range(4)]
    plans = [s.step_done(0.01) for s in scheds]
    plans[3] = scheds[3].sync_now()  # rank 3 asks for a global sync, its block mate does not
    gens = [sync_protocol(p, s, NumpyBackend(), SyncTarget(lambda: [np.zeros(2)]))
            for p, s in zip(plans, scheds)]
    with pytest.raises(Deadlock, match="cannot proceed"):
        run_in_process(gens, lambda rank, col: 0.0)


def test_whole_sync_time_is_communication_and_priced_into_the_link():
    """sync_s (packing and unpacking included) is what the summary counts; what it spent
    outside the collectives is added to the level's stage time the cost model sees."""
    s = Scheduler(cfg(policy="fixed", periods=[1]), Topology.flat(1), 0)
    plan = s.step_done(0.01)
    reduced = s.payload(plan)
    s.complete_sync(plan, reduced, [], sync_s=0.05)  # a job of one: no stage, but time spent
    assert s.summary()["comm_s"] == pytest.approx(0.05)
    s2 = Scheduler(cfg(policy="fixed", periods=[1]), Topology.flat(2), 0)
    plan = s2.step_done(0.01)
    payload = s2.payload(plan) * 2
    s2.complete_sync(plan, payload, [0.2], sync_s=0.3)
    assert s2.summary()["comm_s"] == pytest.approx(0.3)
    assert s2._links[0].median() == pytest.approx(0.3)
    s2.complete_sync(s2.step_done(0.01), payload, [0.2], sync_s=0.1)  # never below the stages
    assert s2.summary()["comm_s"] == pytest.approx(0.5)


def test_deferred_step_times_give_the_same_decisions():
    """A GPU integration reports steps with compute_s=None and their times at the sync
    (record_compute): the payload row and the decisions are those of immediate reports."""
    config = cfg(timing_warmup=0)
    now = Scheduler(config, Topology.flat(2), 0)
    later = Scheduler(config, Topology.flat(2), 0)
    times = [0.01, 0.03, 0.02]
    for t in times:
        plan_a = now.step_done(t)
        plan_b = later.step_done(None)
    later.record_compute([])
    later.record_compute(times[:1])
    later.record_compute(times[1:])
    np.testing.assert_array_equal(now.payload_row(plan_a), later.payload_row(plan_b))
    assert now.summary()["compute_s"] == pytest.approx(later.summary()["compute_s"])


def test_policy_decision_holds_cap_split_and_reason():
    config = cfg(time_budget=True, max_global_period=16, qsr_alpha=0.2)
    policy = make_policy(config, 1)
    from adaptive_lsgd.cost_model import CostModel
    d = policy.decide(CostModel(0.01, [0.5]), (1,), settled=False,
                      compute=np.array([0.02, 0.01, 0.005]), lr=0.1)
    assert isinstance(d, Decision)
    assert d.cap == 4  # QSR: (0.2 / 0.1)^2 = 4 < 16
    assert d.periods == (4,) and d.reason == "adapt"
    assert d.rank_steps == [4, 8, 16]
    assert d.mechanisms == {"time_budget": True, "overlap": False}
    # an unmeasured rank keeps the split in force
    keep = policy.decide(CostModel(0.01, [0.5]), d.periods, settled=True,
                         compute=np.array([0.02, -1.0, 0.005]), lr=0.1, rank_steps=[1, 2, 3])
    assert keep.rank_steps == [1, 2, 3]
    assert make_policy(cfg(max_global_period=16), 1).cap(None) == 16
    assert make_policy(cfg(), 1).cap(0.1) is None


def test_decision_share_adopts_the_first_ranks_decision():
    """Two schedulers given one DecisionShare end each top-level sync in the state they would
    reach alone (the second adopts the first's), over several syncs."""
    config = cfg(timing_warmup=0)
    topo = Topology.flat(2)
    share = DecisionShare()
    shared = [Scheduler(config, topo, r, share=share) for r in range(2)]
    alone = [Scheduler(config, topo, r) for r in range(2)]
    rng = np.random.default_rng(0)
    for _ in range(300):
        c = [float(x) for x in rng.uniform(0.01, 0.02, 2)]
        for group in (shared, alone):
            plans = [s.step_done(t) for s, t in zip(group, c)]
            if plans[0] is None:
                continue
            reduced = sum(s.payload(p) for s, p in zip(group, plans))
            for s, p in zip(group, plans):
                s.complete_sync(p, reduced, [0.02])
        assert [s.periods for s in shared] == [s.periods for s in alone]
        assert [s.last_decision for s in shared] == [s.last_decision for s in alone]
    assert shared[0].global_syncs > 3


@pytest.mark.parametrize("runner,elastic,match", [
    ("sim", False, "overlapped averaging is not simulated"),
    ("torch", True, "not supported in elastic Horovod jobs"),
])
def test_refusals_name_the_key(runner, elastic, match):
    with pytest.raises(ConfigError, match=f"'overlap'.*{match}"):
        check_supported(cfg(overlap=True), runner, elastic=elastic)
    check_supported(cfg(), runner, elastic=elastic)
    if runner == "torch":
        check_supported(cfg(overlap=True), runner)


def test_both_integrations_run_overlapped_averages():
    for runner in ("torch", "tensorflow"):
        check_supported(cfg(overlap=True), runner)


def test_tensorflow_refuses_elastic_jobs_at_start():
    with pytest.raises(ConfigError, match="TensorFlow integration does not support elastic"):
        check_supported(cfg(), "tensorflow", elastic=True)


def _origin_round(scheds, models, noted, steps=1):
    """``steps`` local steps on every rank (each adds its rank + 1), noting the local start on
    the ranks in ``noted``, then the sync the schedulers plan."""
    from adaptive_lsgd.sync import note_local_start

    backend = NumpyBackend()
    plans = [None] * len(scheds)
    for _ in range(steps):
        for r, (s, m) in enumerate(zip(scheds, models)):
            if r in noted:
                note_local_start(s, backend, SyncTarget(lambda m=m: [m]))
            m += r + 1
            plans[r] = s.step_done(0.01)
    gens = [sync_protocol(p, s, backend, SyncTarget(lambda m=m: [m]))
            for p, s, m in zip(plans, scheds, models)]
    return run_in_process(gens, lambda rank, col: 0.01)


@pytest.mark.parametrize("spec, periods", [("flat", [2]), ("2x2", [1, 3])])
def test_first_sync_is_rank0s_model_when_the_ranks_began_apart(spec, periods, tmp_path):
    """check_origin: ranks that began the local phase from different models get rank 0's
    model at the first sync (a top-level one, also when the schedule's first is a block
    sync), logged; later syncs average. Ranks that began equal average at once."""
    topo = Topology.from_config(spec, ["h"] * 4)
    config = cfg(policy="fixed", periods=periods, log=str(tmp_path / "log.jsonl"))
    scheds = [Scheduler(config, topo, r, check_origin=True) for r in range(4)]
    models = [np.full(3, 10.0 * r) for r in range(4)]
    steps = periods[0]
    _origin_round(scheds, models, noted=range(4), steps=steps)
    for m in models:
        np.testing.assert_array_equal(m, np.full(3, 0.0 + steps))  # rank 0's: 0 + 1 per step
    assert all(s.global_syncs == 1 and not s.origin_pending for s in scheds)
    _origin_round(scheds, models, noted=range(4), steps=steps)
    if spec == "flat":
        np.testing.assert_allclose(models[0], steps + steps * 2.5)  # an average: mean of r + 1
    else:  # a block sync: each block's mean
        np.testing.assert_allclose(models[0], steps + 1.5)
        np.testing.assert_allclose(models[2], steps + 3.5)
    scheds[0].log.close()
    events = [line for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if "first_sync_from_rank0" in line]
    assert len(events) == 1

    scheds = [Scheduler(cfg(policy="fixed", periods=[2]), Topology.flat(2), r, check_origin=True)
              for r in range(2)]
    models = [np.zeros(3), np.zeros(3)]
    _origin_round(scheds, models, noted=range(2), steps=2)
    np.testing.assert_allclose(models[0], 3.0)  # began equal: (2 + 4) / 2


def test_a_rank_that_noted_no_start_makes_the_first_sync_rank0s():
    scheds = [Scheduler(cfg(policy="fixed", periods=[1]), Topology.flat(2), r, check_origin=True)
              for r in range(2)]
    models = [np.zeros(2), np.zeros(2)]
    _origin_round(scheds, models, noted={0})
    assert models[1].tolist() == [1.0, 1.0]  # rank 0's, although the models began equal
    unchecked = [Scheduler(cfg(policy="fixed", periods=[1]), Topology.flat(2), r) for r in range(2)]
    models = [np.zeros(2), np.full(2, 4.0)]
    _origin_round(unchecked, models, noted=set())
    assert models[1].tolist() == [3.5, 3.5]  # no check asked: the plain average
