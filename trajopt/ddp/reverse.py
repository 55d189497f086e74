r"""Jacobians and Hessians of a per-point function at N points by one reverse-mode pass.

``vmap(jacfwd(f))`` costs ~0.1-0.5 ms per operation of ``f`` for 100 points here (the
transforms' batching rules run per operation, nested); ``f`` itself costs a few
microseconds per operation.  For a map with ``k`` outputs the rows of its Jacobian at all
N points are one backward pass over ``f`` evaluated *once* on the points replicated
``k`` times (copy ``i`` gets the unit cotangent :math:`e_i`):

.. math::

    y = f(x^{(rep)}), \quad \bar x = (\partial y / \partial x)^\top \bar y, \quad
    \bar y_{iN+p} = e_i \;\Rightarrow\; \bar x_{iN+p} = \partial y_i / \partial x\,(x_p) .

A Hessian is the same trick on the gradient (a double backward).  ``f`` is evaluated
under ``vmap``, one point at a time, so it sees exactly what it saw under
``vmap(jacfwd)``: a single sample and, for time-varying models, a 0-d stage tensor --
or, with ``rowwise=True``, as the model's own batched call on all replicated rows at
once, where the caller has one (a model at a fixed ``int`` stage, a terminal cost, the
continuous ``f(x, u)`` of :func:`~trajopt.ddp.models.discretize`: the calls the
rollouts and the time-invariant values already make on rows). ``vmap``'s batching of
each operation costs ~0.05-0.3 ms a call at 100 points and, for transcendental
operations more at large N (the Jacobians of mpc.pytorch's pendulum at 25,600 points:
4.9-5.3 against 3.9-4.6 ms); the batched call pays neither.
The derivatives equal the forward-mode ones up to rounding (the products are summed in
another order), and the first evaluation of every model compares them with the
transforms (:func:`reverse_or_transforms`).

Only used where no outer autograd graph is wanted (grad mode off, as in every DDP
solve): the result is detached.  A solve runs under inference mode
(:mod:`trajopt.ddp.inference`), where no graph is recorded: the pass leaves it, on
replicas of the points made outside it (normal tensors).  Callers fall back to the
torch.func transforms when ``f`` cannot be differentiated this way or has an unexpected output size
(:func:`jacobians` and :func:`gradient_and_hessian` return ``None``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.func import vmap

from ..errors import InvalidArgumentError
from .inference import outside
from .writes import IN_PLACE_ON_LEAF, write_message

__all__ = ["jacobians", "gradient_and_hessian", "reverse_or_transforms", "all_finite"]


def _replicated(args: tuple[torch.Tensor, ...], nd: int, k: int):
    """The first ``nd`` arguments replicated ``k`` times along rows, as new leaves that
    require grad; the others (stage tensors) replicated as they are."""
    out = []
    for i, a in enumerate(args):
        r = a.detach().repeat(k, *([1] * (a.ndim - 1)))
        out.append(r.requires_grad_() if i < nd else r)
    return out


def _grads(y: torch.Tensor, leaves, cotangent: torch.Tensor, **kw):
    """``autograd.grad`` with zeros for leaves ``y`` does not depend on."""
    if not y.requires_grad:
        return [torch.zeros_like(v) for v in leaves]
    g = torch.autograd.grad(y, leaves, cotangent, allow_unused=True, **kw)
    return [torch.zeros_like(v) if gi is None else gi for gi, v in zip(g, leaves)]


def _unit_rows(k: int, N: int, like: torch.Tensor) -> torch.Tensor:
    """(k N, k): row ``i N + p`` is :math:`e_i`; read only, kept for the last few shapes
    (a solve asks for the same three at every iteration, five operations each)."""
    return _cached_unit_rows(k, N, like.dtype, like.device)


@functools.lru_cache(maxsize=16)
def _cached_unit_rows(k: int, N: int, dtype: torch.dtype, device: torch.device
                      ) -> torch.Tensor:
    return torch.eye(k, dtype=dtype, device=device).repeat_interleave(N, 0)


def all_finite(tensors) -> bool:
    """Every entry of every tensor finite, in one synchronization: ``v - v`` is exactly 0
    where ``v`` is finite and NaN where it is not, so the sum over all of them is 0 exactly
    when every entry is finite (7 operations for two tensors, where ``isfinite(v).all()``
    decomposes into 7 a tensor)."""
    total = None
    for v in tensors:
        s = (v - v).sum()
        total = s if total is None else total + s
    return total is None or bool(total == 0)


def jacobians(single: Callable, args: tuple[torch.Tensor, ...], k: int, nd: int = 2, *,
              rowwise: bool = False) -> list[torch.Tensor] | None:
    """Jacobians (N, k, d_j) of ``single`` (one point -> (k,)) with respect to its first
    ``nd`` arguments at the N points ``args`` (each (N, d_j); the rest, e.g. stages, (N,)),
    or ``None`` when ``single`` does not return ``k`` values per point.  ``rowwise``:
    ``single`` is a function of rows ((M, d_j) -> (M, k)), called once on the replicated
    rows instead of under ``vmap`` (module docstring)."""
    N = args[0].shape[0]
    with outside(), torch.enable_grad():
        rep = _replicated(args, nd, k)
        y = single(*rep) if rowwise else vmap(single)(*rep)
        if y.shape != (k * N, k):
            return None
        grads = _grads(y, rep[:nd], _unit_rows(k, N, y))
    return [g.view(k, N, -1).transpose(0, 1) for g in grads]


def gradient_and_hessian(single: Callable, args: tuple[torch.Tensor, ...], nd: int = 2, *,
                         rowwise: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Gradient (N, d) and Hessian (N, d, d) of the scalar ``single`` with respect to its
    first ``nd`` arguments jointly (``d`` the sum of their sizes), at the N points
    ``args``; ``None`` when ``single`` does not return one value per point.
    ``rowwise``: as in :func:`jacobians` ((M, d_j) -> (M,))."""
    N = args[0].shape[0]
    d = sum(a.shape[-1] for a in args[:nd])
    with outside(), torch.enable_grad():
        rep = _replicated(args, nd, d)
        val = single(*rep) if rowwise else vmap(single)(*rep)
        if val.shape != (d * N,):
            return None
        g = torch.cat(_grads(val, rep[:nd], torch.ones_like(val), create_graph=True), -1)
        H = torch.cat(_grads(g, rep[:nd], _unit_rows(d, N, g)), -1)
    return g[:N].detach(), H.view(d, N, d).transpose(0, 1)


def reverse_or_transforms(model: object, key: str, fast: Callable, slow: Callable,
                          args: tuple, nd: int = 2):
    """The derivatives at the points ``args`` by one reverse-mode pass (``fast(args)``,
    :mod:`trajopt.ddp.reverse`: several times faster than ``vmap(jacfwd)``;
    ``docs/performance.md``) where that gives the transforms' answer, else by the
    transforms (``slow(args)``).

    Reverse mode is taken with grad mode off (the result carries no outer graph, as the
    transforms' would with grad mode on), for functions reverse mode can run under
    ``vmap``, where the result is finite (``torch.where(w != 0, sin(w) / w, 1)`` at
    ``w = 0`` sends a zero cotangent into the unselected branch, whose local derivative
    is NaN; forward mode selects the finite tangent), and for a model whose first
    evaluation (``key`` names it on ``model``) agreed with the transforms: a
    ``torch.no_grad()`` block or a custom autograd Function inside the function is seen
    by forward mode and not by reverse mode, or the other way round.  The check runs at
    the first evaluation's points and at points moved off them (the first ``nd``
    arguments), where a hidden part's derivative does not vanish by accident (a drag
    ``v |v|`` at rest).  The transforms name a genuine error."""
    state = getattr(model, key, None)
    who = _WHO.get(key, "the model")
    if state is False or torch.is_grad_enabled():
        return _transforms(slow, args, who)
    try:
        out = fast(args)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        if IN_PLACE_ON_LEAF in str(exc):   # the points are fresh leaves: a write into them
            raise InvalidArgumentError(write_message(
                who, "its argument x or u (or another tensor that requires grad)")) from exc
        out = None
    if out is None or not all_finite(out):
        return _transforms(slow, args, who)
    if state is None:  # the first evaluation: against the transforms
        try:
            ref = slow(args)
        except (RuntimeError, TypeError, ValueError, IndexError):
            # the transforms cannot run it (``refs[t]`` under vmap(jacfwd)): nothing to
            # compare with, reverse mode is the only way to vectorize it
            setattr(model, key, True)
            return out
        # and at points moved off the first ones: a hidden part whose derivative
        # vanishes there (a drag v|v| at rest) would pass the first comparison
        agree = _agree(out, ref) and _agree_moved(fast, slow, args, nd)
        setattr(model, key, agree)
        return ref
    return out


def _transforms(slow: Callable, args: tuple, who: str):
    """``slow(args)``; torch.func's message for a function that leaves torch (``.numpy()``
    inside it) turned into one naming the model."""
    try:
        return slow(args)
    except RuntimeError as exc:
        if any(m in str(exc) for m in _LEAVES_TORCH):
            raise InvalidArgumentError(
                f"{who} leaves torch (.numpy(), a NumPy or math function on a tensor), "
                f"where its derivatives cannot be taken: write it with torch operations or "
                f"override derivatives() with analytic ones") from exc
        raise


#: torch's messages for ``.numpy()`` on a tensor under the transforms (forward mode; reverse
#: mode)
_LEAVES_TORCH = ("Cannot access data pointer of Tensor that doesn't have storage",
                 "Can't call numpy() on Tensor that requires grad")

#: the models' names by their :func:`reverse_or_transforms` keys (for error messages)
_WHO = {"_reverse_agrees": "the dynamics", "_reverse_agrees_f": "the dynamics",
        "_reverse_agrees_running": "the running cost",
        "_reverse_agrees_terminal": "the terminal cost"}


def _agree(out, ref) -> bool:
    """Equal to 1000 eps (of the coarser dtype: forward mode may promote float32 to
    float64) of each reference tensor's scale where both are finite."""
    for a, b in zip(out, ref):
        if a.shape != b.shape:
            return False
        ok = torch.isfinite(a) & torch.isfinite(b)
        eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
        tol = 1000 * eps * (1 + b[ok].abs().amax() if ok.any() else 1)
        if not bool(((a - b).abs() <= tol)[ok].all()):
            return False
    return True


def _moved(args: tuple, nd: int) -> tuple:
    """The first ``nd`` arguments moved by 1e-3 (1 + |v|) in a fixed random direction."""
    g = torch.Generator(device=args[0].device).manual_seed(0)
    return tuple(a + 1e-3 * (1 + a.abs()) * torch.randn(a.shape, generator=g, dtype=a.dtype,
                                                          device=a.device)
                 if i < nd else a for i, a in enumerate(args))


def _agree_moved(fast: Callable, slow: Callable, args: tuple, nd: int) -> bool:
    """:func:`_agree` of the two at :func:`_moved` points (True when either cannot run
    there: nothing to compare)."""
    moved = _moved(args, nd)
    try:
        return _agree(fast(moved), slow(moved))
    except (RuntimeError, TypeError, ValueError, IndexError):
        return True
