"""Start-up agreement: every rank must run the same effective config and topology.

The integrations allgather :func:`rank_info` once at start (before any process set is made)
and call :func:`check_agreement` on the list; a difference stops every rank with an error
that names the keys and the value on each rank, instead of a deadlock later.

Example::

    >>> from adaptive_lsgd.agreement import ConfigMismatchError, check_agreement
    >>> try:
    ...     check_agreement([{"config": {"policy": "fixed"}}, {"config": {"policy": "adaptive"}}])
    ... except ConfigMismatchError as exc:
    ...     print(exc)
    ranks disagree on the adaptive-lsgd config: policy: rank 0='fixed', rank 1='adaptive'
"""

from __future__ import annotations

import hashlib
import json


class ConfigMismatchError(RuntimeError):
    """Ranks were started with different configs or topologies."""


# Keys that may legitimately differ between ranks (each rank's own file name, say).
RANK_LOCAL_KEYS = ("log", "log_all_ranks")


def rank_info(config, host: str, extra: dict | None = None) -> dict:
    shared = {k: v for k, v in config.to_dict().items() if k not in RANK_LOCAL_KEYS}
    if shared.get("profile"):  # the same path must hold the same numbers on every host
        with open(shared["profile"], "rb") as fh:
            shared["profile_sha256"] = hashlib.sha256(fh.read()).hexdigest()[:16]
    info = {"config": shared, "host": host}
    if extra:
        info.update(extra)
    info["digest"] = digest(shared)
    return info


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_agreement(infos: list, keys=("config",)) -> None:
    """Raise :class:`ConfigMismatchError` naming every key whose value differs between ranks."""
    problems = []
    for section in keys:
        values = [info.get(section, {}) for info in infos]
        if all(v == values[0] for v in values):
            continue
        if not all(isinstance(v, dict) for v in values):
            shown = ", ".join(f"rank {r}={v!r}" for r, v in enumerate(values))
            problems.append(f"{section}: {shown}")
            continue
        for key in sorted(set().union(*values)):
            per_rank = [v.get(key) for v in values]
            if any(p != per_rank[0] for p in per_rank):
                shown = ", ".join(f"rank {r}={p!r}" for r, p in enumerate(per_rank))
                problems.append(f"{key}: {shown}")
    if problems:
        raise ConfigMismatchError("ranks disagree on the adaptive-lsgd config: " + "; ".join(problems))
