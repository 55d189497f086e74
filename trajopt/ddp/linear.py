r"""Linear (affine) dynamics with analytic derivatives and a scanned rollout.

.. math::  x_{t+1} = A_t x_t + B_t u_t + c_t

The model an LQ problem or a linear MPC is written with (crocoddyl's ``ActionModelLQR``,
mpc.pytorch's ``LinDx``, python-control's ``StateSpace`` after :func:`trajopt.c2d`): its
Jacobians are ``A_t`` and ``B_t`` themselves (no torch.func call), it has no second-order
terms, and the DDP loop rolls it out by the parallel scan of
:mod:`trajopt.lqr.affine_scan` where the controls are an affine law of the state (no
control limits; see :meth:`trajopt.ddp.chain.Chain.simulate`).
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import as_real, check_finite, shape_str
from ..errors import ShapeError
from .models import Dynamics, DynamicsDerivatives

__all__ = ["LinearDynamics"]


class LinearDynamics(Dynamics):
    r"""Dynamics :math:`x_{t+1} = A_t x_t + B_t u_t + c_t`, one model for the whole batch.

    Parameters
    ----------
    A : (n, n) or (T, n, n)
        One matrix for every stage, or one per stage (stage t reads row t; a horizon
        longer than the rows raises :class:`~trajopt.errors.ShapeError` naming ``A``).
    B : (n, m) or (T, n, m)
    c : (n,) or (T, n), optional
        Affine offset (default none).

    The derivatives are ``f_x = A_t``, ``f_u = B_t`` and no second-order terms, exactly.
    Arrays are kept in their dtype and cast to the state's dtype and device when used.
    """

    def __init__(self, A: Any, B: Any, c: Any = None):
        self.A, self.B = as_real(A, "A"), as_real(B, "B")
        self.c = None if c is None else as_real(c, "c")
        if self.A.ndim not in (2, 3) or self.A.shape[-1] != self.A.shape[-2]:
            raise ShapeError(f"A must be (n, n) or (T, n, n); got {shape_str(self.A)}")
        n = self.A.shape[-1]
        if self.B.ndim not in (2, 3) or self.B.shape[-2] != n:
            raise ShapeError(f"B must be ({n}, m) or (T, {n}, m) for A of shape "
                             f"{shape_str(self.A)}; got {shape_str(self.B)}")
        if self.c is not None and (self.c.ndim not in (1, 2) or self.c.shape[-1] != n):
            raise ShapeError(f"c must be ({n},) or (T, {n}); got {shape_str(self.c)}")
        for name, v in (("A", self.A), ("B", self.B), ("c", self.c)):
            if v is not None:
                check_finite(v, name)
        varying = self.A.ndim == 3 or self.B.ndim == 3 or (self.c is not None
                                                           and self.c.ndim == 2)
        super().__init__(time_invariant=not varying)

    @property
    def n(self) -> int:
        return self.A.shape[-1]

    @property
    def m(self) -> int:
        return self.B.shape[-1]

    def _rows(self, v: torch.Tensor, t: int | torch.Tensor, name: str, rank: int,
              like: torch.Tensor) -> torch.Tensor:
        """Stage ``t`` of ``v`` (an int, or a tensor of stages: one row each) in the dtype
        and device of ``like``."""
        if v.ndim > rank:
            if torch.is_tensor(t):  # out of range: index_select raises (also under vmap)
                v = v.index_select(0, t.reshape(-1).to(v.device))
                v = v[0] if t.ndim == 0 else v
            elif t >= v.shape[0]:
                raise ShapeError(f"{name} has {v.shape[0]} stages (0..{v.shape[0] - 1}) but "
                                 f"the horizon reaches stage {t}")
            else:
                v = v[t]
        return _cast(v, like)

    def forward(self, x: torch.Tensor, u: torch.Tensor, t: int | torch.Tensor
                ) -> torch.Tensor:
        A, B = self._rows(self.A, t, "A", 2, x), self._rows(self.B, t, "B", 2, x)
        out = _apply(A, x) + _apply(B, u)
        return out if self.c is None else out + self._rows(self.c, t, "c", 1, x)

    def derivatives(self, x: torch.Tensor, u: torch.Tensor, t: int | torch.Tensor, *,
                    second_order: bool = False) -> DynamicsDerivatives:
        """``f_x = A_t`` (N, n, n) and ``f_u = B_t`` (N, n, m) at the N points (second
        order: none, the dynamics are linear)."""
        N, n, m = x.shape[0], self.n, u.shape[-1]
        A, B = self._rows(self.A, t, "A", 2, x), self._rows(self.B, t, "B", 2, x)
        return DynamicsDerivatives(fx=A.expand(N, n, n), fu=B.expand(N, n, m))

    def maps(self, T: int, like: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``A`` (T or 1, n, n), ``B`` (T or 1, n, m) and ``c`` (T or 1, n) or None for
        stages ``0 .. T-1``, in the dtype and device of ``like`` (what the scanned rollout
        reads)."""
        def rows(v, name, rank):
            if v is None:
                return None
            if v.ndim == rank:
                return self._rows(v, 0, name, rank, like).unsqueeze(0)
            self._rows(v, T - 1, name, rank, like)  # names v when the horizon is longer
            return _cast(v[:T], like)
        return rows(self.A, "A", 2), rows(self.B, "B", 2), rows(self.c, "c", 1)


def _apply(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``M v`` for a batch ``v`` (..., k): one matrix (r, k) for all, or one per point
    (N, r, k) with ``v`` (N, k)."""
    if M.ndim == 3 and v.ndim == 2:
        return (M @ v.unsqueeze(-1)).squeeze(-1)
    return v @ M.transpose(-1, -2)


def _cast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` in the dtype and device of ``like`` (itself when they match: no dispatch)."""
    if v.dtype != like.dtype or v.device != like.device:
        return v.to(dtype=like.dtype, device=like.device)
    return v
