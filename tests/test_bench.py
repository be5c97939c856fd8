"""``alsgd-bench`` (adaptive_lsgd.tools.bench): short real runs of scenarios at a tiny size under
real Horovod (Gloo), checking the JSON schema and that the numbers are sane. The speed goals
themselves are benchmarks (docs/benchmarks.md), not tests."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jsonschema
import pytest
from conftest import REPO

from adaptive_lsgd.tools.bench import scenarios as bench

pytestmark = [pytest.mark.torch, pytest.mark.skipif(
    importlib.util.find_spec("horovod") is None or shutil.which(
        "horovodrun", path=os.path.dirname(sys.executable)) is None,
    reason="Horovod is not installed (run `make test`, which sets up .venv)")]


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


def _bench(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALSGD_")}
    return subprocess.run([sys.executable, "-m", "adaptive_lsgd.tools.bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_overhead_tiny_run_writes_sane_json(tmp_path):
    """All overhead variants (incl. the PyTorch peer), 2 interleaved rounds of 8 steps, 2 ranks."""
    path = tmp_path / "overhead.json"
    proc = _bench("overhead", "--json", str(path), "--rounds", "2", "--steps", "8")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "[bench] round 2/2" in proc.stdout  # progress is visible while it runs
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, bench.SCHEMA)
    res = doc["results"]
    assert set(res) == {"compute-only", "horovod", "horovod-accumulate", "local-h1", "alsgd-minibatch",
                        "local-h4", "torch-peer", "adaptive"}
    steps = 2 * 8
    # a variant in time-budget rounds (the default's auto, when the two ranks' step times differ
    # on a busy machine) runs whole rounds: at least the segment's steps on rank 0
    assert all((r["steps"] >= steps if (r.get("mechanisms") or {}).get("time_budget")
                else r["steps"] == steps) and len(r["rates"]) == 2 for r in res.values())
    assert res["horovod"]["global_syncs"] == steps
    assert res["horovod-accumulate"]["global_syncs"] == steps // 4
    assert res["local-h1"]["global_syncs"] == steps
    assert res["local-h4"]["global_syncs"] == steps // 4
    assert res["alsgd-minibatch"]["global_syncs"] == steps  # every mini-batch step is a sync
    assert res["torch-peer"]["global_syncs"] == steps // 4
    assert res["compute-only"]["global_syncs"] == 0
    assert res["local-h4"]["periods"] == [4] and res["local-h4"]["syncs_per_level"] == [steps // 4]
    # compute-only is the limit: no variant beats it beyond noise (a busy 2-core machine)
    limit = doc["compute_only_samples_per_s"]
    assert all(r["samples_per_s"] <= 1.5 * limit for r in res.values()), res
    assert all(0 <= r["comm_fraction"] <= 1 and 0 <= r["test_acc"] <= 1 for r in res.values())
    assert [g["goal"] for g in doc["goals"]][0].startswith("local-h1 step time")


@pytest.mark.cluster
@pytest.mark.skipif(not _netns_usable(), reason="needs root, `ip netns` and `tc` (emulated cluster)")
def test_comm_bound_tiny_run_on_emulated_cluster(tmp_path):
    """2 emulated hosts at 100 Mbit/s, a 1M-parameter model: allreduce every step is slow."""
    out = tmp_path / "bench"
    proc = _bench("comm-bound", "--out", str(out), "--rounds", "2", "--steps", "8",
                  "--variants", "horovod,local-h4,adaptive,adaptive-overlap")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    doc = json.loads((out / "comm-bound.json").read_text())
    jsonschema.validate(doc, bench.SCHEMA)
    res = doc["results"]
    assert set(res) == {"compute-only", "horovod", "local-h4", "adaptive", "adaptive-overlap"}
    # overlap: starts at H=1 like adaptive; its averages complete (a segment drains the one in flight)
    over = res["adaptive-overlap"]
    assert over["trace"][0][2] == [1] and over["global_syncs"] >= len(over["trace"]) > 2
    assert {g["goal"] for g in doc["goals"]} >= {"adaptive-overlap >= 0.9 of compute-only",
                                                 "adaptive >= 0.9 of compute-only"}
    assert res["local-h4"]["global_syncs"] == 16 // 4
    # 4.2 MB over two 100 Mbit/s links takes > 0.3 s; a step computes in far less
    assert res["horovod"]["samples_per_s"] < 0.5 * doc["compute_only_samples_per_s"], res
    assert res["horovod"]["comm_fraction"] > 0.5
    assert res["local-h4"]["samples_per_s"] > res["horovod"]["samples_per_s"]
    assert res["adaptive"]["trace"][0][2] == [1]  # the adaptive policy starts at H=1 ...
    assert res["adaptive"]["periods"][0] > 1      # ... and raises H on the slow link
    assert doc["cluster"]["rate_mbit"] == 100 and doc["ranks"] == 2
    # the results page is generated from the JSON
    page = bench_report_page(out)
    assert "## `comm-bound`" in page and (out / "throughput.png").stat().st_size > 1000


@pytest.mark.cluster
@pytest.mark.skipif(not _netns_usable(), reason="needs root, `ip netns` and `tc` (emulated cluster)")
def test_time_budget_segments_count_the_slowest_ranks_steps(tmp_path):
    """heterogeneous (host 1 2x slower): a time-budget segment runs whole rounds until the slow
    rank took the segment's steps, so the fast rank (rank 0) takes more steps than in the
    fixed-H variant and the variant trains on more samples in the same number of rounds."""
    path = tmp_path / "het.json"
    proc = _bench("heterogeneous", "--json", str(path), "--rounds", "3", "--steps", "8",
                  "--variants", "local-h8,local-h8-time-budget")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(path.read_text())["results"]
    fixed, budget = res["local-h8"], res["local-h8-time-budget"]
    assert fixed["steps"] == 3 * 8 and fixed["global_syncs"] == 3
    # the first round runs H=8 on both ranks; once step times are shared, rank 0 takes ~2x
    assert budget["steps"] >= 8 + 2 * 12, budget
    assert budget["samples"] > fixed["samples"] * 1.2, (budget["samples"], fixed["samples"])


def test_default_config_takes_time_budget_rounds_on_a_mixed_cluster(tmp_path):
    """heterogeneous with the default config (``adaptive``): time-budget rounds engage by
    themselves, so the fast rank takes more steps and the job processes more samples than
    Horovod in the same rounds."""
    path = tmp_path / "het.json"
    proc = _bench("heterogeneous", "--json", str(path), "--rounds", "3", "--steps", "24",
                  "--variants", "horovod,adaptive")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(path.read_text())["results"]
    assert res["adaptive"]["samples"] > 1.25 * res["horovod"]["samples"], res["adaptive"]["samples"]
    assert res["adaptive"]["steps"] > 3 * 24 * 1.3  # rank 0's steps: more than the slow rank's


def test_stalled_rounds_are_the_ones_far_above_the_median():
    assert bench.stalled_rounds([1.0, 1.1, 0.9, 3.5, 1.0]) == [3]
    assert bench.stalled_rounds([1.0, 1.1, 2.9]) == []
    assert bench.stalled_rounds([5.0, 1.0]) == []  # too few rounds to tell


def test_paired_ratio_is_the_median_of_per_round_ratios():
    r = {"a": {"rates": [100.0, 300.0, 90.0, 100.0]}, "b": {"rates": [50.0, 100.0, 100.0, 100.0]}}
    assert bench.paired_ratio(r, "a", "b") == pytest.approx((1.0 + 2.0) / 2)  # ratios 2, 3, .9, 1
    assert bench.paired_ratios(r, "a", "b") == [2.0, 3.0, 0.9, 1.0]
    assert bench.paired_ratio(r, "a", "missing") is None
    # windows of 2 rounds: samples over summed wall time, then the ratio per window
    r["a"]["walls"], r["b"]["walls"] = [1.0, 1.0, 2.0, 1.0], [2.0, 1.0, 1.0, 1.0]
    window = bench.paired_ratios(r, "a", "b", window=2)
    assert window == pytest.approx([(400 / 2) / (200 / 3), (280 / 3) / (200 / 2)])


def test_lm_goals_compare_bf16_at_one_fixed_period_and_on_the_adaptive_pair():
    def row(loss, samples=1000, syncs=8, nbytes=100.0):
        # per-round evaluations [samples, accuracy, validation loss, seconds]
        return {"accs": [[samples // 2, 0.0, loss + 1.0, 1.0], [samples, 0.0, loss, 2.0]],
                "val_loss": loss, "samples": samples, "global_syncs": syncs,
                "bytes_per_sync": nbytes}
    r = {"horovod": row(2.0, syncs=512), "diloco-h64": row(2.0),
         "diloco-h64-bf16": row(2.008, nbytes=50.0),
         "adaptive-diloco": row(2.0, samples=1500), "adaptive-diloco-bf16": row(2.1, nbytes=50.0)}
    goals = {g["goal"]: g for g in bench._lm_goals(r, {k: 1.0 for k in r})}
    fixed = goals["bf16 (at a fixed period): validation loss within 0.5% of diloco-h64's "
                  "(relative difference)"]
    assert fixed["value"] == pytest.approx(0.004) and fixed["met"]  # 2.008 / 2.0 - 1
    pair = goals["bf16 (adaptive periods): validation loss within 0.5% of adaptive-diloco's "
                 "(relative difference)"]
    # adaptive-diloco at the equal samples (1000): its curve interpolated between 750 and 1500
    assert pair["value"] == pytest.approx(2.1 / (3.0 - 1.0 * 250 / 750) - 1) and not pair["met"]
    assert goals["bf16 (at a fixed period): bytes per global sync halved "
                 "(diloco-h64-bf16 / diloco-h64)"]["met"]


def test_comm_fraction_of_variants_that_overlapped_by_themselves_is_from_throughput():
    """The summary of an overlapped run counts each segment's final wait in full (the segment
    is charged less): for a variant whose overlap: auto engaged, as for one configured with
    overlap: true, the page's comm_fraction is 1 - its samples/s / compute-only's."""
    def variant(kind, rate, **extra):
        return {"kind": kind, "rates": [rate] * 3, "walls": [1.0] * 3, "samples": 3 * rate,
                "samples_per_s": rate,
                "steps": 96, "H": 16, "global_syncs": 6, "test_acc": 0.5, "accs": [], **extra}

    sc = bench.SCENARIOS["comm-bound"]
    s = {"model": "mlp", "width": 1000, "batch": 64, "lr": 0.05, "rounds": 3, "segment_steps": 32,
         "variants": [{"name": "adaptive", "config": {}},
                      {"name": "adaptive-overlap", "config": {"overlap": True}}]}
    summary = {"switch_step": 0, "comm_fraction_summary": 0.4}
    raw = {"params": 1, "ranks": 2, "wall_s": 9.0, "variants": {
        "compute-only": variant("compute", 10000.0),
        "adaptive": variant("alsgd", 9000.0, mechanisms={"overlap": True}, **summary),
        "adaptive-overlap": variant("alsgd", 8000.0, mechanisms={"overlap": True}, **summary),
        "local-h16": variant("alsgd", 5000.0, mechanisms={"overlap": False}, **summary)}}
    results = bench.document("comm-bound", sc, s, raw, quick=True)["results"]
    assert results["adaptive"]["comm_fraction"] == pytest.approx(0.1)
    assert results["adaptive-overlap"]["comm_fraction"] == pytest.approx(0.2)
    assert results["local-h16"]["comm_fraction"] == pytest.approx(0.4)  # blocking: the summary's


def bench_report_page(out) -> str:
    from adaptive_lsgd.tools.bench.report import report

    return report(str(out))


def test_bad_arguments_give_one_line_errors(tmp_path):
    proc = _bench("comm-bound", "--out", str(tmp_path), "--variants", "horovod,nope", timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    if _netns_usable():
        assert "unknown variant(s) nope" in proc.stderr
    proc = _bench("changing-network", "--out", str(tmp_path), "--variants", "local-h-start",
                  timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    if _netns_usable():
        assert "variant local-h-start copies the period of adaptive: select both" in proc.stderr
    proc = _bench("no-such-scenario", "--json", "x.json", timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
    proc = _bench("report", "--out", str(tmp_path / "empty"), timeout=60)
    assert proc.returncode == 1 and "no scenario JSON files" in proc.stderr


def test_accuracy_over_seeds_is_averaged_on_the_results_page(tmp_path):
    """``--seed N`` runs land beside seed 0 as ACCURACY-seedN.json; the page gives per-seed
    accuracies, their means and the goal on the mean difference to horovod."""
    doc = json.loads(open(os.path.join(REPO, "docs", "bench", "accuracy.json")).read())
    jsonschema.validate(doc, bench.SCHEMA)
    other = json.loads(json.dumps(doc))
    other["seed"] = 1
    other["results"]["adaptive"]["test_acc"] = doc["results"]["horovod"]["test_acc"] - 0.02
    (tmp_path / "accuracy.json").write_text(json.dumps(doc))
    (tmp_path / "accuracy-seed1.json").write_text(json.dumps(other))
    summ = bench.seed_summary([other, doc])
    diff0 = (doc["results"]["adaptive"]["test_acc"] - doc["results"]["horovod"]["test_acc"]) * 100
    assert summ["seeds"] == [0, 1]
    assert summ["variants"]["adaptive"]["diff"] == pytest.approx((diff0 - 2.0) / 2)
    goal = next(g for g in summ["goals"] if g["goal"].startswith("adaptive: mean over 2 seeds"))
    assert goal["met"] == ((diff0 - 2.0) / 2 >= -0.3)
    page = bench_report_page(tmp_path)
    assert "Across 2 seeds (0, 1" in page and "| adaptive | " in page
    with pytest.raises(ValueError, match="same seed"):
        bench.seed_summary([doc, doc])
    proc = _bench("accuracy", "--out", str(tmp_path), "--seed", "-1", timeout=60)
    assert proc.returncode == 2 and "--seed must be >= 0" in proc.stderr


def test_validate_tune_compares_every_part_and_refuses_unknown_cases():
    """The tune validator's verdict (``validate_tune``, root-only as a whole): samples/s, compute
    and every level's allreduce against the recommendation, each within 10% or not."""
    from adaptive_lsgd.tools.bench import validate_tune as vt

    rec = {"periods": [7], "mechanisms": {"time_budget": True}, "rank_steps": [7, 14],
           "predicted_samples_per_s": 1000.0, "compute_s": 0.05,
           "levels": [{"kind": "inter", "ranks": 2, "allreduce_s": 0.04}]}
    run = {"samples_per_s": 950.0, "model": {"compute_s": 0.052, "link_s": [0.043]},
           "rank_parts": [{"step_s": 0.06, "sync_step_s": 0.2}, {"step_s": 0.03, "sync_step_s": 0.3}]}
    ok = vt.compare("time-budget", rec, [run, {**run, "samples_per_s": 1040.0}, run])
    assert ok["measured_samples_per_s"] == 950.0 and ok["within"] is True
    # where the time went: the slowest rank's mean local step and syncing step
    assert ok["measured_mean_step_s"] == 0.06 and ok["measured_mean_sync_step_s"] == 0.3
    assert ok["measured_over_predicted"]["link_s_level0"] == pytest.approx(0.043 / 0.04)
    slow_link = {**run, "model": {"compute_s": 0.052, "link_s": [0.06]}}
    bad = vt.compare("time-budget", rec, [slow_link] * 3)
    assert bad["within"] is False and bad["measured_over_predicted"]["samples_per_s"] == 0.95
    with pytest.raises(SystemExit):
        vt.parse_args(["--cases", "plain,warp-drive"])
    assert vt.parse_args(["--cases", "overlap, chained"]).cases == ["overlap", "chained"]
