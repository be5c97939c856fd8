"""``alsgd-tune``: profile a model and a cluster, then recommend the periods per level.

Three commands::

    alsgd-tune profile --model train.py:make --batch-size 64 -np 2 --out profile.json
    alsgd-tune recommend --profile profile.json --hosts 4 --workers-per-host 2 \\
        --inter-gbps 1 [--json] [--out cfg.yaml] [--plot tune.png]
    alsgd-tune analyze run.jsonl [--json] [--out cfg.yaml]

``profile`` imports ``FILE.py`` and calls ``FUNC()``, which returns ``(model, loss_fn,
example_batch)``: a ``torch.nn.Module``, ``loss_fn(output, target)`` and ``(inputs, targets)``;
or a Keras model, a Keras loss (``loss_fn(targets, outputs)``) and ``(inputs, targets)``. Under
``horovodrun`` (``-np``, ``-H`` as horovodrun takes them) every worker times training steps at
``--batch-size`` and an allreduce sweep over each hierarchy level (the workers of one host,
then all workers); rank 0 writes the versioned JSON profile (:mod:`adaptive_lsgd.profile`).

``recommend`` builds the core's cost model from the profile (the same one the scheduler uses)
for the cluster asked about: ``--hosts``/``--workers-per-host`` change its shape,
``--inter-gbps``/``--intra-gbps`` (and ``--*-latency-us``) its links. It prints predicted
samples/s, communication share and speed-up over H=1 for candidate periods, and the periods
the adaptive policy would pick for ``--target-comm-fraction`` (``--max-global-period`` caps
the steps between global averages; ``--chained-allreduce`` ``auto`` (the default) predicts
whether the default config switches to the sliced chained sync across hosts, ``off`` one
allreduce over all ranks, ``sliced|leaders`` that form; ``--overlap`` averages that run
during the next round). ``--out`` writes a config that ``ALSGD_CONFIG`` loads as it is.

``analyze`` reads a decision log (``log``/``ALSGD_LOG``) and recommends fixed periods for the
next run from the times that run measured, with the evidence.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from adaptive_lsgd.config import CHAINED_FORMS, Config, ConfigError, load_config
from adaptive_lsgd.cost_model import CostModel, LinkModel
from adaptive_lsgd.decision_log import read_log
from adaptive_lsgd.outer import WIRE_BYTES
from adaptive_lsgd.policies import make_policy
from adaptive_lsgd.profile import (
    PROFILE_FORMAT,
    PROFILE_SCHEMA,
    PROFILE_VERSION,
    ProfileError,
    profile_from_dict,
    read_profile_json,
)
from adaptive_lsgd.tools.cli.args import number, positive_int
from adaptive_lsgd.tools.launch import SETTINGS_ENV
from adaptive_lsgd.topology import Topology

PROG = "alsgd-tune"
PROGRESS = "ALSGD-TUNE-PROGRESS"
CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MAX_BUS_BYTES_PER_S = 1e15  # a fit with no measurable bandwidth term (latency-bound sweep)


class TuneError(Exception):
    """A user-facing problem: printed as one line, exit status 1."""


# -- the model factory -------------------------------------------------------------------------
def load_factory(spec: str):
    """``FILE.py:FUNC`` -> the callable; TuneError naming what is wrong."""
    path, sep, func = spec.rpartition(":")
    if not sep or not path or not func:
        raise TuneError(f"--model {spec!r}: expected FILE.py:FUNC")
    if not os.path.isfile(path):
        raise TuneError(f"--model {spec!r}: file {path!r} does not exist")
    name = "_alsgd_tune_model_" + re.sub(r"\W", "_", os.path.basename(path))
    try:
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise TuneError(f"--model {spec!r}: {path!r} is not a Python file")
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
        mod_spec.loader.exec_module(module)
    except TuneError:
        raise
    except BaseException as exc:  # noqa: BLE001 - the user's file: any failure is reported
        raise TuneError(f"--model {spec!r}: importing {path!r} failed: {_one_line(exc)}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise TuneError(f"--model {spec!r}: {path!r} has no function {func!r}")
    return fn


def build_model(spec: str):
    """Call the factory; return ``(framework, model, loss_fn, (x, y), parameters, bytes)``."""
    fn = load_factory(spec)
    try:
        out = fn()
    except BaseException as exc:  # noqa: BLE001
        raise TuneError(f"--model {spec!r}: the factory raised {_one_line(exc)}") from None
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TuneError(f"--model {spec!r}: the factory must return (model, loss_fn, "
                        f"example_batch), got {type(out).__name__}")
    model, loss_fn, batch = out
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TuneError(f"--model {spec!r}: example_batch must be (inputs, targets)")
    if not callable(loss_fn):
        raise TuneError(f"--model {spec!r}: loss_fn is not callable")
    kind = type(model).__module__.split(".")[0]
    if kind == "torch":
        params = [p for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in params)
        nbytes = sum(p.numel() * p.element_size() for p in params)
        framework = "torch"
    elif kind in ("keras", "tensorflow", "tf_keras"):
        if not model.built:
            model(batch[0])
        count = int(sum(int(v.shape.num_elements()) for v in model.trainable_variables))
        nbytes = int(sum(int(v.shape.num_elements()) * v.dtype.size for v in model.trainable_variables))
        framework = "tensorflow"
    else:
        raise TuneError(f"--model {spec!r}: the model is a {type(model).__module__}."
                        f"{type(model).__name__}; expected a torch.nn.Module or a Keras model")
    if count == 0:
        raise TuneError(f"--model {spec!r}: the model has no trainable parameters")
    return framework, model, loss_fn, tuple(batch), count, nbytes


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- profile: the workers ----------------------------------------------------------------------
def sweep_sizes(model_bytes: int) -> list:
    """Allreduce sizes in bytes: 4 KiB, x4 ... up to 2x the model, and the model itself."""
    sizes, n = [], 4096
    while n < 2 * model_bytes:
        sizes.append(n)
        n *= 4
    return sorted(set(sizes + [int(model_bytes)]))


def _stepper(framework, model, loss_fn, batch, batch_size):
    """A function running one training step at ``batch_size`` (rows of the example repeated)."""
    if framework == "torch":
        import torch

        x, y = batch
        idx = torch.arange(batch_size) % x.shape[0]
        x, y = x[idx], y[idx]
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        return step
    import tensorflow as tf

    x, y = (tf.convert_to_tensor(t) for t in batch)
    idx = tf.range(batch_size) % tf.shape(x)[0]
    x, y = tf.gather(x, idx), tf.gather(y, idx)
    opt = tf.keras.optimizers.SGD(1e-3)

    @tf.function
    def tf_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def step():
        tf_step().numpy()
    return step


def worker(settings: dict) -> int:
    """One profiling worker under horovodrun; rank 0 writes the profile."""
    os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    try:
        framework, model, loss_fn, batch, count, nbytes = build_model(settings["model"])
    except TuneError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    if framework == "torch":
        import horovod.torch as hvd
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

        def allreduce(n_floats, ps):
            t = torch.zeros(n_floats)
            hvd.allreduce_(t, op=hvd.Sum, process_set=ps)
    else:
        import horovod.tensorflow as hvd
        import tensorflow as tf

        def allreduce(n_floats, ps):
            hvd.allreduce(tf.zeros([n_floats]), op=hvd.Sum, process_set=ps).numpy()
    hvd.init()
    barrier = getattr(hvd, "barrier", None) or (lambda: allreduce(1, hvd.global_process_set))
    from adaptive_lsgd.integrations._horovod import ProcessSets, host_name
    from adaptive_lsgd.topology import Topology

    rank, size = hvd.rank(), hvd.size()
    hosts = list(hvd.allgather_object(host_name(), name="alsgd_tune_hosts"))
    if size < 2:
        print(f"{PROG}: error: profiling needs at least 2 workers (-np 2)", file=sys.stderr)
        return 1
    topo = Topology.from_config("auto", hosts)  # the workers of a host, then everyone
    spans = topo.spans_hosts()
    sets = ProcessSets(hvd, "adaptive_lsgd.tools.cli.tune")
    sizes = sweep_sizes(nbytes)
    reps, steps, warm = settings["reps"], settings["steps"], 3
    total = steps + warm + topo.num_levels * len(sizes) * (reps + 1)
    done = 0

    def progress(what: str) -> None:
        if rank == 0:
            print(f"{PROGRESS} {done} {total} {what}", flush=True)

    step = _stepper(framework, model, loss_fn, batch, settings["batch_size"])
    step_times = []
    barrier()  # every rank computes at once, as in training (not one alone while another waits)
    for i in range(warm + steps):
        start = time.perf_counter()
        step()
        if i >= warm:
            step_times.append(time.perf_counter() - start)
        done += 1
        if done % 5 == 0:
            progress("compute")
    links = {}
    for lvl in range(topo.num_levels):
        block = topo.block_of(lvl, rank)
        ps_of = {b: sets.get(b) for b in topo.blocks(lvl) if len(b) > 1}
        kind = "inter" if spans[lvl] else "intra"
        raw = []  # (bytes, [seconds per rep]) as this rank saw them
        for n in sizes:
            times = []
            for r in range(reps + 1):
                barrier()
                start = time.perf_counter()
                allreduce(max(1, n // 4), ps_of[block])
                if r > 0:
                    times.append(time.perf_counter() - start)
                done += 1
            raw.append((n, times))
            progress(f"level {lvl} ({kind}) {n} B")
        links[lvl] = (kind, len(block), raw)
    overhead = _sync_overhead(framework, model, reps)
    gathered = hvd.allgather_object({"steps": step_times, "overhead": overhead, "links": {
        str(lvl): raw for lvl, (_, _, raw) in links.items()}}, name="alsgd_tune_samples")
    if rank == 0:
        profile = make_profile(settings, framework, count, nbytes, hosts, topo, links, gathered)
        with open(settings["out"], "w", encoding="utf-8") as fh:
            json.dump(profile, fh, indent=1)
        done = total
        progress("written")
    barrier()
    return 0


def _sync_overhead(framework: str, model, reps: int) -> float:
    """Median seconds one sync of ``model`` costs outside its collective: the integration's
    own packing (with the finiteness check) and unpacking of the parameters, on this rank."""
    if framework == "torch":
        from adaptive_lsgd.integrations.torch import TorchBackend

        backend, tensors = TorchBackend({}), [p.data for p in model.parameters()]
    else:
        from adaptive_lsgd.integrations.tensorflow import TFBackend

        backend, tensors = TFBackend({}), list(model.trainable_variables)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        buffers = backend.pack(tensors, 1)
        backend.all_finite(buffers)
        backend.unpack(buffers, tensors, 1.0)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first one traces / allocates


def make_profile(settings, framework, count, nbytes, hosts, topo, links, gathered) -> dict:
    """Rank 0: the profile from every rank's samples. A rep's transfer time is the minimum
    over the ranks (the last one to arrive waited least); each size's lower quartile over the
    reps is fitted; compute is the slowest rank's median."""
    import numpy as np
    import psutil

    compute = [statistics.median(g["steps"]) for g in gathered]
    means = [statistics.mean(g["steps"]) for g in gathered]
    fits = {}
    for lvl, (kind, ranks, raw) in links.items():
        samples = []
        for i, (n, _) in enumerate(raw):
            per_rep = zip(*[g["links"][str(lvl)][i][1] for g in gathered])
            samples += [(n, min(rep)) for rep in per_rep]
        if kind in fits and fits[kind]["ranks"] >= ranks:
            continue
        # Fit the lower quartile of each size: a loaded machine adds outliers of 10x.
        by_size: dict = {}
        for n, t in samples:
            by_size.setdefault(n, []).append(t)
        fit = LinkModel.fit([(n, float(np.percentile(ts, 25))) for n, ts in by_size.items()])
        bus = fit.beta * 2.0 * (ranks - 1) / ranks if math.isfinite(fit.beta) else MAX_BUS_BYTES_PER_S
        fits[kind] = {"alpha_s": fit.alpha, "bus_bytes_per_s": min(bus, MAX_BUS_BYTES_PER_S),
                      "ranks": ranks, "samples": [[n, t] for n, t in samples]}
    vm = psutil.virtual_memory()
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"hostname": platform.node(), "cpu_count": psutil.cpu_count(),
                    "cpu_count_physical": psutil.cpu_count(logical=False),
                    "memory_bytes": vm.total, "platform": platform.platform(),
                    "python": platform.python_version()},
        "cluster": {"np": len(hosts), "hosts": sorted(set(hosts)),
                    "workers_per_host": max(hosts.count(h) for h in set(hosts)),
                    "levels": topo.describe()["levels"]},
        "model": {"source": settings["model"], "framework": framework, "parameters": count,
                  "bytes": nbytes, "batch_size": settings["batch_size"]},
        # medians decide (as the scheduler's do); the mean prices a round (the sum of its steps)
        "compute": {"step_s": max(compute), "samples_s": compute, "mean_step_s": max(means)},
        # the slowest rank's: every rank's sync waits for it
        "sync": {"overhead_s": max(g["overhead"] for g in gathered)},
        "links": fits,
    }


# -- profile: the launcher ---------------------------------------------------------------------
def cmd_profile(args) -> int:
    if args.np < 2:
        raise TuneError(f"-np {args.np}: profiling needs at least 2 workers")
    if importlib.util.find_spec("psutil") is None:  # the profile records the machine with it
        raise TuneError("profiling needs psutil (pip install 'adaptive-lsgd[tools]')")
    out = os.path.abspath(args.out)
    if not os.path.isdir(os.path.dirname(out)):
        raise TuneError(f"--out {args.out!r}: directory {os.path.dirname(out)!r} does not exist")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    framework, _, _, _, count, nbytes = build_model(args.model)  # fail here, not on N workers
    print(f"[{PROG}] {framework} model {args.model}: {count} parameters, {nbytes} bytes",
          flush=True)
    horovodrun = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or "horovodrun"
    cmd = [horovodrun, "-np", str(args.np), "-H", args.hosts or f"localhost:{args.np}", "--gloo",
           sys.executable, "-m", "adaptive_lsgd.tools.cli.tune", "--worker"]
    settings = {"model": os.path.abspath(args.model.rpartition(":")[0]) + ":" +
                args.model.rpartition(":")[2], "batch_size": args.batch_size,
                "steps": args.steps, "reps": args.reps, "out": out}
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
               **{SETTINGS_ENV: json.dumps(settings)})
    env.setdefault("OMP_NUM_THREADS", "1")
    if os.path.exists(out):
        os.remove(out)
    rc, tail = _run_with_progress(cmd, env)
    if rc != 0 or not os.path.exists(out):
        raise TuneError(f"profiling under horovodrun failed (exit {rc}): {tail or 'no output'}")
    profile = load_profile_checked(out)
    print(f"[{PROG}] wrote {args.out}: compute {profile.compute_s * 1e3:.2f} ms/step at batch "
          f"{profile.batch_size}; " + "; ".join(
              f"{k} link {a * 1e6:.0f} us + {b * 8 / 1e9:.2f} Gbit/s (bus)"
              for k, (a, b) in profile.links.items()))
    return 0


def _run_with_progress(cmd, env) -> tuple:
    """Run horovodrun; turn rank 0's progress lines into a tqdm bar, pass other lines on.
    Returns the exit status and the last error-looking line."""
    from tqdm import tqdm

    bar = tqdm(total=1, desc="profiling", unit="op", file=sys.stderr, leave=True)
    last_error = ""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    try:
        for line in proc.stdout:
            body = line.split(">:", 1)[1] if line.startswith("[") and ">:" in line else line
            if body.startswith(PROGRESS):
                _, done, total, what = (body.rstrip("\n").split(" ", 3) + [""])[:4]
                bar.total = int(total)
                bar.n = int(done)
                bar.set_postfix_str(what, refresh=True)
            else:
                if re.match(r"\w*(Error|Exception)\b|alsgd-tune: error", body):
                    last_error = last_error or body.strip()  # the first worker's own error
                tqdm.write(line.rstrip("\n"), file=sys.stderr)
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        raise TuneError("interrupted") from None
    finally:
        bar.close()
    return rc, last_error


def load_profile_checked(path: str):
    """Validate against :data:`PROFILE_SCHEMA` (jsonschema), then build the Profile."""
    import jsonschema

    data = read_profile_json(path)
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"profile {path!r} is not an adaptive-lsgd profile (no "
                           f"'format: {PROFILE_FORMAT}')")
    errors = sorted(jsonschema.Draft202012Validator(PROFILE_SCHEMA).iter_errors(data),
                    key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ProfileError(f"profile {path!r} is malformed at {where}: {_short(err.message)}")
    return profile_from_dict(data)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- recommend ---------------------------------------------------------------------------------
def cluster_levels(hosts: int, workers_per_host: int, chained: str | None = None) -> list:
    """``[(kind, ranks per link), ...]`` finest first, as the scheduler's topology would be
    (``chained``: ``sliced``/``leaders``, one rank per host in a cross-host link)."""
    if hosts < 1 or workers_per_host < 1:
        raise TuneError("--hosts and --workers-per-host must be at least 1")
    if hosts * workers_per_host < 2:
        raise TuneError("a single worker has nothing to average: ask about 2 or more workers")
    levels = []
    if workers_per_host > 1:
        levels.append(("intra", workers_per_host))
    if hosts > 1:
        chained_link = chained and workers_per_host > 1
        levels.append(("inter", hosts if chained_link else hosts * workers_per_host))
    return levels


def recommendation(model: CostModel, target: float, max_period: int,
                   max_global_period: int | None = None) -> tuple:
    """The periods the core's adaptive policy picks for ``model`` (the product of the periods
    at most ``max_global_period``, as the scheduler caps it)."""
    cfg = load_config({"target_comm_fraction": target, "max_period": max_period,
                       "max_global_period": max_global_period}, env={})
    policy = make_policy(cfg, model.num_levels)
    return policy.best(model, target, cap=policy.cap(None))


def rank_compute(args, compute_s: float, workers: int, wph: int) -> list:
    """Every rank's step time: the profile's, host 0's ``--slow-host-factor`` x slower."""
    return [compute_s * (args.slow_host_factor if r < wph else 1.0) for r in range(workers)]


def online_mechanisms(model: CostModel, args, workers: int, wph: int, choice) -> dict:
    """The mechanisms the online policy (the default config's ``auto``) would pick on this
    cluster: the scheduler's own decision, from the profile's cost model and per-rank compute
    (host 0 ``--slow-host-factor`` x slower). ``choice``: ``--chained-allreduce`` (None in a
    one-level cluster); under ``auto`` the sliced form's cost is predicted from the plain
    form's links as the scheduler predicts it before measuring it
    (:meth:`~adaptive_lsgd.topology.Topology.link_ratio`), and ``alternative`` is its model."""
    chained = choice in CHAINED_FORMS
    compute = np.asarray(rank_compute(args, model.compute_s, workers, wph))
    cfg = load_config({"target_comm_fraction": args.target_comm_fraction,
                       "max_period": args.max_period, "max_global_period": args.max_global_period,
                       **({"overlap": args.overlap} if args.overlap is not None else {})}, env={})
    policy = make_policy(cfg, model.num_levels)
    slowest = model.with_overlap(False).with_compute(compute.tolist())
    alt = None
    if model.num_levels > 1:  # chained_allreduce: auto, predicted as the scheduler predicts it
        topo = Topology.from_config(f"{workers // wph}x{wph}", ["h"] * workers, chained="auto")
        mode = ("on" if chained else "off" if choice == "off"
                else "auto" if topo.alternative is not None else "none")
        policy.first(chained=mode)
        if mode == "auto":
            alt = CostModel(slowest.compute_s,
                            [t * topo.link_ratio(lvl) for lvl, t in enumerate(model.link_s)],
                            chained=True, sliced=True, rank_compute_s=compute.tolist())
    d = policy.decide(slowest, policy.initial_periods(), settled=False, compute=compute, lr=None,
                      uneven_ok=args.uneven_steps,
                      can_overlap=not chained and getattr(args, "compression", "none") == "none",
                      chained_model=alt, chained_predicted=True)
    return {"mechanisms": d.mechanisms, "why": d.why, "rank_steps": d.rank_steps, "alternative": alt,
            "policy": policy}


def at_mean_step(model: CostModel, factor: float) -> CostModel:
    """``model`` with every rank's step time scaled by ``factor`` (the profile's mean over
    median): the periods are decided on medians, as the scheduler decides, but a round lasts
    the sum of its steps, so a predicted rate uses the mean."""
    if factor == 1.0:
        return model
    return model.with_compute(model.compute_s * factor if model.rank_compute_s is None
                              else [t * factor for t in model.rank_compute_s])


def predict(model: CostModel, periods, workers: int, batch_size: int,
            rank_steps: list | None = None) -> dict:
    """Samples/s of the whole job: with per-rank step times (``model.rank_compute_s``) every
    rank's own steps, in step-count rounds (every rank waits for the slowest) or time-budget
    rounds (``rank_steps``: level-0 steps per rank)."""
    def job(p, split=None):
        if model.rank_compute_s is None:
            return model.steps_per_s(p) * workers
        return model.job_steps_per_s(p, rank_steps=split)

    steps_per_s = job(periods, rank_steps)
    base = job([1] * model.num_levels)
    return {"periods": [int(h) for h in periods],
            "predicted_samples_per_s": steps_per_s * batch_size,
            "predicted_comm_fraction": model.comm_fraction(periods),
            "speedup_vs_h1": steps_per_s / base if base > 0 else math.inf}


def candidate_rows(model: CostModel, rec, max_period: int) -> list:
    """Per level, the candidates with the other levels at the recommendation."""
    rows = []
    for lvl in range(model.num_levels):
        for h in [c for c in CANDIDATES if c <= max_period] + [rec[lvl]]:
            periods = list(rec)
            periods[lvl] = h
            if (lvl, periods) not in [(r[0], r[1]) for r in rows]:
                rows.append((lvl, periods))
    return sorted(rows, key=lambda r: (r[0], r[1][r[0]]))


def cmd_recommend(args) -> int:
    profile = load_profile_checked(args.profile)
    for kind in ("inter", "intra"):
        gbps, lat = getattr(args, f"{kind}_gbps"), getattr(args, f"{kind}_latency_us")
        if gbps is not None or lat is not None:
            profile = profile.with_link(kind, gbps=gbps,
                                        latency_s=None if lat is None else lat * 1e-6)
    data = read_profile_json(args.profile)
    shape = data.get("cluster", {})
    hosts = args.hosts if args.hosts is not None else len(shape.get("hosts") or [None])
    wph = (args.workers_per_host if args.workers_per_host is not None
           else int(shape.get("workers_per_host") or 2))
    if (args.inter_gbps or args.inter_latency_us) and args.hosts is None and hosts == 1:
        # "What if these workers were on separate hosts joined by this link?"
        hosts, wph = hosts * wph, (args.workers_per_host or 1)
    choice = args.chained_allreduce if len(cluster_levels(hosts, wph)) > 1 else None
    chained = choice if choice in CHAINED_FORMS else None  # a form given: predicted as such
    levels = cluster_levels(hosts, wph, chained)
    shares = [1.0, 1.0 / wph] if chained == "sliced" else [1.0] * len(levels)  # a slice crosses
    shares[-1] *= WIRE_BYTES[args.compression] / 4  # compressed global syncs: fewer bytes
    if args.overlap and chained:
        raise TuneError("--overlap cannot be combined with --chained-allreduce (an overlapped "
                        "average is one allreduce; config key overlap)")
    model = profile.cost_model(levels, chained=bool(chained), shares=shares,
                               sliced=chained == "sliced", overlap=bool(args.overlap))
    workers = hosts * wph
    mech = online_mechanisms(model, args, workers, wph, choice)
    alt, policy = mech.pop("alternative"), mech.pop("policy")
    if mech["mechanisms"].get("chained") and not chained:  # what chained_allreduce: auto runs
        levels = cluster_levels(hosts, wph, "sliced")
        model = CostModel(model.compute_s, alt.link_s, chained=True, sliced=True)
    if args.overlap is None and mech["mechanisms"]["overlap"]:  # what overlap: auto would run
        model = model.with_overlap()
    elif args.overlap is not None:
        mech["mechanisms"]["overlap"] = bool(args.overlap)
        mech["why"]["overlap"] = "given (--overlap / --no-overlap)"
    if args.slow_host_factor != 1:  # a mixed cluster: the slowest rank paces a round
        model = model.with_compute(rank_compute(args, model.compute_s, workers, wph))
    rec = recommendation(model, args.target_comm_fraction, args.max_period, args.max_global_period)
    split = None
    if mech["mechanisms"]["time_budget"]:  # each rank takes what fits in the slowest's round
        rec, split = policy.round_for_split(tuple(rec), np.asarray(model.rank_compute_s),
                                            policy.cap(None), model)
        mech["rank_steps"] = split
    rate = at_mean_step(model, profile.rate_factor)  # what the decided periods will run at
    result = {**predict(rate, rec, workers, profile.batch_size, split),
              "hosts": hosts, "workers_per_host": wph,
              "levels": [{"kind": k, "ranks": r, "allreduce_s": t}
                         for (k, r), t in zip(levels, model.link_s)],
              "compute_s": model.compute_s, "mean_step_s": rate.compute_s,
              "batch_size": profile.batch_size,
              "target_comm_fraction": args.target_comm_fraction, **mech}
    rows = [predict(rate, p, workers, profile.batch_size,
                    policy.split(p[0], np.asarray(model.rank_compute_s)) if split else None)
            | {"level": lvl} for lvl, p in candidate_rows(model, rec, args.max_period)]
    if args.json:
        print(json.dumps({**result, "candidates": rows}))
    else:
        print(f"cluster: {hosts} host(s) x {wph} worker(s), batch {profile.batch_size}/worker, "
              f"compute {model.compute_s * 1e3:.2f} ms/step (median; mean "
              f"{rate.compute_s * 1e3:.2f}), {profile.param_bytes} bytes/sync")
        for lvl, ((kind, ranks), t) in enumerate(zip(levels, model.link_s)):
            print(f"level {lvl}: {kind}-host link, {ranks} ranks, allreduce {t * 1e3:.2f} ms")
        print(f"{'level':>5} {'periods':>14} {'samples/s':>12} {'comm share':>11} {'vs H=1':>8}")
        for r in rows:
            mark = "  <- recommended" if r["periods"] == list(rec) else ""
            print(f"{r['level']:>5} {str(r['periods']):>14} {r['predicted_samples_per_s']:>12.1f} "
                  f"{r['predicted_comm_fraction'] * 100:>10.1f}% {r['speedup_vs_h1']:>7.2f}x{mark}")
        for key, on in mech["mechanisms"].items():
            print(f"mechanism {key}: {'on' if on else 'off'} ({mech['why'][key]})")
        print(f"recommended periods {list(rec)}: {result['predicted_samples_per_s']:.1f} samples/s, "
              f"communication {result['predicted_comm_fraction'] * 100:.1f}%, "
              f"{result['speedup_vs_h1']:.2f}x over H=1")
    if args.out:
        extra = {k: v for k, v in (("chained_allreduce", chained),
                                   ("max_global_period", args.max_global_period),
                                   ("overlap", args.overlap if args.overlap is not None
                                    else mech["mechanisms"]["overlap"]),
                                   ("time_budget", mech["mechanisms"]["time_budget"]),
                                   ("compression", args.compression if args.compression != "none"
                                    else None)) if v}
        write_config(args.out, rec, f"alsgd-tune recommend --profile {args.profile}: predicted "
                     f"{result['predicted_samples_per_s']:.1f} samples/s, comm "
                     f"{result['predicted_comm_fraction'] * 100:.1f}%", extra)
    if args.plot:
        plot(args.plot, model, rec, args.max_period, workers, profile.batch_size, levels)
    return 0


def write_config(path: str, periods, comment: str, extra: dict | None = None) -> None:
    import yaml

    cfg = {"policy": "fixed", "periods": [int(h) for h in periods], **(extra or {})}
    load_config(cfg, env={})  # what we write must load as it is
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"# {comment}\n" + yaml.safe_dump(cfg, sort_keys=False))
    except OSError as exc:
        raise TuneError(f"--out {path!r}: {exc.strerror or exc}") from None
    print(f"wrote {path} (use it with ALSGD_CONFIG={path})")


def plot(path: str, model: CostModel, rec, max_period: int, workers: int, batch: int, levels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, model.num_levels, figsize=(5.5 * model.num_levels, 4), squeeze=False)
    hs = [c for c in CANDIDATES if c <= max_period]
    for lvl, ax in enumerate(axes[0]):
        pts = []
        for h in hs:
            p = list(rec)
            p[lvl] = h
            pts.append(predict(model, p, workers, batch))
        ax.plot(hs, [p["predicted_samples_per_s"] for p in pts], "o-", color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"H at level {lvl} ({levels[lvl][0]}-host), other levels at {list(rec)}")
        ax.set_ylabel("predicted samples/s", color="tab:blue")
        ax.axvline(rec[lvl], color="gray", ls="--", label="recommended")
        ax2 = ax.twinx()
        ax2.plot(hs, [p["predicted_comm_fraction"] * 100 for p in pts], "s-", color="tab:red")
        ax2.set_ylabel("communication share (%)", color="tab:red")
        ax.legend(loc="center right")
    fig.suptitle("alsgd-tune: predicted throughput and communication share")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise TuneError(f"--plot {path!r}: {_one_line(exc)}") from None
    finally:
        plt.close(fig)
    print(f"wrote {path}")


# -- analyze -----------------------------------------------------------------------------------
def cmd_analyze(args) -> int:
    if not os.path.isfile(args.log):
        raise TuneError(f"decision log {args.log!r} does not exist")
    try:
        records = read_log(args.log)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TuneError(f"decision log {args.log!r} is not JSON lines: {_one_line(exc)}") from None
    syncs = [r for r in records if isinstance(r, dict) and "level" in r and "periods" in r]
    measured = [r for r in syncs if _numbers(r.get("link_s")) and _num(r.get("compute_s"))
                and not r.get("from_profile")]
    if not measured:
        raise TuneError(f"decision log {args.log!r} has no sync records with measured times "
                        f"(compute_s, link_s); was it written by adaptive-lsgd's `log` option?")
    levels = len(measured[-1]["link_s"])
    recent = [r for r in measured if len(r["link_s"]) == levels][-max(5, len(measured) // 2):]
    compute = statistics.median(r["compute_s"] for r in recent)
    link_s = [statistics.median(r["link_s"][lvl] for r in recent) for lvl in range(levels)]
    model = CostModel(compute, link_s)
    rec = recommendation(model, args.target_comm_fraction, args.max_period)
    changes, last = [], None
    for r in syncs:
        if r["periods"] != last:
            changes.append({"step": r.get("step"), "periods": r["periods"]})
            last = r["periods"]
    per_level = [sum(1 for r in syncs if r["level"] == lvl) for lvl in range(levels)]
    result = {"periods": list(rec), "predicted_comm_fraction": model.comm_fraction(rec),
              "speedup_vs_h1": model.steps_per_s(rec) / model.steps_per_s([1] * levels),
              "evidence": {"records": len(syncs), "syncs_per_level": per_level,
                           "compute_s": compute, "link_s": link_s,
                           "steps": max((r.get("step") or 0) for r in syncs),
                           "periods_over_time": changes}}
    if args.json:
        print(json.dumps(result))
    else:
        ev = result["evidence"]
        print(f"{args.log}: {ev['records']} syncs over {ev['steps']} steps, syncs per level "
              f"{per_level}")
        print(f"measured (median of the last {len(recent)} syncs): compute "
              f"{compute * 1e3:.2f} ms/step, allreduce per level "
              + ", ".join(f"{t * 1e3:.2f} ms" for t in link_s))
        print("periods over time: " + ", ".join(f"step {c['step']}: {c['periods']}" for c in changes))
        print(f"recommended fixed periods {list(rec)}: predicted communication "
              f"{result['predicted_comm_fraction'] * 100:.1f}%, {result['speedup_vs_h1']:.2f}x "
              f"over H=1")
    if args.out:
        write_config(args.out, rec, f"alsgd-tune analyze {args.log}")
    return 0


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _numbers(v) -> bool:
    return isinstance(v, list) and bool(v) and all(_num(x) for x in v)


# -- command line ------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    v = number(0, lo_open=True)(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{profile,recommend,analyze}")
    pr = sub.add_parser("profile", help="measure compute and allreduce times under horovodrun")
    pr.add_argument("--model", required=True, metavar="FILE.py:FUNC",
                    help="FUNC() returns (model, loss_fn, example_batch)")
    pr.add_argument("--batch-size", type=positive_int, required=True)
    pr.add_argument("-np", "--num-proc", dest="np", type=positive_int, required=True,
                    help="number of workers (as horovodrun -np)")
    pr.add_argument("-H", "--hosts", default=None, help="as horovodrun -H (default localhost:NP)")
    pr.add_argument("--out", required=True, help="the profile to write (JSON)")
    pr.add_argument("--steps", type=positive_int, default=100,
                    help="timed training steps (default 100: a second of steps swings on a busy host)")
    pr.add_argument("--reps", type=positive_int, default=10, help="allreduces per size")
    rc = sub.add_parser("recommend", help="recommend periods per level from a profile")
    rc.add_argument("--profile", required=True)
    rc.add_argument("--hosts", type=positive_int, default=None,
                    help="hosts of the cluster asked about (default: the profile's)")
    rc.add_argument("--workers-per-host", type=positive_int, default=None)
    for kind, where in (("inter", "between hosts"), ("intra", "inside a host")):
        rc.add_argument(f"--{kind}-gbps", type=number(0, lo_open=True), default=None,
                        help=f"link bandwidth {where}, Gbit/s (default: the profile's)")
        rc.add_argument(f"--{kind}-latency-us", type=number(0, lo_open=True), default=None,
                        help=f"allreduce latency {where}, microseconds")
    rc.add_argument("--target-comm-fraction", type=_fraction,
                    default=Config.target_comm_fraction)
    rc.add_argument("--max-period", type=positive_int, default=64)
    rc.add_argument("--max-global-period", type=positive_int, default=None,
                    help="at most this many steps between global averages (config key "
                         "max_global_period)")
    rc.add_argument("--chained-allreduce", choices=("auto", "off", *CHAINED_FORMS),
                    default="auto",
                    help="predict the chained sync (config key chained_allreduce) for the "
                         "cross-host level: auto (the default config: the sliced form where "
                         "the cost model prices it cheaper), off (one allreduce over all "
                         "ranks), or a form")
    rc.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                    help="predict overlapped averaging, or (--no-overlap) blocking averages "
                         "(default: what overlap: auto would pick) (config key overlap: each average runs "
                         "during the next round)")
    rc.add_argument("--compression", choices=("none", "fp16", "bf16"), default="none",
                    help="predict global syncs that send the update in 16 bits (config key "
                         "compression): half the bytes on the cross-host level")
    rc.add_argument("--slow-host-factor", type=number(0, lo_open=True), default=1.0,
                    help="host 0 computes this many times slower (a mixed cluster; default 1)")
    rc.add_argument("--uneven-steps", action="store_true",
                    help="the training loop accepts per-rank step counts (allow_uneven_steps): "
                         "time_budget: auto may engage")
    rc.add_argument("--json", action="store_true", help="print one JSON object")
    rc.add_argument("--out", metavar="CFG.yaml", help="write the recommended config")
    rc.add_argument("--plot", metavar="OUT.png", help="plot throughput and comm share against H")
    an = sub.add_parser("analyze", help="recommend fixed periods from a run's decision log")
    an.add_argument("log", metavar="RUN.jsonl")
    an.add_argument("--target-comm-fraction", type=_fraction,
                    default=Config.target_comm_fraction)
    an.add_argument("--max-period", type=positive_int, default=64)
    an.add_argument("--json", action="store_true")
    an.add_argument("--out", metavar="CFG.yaml")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return worker(json.loads(os.environ[SETTINGS_ENV]))
    args = build_parser().parse_args(argv)
    try:
        return {"profile": cmd_profile, "recommend": cmd_recommend,
                "analyze": cmd_analyze}[args.command](args)
    except (TuneError, ProfileError, ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - never a traceback for the user
        print(f"{PROG}: internal error ({_one_line(exc)}); please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
