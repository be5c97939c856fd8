"""Decision log: one JSON object per line, one record per sync (and per phase switch).

Written by rank 0 by default; with ``log_all_ranks: true`` (or ``{rank}`` in the path) every
rank writes its own file with the rank in its name. Lines are flushed as written, so a log
survives a crash and can be tailed while a run goes on.

Example::

    >>> import json, os, tempfile
    >>> from adaptive_lsgd.decision_log import DecisionLog, log_path
    >>> log_path("run.jsonl", rank=3, all_ranks=True)
    'run.rank3.jsonl'
    >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
    >>> log = DecisionLog(path)
    >>> log.write({"step": 4, "level": 0, "periods": [4]})
    >>> log.close()
    >>> json.loads(open(path).read())["periods"]
    [4]
"""

from __future__ import annotations

import json
import os
import time


def log_path(path: str, rank: int, all_ranks: bool) -> str | None:
    """The file this rank writes, or None if it writes none."""
    if "{rank}" in path:
        return path.replace("{rank}", str(rank))
    if all_ranks:
        root, ext = os.path.splitext(path)
        return f"{root}.rank{rank}{ext}"
    return path if rank == 0 else None


class DecisionLog:
    """Append-only JSON-lines writer; ``DecisionLog(None)`` writes nothing."""

    def __init__(self, path: str | None):
        self.path = path
        self._fh = None
        self._mode = "w"

    @classmethod
    def from_config(cls, config, rank: int) -> DecisionLog:
        if not config.log:
            return cls(None)
        return cls(log_path(config.log, rank, config.log_all_ranks))

    @property
    def writes(self) -> bool:
        """Whether :meth:`write` keeps its records (callers skip building them otherwise)."""
        return self.path is not None

    def resume(self) -> None:
        """After a restore from a checkpoint, continue the existing file instead of truncating."""
        if self._fh is None:
            self._mode = "a"

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        if self._fh is None:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._fh = open(self.path, self._mode, encoding="utf-8", buffering=1)
        self._fh.write(json.dumps({**record, "time": round(time.time(), 6)}) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._mode = "a"


def read_log(path: str) -> list:
    """Read a decision log back as a list of dicts."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
