"""A TensorFlow 2 Horovod script that builds and runs its training step first in a TF1 graph
(``tf.Graph().as_default()`` and a session, the way Horovod's own tests run each test in graph
mode and then eagerly, in one process), then trains eagerly: hvd.DistributedGradientTape
inside a @tf.function both times. It knows nothing of adaptive-lsgd.

    horovodrun -np 2 -H localhost:2 --gloo python tests/user_scripts/tf2_graph_and_eager.py
"""

import json

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

STEPS, BATCH = 8, 8

hvd.init()
rng = np.random.default_rng(hvd.rank())
x = rng.normal(size=(STEPS * BATCH, 4)).astype("float32")
y = (x.sum(axis=1) > 0).astype("int64")
loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_step():
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.layers.Input((4,)), tf.keras.layers.Dense(2)])
    opt = tf.keras.optimizers.legacy.SGD(0.1)

    @tf.function
    def training_step(images, labels):
        with tf.GradientTape() as tape:
            loss_value = loss_fn(labels, model(images, training=True))
        # Horovod: add Horovod Distributed GradientTape.
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss_value, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss_value

    return model, training_step


# Graph mode: the call adds the step to the graph; the session runs it.
with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    _, step = make_step()
    loss = step(tf.constant(x[:BATCH]), tf.constant(y[:BATCH]))
    sess.run(tf.compat.v1.global_variables_initializer())
    graph_loss = float(sess.run(loss))

# Eager mode: a fresh model and step, trained for STEPS steps.
model, step = make_step()
hvd.broadcast_variables(model.variables, root_rank=0)
for i in range(STEPS):
    eager_loss = float(step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]))

print("RESULT graph_and_eager " + json.dumps({"rank": hvd.rank(), "graph_loss": graph_loss,
                                              "eager_loss": eager_loss}), flush=True)
