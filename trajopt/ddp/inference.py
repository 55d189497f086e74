r"""The DDP loop under :func:`torch.inference_mode`.

A solve is thousands of small torch operations: one pendulum swing-up (T = 100, 20
iterations) calls the user's dynamics ~2,400 times, ~12 operations each, and the loop's
own bookkeeping adds as many.  Each operation pays torch's dispatch.  Under
``torch.no_grad()`` an operation still passes the dispatcher's autograd and view-tracking
layers; ``torch.inference_mode()`` skips both for the tensors made inside it: the
user's pendulum step takes 12 instead of 14 us, an (L) solve 1.85 instead of 2.2 ms
(``docs/performance.md``, "Tenth round").  The results are bitwise the same.

Inference tensors are restricted outside the mode: they cannot be updated in place there
nor saved for a backward pass.  So nothing made inside leaves as one:

- the result is packed outside the mode, every array a normal tensor
  (:func:`~trajopt.ddp.batch.pack_result`, :func:`normal`);
- the iteration logs are made outside the mode and the callback runs there;
- derivatives by reverse-mode autograd (:mod:`trajopt.ddp.reverse`) are taken outside the
  mode, on copies of the points.

A model that needs autograd inside its own evaluation (a dynamics computing
``torch.autograd.grad`` of an energy) cannot run under inference mode: no graph is recorded
there.  The solve's first rollout tells (:func:`refuse_if_runs_outside`): when it fails
under the mode and runs outside it, the solver, its dynamics and its cost are marked and
the solve runs again under ``torch.no_grad()`` alone, as every later solve with them does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["run", "refuse_if_runs_outside", "normal", "outside"]

R = TypeVar("R")

#: set to True on a model (and the solver) that failed under inference mode
_MARK = "_trajopt_needs_autograd"


class RefusedError(Exception):
    """Internal: the first rollout failed under inference mode and ran outside it."""


def run(solve: Callable[[], R], models: tuple) -> R:
    """``solve()`` under ``torch.inference_mode()`` unless one of ``models`` is marked;
    on :class:`RefusedError` the models are marked and ``solve()`` runs again outside it."""
    if any(getattr(m, _MARK, False) for m in models):
        return solve()
    try:
        with torch.inference_mode():
            return solve()
    except RefusedError:
        for m in models:
            try:
                setattr(m, _MARK, True)
            except (AttributeError, TypeError):   # __slots__, a frozen object
                pass
        return solve()


def refuse_if_runs_outside(rollout: Callable[[], object], exc: BaseException) -> None:
    """Called where the first rollout raised ``exc``: raise :class:`RefusedError` if that was
    under inference mode and ``rollout()`` runs outside it; return otherwise (``exc`` is
    then the model's own error, to be reported)."""
    if not torch.is_inference_mode_enabled():
        return
    try:
        with outside():
            rollout()
    except Exception:   # fails either way: the model's own error
        return
    raise RefusedError() from exc


def normal(t: torch.Tensor) -> torch.Tensor:
    """``t`` usable anywhere: a copy of an inference tensor (call outside the mode, where
    ``clone`` makes a normal tensor), else ``t`` itself."""
    return t.clone() if t.is_inference() else t


@contextmanager
def outside() -> Iterator[None]:
    """Leave inference mode, grad mode unchanged (``torch.inference_mode(False)`` alone
    turns grad mode on: the guard sets it to ``not enabled``)."""
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield
