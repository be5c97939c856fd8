"""Tuning-tool profiles: what ``alsgd-tune profile`` measured, and the cost model they imply.

A profile is versioned JSON (``format: adaptive-lsgd-profile``, ``version: 1``) holding the
model's size, the compute time of one training step, and per link *kind* an alpha-beta fit of
Horovod's allreduce: ``intra`` (the workers of one host) and/or ``inter`` (across hosts). A
link is stored as latency ``alpha_s`` and *bus bandwidth* ``bus_bytes_per_s``: a ring
allreduce of ``n`` bytes over ``p`` ranks moves ``2 (p - 1) / p * n`` bytes per rank, so

    t(n, p) = alpha_s + 2 (p - 1) / p * n / bus_bytes_per_s

which carries a fit made with one number of ranks over to another. The same formula answers
"what if my link were B Gbit/s" (:meth:`Profile.with_link`). ``sync.overhead_s`` (optional)
is what one sync of the model costs outside its collective on this machine (packing, the
finiteness check, unpacking): the scheduler measures whole syncs, so the predicted link time
of a sync includes it (once per sync: at every level of a plain hierarchy, at the top one of a
chained sync, whose lower stages share the top's packing). :data:`PROFILE_SCHEMA` is the
JSON schema (the tuning tool validates whole files with it); :func:`load_profile` checks what
the scheduler reads with the standard library only, so the core needs no schema package.

Example::

    >>> from adaptive_lsgd.profile import Profile
    >>> prof = Profile(compute_s=0.02, param_bytes=4_000_000, batch_size=64,
    ...                links={"intra": (5e-4, 2e9)})
    >>> prof = prof.with_link("inter", gbps=0.1)            # a 100 Mbit/s network
    >>> m = prof.cost_model([("intra", 2), ("inter", 4)])   # 2 hosts x 2 workers
    >>> [round(t, 4) for t in m.link_s]
    [0.0025, 0.4805]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence

from .cost_model import CostModel

PROFILE_FORMAT = "adaptive-lsgd-profile"
PROFILE_VERSION = 1
LINK_KINDS = ("intra", "inter")
DEFAULT_ALPHA_S = 1e-4  # a what-if link with no measured latency: 100 us

_POS = {"type": "number", "exclusiveMinimum": 0}
_NONNEG = {"type": "number", "minimum": 0}
_SAMPLE = {"type": "array", "items": _NONNEG, "minItems": 2, "maxItems": 2}
_LINK = {
    "type": "object",
    "required": ["alpha_s", "bus_bytes_per_s", "ranks"],
    "properties": {
        "alpha_s": _NONNEG,
        "bus_bytes_per_s": _POS,
        "ranks": {"type": "integer", "minimum": 2},
        "samples": {"type": "array", "items": _SAMPLE},
    },
}
PROFILE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "adaptive-lsgd tuning profile",
    "type": "object",
    "required": ["format", "version", "model", "compute", "links"],
    "properties": {
        "format": {"const": PROFILE_FORMAT},
        "version": {"const": PROFILE_VERSION},
        "created": {"type": "string"},
        "machine": {"type": "object"},
        "cluster": {"type": "object"},
        "model": {
            "type": "object",
            "required": ["parameters", "bytes", "batch_size"],
            "properties": {
                "parameters": {"type": "integer", "minimum": 1},
                "bytes": {"type": "integer", "minimum": 1},
                "batch_size": {"type": "integer", "minimum": 1},
                "framework": {"enum": ["torch", "tensorflow"]},
                "source": {"type": "string"},
            },
        },
        "compute": {
            "type": "object",
            "required": ["step_s"],
            "properties": {
                "step_s": _POS,
                "samples_s": {"type": "array", "items": _POS},
                "mean_step_s": _POS,
            },
        },
        "sync": {
            "type": "object",
            "properties": {"overhead_s": _NONNEG},
        },
        "links": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {kind: _LINK for kind in LINK_KINDS},
        },
    },
}


class ProfileError(ValueError):
    """A profile file is missing, unreadable, foreign or malformed (the message says which)."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """The numbers a cost model needs: ``links`` maps a kind to ``(alpha_s, bus_bytes_per_s)``."""

    compute_s: float
    param_bytes: int
    batch_size: int
    links: Mapping
    sync_overhead_s: float = 0.0
    mean_step_s: float | None = None

    @property
    def rate_factor(self) -> float:
        """Mean over median step time (1 when the profile has no mean). Decisions use the
        median (robust to a stall), as the scheduler does; a round lasts the *sum* of its
        steps, so a predicted rate uses the mean: ``compute_s * rate_factor``."""
        return self.mean_step_s / self.compute_s if self.mean_step_s else 1.0

    def link_time(self, kind: str, nbytes: float, ranks: int) -> float:
        """Predicted allreduce seconds of ``nbytes`` over ``ranks`` ranks on a ``kind`` link."""
        if ranks < 2:
            return 0.0
        alpha, bus = self._link(kind)
        return alpha + 2.0 * (ranks - 1) / ranks * float(nbytes) / bus

    def _link(self, kind: str) -> tuple:
        if kind in self.links:
            return self.links[kind]
        # A level of a kind the profile did not measure: the other kind stands in (a profile
        # recorded on one machine only knows its loopback; ask "what if" with with_link).
        return next(iter(self.links.values()))

    def with_link(self, kind: str, gbps: float | None = None, latency_s: float | None = None) -> Profile:
        """A copy whose ``kind`` link has bus bandwidth ``gbps`` Gbit/s and/or latency
        ``latency_s`` (unset parts keep the measured value of that kind, else of the other
        kind for the latency)."""
        if kind not in LINK_KINDS:
            raise ProfileError(f"link kind {kind!r}: expected one of {', '.join(LINK_KINDS)}")
        alpha, bus = self.links.get(kind, (None, None))
        if latency_s is not None:
            alpha = float(latency_s)
        elif alpha is None:
            alpha = min((a for a, _ in self.links.values()), default=DEFAULT_ALPHA_S)
        if gbps is not None:
            bus = float(gbps) * 1e9 / 8.0
        elif bus is None:
            bus = self._link(kind)[1]
        if not (alpha >= 0 and bus > 0 and math.isfinite(alpha) and math.isfinite(bus)):
            raise ProfileError(f"{kind} link needs latency >= 0 and bandwidth > 0")
        return dataclasses.replace(self, links={**self.links, kind: (alpha, bus)})

    def cost_model(self, levels: Sequence[tuple], nbytes: float | None = None,
                   compute_s: float | None = None, chained: bool = False,
                   shares: Sequence[float] | None = None, sliced: bool = False,
                   overlap: bool = False) -> CostModel:
        """The core's :class:`CostModel` for ``levels`` = ``[(kind, ranks per link), ...]``
        (finest first) and ``nbytes`` averaged per sync (default: the profiled model's);
        ``shares[l]`` is the part of it a level-``l`` link carries (sliced chained sync)."""
        nbytes = self.param_bytes if nbytes is None else nbytes
        shares = [1.0] * len(levels) if shares is None else list(shares)
        top = len(levels) - 1
        link_s = [self.link_time(kind, nbytes * share, ranks)
                  + (self.sync_overhead_s if ranks > 1 and (lvl == top or not chained) else 0.0)
                  for lvl, ((kind, ranks), share) in enumerate(zip(levels, shares))]
        return CostModel(self.compute_s if compute_s is None else compute_s, link_s, chained=chained,
                         sliced=sliced, overlap=overlap)


def level_kinds(num_levels: int, spans_hosts: Sequence[bool] | None = None) -> list:
    """The link kind of each level: ``inter`` where a level's blocks span hosts; without host
    information the top level of a hierarchy is ``inter`` and the levels below are ``intra``,
    and a single level is ``inter`` (a flat job over a network)."""
    if spans_hosts is not None:
        return ["inter" if s else "intra" for s in spans_hosts]
    if num_levels == 1:
        return ["inter"]
    return ["intra"] * (num_levels - 1) + ["inter"]


def _field(data: Mapping, path: str):
    node = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ProfileError(f"profile field '{path}' is missing")
        node = node[part]
    return node


def _number(data: Mapping, path: str, positive: bool = True, integer: bool = False) -> float:
    v = _field(data, path)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > 0 if positive else v >= 0) and (not integer or float(v).is_integer())
    if not ok:
        want = "a positive integer" if integer else ("a positive number" if positive else
                                                      "a non-negative number")
        raise ProfileError(f"profile field '{path}': expected {want}, got {v!r}")
    return int(v) if integer else float(v)


def profile_from_dict(data) -> Profile:
    """Check the fields the cost model uses (standard library only) and build a Profile."""
    if not isinstance(data, Mapping):
        raise ProfileError(f"a profile is a JSON object, got {type(data).__name__}")
    if data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"not an adaptive-lsgd profile (field 'format' is "
                           f"{data.get('format')!r}, expected {PROFILE_FORMAT!r})")
    if data.get("version") != PROFILE_VERSION:
        raise ProfileError(f"profile version {data.get('version')!r} is not supported "
                           f"(expected {PROFILE_VERSION})")
    links = _field(data, "links")
    if not isinstance(links, Mapping) or not links:
        raise ProfileError("profile field 'links' must map 'intra'/'inter' to link fits")
    parsed = {}
    for kind in links:
        if kind not in LINK_KINDS:
            raise ProfileError(f"profile field 'links.{kind}': unknown link kind; expected "
                               f"{' or '.join(LINK_KINDS)}")
        parsed[kind] = (_number(data, f"links.{kind}.alpha_s", positive=False),
                        _number(data, f"links.{kind}.bus_bytes_per_s"))
    overhead = 0.0
    if isinstance(data.get("sync"), Mapping) and "overhead_s" in data["sync"]:
        overhead = _number(data, "sync.overhead_s", positive=False)
    mean = None
    if isinstance(data.get("compute"), Mapping) and "mean_step_s" in data["compute"]:
        mean = _number(data, "compute.mean_step_s")
    return Profile(compute_s=_number(data, "compute.step_s"),
                   param_bytes=_number(data, "model.bytes", integer=True),
                   batch_size=_number(data, "model.batch_size", integer=True),
                   links=parsed, sync_overhead_s=overhead, mean_step_s=mean)


def read_profile_json(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; :class:`ProfileError` if missing or not JSON."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ProfileError(f"profile {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ProfileError(f"profile {path!r} is not readable JSON: {first}") from None


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and check a profile file; every problem is a one-line :class:`ProfileError`."""
    try:
        return profile_from_dict(read_profile_json(path))
    except ProfileError as exc:
        msg = str(exc)
        raise ProfileError(msg if os.fspath(path) in msg else f"profile {os.fspath(path)!r}: {msg}") from None


__all__ = ["Profile", "ProfileError", "PROFILE_SCHEMA", "PROFILE_FORMAT", "PROFILE_VERSION",
           "LINK_KINDS", "load_profile", "profile_from_dict", "read_profile_json", "level_kinds"]
