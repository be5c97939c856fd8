"""The outer optimizer (DiLoCo / SlowMo) and compressed global syncs, in the core protocol: exact
against a reference computed here, the same on every rank under timing noise, resumed exactly."""

import numpy as np
import pytest
from fake_collective import FakeCluster

from adaptive_lsgd import Topology, load_config
from adaptive_lsgd.config import ConfigError
from adaptive_lsgd.outer import OuterState, wire_factor
from adaptive_lsgd.sync import NumpyBackend, decode_wire, encode_wire

DIM = 7


def cfg(**kw):
    return load_config(kw, env={})


def _local_step(models, rng, step):
    """Every rank moves towards its own target, with noise: models drift apart."""
    for r, x in enumerate(models):
        x -= 0.1 * (x - (r + 1.0)) + 0.01 * rng.standard_normal(DIM)


def _reference_outer(prev, buf, avg, kind, lr, mu):
    """PyTorch's SGD rule on the pseudo-gradient prev - avg (written out here)."""
    g = prev - avg
    if mu > 0:
        buf = g.copy() if buf is None else mu * buf + g
        update = g + mu * buf if kind == "nesterov" else buf
    else:
        update = g
    return prev - lr * update, buf


def _run(config, topo, steps=24, seed=0, noise=None):
    """Drive a fake job and a reference side by side; returns (cluster, reference models)."""
    rng = np.random.default_rng(seed)
    models = [np.linspace(-1, 1, DIM) for _ in range(topo.size)]
    cluster = FakeCluster(config, topo, models=models, param_len=DIM)
    ref = [m.copy() for m in cluster.models]
    prev, buf = None, None
    noise_rng = np.random.default_rng(seed + 1)
    for step in range(steps):
        local_rng_state = rng.bit_generator.state
        _local_step(cluster.models, rng, step)
        rng.bit_generator.state = local_rng_state
        _local_step(ref, rng, step)
        compute = 0.01 * (1 + (noise or 0) * noise_rng.random(topo.size))
        results = cluster.step_all(list(compute))
        if results is None:
            continue
        level = cluster.syncs[-1][1]
        if level < topo.num_levels - 1:
            for block in topo.blocks(level):
                mean = np.mean([ref[r] for r in block], axis=0)
                for r in block:
                    ref[r] = mean.copy()
            continue
        avg = np.mean(ref, axis=0)
        c = config
        if prev is None or c.outer_optimizer == "none":
            new = avg
        else:
            new, buf = _reference_outer(prev, buf, avg, c.outer_optimizer, c.outer_lr,
                                        c.outer_momentum)
        prev = new.copy()
        ref = [new.copy() for _ in ref]
    return cluster, ref


@pytest.mark.parametrize("spec,chained,periods", [("flat", False, [2]), ("2x2", False, [2, 3]),
                                                  ("2x2", "sliced", [2, 2]),
                                                  ("2x2", "leaders", [1, 3])])
@pytest.mark.parametrize("kind", ["nesterov", "sgd"])
def test_outer_step_matches_the_reference(spec, chained, periods, kind):
    topo = Topology.from_config(spec, ["a", "a", "b", "b"], chained=chained)
    config = cfg(policy="fixed", periods=periods, outer_optimizer=kind, outer_lr=0.7,
                 outer_momentum=0.9)
    cluster, ref = _run(config, topo)
    assert sum(1 for _, lvl, _ in cluster.syncs if lvl == topo.num_levels - 1) >= 3
    for r in range(4):
        np.testing.assert_allclose(cluster.models[r], ref[r], rtol=1e-12, atol=1e-12)
    assert cluster.scheds[0].outer.steps >= 2


@pytest.mark.parametrize("kind", ["nesterov", "sgd"])
def test_outer_momentum_follows_the_inner_lr_as_slowmo(kind):
    """Step decays of the inner LR (0.1 -> 0.01 -> 0.001): the outer step equals SlowMo's
    (Wang et al. 2020) written out here, momentum in gradient units ``u <- mu u + g / lr`` and
    a step of ``outer_lr * lr * update``; under a constant LR it is the plain rule above."""
    topo = Topology.flat(4)
    config = cfg(policy="fixed", periods=[3], outer_optimizer=kind, outer_lr=0.7,
                 outer_momentum=0.9)
    rng = np.random.default_rng(11)
    cluster = FakeCluster(config, topo, models=[np.linspace(-1, 1, DIM) for _ in range(4)],
                          param_len=DIM)
    blind = FakeCluster(config, topo, models=[m.copy() for m in cluster.models], param_len=DIM)
    ref = [m.copy() for m in cluster.models]
    prev, u, lrs_seen = None, None, []
    for step in range(60):
        lr = 0.1 if step < 20 else 0.01 if step < 40 else 0.001
        state = rng.bit_generator.state
        for models in (cluster.models, blind.models, ref):
            rng.bit_generator.state = state
            _local_step(models, rng, step)
        blind.step_all(0.01)  # no LR reported: the momentum keeps its size
        if cluster.step_all(0.01, lr=lr) is None:
            continue
        lr32 = float(np.float32(lr))  # the LR travels in the float32 table
        lrs_seen.append(lr)
        avg = np.mean(ref, axis=0)
        if prev is None:
            new = avg
        else:
            g = (prev - avg) / lr32
            u = g.copy() if u is None else 0.9 * u + g
            new = prev - 0.7 * lr32 * (g + 0.9 * u if kind == "nesterov" else u)
        prev = new.copy()
        ref = [new.copy() for _ in ref]
    assert {0.1, 0.01, 0.001} <= set(lrs_seen)
    for r in range(4):
        np.testing.assert_allclose(cluster.models[r], ref[r], rtol=1e-9, atol=1e-12)
    assert cluster.scheds[0].outer.inner_lr == pytest.approx(0.001)
    # and it matters: with the LR unknown the momentum of the fast phase lingers
    assert blind.scheds[0].outer.inner_lr is None
    assert not np.allclose(blind.models[0], cluster.models[0])


def test_outer_lr_one_without_momentum_is_plain_averaging():
    topo = Topology.flat(2)
    plain, _ = _run(cfg(policy="fixed", periods=[3]), topo, steps=12)
    outer, _ = _run(cfg(policy="fixed", periods=[3], outer_optimizer="sgd", outer_lr=1.0,
                        outer_momentum=0.0), topo, steps=12)
    for a, b in zip(plain.models, outer.models):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert outer.scheds[0].outer.steps == 3  # 4 global syncs: the first one sets prev


def test_outer_changes_the_result_and_every_rank_holds_the_same_state():
    topo = Topology.flat(4)
    plain, _ = _run(cfg(policy="fixed", periods=[4]), topo)
    outer, _ = _run(cfg(policy="fixed", periods=[4], outer_optimizer="nesterov"), topo)
    assert not np.allclose(plain.models[0], outer.models[0])
    states = [s.outer for s in outer.scheds]
    for st in states[1:]:
        assert st.steps == states[0].steps
        for a, b in zip(st.prev + st.buf, states[0].prev + states[0].buf):
            assert np.array_equal(a, b)


def _wire_round(x, kind):
    return decode_wire(encode_wire(np.asarray(x, dtype=np.float32), kind), kind).astype(np.float64)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_compressed_sync_matches_the_reference_and_sends_half(kind):
    """Each rank sends x - prev rounded to the wire format; the parts are summed in float32
    in rank order and rounded again; the result is prev + sum / total."""
    topo = Topology.flat(4)
    config = cfg(policy="fixed", periods=[3], compression=kind)
    rng = np.random.default_rng(3)
    cluster = FakeCluster(config, topo, models=[np.linspace(-1, 1, DIM)] * 4, param_len=DIM)
    sent = []
    original = cluster.sync

    def sync(plans, healthy=None):
        before = [m.copy() for m in cluster.models]
        out = original(plans, healthy)
        sent.append(before)
        return out

    cluster.sync = sync
    prev = None
    for _ in range(12):
        _local_step(cluster.models, rng, 0)
        want = None
        if prev is not None:
            deltas = [_wire_round(m - prev, kind) for m in cluster.models]
            total = np.zeros(DIM, dtype=np.float32)
            for d in deltas:
                total = total + d.astype(np.float32)
            want = prev + _wire_round(total, kind) / 4
        plain_avg = np.mean(cluster.models, axis=0)
        if cluster.step_all(0.01) is None:
            continue
        if want is None:  # the first global sync: plain averaging
            np.testing.assert_allclose(cluster.models[0], plain_avg, rtol=1e-14)
        else:
            np.testing.assert_allclose(cluster.models[0], want, rtol=1e-12, atol=1e-15)
            # close to the exact average (the rounding is in the update only)
            np.testing.assert_allclose(cluster.models[0], plain_avg, atol=5e-3)
        prev = cluster.models[0].copy()
        assert all(np.array_equal(m, cluster.models[0]) for m in cluster.models)
    assert len(sent) == 4
    assert wire_factor(config) == 0.5


def test_wire_codec_rounds_as_torch_does():
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 10.0 ** \
        np.random.default_rng(1).integers(-8, 8, 10_000)
    values = values.astype(np.float32)
    for kind, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        ours = encode_wire(values, kind)
        theirs = torch.from_numpy(values).to(dtype).view(torch.int16).numpy()
        assert np.array_equal(ours, theirs), kind
        np.testing.assert_array_equal(decode_wire(ours, kind),
                                      torch.from_numpy(theirs).view(dtype).float().numpy())


def test_compressed_hierarchical_syncs_agree_under_timing_noise():
    """Adaptive policy, 2x2 with the sliced chained sync, bf16 and Nesterov: every rank takes
    the same decisions and holds the same model after each global sync, with per-rank noise
    in every measured time."""
    topo = Topology.from_config("2x2", ["a", "a", "b", "b"], chained="sliced")
    config = cfg(outer_optimizer="nesterov", compression="bf16", window=4, timing_warmup=0,
                 target_comm_fraction=0.1)
    rng = np.random.default_rng(5)
    noise = np.random.default_rng(6)
    cluster = FakeCluster(config, topo, models=[np.linspace(-1, 1, DIM)] * 4, param_len=DIM,
                          stage_time=lambda r, st, p: 0.05 * (1 + noise.random()))
    globals_seen = 0
    for _ in range(300):
        _local_step(cluster.models, rng, 0)
        res = cluster.step_all(list(0.01 * (1 + noise.random(4))))
        if res is not None and cluster.syncs[-1][1] == 1:
            globals_seen += 1
            assert len({s.periods for s in cluster.scheds}) == 1
            assert all(np.array_equal(m, cluster.models[0]) for m in cluster.models)
    assert globals_seen >= 3
    assert len({tuple(r["periods"]) for r in cluster.records(0) if "periods" in r}) >= 1
    assert cluster.scheds[0].outer.steps == globals_seen - 1


def test_resume_continues_exactly():
    """A scheduler and outer state saved mid-run and loaded into fresh ranks continue as the
    uninterrupted run does, to the bit."""
    topo = Topology.flat(2)
    config = cfg(policy="fixed", periods=[2], outer_optimizer="nesterov", compression="bf16")
    rng = np.random.default_rng(9)
    whole = FakeCluster(config, topo, models=[np.zeros(DIM)] * 2, param_len=DIM)
    part = FakeCluster(config, topo, models=[np.zeros(DIM)] * 2, param_len=DIM)
    steps = [rng.standard_normal((2, DIM)) * 0.1 for _ in range(16)]
    for k, d in enumerate(steps):
        for c in (whole, part):
            for r in range(2):
                c.models[r] += d[r]
            c.step_all(0.01)
        if k == 6:  # save after 2 outer steps... and rebuild `part` from the saved state
            saved = [(s.state_dict(), {key: (None if v is None else [b.copy() for b in v])
                                       if key != "steps" else v
                                       for key, v in s.outer.state_dict().items()})
                     for s in part.scheds]
            models = [m.copy() for m in part.models]
            part = FakeCluster(config, topo, models=models, param_len=DIM)
            for s, (state, outer) in zip(part.scheds, saved):
                s.load_state_dict(state)
                s.outer.load_state_dict(outer)
    for a, b in zip(whole.models, part.models):
        assert np.array_equal(a, b)
    assert whole.scheds[0].outer.steps == part.scheds[0].outer.steps == 7


def test_config_refuses_overlap_with_compression_and_bad_values():
    with pytest.raises(ConfigError, match="compression: none or overlap: false"):
        cfg(overlap=True, compression="bf16")
    with pytest.raises(ConfigError, match="outer_optimizer.*nesterov"):
        cfg(outer_optimizer="adam")
    with pytest.raises(ConfigError, match="outer_momentum"):
        cfg(outer_momentum=1.0)
    with pytest.raises(ConfigError, match="compression.*bf16"):
        cfg(compression="int4")


def test_overlap_auto_is_not_offered_with_compression():
    from adaptive_lsgd import Scheduler
    s = Scheduler(cfg(compression="fp16"), Topology.flat(2), 0, can_overlap=True)
    assert not s.can_overlap
    assert Scheduler(cfg(), Topology.flat(2), 0, can_overlap=True).can_overlap


def test_outer_state_example_from_rank0_restarts_reference():
    state = OuterState(cfg(outer_optimizer="nesterov"))
    backend = NumpyBackend()
    state.advance(backend, [np.ones(2)])
    assert state.ready and state.steps == 0
    state.clear()
    assert not state.ready
