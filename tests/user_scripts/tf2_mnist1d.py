"""A TensorFlow 2 Horovod script written the way Horovod's
examples/tensorflow2/tensorflow2_mnist.py is, on MNIST-1D: a custom loop with
hvd.DistributedGradientTape and hvd.broadcast_variables inside a tf.function. It knows
nothing of adaptive-lsgd.

    horovodrun -np 2 -H localhost:2 --gloo python tests/user_scripts/tf2_mnist1d.py
"""

import argparse
import json

import horovod.tensorflow as hvd
import tensorflow as tf

from adaptive_lsgd.tools.demo.datasets import load_mnist1d, shard

parser = argparse.ArgumentParser(description="TensorFlow 2 MNIST-1D Example")
parser.add_argument("--steps", type=int, default=1000, help="training steps per worker")
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

# Horovod: initialize Horovod.
hvd.init()
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.keras.utils.set_random_seed(42)

data = load_mnist1d()
idx = shard(len(data["x"]), hvd.rank(), hvd.size())
dataset = tf.data.Dataset.from_tensor_slices((data["x"][idx], data["y"][idx]))
dataset = dataset.repeat().shuffle(4096, seed=hvd.rank()).batch(args.batch_size)

mnist_model = tf.keras.Sequential([
    tf.keras.layers.Reshape((40, 1), input_shape=(40,)),
    tf.keras.layers.Conv1D(32, 5, padding="same", activation="relu"),
    tf.keras.layers.Conv1D(32, 3, strides=2, padding="same", activation="relu"),
    tf.keras.layers.Conv1D(32, 3, strides=2, padding="same", activation="relu"),
    tf.keras.layers.Flatten(),
    tf.keras.layers.Dense(10),
])
loss = tf.losses.SparseCategoricalCrossentropy(from_logits=True)

# Horovod: adjust learning rate based on number of workers; divide it by 5 for the last quarter.
lr = tf.keras.optimizers.schedules.PiecewiseConstantDecay(
    [int(0.75 * args.steps)], [0.025 * hvd.size(), 0.005 * hvd.size()])
opt = tf.optimizers.SGD(lr, momentum=0.9)


@tf.function
def training_step(images, labels, first_batch):
    with tf.GradientTape() as tape:
        probs = mnist_model(images, training=True)
        loss_value = loss(labels, probs)

    # Horovod: add Horovod Distributed GradientTape.
    tape = hvd.DistributedGradientTape(tape)

    grads = tape.gradient(loss_value, mnist_model.trainable_variables)
    opt.apply_gradients(zip(grads, mnist_model.trainable_variables))

    # Horovod: broadcast initial variable states from rank 0 to all other processes.
    # This is necessary to ensure consistent initialization of all workers when
    # training is started with random weights or restored from a checkpoint.
    if first_batch:
        hvd.broadcast_variables(mnist_model.variables, root_rank=0)
        hvd.broadcast_variables(opt.variables, root_rank=0)

    return loss_value


for batch, (images, labels) in enumerate(dataset.take(args.steps)):
    loss_value = training_step(images, labels, batch == 0)
    if batch % 200 == 0 and hvd.rank() == 0:
        print(f"Step #{batch}\tLoss: {loss_value:.6f}", flush=True)

# Every rank scores its own model on the test set; report the mean over ranks.
pred = tf.argmax(mnist_model(data["x_test"], training=False), axis=1)
acc = tf.reduce_mean(tf.cast(pred == data["y_test"], tf.float64))
acc = float(hvd.allreduce(acc, op=hvd.Average, name="test_acc"))
if hvd.rank() == 0:
    print("RESULT accuracy " + json.dumps({"test_acc": acc}), flush=True)
