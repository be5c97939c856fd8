"""Offline data for demos, tests and benchmarks: MNIST-1D generated from the ``mnist1d``
package's templates (nothing downloads), cached as ``.npz`` so every worker reads the same
arrays.

Example::

    >>> from adaptive_lsgd.tools.demo.datasets import load_mnist1d
    >>> data = load_mnist1d(num_samples=500)
    >>> data["x"].shape[1], data["x"].dtype.name, sorted(set(data["y"].tolist()))[:3]
    (40, 'float32', [0, 1, 2])
"""

from __future__ import annotations

import os

import numpy as np

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                     "adaptive-lsgd", "data")


def load_mnist1d(num_samples: int = 12000, seed: int = 42, cache_dir: str = CACHE) -> dict:
    """Train/test arrays: ``x`` (N, 40) float32, ``y`` int64, ``x_test``, ``y_test`` (20%)."""
    path = os.path.join(cache_dir, f"mnist1d-{num_samples}-{seed}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    raw = make_dataset(args)
    data = {"x": raw["x"].astype(np.float32), "y": raw["y"].astype(np.int64),
            "x_test": raw["x_test"].astype(np.float32), "y_test": raw["y_test"].astype(np.int64)}
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **data)
    os.replace(tmp, path)  # atomic: several workers may generate at once
    return data


def shard(n: int, rank: int, size: int) -> np.ndarray:
    """Indices of rank's shard of ``n`` samples (contiguous, equal sizes, like DistributedSampler
    without shuffling)."""
    per = n // size
    return np.arange(rank * per, (rank + 1) * per)
