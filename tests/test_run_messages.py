"""``alsgd-run``'s messages, help and summary (issue 18, the smaller fixes).

Most checks run in this process (the config check, the script check, ``--help``, the summary
built from worker reports); two small jobs under real ``horovodrun --gloo`` cover the worker
side (tools/inject/_alsgd_inject.py): every optimizer a worker created, the mini-batch steps
of a warm-up that never ends, and the batch size of a ``tf.data.Dataset`` given to ``fit``
and of a training step called with keyword arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import sys
import textwrap

import pytest
from conftest import REPO
from test_run import _need, _summary, alsgd_run

from adaptive_lsgd.config import KEYS, Config, ConfigError
from adaptive_lsgd.tools.cli import run as run_mod


def _main(argv: list) -> tuple:
    """``alsgd-run ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = run_mod.main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def _inject_module():
    """A fresh copy of tools/inject/_alsgd_inject.py (its module state is the worker's)."""
    path = os.path.join(REPO, "tools", "inject", "_alsgd_inject.py")
    spec = importlib.util.spec_from_file_location("_alsgd_inject_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- item 2: a bad key in the --alsgd-config file names that file ---------------------------------
@pytest.mark.parametrize("text, key", [("max_period: 0\n", "config key 'max_period'"),
                                       ("window: 4\nperods: [4]\n", "unknown config key 'perods'")])
def test_bad_key_in_the_alsgd_config_file_names_that_file(tmp_path, monkeypatch, text, key):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALSGD_", "_ALSGD_"))}
    with pytest.raises(ConfigError) as err:
        run_mod.worker_env("cfg.yaml", str(tmp_path / "run"), env)
    msg = str(err.value)
    assert f"{key} (from config file cfg.yaml given with --alsgd-config)" in msg
    assert "ALSGD_CONFIG" not in msg


def test_alsgd_config_not_yaml_names_the_file_as_given_with_the_line(tmp_path, monkeypatch):
    _need("horovod")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text("window: 4\nmax_period: 8\n  warmup: 5\n")
    (tmp_path / "train.py").write_text("")
    rc, out, err = _main(["-np", "2", "--alsgd-dry-run", "--alsgd-config", "cfg.yaml",
                          "python", "train.py"])
    assert rc == 2 and out == ""
    assert err.strip() == ("alsgd-run: error: config file 'cfg.yaml' is not valid YAML/JSON: "
                           "line 3, column 9: mapping values are not allowed here")


# -- item 4: a python script that does not exist --------------------------------------------------
@pytest.mark.parametrize("command, script", [
    (["python", "train.py", "--epochs", "3"], "train.py"),
    (["python3", "-u", "train.py"], "train.py"),
    (["/usr/bin/python3.11", "-u", "-W", "ignore", "-X", "dev", "sub/train.py", "-m", "x"],
     "sub/train.py"),
    (["python", "-uB", "-Wignore", "-Xdev", "train.py"], "train.py"),
    (["python", "-OO", "--check-hash-based-pycs", "never", "t.py"], "t.py"),
    (["python", "--", "t.py"], "t.py"),
    (["python", "-m", "pkg.train"], None),
    (["python", "-u", "-m", "pkg.train"], None),
    (["python", "-um", "pkg.train"], None),
    (["python", "-c", "print(1)"], None),
    (["python", "-"], None),
    (["python", "--version"], None),
    (["./train.sh", "train.py"], None),
    (["bash", "-c", "python x.py"], None),
    (["pythonic.py"], None),
])
def test_python_script_of_a_command(command, script):
    assert run_mod.python_script(command) == script


@pytest.mark.parametrize("python", ["python", "python3", sys.executable])
@pytest.mark.parametrize("opts", [[], ["-u"], ["-W", "ignore"]])
def test_missing_script_is_one_line_before_anything_starts(tmp_path, monkeypatch, python, opts):
    _need("horovod")
    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(["-np", "2", "-H", "localhost:2", "--gloo", "--alsgd-dry-run", python,
                          *opts, "nope/train.py", "--epochs", "2"])
    assert rc == 2 and out == ""
    assert err.strip() == (f"alsgd-run: error: script 'nope/train.py' does not exist "
                           f"(relative to {tmp_path}): nothing was launched")


def test_missing_script_launches_nothing(tmp_path):
    """Without --alsgd-dry-run too: exit 2 and one line, no horovodrun traceback per worker."""
    _need("horovod")
    missing = str(tmp_path / "missing.py")
    proc = alsgd_run(["-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-u", missing],
                     timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"alsgd-run: error: script {missing!r} does not exist: "
                                   f"nothing was launched")
    assert proc.stdout == ""


def test_existing_script_and_modules_are_not_refused(tmp_path, monkeypatch):
    _need("horovod")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("import horovod.torch as hvd\n")
    for command in (["python", "-u", "train.py"], ["python", "-m", "no_such_module"],
                    ["python", "-c", "pass"]):
        rc, out, err = _main(["-np", "2", "--alsgd-dry-run", *command])
        assert rc == 0, err
        assert "[alsgd-run] dry run: nothing is started" in out


# -- item 5: --help is plain text and lists the config keys ---------------------------------------
def test_help_is_plain_text_with_the_config_keys():
    _need("horovod")
    rc, out, err = _main(["--help"])
    assert rc == 0 and err == ""
    assert out.startswith("usage: alsgd-run [horovodrun options] [--alsgd-config FILE] "
                          "[--alsgd-dry-run] [--alsgd-run-dir DIR] COMMAND ...")
    for markup in ("``", ":mod:", ":class:", ":func:", "::", "*is*"):
        assert markup not in out, markup
    for option in ("--alsgd-config FILE", "--alsgd-dry-run", "--alsgd-run-dir DIR"):
        assert option in out
    # the description keeps its own lines (RawDescriptionHelpFormatter): the examples
    assert "\n  alsgd-run -np 2 --alsgd-dry-run python train.py\n" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.startswith("  ") and line.split() and line.split()[0] in KEYS}
    assert set(rows) == set(KEYS)
    text = {None: "none", True: "true", False: "false"}
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for key in KEYS:
        default = defaults[key]
        shown = text[default] if default is None or isinstance(default, bool) else str(default)
        assert rows[key][0] == shown, (key, rows[key])
        assert len(rows[key]) > 1, f"{key} has no meaning"
    assert "policy                adaptive  adaptive (periods chosen online) or fixed" in out
    assert "horovodrun --help" in out
    assert max(len(line) for line in out.splitlines()[1:]) <= 100


def test_no_arguments_prints_the_help_and_exits_2():
    _need("horovod")
    rc, out, _ = _main([])
    assert rc == 2 and "configuration keys" in out and "max_period" in out


# -- items 6-8: the summary built from the workers' reports ---------------------------------------
def _sched(steps, mini_batch_steps=0, syncs=(0,), periods=(1,), compute_s=1.0, comm_s=0.25,
           mini_batch_s=0.5, name="horovod.torch.DistributedOptimizer"):
    return {"steps": steps, "switch_step": None if steps == mini_batch_steps else mini_batch_steps,
            "syncs_per_level": list(syncs), "periods": list(periods),
            "compute_s": compute_s if steps > mini_batch_steps else 0.0,
            "comm_s": comm_s if steps > mini_batch_steps else 0.0,
            "comm_fraction": 0.2, "mini_batch_s": mini_batch_s if mini_batch_steps else 0.0,
            "mini_batch_steps": mini_batch_steps, "model": None, "wrapped": name}


def _report(rank, summaries, batch_size=32, used=("horovod.torch.DistributedOptimizer",)):
    return {"rank": rank, "pid": 100 + rank, "used": list(used), "notes": [], "direct": [],
            "summaries": summaries, "batch_size": batch_size, "log": None}


def _lines(reports) -> dict:
    return _summary("\n".join(f"[alsgd-run] {ln}" for ln in run_mod.summarise(reports, None)))


def test_summary_covers_the_optimizer_that_trained_not_the_first_created():
    name = "horovod.tensorflow.keras.DistributedOptimizer"
    reports = [_report(r, [_sched(0, name=name), _sched(100, syncs=(10,), periods=(8,), name=name)],
                       used=(name,)) for r in (0, 1)]
    lines = _lines(reports)
    assert lines["steps"].startswith("200 over all ranks (100 per rank;")
    assert lines["syncs per level"] == "[10]" and lines["final periods"] == "[8]"
    assert lines["optimizers"] == (f"2 per rank: #1 {name} (0 steps per rank), #2 {name} "
                                   f"(100 steps per rank); figures of #2")


def test_summary_shows_each_optimizer_that_trained():
    reports = [_report(r, [_sched(40, syncs=(4,), periods=(4,)),
                           _sched(60, syncs=(3,), periods=(16,))]) for r in (0, 1)]
    out = run_mod.summarise(reports, None)
    assert "  optimizer #1 (horovod.torch.DistributedOptimizer):" in out
    assert "  optimizer #2 (horovod.torch.DistributedOptimizer):" in out
    steps = [ln for ln in out if ln.startswith("  steps ")]
    assert [s.split()[1] for s in steps] == ["80", "120"]
    assert out.index("  optimizer #1 (horovod.torch.DistributedOptimizer):") < out.index(steps[0])
    assert out.index(steps[0]) < out.index("  optimizer #2 (horovod.torch.DistributedOptimizer):")


def test_one_optimizer_summary_with_both_phases():
    lines = _lines([_report(r, [_sched(100, mini_batch_steps=10, syncs=(9,), periods=(8,))])
                    for r in (0, 1)])
    assert "optimizers" not in lines
    assert lines["steps"] == "200 over all ranks (100 per rank; mini-batch phase 10 steps)"
    assert lines["communication share"] == "20.0% of compute + collective time (local phase)"
    assert lines["throughput"].startswith("4,608 samples/s in the local phase, 1,280 samples/s "
                                          "in the mini-batch phase (measured, all ranks)")


def test_warmup_that_never_ends_reports_the_mini_batch_steps_taken():
    lines = _lines([_report(r, [_sched(100, mini_batch_steps=100)]) for r in (0, 1)])
    assert lines["steps"] == ("200 over all ranks (100 per rank; mini-batch phase 100 steps; "
                              "the local phase was not reached)")
    assert lines["communication share"] == "n/a (no step in the local phase)"
    assert lines["throughput"] == "12,800 samples/s in the mini-batch phase (measured, all ranks)"


@pytest.mark.parametrize("batch", [None, 0])
def test_unknown_batch_size_says_steps_per_second(batch):
    lines = _lines([_report(r, [_sched(100, mini_batch_steps=10)], batch_size=batch)
                    for r in (0, 1)])
    assert "samples/s" not in lines["throughput"]
    assert lines["throughput"] == ("144.0 steps/s (batch size unknown) in the local phase, "
                                   "40.0 steps/s (batch size unknown) in the mini-batch phase "
                                   "(measured, all ranks)")


def test_worker_report_has_every_runtime_with_its_name():
    inject = _inject_module()

    class Runtime:
        def __init__(self, steps):
            self.scheduler = type("S", (), {"summary": lambda _self: {"steps": steps}})()
            self.config = type("C", (), {"log": None})()

    first, second = Runtime(0), Runtime(12)
    inject._note_use("horovod.tensorflow.keras.DistributedOptimizer", first)
    inject._note_use("tf.keras.Model.fit (LocalSGDCallback added)", None)
    inject._note_use("horovod.tensorflow.keras.DistributedOptimizer", second)
    inject._note_use("horovod.tensorflow.keras.DistributedOptimizer", second)  # once each
    report = inject.report()
    assert report["summaries"] == [
        {"steps": 0, "wrapped": "horovod.tensorflow.keras.DistributedOptimizer"},
        {"steps": 12, "wrapped": "horovod.tensorflow.keras.DistributedOptimizer"}]


# -- item 8: how the worker finds the batch size (TensorFlow) -------------------------------------
@pytest.mark.tensorflow
def test_batch_size_of_tf_arguments_and_datasets():
    _need("tensorflow")
    import numpy as np
    import tensorflow as tf

    inject = _inject_module()
    x = tf.zeros([16, 8])
    y = tf.zeros([16], tf.int64)
    assert inject._leading_dim([x, y]) == 16
    assert inject._leading_dim([tf.constant(True), {"images": x}]) == 16  # scalars are skipped
    assert inject._leading_dim([tf.constant(3)]) is None
    assert inject._leading_dim([tf.TensorSpec([None, 8])]) is None

    @tf.function
    def step(images, labels, first_batch=False):
        return images

    assert inject._leading_dim(inject._call_arguments(step, (), {"images": x, "labels": y})) == 16
    assert inject._leading_dim(inject._call_arguments(step, (), {"first_batch": True, "labels": y,
                                                                 "images": tf.zeros([4, 2])})) == 4

    data = tf.data.Dataset.from_tensor_slices((np.zeros((40, 8), "float32"), np.zeros(40)))
    assert inject._fit_batch_size(data.batch(16, drop_remainder=True), None) == 16
    assert inject._fit_batch_size(data.batch(16).prefetch(2), None) is None  # spec: [None, 8]
    assert inject._first_batch_size(data.batch(16).prefetch(2)) == 16
    assert inject._first_batch_size(data.take(0).batch(16)) is None  # empty: no batch to read
    assert inject._fit_batch_size(np.zeros((40, 8)), None) == 32
    assert inject._fit_batch_size(np.zeros((40, 8)), 8) == 8
    assert inject._fit_batch_size([np.zeros((40, 8)), np.zeros((40, 2))], 10) == 10
    assert inject._fit_batch_size(iter([]), None) is None


# -- items 6-8 under real horovodrun --------------------------------------------------------------
KERAS_SCRIPT = """
import horovod.tensorflow.keras as hvd
import numpy as np
import tensorflow as tf

hvd.init()
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
unused = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.01))  # created, never stepped
model = tf.keras.Sequential([tf.keras.layers.Dense(4, input_shape=(8,)), tf.keras.layers.Dense(2)])
model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              optimizer=hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.01)))
rng = np.random.default_rng(hvd.rank())
x, y = rng.normal(size=(96, 8)).astype("float32"), rng.integers(0, 2, 96)
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # 6 steps per epoch, no static size
model.fit(data, epochs=2, verbose=0, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
print("RESULT done", hvd.rank(), flush=True)
"""

TAPE_SCRIPT = """
import horovod.tensorflow as hvd
import tensorflow as tf

hvd.init()
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
model = tf.keras.Sequential([tf.keras.layers.Dense(4, input_shape=(8,)), tf.keras.layers.Dense(2)])
opt = tf.keras.optimizers.SGD(0.01)
loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@tf.function
def training_step(images, labels, first_batch):
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    tape = hvd.DistributedGradientTape(tape)
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    if first_batch:
        hvd.broadcast_variables(model.variables, root_rank=0)
    return loss


x, y = tf.random.normal([12, 8]), tf.zeros([12], tf.int64)
for i in range(10):
    training_step(labels=y, images=x, first_batch=i == 0)  # the batch by keyword only
print("RESULT done", hvd.rank(), flush=True)
"""


@pytest.mark.slow
@pytest.mark.tensorflow
def test_keras_fit_two_optimizers_dataset_and_a_warmup_that_never_ends(tmp_path):
    """Items 6, 7, 8b: the first optimizer is never stepped, the warm-up never ends, and fit
    gets a tf.data.Dataset batched by 16 (no static batch dimension)."""
    _need("tensorflow", "horovod.tensorflow.keras")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(KERAS_SCRIPT))
    proc = alsgd_run(["-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script)],
                     env={"ALSGD_WARMUP": "100000000"}, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    lines = _summary(proc.stdout)
    name = "horovod.tensorflow.keras.DistributedOptimizer"
    assert lines["steps"] == ("24 over all ranks (12 per rank; mini-batch phase 12 steps; the "
                              "local phase was not reached)"), proc.stdout
    assert lines["optimizers"] == (f"2 per rank: #1 {name} (0 steps per rank), #2 {name} "
                                   f"(12 steps per rank); figures of #2")
    assert lines["throughput"].endswith(" samples/s in the mini-batch phase (measured, all ranks)")
    assert "steps/s" not in lines["throughput"]


@pytest.mark.slow
@pytest.mark.tensorflow
def test_tf_step_taking_the_batch_by_keyword_reports_samples(tmp_path):
    """Item 8a: ``training_step(labels=y, images=x, ...)``: the batch size is still found."""
    _need("tensorflow", "horovod.tensorflow")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TAPE_SCRIPT))
    proc = alsgd_run(["-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script)],
                     env={"ALSGD_WARMUP": "2", "ALSGD_POLICY": "fixed", "ALSGD_PERIODS": "[4]"},
                     timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    lines = _summary(proc.stdout)
    assert lines["steps"] == "20 over all ranks (10 per rank; mini-batch phase 2 steps)", proc.stdout
    assert "samples/s in the local phase" in lines["throughput"], lines["throughput"]
    assert "steps/s" not in lines["throughput"]


def test_summary_names_where_the_ranks_ran_and_the_blocks_of_each_level():
    levels = [[[0, 1], [2, 3]], [[0, 1, 2, 3]]]
    reports = [dict(_report(r, [_sched(100, syncs=(12, 3), periods=(4, 2))]), levels=levels,
                    host="hostA" if r < 2 else "hostB") for r in range(4)]
    lines = _lines(reports)
    assert lines["topology"] == ("hosts hostA: ranks [0, 1], hostB: ranks [2, 3]; levels "
                                 "[[0, 1], [2, 3]] -> [[0, 1, 2, 3]]")
    assert "topology" not in _lines([_report(r, [_sched(100)]) for r in (0, 1)])  # older reports


def test_host_check_reads_the_hosts_of_every_horovodrun_form(tmp_path):
    pytest.importorskip("horovod")
    from adaptive_lsgd.tools.cli import host_check

    parser = run_mod._horovod_parser()
    args = parser.parse_args(["-np", "4", "-H", "a:2,b:2", "python", "x.py"])
    assert host_check.job_hosts(args) == ["a", "b"]
    (tmp_path / "hostfile").write_text("c slots=2\nd slots=2\n")
    args = parser.parse_args(["-np", "4", "--hostfile", str(tmp_path / "hostfile"), "python", "x.py"])
    assert host_check.job_hosts(args) == ["c", "d"]
    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho e:2\necho f:2\n")
    script.chmod(0o755)
    args = parser.parse_args(["-np", "4", "--host-discovery-script", str(script), "python", "x.py"])
    assert host_check.job_hosts(args) == ["e", "f"]
    assert host_check.job_hosts(parser.parse_args(["-np", "2", "python", "x.py"])) == []
    assert host_check.remote_hosts(["localhost", "127.0.0.1"]) == []  # this machine: no ssh


def test_host_check_lists_the_files_every_host_must_see(tmp_path):
    from adaptive_lsgd.tools.cli import host_check

    (tmp_path / "train.py").write_text("")
    paths = host_check.needed_paths(["python3", "-u", str(tmp_path / "train.py")],
                                    {"ALSGD_PROFILE": "/data/profile.json"}, "/inject")
    assert paths == [("adaptive-lsgd's injected sitecustomize", "/inject/sitecustomize.py"),
                     ("the script", str(tmp_path / "train.py")),
                     ("the profile (ALSGD_PROFILE)", "/data/profile.json")]
    assert host_check.needed_paths(["./run.sh"], {}, "/inject") == [
        ("adaptive-lsgd's injected sitecustomize", "/inject/sitecustomize.py")]
