"""Property-based tests: agreement under noise, monotonicity, compute- and comm-bound limits."""

import math

import numpy as np
from fake_collective import FakeCluster
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adaptive_lsgd import CostModel, Topology, load_config
from adaptive_lsgd.policies import AdaptivePolicy

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

SPECS = {
    "flat3": ("flat", 3),
    "2x2": ("2x2", 4),
    "3x2": ("3x2", 6),
    "uneven": ([[0, 1, 2], [3], [4, 5]], 6),
    "2x2x2": ("2x2x2", 8),
}
TOPOLOGIES = sorted(SPECS)


# The chained (hierarchical) allreduce: off, the leaders' form, or sliced where the links allow
CHAINED = st.sampled_from([False, "leaders", "auto"])


def make_topology(name, chained=False):
    """The named topology; ``chained`` is one of :data:`CHAINED`."""
    spec, size = SPECS[name]
    return Topology.from_config(spec, ["h"] * size, chained=bool(chained),
                                sliced=False if chained == "leaders" else None)


def cfg(**kw):
    return load_config(kw, env={})


def link_times(num_levels, data):
    return [data.draw(st.floats(1e-4, 0.5), label=f"link{lvl}") for lvl in range(num_levels)]


# -- invariant 1: identical decisions whatever each rank measured ---------------------------------
@SETTINGS
@given(data=st.data(), topo_name=st.sampled_from(TOPOLOGIES), chained=CHAINED,
       seed=st.integers(0, 2**16),
       jitter=st.floats(0.0, 0.8), time_budget=st.booleans(), warmup=st.integers(0, 4),
       target=st.floats(0.02, 0.5), hysteresis=st.sampled_from([0.0, 0.1, 0.25]),
       max_period=st.sampled_from([4, 8, 16]), policy=st.sampled_from(["adaptive", "adaptive", "fixed"]))
def test_ranks_agree_under_timing_noise(data, topo_name, chained, seed, jitter, time_budget, warmup,
                                        target, hysteresis, max_period, policy):
    topo = make_topology(topo_name, chained)
    rng = np.random.default_rng(seed)
    links = link_times(topo.num_levels, data)
    compute = rng.uniform(0.005, 0.2, size=topo.size)  # a mixed cluster
    periods = [data.draw(st.integers(1, 3), label="period") for _ in range(topo.num_levels)]
    config = cfg(policy=policy, periods=periods, target_comm_fraction=target, hysteresis=hysteresis,
                 max_period=max_period, time_budget=time_budget, warmup=warmup, window=4, history=3)

    def noisy(base):
        return float(base * max(0.01, 1 + jitter * rng.standard_normal()))

    c = FakeCluster(config, topo, stage_time=lambda r, stage, plan: noisy(links[stage.link_level]))
    for _ in range(warmup):
        c.step_all([noisy(x) for x in compute])
    history = []
    for _ in range(12 if time_budget else 0):
        c.run_round(lambda r: noisy(compute[r]))
        history.append([s.periods for s in c.scheds])
    for _ in range(0 if time_budget else 40):
        if c.step_all([noisy(x) for x in compute]) is not None:
            history.append([s.periods for s in c.scheds])

    assert history
    for per_rank in history:
        assert len(set(per_rank)) == 1, per_rank
    assert len({(s.periods, s.last_decision, tuple(s.rank_steps or ())) for s in c.scheds}) == 1
    drop = ("time", "step") if time_budget else ("time",)
    logs = [c.records(r, drop=drop) for r in range(topo.size)]
    assert all(log == logs[0] for log in logs[1:])
    assert any("decision" in rec for rec in logs[0])


# -- a slower link never gives a smaller period ---------------------------------------------------
def _policy(num_levels, target, hysteresis, max_period):
    return AdaptivePolicy(cfg(target_comm_fraction=target, hysteresis=hysteresis,
                              max_period=max_period), num_levels)


@SETTINGS
@given(data=st.data(), levels=st.integers(1, 2), compute=st.floats(1e-3, 1.0),
       target=st.floats(0.01, 0.5), hysteresis=st.sampled_from([0.0, 0.1, 0.25]),
       max_period=st.sampled_from([8, 32, 64, 200]), slow=st.floats(1.0, 50.0),
       cap=st.one_of(st.none(), st.integers(1, 500)), chained=CHAINED)
def test_slower_link_never_gives_a_smaller_period(data, levels, compute, target, hysteresis,
                                                  max_period, slow, cap, chained):
    policy = _policy(levels, target, hysteresis, max_period)
    links = [data.draw(st.floats(1e-5, 2.0), label=f"link{lvl}") for lvl in range(levels)]
    which = data.draw(st.sampled_from(["all"] + list(range(levels))), label="which")
    slower = [t * slow if which in ("all", lvl) else t for lvl, t in enumerate(links)]
    # A block sync is its own allreduce (non-chained): once the intra-block link is slower
    # than the one above it, skipping block syncs for global ones is the faster choice and
    # may shorten the global period. The property holds for links ordered as in a cluster.
    # (Chained, a global sync also pays 2x every link below it, so sync costs are always
    # ordered and any links are allowed.)
    if not chained:
        assume(all(a <= b for a, b in zip(slower, slower[1:])))
    current = tuple(data.draw(st.integers(1, max_period), label="current") for _ in range(levels))
    fast_m = CostModel(compute, links, chained=bool(chained), sliced=chained == "auto")
    slow_m = CostModel(compute, slower, chained=bool(chained), sliced=chained == "auto")

    fast_best, slow_best = policy.best(fast_m, target, cap), policy.best(slow_m, target, cap)
    assert math.prod(slow_best) >= math.prod(fast_best)
    fast_pick, _ = policy.choose(fast_m, current, cap)
    slow_pick, _ = policy.choose(slow_m, current, cap)
    assert math.prod(slow_pick) >= math.prod(fast_pick)
    if levels == 1:
        assert slow_best[0] >= fast_best[0] and slow_pick[0] >= fast_pick[0]


@settings(max_examples=20, deadline=None, derandomize=True)
@given(topo_name=st.sampled_from(["flat3", "2x2"]), compute=st.floats(0.005, 0.5),
       link0=st.floats(1e-4, 1.0), link1=st.floats(1e-4, 1.0), slow=st.floats(1.0, 20.0),
       chained=CHAINED)
def test_slower_link_end_to_end(topo_name, compute, link0, link1, slow, chained):
    topo = make_topology(topo_name, chained)
    base = [link0, link1][:topo.num_levels]
    finals = []
    for links in (base, [t * slow for t in base]):
        c = FakeCluster(cfg(max_period=32), topo, link_s=links)
        for _ in range(6):
            c.step_all(compute)
        assert c.scheds[0].model is not None
        finals.append(c.scheds[0].periods)
    assert math.prod(finals[1]) >= math.prod(finals[0])
    if topo.num_levels == 1:
        assert finals[1][0] >= finals[0][0]


# -- compute-bound: period 1; comm-bound: the predicted share meets the target --------------------
@SETTINGS
@given(topo_name=st.sampled_from(["flat3", "2x2", "3x2"]), compute=st.floats(0.001, 1.0),
       share=st.floats(0.0, 0.95), split=st.floats(0.0, 1.0), target=st.floats(0.02, 0.5),
       jitter=st.floats(0.0, 0.5), seed=st.integers(0, 1000), chained=CHAINED)
def test_compute_bound_cluster_gets_period_one(topo_name, compute, share, split, target, jitter, seed,
                                               chained):
    topo = make_topology(topo_name, chained)
    # The top sync (its own link; chained, also reduce + broadcast at level 0) is at most the
    # target share.
    top_sync = compute * share * target / (1 - target)
    links = [top_sync] if topo.num_levels == 1 else [split * top_sync / 2, (1 - split) * top_sync]
    rng = np.random.default_rng(seed)
    c = FakeCluster(cfg(target_comm_fraction=target), topo, link_s=links)
    for _ in range(20):  # noise only ever makes a step slower: still compute-bound
        c.step_all(list(compute * (1 + jitter * rng.random(topo.size))))
    assert all(s.periods == (1,) * topo.num_levels for s in c.scheds)
    assert c.scheds[0].model is not None


@SETTINGS
@given(topo_name=st.sampled_from(["flat3", "2x2"]), compute=st.floats(0.001, 1.0),
       ratio0=st.floats(0.05, 20.0), ratio1=st.floats(0.05, 20.0), target=st.floats(0.02, 0.5),
       hysteresis=st.sampled_from([0.0, 0.25]), max_period=st.sampled_from([16, 64]),
       chained=CHAINED)
def test_comm_bound_cluster_meets_the_target(topo_name, compute, ratio0, ratio1, target, hysteresis,
                                             max_period, chained):
    topo = make_topology(topo_name, chained)
    links = [compute * ratio0, compute * ratio1][:topo.num_levels]
    model = CostModel(compute, links, chained=bool(chained), sliced=topo.sliced)
    ones = [1] * topo.num_levels
    # the caps allow it: each level's max_period, and (a hierarchy's default global cap) their
    # product at most max_period too
    _, total, frac = model.grid([range(1, max_period + 1)] * topo.num_levels)
    assume(np.any(frac[total <= max_period] <= target * 0.999))
    assume(model.comm_fraction(ones) > min(target * (1 + hysteresis), 0.999))  # comm-bound
    c = FakeCluster(cfg(target_comm_fraction=target, hysteresis=hysteresis, max_period=max_period),
                    topo, link_s=links)
    for _ in range(8):
        c.step_all(compute)
    s = c.scheds[0]
    assert s.periods != tuple(ones)
    assert s.model.comm_fraction(s.periods) <= target + 1e-9
    last = c.logs[0].records[-1]
    assert last["predicted_comm_fraction"] <= target + 1e-9
    # ... and it is the smallest global period that does.
    _, total, frac = model.grid([range(1, max_period + 1)] * topo.num_levels)
    assert np.all(frac[total < math.prod(s.periods)] > target)
