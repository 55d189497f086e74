r"""Plug 2 of the Riccati step: how the per-sample value Hessian :math:`V_{xx}` is held.

The per-sample (operator) step of :mod:`trajopt.riccati.operator` needs three things of a
value Hessian :math:`V'` (batch of ``B`` samples, next-state size ``n1``):

* ``hess_apply(Y, eps)``: :math:`(V' + \epsilon I) Y` on rows Y (B, J, n1);
* ``directions(eps)`` and ``downdate(D, MD, w, project_psd)``: the correction
  :math:`V' - w\, V' M V'` by a policy's response :math:`M` (symmetric, next-state
  space), computed from the responses ``MD`` of a few rows ``D`` only; the factored
  forms need only the Gram matrix :math:`D M D^\top` (``downdate_gram``), which a
  response can give without mapping back to the state (``response_gram``);
* ``pullback(fx_T, g, downdated)``: :math:`f_x^\top (\cdot) f_x` onto this stage.

Three representations implement them:

* :class:`DenseValue`: (B, n, n); correction :math:`V - wVMV` from the rows of V;
* :class:`RankOneValue`: :math:`c\, z z^\top` with c (B,), z (B, n); correction
  :math:`c \leftarrow c - w c^2 z^\top M z`;
* :class:`RankRValue`: :math:`Z C Z^\top` with Z (B, n, r), C (B, r, r); correction
  :math:`C \leftarrow C - w C (Z^\top M Z) C`.

The factored forms are exact: :math:`Z C Z^\top - w Z C Z^\top M Z C Z^\top =
Z (C - w C Z^\top M Z C) Z^\top` and :math:`f_x^\top Z C Z^\top f_x = (f_x^\top Z) C
(f_x^\top Z)^\top`, so they give the matrices the dense recursion gives, at the cost of
r (instead of n) responses per sample.  ``RankRValue`` with ``C = None`` is
:math:`Z Z^\top` (the exact Gauss-Newton Hessian of softmax cross-entropy is
:math:`\mathrm{diag}(p) - p p^\top = Z Z^\top` with
:math:`Z = \mathrm{diag}(\sqrt p) - p \sqrt p^\top`, r = classes, or classes - 1 after a
rotation, :func:`nnbridge.terminal.ggn_factor`); the core C appears at
the first downdate.  With r = 1 it is :class:`RankOneValue` (``C = c``).

A factored value may carry its gradient split as :math:`V_x = K + Z a`
(:class:`Carried`), K a cotangent whose pull-backs the caller already holds (a network's
own back-propagated gradient, recorded by autograd): the step then pulls back only the r
directions, and the new gradient is :math:`f_x^\top K + (f_x^\top Z) b` with
:math:`b = a - C Z^\top r` (``pullback_carried``), the same vector as
:math:`f_x^\top (V_x - V r)`.

A Tikhonov :math:`\epsilon I` enters every product with :math:`V'` (``hess_apply``); the
dense form also propagates it to earlier stages, the factored forms do not (it would
destroy the low rank) -- ``docs/ddpnopt.md`` discusses the choice.  ``project_psd``
replaces the corrected Hessian by its nearest positive semidefinite matrix (its
eigenvalues clamped at 0), in every representation the same matrix: dense directly, rank
r through an orthonormal factor (:math:`Z = QR`, clamp the eigenvalues of
:math:`R C R^\top`), rank one by ``c >= 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._linalg import finite_rows, sym, thin_qr

__all__ = ["Carried", "DenseValue", "RankOneValue", "RankRValue", "Value"]

Pullback = Callable[[torch.Tensor], torch.Tensor]  # f_x' on rows: (B, J, n1) -> (B, J, n)


def _psd(W: torch.Tensor) -> torch.Tensor:
    """Clamp the eigenvalues of sym(W) (..., k, k) at 0.  A non-finite matrix stays
    non-finite (NaN) instead of failing the eigensolver, so a caller's finiteness check
    sees it (an optimizer then skips the step)."""
    W = sym(W)
    finite = finite_rows(W)[..., None, None]
    all_finite = bool(finite.all())
    if not all_finite:
        W = torch.where(finite, W, torch.zeros_like(W))
    try:
        lam, Q = torch.linalg.eigh(W)
        # float32 LAPACK can also return NaN without raising (measured: a 1024 x 1024
        # batch-augmented value with many repeated zero eigenvalues)
        converged = bool(torch.isfinite(lam).all()) and bool(torch.isfinite(Q).all())
    except RuntimeError:  # LinAlgError: no convergence (float32, many repeated zeros)
        converged = False
    if not converged:
        try:
            lam, Q = (v.to(W.dtype) for v in torch.linalg.eigh(W.to(torch.float64)))
        except RuntimeError:  # NaN: the caller's finiteness check sees it
            return torch.full_like(W, math.nan)
    out = (Q * lam.clamp(min=0.0).unsqueeze(-2)) @ Q.transpose(-1, -2)
    return out if all_finite else torch.where(finite, out, torch.full_like(out, math.nan))


@dataclass(frozen=True)
class Carried:
    r"""A factored value's gradient as :math:`V_x = K + Z a` (module docstring).

    Attributes
    ----------
    K : (B, n)
        A cotangent the stages can pull back without a product
        (:meth:`trajopt.riccati.operator.OperatorStage.carried_pullback`).
    a : (B, r)
        Its coordinates in the value's factor Z (B, n, r) (rank one: z, r = 1).
    """

    K: torch.Tensor
    a: torch.Tensor


@dataclass(frozen=True)
class DenseValue:
    """Per-sample value derivatives with a dense Hessian.

    Attributes
    ----------
    Vx : (B, n)
    Vxx : (B, n, n)
    """

    Vx: torch.Tensor
    Vxx: torch.Tensor

    def hess_apply(self, Y: torch.Tensor, tikhonov: float = 0.0) -> torch.Tensor:
        """:math:`(V_{xx} + \\epsilon I) Y` for Y (B, J, n)."""
        out = Y @ self.Vxx.transpose(-1, -2)
        return out + tikhonov * Y if tikhonov else out

    def directions(self, tikhonov: float = 0.0) -> torch.Tensor:
        """The rows of :math:`V_{xx} + \\epsilon I` (B, n, n)."""
        n = self.Vx.shape[-1]
        eye = torch.eye(n, dtype=self.Vx.dtype, device=self.Vx.device)
        return self.hess_apply(eye.expand(self.Vx.shape[0], n, n), tikhonov)

    #: no few directions: the feedback pass applies f_x (:class:`~trajopt.riccati.operator.
    #: OperatorStep`)
    factored = False

    def downdate(self, D: torch.Tensor, MD: torch.Tensor, w: float,
                 project_psd: bool) -> torch.Tensor:
        """:math:`W = V - w V M V` from ``D = V`` and ``MD`` its responses (rows)."""
        W = D - w * (D @ MD.transpose(-1, -2))
        return _psd(W) if project_psd else W

    def pullback(self, fx_T: Pullback, g: torch.Tensor, W: torch.Tensor) -> DenseValue:
        """``DenseValue(f_x' g, f_x' W f_x)`` for g (B, n1), W (B, n1, n1)."""
        Vx = fx_T(g.unsqueeze(1)).squeeze(1)
        FW = fx_T(W)                                    # (B, n1, n): rows of W f_x
        return DenseValue(Vx=Vx, Vxx=sym(fx_T(FW.transpose(-1, -2).contiguous())))


@dataclass(frozen=True)
class RankOneValue:
    """Per-sample value derivatives with a signed rank-one Hessian ``c z z'``.

    Attributes
    ----------
    Vx : (B, n)
    c : (B,)
    z : (B, n)
    """

    Vx: torch.Tensor
    c: torch.Tensor
    z: torch.Tensor
    #: ``Vx = K + a z`` (:class:`Carried`), or None
    carried: Carried | None = None

    @property
    def Vxx(self) -> torch.Tensor:
        """The dense (B, n, n) Hessian (tests and small models only)."""
        return self.c[:, None, None] * self.z.unsqueeze(-1) * self.z.unsqueeze(-2)

    def hess_apply(self, Y: torch.Tensor, tikhonov: float = 0.0) -> torch.Tensor:
        """:math:`(c z z^\\top + \\epsilon I) Y` for Y (B, J, n), without forming z z'."""
        zY = (Y * self.z.unsqueeze(1)).sum(-1, keepdim=True)
        out = (self.c[:, None, None] * zY) * self.z.unsqueeze(1)
        return out + tikhonov * Y if tikhonov else out

    def directions(self, tikhonov: float = 0.0) -> torch.Tensor:
        """The factor as one row, (B, 1, n)."""
        return self.z.unsqueeze(1)

    def hess_from_coords(self, a: torch.Tensor) -> torch.Tensor:
        """:math:`V Y` from the coordinates ``a = z' Y`` (B, J, 1) of rows Y: (B, J, n)."""
        return (self.c.reshape(-1, 1, 1) * a) * self.z.unsqueeze(1)

    #: the feedback pass reads Z' f_x dX off the pulled-back factor
    #: (:class:`~trajopt.riccati.operator.OperatorStep`)
    factored = True

    @staticmethod
    def factor_map(core) -> None:
        """None: the pulled-back factor is :math:`f_x^\\top z` itself (the downdate
        leaves z as it is)."""
        return None

    def downdate(self, D: torch.Tensor, MD: torch.Tensor, w: float,
                 project_psd: bool) -> torch.Tensor:
        """The new coefficient :math:`c (1 - w c\\, z^\\top M z)` (B,)."""
        return self.downdate_gram((D[:, 0] * MD[:, 0]).sum(-1)[:, None, None], w,
                                  project_psd)

    def downdate_gram(self, G: torch.Tensor, w: float, project_psd: bool) -> torch.Tensor:
        """:meth:`downdate` from :math:`z^\\top M z` (B, 1, 1) alone."""
        c = self.c * (1.0 - self.c * (w * G.reshape(-1)))
        return c.clamp(min=0.0) if project_psd else c

    def pullback(self, fx_T: Pullback, g: torch.Tensor, c: torch.Tensor) -> RankOneValue:
        """``RankOneValue(f_x' g, c, f_x' z)``: one operator call for both rows."""
        FY = fx_T(torch.stack([g, self.z], 1))
        return RankOneValue(Vx=FY[:, 0], c=c, z=FY[:, 1])

    def pullback_carried(self, fx_T: Pullback, r: torch.Tensor, c: torch.Tensor,
                         K: torch.Tensor) -> RankOneValue:
        r""":meth:`pullback` of :math:`g = V_x - c z z^\top r` (B, n1) when
        :attr:`carried` holds :math:`V_x = K_1 + a z` and ``K`` is :math:`f_x^\top K_1`:
        :math:`g = K_1 + b z` with :math:`b = a - c\, z^\top r`, so only z is pulled
        back."""
        b = self.carried.a[:, 0] - self.c * (self.z * r).sum(-1)
        z = fx_T(self.z.unsqueeze(1))[:, 0]
        return RankOneValue(Vx=K + b[:, None] * z, c=c, z=z,
                            carried=Carried(K=K, a=b[:, None]))


@dataclass(frozen=True)
class RankRValue:
    """Per-sample value derivatives with a rank-r Hessian ``Z C Z'``.

    Attributes
    ----------
    Vx : (B, n)
    Z : (B, n, r)
    C : (B, r, r) symmetric, or None for the identity (``Vxx = Z Z'``)
    """

    Vx: torch.Tensor
    Z: torch.Tensor
    C: torch.Tensor | None = None
    #: ``Vx = K + Z a`` (:class:`Carried`), or None
    carried: Carried | None = None

    @property
    def Vxx(self) -> torch.Tensor:
        """The dense (B, n, n) Hessian (tests and small models only)."""
        ZC = self.Z if self.C is None else self.Z @ self.C
        return ZC @ self.Z.transpose(-1, -2)

    def hess_apply(self, Y: torch.Tensor, tikhonov: float = 0.0) -> torch.Tensor:
        """:math:`(Z C Z^\\top + \\epsilon I) Y` for Y (B, J, n): two thin products."""
        out = self.hess_from_coords(Y @ self.Z)        # (B, J, r) coordinates
        return out + tikhonov * Y if tikhonov else out

    def hess_from_coords(self, a: torch.Tensor) -> torch.Tensor:
        """:math:`V Y` from the coordinates ``a = Y Z`` (B, J, r) of rows Y: (B, J, n)."""
        if self.C is not None:
            a = a @ self.C
        return a @ self.Z.transpose(-1, -2)

    factored = True

    @staticmethod
    def factor_map(core) -> torch.Tensor | None:
        """R (B, r, r) where the downdate replaced Z by :math:`Q = Z R^{-1}` (so
        :math:`f_x^\\top Z = (f_x^\\top Q) R`, Q's pull-back being the new factor), else
        None; ``core`` from :meth:`downdate`."""
        return core[2]

    def directions(self, tikhonov: float = 0.0) -> torch.Tensor:
        """The factor's columns as rows, (B, r, n)."""
        return self.Z.transpose(-1, -2)

    def downdate(self, D: torch.Tensor, MD: torch.Tensor, w: float,
                 project_psd: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The factor and core of :math:`Z (C - w C (Z^\\top M Z) C) Z^\\top`:
        ``(Z, C_new, None)``; with ``project_psd`` its nearest positive semidefinite matrix
        (the dense projection, eigenvalues clamped at 0) as ``(Q, P(R C_new R'), R)``,
        ``Z = QR`` (Q orthonormal, so clamping the core's eigenvalues clamps the
        matrix's; clamping ``C_new`` itself would give another, larger PSD matrix
        whenever Z is not orthonormal; the QR by :func:`trajopt._linalg.thin_qr`'s rule)."""
        return self.downdate_gram(D @ MD.transpose(-1, -2), w, project_psd)

    def downdate_gram(self, G: torch.Tensor, w: float, project_psd: bool) -> tuple:
        """:meth:`downdate` from :math:`Z^\\top M Z` (B, r, r) alone."""
        G = sym(G)
        if self.C is None:
            C = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device) - w * G
        else:
            C = sym(self.C - w * (self.C @ G @ self.C))
        if not project_psd:
            return self.Z, C, None
        Q, R = thin_qr(self.Z)
        return Q, _psd(R @ C @ R.transpose(-1, -2)), R

    def pullback(self, fx_T: Pullback, g: torch.Tensor,
                 core: tuple) -> RankRValue:
        """``RankRValue(f_x' g, f_x' Z, C)`` for ``core = (Z, C, R)`` from :meth:`downdate`:
        one operator call for the r + 1 rows."""
        Z, C = core[:2]
        FY = fx_T(torch.cat([g.unsqueeze(1), Z.transpose(-1, -2)], 1))
        return RankRValue(Vx=FY[:, 0], Z=FY[:, 1:].transpose(-1, -2), C=C)

    def pullback_carried(self, fx_T: Pullback, r: torch.Tensor, core: tuple,
                         K: torch.Tensor) -> RankRValue:
        r""":meth:`pullback` of :math:`g = V_x - Z C Z^\top r` (B, n1) when :attr:`carried`
        holds :math:`V_x = K_1 + Z a` and ``K`` is :math:`f_x^\top K_1`: :math:`g = K_1 + Z
        b` with :math:`b = a - C Z^\top r`; only the r directions are pulled back, and
        :math:`f_x^\top Z b = Z_{new} R b` (R the downdate's factor map, or I)."""
        coords = (r.unsqueeze(1) @ self.Z).squeeze(1)                   # (B, r)
        if self.C is not None:
            coords = (coords.unsqueeze(1) @ self.C).squeeze(1)
        b = self.carried.a - coords
        Q, C, R = core
        Z = fx_T(Q.transpose(-1, -2)).transpose(-1, -2)                 # (B, n, r)
        if R is not None:
            b = (R @ b.unsqueeze(-1)).squeeze(-1)
        Vx = K + (Z @ b.unsqueeze(-1)).squeeze(-1)
        return RankRValue(Vx=Vx, Z=Z, C=C, carried=Carried(K=K, a=b))


Value = DenseValue | RankOneValue | RankRValue
