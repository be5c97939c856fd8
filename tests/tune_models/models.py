"""Model factories for ``alsgd-tune profile --model tests/tune_models/models.py:FUNC``."""

import torch
import torch.nn as nn


def mlp_1m():
    """A ~1.2M-parameter MLP (4.7 MB of float32) on 256 features, 10 classes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1536), nn.ReLU(), nn.Linear(1536, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    x = torch.randn(32, 256)
    y = torch.randint(0, 10, (32,))
    return model, nn.CrossEntropyLoss(), (x, y)


def keras_small():
    import numpy as np
    import tensorflow as tf

    model = tf.keras.Sequential([tf.keras.Input((40,)), tf.keras.layers.Dense(64, activation="relu"),
                                 tf.keras.layers.Dense(10)])
    x = np.random.default_rng(0).normal(size=(16, 40)).astype("float32")
    y = np.arange(16) % 10
    return model, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, y)


def raises():
    raise RuntimeError("cannot build the model: weights file missing")


def wrong_shape():
    return nn.Linear(2, 2)
