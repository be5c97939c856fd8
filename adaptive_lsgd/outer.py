"""The outer step of global syncs (DiLoCo, SlowMo) and the reference model compressed syncs
send their update against.

With ``outer_optimizer`` or ``compression`` set, every rank keeps the model of the last global
sync (``prev``, the same on every rank: it is computed from values all ranks share). At a
global sync:

* with ``compression``, a rank sends ``x_local - prev`` (rounded to fp16 or bf16 on the slow
  links) instead of its parameters; the average of the updates plus ``prev`` is the average
  of the models (averaging is linear), so nothing but precision changes, and only in the
  update, never in the weights themselves;
* with ``outer_optimizer``, the averaged model ``avg`` becomes a pseudo-gradient
  ``g = prev - avg`` for an outer SGD step with PyTorch's SGD rule: ``buf <- mu buf + g`` (``g``
  at the first step), ``update = g + mu buf`` (``nesterov``) or ``buf`` (``sgd``), and
  ``x_global = prev - outer_lr * update``. Every rank continues from ``x_global``. With
  ``outer_lr: 1`` and ``outer_momentum: 0`` it is plain averaging.
* the momentum follows the inner learning rate, as SlowMo's slow momentum does (Wang et al.,
  ICLR 2020: ``u <- mu u + g / lr``, a step of ``outer_lr * lr * u``): when the inner LR
  (the smallest over the ranks, from the sync's shared table) changed since the last global
  sync, ``buf`` is scaled by ``lr_now / lr_then`` before ``g`` is added. Under a constant LR
  nothing changes; after a step decay the momentum of the faster phase no longer drives the
  slower one at its old size. Unknown LRs (an integration that reports none) leave it as is.

The first global sync of a run (and one that gives every rank rank 0's model) is plain
averaging: it sets ``prev``; outer steps start at the next one. Lower levels always average.
Memory: one copy of the parameters for ``prev`` and, with momentum, one for ``buf``.

Example, the outer step alone on numpy buffers::

    >>> import numpy as np
    >>> from adaptive_lsgd import load_config
    >>> from adaptive_lsgd.outer import OuterState
    >>> from adaptive_lsgd.sync import NumpyBackend
    >>> cfg = load_config({"outer_optimizer": "nesterov", "outer_lr": 0.5,
    ...                    "outer_momentum": 0.5}, env={})
    >>> outer, backend = OuterState(cfg), NumpyBackend()
    >>> outer.advance(backend, [np.array([1.0])])[0].tolist()   # first global sync: averaging
    [1.0]
    >>> outer.advance(backend, [np.array([0.0])])[0].tolist()   # g = 1, buf = 1, update 1.5
    [0.25]
    >>> outer.advance(backend, [np.array([0.25])], lr=0.1)[0].tolist()   # g = 0, buf = 0.5
    [0.125]
    >>> # LR 0.1 -> 0.01: buf = 0.5 x 0.1 x 0.5 + 0 = 0.025 (0.25 with a constant LR)
    >>> outer.advance(backend, [np.array([0.125])], lr=0.01)[0].tolist()
    [0.11875]
"""

from __future__ import annotations

WIRE_BYTES = {"none": 4, "fp16": 2, "bf16": 2}


def uses_reference(config) -> bool:
    """Whether ``config`` keeps a reference model at global syncs (outer step or compression)."""
    return config.outer_optimizer != "none" or config.compression != "none"


def wire_factor(config) -> float:
    """The share of a float32 model's bytes a global sync sends over the top-level links."""
    return WIRE_BYTES[config.compression] / 4


class OuterState:
    """One rank's outer state: ``prev`` (the last global model, as the backend's flat
    buffers of the parameters), ``buf`` (the outer momentum, or None), ``steps`` (outer steps
    taken). Identical on every rank. See the module docstring for the rule."""

    __slots__ = ("optimizer", "lr", "momentum", "compression", "prev", "buf", "steps", "inner_lr")

    def __init__(self, config):
        self.optimizer = config.outer_optimizer
        self.lr = float(config.outer_lr)
        self.momentum = float(config.outer_momentum)
        self.compression = config.compression
        self.prev: list | None = None
        self.buf: list | None = None
        self.steps = 0
        self.inner_lr: float | None = None  # the inner LR at the last global sync

    @property
    def ready(self) -> bool:
        """Whether a global model is known (from the first global sync on)."""
        return self.prev is not None

    def clear(self) -> None:
        """Forget the reference (the next global sync is plain averaging and sets it)."""
        self.prev, self.buf = None, None

    def advance(self, backend, averaged: list, lr: float | None = None) -> list:
        """The new global model from the averaged parameters (flat buffers); updates the
        state. Plain averaging while not :attr:`ready` or without an outer optimizer. ``lr``:
        the inner learning rate every rank agrees on (None: unknown)."""
        new = averaged
        if self.optimizer != "none" and self.ready:
            prev = backend.load_state(self.prev)
            g = [p - a for p, a in zip(prev, averaged)]
            update = g
            if self.momentum > 0:
                mu = self.momentum
                if lr and self.inner_lr:  # the momentum follows the inner LR (SlowMo)
                    mu *= lr / self.inner_lr
                buf = g if self.buf is None else [
                    mu * b + gi for b, gi in zip(backend.load_state(self.buf), g)]
                self.buf = backend.store_state(backend.copy(buf))
                update = [gi + self.momentum * b for gi, b in zip(g, buf)] \
                    if self.optimizer == "nesterov" else buf
            new = [p - self.lr * u for p, u in zip(prev, update)]
            self.steps += 1
        if lr:
            self.inner_lr = float(lr)
        self.prev = backend.store_state(backend.copy(new))
        return new

    def state_dict(self) -> dict:
        """``prev`` and ``buf`` as the backend's buffers (lists: the integrations convert
        them), ``steps`` and ``inner_lr`` as numbers."""
        return {"prev": self.prev, "buf": self.buf, "steps": self.steps, "inner_lr": self.inner_lr}

    def load_state_dict(self, state: dict) -> None:
        self.prev, self.buf, self.steps = state["prev"], state["buf"], int(state["steps"])
        self.inner_lr = state.get("inner_lr")  # absent in checkpoints before it was kept


__all__ = ["OuterState", "uses_reference", "wire_factor", "WIRE_BYTES"]
