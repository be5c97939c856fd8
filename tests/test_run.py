"""``alsgd-run`` on unmodified Horovod scripts (tests/user_scripts/), under real
``horovodrun --gloo`` with 2 processes.

Each training script is written the way Horovod's own examples are (PyTorch with
DistributedSampler and an LR scheduler; a TF2 custom loop with DistributedGradientTape in a
tf.function; Keras fit with Horovod's optimizer and callbacks). Each runs once under plain
``horovodrun`` and once under ``alsgd-run`` with ``ALSGD_WARMUP=0``: the accuracy must stay
within 2 points and the decision log must show periods above 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, horovodrun, results

from adaptive_lsgd.decision_log import read_log

SCRIPTS = "tests/user_scripts"
BASE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def alsgd_run(args: list, env: dict | None = None, timeout: int = 600, cwd: str = REPO):
    """``python -m adaptive_lsgd.tools.cli.run ARGS`` (what the ``alsgd-run`` console script runs)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ALSGD_", "_ALSGD_"))}
    full_env.update(BASE_ENV, **(env or {}))
    return subprocess.run([sys.executable, "-m", "adaptive_lsgd.tools.cli.run", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def _need(*modules):
    for name in modules:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (run `make test`, which sets up .venv)")


def _summary(stdout: str) -> dict:
    """The ``[alsgd-run]   name   value`` lines alsgd-run printed after the job."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("[alsgd-run]   "):
            name, _, value = line[len("[alsgd-run]   "):].partition("  ")
            out[name.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def mnist1d():
    _need("mnist1d")
    from adaptive_lsgd.tools.demo.datasets import load_mnist1d

    load_mnist1d()  # generate the cached arrays once, before the workers read them


# -- the three Horovod-style scripts ---------------------------------------------------------------
CASES = {
    "torch_mnist1d.py": (["torch", "horovod.torch"], ["horovod.torch.DistributedOptimizer"]),
    "tf2_mnist1d.py": (["tensorflow", "horovod.tensorflow"],
                       ["horovod.tensorflow.DistributedGradientTape"]),
    "keras_mnist1d.py": (["tensorflow", "horovod.tensorflow.keras"],
                         ["horovod.tensorflow.keras.DistributedOptimizer",
                          "tf.keras.Model.fit (LocalSGDCallback added)"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", [
    pytest.param("torch_mnist1d.py", marks=pytest.mark.torch),
    pytest.param("tf2_mnist1d.py", marks=pytest.mark.tensorflow),
    pytest.param("keras_mnist1d.py", marks=pytest.mark.tensorflow),
])
def test_unmodified_script_trains_as_well_with_periods_above_one(script, mnist1d, tmp_path):
    modules, wrapped = CASES[script]
    _need(*modules)
    path = os.path.join(SCRIPTS, script)
    plain = results(horovodrun(2, [path], env=BASE_ENV, timeout=600))["accuracy"][0]["test_acc"]

    log = str(tmp_path / "decisions.jsonl")
    # max_period: a convergence cap for these small models (as in the demo); the periods
    # below it are the adaptive policy's, chosen from the measured times.
    proc = alsgd_run(["-np", "2", "-H", "localhost:2", "--gloo", sys.executable, path],
                     env={"ALSGD_WARMUP": "0", "ALSGD_LOG": log, "ALSGD_MAX_PERIOD": "16"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ours = results(proc)["accuracy"][0]["test_acc"]
    print(f"{script}: accuracy plain horovodrun {plain:.4f}, alsgd-run {ours:.4f}")
    assert abs(ours - plain) <= 0.02, f"plain horovodrun {plain:.4f} vs alsgd-run {ours:.4f}"

    records = read_log(log)
    periods = [max(r["periods"]) for r in records if "periods" in r]
    assert records and max(periods) > 1, f"the decision log shows no period above 1: {periods}"
    assert all(r["phase"] == "local" for r in records if "phase" in r)  # ALSGD_WARMUP=0

    summary = _summary(proc.stdout)
    assert "[alsgd-run] summary (2 ranks; wrapped: " + ", ".join(sorted(wrapped)) + ")" in proc.stdout
    steps = int(summary["steps"].split()[0])
    syncs = json.loads(summary["syncs per level"])
    assert steps > 0 and syncs[0] == sum(1 for r in records if r.get("level") == 0)
    assert syncs[0] < steps // 2  # fewer syncs than steps per rank: periods above 1 were used
    assert "step 1: [1]" in summary["periods over time"]
    assert summary["final periods"] == str(records[-1]["periods"])
    assert summary["communication share"].endswith("of compute + collective time (local phase)")
    assert "samples/s" in summary["throughput"] and "as mini-batch SGD" in summary["estimated"]
    assert "nothing was injected" not in proc.stderr


# -- launcher behaviour --------------------------------------------------------------------------
MARKER_SCRIPT = """
import horovod.torch as hvd
open({marker!r}, "w").write("ran")
optimizer = hvd.DistributedOptimizer  # noqa
"""


def test_dry_run_runs_nothing_and_names_what_it_wraps(tmp_path):
    _need("horovod")
    marker = tmp_path / "ran"
    script = tmp_path / "train.py"
    script.write_text(MARKER_SCRIPT.format(marker=str(marker)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("max_period: 8\ntarget_comm_fraction: 0.2\n")
    proc = alsgd_run(["-np", "2", "-H", "localhost:2", "--gloo", "--alsgd-dry-run",
                      "--alsgd-config", str(cfg), sys.executable, str(script)],
                     env={"ALSGD_WARMUP": "5"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    out = proc.stdout
    assert "[alsgd-run] dry run: nothing is started" in out
    assert f"horovodrun -np 2 -H localhost:2 --gloo {sys.executable} {script}" in out
    assert "--alsgd" not in out.split("command: ")[1].splitlines()[0]
    assert "ALSGD_MAX_PERIOD=8" in out and "ALSGD_WARMUP=5" in out
    assert '"target_comm_fraction": 0.2' in out and '"warmup": 5' in out
    assert ("horovod.torch.DistributedOptimizer -> adaptive_lsgd.integrations.torch."
            "DistributedOptimizer   [the script appears to use it]") in out
    assert "DistributedGradientTape (in a tf.function) -> adaptive_lsgd.integrations.tensorflow." \
           "DistributedGradientTape   [not seen in the script]" in out


@pytest.mark.parametrize("args, env, expected", [
    # the file is named as the user gave it, not as the ALSGD_CONFIG it travels in (issue 18)
    (["--alsgd-config", "{cfg_bad}"], {}, "config key 'max_period' (from config file {cfg_bad} "
                                          "given with --alsgd-config)"),
    (["--alsgd-config", "{cfg_unknown}"], {}, "unknown config key 'perods' (from config file "
                                              "{cfg_unknown} given with --alsgd-config)"),
    (["--alsgd-config", "{missing}"], {}, "no such file"),
    ([], {"ALSGD_TARGET_COMM_FRACTION": "2"}, "ALSGD_TARGET_COMM_FRACTION"),
    (["--alsgd-bogus"], {}, "unknown option '--alsgd-bogus'"),
    (["--no-such-flag"], {}, "unknown horovodrun option '--no-such-flag'"),
])
def test_bad_usage_is_one_line_and_launches_nothing(args, env, expected, tmp_path):
    _need("horovod")
    marker = tmp_path / "ran"
    script = tmp_path / "train.py"
    script.write_text(MARKER_SCRIPT.format(marker=str(marker)))
    (tmp_path / "bad.yaml").write_text("max_period: 0\n")
    (tmp_path / "unknown.yaml").write_text("perods: [4]\n")
    names = {"cfg_bad": tmp_path / "bad.yaml", "cfg_unknown": tmp_path / "unknown.yaml",
             "missing": tmp_path / "nope.yaml"}
    args = [a.format(**names) for a in args]
    expected = expected.format(**names)
    proc = alsgd_run(["-np", "2", "-H", "localhost:2", "--gloo", *args, sys.executable, str(script)],
                     env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alsgd-run: error: "), proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not marker.exists()


def test_missing_np_is_horovodruns_complaint_in_one_line():
    _need("horovod")
    proc = alsgd_run(["-H", "localhost:2", sys.executable, "x.py"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("alsgd-run: error: horovodrun options: the following arguments "
                                   "are required: -np/--num-proc")


@pytest.mark.torch
def test_script_with_nothing_to_wrap_runs_unchanged_with_one_warning(tmp_path):
    """Same stdout as under plain horovodrun, one warning naming what was looked for, and the
    user's own sitecustomize still runs in the workers (ours chains to it)."""
    _need("torch", "horovod.torch")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = 'yes'\n")
    env = {"PYTHONPATH": str(site)}
    path = os.path.join(SCRIPTS, "torch_no_optimizer.py")
    plain = horovodrun(2, [path], env={**BASE_ENV, **env}, timeout=300)
    proc = alsgd_run(["-np", "2", "-H", "localhost:2", "--gloo", sys.executable, path], env=env,
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(proc.stdout.splitlines()) == sorted(plain.stdout.splitlines())
    assert "rank 0 of 2: average 1.50" in proc.stdout
    assert proc.stdout.count("user sitecustomize yes") == 2
    warnings = [ln for ln in proc.stderr.splitlines() if "alsgd-run" in ln]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("alsgd-run: warning: nothing was injected: the script used none of "
                                  "horovod.torch.DistributedOptimizer")
    assert "DistributedGradientTape" in warnings[0] and "ran as plain Horovod" in warnings[0]


@pytest.mark.torch
def test_each_optimizer_averages_its_own_model_only():
    """Two models, two optimizers, both state dicts broadcast: b's optimizer averages b's
    weights and BatchNorm buffers, and leaves a's (rank-specific, one NaN) alone."""
    _need("torch", "horovod.torch")
    proc = alsgd_run(["-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
                      os.path.join(SCRIPTS, "torch_two_models.py")],
                     env={"ALSGD_POLICY": "fixed", "ALSGD_PERIODS": "1"}, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = sorted(results(proc)["two_models"], key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["b_weight"] == pytest.approx(0.5) and r["b_running_mean"] == pytest.approx(0.5)
        assert r["a_weight"] == r["rank"] and r["a_running_mean"] == r["rank"]
        assert r["b_syncs"] == [3]
