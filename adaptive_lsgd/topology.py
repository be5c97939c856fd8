"""Hierarchy levels, blocks, and the collective stages of a sync at each level.

A topology is a chain of partitions of the ranks, finest first: level 0 groups the workers
of one host, each higher level merges blocks, and the top level is all ranks. Levels whose
partition equals the one below (or that only hold single ranks) collapse away, so one host
is a single level.

By default a sync at level ``l`` is one allreduce over the level-``l`` block, so each rank
belongs to one process set per level. With ``chained=True`` (config
``chained_allreduce: true``) it is a hierarchical allreduce, in one of two forms:

- *sliced* (when every link of a level has the same number of ranks, e.g. every host runs
  the same number of workers): a reduce-scatter inside each level-0 block leaves each rank
  the block's sum of one slice of the model; the ranks holding the same slice (one per
  block: the level-1 link) reduce-scatter again, ... up to level ``l``, where the slices are
  allreduced; allgathers carry the result back down. Every rank takes part in every stage,
  so all ranks issue the same number of collectives, and every rank's link carries a share
  of the slow traffic (the bandwidth-optimal hierarchical allreduce).
- *leaders* (blocks of different sizes): a sum inside each level-0 block, then among the
  block leaders (lowest rank) inside each level-1 block, ... up to level ``l``, then the
  result travels back down (a sum where only the leader contributes). Leaders issue more
  collectives than the other ranks.

The *link* of level ``j`` is the set of ranks that take part in the level-``j`` stage: the
block itself at level 0; above it the ranks holding the same slice (sliced) or the leaders of
the sub-blocks (leaders).

Example::

    >>> from adaptive_lsgd.topology import Topology
    >>> topo = Topology.from_spec("2x2", size=4)
    >>> topo.num_levels, topo.blocks(0), topo.links(1)
    (2, [(0, 1), (2, 3)], [(0, 1, 2, 3)])
    >>> [(s.ranks, s.kind) for s in topo.stages(level=1, rank=2)]
    [((0, 1, 2, 3), 'allreduce')]
    >>> chained = Topology.from_config("2x2", ["h"] * 4, chained=True)
    >>> chained.sliced, chained.links(1)
    (True, [(0, 2), (1, 3)])
    >>> [(s.ranks, s.kind) for s in chained.stages(level=1, rank=3)]
    [((2, 3), 'reducescatter'), ((1, 3), 'allreduce'), ((2, 3), 'allgather')]
    >>> leaders = Topology.from_config("hosts", ["a", "a", "b"], chained=True)
    >>> leaders.sliced, leaders.links(1)
    (False, [(0, 2)])
    >>> [(s.ranks, s.kind) for s in leaders.stages(level=1, rank=1)]
    [((0, 1), 'reduce'), ((0, 1), 'broadcast')]
    >>> Topology.from_hosts(["a", "a", "a"]).num_levels
    1
    >>> auto = Topology.from_config("2x2", ["h"] * 4, chained="auto")   # plain, may switch
    >>> auto.chained, auto.alternative.sliced, round(auto.link_ratio(1), 3)
    (False, True, 0.667)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


class TopologyError(ValueError):
    """The requested hierarchy is impossible for this job (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One collective of a sync, from one rank's point of view.

    ``kind`` is ``allreduce`` (the top stage of the sync); with the leaders' chained sync
    ``reduce`` (a sum going up) or ``broadcast`` (a sum in which only ``root`` contributes,
    carrying the result down); with the sliced one ``reducescatter`` (a sum going up, each
    rank keeping its slice, in link order) or ``allgather`` (the slices going back down).
    """

    link_level: int
    ranks: tuple
    kind: str
    root: int


class Topology:
    """Partitions of ``range(size)``, finest first, the last one being all ranks."""

    def __init__(self, partitions: Sequence[Sequence[Sequence[int]]], size: int,
                 chained: bool = False, sliced: bool | None = None):
        self.size = size
        self.chained = chained
        parts = [_normalise(p, size) for p in partitions]
        everyone = [tuple(range(size))]
        if not parts or parts[-1] != everyone:
            parts.append(everyone)
        for lower, upper in zip(parts, parts[1:]):
            owner = {r: i for i, b in enumerate(upper) for r in b}
            for block in lower:
                if len({owner[r] for r in block}) != 1:
                    raise TopologyError(f"block {list(block)} is split across higher-level blocks; "
                                        f"each level must merge whole blocks of the level below")
        collapsed = []
        for p in parts:
            if all(len(b) == 1 for b in p) and p != everyone:
                continue  # single-rank blocks: nothing to average at this level
            if collapsed and collapsed[-1] == p:
                continue
            collapsed.append(p)
        self._partitions = collapsed
        # chained: sliced where the slices line up (sliced=None), or as asked (True/False)
        sliced_links = self._sliced_links() if chained and sliced is not False else None
        if sliced and sliced_links is None:
            raise TopologyError("the sliced chained allreduce needs every link of a level to have "
                                f"the same number of ranks; the blocks are {self.blocks_all()}")
        self.sliced = sliced_links is not None
        self._links = sliced_links or [self._make_links(lvl) for lvl in range(len(collapsed))]
        # rank -> its block / link per level: O(1) lookups on every sync, even at 10^4 ranks.
        self._block_index = [{r: b for b in p for r in b} for p in collapsed]
        self._link_index = [{r: link for link in links for r in link} for links in self._links]
        self._stage_cache: dict = {}
        self._array_cache: dict = {}
        self.hosts: list | None = None  # each rank's host name, when known (from_config)
        # chained_allreduce: auto: the sliced chained form of the same blocks, which the
        # scheduler may switch to (None: no alternative); its links are process sets too
        self.alternative: Topology | None = None

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def flat(cls, size: int) -> Topology:
        _check_size(size)
        return cls([], size)

    @classmethod
    def from_hosts(cls, hosts: Sequence[str]) -> Topology:
        """One block per distinct host name; ``hosts[r]`` is rank r's host."""
        size = len(hosts)
        _check_size(size)
        order: dict = {}
        for r, h in enumerate(hosts):
            order.setdefault(h, []).append(r)
        return cls([list(order.values())], size)

    @classmethod
    def from_spec(cls, spec, size: int) -> Topology:
        """``"auto"``/``"flat"``/``"hosts"`` (flat: no host names here), a shape ``"AxB"`` (A
        blocks of B workers, ``"AxBxC"`` deeper), or an explicit list of level-0 blocks such as
        ``[[0, 1], [2, 3]]``."""
        _check_size(size)
        if spec in (None, "flat", "auto", "hosts"):  # no host names here: one block
            return cls.flat(size)
        if isinstance(spec, str):
            try:
                dims = [int(x) for x in spec.lower().split("x")]
            except ValueError:
                raise TopologyError(f"topology {spec!r}: expected a shape like '2x2'") from None
            if any(d < 1 for d in dims):
                raise TopologyError(f"topology {spec!r}: every dimension must be at least 1")
            prod = 1
            for d in dims:
                prod *= d
            if prod != size:
                raise TopologyError(f"topology {spec!r} describes {prod} workers but the job has "
                                    f"{size}; the dimensions must multiply to the number of ranks")
            partitions = []
            block = 1
            for d in reversed(dims[1:]):
                block *= d
                partitions.append([list(range(s, s + block)) for s in range(0, size, block)])
            return cls(partitions, size)
        return cls([spec], size)

    @classmethod
    def from_config(cls, spec, hosts: Sequence[str], chained: bool = False,
                    elastic: bool = False, sliced: bool | None = None) -> Topology:
        """What integrations call: ``spec`` is the ``topology`` config key, ``hosts`` every
        rank's host name (allgathered at start), ``chained`` the ``chained_allreduce`` key
        (``True``: sliced where the links allow, else leaders; or ``"sliced"``/``"leaders"``;
        ``"auto"``: the plain topology, whose :attr:`alternative` is the sliced chained form
        when one exists: several levels, links of equal size, not elastic).
        ``"hosts"`` makes one block per host;
        ``"auto"`` does too, except in an elastic job (``elastic``), where it is flat: with
        Horovod 0.28.1 and Gloo a worker failure aborts elastic jobs that use process sets
        (horovod#4021), and fault tolerance is why a job is elastic.

        >>> Topology.from_config("auto", ["a", "a", "b", "b"]).blocks(0)
        [(0, 1), (2, 3)]
        >>> Topology.from_config("auto", ["a", "a", "b", "b"], elastic=True).num_levels
        1
        """
        if chained in ("sliced", "leaders"):
            chained, sliced = True, chained == "sliced"
        if spec == "hosts" or (spec == "auto" and not elastic):
            topo = cls.from_hosts(hosts)
        else:
            topo = cls.from_spec(spec, len(hosts))
        if chained == "auto":  # the plain form, with the sliced one as its alternative
            if not elastic and topo.num_levels > 1:
                alt = cls(topo.blocks_all(), topo.size, chained=True)
                if alt.sliced:
                    alt.hosts = list(hosts)
                    topo.alternative = alt
        elif chained:
            topo = cls(topo.blocks_all(), topo.size, chained=True, sliced=sliced)
        topo.hosts = list(hosts)
        return topo

    def blocks_all(self) -> list:
        """Every level's partition, finest first."""
        return [list(p) for p in self._partitions]

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self._partitions)

    def blocks(self, level: int) -> list:
        """The blocks (rank tuples) of ``level``; the top level is one block of all ranks."""
        return list(self._partitions[level])

    def block_of(self, level: int, rank: int) -> tuple:
        try:
            return self._block_index[level][rank]
        except KeyError:
            raise TopologyError(f"rank {rank} is not in the topology of {self.size} ranks") from None

    def links(self, level: int) -> list:
        """The rank sets whose allreduce forms the level-``level`` stage of a sync."""
        return list(self._links[level])

    def link_of(self, level: int, rank: int):
        return self._link_index[level].get(rank)

    def link_arrays(self, level: int):
        """The level's links of two or more ranks as flat arrays ``(members, starts)`` (for
        ``np.minimum.reduceat``), or None when it has none; cached."""
        if level not in self._array_cache:
            links = [link for link in self._links[level] if len(link) > 1]
            arrays = None
            if links:
                sizes = np.array([len(link) for link in links], dtype=np.int64)
                members = np.concatenate([np.asarray(link, dtype=np.int64) for link in links])
                starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
                arrays = (members, starts)
            self._array_cache[level] = arrays
        return self._array_cache[level]

    def process_sets(self) -> list:
        """Every distinct rank tuple a collective runs over, in one order for all ranks."""
        seen = []
        forms = [self] if self.alternative is None else [self, self.alternative]
        for form in forms:
            for links in form._links:
                for link in links:
                    if len(link) > 1 and link not in seen:
                        seen.append(link)
        return seen

    def link_ratio(self, level: int) -> float:
        """The alternative (sliced) form's level-``level`` allreduce time over this form's, as
        ring allreduces predict it where the links between blocks are the bottleneck: a slice
        of ``1/k`` of the model over ``n`` ranks, ``k`` of them at once through one block's
        link, against the whole model over the ``m`` ranks of the block: ``((n - 1) / n) /
        ((m - 1) / m)`` (2 hosts x 2 workers: 0.667; 4 x 4: 0.8)."""
        alt = self.alternative
        if alt is None or level == 0:
            return 1.0
        n, m = alt.link_ranks(level), self.link_ranks(level)
        return ((n - 1) / n) / ((m - 1) / m) if n > 1 and m > 1 else 1.0

    def stages(self, level: int, rank: int) -> list:
        """The collectives ``rank`` takes part in, in order, for a sync at ``level``."""
        key = (level, rank)
        if key not in self._stage_cache and not self.chained:
            block = self.block_of(level, rank)
            self._stage_cache[key] = [Stage(level, block, "allreduce", min(block))] if len(block) > 1 else []
        if key not in self._stage_cache:
            up_kind, down_kind = ("reducescatter", "allgather") if self.sliced else ("reduce", "broadcast")
            up, top = [], []
            for j in range(level + 1):
                link = self.link_of(j, rank)
                if link is None or len(link) == 1:
                    continue
                stage = Stage(j, link, "allreduce" if j == level else up_kind, min(link))
                (top if j == level else up).append(stage)
            down = [Stage(s.link_level, s.ranks, down_kind, s.root) for s in reversed(up)]
            self._stage_cache[key] = up + top + down
        return self._stage_cache[key]

    def spans_hosts(self) -> list | None:
        """Per level, whether some link of it joins ranks of different hosts (None if the host
        names are unknown): what a tuning profile's ``intra``/``inter`` fits are matched by."""
        if self.hosts is None:
            return None
        return [any(len({self.hosts[r] for r in link}) > 1 for link in self._links[lvl])
                for lvl in range(self.num_levels)]

    def model_share(self, level: int) -> float:
        """The share of the model one link of ``level`` carries in a chained sync: a slice
        with the sliced form (1 / the ranks of the links below), else all of it."""
        if not self.sliced:
            return 1.0
        return 1.0 / float(np.prod([self.link_ranks(j) for j in range(level)]))

    def link_ranks(self, level: int) -> int:
        """Ranks in the largest link of ``level`` (what one allreduce of that level spans)."""
        return max(len(link) for link in self._links[level])

    def describe(self) -> dict:
        return {"size": self.size, "levels": [[list(b) for b in p] for p in self._partitions]}

    def __repr__(self) -> str:
        return f"Topology({self.describe()['levels']})"

    def _sliced_links(self) -> list | None:
        """The links of the sliced chained sync, or None when some level's links differ in
        size (then the slices would not line up: the leaders' form is used).

        Level 0's links are its blocks; a rank's *slice key* is its position in each link
        below; the level-``j`` link joins the ranks of one level-``j`` block with the same key."""
        parts = self._partitions
        links = [list(parts[0])]
        key = {r: () for r in range(self.size)}
        for lvl in range(1, len(parts)):
            if len({len(link) for link in links[-1]}) != 1:
                return None
            for link in links[-1]:
                for pos, r in enumerate(link):
                    key[r] += (pos,)
            groups: dict = {}
            for b, block in enumerate(parts[lvl]):
                for r in block:
                    groups.setdefault((b, key[r]), []).append(r)
            links.append(sorted(tuple(sorted(g)) for g in groups.values()))
        return links

    def _make_links(self, level: int) -> list:
        if level == 0 or not self.chained:
            return list(self._partitions[level])
        links = []
        for block in self._partitions[level]:
            members = set(block)
            leaders = sorted(min(b) for b in self._partitions[level - 1] if b[0] in members)
            links.append(tuple(leaders))
        return links


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise TopologyError(f"the number of ranks must be a positive integer, got {size!r}")


def _normalise(partition, size: int) -> list:
    seen: dict = {}
    blocks = []
    for block in partition:
        block = tuple(sorted(int(r) for r in block))
        if not block:
            raise TopologyError("a block is empty; every block needs at least one rank")
        for r in block:
            if r < 0 or r >= size:
                raise TopologyError(f"rank {r} in block {list(block)} is out of range: "
                                    f"ranks are 0..{size - 1}")
            if r in seen:
                raise TopologyError(f"rank {r} is in two blocks ({list(seen[r])} and {list(block)})")
            seen[r] = block
        blocks.append(block)
    missing = sorted(set(range(size)) - set(seen))
    if missing:
        raise TopologyError(f"ranks {missing} are in no block; the blocks must cover all "
                            f"{size} ranks")
    return sorted(blocks)
