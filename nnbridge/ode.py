r"""Neural-ODE blocks with fixed-step integration: dynamics whose steps share one control.

:class:`ODEBlock` maps :math:`x(t_0)` to :math:`x(t_1)` for
:math:`\dot x = f(t, x; \theta)`, integrated with ``steps`` fixed steps of an explicit
Runge-Kutta method and unrolled in ``forward`` (so torch.fx traces it and every step is
part of the network's graph).  ``func(t, x)`` takes the time as a 0-dim tensor on
``x``'s device and dtype, as ``torchdiffeq.odeint`` calls it.

As dynamics for :class:`nnbridge.GTDDP`, every call of ``func``'s layers is a stage of
the unrolled OCP and all of them share the block's parameters :math:`\theta`: the stage
graph (:func:`nnbridge.graph.graph_stages`) joins the calls of a layer into one stage whose
players are ``func``'s layers (``docs/ode.md`` derives why this is DDP on the unrolled
problem with :math:`\theta` decided where the block starts).

Methods (Butcher tableaux; ``"rk4"`` is the classic one, ``"rk38"`` the 3/8 rule that
``torchdiffeq``'s ``"rk4"`` uses):

========== ===== =================================================================
method     order stages
========== ===== =================================================================
euler      1     :math:`x + h k_1`
midpoint   2     :math:`x + h k_2`, :math:`k_2 = f(t + h/2, x + h k_1 / 2)`
rk4        4     classic Runge-Kutta
rk38       4     Kutta's 3/8 rule
========== ===== =================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from trajopt.errors import InvalidArgumentError

__all__ = ["ODEBlock", "METHODS"]

#: Butcher tableaux (a, b, c) of the explicit methods
METHODS: dict[str, tuple] = {
    "euler": ((), (1.0,), (0.0,)),
    "midpoint": (((0.5,),), (0.0, 1.0), (0.0, 0.5)),
    "rk4": (((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6),
            (0.0, 0.5, 0.5, 1.0)),
    "rk38": (((1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)), (1 / 8, 3 / 8, 3 / 8, 1 / 8),
             (0.0, 1 / 3, 2 / 3, 1.0)),
}


class ODEBlock(nn.Module):
    r""":math:`x(t_1)` of :math:`\dot x = f(t, x)`, :math:`x(t_0) = x`, by ``steps`` fixed
    steps of ``method`` (module docstring).

    Parameters
    ----------
    func : nn.Module
        :math:`f(t, x)`: ``t`` a 0-dim tensor, ``x`` (B, ...) -> (B, ...) of x's shape.
    t0, t1 : float
        The integration interval (``t1 < t0`` integrates backward).
    steps : int
        Number of fixed steps, :math:`h = (t_1 - t_0) / \text{steps}`.
    method : {"rk4", "rk38", "midpoint", "euler"}

    Raises
    ------
    InvalidArgumentError
        Naming the argument: a ``func`` that is not callable, non-finite or equal
        ``t0``/``t1``, ``steps`` not a positive integer, an unknown ``method``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> class F(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = nn.Linear(2, 2)
    ...     def forward(self, t, x):
    ...         return torch.tanh(self.lin(x))
    >>> block = ODEBlock(F(), steps=4)
    >>> block(torch.zeros(3, 2)).shape
    torch.Size([3, 2])
    """

    def __init__(self, func: nn.Module | Callable, t0: float = 0.0, t1: float = 1.0,
                 steps: int = 4, method: str = "rk4"):
        super().__init__()
        if not callable(func):
            raise InvalidArgumentError(f"func must be callable f(t, x); got "
                                       f"{type(func).__name__}")
        for name, v in (("t0", t0), ("t1", t1)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidArgumentError(f"{name} must be a finite number; got {v!r}")
        if t0 == t1:
            raise InvalidArgumentError(f"t1 must differ from t0; both are {t0!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidArgumentError(f"steps must be a positive integer; got {steps!r}")
        if method not in METHODS:
            raise InvalidArgumentError(f"method must be one of {sorted(METHODS)}; got "
                                       f"{method!r}")
        self.func = func
        self.t0, self.t1, self.steps, self.method = float(t0), float(t1), steps, method

    def extra_repr(self) -> str:
        return (f"t0={self.t0}, t1={self.t1}, steps={self.steps}, "
                f"method={self.method!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = METHODS[self.method]
        h = (self.t1 - self.t0) / self.steps
        for n in range(self.steps):
            t = self.t0 + n * h
            ks = []
            for i in range(len(b)):
                xi = x
                for aij, kj in zip(a[i - 1] if i else (), ks):
                    if aij:
                        xi = xi + (h * aij) * kj
                ks.append(self.func(x.new_full((), t + c[i] * h), xi))
            step = None
            for bi, ki in zip(b, ks):
                if bi:
                    step = bi * ki if step is None else step + bi * ki
            x = x + h * step
        return x
