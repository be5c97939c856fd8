"""``chained_allreduce: auto`` (the default): in a hierarchy of equal blocks the scheduler runs
one allreduce over all ranks per global sync, and switches to the sliced chained sync (the
blocks' reduce-scatter, the slices' allreduce, the blocks' allgather) when its cost model,
first predicted from the plain form's links and then measured, prices a global sync that way
cheaper; back when the measured sliced sync is not cheaper. Taken from shared values only,
the same on every rank under per-rank timing noise, logged with its reason, resumed exactly."""

from __future__ import annotations

import numpy as np
import pytest
from fake_collective import FakeCluster

from adaptive_lsgd import ConfigError, Topology, load_config
from adaptive_lsgd.cost_model import CostModel
from adaptive_lsgd.policies import CHAINED_MIN_GAIN, make_policy
from adaptive_lsgd.sim import ClusterSim

HOSTS_2X2 = ["a", "a", "b", "b"]


def cfg(**kw):
    return load_config(kw, env={})


class Links:
    """Stage times of a 2 hosts x 2 workers cluster, with per-rank noise: ``plain_s`` one
    allreduce over all four ranks, ``slice_s`` a slice's allreduce across hosts, ``block_s``
    an allreduce inside a host (a reduce-scatter or an allgather: half of it)."""

    def __init__(self, rng, jitter=0.2, plain_s=0.2, slice_s=0.08, block_s=0.004):
        self.rng, self.jitter = rng, jitter
        self.plain_s, self.slice_s, self.block_s = plain_s, slice_s, block_s
        self.ran = []  # (chained_form, stage kinds) per rank-0 sync

    def __call__(self, rank, stage, plan):
        if rank == 0 and stage is plan.stages[0]:
            self.ran.append((plan.chained_form, tuple(s.kind for s in plan.stages)))
        if stage.link_level == 0:
            base = self.block_s * (0.5 if stage.kind in ("reducescatter", "allgather") else 1.0)
        else:
            base = self.slice_s if plan.chained_form else self.plain_s
        return float(base * max(0.05, 1 + self.jitter * self.rng.standard_normal()))


def chained_of(cluster):
    states = {(s.periods, s.chained_form, tuple(sorted(s.decision.mechanisms.items())))
              for s in cluster.scheds}
    assert len(states) == 1, states  # every rank took the same decision
    return next(iter(states))[1]


def run(cluster, rounds, rng, compute=0.01):
    """``rounds`` rounds with noisy step times; checks agreement and the averages after each
    global sync; returns whether the chained sync was in force after each round."""
    out = []
    for _ in range(rounds):
        before = [m.copy() for m in cluster.models]
        results = cluster.run_round(lambda r: compute * max(0.05, 1 + 0.3 * rng.standard_normal()))
        if cluster.syncs[-1][1] == cluster.scheds[0].num_levels - 1:  # a global sync
            mean = np.mean(before, axis=0)  # even step counts: the plain mean, whatever the form
            for m in cluster.models:
                np.testing.assert_allclose(m, mean, rtol=1e-12, atol=1e-12)
        assert len({r.periods for r in results}) == 1
        out.append(chained_of(cluster))
    return out


def auto_cluster(links, **kw):
    topo = Topology.from_config("2x2", HOSTS_2X2, chained="auto")
    models = [np.arange(5.0) * (r + 1) + r for r in range(4)]
    return FakeCluster(cfg(window=4, history=3, **kw), topo, stage_time=links, param_len=5,
                       models=models)


# -- the decision ------------------------------------------------------------------------------
def test_policy_takes_the_sliced_form_when_it_prices_a_global_sync_cheaper():
    policy = make_policy(cfg(), 2)
    first = policy.first(chained="auto")
    assert first.mechanisms["chained"] is False and first.why["chained"] == "not measured yet"
    plain = CostModel(0.01, [0.004, 0.2])
    kw = dict(settled=True, compute=np.array([0.01] * 4), lr=None)
    cheap = CostModel(0.01, [0.004, 0.08], chained=True, sliced=True)
    on = policy.decide(plain, (1, 1), chained_model=cheap, chained_predicted=True, **kw)
    assert on.mechanisms["chained"] is True, on.why
    assert "predicted" in on.why["chained"] and "200.0 ms as one allreduce" in on.why["chained"]
    # the periods come from the form in force: the sliced sync is cheaper, so they are shorter
    off_periods = policy.decide(plain, (1, 1), **kw).periods
    assert on.periods[-1] <= off_periods[-1]
    # a gain of 1.05: not enough to switch on (CHAINED_MIN_GAIN), enough to stay on
    top = plain.sync_s[-1]
    near = CostModel(0.01, [0.004, top / 1.05 - 0.004], chained=True, sliced=True)
    gain = top / near.sync_s[-1]
    assert 1.0 < gain < CHAINED_MIN_GAIN, gain
    fresh = policy.decide(plain, (1, 1), chained_model=near, **kw)
    held = policy.decide(plain, (1, 1), chained_model=near, previous=on, **kw)
    assert fresh.mechanisms["chained"] is False and held.mechanisms["chained"] is True
    assert "measured" in held.why["chained"] and "(>= 1)" in held.why["chained"], held.why
    worse = CostModel(0.01, [0.004, 0.3], chained=True, sliced=True)
    back = policy.decide(plain, (1, 1), chained_model=worse, previous=on, **kw)
    assert back.mechanisms["chained"] is False and "(< 1)" in back.why["chained"]
    # overlapped averages run one collective in flight: the chained sync is not taken with them
    ov = make_policy(cfg(overlap=True), 2)
    ov.first(chained="auto")
    d = ov.decide(plain, (1, 1), chained_model=cheap, **kw)
    assert d.mechanisms["chained"] is False and "overlapped" in d.why["chained"]
    # the fixed policy keeps one allreduce per sync
    fixed = make_policy(cfg(policy="fixed", periods=[2, 8]), 2)
    fixed.first(chained="auto")
    d = fixed.decide(plain, (2, 8), chained_model=cheap, **kw)
    assert d.mechanisms["chained"] is False and "fixed" in d.why["chained"]


def test_overlap_auto_takes_one_overlapped_allreduce_where_it_beats_the_chained_sync():
    """The chained sync blocks; where one allreduce over all ranks hides behind a round
    (overlap: auto would take it) and the cost model prices that faster, the policy overlaps
    the plain form instead; where the plain sync cannot hide, the chained sync stays."""
    kw = dict(settled=True, compute=np.array([0.01] * 4), lr=None, can_overlap=True)
    cheap = CostModel(0.01, [0.004, 0.08], chained=True, sliced=True)
    policy = make_policy(cfg(), 2)
    policy.first(chained="auto")
    hidden = CostModel(0.01, [0.004, 0.2])  # 0.2 s hides behind 64 steps of 10 ms
    d = policy.decide(hidden, (1, 1), chained_model=cheap, **kw)
    assert d.mechanisms == {"time_budget": False, "overlap": True, "chained": False}, d.why
    assert d.why["chained"].endswith(": overlap"), d.why
    rate_ov = hidden.with_overlap().steps_per_s(d.periods)
    rate_ch = cheap.steps_per_s(policy.choose(cheap, (1, 1), 64)[0])
    assert rate_ov > rate_ch
    # without the background form (TensorFlow, elastic jobs) the chained sync is kept
    d = policy.decide(hidden, (1, 1), chained_model=cheap, **{**kw, "can_overlap": False})
    assert d.mechanisms["chained"] is True and d.mechanisms["overlap"] is False
    # a plain sync too slow to hide: overlapped it would still beat blocking plain syncs by
    # OVERLAP_MIN_GAIN, but the chained sync prices faster, so it stays
    slow = CostModel(0.01, [0.004, 2.0])
    assert policy._overlap(slow, (1, 1), 64, True, True, False)[0] is True
    d = policy.decide(slow, (1, 1), chained_model=cheap, **kw)
    assert d.mechanisms["chained"] is True and d.mechanisms["overlap"] is False, d.why
    assert d.why["chained"].endswith(": the chained sync"), d.why
    # overlap: false keeps the chained sync whatever the prices
    no_ov = make_policy(cfg(overlap=False), 2)
    no_ov.first(chained="auto")
    d = no_ov.decide(hidden, (1, 1), chained_model=cheap, **kw)
    assert d.mechanisms["chained"] is True and d.mechanisms["overlap"] is False


@pytest.mark.parametrize("seed", [0, 1])
def test_overlap_instead_of_the_chained_sync_is_the_same_on_every_rank_under_noise(seed):
    """A hierarchy whose plain global sync (0.8 s) hides behind a round: the ranks leave the
    plain blocking form for overlapped averages, never run a sliced sync, and agree."""
    rng = np.random.default_rng(seed)
    links = Links(rng, plain_s=0.8)
    topo = Topology.from_config("2x2", HOSTS_2X2, chained="auto")
    c = FakeCluster(cfg(window=4, history=3), topo, stage_time=links, param_len=5,
                    can_overlap=True)
    overlapped = 0
    for _ in range(1500):
        overlapped += bool(c.step_all_auto(
            lambda r: 0.01 * max(0.05, 1 + 0.3 * rng.standard_normal())))
        state = {(s.periods, tuple(sorted(s.decision.mechanisms.items()))) for s in c.scheds}
        assert len(state) == 1, state
    assert overlapped >= 5
    mech = c.scheds[0].decision.mechanisms
    assert mech["overlap"] is True and mech["chained"] is False, c.scheds[0].decision.why
    assert not any(form for form, _ in links.ran)  # no sliced sync ran
    logs = [c.records(r) for r in range(4)]
    assert all(log == logs[0] for log in logs[1:])
    reasons = [rec["mechanism_reason"]["chained"] for rec in logs[0] if "mechanism_reason" in rec]
    assert any(r.endswith(": overlap") for r in reasons), reasons


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_switches_to_the_sliced_sync_the_same_on_every_rank_under_noise(seed):
    rng = np.random.default_rng(seed)
    links = Links(rng)
    c = auto_cluster(links)
    assert c.scheds[0].topology.chained is False  # the plain form first
    states = run(c, 40, rng)
    assert states[0] is False and states[-1] is True
    on_at = states.index(True)
    assert all(states[on_at:]), states  # it stays on: the measured sliced sync is cheaper
    logs = [c.records(r) for r in range(4)]
    assert all(log == logs[0] for log in logs[1:])
    switches = [rec for rec in logs[0] if "mechanism_reason" in rec]
    assert [rec["mechanism"]["chained"] for rec in switches] == [True]
    assert "predicted" in switches[0]["mechanism_reason"]["chained"]
    last = c.scheds[0].decision.why["chained"]
    assert "measured" in last, last
    # after the switch the syncs ran the sliced stages
    sliced = [kinds for form, kinds in links.ran if form]
    assert ("reducescatter", "allreduce", "allgather") in sliced
    assert all(kinds == ("allreduce",) for form, kinds in links.ran if not form and len(kinds) == 1)
    # the process sets the integrations create include the slices
    assert {(0, 2), (1, 3), (0, 1, 2, 3)} <= set(c.topology.process_sets())


def test_auto_switches_back_when_the_measured_sliced_sync_is_dearer_and_does_not_flap():
    rng = np.random.default_rng(3)
    links = Links(rng)
    c = auto_cluster(links)
    states = run(c, 30, rng)
    assert states[-1] is True
    links.slice_s = 0.3  # the slices' allreduce gets dearer than one allreduce over all ranks
    later = run(c, 60, rng)
    assert later[-1] is False
    off_at = later.index(False)
    assert not any(later[off_at:]), later  # no flapping: the measurement says it is dearer
    switches = [rec for rec in c.records(0) if "mechanism_reason" in rec]
    assert [rec["mechanism"]["chained"] for rec in switches] == [True, False]
    assert "measured" in switches[1]["mechanism_reason"]["chained"]


def test_auto_tries_the_sliced_form_once_and_keeps_one_allreduce_where_links_cost_the_same():
    # loopback: a slice's allreduce costs what the whole allreduce costs (latency-bound),
    # so the sliced sync pays the blocks' stages on top
    rng = np.random.default_rng(4)
    links = Links(rng, plain_s=0.01, slice_s=0.01, block_s=0.004)
    c = auto_cluster(links)
    states = run(c, 60, rng)
    assert states[-1] is False
    switches = [rec["mechanism"]["chained"] for rec in c.records(0) if "mechanism_reason" in rec]
    assert switches in ([], [True, False]), switches  # at most one try


def test_chained_form_resumes_exactly_from_a_checkpoint():
    rng = np.random.default_rng(5)
    a = auto_cluster(Links(rng, jitter=0.0))
    run(a, 30, rng, compute=0.01)
    assert a.scheds[0].chained_form
    states = [s.state_dict() for s in a.scheds]
    b = auto_cluster(Links(rng, jitter=0.0))
    for s, st in zip(b.scheds, states):
        s.load_state_dict(st)
        assert s.chained_form and s.decision.mechanisms == a.scheds[0].decision.mechanisms
        assert s.model.sync_s == a.scheds[0].model.sync_s
    b.models = [m.copy() for m in a.models]
    n_a = [len(log.records) for log in a.logs]
    for cl in (a, b):
        for _ in range(20):
            cl.run_round([0.01, 0.01, 0.012, 0.011])
    for r in range(4):
        tail = [{k: v for k, v in rec.items() if k != "time"} for rec in a.logs[r].records[n_a[r]:]]
        assert tail == b.records(r)
        np.testing.assert_array_equal(a.models[r], b.models[r])


# -- where there is nothing to decide -----------------------------------------------------------
def test_no_sliced_form_for_uneven_hosts_or_elastic_jobs():
    uneven = Topology.from_config("hosts", ["a", "a", "b"], chained="auto")
    assert uneven.num_levels == 2 and uneven.alternative is None
    elastic = Topology.from_config("2x2", HOSTS_2X2, chained="auto", elastic=True)
    assert elastic.alternative is None
    for topo in (uneven, elastic):
        c = FakeCluster(cfg(), topo)
        for _ in range(20):
            c.run_round([0.01] * topo.size)
        d = c.scheds[0].decision
        assert d.mechanisms["chained"] is False and "no sliced form" in d.why["chained"]
        assert all(not s.chained_form for s in c.scheds)


def test_flat_jobs_have_no_chained_mechanism_and_configured_forms_say_so():
    flat = FakeCluster(cfg(), Topology.from_config("auto", ["a", "b"], chained="auto"))
    assert "chained" not in flat.scheds[0].decision.mechanisms
    for value, on in ((True, True), (False, False)):
        topo = Topology.from_config("2x2", HOSTS_2X2, chained=value)
        c = FakeCluster(cfg(chained_allreduce=value), topo)
        for _ in range(20):
            c.run_round([0.01] * 4)
        d = c.scheds[0].decision
        assert d.mechanisms["chained"] is on and d.why["chained"] == "configured"


def test_config_accepts_auto_as_the_default():
    assert load_config({}, env={}).chained_allreduce == "auto"
    for value in ("auto", True, False, "sliced", "leaders"):
        assert load_config({"chained_allreduce": value}, env={}).chained_allreduce == value
    with pytest.raises(ConfigError, match="expected auto, true, false or one of the forms"):
        load_config({"chained_allreduce": "ring"}, env={})


def test_the_simulator_default_takes_the_chained_sync_on_a_slow_link_and_agrees():
    out = {}
    for chained in ("auto", False):
        sim = ClusterSim(cfg(chained_allreduce=chained), hosts=4, workers_per_host=4,
                         compute_ms=20, params=1_050_000, inter_gbps=0.05, jitter=0.2,
                         check_agreement=True)
        out[chained] = sim.run(1000), [s.chained_form for s in sim.scheds]
    (auto, forms), (plain, plain_forms) = out["auto"], out[False]
    assert all(forms) and not any(plain_forms)
    assert auto["samples_per_s"] > plain["samples_per_s"]
