"""Topology: levels, blocks, links, stages, collapse and errors."""

import pytest

from adaptive_lsgd import load_config
from adaptive_lsgd.topology import Stage, Topology, TopologyError


def chained(spec, size):
    """The leaders' chained (hierarchical) allreduce: config ``chained_allreduce: true`` where
    the blocks differ in size."""
    return Topology.from_config(spec, ["h"] * size, chained=True, sliced=False)


def sliced(spec, size):
    """The sliced chained allreduce: config ``chained_allreduce: true`` where the links of
    each level have equal sizes."""
    topo = Topology.from_config(spec, ["h"] * size, chained=True)
    assert topo.sliced
    return topo


def kinds(topo, level, rank):
    return [(s.kind, s.link_level, s.ranks, s.root) for s in topo.stages(level, rank)]


def test_spec_2x2():
    topo = chained("2x2", 4)
    assert topo.num_levels == 2 and topo.size == 4
    assert topo.blocks(0) == [(0, 1), (2, 3)]
    assert topo.blocks(1) == [(0, 1, 2, 3)]
    assert topo.links(0) == [(0, 1), (2, 3)]
    assert topo.links(1) == [(0, 2)]
    assert topo.block_of(0, 3) == (2, 3) and topo.block_of(1, 3) == (0, 1, 2, 3)
    assert topo.link_of(1, 2) == (0, 2) and topo.link_of(1, 3) is None
    # A level-0 sync is one allreduce inside the block.
    assert kinds(topo, 0, 3) == [("allreduce", 0, (2, 3), 2)]
    # A global sync: reduce in the block, allreduce among leaders, broadcast back down.
    assert kinds(topo, 1, 2) == [("reduce", 0, (2, 3), 2), ("allreduce", 1, (0, 2), 0),
                                 ("broadcast", 0, (2, 3), 2)]
    # A non-leader takes no part in the leaders' allreduce.
    assert kinds(topo, 1, 3) == [("reduce", 0, (2, 3), 2), ("broadcast", 0, (2, 3), 2)]
    assert all(isinstance(s, Stage) for s in topo.stages(1, 0))
    assert topo.process_sets() == [(0, 1), (2, 3), (0, 2)]
    assert topo.describe() == {"size": 4, "levels": [[[0, 1], [2, 3]], [[0, 1, 2, 3]]]}
    assert "Topology(" in repr(topo)


def test_sliced_2x2_every_rank_takes_part_in_every_stage():
    topo = sliced("2x2", 4)
    assert topo.links(0) == [(0, 1), (2, 3)]
    assert topo.links(1) == [(0, 2), (1, 3)]  # the ranks holding the same slice
    assert kinds(topo, 0, 3) == [("allreduce", 0, (2, 3), 2)]
    assert kinds(topo, 1, 2) == [("reducescatter", 0, (2, 3), 2), ("allreduce", 1, (0, 2), 0),
                                 ("allgather", 0, (2, 3), 2)]
    assert kinds(topo, 1, 3) == [("reducescatter", 0, (2, 3), 2), ("allreduce", 1, (1, 3), 1),
                                 ("allgather", 0, (2, 3), 2)]
    assert topo.process_sets() == [(0, 1), (2, 3), (0, 2), (1, 3)]
    assert topo.model_share(0) == 1.0 and topo.model_share(1) == 0.5
    assert not chained("2x2", 4).sliced and chained("2x2", 4).model_share(1) == 1.0


def test_sliced_3_levels_key_on_the_position_in_every_link_below():
    topo = sliced("2x2x2", 8)
    assert topo.links(1) == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert topo.links(2) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert kinds(topo, 2, 7) == [("reducescatter", 0, (6, 7), 6), ("reducescatter", 1, (5, 7), 5),
                                 ("allreduce", 2, (3, 7), 3), ("allgather", 1, (5, 7), 5),
                                 ("allgather", 0, (6, 7), 6)]
    assert kinds(topo, 1, 7) == [("reducescatter", 0, (6, 7), 6), ("allreduce", 1, (5, 7), 5),
                                 ("allgather", 0, (6, 7), 6)]
    assert [topo.model_share(lvl) for lvl in range(3)] == [1.0, 0.5, 0.25]
    # every rank runs as many collectives as any other, at every level
    for level in range(3):
        assert len({len(topo.stages(level, r)) for r in range(8)}) == 1


def test_sliced_needs_links_of_one_size():
    assert not Topology.from_config([[0, 1, 2], [3, 4]], ["h"] * 5, chained=True).sliced
    hosts = ["a", "a", "b", "b", "c"]  # the third host runs one worker
    assert not Topology.from_config("hosts", hosts, chained=True).sliced
    with pytest.raises(TopologyError, match="same number of ranks"):
        Topology.from_config("hosts", hosts, chained="sliced")  # the config asks for the form
    assert not Topology.from_config("2x2", ["h"] * 4, chained="leaders").sliced
    # non-contiguous blocks line up by position: rank 0 and 1 hold slice 0
    topo = Topology.from_config("hosts", ["a", "b", "a", "b"], chained=True)
    assert topo.sliced and topo.links(1) == [(0, 1), (2, 3)]


def test_spec_2x2x2():
    topo = chained("2x2x2", 8)
    assert topo.num_levels == 3
    assert topo.blocks(0) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert topo.blocks(1) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert topo.links(1) == [(0, 2), (4, 6)]
    assert topo.links(2) == [(0, 4)]
    assert kinds(topo, 2, 4) == [("reduce", 0, (4, 5), 4), ("reduce", 1, (4, 6), 4),
                                 ("allreduce", 2, (0, 4), 0), ("broadcast", 1, (4, 6), 4),
                                 ("broadcast", 0, (4, 5), 4)]
    assert kinds(topo, 2, 6) == [("reduce", 0, (6, 7), 6), ("reduce", 1, (4, 6), 4),
                                 ("broadcast", 1, (4, 6), 4), ("broadcast", 0, (6, 7), 6)]
    assert kinds(topo, 2, 7) == [("reduce", 0, (6, 7), 6), ("broadcast", 0, (6, 7), 6)]
    assert kinds(topo, 1, 6) == [("reduce", 0, (6, 7), 6), ("allreduce", 1, (4, 6), 4),
                                 ("broadcast", 0, (6, 7), 6)]


def test_explicit_blocks_may_be_uneven():
    topo = chained([[0, 1, 2], [3]], 4)
    assert topo.num_levels == 2
    assert topo.blocks(0) == [(0, 1, 2), (3,)]
    assert topo.links(1) == [(0, 3)]
    assert kinds(topo, 1, 3) == [("allreduce", 1, (0, 3), 0)]  # a block of one: no reduce
    assert kinds(topo, 1, 1) == [("reduce", 0, (0, 1, 2), 0), ("broadcast", 0, (0, 1, 2), 0)]


def test_explicit_blocks_are_sorted():
    topo = Topology.from_spec([[3, 2], [1, 0]], 4)
    assert topo.blocks(0) == [(0, 1), (2, 3)]


def test_from_hosts():
    topo = Topology.from_hosts(["a", "b", "a", "b"])
    assert topo.blocks(0) == [(0, 2), (1, 3)]
    assert topo.links(1) == [(0, 1, 2, 3)]
    assert Topology(topo.blocks_all(), 4, chained=True, sliced=False).links(1) == [(0, 1)]
    assert Topology.from_config("auto", ["x", "x", "y", "y"]).blocks(0) == [(0, 1), (2, 3)]
    assert Topology.from_config("2x2", ["x", "x", "x", "x"]).blocks(0) == [(0, 1), (2, 3)]
    assert Topology.from_config("flat", ["x", "y"]).num_levels == 1


def test_auto_is_flat_in_elastic_jobs_and_hosts_is_not():
    hosts = ["x", "x", "y", "y"]
    assert Topology.from_config("auto", hosts, elastic=True).num_levels == 1
    assert Topology.from_config("hosts", hosts, elastic=True).blocks(0) == [(0, 1), (2, 3)]
    assert Topology.from_config("hosts", hosts).blocks(0) == [(0, 1), (2, 3)]
    assert Topology.from_config("2x2", hosts, elastic=True).blocks(0) == [(0, 1), (2, 3)]
    assert load_config({"topology": "hosts"}, env={}).topology == "hosts"


@pytest.mark.parametrize("make, levels", [
    (lambda: Topology.from_spec("1x4", 4), [[(0, 1, 2, 3)]]),
    (lambda: Topology.from_spec("4x1", 4), [[(0, 1, 2, 3)]]),
    (lambda: Topology.from_spec("2x1x2", 4), [[(0, 1), (2, 3)], [(0, 1, 2, 3)]]),
    (lambda: Topology.from_spec("1x2x2", 4), [[(0, 1), (2, 3)], [(0, 1, 2, 3)]]),
    (lambda: Topology.from_spec("1x1", 1), [[(0,)]]),
    (lambda: Topology.from_hosts(["a", "a", "a"]), [[(0, 1, 2)]]),
    (lambda: Topology.from_hosts(["a", "b", "c"]), [[(0, 1, 2)]]),
    (lambda: Topology.from_spec("auto", 3), [[(0, 1, 2)]]),
    (lambda: Topology.flat(2), [[(0, 1)]]),
])
def test_trivial_levels_collapse(make, levels):
    topo = make()
    assert topo.num_levels == len(levels)
    assert [topo.blocks(lvl) for lvl in range(topo.num_levels)] == levels


def test_single_rank_has_no_stages():
    topo = Topology.flat(1)
    assert topo.stages(0, 0) == []


@pytest.mark.parametrize("spec, size, match", [
    ("3x2", 4, "describes 6 workers but the job has 4"),
    ("2xa", 4, "expected a shape like '2x2'"),
    ("0x4", 4, "at least 1"),
    ([[0, 1], [1, 2, 3]], 4, r"rank 1 is in two blocks"),
    ([[0, 1], [2, 5]], 4, r"rank 5 in block \[2, 5\] is out of range: ranks are 0..3"),
    ([[0, -1], [2, 3]], 4, "out of range"),
    ([[0, 1], [2]], 4, r"ranks \[3\] are in no block"),
    ([[0, 1], [], [2, 3]], 4, "a block is empty"),
    ("2x2", 0, "positive integer"),
])
def test_errors(spec, size, match):
    with pytest.raises(TopologyError, match=match):
        Topology.from_spec(spec, size)


def test_levels_must_nest():
    with pytest.raises(TopologyError, match="split across higher-level blocks"):
        Topology([[[0, 1], [2, 3]], [[0, 2], [1, 3]]], 4)


def test_unknown_rank():
    with pytest.raises(TopologyError, match="rank 9 is not in the topology of 4 ranks"):
        Topology.from_spec("2x2", 4).block_of(0, 9)


def test_flat_size_must_be_positive():
    with pytest.raises(TopologyError):
        Topology.flat(0)
    with pytest.raises(TopologyError):
        Topology.from_hosts([])


def test_large_topology_is_fast():
    topo = chained("1250x8", 10000)
    assert topo.num_levels == 2 and len(topo.links(1)) == 1 and len(topo.links(1)[0]) == 1250
    assert topo.block_of(0, 9999) == tuple(range(9992, 10000))
    assert [s.kind for s in topo.stages(1, 9992)] == ["reduce", "allreduce", "broadcast"]
    topo = sliced("1250x8", 10000)
    assert len(topo.links(1)) == 8 and topo.link_of(1, 9999) == tuple(range(7, 10000, 8))
    assert [s.kind for s in topo.stages(1, 9999)] == ["reducescatter", "allreduce", "allgather"]


def test_link_arrays():
    topo = chained([[0, 1, 2], [3], [4, 5]], 6)
    members, starts = topo.link_arrays(0)
    assert members.tolist() == [0, 1, 2, 4, 5] and starts.tolist() == [0, 3]  # (3,) is left out
    members, starts = topo.link_arrays(1)
    assert members.tolist() == [0, 3, 4] and starts.tolist() == [0]
    assert Topology.flat(1).link_arrays(0) is None
    assert topo.link_arrays(0) is topo.link_arrays(0)  # cached


def test_default_sync_is_one_allreduce_per_level_block():
    """Default (non-chained): each sync is one allreduce over the level's block, so a rank is
    in one process set per level (Horovod 0.28.1 with Gloo hangs when a rank is in two
    non-global sets and global collectives interleave)."""
    topo = Topology.from_spec("2x2x2", 8)
    assert not topo.chained
    assert topo.links(1) == [(0, 1, 2, 3), (4, 5, 6, 7)] and topo.links(2) == [tuple(range(8))]
    assert kinds(topo, 0, 5) == [("allreduce", 0, (4, 5), 4)]
    assert kinds(topo, 1, 5) == [("allreduce", 1, (4, 5, 6, 7), 4)]
    assert kinds(topo, 2, 5) == [("allreduce", 2, tuple(range(8)), 0)]
    sets = topo.process_sets()
    assert all(sum(r in s for s in sets if len(s) < 8) <= 2 for r in range(8))
    assert Topology.from_spec([[0, 1, 2], [3]], 4).stages(0, 3) == []  # a block of one
