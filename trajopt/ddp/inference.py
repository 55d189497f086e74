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

The first solve with a model runs under ``torch.no_grad()`` alone: what a model makes and
keeps at its first call -- a lazy module's parameters, a cached matrix -- would otherwise
be an inference tensor, which autograd later ignores silently (a ``LazyLinear``
initialized in inference mode gets no gradient).  The models are marked as seen after it.

A model that needs autograd inside its own evaluation (a dynamics computing
``torch.autograd.grad`` of an energy) cannot run under inference mode: no graph is recorded
there.  The solve's first rollout tells (:func:`refuse_if_runs_outside`): when it fails
under the mode and runs outside it, the models are marked and the solve runs again under
``torch.no_grad()`` alone, as every later solve with them does.

Forward-mode derivatives (``torch.func.jacfwd`` of constraints and of models) need a
torch that runs them under the mode: torch 2.1, 2.6 and 2.11 raise "Batching rule not
implemented for aten::_make_dual" there (2.11 seen on a GPU machine; 2.13 runs them).
:func:`forward_ad_works` asks torch once per process; where it says no, every solve runs
under ``torch.no_grad()`` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import TypeVar

import torch

__all__ = ["run", "user_objects", "refuse_if_runs_outside", "normal", "outside",
           "forward_ad_works"]

R = TypeVar("R")

#: set to True on a model that failed under inference mode
_MARK = "_trajopt_needs_autograd"
#: set to True on a model after its first solve (run under no_grad)
_SEEN = "_trajopt_seen"


class RefusedError(Exception):
    """Internal: the first rollout failed under inference mode and ran outside it."""


def run(solve: Callable[[], R], models: tuple) -> R:
    """``solve()`` under ``torch.inference_mode()`` where every one of ``models`` (the
    user's code, :func:`user_objects`) has been solved before and none needs autograd,
    and where this torch takes forward-mode derivatives there (:func:`forward_ad_works`);
    the first solve with one under the caller's mode (``no_grad``); on
    :class:`RefusedError` the models are marked and ``solve()`` runs again outside the
    mode."""
    models = tuple(m for m in models if m is not None)
    if any(getattr(m, _MARK, False) for m in models) or not forward_ad_works():
        return solve()
    fresh = tuple(m for m in models if not getattr(m, _SEEN, False) and _markable(m))
    if fresh:
        out = solve()
        _mark(fresh, _SEEN)
        return out
    try:
        with torch.inference_mode():
            return solve()
    except RefusedError:
        _mark(models, _MARK)
        return solve()


@cache
def forward_ad_works() -> bool:
    """Whether this torch takes ``vmap(jacfwd(f))`` under ``torch.inference_mode()`` (asked
    once per process, on a (2, 1) float64 tensor: ~1 ms)."""
    try:
        with torch.inference_mode():
            torch.func.vmap(torch.func.jacfwd(torch.sin))(torch.ones(2, 1, dtype=torch.float64))
    except RuntimeError:
        return False
    return True


def user_objects(*models, depth: int = 3) -> tuple:
    """The user's code behind ``models``: an object whose class is not trajopt's (a
    function, a module, a subclass of :class:`~trajopt.ddp.models.Dynamics` written by the
    user) is itself; a trajopt object (``Dynamics(f)``, ``Cost(running, terminal)``,
    ``QuadraticCost``, an augmented cost, made anew by ``solve_ddp`` at each call) is the
    callables and trajopt objects it holds, ``depth`` levels down (lists included); a
    trajopt object holding no user code (``LinearDynamics``, ``QuadraticCost``) gives
    none."""
    out: list = []
    for m in models:
        if m is None or isinstance(m, torch.Tensor):
            continue
        if not type(m).__module__.startswith("trajopt."):
            if callable(m) or hasattr(m, "__dict__"):
                out.append(m)
            continue
        if depth and hasattr(m, "__dict__"):
            held = []
            for v in vars(m).values():
                for w in (v if isinstance(v, (list, tuple)) else (v,)):
                    if callable(w) or type(w).__module__.startswith("trajopt."):
                        held.append(w)
            out.extend(user_objects(*held, depth=depth - 1))
    return tuple(out)


def _markable(m) -> bool:
    """Whether ``m`` can carry the marks (a bound method cannot: it is then taken as
    seen, since no first solve could be remembered)."""
    try:
        setattr(m, _SEEN, getattr(m, _SEEN, False))
    except (AttributeError, TypeError):
        return False
    return True


def _mark(models: tuple, name: str) -> None:
    for m in models:
        try:
            setattr(m, name, True)
        except (AttributeError, TypeError):   # __slots__, a frozen object, a method
            pass


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
