"""The results page of ``alsgd-bench``: PNG plots and ``docs/benchmarks.md`` from the JSON files.

Example (after ``alsgd-bench all --quick --out docs/bench``)::

    from adaptive_lsgd.tools.bench.report import report
    report("docs/bench", "docs/benchmarks.md")   # writes docs/bench/*.png and the page
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics

ORDER = ["comm-bound", "accuracy", "lm", "overhead", "hierarchical", "heterogeneous", "throttle",
         "changing-network"]

COMMAND = "sudo make bench            # = .venv/bin/alsgd-bench all --quick --out docs/bench " \
          "--doc docs/benchmarks.md"

METHOD = """\
## How the numbers are taken

* **One invocation per scenario, interleaved.** Every variant trains its own copy of the model
  in the same Horovod job on the same emulated cluster. In each round every variant runs one
  segment (the same number of steps; time-budget variants run whole rounds until the slowest
  rank has taken that many steps, the faster ranks take more), and the order of the variants
  rotates from round to round, so slow drifts of the machine hit every variant alike.
  `samples_per_s` is the **median over rounds** of (samples taken by all ranks in the segment) /
  (segment wall time on rank 0). A segment starts and ends with a one-float allreduce, so its
  time includes waiting for the slowest rank. Before round 1 a throw-away model takes a few
  untimed steps. In `changing-network` (the link drops half-way) and `throttle` (a host slows
  down half-way) `samples_per_s` is the whole
  run's samples / segment time instead of a median.
* **Overlap.** Horovod's gradient allreduce, started by the backward hooks, runs while the rest of
  the step (the emulated device time) passes, as it would overlap a GPU's backward pass; model
  averaging (ours and the PyTorch peer's) runs after the optimizer step and does not overlap.
* **Cluster.** `adaptive_lsgd.tools.cluster.EmulatedCluster`: one network namespace per host,
  links shaped with `tc tbf` in both directions (traffic between hosts crosses two shaped links),
  workers of one host talk over loopback. Compute-bound scenarios with 4 workers (or a slow link
  to emulate) use an *emulated device step*: the real forward/backward of the model, padded with a
  sleep to a fixed step time (`compute_ms`), so that 4 processes on 2 cores do not measure CPU
  contention; the slow host of `heterogeneous` sleeps in proportion to its measured compute.
* **Variants.** `compute-only`: the same loop with no communication; its samples/s is the sum
  over ranks of each rank's own rate (no rank waits for another), the limit for every variant. `horovod`:
  `hvd.DistributedOptimizer`. `horovod-accumulate`: the same with `backward_passes_per_step=H`
  (the large-batch alternative: one allreduce per H micro-batches, one update per H).
  `local-hH`: our local SGD with the fixed period H (`policy: fixed`). `torch-peer`: PyTorch's
  `PostLocalSGDOptimizer` + `PeriodicModelAverager(period=H)` over `torch.distributed` (Gloo),
  with DDP and `post_localSGD_hook` for its warm-up. `adaptive`: the default config, no key set
  (periods chosen online, `target_comm_fraction` 0.02 (0.05 before 2026-12-07 15:00 UTC, 0.1
  before 2026-12-07 04:24 UTC: each scenario says which its run had), `max_period` 64, `time_budget: auto` and
  `overlap: auto`; the worker's loop streams batches and calls `allow_uneven_steps`);
  `adaptive-chained` in `hierarchical` the chained sync and `max_global_period: 16`, see there;
  `adaptive-leaders` the same with the leaders' form of the chained sync;
  `adaptive-blocking` the default with `overlap: false` (blocking averages: in `hierarchical`
  the chained sync the default took before `overlap: auto` could replace it);
  `adaptive-overlap` with `overlap: true`, each average running in the
  background during the next round; at a segment's end it waits for the one in flight, so the
  other variants never run beside it, and the segment is charged only the part of that wait
  that the rest of the round, in an unbroken run, would not have hidden).
  `hier-AxB`: fixed hierarchical periods.
* **Columns.** `comm_fraction`: ours from the integration's summary (collective time / (compute +
  collective time)); the others, and our `overlap` variants (whose summaries count each segment's
  final wait in full), `1 - samples_per_s / compute-only samples_per_s`. `test_acc`:
  the average of the ranks' models on the MNIST-1D test set at the end. `global_syncs`: global
  synchronisations per rank; a mini-batch (gradient allreduce) step counts as one.
"""


def _load(out_dir: str) -> dict:
    docs = {}
    for name in ORDER:
        path = os.path.join(out_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                docs[name] = json.load(f)
    if not docs:
        raise ValueError(f"no scenario JSON files in {out_dir} (expected e.g. comm-bound.json)")
    return docs


def _load_seeds(out_dir: str, name: str, doc: dict) -> list:
    """``doc`` (seed 0) and the ``NAME-seedN.json`` runs beside it (``alsgd-bench --seed N``)."""
    runs = [doc]
    for path in sorted(glob.glob(os.path.join(out_dir, f"{name}-seed*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def _seeds_section(runs: list) -> list:
    """The per-seed test accuracies, their means and the goals on the means."""
    from adaptive_lsgd.tools.bench.scenarios import seed_summary

    summ = seed_summary(runs)
    n = len(summ["seeds"])
    lines = [f"Across {n} seeds ({', '.join(map(str, summ['seeds']))}; each seed is one full "
             "run of the scenario, `alsgd-bench SCENARIO --seed N`): test accuracy per seed, the "
             "mean, and the mean difference to `horovod` in points.", "",
             "| variant | " + " | ".join(f"seed {s}" for s in summ["seeds"])
             + " | mean | vs horovod (points) | global syncs (mean) |",
             "|---|" + "---:|" * (n + 3)]
    for v, row in summ["variants"].items():
        if v == "compute-only":
            continue
        lines.append(f"| {v} | " + " | ".join(f"{100 * a:.2f}%" for a in row["accs"])
                     + f" | {100 * row['mean']:.2f}% | {row.get('diff', float('nan')):+.2f} | "
                       f"{row['syncs']:.0f} |")
    lines.append("")
    for g in summ["goals"]:
        lines.append(f"- {g['goal']}: {g['value']:+.2f} ({'met' if g['met'] else 'missed'})")
    return lines + [""]


def _pyplot():
    """matplotlib.pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(docs: dict, path: str) -> None:
    plt = _pyplot()

    names = list(docs)
    cols = 2
    rows = (len(names) + 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        res = docs[name]["results"]
        labels = list(res)
        values = [res[k]["samples_per_s"] for k in labels]
        colors = ["#888888" if k == "compute-only" else "#d62728" if k.startswith("horovod")
                  else "#9467bd" if k == "torch-peer" else "#2ca02c" if "adaptive" in k else "#1f77b4"
                  for k in labels]
        ax.barh(labels, values, color=colors)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("samples/s (median over rounds)")
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    _save(plt, fig, path)


def plot_accuracy(doc: dict, path: str) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, row in doc["results"].items():
        if row.get("accs") and name != "compute-only":
            xs, ys = zip(*row["accs"])
            ax.plot(xs, [100 * y for y in ys], marker=".", label=name)
    ax.set_xlabel("training samples (all workers)")
    ax.set_ylabel("test accuracy (%) of the averaged model")
    ax.set_title("accuracy: MNIST-1D, 4 workers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_lm(doc: dict, path: str) -> None:
    """Validation loss of the averaged model against training tokens and against the
    variant's own wall time (its segments only: the variants share the job)."""
    plt = _pyplot()

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    context = 64
    for name, row in doc["results"].items():
        accs = [a for a in row.get("accs", []) if len(a) >= 4]
        if not accs or name == "compute-only":
            continue
        by_tokens.plot([a[0] * context / 1e6 for a in accs], [a[2] for a in accs], marker=".",
                       label=name)
        by_time.plot([a[3] for a in accs], [a[2] for a in accs], marker=".", label=name)
    by_tokens.set_xlabel("training tokens, all workers (millions)")
    by_time.set_xlabel("wall time of the variant's own segments (s)")
    by_tokens.set_ylabel("validation loss (nats per byte)")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    fig.suptitle("lm: byte-level transformer, 4 workers, 2 hosts at 100 Mbit/s")
    _save(plt, fig, path)


def _lm_table(doc: dict) -> list:
    from adaptive_lsgd.tools.bench.scenarios import equal_tokens, lm_loss_at

    res = doc["results"]
    equal = equal_tokens(res)
    lines = [f"| variant | validation loss at {equal * 64 / 1e6:.2f}M tokens | perplexity (per "
             "byte) | final loss | tokens trained | tokens/s | x horovod | global syncs | bytes "
             "per sync (per rank) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = res.get("horovod", {}).get("samples_per_s")
    for name, r in res.items():
        if r.get("val_loss") is None:
            continue
        at = lm_loss_at(r, equal)
        tokens = r["samples_per_s"] * 64
        ratio = f"{r['samples_per_s'] / base:.2f}" if base else ""
        sent = "" if name == "compute-only" else f"{r.get('bytes_per_sync', 0) / 1e6:.2f} MB"
        lines.append(f"| `{name}` | {at:.4f} | {math.exp(at):.3f} | {r['val_loss']:.4f} | "
                     f"{r['samples'] * 64 / 1e6:.2f}M | {tokens:.0f} | {ratio} | "
                     f"{r['global_syncs']} | {sent} |")
    return lines + [""]


def plot_periods(doc: dict, path: str) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 4))
    trace = doc["results"].get("adaptive", {}).get("trace", [])
    if trace:
        ax.step([t for t, _, _ in trace], [p[-1] if len(p) == 1 else p[0] * p[1] for _, _, p in trace],
                where="post", label="adaptive: global period H")
    if doc.get("drop_t") is not None:
        ax.axvline(doc["drop_t"], color="#d62728", linestyle="--",
                   label=f"link {doc['cluster']['rate_mbit']} -> {doc['cluster']['drop_to_mbit']} Mbit/s")
    ax.set_xlabel("job time (s); the adaptive variant runs one segment per round")
    ax.set_ylabel("H (steps between global averages)")
    ax.set_yscale("log", base=2)
    ax.set_title("changing-network: H chosen over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def _table(doc: dict) -> list:
    lines = ["| variant | samples/s | x horovod | of compute-only | comm_fraction | test_acc | "
             "global_syncs |", "|---|---:|---:|---:|---:|---:|---:|"]
    res = doc["results"]
    base = res.get("horovod", {}).get("samples_per_s")
    limit = doc.get("compute_only_samples_per_s")
    for name, r in res.items():
        sps = r["samples_per_s"]
        lines.append(f"| `{name}` | {sps:.0f} | {sps / base:.2f} | {sps / limit:.2f} | "
                     f"{r['comm_fraction']:.1%} | {100 * r['test_acc']:.2f}% | {r['global_syncs']} |"
                     if base and limit else f"| `{name}` | {sps:.0f} | | | {r['comm_fraction']:.1%} | "
                     f"{100 * r['test_acc']:.2f}% | {r['global_syncs']} |")
    return lines


def _mechanisms(doc: dict) -> list:
    """What the default config's auto mechanisms were at the end of the run."""
    r = doc["results"].get("adaptive", {})
    mech = r.get("mechanisms")
    if not mech:
        return []
    on = [k for k, v in mech.items() if v] or ["none (step-count rounds, blocking averages)"]
    split = f", steps per round by rank {r['rank_steps']}" if r.get("rank_steps") else ""
    return ["", f"`adaptive` (the default config of the run's date, `target_comm_fraction` "
            f"{default_target(doc):g}) ended with periods {r.get('periods')}, "
            f"mechanisms: {', '.join(on)}{split}."]


def default_target(doc: dict) -> float:
    """The default ``target_comm_fraction`` a run's ``adaptive`` variant had: recorded since
    2026-12-07; before that 0.1 until 2026-12-07 04:24 UTC, then 0.05."""
    if "default_target_comm_fraction" in doc:
        return doc["default_target_comm_fraction"]
    return 0.1 if doc.get("date", "") < "2026-12-07 04:24" else 0.05


def _stalls(doc: dict) -> list:
    """One line naming the rounds that stalled (over 3x their variant's median), if any."""
    found = [f"`{name}` round(s) {', '.join(str(i + 1) for i in r['stalls'])}"
             for name, r in doc["results"].items() if r.get("stalls")]
    if not found:
        return ["", "No stalled round (none took over 3x its variant's median segment time)."]
    return ["", "Stalled rounds (over 3x their variant's median segment time; medians and "
            "per-round pairs do not rest on them): " + "; ".join(found) + "."]


def _goals(doc: dict) -> list:
    if not doc.get("goals"):
        return []
    lines = ["", "| goal | measured | |", "|---|---:|---|"]
    for g in doc["goals"]:
        val = "n/a" if g["value"] is None else f"{g['value']:.2f}"
        lines.append(f"| {g['goal']} | {val} | {'met' if g['met'] else '**missed**'} |")
    return lines


def _target_of(variant: str) -> float | None:
    """The ``target_comm_fraction`` of a previous-default variant (``adaptive-t05``: 0.05)."""
    head, _, digits = variant.rpartition("-t")
    return int(digits) / 100 if head == "adaptive" and digits.isdigit() else None


def _paired_quartiles(res: dict, a: str, b: str) -> tuple:
    """Quartiles of ``a``'s over ``b``'s per-round samples/s and the number of rounds; (None, n)
    with fewer than 4 rounds."""
    from adaptive_lsgd.tools.bench.scenarios import paired_ratios

    r = paired_ratios(res, a, b)
    return (statistics.quantiles(r, n=4) if len(r) >= 4 else None), len(r)


def _notes(name: str, doc: dict) -> list:
    """Why a goal is met or missed, from the scenario's own figures."""
    res, out = doc["results"], []
    limit = doc.get("compute_only_samples_per_s")
    hv = res.get("horovod")
    if name == "comm-bound" and hv and limit:
        per_step = doc["ranks"] * doc["settings"]["batch"]
        c, t_h = per_step / limit, per_step / hv["samples_per_s"]
        t = max(t_h - c, 1e-9)
        need = 9 * t / c
        text = (f"Measured: compute {c * 1e3:.0f} ms/step, one model allreduce about {t * 1e3:.0f} ms "
                f"(horovod step - compute step). 0.9 of compute-only needs H >= 9 x {t * 1e3:.0f} / "
                f"{c * 1e3:.0f} = {need:.0f} local steps per average. ")
        if need > 64:
            text += (f"That is above `max_period` (64 by default, a convergence cap), so the adaptive "
                     f"policy stops at H = 64, where the cost model predicts "
                     f"{64 * c / (64 * c + t):.2f} of compute-only: with the default cap the 0.9 goal "
                     f"is out of reach for this model on this link, by design. `max_period: 128` "
                     f"would allow it, at a cost in accuracy per sample.")
        else:
            text += "That is within `max_period` (64), so a shortfall here is measurement noise."
        out.append(text)
        ov = res.get("adaptive-overlap")
        target = default_target(doc)
        previous = [v for v in res if _target_of(v) is not None]
        if ov:
            out.append(
                f"`adaptive-overlap` (`overlap: true`) runs each average in the background while the "
                f"next round computes, so a round costs about max(H x compute, allreduce) instead of "
                f"their sum: the allreduce is hidden once H >= {t * 1e3:.0f} / {c * 1e3:.0f} = "
                f"{t / c:.0f}, well inside `max_period`. The policy models that (the exposed share "
                f"is what the next round does not cover) and takes the smallest H whose exposed share "
                f"is under `target_comm_fraction`: with the default {target:g} that is about "
                f"{1 - target:g} x {t / c:.0f}, which gives away up to {target:.0%} by design"
                + "".join(f" (`{v}`, the default config with {_target_of(v):g}, a default before, "
                          f"gives away up to {_target_of(v):.0%})" for v in previous)
                + ". Its averages are one round stale: at a round's "
                "end each rank moves half way (`overlap_pull: 0.5`) towards the average of the "
                "models of the previous round's end and keeps the local steps it took since.")
            from adaptive_lsgd.tools.bench.scenarios import paired_ratio

            pairs = []
            for v in ["adaptive-overlap"] + previous:
                if v not in res:
                    continue
                q, n = _paired_quartiles(res, v, "compute-only")
                ratio = paired_ratio(res, v, "compute-only")
                ends = res[v].get("periods") or ["?"]
                pairs.append(f"`{v}` ended at H = {ends[0]}; of compute-only round by round (same round): "
                             f"median {ratio:.2f}" + (f" (quartiles {q[0]:.2f}-{q[2]:.2f}, {n} rounds)"
                                                      if q else "")
                             + f", against {res[v]['samples_per_s'] / limit:.2f} as the ratio of the "
                               f"medians over rounds (the goal's figure); test accuracy "
                               f"{(res[v]['test_acc'] - hv['test_acc']) * 100:+.2f} points against "
                               f"`horovod`")
            if pairs:
                out.append("; ".join(pairs) + ". The first round of each adaptive variant is its "
                           "measuring phase (H = 1 until the link is measured, then H rises over a few "
                           "syncs under the hysteresis).")
    if name == "changing-network" and res.get("adaptive", {}).get("trace"):
        trace, drop = res["adaptive"]["trace"], doc.get("drop_t")
        before = [p for t, _, p in trace if drop is None or t < drop]
        from adaptive_lsgd.tools.bench.scenarios import reference_h

        ref = reference_h(doc)
        why = ("fixed, from its second segment on, at the global period the adaptive variant "
               "chose in its first segment on the starting link; the grid's conservative pick "
               f"`{reference_h(doc, grid_only=True)}` (the smallest grid H at or above it) is "
               "given too") if ref == "local-h-start" else (
               "the smallest fixed H at or above the period the adaptive policy chose for the "
               "starting link (a larger fixed H loses less after the drop, so this is the "
               "conservative pick)")
        out.append(f"The reference is `{ref}`: {why}. "
                   f"The adaptive variant used H = {before[-1] if before else '?'} before the drop "
                   f"and H = {trace[-1][2]} at the end (`bench/changing_network_h.png`). "
                   f"Each variant spends about half its segments on each link, so the gain is bounded "
                   f"by how much the fixed H loses after the drop; and the policy raises H over "
                   f"a few syncs (the timing window restarts after 3 samples beyond 2x its median, "
                   f"then a shared history of 5 link estimates and the hysteresis).")
        fixed = [k for k in res if k.startswith("local-h")]
        if ref in res and fixed and all(len(res[k]["rates"]) == len(res[ref]["rates"]) for k in fixed):
            # the best any fixed-per-round choice of the grid could do: each round at the rate of
            # the fastest fixed variant in that round (equal samples per round)
            best = [max(res[k]["rates"][i] for k in fixed) for i in range(len(res[ref]["rates"]))]
            bound = sum(1 / r for r in res[ref]["rates"]) / sum(1 / r for r in best)
            out.append(f"An oracle that ran every round at the fastest fixed H of that round (the "
                       f"grid and `{ref}`) would reach {bound:.2f}x `{ref}` over the whole run: "
                       f"the goal's 1.3x needs a starting choice that loses more after the drop "
                       f"than this one does.")
    if name == "heterogeneous":
        out.append("compute-only is the sum of each rank's own rate, so with one host 2x slower the "
                   "fixed-step variants (the fast rank waits at every average) can reach at most "
                   "2/3 of it; time-budget rounds let the fast rank take up to 2x the steps per round "
                   "(the average is weighted by steps), which can approach the limit.")
    if name == "throttle":
        fixed = [k for k in res if k.startswith("local-h")]
        if fixed and limit:
            best = max(fixed, key=lambda k: res[k]["samples_per_s"])
            bound = limit / res[best]["samples_per_s"]
            out.append(
                f"No variant can beat compute-only (each rank at its own rate, never waiting): "
                f"{limit:.0f} samples/s, {bound:.2f}x the best fixed H with step-count rounds "
                f"(`{best}`), so a goal above {bound:.2f}x that is out of reach here by "
                f"construction. With one host 2x slower for the second half only, time-budget "
                f"rounds can gain at most 1.5x in that half and nothing in the first: "
                f"(2 + 3) / (2 + 2) = 1.25x over the whole run.")
    if name == "hierarchical":
        pairs = [f"`{v}` {q[1]:.2f} (quartiles {q[0]:.2f}-{q[2]:.2f})"
                 for v in ("adaptive", "adaptive-chained", "adaptive-leaders", "hier-4x4",
                           "hier-4x4-allreduce")
                 for q, _ in [_paired_quartiles(res, v, "local-h16")] if q]
        periods = res.get("adaptive", {}).get("periods")
        mech = res.get("adaptive", {}).get("mechanisms") or {}
        chained = res.get("adaptive-chained", {}).get("periods")
        out.append(
            "The fixed and chained variants average all four ranks every 16 steps "
            f"(`adaptive-chained`: at most every 16, `max_global_period: 16`; it chose periods "
            f"{chained} per level). `adaptive` is the default config, whose global period is at "
            f"most `max_period` (64) in a hierarchy too: it chose periods {periods} per level "
            f"(global period {math.prod(periods or [0])}"
            + (", its averages overlapped: one allreduce over all ranks in the background, "
               "which the cost model priced faster than the blocking chained sync"
               if mech.get("overlap") else "")
            + "); its goal compares it with the flat variant at that global period where the "
            "run has one, else the one with the next longer period (`local-h64`: fewer "
            "averages, a comparison no kinder to it); its per-round ratio to `local-h16` below "
            "is for reference only. `local-h16` averages with one "
            "allreduce over all ranks: in "
            "Gloo's ring each host's link carries 1.5x the model each way. `adaptive-chained` and "
            "`hier-4x4` use the sliced chained sync (`chained_allreduce: true`): a reduce-scatter "
            "inside each host (loopback) leaves each worker the host's sum of half the model, the "
            "two workers holding the same half (one per host) allreduce it, and an allgather "
            "inside the host puts the halves together; each host's link carries the model once "
            "each way, split over its two workers. `adaptive-leaders` is `adaptive-chained` with the "
            "leaders' form (`chained_allreduce: leaders`: a sum inside each host, an allreduce "
            "between the two host leaders, a sum back down). `hier-4x4-allreduce` averages its "
            "blocks like `hier-4x4` but its global sync is one allreduce over all ranks, so it "
            "only adds the intra-host averages to `local-h16`. Per-round samples/s ratios to "
            "`local-h16` (same round): " + "; ".join(pairs) + ". With 2 workers per host a "
            "chained sync can save at most a third of the bytes on the slow link (1.5x on the "
            "transfer, less end to end, since compute and the intra-host stages stay). Per-round "
            "samples/s ranged "
            + "; ".join(f"`{v}` {min(res[v]['rates']):.0f}-{max(res[v]['rates']):.0f}"
                        for v in ("torch-peer", "local-h16", "adaptive", "horovod-accumulate")
                        if v in res)
            + ". Horovod's PyTorch `synchronize` busy-waits (`sched_yield`) until a collective "
            "completes, a core per waiting rank; with 4 ranks on 2 cores that starved the "
            "transfers and made single averages seconds slower at random. The integration waits "
            "for its own averages by polling with short sleeps; `horovod` and "
            "`horovod-accumulate` go through Horovod's optimizer and keep its busy wait.")
    if name == "accuracy":
        out.append("All variants see the same number of samples. `local-h8`/`local-h32` run local SGD "
                   "from step 0; `post-local-h32`, `torch-peer`, `adaptive` and `adaptive-qsr` start "
                   "with mini-batch "
                   "SGD (gradient allreduce) for 5% of the steps, then switch (post-local SGD). A "
                   "mini-batch step counts as a global sync, so the syncs are the warm-up steps plus "
                   "one per local period. `adaptive-qsr` adds the quadratic synchronisation rule "
                   "(`qsr_alpha: 0.141`: global period at most (0.141 / LR)^2, i.e. 8 at the initial "
                   "LR 0.05 and up to `max_period` after the first 10x drop). Accuracy is one seed "
                   "per variant; on MNIST-1D differences below about one point are within "
                   "seed-to-seed noise, and the adaptive variants' periods follow measured times, "
                   "so their accuracy also moves between runs of the same seed.")
    if name == "overhead":
        spread = [f"`{v}` {q[1]:.3f} (quartiles {q[0]:.2f}-{q[2]:.2f}, {n} rounds)"
                  for v in ("local-h1", "alsgd-minibatch")
                  for q, n in [_paired_quartiles(res, "horovod", v)] if q]
        mb = (f"{res['alsgd-minibatch']['test_acc']:.2%} against `horovod`'s "
              f"{res['horovod']['test_acc']:.2%}" if "alsgd-minibatch" in res else "n/a")
        out.append(
            "The goals compare step times round by round: per round, `horovod`'s samples/s over "
            "the variant's (both ran in the same round), then the median over rounds: "
            + "; ".join(spread) + ". Two workers share two cores with Horovod's and Gloo's "
            "threads, so single rounds scatter widely; only the median of many rounds means "
            "anything. `alsgd-minibatch` runs Horovod's own gradient hooks (from the same seeds, "
            f"test accuracy {mb}): its ratio is our per-step bookkeeping. `local-h1` replaces the "
            "per-tensor gradient allreduce by one grouped allreduce of the parameters after the "
            "step. `torch-peer` and `local-h4` average at the same period: the peer calls Gloo "
            "directly, ours goes through Horovod's background thread and its per-collective "
            "negotiation, which dominates on a fast link.")
    if name in ("comm-bound", "accuracy") and "horovod-accumulate" in res:
        out.append("`horovod-accumulate` keeps the others' learning rate (loss divided by H, so the "
                   "update is the mean gradient of H micro-batches) and makes H times fewer "
                   "updates; its accuracy shows that cost, without LR re-tuning for the large batch.")
    return [line for text in out for line in ("", text)]


SYNC_COMMAND = ("sudo .venv/bin/python -m adaptive_lsgd.tools.cluster --hosts 2 --workers-per-host 2 "
                "--rate-mbit 50 -- .venv/bin/python -m adaptive_lsgd.tools.bench.sync --reps 12 "
                "--json docs/bench/sync.json")


def _sync_note(out_dir: str) -> list:
    """The single-average timings of ``tools/bench/sync.py`` (``sync.json``), if present."""
    path = os.path.join(out_dir, "sync.json")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        sync = json.load(fh)
    med, ratio = sync["median_s"], sync["ratio_to_flat"]
    parts = [f"`{v}` {med[v]:.2f} s" + (f" (flat / {v}: {ratio[v]:.2f}x)" if v in ratio else "")
             for v in med]
    return [f"One global average of the {sync['bytes'] / 1e6:.1f} MB model in isolation, the same "
            f"cluster, {sync['reps']} interleaved repetitions, median of the slowest rank "
            f"(`{SYNC_COMMAND}`): " + ", ".join(parts) + ".", ""]


def _launch_note(out_dir: str) -> list:
    """The same scenario started by the emulator and by the real launchers over ssh
    (``launch/<scenario>-<launcher>.json``, from ``alsgd-bench SCENARIO --launcher L``)."""
    from adaptive_lsgd.tools.bench.scenarios import paired_ratio

    paths = sorted(glob.glob(os.path.join(out_dir, "launch", "*.json")))
    if not paths:
        return []
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    names = [n for n in ("horovod", "local-h16", "torch-peer", "adaptive", "adaptive-chained")
             if all(n in d["results"] for d in runs)]
    lines = ["### Launched as users launch", "",
             "The same scenario, its workers started by the emulator (`ip netns exec` with "
             "horovodrun's rank variables) and by `alsgd-run -np 4 -H ADDRESS:2,ADDRESS:2` from the "
             "root namespace over ssh to the emulated hosts (`--launcher`), samples/s:", "",
             "| launcher | date | " + " | ".join(f"`{n}`" for n in names) + " | adaptive / local-h16 |",
             "|---|---|" + "---:|" * (len(names) + 1)]
    for d in runs:
        r = d["results"]
        ratio = paired_ratio(r, "adaptive", "local-h16") if "local-h16" in r else None
        lines.append(f"| {d.get('launcher', 'emulator')} ({d['scenario']}{', quick' if d['quick'] else ''})"
                     f" | {d['date']} | " + " | ".join(f"{r[n]['samples_per_s']:.0f}" for n in names)
                     + f" | {'n/a' if ratio is None else f'{ratio:.2f}x'} |")
    return lines + [""]


def report(out_dir: str, doc_path: str | None = None) -> str:
    """Write the PNGs into ``out_dir`` and (if ``doc_path``) the markdown page; return the page."""
    docs = _load(out_dir)
    plot_throughput(docs, os.path.join(out_dir, "throughput.png"))
    if "accuracy" in docs:
        plot_accuracy(docs["accuracy"], os.path.join(out_dir, "accuracy.png"))
    if "lm" in docs:
        plot_lm(docs["lm"], os.path.join(out_dir, "lm.png"))
    if "changing-network" in docs:
        plot_periods(docs["changing-network"], os.path.join(out_dir, "changing_network_h.png"))
    first = next(iter(docs.values()))
    dates = [d["date"] for d in docs.values()]
    rel = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(doc_path)) if doc_path else out_dir)
    full = [f"`{n}`" for n, d in docs.items() if not d.get("quick")]
    if len(full) == len(docs):
        how = ""
    elif full:
        how = f" Run with `--quick` (fewer rounds and steps) except {', '.join(full)}."
    else:
        how = " Run with `--quick` (fewer rounds and steps)."
    lines = ["# Benchmarks", "",
             f"Machine: {first['machine']}. Measured {min(dates)} to {max(dates)}.{how} On a machine "
             f"shared with other jobs the figures move by 10-20% between runs: read them as "
             f"preliminary unless taken on a quiet machine.", "",
             "Regenerate everything on this page (needs root for the emulated cluster; about "
             "35 minutes with `--quick` on a 2-core machine; drop `--quick` for about twice the rounds, "
             "about 90 minutes):", "", "```bash", COMMAND,
             ".venv/bin/alsgd-bench report --out docs/bench --doc docs/benchmarks.md   "
             "# re-plot only", "```", "",
             "One scenario: `alsgd-bench comm-bound --json comm-bound.json [--quick]`.", "",
             METHOD, f"![throughput]({rel}/throughput.png)", ""]
    from adaptive_lsgd.tools.bench.scenarios import goals

    for name, doc in docs.items():
        doc["goals"] = goals(name, doc)  # the goals as this code states them, from the results
        cl = doc["cluster"]
        lines += [f"## `{name}`", "", f"{doc['about']}. {doc['ranks']} ranks, {doc['params']} "
                  f"parameters, batch {doc['settings']['batch']} per rank, {doc['settings']['rounds']} "
                  f"rounds x {doc['settings']['segment_steps']} steps per variant; job "
                  f"{doc['wall_s']:.0f} s. Links "
                  f"{'unshaped (loopback)' if cl['rate_mbit'] is None else str(cl['rate_mbit']) + ' Mbit/s'}"
                  f"{', slowdown ' + str(cl['slowdown']) if cl.get('slowdown') else ''}. "
                  f"compute-only: {doc['compute_only_samples_per_s']:.0f} samples/s.", ""]
        lines += (_table(doc) + _goals(doc) + _mechanisms(doc) + _stalls(doc) + _notes(name, doc)
                  + [""])
        if name == "hierarchical":
            lines += _sync_note(out_dir) + _launch_note(out_dir)
        if name == "accuracy":
            runs = _load_seeds(out_dir, name, doc)
            if len(runs) > 1:
                lines += _seeds_section(runs)
            lines += [f"![accuracy vs samples]({rel}/accuracy.png)", ""]
        if name == "lm":
            lines += (["Validation loss of the averaged model at equal tokens (its per-round "
                       "curve interpolated at the tokens every variant reached: time-budget "
                       "rounds let the faster ranks take more steps), next-byte perplexity "
                       "e^loss, the final loss, tokens/s (samples/s x 64):", ""]
                      + _lm_table(doc) + [f"![lm validation loss]({rel}/lm.png)", ""])
        if name == "changing-network":
            lines += [f"![H over time]({rel}/changing_network_h.png)", ""]
    page = "\n".join(lines).rstrip() + "\n"
    if doc_path:
        with open(doc_path, "w") as f:
            f.write(page)
    return page
