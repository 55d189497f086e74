r"""Plug 2 of the Riccati step: how the per-sample value Hessian :math:`V_{xx}` is held.

The per-sample (operator) step of :mod:`trajopt.riccati.operator` needs three things of a
value Hessian :math:`V'` (batch of ``B`` samples, next-state size ``n1``):

* ``hess_apply(Y, eps)``: :math:`(V' + \epsilon I) Y` on rows Y (B, J, n1);
* the correction :math:`V' - w\, V' M V'` by a policy's response :math:`M` (symmetric,
  next-state space), computed from the responses of a few rows only, ``directions(eps)``
  (the rows of V; the factor's columns): the dense form's ``downdate(D, MD, w,
  project_psd)``; the factored forms' ``downdate_gram(G, w, project_psd, R)``, which
  needs only the Gram matrix :math:`G = Z^\top M Z`, which a response can give without
  mapping back to the state (``response_gram``), and ``basis(project_psd)``, the rows
  the factor is pulled back in (its columns, or an orthonormal basis Q of them, ``Z =
  QR``, under the PSD projection);
* the pull-back :math:`f_x^\top (\cdot) f_x` onto this stage: the dense form's
  ``pullback(fx_T, g, downdated)``; the factored forms' ``pulled(FD, core, R, Vx=)``
  from the pulled-back basis rows :math:`f_x^\top D^\top` and gradient, which the step
  pulls back itself, so that a stage can pull the basis rows back once for the Gram
  matrix and the factor (:meth:`~trajopt.riccati.operator.OperatorStage.reusing`).

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
:math:`b = a - C Z^\top r` (``pulled(..., carried=(K, r))``), the same vector as
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

    def coords_quadratic(self, a: torch.Tensor) -> torch.Tensor:
        """:math:`Y V Y^\\top = c\\, a^2` per row from the coordinates ``a = z' Y`` (B, J, 1):
        (B, J)."""
        return self.c.reshape(-1, 1) * a[..., 0] ** 2

    #: the feedback pass reads Z' f_x dX off the pulled-back factor
    #: (:class:`~trajopt.riccati.operator.OperatorStep`)
    factored = True

    def basis(self, project_psd: bool) -> tuple[torch.Tensor, None]:
        """The rows the step pulls the factor back in: z as one row (B, 1, n), and no
        change of coordinates (None)."""
        return self.z.unsqueeze(1), None

    def downdate_gram(self, G: torch.Tensor, w: float, project_psd: bool,
                      R: None = None) -> torch.Tensor:
        """The new coefficient :math:`c (1 - w c\\, z^\\top M z)` (B,) from
        :math:`z^\\top M z` (B, 1, 1); clamped at 0 with ``project_psd``."""
        c = self.c * (1.0 - self.c * (w * G.reshape(-1)))
        return c.clamp(min=0.0) if project_psd else c

    def pulled(self, Fz: torch.Tensor, c: torch.Tensor, R: None = None, *,
               Vx: torch.Tensor | None = None,
               carried: tuple[torch.Tensor, torch.Tensor] | None = None) -> RankOneValue:
        r"""The value at the stage before from the pulled-back row ``Fz`` =
        :math:`f_x^\top z` (B, 1, n), the new coefficient ``c`` and either the pulled-back
        gradient ``Vx`` = :math:`f_x^\top g` (B, n) or ``carried = (K, r)``: where
        :attr:`carried` holds :math:`V_x = K_1 + a z` and K is :math:`f_x^\top K_1`,
        :math:`g = V_x - c z z^\top r = K_1 + b z` with :math:`b = a - c\, z^\top r`."""
        z = Fz[:, 0]
        if carried is None:
            return RankOneValue(Vx=Vx, c=c, z=z)
        K, r = carried
        b = self.carried.a[:, 0] - self.c * (self.z * r).sum(-1)
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

    def coords_quadratic(self, a: torch.Tensor) -> torch.Tensor:
        """:math:`Y V Y^\\top = a C a^\\top` per row from the coordinates ``a = Y Z``
        (B, J, r): (B, J)."""
        return ((a if self.C is None else a @ self.C) * a).sum(-1)

    factored = True

    def directions(self, tikhonov: float = 0.0) -> torch.Tensor:
        """The factor's columns as rows, (B, r, n)."""
        return self.Z.transpose(-1, -2)

    def basis(self, project_psd: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows ``D`` (B, r, n) the step pulls the factor back in, and R: the
        factor's columns :math:`Z^\\top` (R None), or with ``project_psd`` those of Q,
        :math:`Z = QR` (Q orthonormal, so that clamping the core's eigenvalues clamps the
        matrix's; the QR by :func:`trajopt._linalg.thin_qr`'s rule), and R (B, r, r)."""
        if not project_psd:
            return self.Z.transpose(-1, -2), None
        Q, R = thin_qr(self.Z)
        return Q.transpose(-1, -2), R

    def downdate_gram(self, G: torch.Tensor, w: float, project_psd: bool,
                      R: torch.Tensor | None = None) -> torch.Tensor:
        """The core :math:`C - w C (Z^\\top M Z) C` from the Gram matrix ``G`` :math:`=
        Z^\\top M Z` (B, r, r) of the factor's columns; with ``project_psd`` (R from
        :meth:`basis`, :math:`Z = QR`) the core of its nearest positive semidefinite
        matrix in Q's coordinates, :math:`P(R\\, C_{new} R^\\top)` (eigenvalues clamped
        at 0: Q orthonormal, so this is the dense projection; clamping :math:`C_{new}`
        itself would give another, larger PSD matrix whenever Z is not orthonormal)."""
        G = sym(G)
        if self.C is None:
            C = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device) - w * G
        else:
            C = sym(self.C - w * (self.C @ G @ self.C))
        if not project_psd:
            return C
        return _psd(R @ C @ R.transpose(-1, -2))

    def pulled(self, FD: torch.Tensor, C: torch.Tensor, R: torch.Tensor | None = None, *,
               Vx: torch.Tensor | None = None,
               carried: tuple[torch.Tensor, torch.Tensor] | None = None) -> RankRValue:
        r"""The value at the stage before from the pulled-back basis rows ``FD`` =
        :math:`f_x^\top D^\top` (B, r, n) -- its new factor --, the new core ``C``
        (:meth:`downdate_gram`; R from :meth:`basis`) and either the pulled-back
        gradient ``Vx`` = :math:`f_x^\top g` (B, n) or ``carried = (K, r)``: where
        :attr:`carried` holds :math:`V_x = K_1 + Z a` and K is :math:`f_x^\top K_1`,
        :math:`g = V_x - Z C Z^\top r = K_1 + Z b` with :math:`b = a - C Z^\top r`, and
        :math:`f_x^\top Z b = (f_x^\top Q) R b`."""
        Z = FD.transpose(-1, -2)                                        # (B, n, r)
        if carried is None:
            return RankRValue(Vx=Vx, Z=Z, C=C)
        K, r = carried
        coords = (r.unsqueeze(1) @ self.Z).squeeze(1)                   # (B, r)
        if self.C is not None:
            coords = (coords.unsqueeze(1) @ self.C).squeeze(1)
        b = self.carried.a - coords
        if R is not None:
            b = (R @ b.unsqueeze(-1)).squeeze(-1)
        Vx = K + (Z @ b.unsqueeze(-1)).squeeze(-1)
        return RankRValue(Vx=Vx, Z=Z, C=C, carried=Carried(K=K, a=b))


Value = DenseValue | RankOneValue | RankRValue
