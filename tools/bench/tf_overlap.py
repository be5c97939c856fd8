"""What overlapped averaging buys a TensorFlow job: the same Keras model trained with blocking
and with overlapped averages, in one job, segments interleaved.

On the emulated cluster (root), for example 2 hosts at 100 Mbit/s::

    python -m adaptive_lsgd.tools.cluster --hosts 2 --rate-mbit 100 -- \\
        python -m adaptive_lsgd.tools.bench.tf_overlap --period 16

(or under ``horovodrun -np 2 -H localhost:2 --gloo`` on one machine). ``--period H``: fixed H
with ``overlap: true`` against ``overlap: false``; ``--period 0``: the default config
(``overlap: auto``) against the same with ``overlap: false``. A segment that ends with an
average in flight waits for it and is charged only what the rest of its round would not have
hidden (as ``alsgd-bench`` does). Prints (rank 0) each variant's median samples/s over the
rounds after the first, and the median of the per-round ratios.
The model is an MLP of 1.05M parameters (4.2 MB) on random data, 64 samples per step.
"""

import argparse
import json
import statistics
import time

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

import adaptive_lsgd.integrations.tensorflow as alsgd  # before hvd.init()

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build(config: dict):
    """A fresh model (seed 0), its optimizer, LocalSGD with ``config`` and a traced step."""
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    model = tf.keras.Sequential([layers.Input((40,)), layers.Dense(1000, activation="relu"),
                                 layers.Dense(1000, activation="relu"), layers.Dense(10)])
    opt = tf.keras.optimizers.SGD(0.05)
    lsgd = alsgd.LocalSGD(model, opt, config=config)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        tape = alsgd.DistributedGradientTape(tape, lsgd)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))

    return lsgd, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--period", type=int, default=16,
                    help="fixed H of both variants; 0: the default config (overlap: auto)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--segment-steps", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    hvd.init()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    if args.period:
        fixed = {"policy": "fixed", "periods": [args.period]}
        configs = {"blocking": {**fixed, "overlap": False}, "overlap": {**fixed, "overlap": True}}
    else:
        configs = {"blocking": {"overlap": False}, "overlap": {}}
    variants = {name: build(cfg) for name, cfg in configs.items()}
    rng = np.random.default_rng(hvd.rank())
    x = rng.normal(size=(64, 40)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    rates: dict = {name: [] for name in variants}
    for rnd in range(args.rounds):
        order = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
        for name in order:
            lsgd, step = variants[name]
            hvd.allreduce(tf.zeros(1), name=f"tf_overlap.barrier.{rnd}.{name}")
            lsgd.reset_step_timer()
            start = time.perf_counter()
            for _ in range(args.segment_steps):
                with lsgd.step():
                    step(x, y)
            # The average in flight completes here, before the other variant runs. In an
            # unbroken run the rest of its round would have computed meanwhile: the segment is
            # charged only the wait that rest would not have hidden (as alsgd-bench does).
            sched = lsgd.scheduler
            left = sched.steps_to_sync() if lsgd._inflight is not None else 0
            step_s = sched.model.compute_s if sched.model is not None else 0.0
            waited = lsgd.wait_for_average()
            seconds = time.perf_counter() - start - min(waited, left * step_s)
            rates[name].append(args.segment_steps * 64 * hvd.size() / seconds)
    if hvd.rank() == 0:
        kept = {name: r[1:] for name, r in rates.items()}  # the first round measures and traces
        out = {"period": args.period or "default",
               "periods": {n: list(v[0].scheduler.periods) for n, v in variants.items()},
               "mechanisms": {n: v[0].scheduler.decision.mechanisms for n, v in variants.items()},
               "median_samples_per_s": {n: statistics.median(r) for n, r in kept.items()},
               "paired_ratio": statistics.median(
                   [o / b for o, b in zip(kept["overlap"], kept["blocking"])]),
               "rates": rates}
        print(json.dumps(out))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh)


if __name__ == "__main__":
    main()
