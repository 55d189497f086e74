"""What the optimizers accept from a training closure."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["loss_is_finite"]


def loss_is_finite(loss: Any) -> bool:
    """Whether the closure's return value is a finite loss: a tensor, a Python / numpy
    number (``loss.item()``) or None (a closure that returns nothing; the update's own
    finiteness check still guards the step).  Anything else is a TypeError naming it."""
    if loss is None:
        return True
    if torch.is_tensor(loss):
        return bool(torch.isfinite(loss.detach()).all())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return math.isfinite(float(loss))
    raise TypeError(f"the closure must return the loss (a tensor or a number); got "
                    f"{type(loss).__name__}")
