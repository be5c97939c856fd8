"""Config loading: sources, precedence, validation messages."""

import json
import os

import pytest

from adaptive_lsgd.config import KEYS, Config, ConfigError, load_config


def test_defaults():
    cfg = load_config(None, env={})
    assert cfg == Config()
    assert cfg.policy == "adaptive" and cfg.periods is None and cfg.warmup == 0
    assert cfg.target_comm_fraction == 0.02 and cfg.max_period == 64
    assert set(cfg.to_dict()) == set(KEYS)


def test_dict_normalises_values():
    cfg = load_config({"policy": "fixed", "periods": 4, "max_period": [8, 64], "topology": "2X2",
                       "target_comm_fraction": 0.2, "warmup": "first_lr_decay"}, env={})
    assert cfg.periods == [4]
    assert cfg.max_period == [8, 64]
    assert cfg.topology == "2x2"
    assert cfg.warmup == "first_lr_decay"
    assert isinstance(cfg.target_comm_fraction, float)
    assert load_config({"topology": [[0, 1], (2, 3)]}, env={}).topology == [[0, 1], [2, 3]]
    assert load_config({"max_period": [16]}, env={}).max_period == [16]
    assert load_config({"chained_allreduce": "leaders"}, env={}).chained_allreduce == "leaders"
    assert load_config(None, env={"ALSGD_CHAINED_ALLREDUCE": "sliced"}).chained_allreduce == "sliced"


def test_config_object_passes_through():
    cfg = load_config({"window": 4}, env={})
    assert load_config(cfg, env={"ALSGD_WINDOW": "9"}) is cfg


def test_json_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"policy": "fixed", "periods": [2, 8], "hysteresis": 0}))
    cfg = load_config(str(path), env={})
    assert cfg.policy == "fixed" and cfg.periods == [2, 8] and cfg.hysteresis == 0.0


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy: adaptive\ntarget_comm_fraction: 0.05\nmax_period: [4, 32]\n"
                    "time_budget: true\nlog: null\n")
    cfg = load_config(path, env={})  # a PathLike works too
    assert cfg.target_comm_fraction == 0.05 and cfg.max_period == [4, 32]
    assert cfg.time_budget is True and cfg.log is None


def test_empty_yaml_file_is_defaults(tmp_path):
    path = tmp_path / "empty.yml"
    path.write_text("")
    assert load_config(str(path), env={}) == Config()


def test_env_variables_are_parsed():
    env = {"ALSGD_POLICY": "fixed", "ALSGD_PERIODS": "[2, 4]", "ALSGD_TIME_BUDGET": "yes",
           "ALSGD_TARGET_COMM_FRACTION": "0.2", "ALSGD_LOG": "none", "ALSGD_WARMUP": "first_lr_decay",
           "ALSGD_MAX_PERIOD": "32", "ALSGD_NONFINITE_GUARD": "off", "OTHER": "ignored"}
    cfg = load_config(None, env=env)
    assert cfg.policy == "fixed" and cfg.periods == [2, 4] and cfg.time_budget is True
    assert cfg.target_comm_fraction == 0.2 and cfg.log is None and cfg.warmup == "first_lr_decay"
    assert cfg.max_period == 32 and cfg.nonfinite_guard is False


def test_precedence(tmp_path):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("window: 3\nhistory: 3\nqsr_base: 3\ntiming_warmup: 3\n")
    arg_file = tmp_path / "arg.json"
    arg_file.write_text(json.dumps({"window": 1}))
    env = {"ALSGD_CONFIG": str(env_file), "ALSGD_HISTORY": "2", "ALSGD_WINDOW": "2",
           "ALSGD_QSR_BASE": "2"}
    # defaults < ALSGD_CONFIG file < ALSGD_<KEY> variables < what the program passes
    cfg = load_config({"window": 1, "qsr_base": 1}, env=env)
    assert (cfg.timing_warmup, cfg.history, cfg.qsr_base, cfg.window) == (3, 2, 1, 1)
    assert load_config(str(arg_file), env=env).window == 1
    assert load_config(None, env=env).window == 2
    assert load_config(None, env={"ALSGD_CONFIG": str(env_file)}).window == 3
    assert load_config(None, env={}).window == Config().window


@pytest.mark.parametrize("key, value, allowed", [
    ("policy", "greedy", "adaptive, fixed"),
    ("momentum", "nesterov", "local, average, reset"),
    ("warmup", -1, "non-negative integer or 'first_lr_decay'"),
    ("target_comm_fraction", 1.5, "strictly between 0 and 1"),
    ("target_comm_fraction", True, "strictly between 0 and 1"),
    ("periods", [4, 0], "positive integer"),
    ("periods", [], "positive integer"),
    ("max_period", "big", "positive integer"),
    ("topology", "2by2", "'2x2'"),
    ("topology", [[0, 1], []], "'2x2'"),
    ("time_budget", "yes", "true or false"),
    ("chained_allreduce", "ring", "true, false or one of the forms sliced, leaders"),
    ("hysteresis", 1.0, "[0, 1)"),
    ("qsr_alpha", 0, "positive number or null"),
    ("window", 0, "positive integer"),
    ("timing_warmup", -2, "non-negative integer"),
    ("log", "  ", "file path or null"),
])
def test_errors_name_the_key_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config({key: value}, env={})
    msg = str(err.value)
    assert f"'{key}'" in msg and allowed in msg and repr(value) in msg
    assert "the config argument" in msg


def test_env_error_names_the_variable():
    with pytest.raises(ConfigError, match=r"ALSGD_TARGET_COMM_FRACTION.*between 0 and 1"):
        load_config(None, env={"ALSGD_TARGET_COMM_FRACTION": "2"})


def test_file_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("policy: fast\n")
    with pytest.raises(ConfigError, match=r"'policy' \(from config file .*bad.yaml\).*adaptive, fixed"):
        load_config(str(path), env={})


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError) as err:
        load_config({"target_comm_fracton": 0.1}, env={})
    msg = str(err.value)
    assert "unknown config key 'target_comm_fracton'" in msg
    assert "did you mean 'target_comm_fraction'?" in msg
    assert "allowed keys:" in msg and "max_period" in msg


def test_unknown_env_key_suggests_and_names_the_variable():
    with pytest.raises(ConfigError, match=r"'warmpu' \(from environment variable ALSGD_WARMPU\)"
                                          r" \(did you mean 'warmup'\?\)"):
        load_config(None, env={"ALSGD_WARMPU": "5"})


def test_unknown_key_without_a_close_match():
    with pytest.raises(ConfigError) as err:
        load_config({"zzzzzz": 1}, env={})
    assert "did you mean" not in str(err.value)


def test_fixed_policy_needs_periods():
    with pytest.raises(ConfigError, match="'periods' is required with policy 'fixed'"):
        load_config({"policy": "fixed"}, env={})


@pytest.mark.parametrize("text, match", [
    (None, "does not exist"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("policy: [unclosed\n", "not valid YAML/JSON"),
])
def test_bad_files(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(path), env={})


def test_bad_json_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{policy: fixed}")
    with pytest.raises(ConfigError, match="not valid YAML/JSON"):
        load_config(str(path), env={})


def test_config_of_the_wrong_type():
    with pytest.raises(ConfigError, match="must be a dict, a file path or None, got int"):
        load_config(3, env={})


def test_env_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, env={"ALSGD_CONFIG": str(tmp_path / "missing.yaml")})


# -- issue 18 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, name", [
    ({"ALSGD_POLICY": "fixed", "ALSGD_PERIODS": "0"}, "ALSGD_PERIODS"),
    ({"ALSGD_WINDOW": "4", "ALSGD_HISTORY": "3", "ALSGD_HYSTERESIS": "2"}, "ALSGD_HYSTERESIS"),
])
def test_each_env_key_names_its_own_variable(env, name):
    """The variable named is the bad key's, not the first variable of the environment layer."""
    with pytest.raises(ConfigError) as err:
        load_config(None, env=env)
    msg = str(err.value)
    assert f"(from environment variable {name})" in msg
    others = [v for v in env if v != name]
    assert not any(v in msg for v in others), msg


def test_env_sources_are_recorded_per_key():
    # overlap's refusal names the source of each key: each its own variable
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"ALSGD_OVERLAP": "true", "ALSGD_TIME_BUDGET": "true"})
    msg = str(err.value)
    assert "'overlap' (from environment variable ALSGD_OVERLAP)" in msg
    assert "(from environment variable ALSGD_TIME_BUDGET)" in msg


def test_env_file_source_names_the_file_as_the_launcher_says(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("window: 3\nmax_period: 0\n")
    label = "config file cfg.yaml given with --alsgd-config"
    with pytest.raises(ConfigError, match=r"'max_period' \(from config file cfg.yaml given with "
                                          r"--alsgd-config\)") as err:
        load_config(None, env={"ALSGD_CONFIG": str(path)}, env_file_source=label)
    assert "ALSGD_CONFIG" not in str(err.value)
    path.write_text("perods: [4]\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'perods' \(from config file "
                                          r"cfg.yaml given with --alsgd-config\)"):
        load_config(None, env={"ALSGD_CONFIG": str(path)}, env_file_source=label)
    # without the label: as before
    with pytest.raises(ConfigError, match=r"\(from ALSGD_CONFIG="):
        load_config(None, env={"ALSGD_CONFIG": str(path)})


@pytest.mark.parametrize("name, text, where", [
    ("x.yaml", "policy: adaptive\nwindow: 4\nmax_period: 8\n  warmup: 5\n",
     "line 4, column 9: mapping values are not allowed here"),
    ("x.yaml", "policy: adaptive\nperiods: [4, 8\n",
     "line 3, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow "
     "sequence at line 2, column 10)"),
    ("x.yaml", "window: 4\n\twarmup: 5\n", "line 2, column 1: found character '\\t' that cannot "
                                             "start any token (while scanning for the next token)"),
    ("x.json", '{\n  "window": 4,\n  "warmup" 5\n}\n', "line 3, column 12: Expecting ':' delimiter"),
    ("x.json", '{"window": 4,}', "line 1, column 14: Expecting property name enclosed in double quotes"),
])
def test_parse_errors_give_the_line_and_column(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path), env={})
    assert str(err.value) == f"config file {str(path)!r} is not valid YAML/JSON: {where}"


def test_meanings_and_defaults_cover_every_key():
    from adaptive_lsgd.config import DEFAULTS, MEANINGS

    assert set(MEANINGS) == set(KEYS) == set(DEFAULTS)
    assert all(m and "\n" not in m and "``" not in m for m in MEANINGS.values())
    assert DEFAULTS == Config().to_dict()


def test_readme_config_table_lists_every_key_once():
    """The README's configuration table and the config schema name the same keys."""
    import re

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme, encoding="utf-8") as fh:
        text = fh.read()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed = []
    for line in section.splitlines():
        if line.startswith("| `"):
            listed += re.findall(r"`([a-z_]+)`", line.split("|")[1])
    assert sorted(listed) == sorted(KEYS), set(listed) ^ set(KEYS)
