"""The ``lm`` scenario's workload: a small byte-level causal transformer on a text corpus every
machine here has offline, the Python standard library's own source files.

The corpus: the ``.py`` files under the standard library's directory (``os.path.dirname(os.__file__)``,
without ``site-packages`` and tests), in sorted order; every tenth file is validation, the rest
training, each capped so that the run reads a few MB. Each rank draws its training windows
from its own contiguous share of the training bytes; validation is a fixed set of windows
every rank evaluates the same way. Nothing is downloaded.

Example::

    >>> import torch
    >>> from adaptive_lsgd.tools.bench.lm import ByteTransformer
    >>> model = ByteTransformer(context=16, width=32, layers=1, heads=2)
    >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

CONTEXT, WIDTH, LAYERS, HEADS = 64, 128, 5, 4
TRAIN_BYTES, VALID_BYTES = 6_000_000, 400_000


class ByteTransformer(nn.Module):
    """Token and position embeddings, pre-norm causal transformer blocks, a linear head over
    the 256 byte values (about 1.05M parameters at the defaults)."""

    def __init__(self, context: int = CONTEXT, width: int = WIDTH, layers: int = LAYERS,
                 heads: int = HEADS):
        super().__init__()
        self.tokens = nn.Embedding(256, width)
        self.positions = nn.Parameter(torch.zeros(context, width))
        nn.init.normal_(self.positions, std=0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        # a boolean mask (True: not attended): a float one holds -inf, which nonfinite_guard
        # would take for a broken model in every average of the buffers
        self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).triu(1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tokens(x) + self.positions[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats per byte)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def stdlib_files() -> list:
    """The standard library's ``.py`` files, sorted (no site-packages, no test suites)."""
    root = os.path.dirname(os.__file__)
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "test", "tests",
                                                      "idlelib", "__pycache__"))
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return sorted(out)


def corpus(train_bytes: int = TRAIN_BYTES, valid_bytes: int = VALID_BYTES) -> tuple:
    """(train, validation) as uint8 tensors: every tenth file is validation."""
    train, valid, n_train, n_valid = [], [], 0, 0
    for i, path in enumerate(stdlib_files()):
        is_valid = i % 10 == 0
        if (n_valid >= valid_bytes) if is_valid else (n_train >= train_bytes):
            continue
        with open(path, "rb") as f:
            data = f.read()
        (valid if is_valid else train).append(data)
        if is_valid:
            n_valid += len(data)
        else:
            n_train += len(data)
        if n_train >= train_bytes and n_valid >= valid_bytes:
            break
    as_tensor = lambda parts, cap: torch.frombuffer(bytearray(b"".join(parts)[:cap]),  # noqa: E731
                                                    dtype=torch.uint8)
    return as_tensor(train, train_bytes), as_tensor(valid, valid_bytes)


def windows(data: torch.Tensor, count: int, context: int, generator: torch.Generator) -> tuple:
    """``count`` random windows of ``context + 1`` bytes: (inputs, next-byte targets)."""
    starts = torch.randint(0, len(data) - context - 1, (count,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    w = data[idx].long()
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def rank_data(rank: int, size: int, count: int = 20_000, valid_count: int = 256) -> tuple:
    """This rank's training windows (from its own share of the training bytes) and the shared
    validation windows: ``((x, y), (x_valid, y_valid))``."""
    train, valid = corpus()
    share = len(train) // size
    mine = train[rank * share:(rank + 1) * share]
    g = torch.Generator().manual_seed(7 + rank)
    return (windows(mine, count, CONTEXT, g),
            windows(valid, valid_count, CONTEXT, torch.Generator().manual_seed(99)))


def cosine_lr(base: float, frac: float, warmup: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` of the run, then cosine decay to ``floor * base``."""
    if frac < warmup:
        return base * (frac + 1e-3) / warmup
    t = (frac - warmup) / max(1e-9, 1 - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> tuple:
    """(validation loss in nats per byte, next-byte accuracy)."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        total += float(lm_loss(logits, y[i:i + batch])) * y[i:i + batch].numel()
        correct += int((logits.argmax(-1) == y[i:i + batch]).sum())
        n += y[i:i + batch].numel()
    model.train()
    return total / n, correct / n
