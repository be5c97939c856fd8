"""Argument types shared by the command-line tools (argparse ``type=`` callables).

Example::

    >>> from adaptive_lsgd.tools.cli.args import number, positive_int
    >>> positive_int("4"), number(0, lo_open=True)("0.5")
    (4, 0.5)
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def number(lo: float, lo_open: bool):
    """A finite float ``> lo`` (``lo_open``) or ``>= lo``."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(
                f"expected a number {'>' if lo_open else '>='} {lo:g}, got {text!r}")
        return v
    return parse
