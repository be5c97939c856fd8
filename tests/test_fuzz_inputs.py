"""Bad input everywhere (issue #9, item 6): config dicts, config files, ``ALSGD_*``
environment variables and the simulator's and cluster tool's command lines, fuzzed with
hypothesis. Each either works or fails with one clear error naming the problem: a
``ConfigError``/``TopologyError`` whose message names the key or variable, or a CLI exit
status with one ``error:`` line and no traceback. (``alsgd-tune``'s loader and CLI are
fuzzed in test_tune.py.)"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_lsgd import Scheduler, Topology
from adaptive_lsgd.config import KEYS, ConfigError, load_config
from adaptive_lsgd.tools.cli import sim as sim_mod
from adaptive_lsgd.tools.cluster import EmulatedCluster
from adaptive_lsgd.tools.cluster import cli as cluster_cli
from adaptive_lsgd.topology import TopologyError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-100, 10**6) | st.floats(allow_nan=True)
    | st.text(max_size=10), lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)
NICE = {  # values a config may plausibly hold, valid or not
    "policy": st.sampled_from(["adaptive", "fixed", "Fixed", "", "auto"]),
    "periods": st.lists(st.integers(-2, 70), max_size=3) | st.integers(-2, 70),
    "warmup": st.integers(-5, 100) | st.sampled_from(["first_lr_decay", "epoch", "0"]),
    "topology": st.sampled_from(["auto", "flat", "2x2", "4x1", "3x3", "2x", "x2", "1x4"])
    | st.lists(st.lists(st.integers(-1, 5), max_size=3), max_size=3),
    "max_period": st.integers(-1, 200) | st.lists(st.integers(0, 80), max_size=3),
}
KEY = st.sampled_from(KEYS + ("perods", "H", "", "Policy"))


def value_for(key):
    return NICE.get(key, JSON) | JSON


@st.composite
def configs(draw):
    keys = draw(st.lists(KEY, max_size=5, unique=True))
    return {k: draw(value_for(k)) for k in keys}


def check_config_error(exc: ConfigError, keys) -> None:
    msg = str(exc)
    assert "\n" not in msg and len(msg) < 600
    assert any(repr(k) in msg or f"ALSGD_{str(k).upper()}" in msg for k in keys) or "config" in msg


@settings(max_examples=400, deadline=None)
@given(configs())
def test_fuzz_config_dict_then_a_scheduler(cfg):
    try:
        config = load_config(cfg, env={})
    except ConfigError as exc:
        check_config_error(exc, list(cfg))
        return
    hosts = ["a", "a", "b", "b"]
    try:  # an accepted config either builds a scheduler or names the topology problem
        topo = Topology.from_config(config.topology, hosts, chained=config.chained_allreduce)
        sched = Scheduler(config, topo, rank=0)
    except TopologyError as exc:
        assert "topology" in str(exc) or "rank" in str(exc) or "block" in str(exc)
        return
    except ConfigError as exc:  # periods/max_period that do not match the levels
        assert "level" in str(exc)
        return
    assert all(h >= 1 for h in sched.periods)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEY, st.text(max_size=12), max_size=4))
def test_fuzz_environment_variables(values):
    env = {f"ALSGD_{k.upper()}": v for k, v in values.items()}
    try:
        load_config(None, env=env)
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg
        assert any(name in msg for name in env) or "config file" in msg


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=80) | st.text(max_size=80).map(str.encode)
       | configs().map(lambda c: __import__("json").dumps(c).encode()),
       st.sampled_from(["cfg.yaml", "cfg.json", "cfg"]), st.booleans())
def test_fuzz_config_files(tmp_path, content, name, via_env):
    path = tmp_path / name
    path.write_bytes(content)
    try:
        if via_env:
            load_config(None, env={"ALSGD_CONFIG": str(path)})
        else:
            load_config(str(path), env={})
    except ConfigError as exc:
        assert "\n" not in str(exc)
    except UnicodeDecodeError:
        pytest.fail("a binary config file must give a ConfigError")


def run_cli(main, argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, err.getvalue()


SIM_TOKENS = ["--hosts", "--workers-per-host", "--compute-ms", "--params", "--inter-gbps",
              "--steps", "--periods", "--policy", "--max-period", "--warmup", "--topology",
              "--target-comm-fraction", "--hysteresis", "--json", "--time-budget", "0", "-3", "2",
              "4,8", "0.5", "nan", "inf", "1e9", "fixed", "adaptive", "2x2", "x", ""]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(SIM_TOKENS), max_size=6))
def test_fuzz_simulator_cli(argv):
    if "--steps" not in argv:
        argv = argv + ["--steps", "20"]
    rc, err = run_cli(sim_mod.main, argv)
    assert "Traceback" not in err
    if rc not in (0, None):
        assert rc in (1, 2) and "error:" in err


CLUSTER_TOKENS = ["--hosts", "--workers-per-host", "--rate-mbit", "--slowdown", "--schedule",
                  "--run-id", "--timeout", "0", "-1", "2", "1,2,3", "10:0:5", "x:y", "BAD ID",
                  "abc", "300"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(CLUSTER_TOKENS), max_size=6))
def test_fuzz_cluster_cli_arguments(argv):
    """The cluster tool's checks, up to (not including) making namespaces: the parser, then
    the constructor ``main`` calls, which validates without touching the network."""
    rc, err = run_cli(cluster_cli.parse_args, argv + ["--", "true"])
    assert "Traceback" not in err
    if not isinstance(rc, cluster_cli.argparse.Namespace):
        assert rc == 2 and "error:" in err
        return
    args, one = rc, cluster_cli._one_or_list
    try:
        EmulatedCluster(hosts=args.hosts, workers_per_host=one(args.workers_per_host),
                        rate_mbit=one(args.rate_mbit), slowdown=one(args.slowdown),
                        schedule=args.schedule, run_id=args.run_id, echo=False)
    except ValueError as exc:  # main prints it as one `error:` line
        assert "\n" not in str(exc) and str(exc)


RUN_TOKENS = ["-np", "2", "0", "-H", "localhost:2", "--gloo", "--mpi", "--alsgd-config",
              "--alsgd-run-dir", "--alsgd-bogus", "--min-np", "--max-np", "--host-discovery-script",
              "--hostfile", "/nonexistent", "-p", "x", "--", "--verbose", "--timeline-filename"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(RUN_TOKENS + ["CFG"]), max_size=7), st.booleans(),
       configs() | st.text(max_size=30))
def test_fuzz_alsgd_run_arguments(tmp_path, tokens, with_command, cfg):
    """alsgd-run with --alsgd-dry-run (so nothing is launched): it prints the plan or one
    usage error, exit status 0 or 2, never a traceback."""
    from adaptive_lsgd.tools.cli import run as run_mod

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg if isinstance(cfg, str) else __import__("json").dumps(cfg))
    argv = ["--alsgd-dry-run"] + [str(cfg_file) if t == "CFG" else t for t in tokens]
    if with_command:  # a script that exists, so the dry run reaches the plan
        script = tmp_path / "train.py"
        script.write_text("print('train')\n")
        argv += ["python", str(script)]
    rc, err = run_cli(run_mod.main, argv)
    assert "Traceback" not in err
    assert rc in (0, 2), err
    if rc == 2:
        assert err.strip().splitlines()[-1].startswith("alsgd-run: error:"), err


BENCH_TOKENS = ["overhead", "comm-bound", "all", "report", "nope", "--json", "--out", "--doc",
                "--quick", "--rounds", "--steps", "--variants", "--timeout", "0", "-1", "3",
                "x,y", "OUT"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(BENCH_TOKENS), max_size=6))
def test_fuzz_alsgd_bench_arguments(tmp_path, tokens):
    """alsgd-bench's argument checks; `report` (cheap, no cluster) is run for real on an empty
    or missing folder, scenarios are only parsed."""
    from adaptive_lsgd.tools.bench import cli as bench_mod

    argv = [str(tmp_path / "out") if t == "OUT" else t for t in tokens]
    rc, err = run_cli(bench_mod.parse_args, argv)
    assert "Traceback" not in err
    if not isinstance(rc, bench_mod.argparse.Namespace):
        assert rc == 2 and "error:" in err
        return
    if rc.scenario == "report":
        rc2, err = run_cli(bench_mod.main, argv)
        assert "Traceback" not in err
        assert rc2 in (0, 1) and (rc2 == 0 or "error:" in err)
