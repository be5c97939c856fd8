"""The TensorFlow integration under real ``horovodrun --gloo`` (2 and 4 local workers).

The cases live in tests/tf_workers/cases.py; several run in one launch (TensorFlow starts
slowly), and each test below asserts on the lines one launch printed. MNIST-1D is generated
once, offline (``mnist1d.data.make_dataset``), and cached in the temp directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest
from conftest import REPO, horovodrun, results

pytestmark = pytest.mark.tensorflow

TF_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
NP2_CASES = ["fit_accuracy", "custom_loop", "minibatch_equals_horovod", "keras_api", "adaptive_noise",
             "local_variables", "aggregation", "graph_then_eager", "start_from_one_model",
             "outer_tf", "late_variables", "overlap_tf"]
GEN = """
import sys
import numpy as np
from mnist1d.data import get_dataset_args, make_dataset
args = get_dataset_args()
args.num_samples = 20000
d = make_dataset(args)
np.savez(sys.argv[1], x=d["x"].astype("float32"), y=d["y"].astype("int64"),
         x_test=d["x_test"].astype("float32"), y_test=d["y_test"].astype("int64"))
"""


def _need(*modules):
    for name in modules:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (run `make test`, which sets up .venv)")


@pytest.fixture(scope="module")
def mnist1d_npz():
    """16,000 training and 4,000 test series, generated offline from mnist1d's templates
    (seed 42: deterministic, so a cached copy from an earlier session is reused)."""
    _need("tensorflow", "horovod.tensorflow", "mnist1d")
    path = os.path.join(tempfile.gettempdir(), "adaptive-lsgd-mnist1d-20000-seed42.npz")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.npz"
        subprocess.run([sys.executable, "-c", GEN, tmp], check=True, cwd=REPO, timeout=600)
        os.replace(tmp, path)
    return path


def _timings(proc) -> dict:
    out = {}
    for line in proc.stdout.splitlines():
        _, _, line = line.partition(">:") if line.startswith("[") else ("", "", line)
        if line.startswith("TIMING "):
            _, name, seconds = line.split()
            out[name] = float(seconds)
    return out


@pytest.fixture(scope="module")
def np2(mnist1d_npz, tmp_path_factory):
    case_dir = str(tmp_path_factory.mktemp("tf_np2"))
    proc = horovodrun(2, ["tests/tf_workers/cases.py", *NP2_CASES],
                      env={**TF_ENV, "MNIST1D_NPZ": mnist1d_npz, "CASE_DIR": case_dir})
    res = results(proc)
    print("TIMINGS (s, rank 0):", _timings(proc))
    return {name: sorted(res[name], key=lambda r: r["rank"]) for name in res}


@pytest.fixture(scope="module")
def np4(mnist1d_npz):
    proc = horovodrun(4, ["tests/tf_workers/cases.py", "hierarchical_2x2", "hierarchical_2x2_chained",
                          "process_sets"],
                      env={**TF_ENV, "MNIST1D_NPZ": mnist1d_npz})
    print("TIMINGS (s, rank 0):", _timings(proc))
    return {name: sorted(ranks, key=lambda r: r["rank"]) for name, ranks in results(proc).items()}


def decision_log(path: str) -> list:
    """A rank's decision log, less the clock (equal on every rank of a job)."""
    with open(path) as fh:
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in fh]


def _identical_pattern(r: dict) -> None:
    assert r["identical_after_sync"] and all(r["identical_after_sync"])
    assert r["final_identical"]


def test_fit_fixed_h4_matches_horovod_accuracy(np2):
    ranks = np2["fit_accuracy"]
    assert len(ranks) == 2
    r = ranks[0]
    print(f"fit: accuracy Horovod {r['acc_ref']:.4f} ({r['ref_s']:.1f}s), "
          f"ours H=4 {r['acc_ours']:.4f} ({r['ours_s']:.1f}s)")
    assert r["acc_ref"] > 0.9  # the recipe converges
    assert r["acc_ours"] >= r["acc_ref"] - 0.01
    assert ranks[1]["acc_ours"] == r["acc_ours"] and ranks[1]["acc_ref"] == r["acc_ref"]
    for r in ranks:
        _identical_pattern(r)
        # Every H-th step syncs (plus the final average); in between the ranks drift apart
        # (the first step is equal because BroadcastGlobalVariablesCallback ran after it).
        assert r["syncs"] == [r["steps"] // 4 + 1]
        assert len(r["identical_after_sync"]) == r["steps"] // 4
        assert r["identical_between"][0] is True and not any(r["identical_between"][1:])
    assert r["summary"]["syncs_per_level"] == r["syncs"] and r["summary"]["ranks"] == 2


def test_custom_loop_tape_fixed_h4(np2):
    ranks = np2["custom_loop"]
    ref = np2["fit_accuracy"][0]["acc_ref"]
    print(f"custom loop: accuracy ours H=4 {ranks[0]['acc_ours']:.4f} ({ranks[0]['ours_s']:.1f}s), "
          f"Horovod (fit) {ref:.4f}")
    assert ranks[0]["acc_ours"] >= ref - 0.01
    assert ranks[0]["final_digest"] != np2["fit_accuracy"][0]["final_digest"]  # its own run
    for r in ranks:
        _identical_pattern(r)
        assert r["syncs"] == [r["steps"] // 4 + 1]
        assert not any(r["identical_between"])  # the weights were broadcast before step 1
        # The summary counts the whole sync (packing and unpacking too) as communication: at
        # least 90% of the syncing calls' time less what a call without a sync costs each.
        assert r["sync_calls"] == r["syncs"][0]
        outside = r["sync_calls_s"] - r["sync_calls"] * r["other_call_median_s"]
        print(f"custom loop rank {r['rank']}: summary comm_s {r['comm_s']:.3f} s, "
              f"{r['sync_calls']} syncing calls {r['sync_calls_s']:.3f} s ({outside:.3f} s "
              f"less the median non-syncing call)")
        assert 0.9 * outside <= r["comm_s"] <= r["sync_calls_s"]


def test_minibatch_phase_equals_horovod(np2):
    for r in np2["minibatch_equals_horovod"]:
        assert r["moved"] > 1e-2  # training happened
        assert r["graph_diff"] <= 1e-6 and r["eager_diff"] <= 1e-5
        assert r["slots_diff"] <= 1e-6 and r["tape_diff"] <= 1e-6
        assert r["ranks_identical"]
        assert r["phases"] == ["mini-batch"] * 3 and r["flags"] == [True, True]
        assert r["steps"] == [40, 40, 40]


def test_keras_api_beside_horovod_callbacks(np2):
    for r in np2["keras_api"]:
        spe = r["steps_per_epoch"]
        # The LR drops when epoch 2 begins; the first step at the lower rate reports it (still a
        # mini-batch step), the next one is local.
        assert r["lr_history"][:3] == pytest.approx([0.1, 0.1, 0.01])
        assert r["switch_step"] == 2 * spe + 1 and r["phase"] == "local"
        assert r["mini_batch_identical"]
        # Local steps 22..40 with H=3 sync at 24, ..., 39, then the final average.
        assert r["syncs"] == [(4 * spe - r["switch_step"]) // 3 + 1]
        assert r["n_buffers"] == 2 and r["n_slots"] == 6  # BatchNorm mean/var; momentum slots
        assert r["identical_after_sync"] and all(r["identical_after_sync"])  # with buffers, slots
        assert r["restored"] == [4 * spe, "local", r["syncs"], False]
        assert r["eager_after_sync"] == [True, True] and not any(r["eager_between"])
        assert 0 < r["warmup_lr"] <= 0.05 + 1e-6
        assert r["mismatch"] and "periods" in r["mismatch"] and "rank 1=[3]" in r["mismatch"]
        assert r["overlap_error"] is None  # overlap: true is accepted (see overlap_tf)
        assert "TensorFlow integration does not support elastic" in (r["elastic_error"] or "")
        assert r["summary"]["switch_step"] == r["switch_step"]


def test_adaptive_policy_with_timing_noise_agrees(np2):
    ranks = np2["adaptive_noise"]
    for r in ranks:
        assert r["steps"] == 300 and r["final_identical"]
    logs = [decision_log(r["log"]) for r in ranks]
    assert logs[0] == logs[1] and len(logs[0]) >= 3
    assert logs[0][0]["event"] == "switch" and logs[0][0]["step"] == 30
    assert ranks[0]["periods"] == ranks[1]["periods"]


@pytest.mark.parametrize("case", ["hierarchical_2x2", "hierarchical_2x2_chained"])
def test_hierarchical_2x2_blocks_and_global(np4, case):
    ranks = np4[case]
    assert len(ranks) == 4
    r = ranks[0]
    assert r["levels"] == [[[0, 1], [2, 3]], [[0, 1, 2, 3]]]
    assert [0, 1] in r["process_sets"] and [2, 3] in r["process_sets"]
    chained = case.endswith("chained")
    # chained (sliced): the ranks holding the same slice, one per host, are the cross link
    assert ([0, 2] in r["process_sets"] and [1, 3] in r["process_sets"]) == chained
    assert r["sliced"] == chained
    assert r["syncs"] == [6, 6]  # 24 steps: a block sync every 2, a global one every 4
    for row in r["rows"]:
        step = row["step"]
        if step % 4 == 0:
            assert row["all_same"], row
        elif step % 2 == 0:
            assert row["block0_same"] and row["block1_same"] and not row["all_same"], row
        elif step > 1:  # step 1: BroadcastGlobalVariablesCallback made everyone equal
            assert not row["block0_same"] and not row["block1_same"], row
    assert all(other["rows"] == r["rows"] for other in ranks[1:])


def test_chained_sync_averages_like_one_allreduce(np4):
    """Same data and start: the sliced chained sync gives the models one allreduce per level
    gives, up to the order of the float sums."""
    for a, b in zip(np4["hierarchical_2x2"], np4["hierarchical_2x2_chained"]):
        assert len(a["model"]) == len(b["model"]) > 100
        assert max(abs(x - y) for x, y in zip(a["model"], b["model"])) <= 1e-4


def test_hierarchy_after_late_init_says_what_to_do():
    """hvd.init() before the import (so without dynamic process sets) and a topology that
    needs a set of ranks 0 and 1: every rank stops with an error saying what to do."""
    _need("tensorflow", "horovod.tensorflow")
    proc = horovodrun(3, ["tests/tf_workers/no_dynamic.py"], env=TF_ENV)
    ranks = results(proc)["no_dynamic"]
    assert len(ranks) == 3
    for r in ranks:
        assert "HOROVOD_DYNAMIC_PROCESS_SETS=1" in r["error"]
        assert "import adaptive_lsgd.integrations.tensorflow before hvd.init()" in r["error"]
        assert "hvd.init() ran before" in r["error"]


def test_first_sync_never_mixes_unrelated_starts(np2):
    """2 ranks adding rank + 1 per step, period 2: begun apart (0 and 10), the first sync is
    rank 0's model (0 + 2 steps of 1 = 2), the second averages (2 + (2 + 4) / 2 = 5); begun
    equal (0), the first sync already averages ((2 + 4) / 2 = 3)."""
    for r in np2["start_from_one_model"]:
        assert r["apart"]["after_first"] == 2.0 and r["apart"]["after_second"] == 5.0, r
        assert r["equal"]["after_first"] == 3.0 and r["equal"]["after_second"] == 6.0, r
        assert not r["apart"]["pending"] and not r["equal"]["pending"]


def test_rank_local_variables_are_never_averaged(np2):
    """Variables registered as rank-local (tape.register_local_source, a Keras optimizer's
    register_local_var) keep each rank's own value; the others are averaged."""
    for r in np2["local_variables"]:
        for form in ("tape", "keras"):
            assert r[form]["shared"] == pytest.approx(0.5), (form, r)
            assert r[form]["local"] == pytest.approx(float(r["rank"])), (form, r)


def test_late_variables_averaged_after_refresh_and_nonfinite_detected(np2):
    """A weight created after the first sync is rank-local (the lists are kept) until
    refresh_variables(), then averaged; the packed buffers' finiteness check (the non-finite
    guard) catches NaN and +-Inf in float32 and float16, and not the largest finite values."""
    for r in np2["late_variables"]:
        assert r["w"] == [1.5, 3.0, 4.5], r  # averaged at every step: +1 and +2 per step
        assert r["extra_before"] == 10.0 * r["rank"] and r["extra_after"] == 5.0, r
        assert r["finite"] == {f"{d}.{v}": v == "big" for d in ("float32", "float16")
                               for v in ("nan", "inf", "-inf", "big")}, r


def test_backward_passes_per_step_minibatch_equals_horovod(np2):
    """backward_passes_per_step=2 in the mini-batch phase is Horovod's aggregation: the same
    weights, slots, iterations (every pass) and counter as hvd.DistributedOptimizer, in fit
    traced and eager (the latter with average_aggregated_gradients); the scheduler counts
    the 6 applied updates of 12 passes."""
    for r in np2["aggregation"]:
        for mode in ("graph", "eager"):
            d = r["diffs"][mode]
            assert d["weights"] == 0.0 and d["slots"] == 0.0, (mode, d)
            assert d["iterations"] == [12, 12] and d["counter"] == [0, 0], (mode, d)
            assert d["steps"] == 6 and d["phase"] == "mini-batch", (mode, d)


def test_backward_passes_per_step_local_phase_applies_every_second_pass(np2):
    """Warm-up of 2 applied updates, then fixed H=2: an update every 2nd pass in both phases
    (the first local one is the mean of the rank's own two gradients, no allreduce); the
    scheduler counts applied updates, iterations count passes; syncs only after applied
    updates 4 and 6 (passes 8 and 12)."""
    ranks = np2["aggregation"]
    for r in ranks:
        rows = r["rows"]
        assert [row["iterations"] for row in rows] == list(range(1, 13))
        assert [row["counter"] for row in rows] == [1, 0] * 6
        assert [row["step"] for row in rows] == [p // 2 for p in range(1, 13)]
        assert r["switch_step"] == 2
        assert [row["phase"] for row in rows] == ["mini-batch"] * 3 + ["local"] * 9
        assert [row["syncs"] for row in rows] == [0] * 7 + [1] * 4 + [2]
        assert rows[0]["digest"] == r["initial"]  # pass 1 applied nothing
        changed = [a["digest"] != b["digest"] for a, b in zip(rows, rows[1:])]
        assert changed == [p % 2 == 1 for p in range(1, 12)]  # only passes 2, 4, ... update
        assert r["local_update_diff"] <= 1e-6
        # Identical across ranks: the mini-batch passes, after the syncs; apart in between.
        assert r["identical"] == [True] * 5 + [False, False, True, True, False, False, True]
    assert ranks[0]["rows"][5]["digest"] != ranks[1]["rows"][5]["digest"]
    assert "tf.compat.v1.train.Optimizer" in (ranks[0]["legacy_error"] or "")


def test_graph_mode_then_eager_in_one_process(np2):
    """DistributedGradientTape(tape, cfg) in a tf.function called while a TF1 graph is built
    (and run in its session), then eagerly with the same config: the eager use gets a
    LocalSGD of its own (the old code failed: the graph's phase variable is out of scope)."""
    for r in np2["graph_then_eager"]:
        assert r["graph_loss"] > 0 and r["separate"]
        assert r["steps"] == 4 and r["syncs"] == [2]
        assert r["identical_after_sync"] == [True, True] and r["identical_between"] == [False, False]


def test_process_sets_like_horovod(np4):
    """Sets [0, 2] and [1, 3], each rank in its own: the mini-batch phase equals Horovod's
    optimizer and tape with the same process_set (reduced inside the set only); the local
    phase averages inside the set only (fit and tape); a rank outside an optimizer's set
    trains as with a plain Keras optimizer; elastic with a set is refused."""
    ranks = np4["process_sets"]
    assert len(ranks) == 4
    for r in ranks:
        assert r["minibatch_diff"] == 0.0 and r["tape_diff"] == 0.0, r
        assert r["minibatch_in_set"] and not r["minibatch_across"]
        assert r["phase"] == "mini-batch" and r["steps"] == 8
        assert r["set_rank"] == r["rank"] // 2 and r["set_size"] == 2
        assert r["syncs"] == [4] and r["summary_ranks"] == 2
        for form, n in (("fit", 8), ("tape", 4)):
            assert [x["synced"] for x in r[form]] == [False, True] * (n // 2), form
            assert [x["in_set"] for x in r[form]] == [False, True] * (n // 2), form
            assert not any(x["across"] for x in r[form]), form
        assert "process_set in an elastic job is not supported" in r["elastic_error"]
        if r["rank"] % 2:  # outside [0, 2]
            assert r["member"] is False and r["partial_vs_plain"] == 0.0
            assert "is not in this optimizer's process set [0, 2]" in r["outside_error"]
        else:
            assert r["member"] is True and r["outside_error"] is None


def test_alsgd_run_tape_in_tf1_graph_then_eager(tmp_path):
    """alsgd-run, default config, on a script that runs its tf.function step (with
    hvd.DistributedGradientTape) in a TF1 graph first, as Horovod's graph-mode tests do: the
    graph-mode call is left to Horovod and reports no step (the old hook ran the sync on
    symbolic tensors: OperatorNotAllowedInGraphError); the eager steps are ours."""
    _need("tensorflow", "horovod.tensorflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALSGD_", "_ALSGD_"))}
    env.update(TF_ENV, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "adaptive_lsgd.tools.cli.run", "-np", "2", "-H",
                           "localhost:2", "--gloo", sys.executable,
                           "tests/user_scripts/tf2_graph_and_eager.py"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "OperatorNotAllowedInGraphError" not in out
    ranks = results(proc)["graph_and_eager"]
    assert len(ranks) == 2 and all(r["graph_loss"] > 0 for r in ranks)
    assert "wrapped: horovod.tensorflow.DistributedGradientTape" in proc.stdout
    assert "16 over all ranks (8 per rank" in proc.stdout  # the eager steps only
    assert "called while a TF1 graph is built: left to Horovod" in proc.stdout


def test_outer_nesterov_bf16_in_tape_and_fit(np2):
    """The outer step over bf16 syncs in the tape loop equals the sync written out in the case
    (every rank, every step); state_dict carries the outer state exactly; Keras fit with the
    same keys keeps the ranks identical and takes one outer step per global sync after the
    first."""
    for r in np2["outer_tf"]:
        assert r["max_diff"] == 0.0
        assert r["syncs"] == 10 and r["outer_steps"] == 9
        assert r["same_state"] and r["restored_steps"] == 9 and r["digest_unchanged"]
        assert r["fit_identical"] and r["fit_outer_steps"] == sum(r["fit_syncs"]) - 1 >= 9


def test_overlap_applies_each_average_a_round_late(np2):
    """overlap: true in the tape loop equals local SGD written out in the case (each round's
    average applied at the next round's end, half of it: overlap_pull 0.5); the default config
    overlaps by itself where averages cost far more than the steps; Keras fit ends with the
    average in flight applied."""
    H = 4  # the cases' period
    for r in np2["overlap_tf"]:
        assert r["max_diff"] <= 1e-5 and r["pull"] == 0.5
        # the average of step 4k completes at step 4(k+1): 4 of 5 done after 20 steps
        seen = r["syncs_seen"]
        assert seen[H - 1] == 0 and seen[2 * H - 1] == 1 and seen[-1] == len(seen) // H - 1
        assert r["inflight_seen"] == len(seen) - (H - 1)  # in flight from the first round's end
        assert r["warned"] and r["final_identical"]  # state_dict warned; average_now agrees
        assert r["auto_mechanisms"]["overlap"] is True, r["auto_why"]
        assert r["auto_inflight"] > 10 and r["auto_identical"]
        assert not r["fit_inflight_after"] and r["fit_syncs"][0] >= 4
    logs = [decision_log(r["auto_log"]) for r in np2["overlap_tf"]]
    assert logs[0] == logs[1], "decision logs differ between ranks (rank 1 sleeps at random)"
    switches = [rec for rec in logs[0] if "mechanism_reason" in rec]
    assert switches and switches[0]["mechanism"]["overlap"] is True
    assert "overlapped" in switches[0]["mechanism_reason"]["overlap"]
