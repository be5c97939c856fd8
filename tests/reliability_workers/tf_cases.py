"""Reliability cases for the TensorFlow integration, run under horovodrun:
``python tf_cases.py CASE [CASE ...]``; tests/test_reliability.py asserts on what they print."""

from __future__ import annotations

import json
import os
import sys
import time

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

import adaptive_lsgd.integrations.tensorflow as alsgd  # before hvd.init(): dynamic process sets
from adaptive_lsgd import ConfigMismatchError

hvd.init()
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
RANK, SIZE = hvd.rank(), hvd.size()
CASE_DIR = os.environ.get("REL_CASE_DIR", ".")


def report(case: str, **values) -> None:
    print(f"RESULT {case} " + json.dumps({"rank": RANK, **values}), flush=True)


def mismatch_config():
    """A config key that differs per rank: every rank stops with the same error."""
    variables = [tf.Variable(tf.zeros([4]))]
    print(f"MARK mismatch_config {RANK} {time.time():.6f}", flush=True)
    try:
        alsgd.LocalSGD(variables, config={"max_period": 8 + RANK})
    except ConfigMismatchError as exc:
        print(f"MISMATCH mismatch_config {RANK} {time.time():.6f} {exc}", flush=True)
        raise
    report("mismatch_config", built=True)


INJECT = {6: (3, np.nan), 8: (1, np.inf), 10: (0, np.inf), 12: (2, np.nan)}


def nonfinite():
    """2x2, periods [2, 2]: NaN/Inf injected into one rank's variable before level-0 (steps 6,
    10) and global (8, 12) syncs; every rank of the block must hold the healthy average."""
    init = np.random.default_rng(0)  # one starting model (else the first sync is rank 0's)
    w = tf.Variable(init.normal(size=[6, 5]).astype(np.float32))
    b = tf.Variable(init.normal(size=[5]).astype(np.float32))
    rng = np.random.default_rng(RANK)  # each rank's own local updates
    lsgd = alsgd.LocalSGD([w, b], config={"policy": "fixed", "periods": [2, 2], "topology": "2x2",
                                          "log": os.path.join(CASE_DIR, "tfnf.{rank}.jsonl")})
    topo = lsgd.topology
    events = []
    for step in range(1, 17):
        w.assign_add(tf.constant(rng.normal(size=[6, 5]).astype(np.float32)) * 0.01)  # a local update
        b.assign_add(tf.constant(rng.normal(size=[5]).astype(np.float32)) * 0.01)
        bad = INJECT.get(step)
        if bad is not None and bad[0] == RANK:
            w[2, 3].assign(float(bad[1]))
        flat = tf.concat([tf.reshape(w, [-1]), b], 0)
        pre = hvd.allgather(flat[None], name=f"pre.{step}").numpy() if bad is not None else None
        lsgd.step_done(compute_s=0.001)
        post = hvd.allgather(tf.concat([tf.reshape(w, [-1]), b], 0)[None], name=f"post.{step}").numpy()
        if bad is None:
            continue
        level = 0 if step % 4 == 2 else 1
        diffs = []
        for r in range(SIZE):
            healthy = [m for m in topo.block_of(level, r) if np.isfinite(pre[m]).all()]
            diffs.append(float(np.abs(post[r].astype(np.float64) - pre[healthy].astype(np.float64)
                                      .mean(0)).max()))
        events.append({"step": step, "level": level, "bad_rank": bad[0], "value": str(bad[1]),
                       "post_finite": bool(np.isfinite(post).all()), "max_diff": max(diffs)})
    report("tf_nonfinite", events=events, log=os.path.join(CASE_DIR, f"tfnf.{RANK}.jsonl"))


def uneven_end():
    """2x2, fixed periods [2, 1000]: block (2, 3) is 3 s late for its last block sync while
    block (0, 1) exits at once (see torch_cases.uneven_end)."""
    w = tf.Variable(tf.zeros([6, 5]))
    lsgd = alsgd.LocalSGD([w], config={"policy": "fixed", "periods": [2, 1000], "topology": "2x2",
                                       "warmup": 0})
    for step in range(1, 11):
        if step == 10 and RANK >= 2:
            time.sleep(3.0)
        w.assign_add(tf.ones([6, 5]))
        lsgd.step_done(compute_s=0.001)
    report("tf_uneven_end", syncs=lsgd.scheduler.syncs, t=time.time())


if __name__ == "__main__":
    for name in sys.argv[1:]:
        globals()[name]()
