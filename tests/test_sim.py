"""The cluster simulator: its command line, its figures and its model."""

import json
import math
import os
import subprocess
import sys

import pytest

from adaptive_lsgd import ConfigError, load_config, read_log
from adaptive_lsgd.sim import ClusterSim, SimulationError, ring_allreduce_s
from adaptive_lsgd.tools.cli.sim import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"samples_per_s", "compute_only_samples_per_s", "comm_fraction", "periods", "global_syncs",
        "steps", "wall_s", "periods_over_time"}


def sim_cli(*args):
    return subprocess.run([sys.executable, "-m", "adaptive_lsgd.tools.cli.sim", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def sim_json(*args):
    proc = sim_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def make(hosts=2, wph=1, **kw):
    config = load_config(kw.pop("config", {}), env={})
    args = dict(compute_ms=50, params=1e6, inter_gbps=1.0)
    args.update(kw)
    return ClusterSim(config, hosts, wph, **args)


# -- the figures the product card asks for --------------------------------------------------------
def test_slow_link_reaches_most_of_compute_only_throughput():
    out = sim_json("--hosts", "2", "--workers-per-host", "1", "--inter-gbps", "0.1",
                   "--compute-ms", "50", "--params", "1000000", "--steps", "1000")
    assert KEYS <= set(out)
    assert out["samples_per_s"] >= 0.85 * out["compute_only_samples_per_s"]
    assert out["periods"][0] > 1 and out["comm_fraction"] < 0.15
    assert out["steps"] == 1000 and out["periods_over_time"][0] == [0, [1]]
    assert math.isclose(out["compute_only_samples_per_s"], 2 * 32 / 0.05)


def test_fast_link_keeps_period_one():
    out = sim_json("--hosts", "2", "--workers-per-host", "1", "--inter-gbps", "100",
                   "--compute-ms", "500", "--params", "1000000", "--steps", "100")
    assert out["periods"] == [1]
    assert all(p == [1] for _, p in out["periods_over_time"])
    assert out["global_syncs"] == 100


def test_readable_summary():
    proc = sim_cli("--hosts", "2", "--workers-per-host", "2", "--steps", "30")
    assert proc.returncode == 0, proc.stderr
    assert "4 ranks (2 hosts x 2), 2 level(s)" in proc.stdout
    assert "samples/s" in proc.stdout and "periods" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized arguments"),
    (["--hosts", "0"], "--hosts: expected a positive integer"),
    (["--jitter", "abc"], "--jitter: expected a number"),
    (["--inter-gbps", "0"], "--inter-gbps: expected a number > 0"),
    (["--policy", "sometimes"], "invalid choice"),
    (["--periods", "4,x"], "--periods: expected positive integers"),
    (["--policy", "fixed"], "'periods' is required"),
    (["--hosts", "2", "--workers-per-host", "2", "--periods", "1,2,3"], "topology has 2 level"),
    (["--target-comm-fraction", "1.5"], "target_comm_fraction"),
])
def test_bad_flags_give_usage_not_traceback(args, message):
    proc = sim_cli(*args)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_overlap_is_refused_not_simulated_wrongly(tmp_path):
    with pytest.raises(ConfigError, match="overlapped averaging is not simulated"):
        make(config={"overlap": True})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("overlap: true\n")
    proc = sim_cli("--config", str(cfg))
    assert proc.returncode == 2 and "overlapped averaging is not simulated" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the model ------------------------------------------------------------------------------------
def test_ring_allreduce_time():
    assert ring_allreduce_s(1, 4e6, 1.0, 1e-3) == 0.0
    assert math.isclose(ring_allreduce_s(2, 4e6, 1.0, 0.0), 4e6 / 1.25e8)
    assert math.isclose(ring_allreduce_s(4, 4e6, 8.0, 1e-5), 6e-5 + 1.5 * 4e6 / 1e9)


@pytest.mark.parametrize("chained", [False, True])
def test_hierarchical_wall_time_matches_the_stages(chained):
    sim = make(2, 2, compute_ms=10, params=1e6, inter_gbps=1.0, intra_gbps=10.0, latency_us=100,
               intra_latency_us=1, config={"policy": "fixed", "periods": [1, 2],
                                           "chained_allreduce": chained})
    out = sim.run(steps=4)
    t0 = ring_allreduce_s(2, 4e6, 10.0, 1e-6)
    if chained:  # sliced: each host's two ranks allreduce half the model across hosts
        t1 = ring_allreduce_s(2, 2e6, 1.0, 1e-4)
        global_sync = t0 + t1  # reduce-scatter and allgather (half an allreduce each), allreduce
    else:  # one allreduce over all four ranks across the hosts' links
        t1 = ring_allreduce_s(4, 4e6, 1.0, 1e-4)
        global_sync = t1
    assert out["link_s"] == pytest.approx([t0, t1])
    assert out["syncs_per_level"] == [2, 2]
    # level-0 syncs at steps 1, 3; global syncs at 2, 4
    assert out["wall_s"] == pytest.approx(0.04 + 2 * t0 + 2 * global_sync)
    assert out["compute_only_samples_per_s"] == pytest.approx(4 * 4 * 32 / 0.04)


@pytest.mark.parametrize("chained", [False, True])
def test_a_sync_runs_the_topology_stages(chained):
    sim = make(2, 2, config={"chained_allreduce": chained})
    assert sim.topology.chained is chained
    for level in range(sim.topology.num_levels):
        clocks, free = sim.clocks.copy(), sim.free_clocks.copy()
        ran = sim._collective(clocks, free, level)  # (kind, level) -> each rank's time or NaN
        for rank in range(sim.world):
            stages = [(s.kind, s.link_level) for s in sim.topology.stages(level, rank)]
            took_part = [key for key, times in ran.items() if not math.isnan(times[rank])]
            assert took_part == stages, (level, rank)


def test_chained_allreduce_flag():
    args = ("--hosts", "2", "--workers-per-host", "2", "--steps", "4", "--policy", "fixed",
            "--periods", "1,2", "--params", "1e6", "--inter-gbps", "1", "--intra-gbps", "10",
            "--latency-us", "100", "--intra-latency-us", "1")
    default, chained = sim_json(*args), sim_json(*args, "--chained-allreduce")
    t0 = ring_allreduce_s(2, 4e6, 10.0, 1e-6)
    assert default["link_s"] == pytest.approx([t0, ring_allreduce_s(4, 4e6, 1.0, 1e-4)])
    assert chained["link_s"] == pytest.approx([t0, ring_allreduce_s(2, 2e6, 1.0, 1e-4)])
    assert "--chained-allreduce" in sim_cli("--help").stdout


def test_ranks_measure_their_own_wait():
    sim = make(2, 1, compute_ms=100, slow_host_factor=2.0, config={"policy": "fixed", "periods": [1]})
    sim.run(steps=1)
    t = sim.link_s[0]
    slow, fast = sim.scheds
    assert slow.time_comm == pytest.approx(t)          # arrived last: the transfer only
    assert fast.time_comm == pytest.approx(0.1 + t)    # waited for the slow host
    assert slow.time_compute == pytest.approx(0.2) and fast.time_compute == pytest.approx(0.1)


def test_mini_batch_warmup_allreduces_every_step():
    sim = make(2, 1, compute_ms=10, config={"policy": "fixed", "periods": [4], "warmup": 3})
    out = sim.run(steps=7)
    t = sim.link_s[0]
    assert out["switch_step"] == 3 and out["global_syncs"] == 1
    assert out["wall_s"] == pytest.approx(0.07 + 4 * t)


def test_compute_only_is_the_same_run_with_free_collectives():
    out = make(4, 1, jitter=0.2, seed=3).run(steps=50)
    assert out["compute_only_samples_per_s"] > out["samples_per_s"]
    assert out["compute_only_samples_per_s"] < 4 * 32 / 0.05  # stragglers still wait at syncs


def test_seed_makes_runs_reproducible():
    a = make(3, 2, jitter=0.3, seed=5).run(steps=60)
    b = make(3, 2, jitter=0.3, seed=5).run(steps=60)
    c = make(3, 2, jitter=0.3, seed=6).run(steps=60)
    assert a["wall_s"] == b["wall_s"] and a["periods_over_time"] == b["periods_over_time"]
    assert a["wall_s"] != c["wall_s"]


# -- agreement: shared decisions equal per-rank decisions -----------------------------------------
@pytest.mark.parametrize("hosts, wph, extra", [
    (3, 2, {}),
    (2, 3, {"time_budget": True}),
    (4, 1, {"warmup": 5, "hysteresis": 0.0}),
])
def test_shared_decisions_equal_full_replicas(hosts, wph, extra):
    kw = dict(jitter=0.3, slow_host_factor=1.7, seed=11, compute_ms=20, inter_gbps=2.0,
              config={"target_comm_fraction": 0.1, **extra})
    outs = {}
    for mode in ("per-rank", "shared", "check"):
        sim = make(hosts, wph, decisions="shared" if mode == "shared" else "per-rank",
                   check_agreement=mode == "check", **kw)
        outs[mode] = sim.run(steps=120)
        outs[mode].pop("sim_runtime_s")
        outs[mode].pop("decisions")
    assert outs["check"].pop("agreement")["global_syncs_checked"] == outs["check"]["global_syncs"] > 3
    assert outs["per-rank"] == outs["shared"] == outs["check"]


def test_check_agreement_cli():
    out = sim_json("--hosts", "2", "--workers-per-host", "2", "--jitter", "0.2", "--steps", "120",
                   "--slow-host-factor", "1.5", "--check-agreement")
    assert out["agreement"]["ranks"] == 4 and out["agreement"]["global_syncs_checked"] >= 3


def test_check_agreement_detects_a_desync():
    sim = make(2, 2, check_agreement=True, config={"policy": "fixed", "periods": [1, 1]})
    sim.run(steps=2)
    sim.scheds[3].periods = (1, 5)  # one rank goes its own way
    with pytest.raises(SimulationError):
        sim.run(steps=6)


def test_many_ranks_share_decisions_by_default():
    sim = make(64, 8, compute_ms=100, params=25e6, inter_gbps=10, jitter=0.1)
    out = sim.run(steps=40)
    assert out["decisions"] == "shared" and out["ranks"] == 512
    assert len({s.periods for s in sim.scheds}) == 1 and out["periods"][0] > 1


def test_log_flag_writes_rank_zero_log(tmp_path, capsys):
    path = tmp_path / "sim.jsonl"
    assert main(["--hosts", "2", "--steps", "20", "--log", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    records = [r for r in read_log(str(path)) if "level" in r]
    assert len(records) == out["global_syncs"]


def test_a_run_can_go_on_where_it_stopped():
    whole = make(2, 2, jitter=0.2, seed=4).run(steps=90)
    sim = make(2, 2, jitter=0.2, seed=4)
    sim.run(steps=37)
    split = sim.run(steps=90)
    for out in (whole, split):
        out.pop("sim_runtime_s")
    assert split.keys() == whole.keys()
    for key, value in whole.items():  # floats may differ in the last bit (summation order)
        if isinstance(value, float):
            assert split[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert split[key] == value, key
