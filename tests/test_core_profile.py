"""Profiles seed the scheduler's cost model (issue #3): the first periods come from the
profile's prediction, unmeasured levels fall back to it, measurements take over."""

from __future__ import annotations

import json

import pytest
from fake_collective import FakeCluster

from adaptive_lsgd import Topology, load_config
from adaptive_lsgd.agreement import ConfigMismatchError, check_agreement, rank_info
from adaptive_lsgd.config import ConfigError
from adaptive_lsgd.policies import make_policy
from adaptive_lsgd.profile import (
    PROFILE_FORMAT,
    Profile,
    ProfileError,
    level_kinds,
    load_profile,
    profile_from_dict,
)


def profile_dict(alpha=1e-3, gbps=0.1, kinds=("inter",), compute=0.02, nbytes=4_000_000):
    return {"format": PROFILE_FORMAT, "version": 1,
            "model": {"parameters": nbytes // 4, "bytes": nbytes, "batch_size": 32},
            "compute": {"step_s": compute},
            "links": {k: {"alpha_s": alpha, "bus_bytes_per_s": gbps * 1e9 / 8, "ranks": 2}
                      for k in kinds}}


@pytest.fixture
def write_profile(tmp_path):
    def write(data, name="profile.json"):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return str(path)
    return write


def test_link_time_is_the_ring_formula():
    prof = profile_from_dict(profile_dict(alpha=1e-3, gbps=8.0))  # 1e9 B/s bus bandwidth
    assert prof.link_time("inter", 1e6, 2) == pytest.approx(1e-3 + 1e-3)
    assert prof.link_time("inter", 1e6, 4) == pytest.approx(1e-3 + 1.5e-3)
    assert prof.link_time("inter", 1e6, 1) == 0.0
    # an unmeasured kind borrows the measured one; with_link answers "what if"
    assert prof.link_time("intra", 1e6, 2) == prof.link_time("inter", 1e6, 2)
    fast = prof.with_link("intra", gbps=80.0, latency_s=1e-5)
    assert fast.link_time("intra", 1e6, 2) == pytest.approx(1e-5 + 1e-4)
    assert fast.link_time("inter", 1e6, 2) == prof.link_time("inter", 1e6, 2)


def test_sync_overhead_is_priced_once_per_sync():
    """``sync.overhead_s`` (packing and unpacking outside the collective) adds to every level
    of a plain hierarchy and, in a chained one, to the top only (its stages share one packing);
    a what-if link keeps it; profiles without it price none."""
    data = {**profile_dict(alpha=1e-3, gbps=8.0, kinds=("intra", "inter")),
            "sync": {"overhead_s": 0.01}}
    with_it, without = profile_from_dict(data), profile_from_dict(profile_dict(alpha=1e-3, gbps=8.0))
    assert with_it.sync_overhead_s == 0.01 and without.sync_overhead_s == 0.0
    levels = [("intra", 2), ("inter", 4)]
    base = [with_it.link_time(k, 4e6, r) for k, r in levels]
    plain = with_it.cost_model(levels).link_s
    assert plain == pytest.approx([base[0] + 0.01, base[1] + 0.01])
    assert with_it.cost_model(levels, chained=True).link_s == pytest.approx([base[0], base[1] + 0.01])
    assert with_it.with_link("inter", gbps=0.1).cost_model([("inter", 2)]).link_s[0] == \
        pytest.approx(1e-3 + 4e6 / (0.1e9 / 8) + 0.01)
    assert with_it.cost_model([("intra", 1)]).link_s == [0.0]  # a block of one: no sync
    bad = {**data, "sync": {"overhead_s": -1}}
    with pytest.raises(ProfileError, match="sync.overhead_s"):
        profile_from_dict(bad)


def test_level_kinds_from_hosts_and_defaults():
    topo = Topology.from_config("auto", ["a", "a", "b", "b"])
    assert topo.spans_hosts() == [False, True]
    assert level_kinds(2, topo.spans_hosts()) == ["intra", "inter"]
    one_host = Topology.from_config("auto", ["a", "a"])
    assert level_kinds(1, one_host.spans_hosts()) == ["intra"]
    assert level_kinds(1) == ["inter"] and level_kinds(3) == ["intra", "intra", "inter"]


def test_seeded_scheduler_starts_at_the_profile_recommendation(write_profile):
    path = write_profile(profile_dict(alpha=1e-3, gbps=0.1, compute=0.02, nbytes=4_000_000))
    config = load_config({"profile": path}, env={})
    c = FakeCluster(config, Topology.flat(2), link_s=[0.33], param_len=1_000_000 // 4)
    seed = Profile(0.02, 4_000_000, 32, {"inter": (1e-3, 0.1e9 / 8)}).cost_model(
        [("inter", 2)], nbytes=1_000_000)
    expected = make_policy(config, 1).best(seed, config.target_comm_fraction, None)
    assert expected[0] > 1
    assert all(s.periods == expected for s in c.scheds)
    assert all(s.last_decision == "profile" for s in c.scheds)
    # the first record says its model came from the profile; once measured, it does not
    c.step_all([0.02, 0.02])
    for _ in range(expected[0] * 3):
        c.step_all([0.02, 0.02])
    recs = [r for r in c.records(0) if "level" in r]
    assert recs[0]["from_profile"] is True
    assert recs[-1]["from_profile"] is False
    assert recs[-1]["link_s"] == [pytest.approx(0.33)]


def test_unseeded_scheduler_measures_first(write_profile):
    c = FakeCluster(load_config({}, env={}), Topology.flat(2), link_s=[0.33])
    assert all(s.periods == (1,) and s.model is None for s in c.scheds)


def test_seed_fills_an_unmeasured_lower_level(write_profile):
    path = write_profile(profile_dict(alpha=1e-4, gbps=0.1, kinds=("intra", "inter"), compute=0.01))
    data = json.loads(open(path).read())
    data["links"]["intra"]["bus_bytes_per_s"] = 100e9 / 8
    path = write_profile(data)
    config = load_config({"profile": path}, env={})
    topo = Topology.from_config("auto", ["a", "a", "b", "b"])
    c = FakeCluster(config, topo, link_s=[0.001, 0.5], param_len=250_000)
    s = c.scheds[0]
    assert s.model.link_s[0] < s.model.link_s[1]  # intra from the profile's fast link
    assert s.periods[1] > 1
    # only the top level measured so far: the lower one still comes from the profile
    s._hist_links[1].append(0.5)
    s._hist_compute.append(0.01)
    m = s._build_model()
    assert m.link_s == [pytest.approx(s.seed.link_s[0]), 0.5]


def test_profile_errors_name_the_field(write_profile, tmp_path):
    with pytest.raises(ConfigError, match="'profile'.*does not exist"):
        load_config({"profile": str(tmp_path / "nope.json")}, env={})
    bad = profile_dict()
    bad["links"]["inter"]["alpha_s"] = -1
    with pytest.raises(ConfigError, match="links.inter.alpha_s"):
        load_config({"profile": write_profile(bad)}, env={})
    with pytest.raises(ProfileError, match="not an adaptive-lsgd profile"):
        load_profile(write_profile({"format": "something-else"}))
    with pytest.raises(ProfileError, match="version 7"):
        load_profile(write_profile({**profile_dict(), "version": 7}))
    with pytest.raises(ProfileError, match="unknown link kind"):
        load_profile(write_profile({**profile_dict(), "links": {"wan": {}}}))
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not readable JSON"):
        load_profile(str(tmp_path / "garbage.json"))


def test_ranks_with_different_profile_contents_disagree(write_profile, tmp_path):
    a = write_profile(profile_dict(compute=0.02), "a.json")
    cfg = load_config({"profile": a}, env={})
    info0 = rank_info(cfg, "h0")
    (tmp_path / "a.json").write_text(json.dumps(profile_dict(compute=0.05)))  # host 1's copy
    info1 = rank_info(cfg, "h1")
    with pytest.raises(ConfigMismatchError, match="profile_sha256"):
        check_agreement([info0, info1])


def test_seeded_resume_gives_the_same_decisions(write_profile):
    path = write_profile(profile_dict(alpha=1e-3, gbps=0.1))
    config = load_config({"profile": path}, env={})
    a = FakeCluster(config, Topology.flat(2), link_s=[0.2], param_len=250_000)
    for _ in range(40):
        a.step_all(0.02)
    states = [s.state_dict() for s in a.scheds]
    b = FakeCluster(config, Topology.flat(2), link_s=[0.2], param_len=250_000, models=a.models)
    for s, st in zip(b.scheds, states):
        s.load_state_dict(st)
    n_a = len(a.records(0))
    for _ in range(200):
        a.step_all(0.02)
        b.step_all(0.02)
    assert a.records(0)[n_a:] == b.records(0)
