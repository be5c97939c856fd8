"""What one TensorFlow model average costs against the allreduce inside it (MobileNetV2).

Run under horovodrun (2 ranks):
    horovodrun -np 2 -H localhost:2 --gloo python -m adaptive_lsgd.tools.bench.tf_sync
Every step is followed by a sync (policy fixed, period 1); the script times each whole
``LocalSGD`` sync and the Horovod grouped allreduces inside it, and prints the medians and
their ratio (rank 0): what the sync costs outside its collectives.

Every other sync is *aligned*: a one-float allreduce (not counted) first, so that the ranks
enter it together. Without it (the way a job runs) a rank that finishes its step first packs
while the other still trains on the same cores, and its allreduce includes the wait for the
other rank; the aligned figures show the sync's own cost.

MobileNetV2 (262 variables, 3.5 M parameters; ``weights=None``, nothing is downloaded) is the
model of Horovod's ``tensorflow2_synthetic_benchmark.py --model MobileNetV2``; the input size
does not change the sync, so the default is small (64 x 64) to keep the steps short on a CPU.
"""

import argparse
import json
import statistics
import time

import horovod.tensorflow as hvd
import tensorflow as tf

import adaptive_lsgd.integrations.tensorflow as alsgd  # before hvd.init()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=48, help="syncs, half of them aligned")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    hvd.init()
    tf.random.set_seed(hvd.rank())
    model = tf.keras.applications.MobileNetV2(weights=None, input_shape=(args.image_size, args.image_size, 3))
    opt = tf.keras.optimizers.SGD(0.01, momentum=0.9)
    lsgd = alsgd.LocalSGD(model, opt, config={"policy": "fixed", "periods": [1]})
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
    x = tf.random.uniform([args.batch_size, args.image_size, args.image_size, 3])
    y = tf.random.uniform([args.batch_size], maxval=1000, dtype=tf.int64)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        tape = alsgd.DistributedGradientTape(tape, lsgd)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    allreduce_s = [0.0]
    original = hvd.grouped_allreduce

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = original(*a, **kw)
        allreduce_s[0] += time.perf_counter() - t0
        return out

    hvd.grouped_allreduce = timed
    runs = {False: ([], []), True: ([], [])}  # aligned -> (syncs, allreduces inside them)
    for step in range(args.steps):
        train_step()
        aligned = step % 2 == 1
        if aligned:
            original([tf.zeros([1])], name="tf_sync.align")
        allreduce_s[0] = 0.0
        t0 = time.perf_counter()
        lsgd.step_done(0.01)
        runs[aligned][0].append(time.perf_counter() - t0)
        runs[aligned][1].append(allreduce_s[0])
    skip = 2  # per kind: tracing and first-call costs
    out = {"variables": len(lsgd.model_variables()), "syncs": args.steps - 2 * skip}
    for aligned, (syncs, inner) in runs.items():
        pre = "aligned_" if aligned else ""
        out[pre + "sync_median_s"] = statistics.median(syncs[skip:])
        out[pre + "allreduce_median_s"] = statistics.median(inner[skip:])
        out[pre + "outside_median_s"] = statistics.median(
            [a - b for a, b in zip(syncs[skip:], inner[skip:])])
        out[pre + "ratio"] = out[pre + "sync_median_s"] / out[pre + "allreduce_median_s"]
    out["comm_s_in_summary"] = lsgd.summary(combine=False)["comm_s"]
    out["sum_of_syncs_s"] = sum(sum(syncs) for syncs, _ in runs.values())
    if hvd.rank() == 0:
        print(json.dumps(out, indent=1))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh)


if __name__ == "__main__":
    main()
