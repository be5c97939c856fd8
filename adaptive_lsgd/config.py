"""Configuration: defaults, sources (dict, YAML/JSON file, ``ALSGD_*`` variables) and validation.

Precedence, lowest first: defaults, the file named by ``ALSGD_CONFIG``, ``ALSGD_<KEY>``
environment variables, then what the program passes (a dict or a file path).

Example::

    >>> from adaptive_lsgd.config import ConfigError, load_config
    >>> cfg = load_config({"policy": "fixed", "periods": [4]}, env={})
    >>> cfg.policy, cfg.periods, cfg.warmup
    ('fixed', [4], 0)
    >>> try:
    ...     load_config({"warmup": -1}, env={})
    ... except ConfigError as exc:
    ...     print(exc)
    config key 'warmup' (from the config argument): expected a non-negative integer or \
'first_lr_decay', got -1
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping
from typing import Any

ENV_PREFIX = "ALSGD_"
ENV_FILE = "ALSGD_CONFIG"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The effective, validated configuration shared by every rank."""

    policy: str = "adaptive"
    periods: list | None = None
    warmup: int | str = 0
    target_comm_fraction: float = 0.02
    max_period: int | list = 64
    max_global_period: int | None = None
    topology: str | list = "auto"
    time_budget: bool | str = "auto"
    skew_threshold: float = 1.25
    max_step_ratio: int = 4
    log: str | None = None
    log_all_ranks: bool = False
    hysteresis: float = 0.25
    qsr_alpha: float | None = None
    qsr_base: int = 1
    momentum: str = "local"
    average_buffers: bool = True
    timing_warmup: int = 2
    window: int = 16
    history: int = 5
    nonfinite_guard: bool = True
    chained_allreduce: bool | str = "auto"
    overlap: bool | str = "auto"
    overlap_pull: float = 0.5
    profile: str | None = None
    outer_optimizer: str = "none"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    compression: str = "none"
    outer_state_on_cpu: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


KEYS = tuple(f.name for f in dataclasses.fields(Config))
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
# One line per key (for command-line help; the README's configuration table says the same).
MEANINGS = {
    "policy": "adaptive (periods chosen online) or fixed",
    "periods": "periods per level, e.g. [4] or [2, 8] (required for fixed; initial for adaptive)",
    "warmup": "mini-batch steps before local SGD, or first_lr_decay (post-local SGD)",
    "target_comm_fraction": "adaptive: the largest predicted share of time in communication",
    "max_period": "cap per level (an int, or a list per level)",
    "max_global_period": "adaptive: at most this many steps between global averages (unset: "
                         "max_period in a hierarchy when max_period is one number)",
    "topology": "auto (one block per host; flat in elastic jobs), hosts, flat, '2x2' or "
                "[[0, 1], [2, 3]]",
    "time_budget": "mixed-speed rounds (a time budget, the average weighted by steps): auto (on "
                   "while ranks' compute differs by more than skew_threshold, in loops that "
                   "accept per-rank step counts), true or false",
    "skew_threshold": "time_budget auto: slowest/fastest rank compute ratio that turns it on",
    "max_step_ratio": "time-budget rounds: a rank takes at most this many times the slowest "
                      "rank's steps per round (bounds staleness)",
    "log": "decision log (JSON lines) path, written by rank 0",
    "log_all_ranks": "write the decision log on every rank ({rank} in the path also works)",
    "hysteresis": "adaptive: keep the current periods unless the target moves them by this much",
    "qsr_alpha": "quadratic synchronisation rule: global period <= max(qsr_base, (alpha/lr)^2)",
    "qsr_base": "the QSR's smallest global period",
    "momentum": "local, average (averaged with the model) or reset (zeroed after a sync)",
    "average_buffers": "average floating buffers (BatchNorm statistics) with the parameters",
    "timing_warmup": "timing statistics: samples skipped at the start",
    "window": "timing statistics: steps in the window median",
    "history": "timing statistics: shared history length",
    "nonfinite_guard": "a rank with NaN/Inf parameters is left out of the average and reset to it",
    "chained_allreduce": "hierarchical allreduce for upper-level syncs: auto (the sliced form "
                         "while the cost model prices it cheaper than one allreduce over all "
                         "ranks), true, sliced, leaders or false",
    "overlap": "run each average in the background during the next round: auto (when "
               "the target cannot be reached otherwise), true or false",
    "overlap_pull": "overlap: the share of a late average's correction applied, "
                    "x <- x + pull * (average - x at the round's end) (0 < pull <= 1; 1 applies "
                    "it whole; below 1 keeps the delayed correction from overshooting)",
    "profile": "an alsgd-tune profile: the adaptive policy starts at its recommendation",
    "outer_optimizer": "global syncs: none (plain averaging), sgd or nesterov (DiLoCo): an outer "
                       "step on the averaged update, outer state kept on every rank",
    "outer_lr": "outer optimizer: learning rate of the outer step (1 with momentum 0 = averaging)",
    "outer_momentum": "outer optimizer: momentum of the outer step (0 to 1)",
    "compression": "global syncs send the update since the last global model as none, fp16 or "
                   "bf16 (half the bytes); never the raw parameters",
    "outer_state_on_cpu": "PyTorch: keep the outer state (last global model, momentum) in CPU "
                          "memory instead of the model's device",
}
OUTER_OPTIMIZERS = ("none", "sgd", "nesterov")
COMPRESSIONS = ("none", "fp16", "bf16")
MOMENTUM = ("local", "average", "reset")
CHAINED_FORMS = ("sliced", "leaders")  # chained_allreduce: true picks sliced where it can


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _period_list(v: Any, what: str) -> list | None:
    if _is_int(v):
        v = [v]
    if isinstance(v, (list, tuple)) and v and all(_is_int(x) and x >= 1 for x in v):
        return list(v)
    raise ValueError(f"expected {what}")


def _check(key: str, v: Any) -> Any:
    """Return the normalised value of ``key`` or raise ValueError saying what is allowed."""
    if key == "policy":
        from .policies import POLICIES  # the one registry (policies import this module)
        if not isinstance(v, str) or v not in POLICIES:
            raise ValueError(f"expected one of {', '.join(POLICIES)}")
        return v
    if key == "periods":
        return None if v is None else _period_list(
            v, "a positive integer or a non-empty list of positive integers (one per level)")
    if key == "warmup":
        if v == "first_lr_decay" or (_is_int(v) and v >= 0):
            return v
        raise ValueError("expected a non-negative integer or 'first_lr_decay'")
    if key == "target_comm_fraction":
        if _is_num(v) and 0 < v < 1:
            return float(v)
        raise ValueError("expected a number strictly between 0 and 1")
    if key == "max_period":
        lst = _period_list(v, "a positive integer or a list of positive integers (one per level)")
        return lst[0] if _is_int(v) else lst
    if key == "topology":
        if isinstance(v, str):
            if v in ("auto", "flat", "hosts"):
                return v
            parts = v.lower().split("x")
            if len(parts) >= 2 and all(p.isdigit() and int(p) >= 1 for p in parts):
                return v.lower()
            raise ValueError("expected 'auto', 'flat', 'hosts', a shape like '2x2' (blocks x workers), "
                             "or a list of blocks like [[0, 1], [2, 3]]")
        if isinstance(v, (list, tuple)) and v and all(
                isinstance(b, (list, tuple)) and b and all(_is_int(r) and r >= 0 for r in b)
                for b in v):
            return [list(b) for b in v]
        raise ValueError("expected 'auto', 'flat', 'hosts', a shape like '2x2' (blocks x workers), "
                         "or a list of blocks like [[0, 1], [2, 3]]")
    if key == "chained_allreduce":
        if isinstance(v, bool) or v in CHAINED_FORMS or v == "auto":
            return v
        raise ValueError(f"expected auto, true, false or one of the forms {', '.join(CHAINED_FORMS)}")
    if key in ("time_budget", "overlap"):
        if isinstance(v, bool) or v == "auto":
            return v
        raise ValueError("expected auto, true or false")
    if key == "skew_threshold":
        if _is_num(v) and v > 1:
            return float(v)
        raise ValueError("expected a number above 1 (the slowest rank's step time over the fastest's)")
    if key == "max_step_ratio":
        if _is_int(v) and v >= 1:
            return v
        raise ValueError("expected a positive integer")
    if key == "outer_optimizer":
        if v in OUTER_OPTIMIZERS:
            return v
        raise ValueError(f"expected one of {', '.join(OUTER_OPTIMIZERS)}")
    if key == "compression":
        if v in COMPRESSIONS:
            return v
        raise ValueError(f"expected one of {', '.join(COMPRESSIONS)}")
    if key == "overlap_pull":
        if _is_num(v) and 0 < v <= 1:
            return float(v)
        raise ValueError("expected a number in (0, 1]")
    if key == "outer_lr":
        if _is_num(v) and 0 < v <= 10:
            return float(v)
        raise ValueError("expected a number in (0, 10]")
    if key == "outer_momentum":
        if _is_num(v) and 0 <= v < 1:
            return float(v)
        raise ValueError("expected a number in [0, 1)")
    if key in ("log_all_ranks", "average_buffers", "nonfinite_guard", "outer_state_on_cpu"):
        if isinstance(v, bool):
            return v
        raise ValueError("expected true or false")
    if key in ("log", "profile"):
        if v is None or (isinstance(v, str) and v.strip()):
            return v
        raise ValueError("expected a file path or null")
    if key == "hysteresis":
        if _is_num(v) and 0 <= v < 1:
            return float(v)
        raise ValueError("expected a number in [0, 1)")
    if key == "qsr_alpha":
        if v is None or (_is_num(v) and v > 0):
            return None if v is None else float(v)
        raise ValueError("expected a positive number or null")
    if key == "max_global_period":
        if v is None or (_is_int(v) and v >= 1):
            return v
        raise ValueError("expected a positive integer or null")
    if key in ("qsr_base", "window", "history"):
        if _is_int(v) and v >= 1:
            return v
        raise ValueError("expected a positive integer")
    if key == "timing_warmup":
        if _is_int(v) and v >= 0:
            return v
        raise ValueError("expected a non-negative integer")
    if key == "momentum":
        if v in MOMENTUM:
            return v
        raise ValueError(f"expected one of {', '.join(MOMENTUM)}")
    raise AssertionError(key)  # pragma: no cover


def _parse_env_value(text: str) -> Any:
    """Environment values are JSON when they parse as JSON, else plain strings."""
    low = text.strip().lower()
    if low in ("none", "null", ""):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def _parse_error(exc: Exception) -> str:
    """``line L, column C: what is wrong`` from a YAML or JSON parse error (1-based, as editors
    count), or its first line when it carries no position."""
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
    mark = getattr(exc, "problem_mark", None)  # yaml.MarkedYAMLError
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and cmark is not None and (cmark.line, cmark.column) != (mark.line, mark.column):
            where += f" ({context} at line {cmark.line + 1}, column {cmark.column + 1})"
        elif context:
            where += f" ({context})"
        return where
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def read_config_file(path: str) -> dict:
    """Read a YAML or JSON mapping; errors name the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc.strerror or exc}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            try:
                import yaml  # pyyaml: optional for the core, needed only for YAML files
            except ImportError as exc:  # pragma: no cover - pyyaml is an install requirement
                raise ConfigError(f"config file {path!r} is YAML but pyyaml is not installed") from exc
            data = yaml.safe_load(text)
    except ConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigError(f"config file {path!r} is not valid YAML/JSON: {_parse_error(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values, "
                          f"got {type(data).__name__}")
    return data


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} (from {source}){hint}; "
                       f"allowed keys: {', '.join(KEYS)}")


def load_config(config: Mapping | str | os.PathLike | Config | None = None,
                env: Mapping[str, str] | None = None, *,
                env_file_source: str | None = None) -> Config:
    """Build the effective :class:`Config` from every source; raise :class:`ConfigError`.

    ``env_file_source``: how messages name the file of ``ALSGD_CONFIG`` (default
    ``ALSGD_CONFIG=<path>``), for a launcher that passes the user's file that way."""
    if isinstance(config, Config):
        return config
    env = os.environ if env is None else env
    layers: list[tuple[str, Mapping]] = []
    if env.get(ENV_FILE):
        layers.append((env_file_source or f"{ENV_FILE}={env[ENV_FILE]}",
                       read_config_file(env[ENV_FILE])))
    env_layer = {}
    for name, text in env.items():
        if name.startswith(ENV_PREFIX) and name != ENV_FILE:
            key = name[len(ENV_PREFIX):].lower()
            if key not in KEYS:
                raise _unknown(key, f"environment variable {name}")
            env_layer[key] = _parse_env_value(text)
    if env_layer:
        layers.append(("environment", env_layer))
    if isinstance(config, (str, os.PathLike)):
        layers.append((f"config file {os.fspath(config)}", read_config_file(os.fspath(config))))
    elif config is not None:
        if not isinstance(config, Mapping):
            raise ConfigError(f"config must be a dict, a file path or None, got {type(config).__name__}")
        layers.append(("the config argument", config))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, layer in layers:
        for key, v in layer.items():
            if key not in KEYS:
                raise _unknown(key, source)
            # Each key names its own variable (not the first one of the layer).
            where = f"environment variable {ENV_PREFIX}{key.upper()}" if source == "environment" \
                else source
            try:
                values[key] = _check(key, v)
                sources[key] = where
            except ValueError as exc:
                raise ConfigError(f"config key {key!r} (from {where}): {exc}, got {v!r}") from None
    cfg = Config(**values)
    if cfg.profile:
        from .profile import ProfileError, load_profile
        try:
            load_profile(cfg.profile)
        except ProfileError as exc:
            raise ConfigError(f"config key 'profile' (from {sources['profile']}): {exc}") from None
    if cfg.policy == "fixed" and cfg.periods is None:
        raise ConfigError("config key 'periods' is required with policy 'fixed' "
                          "(e.g. periods: [4], or [2, 8] for two levels)")
    if cfg.overlap is True:
        # An overlapped average is one asynchronous allreduce in flight while the next round
        # runs: a multi-stage (chained) sync or per-rank round lengths do not fit that.
        for key, bad in (("chained_allreduce", cfg.chained_allreduce not in (False, "auto")),
                         ("time_budget", cfg.time_budget is True),
                         ("compression", cfg.compression != "none")):
            if bad:
                raise ConfigError(f"config key 'overlap' (from {sources['overlap']}) cannot be "
                                  f"combined with {key}: {getattr(cfg, key)!r} (from "
                                  f"{sources[key]}); set {key}: {'none' if key == 'compression' else 'false'}"
                                  " or overlap: false")
    return cfg


# What each place that runs syncs cannot do, and why (``check_supported``).
_NO_OVERLAP = {
    "sim": "config key 'overlap': the simulator models averages that block the ranks; "
           "overlapped averaging is not simulated (set overlap: false, or ask alsgd-tune "
           "recommend --overlap)",
}


def check_supported(cfg: Config, runner: str, elastic: bool = False) -> None:
    """Refuse, with a :class:`ConfigError` naming the key, what ``runner`` (``torch``,
    ``tensorflow`` or ``sim``) cannot honour for ``cfg``; ``elastic``: an elastic Horovod job."""
    if runner == "tensorflow" and elastic:
        raise ConfigError("adaptive-lsgd's TensorFlow integration does not support elastic "
                          "Horovod jobs yet (its scheduler state would not survive a reset): "
                          "launch without --min-np/--max-np/--host-discovery-script, or use the "
                          "PyTorch integration, which supports them (docs/elastic.md)")
    if cfg.overlap is True and runner in _NO_OVERLAP:
        raise ConfigError(_NO_OVERLAP[runner])
    if cfg.overlap is True and elastic:
        raise ConfigError("config key 'overlap' is not supported in elastic Horovod jobs (an "
                          "average in flight cannot survive a reset); set overlap: false")


def cautions(cfg: Config, loop: str) -> list:
    """Warnings (strings) for running ``cfg`` in a training loop of kind ``loop`` (``fit``: a
    loop with a fixed number of steps per epoch, such as Keras ``model.fit``)."""
    out = []
    if loop == "fit" and cfg.time_budget is True:
        out.append("time_budget mode with model.fit: ranks take different numbers of steps per "
                   "round, so a fixed number of steps per epoch ends them on different rounds")
    return out
