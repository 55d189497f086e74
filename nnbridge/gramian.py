r"""The controllability Gramian of the steepest-descent LQR in output space, and the
damped natural-gradient solve with it (thesis papers/002, Ch. 3; ``docs/steepest.md``).

With no stage cost, :math:`R_i = r I` and the state perturbation starting at 0, the
terminal perturbation of the network's LQR is :math:`X_N = J u` (J: the Jacobian of the
batch's outputs in all controls) and its Gramian is :math:`S = J J^\top = \sum_i J_i
J_i^\top`, of size :math:`D = B n_N`.  Stage i's rows are :math:`w_{bj} \tilde
x_b^\top` (per sample b and output j, :math:`w_{bj}` the cotangent factor at the
pre-activation, :math:`\tilde x_b` the unfolded input with the bias row), so

* :math:`J_i^\top v` is one control gradient, of the per-sample cotangent
  :math:`\sum_j v_{bj} w_{bj}`;
* :math:`J_i G` is the output change of a control change G: :math:`w_{bj}^\top (G
  \tilde x_b)`.

:class:`OutputGramian` forms S (:meth:`~OutputGramian.dense`) or applies it
(:meth:`~OutputGramian.apply`, :math:`O(B \sum_i (n_N + \mathrm{in}_i)\,
\mathrm{out}_i P_i)` a product); :func:`damped_fisher_direction` solves
:math:`(\delta I + Q_N S) v = a` by a Cholesky factorization of the formed system or by
conjugate gradients on the applied one, by the rule of :data:`SOLVES`.
"""

from __future__ import annotations

import math

import torch

from trajopt.errors import InvalidArgumentError, NumericalError
from trajopt.krylov import conjugate_gradient

from .stages import outer_sum

__all__ = ["SOLVES", "CG_MIN_SIZE", "OP_COST", "OP_COST_CUDA", "OutputGramian",
           "damped_fisher_direction", "fisher_factor", "stage_jacobian"]

#: how the damped output-space system is solved: "auto" (the rule below), "direct"
#: (Cholesky of the formed system), "cg" (conjugate gradients on the applied one)
SOLVES = ("auto", "direct", "cg")
#: "auto" tries CG from this system size D = B n_N up (B >= 205 with 10 classes); below
#: it the direct solve's cost buys fewer CG iterations than a damping of 1e-3 needs
#: (~100 on the digits MLP; docs/steepest.md)
CG_MIN_SIZE = 2048
#: the fixed cost of one torch operation in multiply-adds at the direct solve's rate:
#: ~10 us at ~10 GFLOP/s on the CPU
OP_COST = 1e5
#: the same on a CUDA device, fitted (with CG_RATE) on an H200, where the direct solve took
#: 9.3 / 30 / 125 / 719 ms at D = 2,560 / 10,240 / 20,480 / 40,960 and a CG iteration
#: 1.0-1.4 ms whatever D (~30 us a launch, ~34 launches): the budget at D = 40,960 is then
#: the ~700 iterations the direct solve's time buys.  "auto" keeps the direct solve up to
#: B ~ 1,100 on the digits MLP, tries CG from there (abandoned after CG_PATIENCE
#: iterations where ~95 are needed and the budget is smaller, up to B ~ 2,000) and keeps
#: it above (docs/steepest.md)
OP_COST_CUDA = 3e8
#: CG's multiply-adds run at a third of the direct solve's rate or less (small products
#: against one large Cholesky factorization: 2.9x at D = 1,280, 6.3x at D = 10,240 on the
#: digits MLP, docs/steepest.md), so "auto" gives CG the direct solve's count divided by
#: this
CG_RATE = 3.0
#: "auto" abandons CG once this many iterations show that its budget will not do
CG_PATIENCE = 16
#: CG stops at a relative residual of this many eps of the dtype: the direction is then
#: within 1.4-12x of the direct solve's error (against an explicitly formed, refined
#: Fisher solve: 2.3e-14 against 2.0e-14 at cond 282, 1.0e-12 against 1.3e-12 at cond
#: 2.8e4; 10 sqrt(D) eps left 50x and 30x the direct solve's error, for ~15 % fewer
#: iterations)
CG_TOL = 10.0


def check_solve(solve: str) -> None:
    if solve not in SOLVES:
        raise InvalidArgumentError(f"solve must be one of {', '.join(SOLVES)}; got "
                                   f"{solve!r}")


def stage_jacobian(w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    r"""The rows :math:`w_{bj} \tilde x_b^\top` of one stage's output Jacobian, (B n_N,
    out in'), from the factors w (B, n_N, out, P) and the unfolded input X (B, in', P)."""
    B, n = w.shape[:2]
    return torch.einsum("bjop,bip->bjoi", w, X).reshape(B * n, -1)


def fisher_factor(p: torch.Tensor, B: int) -> torch.Tensor:
    r"""Z (B, n, n) with :math:`Z_b Z_b^\top = (\mathrm{diag}(p_b) - p_b p_b^\top)/B`, the
    blocks of the softmax Fisher :math:`Q_N`: :math:`Z_b = (\mathrm{diag}(\sqrt{p_b}) -
    p_b \sqrt{p_b}^\top)/\sqrt B` (as :math:`\sum_j p_{bj} = 1`)."""
    r = p.sqrt()
    return (torch.diag_embed(r) - p.unsqueeze(-1) * r.unsqueeze(-2)) / math.sqrt(B)


class OutputGramian:
    r""":math:`S = \sum_i J_i J_i^\top` (D, D), D = B n_N, of the stages' cotangent
    factors ``factors[i]`` (B, n_N, out_i, P_i) and unfolded inputs ``inputs[i]`` (B,
    in'_i, P_i)."""

    def __init__(self, factors: list[torch.Tensor], inputs: list[torch.Tensor]):
        self.factors, self.inputs = factors, inputs
        self.B, self.n = factors[0].shape[:2]

    @property
    def size(self) -> int:
        return self.B * self.n

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`S v` for v (D,), without forming S: per stage one control gradient
        :math:`G = J_i^\\top v` and the output change :math:`J_i G`."""
        V = v.view(self.B, 1, self.n)
        out = None
        for w, X in zip(self.factors, self.inputs):
            if X.shape[-1] == 1:      # Linear: (B, n, out) factors, (B, in') inputs
                wf, Xf = w[..., 0], X[..., 0]
                if wf.device.type == "cpu":
                    # per-sample vector-matrix products as broadcast products and sums:
                    # a batched matmul with a vector operand runs a small BLAS call a
                    # sample on the CPU (B = 1,024, n = 10, out = 32: 861 against 217 us);
                    # on a GPU the batched matmul is the faster (one launch, not two:
                    # CG 0-25 % faster on an H200)
                    G = (V.transpose(1, 2) * wf).sum(1).T @ Xf          # (out, in')
                    Jg = (wf * (Xf @ G.T).unsqueeze(1)).sum(-1)         # (B, n)
                else:
                    G = (V @ wf).squeeze(1).T @ Xf
                    Jg = (wf @ (Xf @ G.T).unsqueeze(-1)).squeeze(-1)
            else:
                G = outer_sum((V @ w.flatten(2)).view(w.shape[0], *w.shape[2:]), X)
                Jg = torch.einsum("bjop,bop->bj", w, G @ X)
            out = Jg if out is None else out.add_(Jg)
        return out.reshape(-1)

    def dense(self) -> torch.Tensor:
        r"""S formed (D, D).  A Linear stage (one position): the elementwise product of
        the factors' Gram matrix and the inputs' (B, B), broadcast over the outputs,
        :math:`O(D^2 \mathrm{out} + B^2 \mathrm{in}')` instead of the
        :math:`O(D^2\, \mathrm{out}\, \mathrm{in}')` of the explicit rows; a convolution
        (positions couple): from the explicit rows."""
        S = None
        for w, X in zip(self.factors, self.inputs):
            if X.shape[-1] == 1:
                Wf = w[..., 0].reshape(self.size, -1)
                Xf = X[..., 0]
                Si = Wf @ Wf.T
                Si.view(self.B, self.n, self.B, self.n).mul_(
                    (Xf @ Xf.T)[:, None, :, None])
            else:
                J = stage_jacobian(w, X)
                Si = J @ J.T
            S = Si if S is None else S.add_(Si)
        return S

    def flops(self) -> tuple[float, float]:
        """Multiply-add counts ``(direct solve, one CG iteration)``: forming S and the
        (D, D) system and factoring it, against one :meth:`apply` and the iteration's
        vector work, each of its ~4 operations a stage and ~10 more counted as
        :data:`OP_COST` (their fixed cost: at this size an iteration is bound by it;
        :data:`OP_COST_CUDA` on a CUDA device)."""
        D = float(self.size)
        form = D ** 3 / 3 + D * D * self.n
        op = OP_COST_CUDA if self.factors[0].device.type == "cuda" else OP_COST
        prod = (4 * len(self.factors) + 10) * op
        for w, X in zip(self.factors, self.inputs):
            out, P, inp = w.shape[2], w.shape[3], X.shape[1]
            form += D * D * out if P == 1 else D * out * inp * (D + P)
            prod += 2.0 * self.B * out * P * (self.n + inp)
        return form, prod


def damped_fisher_direction(gramian: OutputGramian, Z: torch.Tensor, a: torch.Tensor,
                            damping: float, solve: str = "auto") -> torch.Tensor:
    r""":math:`v = (\delta I + Q_N S)^{-1} a`, :math:`Q_N = Z Z^\top` block diagonal
    (Z (B, n, n)), through the symmetric positive definite system

    .. math::  (\delta I + Z^\top S Z)\, c = Z^\top S a, \qquad v = (a - Z c)/\delta

    (the identity :math:`(\delta I + Z Z^\top S)(a - Z c) = \delta a` when c solves it).

    ``solve``:

    * ``"direct"``: S formed, one Cholesky factorization (half an LU's work); where
      rounding leaves the system not positive definite (a tiny damping), the
      unsymmetric :math:`(\delta I + Q_N S)` by LU.  Time :math:`O(D^3)`, memory
      :math:`O(D^2)`.
    * ``"cg"``: conjugate gradients on the applied system to a relative residual of
      :data:`CG_TOL` eps, at most 3D + 20 products (D in exact arithmetic; rounding
      costs more on small systems); :class:`~trajopt.errors.NumericalError` if it does
      not get there, a NaN direction if the iteration overflows (as the direct solve's
      would be).
      Time :math:`O(\text{iterations} \cdot B \sum_i (n_N + \mathrm{in}_i)
      \mathrm{out}_i)`, memory :math:`O(D)` beyond the factors.
    * ``"auto"``: ``"cg"`` from :data:`CG_MIN_SIZE` up, with at most as many iterations
      as take the direct solve's time by the cost model (:meth:`OutputGramian.flops`,
      :data:`CG_RATE`; none where that is under :data:`CG_PATIENCE`), abandoned from
      :data:`CG_PATIENCE` iterations on as soon as the smallest residual so far predicts
      more (:math:`k \log(\mathrm{tol}) /
      \log(\min_{j \le k} \mathrm{residual}_j)` iterations at its average rate); else
      (and where CG stops short) ``"direct"``.
    """
    check_solve(solve)
    B, n = Z.shape[:2]
    D = B * n
    if solve == "cg" or (solve == "auto" and D >= CG_MIN_SIZE):
        # D iterations in exact arithmetic; in floating point CG loses orthogonality and
        # can need more to reach CG_TOL (small systems: found in review)
        cap = 3 * D + 20
        dense_cost, product_cost = gramian.flops()
        budget = cap if solve == "cg" else min(cap, int(dense_cost / (CG_RATE * product_cost)))
        # "auto" whose budget is too small to judge CG by (a dense solve that is cheap
        # against CG's products: a GPU's, or wide layers' on the CPU): the direct solve
        v = None if budget < CG_PATIENCE else _cg_direction(gramian, Z, a, damping, budget,
                                                             patient=solve == "cg")
        if v is not None:
            return v
    return _direct_direction([gramian.dense()], Z, a, damping)


def _cg_direction(gramian: OutputGramian, Z: torch.Tensor, a: torch.Tensor,
                  damping: float, budget: int, patient: bool) -> torch.Tensor | None:
    """CG's direction, or None where "auto" (not ``patient``) gave up on it; "cg"
    (``patient``) raises instead."""
    B, n = Z.shape[:2]
    Zt = Z.transpose(-1, -2)

    def z(c):
        return (Z @ c.view(B, n, 1)).reshape(-1)

    def zt(c):
        return (Zt @ c.view(B, n, 1)).reshape(-1)

    def system(c):
        return torch.add(zt(gramian.apply(z(c))), c, alpha=damping)

    tol = CG_TOL * torch.finfo(a.dtype).eps
    best = [math.inf]

    def hopeless(k: int, rel: float) -> bool:
        # the rate of the smallest residual so far: CG's residual is not monotone, and
        # predicting from a transient bump abandoned CG that would have converged in
        # its budget (found in review; docs/steepest.md)
        best[0] = min(best[0], rel)
        return k >= CG_PATIENCE and (best[0] >= 1.0
                                     or k * math.log(tol) / math.log(best[0]) > budget)

    res = conjugate_gradient(system, zt(gramian.apply(a)), tol=tol, max_iter=budget,
                             stop=None if patient else hopeless)
    if res.converged:
        return (a - z(res.x)) / damping
    if patient and res.reason == "non_finite":
        # as the direct solve's overflow would: a non-finite direction, which
        # lqr_direction reports and LQRDescent skips (SkippedStepWarning)
        return torch.full_like(a, math.nan)
    if patient:
        raise NumericalError(
            f"solve='cg': conjugate gradients stopped ({res.reason}) after {res.iterations} "
            f"products at relative residual {res.residual:.1e} (wanted {tol:.1e}); use "
            "solve='direct' or 'auto', or a larger damping")
    return None


def _direct_direction(dense: list, Z: torch.Tensor, a: torch.Tensor,
                      damping: float) -> torch.Tensor:
    """The direct solve; S handed over in a one-element list, released here once used
    (memory: D x D matrices)."""
    B, n = Z.shape[:2]
    S = dense.pop()
    ZSa = (Z.transpose(-1, -2) @ (S @ a).view(B, n, 1)).reshape(-1, 1)
    ZS = Z.transpose(-1, -2) @ S.view(B, n, B * n)                  # (B, n, B n)
    del S
    # (Z'SZ)[(b, i), (c, l)] = sum_k (Z'S)[(b, i), (c, k)] Z_c[k, l]: one product per c
    ZSZ = (ZS.view(B * n, B, n).transpose(0, 1) @ Z).transpose(0, 1).reshape(B * n, B * n)
    ZSZ.diagonal().add_(damping)
    L, info = torch.linalg.cholesky_ex(ZSZ)
    del ZSZ
    if bool(info.any()):
        QS = (Z @ ZS).reshape(B * n, B * n)
        QS.diagonal().add_(damping)
        return torch.linalg.solve(QS, a)
    c = torch.cholesky_solve(ZSa, L).view(B, n, 1)
    return (a - (Z @ c).reshape(-1)) / damping
