r"""Dynamics and costs for DDP: batched torch callables with derivatives from torch.func.

A :class:`Dynamics` maps a batch of states ``x`` (..., n_t) and controls ``u`` (..., m_t)
at stage ``t`` to ``x_{t+1}`` (..., n_{t+1}).  Its derivatives

.. math::  f_x = \partial f/\partial x, \quad f_u = \partial f/\partial u, \quad
           f_{xx}, f_{ux}, f_{uu} \text{ (second order, for full DDP)}

come from :mod:`torch.func` (``vmap`` of ``jacrev``/``jacfwd``) unless a subclass overrides
:meth:`Dynamics.derivatives` with analytic ones.  A :class:`Cost` does the same for the
running cost :math:`l_t(x, u)` and the terminal cost :math:`l_T(x)`.

Callables are written for batched inputs (index with ``x[..., i]``); under ``vmap`` they
see single samples, which such code handles unchanged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import jacfwd, jacrev, vmap

from .._checks import as_real, check_finite, check_square, check_symmetric, shape_str
from ..errors import InvalidArgumentError, ShapeError
from .modules import as_row_batch
from .reverse import gradient_and_hessian, jacobians, reverse_or_transforms
from .stage_argument import model_ignores_stage

__all__ = ["Dynamics", "Cost", "QuadraticCost", "DynamicsDerivatives", "CostDerivatives",
           "discretize", "as_dynamics"]


@dataclass(frozen=True)
class DynamicsDerivatives:
    """Derivatives of one stage on a flat batch of N points.

    fx : (N, n1, n); fu : (N, n1, m); fxx : (N, n1, n, n) or None;
    fux : (N, n1, m, n) or None; fuu : (N, n1, m, m) or None.
    """

    fx: torch.Tensor
    fu: torch.Tensor
    fxx: torch.Tensor | None = None
    fux: torch.Tensor | None = None
    fuu: torch.Tensor | None = None


@dataclass(frozen=True)
class CostDerivatives:
    """Derivatives of a running cost on N points: lx (N, n), lu (N, m), lxx (N, n, n),
    luu (N, m, m), lux (N, m, n)."""

    lx: torch.Tensor
    lu: torch.Tensor
    lxx: torch.Tensor
    luu: torch.Tensor
    lux: torch.Tensor


class Dynamics:
    """Batched discrete-time dynamics ``x_{t+1} = f_t(x_t, u_t)``.

    Parameters
    ----------
    f : callable ``f(x, u, t) -> x_next``, optional
        The map, for batched ``x`` (..., n_t), ``u`` (..., m_t); a callable ``f(x, u)``
        is time invariant.  Subclasses may instead override :meth:`forward`.
    time_invariant : bool or None
        True when ``f`` ignores ``t``: values and derivatives of all stages are then
        evaluated in one batched call (much faster).  None (the default): True when ``f``
        never reads ``t`` (:func:`~trajopt.ddp.stage_argument.ignores_argument`, a
        conservative test of its bytecode; a subclass's :meth:`forward` likewise when it
        overrides neither :meth:`derivatives` nor ``__call__``), else False.  False
        forces the time-varying path (each point differentiated at its own stage).
    """

    time_invariance_inferred = time_invariance_confirmed = False  # for subclasses' own __init__

    def __init__(self, f: Callable | None = None, *, time_invariant: bool | None = None):
        if f is not None and _takes_two(f):
            two = f
            f, time_invariant = (lambda x, u, t: two(x, u)), True
        self._f = f
        inferred = time_invariant is None
        self.time_invariant = model_ignores_stage(self, f, Dynamics, "forward", (
            "derivatives", "__call__")) if inferred else bool(time_invariant)
        #: found by the test above, not declared: the solvers confirm it on the first
        #: trajectory (:class:`~trajopt.ddp.stagewise.StageDerivatives`, ``model``)
        self.time_invariance_inferred = inferred and self.time_invariant

    def found_time_varying(self) -> None:
        """The inferred time invariance failed its check on a trajectory
        (:class:`~trajopt.ddp.stagewise.StageDerivatives`): time varying from now on."""
        self.time_invariant = self.time_invariance_inferred = False

    def stage_function(self) -> Callable:
        """``self(x, u, t)`` as one callable: the wrapped ``f`` itself where neither
        ``forward`` nor ``__call__`` is overridden (a rollout's call a stage), else self."""
        cls, f = type(self), getattr(self, "_f", None)
        plain = cls.forward is Dynamics.forward and cls.__call__ is Dynamics.__call__
        return f if f is not None and plain and "forward" not in vars(self) else self

    def forward(self, x: torch.Tensor, u: torch.Tensor, t: int) -> torch.Tensor:
        if self._f is None:
            raise NotImplementedError("pass f= or override Dynamics.forward")
        return self._f(x, u, t)

    def __call__(self, x: torch.Tensor, u: torch.Tensor, t: int) -> torch.Tensor:
        return self.forward(x, u, t)

    def derivatives(self, x: torch.Tensor, u: torch.Tensor, t: int | torch.Tensor, *,
                    second_order: bool = False) -> DynamicsDerivatives:
        """Jacobians (and Hessians) at the points ``x`` (N, n), ``u`` (N, m) of stage
        ``t``: an int, or a (N,) integer tensor giving each point its own stage (all
        stages of a trajectory in one call; :meth:`forward` then sees ``t`` as a 0-d
        tensor under ``vmap``)."""
        single, args = _per_point(self.forward, x, u, t)
        if not second_order:
            def fast(a):
                if torch.is_tensor(t) or not self.time_invariant:   # under vmap
                    return jacobians(single, a, x.shape[-1])
                # the rows of all stages in one call, as the time-invariant values are
                # evaluated (StageDerivatives.values): no vmap (trajopt.ddp.reverse)
                return jacobians(lambda xr, ur: self.forward(xr, ur, t), a, x.shape[-1],
                                 rowwise=True)

            def slow(a):
                return vmap(jacfwd(single, argnums=(0, 1)))(*a)
            fx, fu = _like(reverse_or_transforms(self, "_reverse_agrees", fast, slow, args), x)
            return DynamicsDerivatives(fx=fx, fu=fu)
        fx, fu = _like(vmap(jacfwd(single, argnums=(0, 1)))(*args), x)
        first = jacrev(single, argnums=(0, 1))
        (fxx, _), (fux, fuu) = vmap(jacfwd(first, argnums=(0, 1)))(*args)
        fxx, fux, fuu = _like((fxx, fux, fuu), x)
        return DynamicsDerivatives(fx=fx, fu=fu, fxx=fxx, fux=fux, fuu=fuu)


def _per_point(fn: Callable, x: torch.Tensor, u: torch.Tensor, t: int | torch.Tensor):
    """``fn(x, u, t)`` (:func:`~trajopt.ddp.modules.as_row_batch`) as a function of one point
    and the arguments to ``vmap`` it over: ``(x, u)``, or ``(x, u, t)`` for (N,) ``t``."""
    if torch.is_tensor(t):   # as_row_batch when called: the rowwise paths never are
        return (lambda xi, ui, ti: as_row_batch(fn)(xi, ui, ti)), (x, u, t)
    return (lambda xi, ui: as_row_batch(fn)(xi, ui, t)), (x, u)


def _like(tensors, x: torch.Tensor):
    """Cast derivatives to the dtype of ``x``: forward-mode AD of a division by a Python
    number promotes float32 to float64 (torch 2.13), which would mix dtypes downstream."""
    return tuple(t if t.dtype == x.dtype else t.to(x.dtype) for t in tensors)


def as_dynamics(dynamics: Dynamics | Callable) -> Dynamics:
    """Accept a :class:`Dynamics` or a plain callable ``dynamics(x, u, t)`` (or
    ``dynamics(x, u)``: then time invariant)."""
    if isinstance(dynamics, Dynamics):
        return dynamics
    if callable(dynamics):
        return Dynamics(dynamics)
    raise TypeError(f"dynamics must be a trajopt.Dynamics or a callable f(x, u, t); got "
                    f"{type(dynamics).__name__}")


def _takes_two(fn: Callable) -> bool:
    """``fn`` (an ``nn.Module``: its ``forward``, what ``module(x, u)`` calls) cannot take a
    third positional argument (``f(x, u)``, no ``t``)."""
    try:
        params = inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn
                                   ).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 2 and not any(
        p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)


class _Discretized(Dynamics):
    def __init__(self, f: Callable, dt: float, method: str, time_invariant: bool):
        super().__init__(time_invariant=time_invariant)
        self.fc, self.dt, self.method = f, dt, method

    def forward(self, x, u, t):
        f, dt = self.fc, self.dt
        if self.method == "euler":
            return torch.add(x, f(x, u), alpha=dt)
        k1 = f(x, u)
        k2 = f(torch.add(x, k1, alpha=0.5 * dt), u)
        k3 = f(torch.add(x, k2, alpha=0.5 * dt), u)
        k4 = f(torch.add(x, k3, alpha=dt), u)
        return torch.add(x, k1 + 2.0 * (k2 + k3) + k4, alpha=dt / 6.0)

    def derivatives(self, x, u, t, *, second_order=False):
        """First order by the chain rule through the RK4 (or Euler) step from the
        Jacobians of ``f`` at its four evaluation points, taken in one vectorized
        call: differentiating ``f`` under torch.func costs per op, and the step has four
        copies of ``f`` plus its own arithmetic (3-4x fewer ops under the transforms;
        ``docs/performance.md``).  Second order: the generic path."""
        if second_order:
            return super().derivatives(x, u, t, second_order=True)
        f, dt = self.fc, self.dt

        def jac(xs, us):
            def fast(a):
                return jacobians(f, a, xs.shape[-1], rowwise=True)

            def slow(a):
                return vmap(jacfwd(f, argnums=(0, 1)))(*a)
            return reverse_or_transforms(self, "_reverse_agrees_f", fast, slow, (xs, us))
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        if self.method == "euler":
            Jx, Ju = _like(jac(x, u), x)
            return DynamicsDerivatives(fx=eye + dt * Jx, fu=dt * Ju)
        k1 = f(x, u)
        x2 = torch.add(x, k1, alpha=0.5 * dt)
        k2 = f(x2, u)
        x3 = torch.add(x, k2, alpha=0.5 * dt)
        k3 = f(x3, u)
        x4 = torch.add(x, k3, alpha=dt)
        N = x.shape[0]
        Jx, Ju = _like(jac(torch.cat([x, x2, x3, x4]), u.repeat(4, 1)), x)
        Jx, Ju = Jx.reshape(4, N, *Jx.shape[1:]), Ju.reshape(4, N, *Ju.shape[1:])
        Dx, Du = [Jx[0]], [Ju[0]]   # dk_i / dx, dk_i / du
        for i, h in ((1, 0.5 * dt), (2, 0.5 * dt), (3, dt)):
            Dx.append(Jx[i] + h * Jx[i] @ Dx[-1])          # J (I + h dk_{i-1}/dx)
            Du.append(Ju[i] + h * Jx[i] @ Du[-1])
        w = dt / 6.0
        return DynamicsDerivatives(fx=eye + w * (Dx[0] + 2.0 * (Dx[1] + Dx[2]) + Dx[3]),
                                   fu=w * (Du[0] + 2.0 * (Du[1] + Du[2]) + Du[3]))


def discretize(f: Callable, dt: float, method: Literal["rk4", "euler"] = "rk4", *,
               time_invariant: bool = True) -> Dynamics:
    r"""Discretize continuous dynamics :math:`\dot x = f(x, u)` with a zero-order hold on u.

    ``"euler"``: :math:`x + dt\, f(x, u)`; ``"rk4"``: the classical 4-stage Runge-Kutta.
    """
    if not callable(f):
        hint = (" for a linear pair (A, B) use trajopt.c2d(A, B, dt), the exact "
                "zero-order-hold discretization" if isinstance(f, (tuple, list)) else "")
        raise InvalidArgumentError(f"f must be a function f(x, u) (no t: time invariant); got "
                                   f"{type(f).__name__}" + (";" + hint if hint else ""))
    if method not in ("rk4", "euler"):
        raise InvalidArgumentError(f"method must be 'rk4' or 'euler'; got {method!r}")
    if not 0 < dt < math.inf:
        raise InvalidArgumentError(f"dt must be positive and finite; got {dt}")
    return _Discretized(f, float(dt), method, time_invariant)


class Cost:
    """Running cost ``running(x, u, t) -> (...)`` and terminal cost ``terminal(x) -> (...)``.

    Parameters
    ----------
    running : callable, optional
        Batched stage cost ``running(x, u, t)``; ``x`` (..., n_t), ``u`` (..., m_t),
        ``t`` the stage (a callable ``running(x, u)`` is time invariant).  None (the
        default): zero (a terminal cost alone), time invariant.
    terminal : callable, optional
        Batched terminal cost of ``x_T`` (..., n_T).  None (the default): zero.
    time_invariant : bool or None
        True when ``running`` ignores ``t`` (vectorized over stages).  None (the default):
        found out as for :class:`Dynamics` (``running``, or a subclass's :meth:`running`
        that does not override :meth:`derivatives`).
    """

    time_invariance_inferred = time_invariance_confirmed = False

    def __init__(self, running: Callable | None = None, terminal: Callable | None = None,
                 *, time_invariant: bool | None = None):
        if running is not None and _takes_two(running):
            two = running
            running, time_invariant = (lambda x, u, t: two(x, u)), True
        self._running, self._terminal = running, terminal
        if running is None and type(self).running is Cost.running and time_invariant is None:
            time_invariant = True   # the zero running cost
        inferred = time_invariant is None
        self.time_invariant = model_ignores_stage(self, running, Cost, "running", (
            "derivatives",)) if inferred else bool(time_invariant)
        #: as :attr:`Dynamics.time_invariance_inferred`
        self.time_invariance_inferred = inferred and self.time_invariant

    def found_time_varying(self) -> None:
        """As :meth:`Dynamics.found_time_varying`."""
        self.time_invariant = self.time_invariance_inferred = False

    def running(self, x: torch.Tensor, u: torch.Tensor, t: int) -> torch.Tensor:
        if self._running is None:
            return x.new_zeros(x.shape[:-1])
        return self._running(x, u, t)

    def terminal(self, x: torch.Tensor) -> torch.Tensor:
        if self._terminal is None:
            return x.new_zeros(x.shape[:-1])
        return self._terminal(x)

    def bind_rows(self, rows: torch.Tensor | None) -> None:
        """Called by the DDP loop before it evaluates the cost or its derivatives on a
        batch whose row i is element ``rows[i]`` of the solve's flat batch (None: row i is
        element i).  The loop works on subsets and replicas of the batch (elements that
        are still active, one copy per line-search step), so a cost holding data per
        batch element (an augmented Lagrangian's multipliers, one reference per element)
        reads its rows here; the default ignores it."""

    def derivatives(self, x: torch.Tensor, u: torch.Tensor, t: int | torch.Tensor
                    ) -> CostDerivatives:
        """Gradient and Hessian of the running cost at (N, n), (N, m) of stage ``t`` (an
        int, or a (N,) integer tensor of stages as in :meth:`Dynamics.derivatives`)."""
        single, args = _per_point(self.running, x, u, t)

        def fast(a):
            if torch.is_tensor(t) or not self.time_invariant:   # under vmap
                return gradient_and_hessian(single, a)
            return gradient_and_hessian(lambda xr, ur: self.running(xr, ur, t), a,
                                        rowwise=True)

        def slow(a):
            ((lxx, _), (lux, luu)), (lx, lu) = vmap(jacfwd(
                _with_gradient(single, (0, 1)), argnums=(0, 1), has_aux=True))(*a)
            top = torch.cat([lxx, lux.transpose(-1, -2)], -1)
            return torch.cat([lx, lu], -1), torch.cat([top, torch.cat([lux, luu], -1)], -2)
        g, H = reverse_or_transforms(self, "_reverse_agrees_running", fast, slow, args)
        n = x.shape[-1]
        lx, lu, lxx, lux, luu = _like((g[:, :n], g[:, n:], H[:, :n, :n], H[:, n:, :n],
                                       H[:, n:, n:]), x)
        return CostDerivatives(lx=lx, lu=lu, lxx=lxx, luu=luu, lux=lux)

    def terminal_derivatives(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient (N, n) and Hessian (N, n, n) of the terminal cost."""
        if self._terminal is None and type(self).terminal is Cost.terminal:
            n = x.shape[-1]
            return x.new_zeros(x.shape), x.new_zeros(*x.shape, n)

        def fast(a):
            return gradient_and_hessian(self.terminal, a, 1, rowwise=True)

        def slow(a):
            return vmap(jacfwd(_with_gradient(self.terminal, 0), has_aux=True))(*a)[::-1]
        g, H = reverse_or_transforms(self, "_reverse_agrees_terminal", fast, slow, (x,), 1)
        return _like((g, H), x)


def _with_gradient(fn: Callable, argnums):
    """``jacrev(fn)`` returning the gradient twice, as output and as auxiliary output: under
    ``jacfwd(..., has_aux=True)`` one call gives the Hessian and the gradient (separate
    ``jacrev`` and ``jacfwd(jacrev)`` calls evaluate the gradient twice)."""
    grad = jacrev(fn, argnums=argnums)

    def both(*args):
        g = grad(*args)
        return g, g
    return both


class QuadraticCost(Cost):
    r"""``1/2 (x-x_ref)'Q(x-x_ref) + 1/2 (u-u_ref)'R(u-u_ref)`` per stage and
    ``1/2 (x-x_goal)'Q_T(x-x_goal)`` at the end, with analytic derivatives.

    A trajectory reference makes the cost time varying; its derivatives are still taken
    for all stages in one call (the stage index selects the rows).  A horizon longer
    than the reference raises :class:`~trajopt.errors.ShapeError` naming it.

    Parameters
    ----------
    Q : (n, n)
    R : (m, m)
    QT : (n, n)
    x_ref : (n,) or (T+1, n), optional
        One reference for every stage, or a trajectory to track: row t at stage t
        (default zero).
    u_ref : (m,) or (T, m), optional
        Likewise for the controls (default zero).
    x_goal : (n,), optional
        Defaults to ``x_ref`` (its last row for a trajectory).
    """

    def __init__(self, Q, R, QT, x_ref=None, u_ref=None, x_goal=None):
        super().__init__(time_invariant=True)
        self.Q, self.R, self.QT = (as_real(v, k) for k, v in zip(("Q", "R", "QT"), (Q, R, QT)))
        n, m = self.Q.shape[-1], self.R.shape[-1]
        self.x_ref = torch.zeros(n, dtype=self.Q.dtype) if x_ref is None else \
            torch.as_tensor(x_ref, dtype=self.Q.dtype)
        self.u_ref = torch.zeros(m, dtype=self.Q.dtype) if u_ref is None else \
            torch.as_tensor(u_ref, dtype=self.Q.dtype)
        last = self.x_ref if self.x_ref.ndim < 2 else self.x_ref[-1]
        self.x_goal = last if x_goal is None else torch.as_tensor(x_goal, dtype=self.Q.dtype)
        for name, M, size in (("Q", self.Q, n), ("R", self.R, m), ("QT", self.QT, n)):
            check_square(M, name, size)
            if M.ndim != 2:
                raise ShapeError(f"{name} must be one ({size}, {size}) matrix; got "
                                 f"{shape_str(M)}")
            check_finite(M, name)
            check_symmetric(M, name)  # the derivatives assume symmetry (lx = Q dx)
        for name, v, size, rows in (("x_ref", self.x_ref, n, "T+1"),
                                    ("u_ref", self.u_ref, m, "T"),
                                    ("x_goal", self.x_goal, n, None)):
            ok = v.shape == (size,) or (rows is not None and v.ndim == 2 and
                                        v.shape[-1] == size and v.shape[0] >= 1)
            if not ok:
                shapes = f"({size},)" + (f" or ({rows}, {size})" if rows else "")
                raise ShapeError(f"{name} must have shape {shapes}; got {shape_str(v)}")
            check_finite(v, name)
        self.time_invariant = self.x_ref.ndim == 1 and self.u_ref.ndim == 1

    @staticmethod
    def _at(ref: torch.Tensor, t, name: str) -> torch.Tensor:
        """The reference at stage ``t`` (an int, or a tensor of stage indices: rows)."""
        if ref.ndim == 1:
            return ref
        last = int(t.max()) if isinstance(t, torch.Tensor) else int(t)
        if last >= ref.shape[0]:
            raise ShapeError(f"{name} has {ref.shape[0]} rows (stages 0..{ref.shape[0] - 1})"
                             f" but the horizon reaches stage {last}")
        if isinstance(t, torch.Tensor):
            return ref.index_select(0, t.reshape(-1).to(ref.device))
        return ref[t]

    def _like(self, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        # ``t`` itself when nothing changes (what ``.to`` returns, without its dispatch:
        # four per stage in every rollout)
        if t.dtype == ref.dtype and t.device == ref.device:
            return t
        return t.to(dtype=ref.dtype, device=ref.device)

    def running(self, x, u, t):
        dx = x - self._like(self._at(self.x_ref, t, "x_ref"), x)
        du = u - self._like(self._at(self.u_ref, t, "u_ref"), u)
        Q, R = self._like(self.Q, x), self._like(self.R, x)
        return 0.5 * ((dx @ Q) * dx).sum(-1) + 0.5 * ((du @ R) * du).sum(-1)

    def terminal(self, x):
        dx = x - self._like(self.x_goal, x)
        return 0.5 * ((dx @ self._like(self.QT, x)) * dx).sum(-1)

    def derivatives(self, x, u, t):
        Q, R = self._like(self.Q, x), self._like(self.R, x)
        N, n, m = x.shape[0], x.shape[-1], u.shape[-1]
        return CostDerivatives(
            lx=(x - self._like(self._at(self.x_ref, t, "x_ref"), x)) @ Q,
            lu=(u - self._like(self._at(self.u_ref, t, "u_ref"), u)) @ R,
            lxx=Q.expand(N, n, n), luu=R.expand(N, m, m), lux=x.new_zeros(N, m, n))

    def terminal_derivatives(self, x):
        QT = self._like(self.QT, x)
        return (x - self._like(self.x_goal, x)) @ QT, QT.expand(x.shape[0], *QT.shape)
