"""The scenarios of ``alsgd-bench`` and how one runs: its variants, the job on the emulated
cluster, the JSON document and the goals it checks.

Each scenario runs in one invocation on an :class:`~adaptive_lsgd.tools.cluster.EmulatedCluster`
(network namespaces, ``tc tbf`` links; needs root). All variants train their own copy of the
model in the same job, interleaved: in every round each variant runs one segment (a fixed number
of steps; time-budget variants: whole rounds until the slowest rank took that many), in an
order that rotates from round to round; samples/s is the median over rounds. Variants:

* ``compute-only``: the same training with no communication at all (the limit);
* ``horovod``: ``hvd.DistributedOptimizer``; ``horovod-accumulate``: the same with
  ``backward_passes_per_step=H`` (the large-batch alternative);
* ``local-hH``: our fixed-period local SGD (``hier-AxB``: fixed hierarchical periods);
* ``torch-peer``: PyTorch's ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager`` over
  ``torch.distributed`` (Gloo);
* ``adaptive``: our adaptive policy (periods chosen online); ``*-time-budget``: time-budget rounds;
  ``adaptive-overlap``: the same with ``overlap: true`` (each average runs in the background
  during the next round; a segment waits for the one in flight before it ends and is charged
  only the part of that wait the rest of the round would not have hidden).

``comm_fraction``: ours from the integration's summary (time in collectives / time; a run that
never left the mini-batch phase, and the ``overlap`` variants, like the others); the others
``1 - compute-only step time / step time``. ``global_syncs``: global synchronisations per rank
(a mini-batch step counts as one).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from adaptive_lsgd.config import Config
from adaptive_lsgd.tools.launch import SETTINGS_ENV

PROG = "alsgd-bench"


_NUM = {"type": "number", "minimum": 0}
SCHEMA = {
    "type": "object",
    "required": ["scenario", "date", "machine", "compute_only_samples_per_s", "results", "goals"],
    "properties": {
        "compute_only_samples_per_s": {"type": "number", "exclusiveMinimum": 0},
        "results": {"type": "object", "minProperties": 1, "additionalProperties": {
            "type": "object",
            "required": ["samples_per_s", "comm_fraction", "test_acc", "global_syncs"],
            "properties": {"samples_per_s": {"type": "number", "exclusiveMinimum": 0},
                           "comm_fraction": {"type": "number", "minimum": 0, "maximum": 1},
                           "test_acc": {"type": "number", "minimum": 0, "maximum": 1},
                           "global_syncs": {"type": "integer", "minimum": 0},
                           "rates": {"type": "array", "items": _NUM}}}},
        "goals": {"type": "array", "items": {"type": "object", "required": ["goal", "value", "met"]}},
    },
}
"""The JSON a scenario writes (checked before writing): the issue's schema plus details."""


def _v(name, kind, H=1, **kw) -> dict:
    return {"name": name, "kind": kind, "H": H, **kw}


def _ours(name, H=1, **config) -> dict:
    return _v(name, "alsgd", H, config=config)


def _standard(hs: list, ref: int, warmup: int = 0) -> list:
    """compute-only, horovod, horovod-accumulate, local-hH for H in hs, torch-peer, adaptive
    (the default config: no key set)."""
    out = [_v("compute-only", "compute"), _v("horovod", "horovod"),
           _v("horovod-accumulate", "horovod", ref)]
    out += [_ours(f"local-h{h}", h, policy="fixed", periods=[h], warmup=warmup, topology="flat",
                  time_budget=False, overlap=False)
            for h in hs]
    out += [_v("torch-peer", "peer", ref, warmup=warmup), _ours("adaptive", ref)]
    return out


PREVIOUS_DEFAULT = "adaptive-t05"


def _previous_default(ref: int) -> dict:
    """The default config as it was before ``target_comm_fraction`` went from 0.05 to 0.02
    (the same run shows what the change buys)."""
    return _ours(PREVIOUS_DEFAULT, ref, target_comm_fraction=0.05)


# Each scenario: cluster shape, model, data and the variants. rounds/steps: (full, quick).
SCENARIOS = {
    "overhead": dict(
        about="H=1 cost against hvd.DistributedOptimizer: 1 host x 2 workers, unshaped",
        hosts=1, workers=2, rate=None, model="mlp", width=512, batch=64, lr=0.01,
        rounds=(30, 16), steps=(100, 50),
        variants=_standard([1, 4], 4)[:3] + [
            _ours("local-h1", 1, policy="fixed", periods=[1]),
            _ours("alsgd-minibatch", 1, warmup=10**9),
            _ours("local-h4", 4, policy="fixed", periods=[4]),
            _v("torch-peer", "peer", 4), _ours("adaptive", 4)]),
    "comm-bound": dict(
        about="2 hosts x 1 worker, 100 Mbit/s links, 1.05M-parameter MLP (4.2 MB)",
        hosts=2, workers=1, rate=100, model="mlp", width=1000, batch=64, lr=0.05,
        rounds=(6, 3), steps=(128, 64),
        variants=_standard([4, 16, 64], 16) + [
            _ours("adaptive-overlap", 16, policy="adaptive", overlap=True),
            _previous_default(16)]),
    "changing-network": dict(
        about="2 hosts x 1 worker, 100 Mbit/s dropping to 10 Mbit/s half-way, 105k-parameter MLP, "
              "80 ms emulated device step",
        hosts=2, workers=1, rate=100, drop_to=10, model="mlp", width=300, batch=64, lr=0.05,
        compute_ms=80, rounds=(10, 6), steps=(64, 64),
        # local-h-start: fixed at the global period the default config chose in its first
        # segment (on the starting link), from its next segment on: "the fixed H chosen for
        # the starting link" of the goal, taken literally
        variants=_standard([4, 16, 64], 16) + [
            _v("local-h-start", "alsgd", 1, H_from="adaptive",
               config=dict(policy="fixed", warmup=0, topology="flat", time_budget=False,
                           overlap=False)),
            _previous_default(16)]),
    "hierarchical": dict(
        about="2 hosts x 2 workers: loopback inside a host, 50 Mbit/s between hosts, 1.05M-parameter "
              "MLP (4.2 MB), 20 ms emulated device step",
        hosts=2, workers=2, rate=50, model="mlp", width=1000, batch=64, lr=0.05, compute_ms=20,
        rounds=(12, 6), steps=(32, 32),
        # the fixed and chained variants average all ranks every 16 steps (adaptive-chained: at
        # most every 16 steps); adaptive is the default config (one block per host, its own
        # periods, the global period at most max_period = 64: local-h64 is flat at that period)
        variants=_standard([16, 64], 16) + [
            _ours("adaptive-chained", 16, topology="auto", chained_allreduce=True,
                  max_global_period=16),
            _ours("adaptive-leaders", 16, policy="adaptive", topology="auto",
                  chained_allreduce="leaders", max_global_period=16),
            _ours("hier-4x4", 16, policy="fixed", periods=[4, 4], topology="auto",
                  chained_allreduce=True),
            _ours("hier-4x4-allreduce", 16, policy="fixed", periods=[4, 4], topology="auto"),
            # the default with blocking averages (overlap: false): the chained sync instead
            _ours("adaptive-blocking", 16, overlap=False)]),
    "heterogeneous": dict(
        about="2 hosts x 1 worker, host 1 computes 2x slower, 1 Gbit/s, 105k-parameter MLP, "
              "40 ms emulated device step",
        hosts=2, workers=1, rate=1000, slowdown=[1.0, 2.0], model="mlp", width=300, batch=64,
        lr=0.05, compute_ms=40, rounds=(8, 4), steps=(64, 32),
        variants=_standard([8], 8) + [
            _ours("local-h8-time-budget", 8, policy="fixed", periods=[8], time_budget=True),
            _previous_default(8)]),
    "throttle": dict(
        about="2 hosts x 1 worker, 1 Gbit/s, 105k-parameter MLP, 40 ms emulated device step; host 1 "
              "computes 2x slower from half-way (a rank that throttles mid-run)",
        hosts=2, workers=1, rate=1000, slowdown=[1.0, 2.0], throttle_from=0.5, model="mlp",
        width=300, batch=64, lr=0.05, compute_ms=40, rounds=(8, 4), steps=(64, 32),
        variants=_standard([8, 32], 8) + [_previous_default(8)]),
    "accuracy": dict(
        about="MNIST-1D 1-D CNN, 4 hosts x 1 worker, 5 Mbit/s links, LR /10 at 50% and 75%, "
              "fixed number of samples; post-local variants switch after 5% of the steps",
        hosts=4, workers=1, rate=5, model="cnn", width=0, batch=32, lr=0.05, lr_decay=[0.5, 0.75],
        rounds=(15, 6), steps=(100, 100), eval_every_round=True, warmup_frac=0.05),
    "lm": dict(
        about="byte-level causal transformer (1.07M parameters, context 64) on the Python "
              "standard library's sources, inner AdamW with warm-up and cosine decay, 2 hosts x 2 "
              "workers, 100 Mbit/s between hosts; equal tokens for every variant",
        hosts=2, workers=2, rate=100, model="lm", width=0, batch=16, lr=2e-3, optimizer="adamw",
        schedule="cosine", rounds=(8, 4), steps=(64, 32), eval_every_round=True,
        timeout=3 * 3600,  # a full run took 44-60+ min here (horovod's rounds alone ~25)
        variants=[_v("compute-only", "compute"), _v("horovod", "horovod"),
                  _ours("local-h64", 64, policy="fixed", periods=[64], topology="flat",
                        time_budget=False, overlap=False),
                  _ours("diloco-h64", 64, policy="fixed", periods=[64], topology="flat",
                        time_budget=False, overlap=False, outer_optimizer="nesterov"),
                  # the compression alone: the same fixed schedule as diloco-h64, bf16 deltas
                  _ours("diloco-h64-bf16", 64, policy="fixed", periods=[64], topology="flat",
                        time_budget=False, overlap=False, outer_optimizer="nesterov",
                        compression="bf16"),
                  _ours("adaptive", 64),  # the default config: no key set
                  _ours("adaptive-diloco", 64, outer_optimizer="nesterov"),
                  _ours("adaptive-diloco-bf16", 64, outer_optimizer="nesterov",
                        compression="bf16")]),
}


def _accuracy_variants(warmup: int) -> list:
    return [_v("compute-only", "compute"), _v("horovod", "horovod"),
            _v("horovod-accumulate", "horovod", 8),
            _ours("local-h8", 8, policy="fixed", periods=[8]),
            _ours("local-h32", 32, policy="fixed", periods=[32]),
            _ours("post-local-h32", 32, policy="fixed", periods=[32], warmup=warmup),
            _v("torch-peer", "peer", 32, warmup=warmup),
            _ours("adaptive", 32),  # the default config: local SGD from the start
            _ours("adaptive-post-local", 32, warmup=warmup),
            # the quadratic synchronisation rule: global period <= (alpha / lr)^2, i.e. 8 at the
            # initial LR 0.05, the max_period cap once the LR has dropped 10x
            _ours("adaptive-qsr", 32, warmup=warmup, qsr_alpha=0.05 * 8 ** 0.5),
            # the outer Nesterov step (DiLoCo) on the default config
            _ours("adaptive-diloco", 32, outer_optimizer="nesterov"),
            # the default config with overlap forced on / off (overlap: auto decides by itself)
            _ours("adaptive-overlap", 32, overlap=True),
            _ours("adaptive-blocking", 32, overlap=False),
            _previous_default(32)]


LAUNCHERS = ("emulator", "horovodrun", "alsgd-run")


def settings_for(name: str, quick: bool, rounds: int | None, steps: int | None) -> dict:
    sc = SCENARIOS[name]
    s = {k: v for k, v in sc.items() if k not in ("rounds", "steps", "hosts", "workers", "rate",
                                                  "slowdown", "drop_to", "about",
                                                  "throttle_from", "timeout")}
    s["scenario"] = name
    s["rounds"] = rounds or sc["rounds"][1 if quick else 0]
    s["segment_steps"] = steps or sc["steps"][1 if quick else 0]
    if name == "accuracy":
        total = s["rounds"] * s["segment_steps"]
        s["variants"] = _accuracy_variants(max(1, int(sc["warmup_frac"] * total)))
    if sc.get("drop_to"):
        s["drop_after_round"] = s["rounds"] // 2
    if sc.get("throttle_from"):
        s["throttle_from_round"] = int(s["rounds"] * sc["throttle_from"])
    return s


def _log(msg: str) -> None:
    print(f"[{PROG}] {msg}", file=sys.stderr, flush=True)


def run_scenario(name: str, quick: bool = False, rounds: int | None = None, steps: int | None = None,
                 variants: list | None = None, timeout: float | None = None,
                 launcher: str = "emulator", seed: int = 0) -> dict:
    """Run one scenario on an emulated cluster; return its JSON document.

    ``timeout``: seconds for the whole job (None: the scenario's ``timeout``, else an hour).

    ``seed`` seeds the models' initialisation and each rank's data order (the data set is the
    same); the results page averages a scenario's seeds (:func:`seed_summary`).

    ``launcher``: ``emulator`` starts each worker itself (``ip netns exec`` with horovodrun's
    rank variables); ``horovodrun`` and ``alsgd-run`` launch the job from the root namespace
    over ssh to the emulated hosts (``-H ADDRESS:N,...``), as users do."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    from adaptive_lsgd.tools import cluster as emu
    from adaptive_lsgd.tools.demo.datasets import load_mnist1d

    sc = SCENARIOS[name]
    if timeout is None:
        timeout = sc.get("timeout", 3600)
    s = settings_for(name, quick, rounds, steps)
    s["seed"] = int(seed)
    if variants:
        known = [v["name"] for v in s["variants"]]
        bad = [v for v in variants if v not in known]
        if bad:
            raise ValueError(f"unknown variant(s) {', '.join(bad)} for {name}; "
                             f"allowed: {', '.join(known)}")
        s["variants"] = [v for v in s["variants"] if v["name"] in variants or v["kind"] == "compute"]
        chosen = {v["name"] for v in s["variants"]}
        for v in s["variants"]:
            if v.get("H_from") and v["H_from"] not in chosen:
                raise ValueError(f"variant {v['name']} copies the period of {v['H_from']}: "
                                 f"select both")
    load_mnist1d()  # generate the data once, before the workers start
    tmp = tempfile.mkdtemp(prefix="alsgd-bench-")
    s["drop_marker"] = os.path.join(tmp, "drop")
    s["result_path"] = os.path.join(tmp, "result.json")
    s["master_port"] = 29500 + secrets.randbelow(2000)
    ssh = launcher != "emulator"
    s["launcher"] = launcher
    # A transfer over a shaped 5 Mbit/s link can stall for a while (tbf drops, TCP backs off):
    # a stall shows in the figures; Gloo's default 30 s timeout would end the whole run instead.
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3",
           "HOROVOD_GLOO_TIMEOUT_SECONDS": "300"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ALSGD_")}, **env}
    stop = threading.Event()
    try:
        if sc["hosts"] == 1 and not sc["rate"] and not sc.get("slowdown"):
            result = _run_local(sc, s, env, timeout)  # one host, no shaping: plain horovodrun
        else:
            with emu.EmulatedCluster(hosts=sc["hosts"], workers_per_host=sc["workers"],
                                     rate_mbit=sc["rate"], slowdown=sc.get("slowdown"),
                                     echo=True, ssh=ssh) as cluster:
                s["master_addr"] = cluster.host_address(0)
                s["iface"] = env["GLOO_SOCKET_IFNAME"] = cluster.iface  # the hosts' interface
                env[SETTINGS_ENV] = json.dumps(s)
                if sc.get("drop_to"):
                    threading.Thread(target=_drop_link, daemon=True,
                                     args=(cluster, s["drop_marker"], sc["drop_to"], stop)).start()
                _log(f"{name}: {sc['about']}; {s['rounds']} rounds x {s['segment_steps']} steps")
                worker = [sys.executable, "-m", "adaptive_lsgd.tools.bench.worker"]
                if not ssh:
                    result = cluster.run(worker, env=env, timeout=timeout)
                else:
                    front = ([shutil.which("horovodrun", path=os.path.dirname(sys.executable))
                              or "horovodrun"] if launcher == "horovodrun"
                             else [sys.executable, "-m", "adaptive_lsgd.tools.cli.run"])
                    launched = cluster.launch([*front, "-np", str(cluster.size), "-H",
                                               cluster.hosts_arg(), *worker], env=env,
                                              timeout=timeout)
                    result = emu.RunResult([launched.returncode], [launched.stdout],
                                           [launched.stderr], lines=[
                                               (0, "stdout", ln) for ln in
                                               (launched.stdout + launched.stderr).splitlines()],
                                           elapsed=launched.elapsed, timed_out=launched.timed_out)
        if result.ok:
            with open(s["result_path"]) as f:
                raw = json.load(f)
    finally:
        stop.set()
        shutil.rmtree(tmp, ignore_errors=True)
    if not result.ok:
        tail = "\n".join(f"[{r}] {t}" for r, _, t in result.lines[-15:])
        why = "timed out" if result.timed_out else f"exit codes {result.returncodes}"
        raise RuntimeError(f"scenario {name} failed ({why}); last output:\n{tail}")
    return document(name, sc, s, raw, quick)


def _run_local(sc: dict, s: dict, env: dict, timeout: float):
    """``horovodrun --gloo`` on this machine (no root needed); a RunResult-like object."""
    from adaptive_lsgd.tools.cluster import RunResult

    n = sc["workers"]
    s.update(master_addr="127.0.0.1", iface="lo")
    env = {**env, SETTINGS_ENV: json.dumps(s), "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    horovodrun = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or "horovodrun"
    cmd = [horovodrun, "-np", str(n), "-H", f"localhost:{n}", "--gloo", sys.executable, "-m",
           "adaptive_lsgd.tools.bench.worker"]
    _log(f"{s['scenario']}: {sc['about']}; {s['rounds']} rounds x {s['segment_steps']} steps")
    start = time.monotonic()
    try:
        rc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return RunResult([None] * n, [], [], elapsed=time.monotonic() - start, timed_out=True)
    return RunResult([rc] * n, [], [], elapsed=time.monotonic() - start)


def _drop_link(cluster, marker: str, rate: float, stop: threading.Event) -> None:
    """Wait for rank 0's marker, drop every host's link to ``rate``, then answer."""
    while not stop.is_set() and not os.path.exists(marker):
        time.sleep(0.05)
    if stop.is_set():
        return
    for h in range(cluster.hosts):
        cluster.set_rate(h, rate)
    with open(marker + ".done", "w") as f:
        f.write("done\n")
    _log(f"links dropped to {rate:g} Mbit/s")


def document(name: str, sc: dict, s: dict, raw: dict, quick: bool) -> dict:
    """The scenario's JSON: the issue's schema plus what the plots and the docs need."""
    vs = raw["variants"]
    if sc.get("drop_to") or sc.get("throttle_from"):  # the cluster changes mid-run: whole-run
        # rate, not a median over rounds
        for v in vs.values():
            v["samples_per_s"] = (v["samples"] / sum(v["walls"]) if v["kind"] != "compute" else
                                  len(v["rates"]) / sum(1 / r for r in v["rates"]))
    limit = vs.get("compute-only", {}).get("samples_per_s")
    # overlap (configured, or chosen by overlap: auto): the summary counts each segment's final
    # wait in full, though the segment is charged only what the rest of its round would not
    # have hidden: use the throughput instead
    overlapped = {spec["name"] for spec in s["variants"] if spec.get("config", {}).get("overlap")}
    overlapped |= {name for name, v in vs.items() if (v.get("mechanisms") or {}).get("overlap")}
    results = {}
    for vname, v in vs.items():
        if v["kind"] == "alsgd" and v.get("switch_step") is not None and vname not in overlapped:
            comm = v["comm_fraction_summary"]  # the integration's own figure (local phase)
        elif v["kind"] == "compute" or not limit:
            comm = 0.0
        else:
            comm = max(0.0, 1.0 - v["samples_per_s"] / limit)
        row = {"samples_per_s": v["samples_per_s"], "comm_fraction": comm, "test_acc": v["test_acc"],
               "global_syncs": v["global_syncs"], "H": v["H"], "steps": v["steps"],
               "samples": v["samples"], "rates": v["rates"], "walls": v["walls"], "accs": v["accs"],
               "stalls": stalled_rounds(v["walls"])}
        for key in ("periods", "syncs_per_level", "switch_step", "trace", "switches", "mechanisms",
                    "rank_steps",
                    "val_loss", "bytes_per_sync"):
            if key in v and v[key] not in (None, []):
                row[key] = v[key]
        results[vname] = row
    doc = {
        "scenario": name, "seed": s.get("seed", 0), "about": sc["about"], "quick": quick,
        "launcher": s.get("launcher", "emulator"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "cluster": {"hosts": sc["hosts"], "workers_per_host": sc["workers"], "rate_mbit": sc["rate"],
                    "slowdown": sc.get("slowdown"), "drop_to_mbit": sc.get("drop_to")},
        "settings": {k: s[k] for k in ("model", "width", "batch", "lr", "rounds", "segment_steps")},
        "params": raw["params"], "ranks": raw["ranks"], "wall_s": raw["wall_s"],
        "drop_t": raw.get("drop_t"),
        "compute_only_samples_per_s": limit,
        # what the `adaptive` variant (the default config, no key set) ran with
        "default_target_comm_fraction": Config.target_comm_fraction,
        "results": results,
    }
    doc["goals"] = goals(name, doc)
    import jsonschema

    jsonschema.validate(doc, SCHEMA)
    return doc


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}"


STALL_FACTOR = 3.0  # a segment this many times its variant's median wall time is a stall


def stalled_rounds(walls: list) -> list:
    """Rounds (0-based) whose segment took over STALL_FACTOR x the variant's median: a stalled
    transfer or the machine, not the method. Medians and per-round pairs shrug them off; the
    results page lists them so that no figure rests on one."""
    if len(walls) < 3:
        return []
    med = statistics.median(walls)
    return [i for i, w in enumerate(walls) if med > 0 and w > STALL_FACTOR * med]


def seeded_name(name: str, seed: int) -> str:
    """The file a scenario's results go to in ``--out``: seed 0 is ``NAME.json``."""
    return f"{name}.json" if not seed else f"{name}-seed{seed}.json"


def seed_summary(docs: list) -> dict:
    """One scenario run under several seeds (``docs``: their JSON documents, any order): per
    variant in every run, the test accuracy of each seed, its mean, and the mean difference to
    ``horovod`` in points; plus the accuracy goals on the means (``goals``).

    >>> a = {"seed": 0, "results": {"horovod": {"test_acc": 0.9, "global_syncs": 100},
    ...                             "adaptive": {"test_acc": 0.91, "global_syncs": 10}}}
    >>> b = {"seed": 1, "results": {"horovod": {"test_acc": 0.8, "global_syncs": 100},
    ...                             "adaptive": {"test_acc": 0.78, "global_syncs": 10}}}
    >>> s = seed_summary([b, a])
    >>> s["seeds"], s["variants"]["adaptive"]["accs"], round(s["variants"]["adaptive"]["diff"], 2)
    ([0, 1], [0.91, 0.78], -0.5)
    """
    docs = sorted(docs, key=lambda d: d.get("seed", 0))
    seeds = [d.get("seed", 0) for d in docs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"two result files have the same seed: {seeds}")
    names = [v for v in docs[0]["results"] if all(v in d["results"] for d in docs)]
    out = {"seeds": seeds, "variants": {}, "goals": []}
    for v in names:
        accs = [d["results"][v]["test_acc"] for d in docs]
        row = {"accs": accs, "mean": statistics.fmean(accs),
               "syncs": statistics.fmean(d["results"][v]["global_syncs"] for d in docs)}
        if "horovod" in names:
            row["diff"] = statistics.fmean((d["results"][v]["test_acc"]
                                            - d["results"]["horovod"]["test_acc"]) * 100
                                           for d in docs)
        out["variants"][v] = row
    rows = out["variants"]
    for v in ("adaptive", "adaptive-post-local", "adaptive-qsr", "adaptive-diloco"):
        if v in rows and "horovod" in rows:
            x = rows[v]["diff"]
            out["goals"].append({"goal": f"{v}: mean over {len(docs)} seeds >= horovod's - 0.3 "
                                         f"points (difference, points)", "value": x,
                                 "met": x >= -0.3})
    return out


def _ratio(a, b):
    return a / b if a and b else None


def whole_run_rate(row: dict) -> float | None:
    """A variant's samples over its segments' summed wall time (None without segments)."""
    wall = sum(row.get("walls") or [])
    return row["samples"] / wall if wall > 0 else None


def paired_ratios(r: dict, a: str, b: str, window: int = 1) -> list:
    """Per round, ``a``'s samples/s over ``b``'s in the *same* round (the variants of a round
    run one after the other, so slow drift of the shared machine cancels); [] if one is missing.
    ``window`` > 1: per run of that many consecutive rounds (samples over summed wall time), for
    a period longer than a round, which syncs in some rounds only."""
    if a not in r or b not in r:
        return []
    if window == 1:
        return [x / y for x, y in zip(r[a]["rates"], r[b]["rates"]) if x and y]

    def rates(row):
        walls, per = row["walls"], row["rates"]
        return [sum(per[j] * walls[j] for j in range(i, i + window)) / sum(walls[i:i + window])
                for i in range(0, len(walls) - window + 1, window)]
    return [x / y for x, y in zip(rates(r[a]), rates(r[b])) if x and y]


def paired_ratio(r: dict, a: str, b: str) -> float | None:
    """The median of :func:`paired_ratios` (None without rounds)."""
    pairs = paired_ratios(r, a, b)
    return statistics.median(pairs) if pairs else None


def goals(name: str, doc: dict) -> list:
    """The issue's goals for this scenario: [{goal, value, met}]."""
    r = doc["results"]
    sps = {k: v["samples_per_s"] for k, v in r.items()}
    out = []

    def add(goal, value, met):
        out.append({"goal": goal, "value": value, "met": bool(met) if value is not None else None})

    for v in ("adaptive", "adaptive-overlap", PREVIOUS_DEFAULT):
        if name == "comm-bound" and v in r and "horovod" in r:
            x = _ratio(sps[v], sps["horovod"])
            add(f"{v} >= 4x horovod samples/s", x, x and x >= 4)
            x = _ratio(sps[v], doc["compute_only_samples_per_s"])
            add(f"{v} >= 0.9 of compute-only", x, x and x >= 0.9)
            x = (r[v]["test_acc"] - r["horovod"]["test_acc"]) * 100
            add(f"{v} test accuracy within 1 point of horovod (points)", x, abs(x) <= 1)
    if name == "changing-network" and "adaptive" in r and any(k.startswith("local-h") for k in r):
        ref = reference_h(doc)
        if ref:
            x = _ratio(sps["adaptive"], sps[ref])
            add(f"adaptive >= 1.3x the fixed H chosen for the starting link ({ref}, H={r[ref]['H']})",
                x, x and x >= 1.3)
        grid = reference_h(doc, grid_only=True)
        if grid and grid != ref:  # the earlier, conservative reference, for comparison
            x = _ratio(sps["adaptive"], sps[grid])
            add(f"adaptive >= 1.3x the smallest grid H at or above its starting period ({grid})",
                x, x and x >= 1.3)
    if name == "hierarchical" and "local-h16" in r:
        for v in ("adaptive", "adaptive-chained", "hier-4x4"):
            if v in r:
                # the flat variant at the global period this one ended with, else the one with
                # the next longer period (it syncs less often: a comparison no kinder to us)
                period = math.prod(r[v].get("periods") or [0])
                longer = sorted((r[k]["H"], k) for k in r
                                if k.startswith("local-h") and r[k]["H"] >= period)
                flat = longer[0][1] if longer else "local-h16"
                same = ("at the same global period" if r[flat]["H"] == period else
                        f"at a longer global period ({v} ended at {period})"
                        if r[flat]["H"] > period else
                        f"(NOT at the same global period: {v} ended at {period})")
                seg = doc["settings"]["segment_steps"]
                if r[flat]["H"] > seg:
                    # a period longer than a segment syncs in some segments only, each variant
                    # in its own phase: pairs of windows of that period (one flat sync each);
                    # the whole run, which one stalled transfer swings, beside them
                    k = -(-r[flat]["H"] // seg)
                    pairs = paired_ratios(r, v, flat, window=k)
                    whole = _ratio(whole_run_rate(r[v]), whole_run_rate(r[flat]))
                    x = statistics.median(pairs) if pairs else None
                    how = f"median of per-window ratios, windows of {k} rounds = {k * seg} steps"
                    if whole:
                        how += f"; whole run {whole:.2f}"
                else:  # a single stalled transfer swings a segment: per-round pairs
                    x, how = paired_ratio(r, v, flat), "median of per-round ratios"
                add(f"{v} (hierarchical) >= 1.2x flat local SGD {same} ({flat}; {how})",
                    x, x and x >= 1.2)
                x = (r[v]["test_acc"] - r["local-h16"]["test_acc"]) * 100
                add(f"{v} test accuracy >= local-h16 - 1 point (difference, points)", x, x >= -1)
    if name == "heterogeneous":
        x = _ratio(sps.get("local-h8-time-budget"), sps.get("local-h8"))
        add("time-budget rounds >= 1.4x fixed H (local-h8)", x, x and x >= 1.4)
        x = paired_ratio(r, "adaptive", "horovod")
        add("adaptive (default config) >= 1.4x horovod (median of per-round ratios)", x,
            x and x >= 1.4)
        x = paired_ratio(r, "adaptive", "compute-only")
        add("adaptive >= 0.9 of compute-only (sum of rank rates; median of per-round ratios)", x,
            x and x >= 0.9)
    if name == "throttle" and "adaptive" in r:
        fixed = [k for k in r if k.startswith("local-h")]
        if fixed:
            best = max(fixed, key=lambda k: sps[k])
            x = _ratio(sps["adaptive"], sps[best])
            add(f"adaptive >= 1.3x the best fixed H with step-count rounds ({best}; whole run)",
                x, x and x >= 1.3)
        x = _ratio(sps["adaptive"], sps.get("horovod"))
        add("adaptive >= 1.2x horovod (whole run)", x, x and x >= 1.2)
    for v in ("adaptive", "adaptive-post-local", "adaptive-qsr", "adaptive-diloco"):
        if name == "accuracy" and v in r and "horovod" in r:
            x = (r[v]["test_acc"] - r["horovod"]["test_acc"]) * 100
            add(f"{v} >= horovod - 0.3 points (difference, points)", x, x >= -0.3)
            x = _ratio(r["horovod"]["global_syncs"], r[v]["global_syncs"])
            add(f"{v} >= 8x fewer global syncs than horovod", x, x and x >= 8)
    if name == "overhead" and "local-h1" in r and "horovod" in r:
        # step-time ratios, paired per round (horovod's samples/s over ours)
        x = paired_ratio(r, "horovod", "local-h1")
        add("local-h1 step time <= 1.03x horovod (median of per-round ratios)", x, x and x <= 1.03)
        x = paired_ratio(r, "horovod", "alsgd-minibatch")
        add("mini-batch phase step time <= 1.03x horovod (median of per-round ratios)", x,
            x and x <= 1.03)
    if name == "lm":
        out += _lm_goals(r, sps)
    if "adaptive" in r and "torch-peer" in r:  # the peer comparison, every scenario
        x = paired_ratio(r, "adaptive", "torch-peer")
        add("adaptive (default config) >= torch-peer samples/s (median of per-round ratios)", x,
            x and x >= 1.0)
    return out


def equal_tokens(r: dict) -> int:
    """lm: the samples every variant reached (time-budget variants take more per segment)."""
    return min(v["samples"] for k, v in r.items() if k != "compute-only")


def lm_loss_at(row: dict, samples: int) -> float | None:
    """lm: the validation loss of ``row`` at ``samples`` training samples, interpolated
    linearly between its per-round evaluations ``[samples, acc, loss, seconds]``; its final
    loss when it ended there."""
    points = [(a[0], a[2]) for a in row.get("accs", []) if len(a) >= 4]
    if not points:
        return row.get("val_loss")
    if samples >= points[-1][0]:
        return row.get("val_loss") if samples == row.get("samples") else points[-1][1]
    prev = (0, None)
    for n, loss in points:
        if n >= samples:
            if prev[1] is None:
                return loss
            return prev[1] + (loss - prev[1]) * (samples - prev[0]) / (n - prev[0])
        prev = (n, loss)
    return points[-1][1]


def _lm_goals(r: dict, sps: dict) -> list:
    """The outer-optimizer issue's goals on the ``lm`` scenario (validation loss at equal
    tokens: the per-round curve at the samples every variant reached)."""
    out = []

    def add(goal, value, ok):
        out.append({"goal": goal, "value": value, "met": bool(ok) if value is not None else None})

    loss = {k: lm_loss_at(v, equal_tokens(r)) for k, v in r.items()}

    def rel(a, b):  # a's validation loss relative to b's, minus 1
        return loss[a] / loss[b] - 1 if loss.get(a) and loss.get(b) else None

    if "diloco-h64" in r and "local-h64" in r:
        x = rel("diloco-h64", "local-h64")
        add("diloco-h64 validation loss <= local-h64's (relative difference)", x,
            x is not None and x <= 0)
    if "horovod" in r:
        for v in ("diloco-h64", "adaptive-diloco"):
            if v in r:
                x = rel(v, "horovod")
                add(f"{v} validation loss within 2% of horovod's (relative difference)", x,
                    x is not None and x <= 0.02)
        if "diloco-h64" in r:
            x = _ratio(r["horovod"]["global_syncs"], r["diloco-h64"]["global_syncs"])
            add("diloco-h64 >= 50x fewer global syncs than horovod", x, x and x >= 50)
        if "adaptive-diloco" in r:
            x = _ratio(sps["adaptive-diloco"], sps["horovod"])
            add("adaptive-diloco >= 3x horovod tokens/s", x, x and x >= 3)
    # bf16 against fp32: at one fixed schedule (the compression alone), and on the adaptive
    # pair (whose periods are chosen online from each run's own timings, so their schedules
    # differ as well: the difference there is not the compression's alone)
    for bf16, fp32, what in (("diloco-h64-bf16", "diloco-h64", "at a fixed period"),
                             ("adaptive-diloco-bf16", "adaptive-diloco", "adaptive periods")):
        if bf16 in r and fp32 in r:
            x = _ratio(r[bf16]["bytes_per_sync"], r[fp32]["bytes_per_sync"])
            add(f"bf16 ({what}): bytes per global sync halved ({bf16} / {fp32})", x,
                x and x <= 0.5)
            x = rel(bf16, fp32)
            add(f"bf16 ({what}): validation loss within 0.5% of {fp32}'s (relative difference)",
                x, x is not None and abs(x) <= 0.005)
    return out


def reference_h(doc: dict, grid_only: bool = False) -> str | None:
    """changing-network: the fixed H "chosen for the starting link": ``local-h-start`` (fixed at
    the period the adaptive policy chose in its first segment) when the run has it; otherwise
    (or ``grid_only``) the smallest fixed H of the grid at or above the period the adaptive
    policy chose before the drop (the largest if none is), conservative: a larger fixed H loses
    less after the drop."""
    r = doc["results"]
    if "local-h-start" in r and not grid_only:
        return "local-h-start"
    fixed = sorted((v["H"], k) for k, v in r.items() if k.startswith("local-h") and k != "local-h-start")
    trace, drop = r.get("adaptive", {}).get("trace", []), doc.get("drop_t")
    before = [p for t, _, p in trace if drop is None or t < drop]
    if not fixed or not before:
        return None
    h = 1
    for p in before[-1]:
        h *= p
    return next((k for H, k in fixed if H >= h), fixed[-1][1])
