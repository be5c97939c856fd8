"""TensorFlow integration cases, run under horovodrun: ``python cases.py CASE [CASE ...]``.

Each case prints ``RESULT <case> <json>`` on every rank (and rank 0 ``TIMING <case> <s>``);
tests/test_tensorflow.py asserts on them. MNIST-1D comes from the ``.npz`` named by
``MNIST1D_NPZ`` (the test generates it once, offline, with ``mnist1d.data.make_dataset``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
import warnings

import horovod.tensorflow as htf
import horovod.tensorflow.keras as hvd
import numpy as np
import tensorflow as tf

import adaptive_lsgd.integrations.tensorflow as alsgd  # before hvd.init(): dynamic process sets
from adaptive_lsgd import ConfigError, ConfigMismatchError

hvd.init()
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.get_logger().setLevel("ERROR")
RANK, SIZE = hvd.rank(), hvd.size()
LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# The convergence recipe: a small 1-D CNN, 128 per rank and batch, a linear decay to zero.
EPOCHS, BATCH, LR0, H = 15, 128, 0.2, 4


def report(case: str, **values) -> None:
    print(f"RESULT {case} " + json.dumps({"rank": RANK, **values}), flush=True)


def load_mnist1d():
    d = np.load(os.environ["MNIST1D_NPZ"])
    return d["x"], d["y"], d["x_test"], d["y_test"]


X, Y, X_TEST, Y_TEST = load_mnist1d()
X_MINE, Y_MINE = X[RANK::SIZE], Y[RANK::SIZE]  # each rank its own shard


def cnn(seed: int = 0) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(seed)
    L = tf.keras.layers
    return tf.keras.Sequential([
        L.Input((40,)), L.Reshape((40, 1)),
        L.Conv1D(32, 5, padding="same", activation="relu"),
        L.Conv1D(32, 3, strides=2, padding="same", activation="relu"),
        L.Conv1D(32, 3, strides=2, padding="same", activation="relu"),
        L.Flatten(), L.Dense(10)])


def mlp(seed: int = 0, bn: bool = False, width: int = 32) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(seed)
    L = tf.keras.layers
    layers = [L.Input((40,)), L.Dense(width, activation="relu")]
    if bn:
        layers.append(L.BatchNormalization())
    layers.append(L.Dense(10))
    return tf.keras.Sequential(layers)


def lr_at(epoch: int) -> float:
    return LR0 * (1 - epoch / EPOCHS)


def digest(variables) -> str:
    h = hashlib.sha1()
    for v in variables:
        h.update(np.ascontiguousarray(v.numpy()).tobytes())
    return h.hexdigest()[:16]


def flat(variables) -> np.ndarray:
    return np.concatenate([np.ravel(v.numpy()).astype(np.float64) for v in variables])


def accuracy(model) -> float:
    logits = model.predict(X_TEST, batch_size=1024, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == Y_TEST))


class Recorder(tf.keras.callbacks.Callback):
    """After each batch: the step, whether a sync just ran, a digest of the variables."""

    def __init__(self, lsgd, variables_fn):
        super().__init__()
        self.lsgd, self.variables_fn, self.rows = lsgd, variables_fn, []
        self._syncs = 0

    def on_train_begin(self, logs=None):
        self._syncs = sum(self.lsgd.scheduler.syncs)

    def on_train_batch_end(self, batch, logs=None):
        syncs = sum(self.lsgd.scheduler.syncs)
        self.rows.append(row(self.lsgd, self.variables_fn(), synced=syncs > self._syncs))
        self._syncs = syncs


class BatchLossAverage(tf.keras.callbacks.Callback):
    """A global allreduce after every batch (a per-batch metric average), interleaved with the
    block and leader process sets of a hierarchical topology."""

    def on_train_batch_end(self, batch, logs=None):
        htf.allreduce(tf.constant(float(logs["loss"])), name=f"loss.{batch}")


def row(lsgd, variables, synced: bool) -> dict:
    sched = lsgd.scheduler
    return {"step": sched.step, "syncs": list(sched.syncs), "digest": digest(variables),
            "synced": synced}


def compare_rows(rows: list) -> dict:
    """Allgather every rank's rows; per step, whether all ranks held identical variables, split
    by whether a sync had just happened."""
    every = htf.allgather_object(rows)
    after_sync, between = [], []
    for i, r in enumerate(every[0]):
        same = all(other[i]["digest"] == r["digest"] for other in every)
        (after_sync if r["synced"] else between).append(same)
    return {"identical_after_sync": after_sync, "identical_between": between}


# -- cases ------------------------------------------------------------------------------------
def fit_accuracy():
    """model.fit on MNIST-1D: Horovod's DistributedOptimizer, then ours with fixed H=4, from the
    same seeds, data and callbacks; all ranks identical after each sync."""
    schedule = tf.keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr_at(epoch))
    ref = cnn()
    ref.compile(hvd.DistributedOptimizer(tf.keras.optimizers.SGD(LR0, momentum=0.9)), LOSS)
    start = time.perf_counter()
    tf.keras.utils.set_random_seed(1)
    ref.fit(X_MINE, Y_MINE, batch_size=BATCH, epochs=EPOCHS, verbose=0,
            callbacks=[schedule, hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                       hvd.callbacks.MetricAverageCallback()])
    ref_s = time.perf_counter() - start

    ours = cnn()
    opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(LR0, momentum=0.9),
                                     config={"policy": "fixed", "periods": [H]})
    ours.compile(opt, LOSS)
    rec = Recorder(opt.alsgd, lambda: ours.variables)
    start = time.perf_counter()
    tf.keras.utils.set_random_seed(1)
    ours.fit(X_MINE, Y_MINE, batch_size=BATCH, epochs=EPOCHS, verbose=0,
             callbacks=[schedule, hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                        hvd.callbacks.MetricAverageCallback(), alsgd.LocalSGDCallback(), rec])
    ours_s = time.perf_counter() - start
    final = htf.allgather_object(digest(ours.variables))
    report("fit_accuracy", acc_ref=accuracy(ref), acc_ours=accuracy(ours), ref_s=ref_s, ours_s=ours_s,
           syncs=opt.alsgd.scheduler.syncs, steps=opt.alsgd.scheduler.step,
           final_identical=len(set(final)) == 1, final_digest=final[0], summary=alsgd.summary(opt),
           **compare_rows(rec.rows))


def custom_loop():
    """A custom tf.function loop with the drop-in helpers, fixed H=4:
    ``DistributedGradientTape(tape, cfg)`` in the step, ``alsgd.step(model, opt, config=cfg)``
    after it. The same recipe as fit_accuracy (its Horovod run is the reference)."""
    cfg = {"policy": "fixed", "periods": [H]}
    model = cnn()
    htf.broadcast_variables(model.variables, root_rank=0)
    opt = tf.keras.optimizers.SGD(LR0, momentum=0.9)
    data = tf.data.Dataset.from_tensor_slices((X_MINE, Y_MINE))
    train_step = _tape_step(model, opt, cfg)
    rows, calls = [], {True: [], False: []}  # wall time of each alsgd.step, by whether it synced
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        opt.learning_rate.assign(lr_at(epoch))
        for x, y in data.shuffle(len(X_MINE), seed=epoch).batch(BATCH):
            train_step(x, y)
            t0 = time.perf_counter()
            result = alsgd.step(model, opt, config=cfg)
            calls[result is not None].append(time.perf_counter() - t0)
            rows.append(row(alsgd._runtime_for(cfg), model.variables, synced=result is not None))
    lsgd = alsgd._runtime_for(cfg)
    t0 = time.perf_counter()
    lsgd.average_now()
    calls[True].append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    final = htf.allgather_object(digest(model.variables))
    report("custom_loop", acc_ours=accuracy(model), ours_s=seconds, syncs=lsgd.scheduler.syncs,
           steps=lsgd.scheduler.step, final_identical=len(set(final)) == 1, final_digest=final[0],
           comm_s=alsgd.summary(lsgd, combine=False)["comm_s"], sync_calls=len(calls[True]),
           sync_calls_s=sum(calls[True]), other_call_median_s=float(np.median(calls[False])),
           **compare_rows(rows))


def minibatch_equals_horovod():
    """Warm-up covering the run: ours equals hvd.DistributedOptimizer in fit (traced and eager)
    and hvd.DistributedGradientTape in a custom loop, from the same seeds and data."""
    steps = 40
    xs, ys = X_MINE[:steps * 16], Y_MINE[:steps * 16]
    cfg = {"warmup": 10**6, "policy": "fixed", "periods": [4]}

    def fit(model, opt, eager=False):
        model.compile(opt, LOSS, run_eagerly=eager)
        model.fit(xs, ys, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[alsgd.LocalSGDCallback()] if hasattr(opt, "alsgd") else [])
        return model

    ref = fit(mlp(), hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9)))
    graph_opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9), config=cfg)
    graph = fit(mlp(), graph_opt)
    eager_opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9), config=cfg)
    eager = fit(mlp(), eager_opt, eager=True)

    def tape_run(ours: bool):
        model, opt = mlp(), tf.keras.optimizers.SGD(0.1, momentum=0.9)
        lsgd = alsgd.LocalSGD(model, opt, config=cfg) if ours else None

        @tf.function
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = LOSS(y, model(x, training=True))
            tape = alsgd.DistributedGradientTape(tape, lsgd) if ours else htf.DistributedGradientTape(tape)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        for i in range(steps):
            if lsgd is None:
                train_step(xs[i * 16:(i + 1) * 16], ys[i * 16:(i + 1) * 16])
            else:
                with lsgd.step():
                    train_step(xs[i * 16:(i + 1) * 16], ys[i * 16:(i + 1) * 16])
        return model, lsgd

    tape_ref, _ = tape_run(ours=False)
    tape_ours, tape_lsgd = tape_run(ours=True)
    spread = htf.allgather_object(digest(graph.variables))
    report("minibatch_equals_horovod",
           graph_diff=float(np.abs(flat(ref.variables) - flat(graph.variables)).max()),
           eager_diff=float(np.abs(flat(ref.variables) - flat(eager.variables)).max()),
           slots_diff=float(np.abs(flat(ref.optimizer.variables[1:])
                                   - flat(graph_opt.variables[1:])).max()),
           tape_diff=float(np.abs(flat(tape_ref.variables) - flat(tape_ours.variables)).max()),
           moved=float(np.abs(flat(graph.variables) - flat(mlp().variables)).max()),
           ranks_identical=len(set(spread)) == 1,
           phases=[graph_opt.alsgd.scheduler.phase, eager_opt.alsgd.scheduler.phase,
                   tape_lsgd.scheduler.phase],
           flags=[bool(graph_opt.alsgd.allreduce_gradients.numpy()),
                  bool(tape_lsgd.allreduce_gradients.numpy())],
           steps=[graph_opt.alsgd.scheduler.step, eager_opt.alsgd.scheduler.step,
                  tape_lsgd.scheduler.step])


def keras_api():
    """Beside Horovod's callbacks: warm-up 'first_lr_decay' with a Keras LR schedule, a legacy
    optimizer, BatchNorm statistics and momentum averaged ('average'), the local phase run
    eagerly, LearningRateWarmupCallback, the state round trip, a config mismatch."""
    spe = 10
    xs, ys = X_MINE[:spe * 16], Y_MINE[:spe * 16]
    model = mlp(bn=True)
    cfg = {"warmup": "first_lr_decay", "policy": "fixed", "periods": [3], "momentum": "average"}
    opt = alsgd.DistributedOptimizer(tf.keras.optimizers.legacy.SGD(0.1, momentum=0.9), config=cfg)
    model.compile(opt, LOSS, metrics=["accuracy"])
    cb = alsgd.LocalSGDCallback()
    lsgd = opt.alsgd
    rec = Recorder(lsgd, lambda: model.variables + lsgd.slot_variables())
    trainable = Recorder(lsgd, lambda: model.trainable_variables)
    schedule = tf.keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 if epoch < 2 else 0.01)
    hist = model.fit(xs, ys, batch_size=16, epochs=4, shuffle=False, verbose=0,
                     callbacks=[schedule, hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                                hvd.callbacks.MetricAverageCallback(), cb, rec, trainable])
    sched = lsgd.scheduler
    switch_step, syncs_after_fit = sched.switch_step, list(sched.syncs)
    rows = compare_rows(rec.rows)
    # Mini-batch phase: the trainable weights agree on every step (BatchNorm statistics are
    # local there, as with Horovod).
    digests = htf.allgather_object([r["digest"] for r in trainable.rows])
    mini_batch_identical = all(len({d[i] for d in digests}) == 1
                               for i, r in enumerate(trainable.rows) if r["step"] <= switch_step)
    state = json.loads(json.dumps(cb.state_dict()))
    opt2 = alsgd.DistributedOptimizer(tf.keras.optimizers.legacy.SGD(0.1, momentum=0.9), config=cfg)
    opt2.alsgd.load_state_dict(state)

    # The local phase run eagerly, beside LearningRateWarmupCallback: identical after syncs.
    model.compile(opt, LOSS, run_eagerly=True)
    rec.rows = []
    model.fit(xs[:6 * 16], ys[:6 * 16], batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.05, warmup_epochs=1,
                                                                  steps_per_epoch=6),
                         alsgd.LocalSGDCallback(average_at_end=False), rec])
    eager_rows = compare_rows(rec.rows)
    try:
        alsgd.LocalSGD(mlp(), config={"policy": "fixed", "periods": [2 + RANK]})
        mismatch = None
    except ConfigMismatchError as exc:
        mismatch = str(exc)
    try:
        alsgd.LocalSGD(mlp(), config={"overlap": True})
        overlap_error = None
    except ConfigError as exc:
        overlap_error = str(exc)
    os.environ["HOROVOD_ELASTIC"] = "1"  # as horovodrun --min-np/--max-np sets it
    try:
        alsgd.LocalSGD(mlp())
        elastic_error = None
    except ConfigError as exc:
        elastic_error = str(exc)
    finally:
        del os.environ["HOROVOD_ELASTIC"]
    report("keras_api", overlap_error=overlap_error, elastic_error=elastic_error,
           switch_step=switch_step, phase=sched.phase,
           syncs=syncs_after_fit,
           steps_per_epoch=spe, lr_history=[float(v) for v in hist.history["lr"]],
           mini_batch_identical=mini_batch_identical,
           n_buffers=len(model.non_trainable_variables), n_slots=len(lsgd.slot_variables()),
           restored=[opt2.alsgd.scheduler.step, opt2.alsgd.scheduler.phase,
                     opt2.alsgd.scheduler.syncs, bool(opt2.alsgd.allreduce_gradients.numpy())],
           eager_after_sync=eager_rows["identical_after_sync"],
           eager_between=eager_rows["identical_between"], warmup_lr=float(opt.lr.numpy()),
           mismatch=mismatch, summary=alsgd.summary(cb, combine=False), **rows)


def adaptive_noise():
    """Adaptive policy, 300 steps of a custom loop, one rank sleeping randomly: no hang, the same
    decisions in every rank's log, the same model after the final average."""
    path = os.path.join(os.environ["CASE_DIR"], "noise.{rank}.jsonl")
    model, opt = mlp(width=16), tf.keras.optimizers.SGD(0.02)
    lsgd = alsgd.LocalSGD(model, opt, config={"log": path, "warmup": 30, "max_period": 16,
                                              "target_comm_fraction": 0.05})

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        tape = alsgd.DistributedGradientTape(tape, lsgd)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    rng = random.Random(RANK)
    n = len(X_MINE) // 16
    for i in range(300):
        with lsgd.step():
            if RANK == 1:
                time.sleep(rng.choice([0, 0, 0, 0.001, 0.004]))
            j = i % n
            train_step(X_MINE[j * 16:(j + 1) * 16], Y_MINE[j * 16:(j + 1) * 16])
    lsgd.average_now()
    final = htf.allgather_object(digest(model.variables))
    report("adaptive_noise", steps=lsgd.scheduler.step, periods=list(lsgd.scheduler.periods),
           syncs=lsgd.scheduler.syncs, log=path.replace("{rank}", str(RANK)),
           final_identical=len(set(final)) == 1)


def hierarchical_2x2(chained: bool = False):
    """4 ranks, topology 2x2, periods [2, 2]: blocks average every 2 steps, all ranks every 4
    (one allreduce over all ranks, or chained: the sliced sync, reduce-scatter in the block,
    allreduce across, allgather back); a global allreduce after every batch interleaves with
    them."""
    case = "hierarchical_2x2_chained" if chained else "hierarchical_2x2"
    model = mlp(width=16)
    opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.05, momentum=0.9),
                                     config={"topology": "2x2", "policy": "fixed", "periods": [2, 2],
                                             "chained_allreduce": chained})
    model.compile(opt, LOSS)
    rec = Recorder(opt.alsgd, lambda: model.variables)
    model.fit(X_MINE[:24 * 16], Y_MINE[:24 * 16], batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                         alsgd.LocalSGDCallback(average_at_end=False), rec, BatchLossAverage()])
    every = htf.allgather_object(rec.rows)
    rows = [{"step": row["step"], "syncs": row["syncs"],
             "block0_same": every[0][i]["digest"] == every[1][i]["digest"],
             "block1_same": every[2][i]["digest"] == every[3][i]["digest"],
             "all_same": len({r[i]["digest"] for r in every}) == 1}
            for i, row in enumerate(every[RANK])]
    report(case, rows=rows, syncs=opt.alsgd.scheduler.syncs,
           levels=opt.alsgd.topology.describe()["levels"], sliced=opt.alsgd.topology.sliced,
           model=np.concatenate([v.numpy().ravel() for v in model.trainable_variables]).tolist(),
           process_sets=sorted(list(k) for k in opt.alsgd.process_sets))


def hierarchical_2x2_chained():
    hierarchical_2x2(chained=True)


def _local_model():
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.layers.Input((4,)), tf.keras.layers.Dense(3),
                                 tf.keras.layers.Dense(2)])
    return model, model.layers[0].kernel, model.layers[1].kernel


def _set_rank_values(model) -> None:
    for v in model.trainable_variables:
        v.assign(tf.fill(v.shape, float(RANK)))


LOCAL_X, LOCAL_Y = np.ones((2, 4), np.float32), np.zeros((2,), np.int64)
LOCAL_CFG = {"policy": "fixed", "periods": [1]}


def _local_tape() -> dict:
    model, shared, local = _local_model()
    opt = tf.keras.optimizers.SGD(0.0)
    lsgd = alsgd.LocalSGD(model, opt, config=LOCAL_CFG)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = LOSS(LOCAL_Y, model(LOCAL_X, training=True))
        tape = alsgd.DistributedGradientTape(tape, lsgd)
        tape.register_local_source(local)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    step()  # traced: the tape registered its local source
    lsgd.step_done(0.01)  # the first sync (rank 0's model: the ranks began apart)
    _set_rank_values(model)
    step()
    lsgd.step_done(0.01)
    return {"shared": float(tf.reduce_mean(shared)), "local": float(tf.reduce_mean(local))}


def _local_keras() -> dict:
    model, shared, local = _local_model()
    opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.0), config=LOCAL_CFG)
    opt.register_local_var(local)
    model.compile(optimizer=opt, loss=LOSS)
    callback = alsgd.LocalSGDCallback(average_at_end=False)
    model.fit(LOCAL_X, LOCAL_Y, batch_size=2, epochs=1, verbose=0, callbacks=[callback])
    _set_rank_values(model)  # after the first sync (which starts every rank from rank 0's model)
    model.fit(LOCAL_X, LOCAL_Y, batch_size=2, epochs=1, verbose=0, callbacks=[callback])
    return {"shared": float(tf.reduce_mean(shared)), "local": float(tf.reduce_mean(local))}


def local_variables():
    """Rank-local variables are never averaged: a tape's register_local_source (custom loop)
    and a Keras optimizer's register_local_var (fit); the other variables are."""
    report("local_variables", tape=_local_tape(), keras=_local_keras())


# -- backward_passes_per_step ----------------------------------------------------------------------
class PassRecorder(tf.keras.callbacks.Callback):
    """After each batch (a backward pass): the pass, the optimizer's iterations, Horovod's
    aggregation counter, the scheduler's step and syncs, a digest and a copy of the weights."""

    def __init__(self, opt):
        super().__init__()
        self.opt, self.rows = opt, []

    def on_train_batch_end(self, batch, logs=None):
        sched = self.opt.alsgd.scheduler
        self.rows.append({"pass": batch + 1, "iterations": int(self.opt.iterations.numpy()),
                          "counter": int(self.opt._agg_helper.counter.numpy()),
                          "step": sched.step, "syncs": sum(sched.syncs), "phase": sched.phase,
                          "digest": digest(self.model.trainable_variables),
                          "weights": [v.numpy() for v in self.model.trainable_variables]})


def _aggregated_fit(opt, xs, ys, eager=False, callbacks=()):
    model = mlp(width=16)
    model.compile(opt, LOSS, run_eagerly=eager)
    model.fit(xs, ys, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=list(callbacks))
    return model


def aggregation():
    """backward_passes_per_step=2. Mini-batch phase (warm-up covering the run): ours equals
    hvd.DistributedOptimizer(backward_passes_per_step=2) in fit, traced and eager (with
    average_aggregated_gradients). Local phase: warm-up 2 applied updates, then fixed H=2:
    an update every 2nd pass (the mean of the two passes' own gradients, no allreduce), the
    scheduler counting applied updates, syncs after applied updates 4 and 6 only."""
    xs, ys = X_MINE[:12 * 16], Y_MINE[:12 * 16]
    diffs = {}
    for eager, average in ((False, False), (True, True)):
        kw = {"backward_passes_per_step": 2, "average_aggregated_gradients": average}
        ref_opt = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9), **kw)
        ref = _aggregated_fit(ref_opt, xs, ys, eager)
        ours_opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9),
                                              config={"warmup": 10**6}, **kw)
        ours = _aggregated_fit(ours_opt, xs, ys, eager, [alsgd.LocalSGDCallback()])
        diffs["eager" if eager else "graph"] = {
            "weights": float(np.abs(flat(ref.variables) - flat(ours.variables)).max()),
            "slots": float(np.abs(flat(ref_opt.variables[1:]) - flat(ours_opt.variables[1:])).max()),
            "iterations": [int(ref_opt.iterations.numpy()), int(ours_opt.iterations.numpy())],
            "counter": [int(ref_opt._agg_helper.counter.numpy()),
                        int(ours_opt._agg_helper.counter.numpy())],
            "steps": ours_opt.alsgd.scheduler.step, "phase": ours_opt.alsgd.scheduler.phase}

    lr = 0.1
    opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(lr),
                                     config={"warmup": 2, "policy": "fixed", "periods": [2]},
                                     backward_passes_per_step=2, average_aggregated_gradients=True)
    rec = PassRecorder(opt)
    model = _aggregated_fit(opt, xs, ys, callbacks=[alsgd.LocalSGDCallback(average_at_end=False), rec])
    # The first local update (passes 5 and 6) recomputed by hand from the weights after pass 4:
    # the mean of this rank's two gradients there, plain SGD.
    start = [w.copy() for w in rec.rows[3]["weights"]]
    for v, w in zip(model.trainable_variables, start):
        v.assign(w)
    grads = []
    for b in (4, 5):
        with tf.GradientTape() as tape:
            loss = LOSS(ys[b * 16:(b + 1) * 16], model(xs[b * 16:(b + 1) * 16], training=True))
        grads.append(tape.gradient(loss, model.trainable_variables))
    expected = [w - lr * (g0.numpy() + g1.numpy()) / 2 for w, g0, g1 in zip(start, *grads)]
    local_update_diff = max(float(np.abs(e - a).max()) for e, a in zip(expected, rec.rows[5]["weights"]))
    every = htf.allgather_object([r["digest"] for r in rec.rows])
    for r in rec.rows:
        del r["weights"]
    try:  # Horovod's legacy (tf.compat.v1.train.Optimizer) path is not ours
        alsgd.DistributedOptimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1),
                                   backward_passes_per_step=2)
        legacy_error = None
    except TypeError as exc:
        legacy_error = str(exc)
    report("aggregation", diffs=diffs, rows=rec.rows, local_update_diff=local_update_diff,
           legacy_error=legacy_error,
           initial=digest(mlp(width=16).trainable_variables),
           switch_step=opt.alsgd.scheduler.switch_step,
           identical=[len({d[i] for d in every}) == 1 for i in range(len(rec.rows))])


# -- one process, a TF1 graph then eager ------------------------------------------------------------
def _tape_step(model, opt, cfg):
    """A traced training step through ``DistributedGradientTape(tape, cfg)`` (``cfg``: a config
    or a LocalSGD; None: a plain tape, no reduction)."""
    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        if cfg is not None:
            tape = alsgd.DistributedGradientTape(tape, cfg)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return train_step


def graph_then_eager():
    """As Horovod's tests run in graph mode then eagerly in one process: a tf.function with
    DistributedGradientTape(tape, cfg) called while a TF1 graph is built (and run in its
    session), then the same config eagerly; the eager steps get a LocalSGD of their own (the
    graph's phase variable is out of scope there) and sync every 2 steps."""
    cfg = {"policy": "fixed", "periods": [2]}
    x, y = X_MINE[:16], Y_MINE[:16]
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        model = mlp(width=8)
        loss = _tape_step(model, tf.keras.optimizers.legacy.SGD(0.1), cfg)(tf.constant(x), tf.constant(y))
        sess.run(tf.compat.v1.global_variables_initializer())
        graph_loss = float(sess.run(loss))
        graph_lsgd = alsgd._runtime_for(cfg)
    model, opt = mlp(width=8), tf.keras.optimizers.SGD(0.1)
    step = _tape_step(model, opt, cfg)
    rows = []
    for i in range(4):
        step(X_MINE[i * 16:(i + 1) * 16], Y_MINE[i * 16:(i + 1) * 16])
        result = alsgd.step(model, opt, config=cfg)
        rows.append(row(alsgd._runtime_for(cfg), model.variables, synced=result is not None))
    lsgd = alsgd._runtime_for(cfg)
    report("graph_then_eager", graph_loss=graph_loss, separate=lsgd is not graph_lsgd,
           syncs=lsgd.scheduler.syncs, steps=lsgd.scheduler.step, **compare_rows(rows))


# -- process sets ---------------------------------------------------------------------------------
def _set_fit(opt, xs, ys, record: bool = False):
    model = mlp(width=16)
    model.compile(opt, LOSS)
    callbacks, rec = [], None
    if hasattr(opt, "alsgd"):
        callbacks.append(alsgd.LocalSGDCallback(average_at_end=False))
        if record and opt.alsgd.member:
            rec = Recorder(opt.alsgd, lambda: model.trainable_variables)
            callbacks.append(rec)
    model.fit(xs, ys, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    return model, rec


def _set_tape(lsgd_or_cfg, process_set, steps: int, horovod: bool = False):
    model, opt = mlp(width=16), tf.keras.optimizers.SGD(0.1)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        tape = (htf.DistributedGradientTape(tape, process_set=process_set) if horovod else
                alsgd.DistributedGradientTape(tape, lsgd_or_cfg, process_set=process_set))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    rows = []
    for i in range(steps):
        train_step(X_MINE[i * 16:(i + 1) * 16], Y_MINE[i * 16:(i + 1) * 16])
        if not horovod:
            result = alsgd.step(model, opt, config=lsgd_or_cfg, process_set=process_set)
            rows.append({"synced": result is not None, "digest": digest(model.trainable_variables)})
    return model, rows


def process_sets():
    """4 ranks, process sets [0, 2] and [1, 3], each rank in its own. Mini-batch phase: ours
    equals hvd.DistributedOptimizer / DistributedGradientTape with the same process_set. Local
    phase (fixed H=2): members average among themselves only. With the set [0, 2] on every
    rank, ranks 1 and 3 train as with a plain Keras optimizer. Elastic + a set: ValueError."""
    even, odd = alsgd.process_set_for((0, 2)), alsgd.process_set_for((1, 3))
    mine = even if RANK % 2 == 0 else odd
    xs, ys = X_MINE[:8 * 16], Y_MINE[:8 * 16]
    minibatch = {"warmup": 10**6}
    local = {"policy": "fixed", "periods": [2]}

    ref, _ = _set_fit(hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9),
                                               process_set=mine), xs, ys)
    ours_opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9), config=minibatch,
                                          process_set=mine)
    ours, _ = _set_fit(ours_opt, xs, ys)
    tape_ref, _ = _set_tape(None, mine, 4, horovod=True)
    tape_ours, _ = _set_tape(minibatch, mine, 4)

    local_opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), config=local, process_set=mine)
    _, rec = _set_fit(local_opt, xs, ys, record=True)
    _, tape_rows = _set_tape(local, mine, 4)
    every = htf.allgather_object([[r["digest"] for r in rec.rows], [r["digest"] for r in tape_rows],
                                  digest(ours.variables)])

    def pattern(k, rows):
        return [{"synced": r["synced"], "in_set": every[RANK][k][i] == every[(RANK + 2) % 4][k][i],
                 "across": every[RANK][k][i] == every[(RANK + 1) % 4][k][i]}
                for i, r in enumerate(rows)]

    plain, _ = _set_fit(tf.keras.optimizers.SGD(0.1), xs, ys)
    partial_opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), config=local, process_set=even)
    partial, _ = _set_fit(partial_opt, xs, ys)
    # Horovod's shutdown is global: ranks 1 and 3, done first, must not exit under the others'
    # collectives over [0, 2] (as with Horovod's own process sets).
    htf.allreduce(tf.zeros([1]), name="process_sets.done")
    try:
        partial_opt.alsgd.summary()
        outside_error = None
    except RuntimeError as exc:
        outside_error = str(exc)
    os.environ["HOROVOD_ELASTIC"] = "1"
    try:
        alsgd.LocalSGD(mlp(), process_set=mine)
        elastic_error = None
    except ValueError as exc:
        elastic_error = str(exc)
    finally:
        del os.environ["HOROVOD_ELASTIC"]
    report("process_sets",
           minibatch_diff=float(np.abs(flat(ref.variables) - flat(ours.variables)).max()),
           tape_diff=float(np.abs(flat(tape_ref.variables) - flat(tape_ours.variables)).max()),
           minibatch_in_set=every[RANK][2] == every[(RANK + 2) % 4][2],
           minibatch_across=every[RANK][2] == every[(RANK + 1) % 4][2],
           phase=ours_opt.alsgd.scheduler.phase, steps=ours_opt.alsgd.scheduler.step,
           set_rank=local_opt.alsgd.rank, set_size=local_opt.alsgd.topology.size,
           syncs=local_opt.alsgd.scheduler.syncs, summary_ranks=local_opt.alsgd.summary()["ranks"],
           fit=pattern(0, rec.rows), tape=pattern(1, tape_rows),
           member=partial_opt.alsgd.member,
           partial_vs_plain=float(np.abs(flat(plain.variables) - flat(partial.variables)).max()),
           outside_error=outside_error, elastic_error=elastic_error)


def start_from_one_model():
    """Ranks that begin apart (no broadcast) get rank 0's model at the first sync, with a
    ``with lsgd.step()`` loop and with a model attached at construction; later syncs average.
    Ranks that begin equal average at once."""
    out = {}
    for start in ("apart", "equal"):
        w = tf.Variable(tf.fill([3], 10.0 * RANK if start == "apart" else 0.0))
        lsgd = alsgd.LocalSGD([w], config={"policy": "fixed", "periods": [2]})
        values = []
        for _ in range(4):
            with lsgd.step():
                w.assign_add(tf.fill([3], float(RANK + 1)))
            values.append(float(w[0]))
        out[start] = {"after_first": values[1], "after_second": values[3],
                      "pending": lsgd.scheduler.origin_pending}
    report("start_from_one_model", **out)


def _tf_reference_sync(rows, prev, buf, outer):
    """The compressed (bf16) global sync and outer step written out on every rank's rows."""
    if prev is None:  # the first sync: rank 0's model (the loop notes no starting model)
        return np.array(rows[0]), None
    total = tf.zeros_like(prev)
    for r in rows:
        total = total + tf.cast(tf.cast(tf.constant(r) - prev, tf.bfloat16), tf.float32)
    avg = tf.cast(tf.cast(total, tf.bfloat16), tf.float32) * (1.0 / len(rows)) + prev
    g = prev - avg
    buf = g if buf is None else 0.9 * buf + g
    new = prev - 0.7 * (g + 0.9 * buf) if outer == "nesterov" else prev - 0.7 * buf
    return new.numpy(), buf


def outer_tf():
    """Outer Nesterov + bf16 in the tape loop (``DistributedGradientTape`` + ``alsgd.step``)
    against the sync written out here; then the same keys in Keras ``fit`` (callback) and a
    state_dict round trip of the outer state."""
    cfg = {"policy": "fixed", "periods": [3], "outer_optimizer": "nesterov",
           "compression": "bf16", "outer_lr": 0.7, "outer_momentum": 0.9}
    model, ref = mlp(seed=3), mlp(seed=3)
    opt, ref_opt = tf.keras.optimizers.SGD(0.1), tf.keras.optimizers.SGD(0.1)
    train_step = _tape_step(model, opt, cfg)

    @tf.function
    def ref_step(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, ref(x, training=True))
        grads = tape.gradient(loss, ref.trainable_variables)
        ref_opt.apply_gradients(zip(grads, ref.trainable_variables))

    def ref_flat():
        return np.concatenate([np.ravel(v.numpy()) for v in ref.trainable_variables])

    def set_ref(vec):
        offset = 0
        for v in ref.trainable_variables:
            n = int(np.prod(v.shape))
            v.assign(np.reshape(vec[offset:offset + n], v.shape))
            offset += n

    prev = buf = None
    worst, syncs = 0.0, 0
    data = tf.data.Dataset.from_tensor_slices((X_MINE[:3000], Y_MINE[:3000])).batch(100)
    for x, y in data:
        train_step(x, y)
        ref_step(x, y)
        if alsgd.step(model, opt, config=cfg) is not None:
            syncs += 1
            rows = htf.allgather_object(ref_flat())
            new, buf = _tf_reference_sync(rows, None if prev is None else tf.constant(prev), buf,
                                          "nesterov")
            prev = new
            set_ref(new)
        ours = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
        worst = max(worst, float(np.abs(ours - ref_flat()).max()))
        if os.environ.get("DEBUG_OUTER"):
            print("DBG", syncs, float(np.abs(ours - ref_flat()).max()), flush=True)
    lsgd = alsgd._runtime_for(cfg)
    state = lsgd.state_dict()
    digest_before = digest(model.trainable_variables)
    fresh = alsgd.LocalSGD(model=model, optimizer=opt, config=cfg)
    fresh.load_state_dict(state)
    restored = fresh.scheduler.outer
    same_state = all(np.array_equal(a.numpy(), b) for a, b in
                     zip(restored.prev + restored.buf, state["outer_state"]["prev"]
                         + state["outer_state"]["buf"]))
    # Keras fit with the callback and the same keys
    fit_model = mlp(seed=4)
    fit_opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), config=cfg)
    fit_model.compile(optimizer=fit_opt, loss=LOSS)
    cb = alsgd.LocalSGDCallback()
    fit_model.fit(X_MINE[:3000], Y_MINE[:3000], batch_size=100, epochs=1, verbose=0,
                  callbacks=[cb])
    final = htf.allgather_object(digest(fit_model.trainable_variables))
    report("outer_tf", max_diff=worst, syncs=syncs, outer_steps=lsgd.scheduler.outer.steps,
           same_state=same_state, restored_steps=restored.steps,
           fit_outer_steps=cb.alsgd.scheduler.outer.steps, fit_syncs=cb.alsgd.scheduler.syncs,
           fit_identical=len(set(final)) == 1, digest_unchanged=digest_before == digest(
               model.trainable_variables))


def overlap_tf():
    """``overlap: true``, fixed H=4 (tape loop): equals local SGD written here, where the average
    of the models at a round's end is applied at the next round's end as ``x <- x + pull *
    (average - x at the round's end)`` (default pull); an average is in flight between rounds;
    ``state_dict`` warns then; ``average_now`` leaves identical models. Then the default
    config (overlap: auto) with a model whose average costs far more than its steps engages
    overlap by itself (rank 1 sleeping at random: the same decisions on both ranks), and
    Keras ``fit`` with ``overlap: true`` ends with the average applied."""
    cfg = {"policy": "fixed", "periods": [H], "overlap": True}
    model, ref = mlp(seed=5, width=64), mlp(seed=5, width=64)
    opt, ref_opt = tf.keras.optimizers.SGD(0.1), tf.keras.optimizers.SGD(0.1)
    lsgd = alsgd.LocalSGD(model, opt, config=cfg)
    pull = lsgd.config.overlap_pull
    train_step, ref_step = _tape_step(model, opt, lsgd), _tape_step(ref, ref_opt, None)
    pending, worst, inflight_seen, syncs_seen = None, 0.0, 0, []
    data = tf.data.Dataset.from_tensor_slices((X_MINE[:4000], Y_MINE[:4000])).batch(100)
    for step, (x, y) in enumerate(data, start=1):
        with lsgd.step():
            train_step(x, y)
        ref_step(x, y)
        if step % H == 0:
            if pending is not None:
                for v, snap, avg in zip(ref.variables, *pending):
                    v.assign_add(pull * (avg - snap))
            snap = [tf.identity(v) for v in ref.variables]
            pending = (snap, [htf.allreduce(t, op=htf.Average, name=f"ref.{step}.{i}")
                              for i, t in enumerate(snap)])
        inflight_seen += lsgd._inflight is not None
        syncs_seen.append(lsgd.scheduler.syncs[0])
        worst = max(worst, float(np.abs(flat(model.variables) - flat(ref.variables)).max()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lsgd.state_dict()
    warned = any("in flight" in str(w.message) for w in caught)
    lsgd.average_now()
    final = htf.allgather_object(digest(model.variables))

    # overlap: auto, the default config: 4M parameters, tiny steps, periods capped at 4
    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    big = tf.keras.Sequential([L.Input((8,)), L.Dense(2000, activation="relu"),
                               L.Dense(2000, activation="relu"), L.Dense(3)])
    big_opt = tf.keras.optimizers.SGD(0.01)
    path = os.path.join(os.environ["CASE_DIR"], "overlap_auto.{rank}.jsonl")
    auto = alsgd.LocalSGD(big, big_opt, config={"log": path, "max_period": 4})
    big_step = _tape_step(big, big_opt, auto)
    rng = np.random.default_rng(22 + RANK)
    auto_inflight = 0
    for _ in range(160):
        with auto.step():
            if RANK == 1:  # per-rank timing noise: the decisions must still agree
                time.sleep(float(rng.choice([0, 0, 0, 0.001, 0.004])))
            big_step(rng.normal(size=(8, 8)).astype(np.float32), rng.integers(0, 3, 8))
        auto_inflight += auto._inflight is not None
    auto.average_now()
    auto_final = htf.allgather_object(digest(big.variables))

    # Keras fit with overlap: true: the average in flight is applied when fit ends
    fit_model = mlp(seed=6)
    fit_opt = alsgd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), config=cfg)
    fit_model.compile(optimizer=fit_opt, loss=LOSS)
    cb = alsgd.LocalSGDCallback(average_at_end=False)
    fit_model.fit(X_MINE[:2000], Y_MINE[:2000], batch_size=100, epochs=1, verbose=0,
                  callbacks=[cb])
    report("overlap_tf", max_diff=worst, pull=pull, inflight_seen=inflight_seen,
           syncs_seen=syncs_seen, warned=warned, final_identical=len(set(final)) == 1,
           auto_mechanisms=auto.scheduler.decision.mechanisms, auto_why=auto.scheduler.decision.why,
           auto_inflight=auto_inflight, auto_log=path.replace("{rank}", str(RANK)),
           auto_identical=len(set(auto_final)) == 1, fit_syncs=cb.alsgd.scheduler.syncs,
           fit_inflight_after=cb.alsgd._inflight is not None)


class _Growing(tf.keras.layers.Layer):
    """A layer that can create a weight after the model's first sync (no new top-level layer)."""

    def build(self, shape):
        self.w = self.add_weight(name="w", shape=[3], initializer="zeros")

    def grow(self, value: float):
        self.extra = self.add_weight(name="extra", shape=[3], initializer="zeros")
        self.extra.assign(tf.fill([3], value))

    def call(self, x):
        return x * self.w


def late_variables():
    """The averaged variable lists are kept between syncs: a weight created after the first
    sync stays rank-local until refresh_variables(), then it is averaged. And the packed
    buffers' finiteness (the non-finite guard) for NaN, +-Inf and the largest finite values."""
    layer = _Growing()
    model = tf.keras.Sequential([layer])
    model(tf.zeros([1, 3]))
    lsgd = alsgd.LocalSGD(model=model, config={"policy": "fixed", "periods": [1]})
    w = []
    for step in range(3):
        if step == 1:
            layer.grow(10.0 * RANK)
        if step == 2:
            lsgd.refresh_variables()
        with lsgd.step():
            layer.w.assign_add(tf.fill([3], float(RANK + 1)))
        w.append(float(layer.w[0]))
        if step == 1:
            extra_before = float(layer.extra[0])
    backend = alsgd.TFBackend({})
    finite = {}
    for dtype, big in ((tf.float32, 3.0e38), (tf.float16, 6.0e4)):
        for value in ("nan", "inf", "-inf", "big"):
            v = tf.Variable(tf.constant([1.0, big if value == "big" else float(value), 2.0], dtype))
            finite[f"{dtype.name}.{value}"] = backend.all_finite(backend.pack([v], 1))
    report("late_variables", w=w, extra_before=extra_before, extra_after=float(layer.extra[0]),
           finite=finite)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        start = time.perf_counter()
        globals()[name]()
        if RANK == 0:
            print(f"TIMING {name} {time.perf_counter() - start:.1f}", flush=True)
