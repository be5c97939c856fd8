"""A Keras Horovod script written the way Horovod's
examples/tensorflow2/tensorflow2_keras_mnist.py is, on MNIST-1D: model.fit with
horovod.tensorflow.keras's DistributedOptimizer and callbacks. It knows nothing of
adaptive-lsgd.

    horovodrun -np 2 -H localhost:2 --gloo python tests/user_scripts/keras_mnist1d.py
"""

import argparse
import json

import horovod.tensorflow.keras as hvd
import tensorflow as tf

from adaptive_lsgd.tools.demo.datasets import load_mnist1d, shard

parser = argparse.ArgumentParser(description="Keras MNIST-1D Example")
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

# Horovod: initialize Horovod.
hvd.init()
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.keras.utils.set_random_seed(42)

data = load_mnist1d()
idx = shard(len(data["x"]), hvd.rank(), hvd.size())

mnist_model = tf.keras.Sequential([
    tf.keras.layers.Reshape((40, 1), input_shape=(40,)),
    tf.keras.layers.Conv1D(32, 5, padding="same", activation="relu"),
    tf.keras.layers.Conv1D(32, 3, strides=2, padding="same", activation="relu"),
    tf.keras.layers.Conv1D(32, 3, strides=2, padding="same", activation="relu"),
    tf.keras.layers.Flatten(),
    tf.keras.layers.Dense(10),
])

# Horovod: adjust learning rate based on number of workers.
scaled_lr = 0.025 * hvd.size()
opt = tf.optimizers.SGD(scaled_lr, momentum=0.9)

# Horovod: add Horovod DistributedOptimizer.
opt = hvd.DistributedOptimizer(opt)

mnist_model.compile(loss=tf.losses.SparseCategoricalCrossentropy(from_logits=True),
                    optimizer=opt, metrics=["accuracy"])

callbacks = [
    # Horovod: broadcast initial variable states from rank 0 to all other processes.
    hvd.callbacks.BroadcastGlobalVariablesCallback(0),
    # Horovod: average metrics among workers at the end of every epoch.
    hvd.callbacks.MetricAverageCallback(),
    # Scale the learning rate down 10x for the last quarter of training.
    tf.keras.callbacks.LearningRateScheduler(
        lambda epoch: scaled_lr * (0.1 if epoch >= args.epochs * 3 // 4 else 1.0)),
]

mnist_model.fit(data["x"][idx], data["y"][idx], batch_size=args.batch_size, epochs=args.epochs,
                callbacks=callbacks, verbose=2 if hvd.rank() == 0 else 0)

# Every rank scores its own model on the test set; report the mean over ranks.
_, acc = mnist_model.evaluate(data["x_test"], data["y_test"], verbose=0)
acc = float(hvd.allreduce(tf.constant(acc, tf.float64), name="test_acc"))
if hvd.rank() == 0:
    print("RESULT accuracy " + json.dumps({"test_acc": acc}), flush=True)
