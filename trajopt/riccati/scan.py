r"""The value functions of an LQ problem by a parallel (associative) scan over time.

The backward Riccati recursion is sequential: stage :math:`t` needs :math:`V_{t+1}`.  For an
LQ problem -- or one iLQR backward pass, which is one -- the value functions of all stages
are also the suffix products of an associative operation on per-stage *elements*
(Särkkä & García-Fernández 2023, "Temporal parallelization of dynamic programming and
linear quadratic control", IEEE TAC 68(2), Sec. IV), so they take
:math:`\lceil\log_2(T+1)\rceil` rounds of batched operations over all stages at once
instead of :math:`T` rounds of small ones.  On the CPU a small problem is bound by the
per-operation dispatch, not by arithmetic: for T = 100 the scan is a few hundred torch
operations where the sequential recursion is a few thousand.

**Elements.**  A stage with dynamics :math:`x' = A x + B u + c` and cost
:math:`\tfrac12 x^\top Q x + \tfrac12 u^\top R u + u^\top M x + q^\top x + r^\top u`,
:math:`R \succ 0`, becomes after :math:`u = v - R^{-1}(M x + r)`

.. math::

    \hat A = A - B R^{-1} M, \quad b = c - B R^{-1} r, \quad C = B R^{-1} B^\top, \quad
    J = Q - M^\top R^{-1} M, \quad \eta = q - M^\top R^{-1} r ,

the element of the conditional value from :math:`x` at stage :math:`t` to :math:`z` at
:math:`t+1` (up to a constant),

.. math::

    V(x, z) = \tfrac12 x^\top J x + \eta^\top x
              + \max_\lambda\; \lambda^\top (z - \hat A x - b) - \tfrac12 \lambda^\top C \lambda ;

the terminal value :math:`\tfrac12 x^\top V_{xx} x + V_x^\top x` is the element
:math:`(0, 0, 0, V_x, V_{xx})`.  Two consecutive elements *i* (earlier) and *j* combine,
by minimizing over the state between them, into

.. math::

    W &= I + C_i J_j, \\
    A_{ij} &= A_j W^{-1} A_i, \quad
    b_{ij} = A_j W^{-1} (b_i - C_i \eta_j) + b_j, \quad
    C_{ij} = A_j W^{-1} C_i A_j^\top + C_j, \\
    J_{ij} &= A_i^\top W^{-\top} J_j A_i + J_i, \quad
    \eta_{ij} = A_i^\top W^{-\top} (\eta_j + J_j b_i) + \eta_i

(Särkkä & García-Fernández, Lemma 7, with our sign of :math:`\eta`; :math:`W^{-\top} =
(I + J_j C_i)^{-1}`).  The suffix product from stage :math:`t` to the terminal element
is the value function at :math:`t`: :math:`(J, \eta) = (V_{xx,t}, V_{x,t})`.  The scan
here is Hillis-Steele's (each round combines every element with the one :math:`2^k`
stages later): :math:`O(T \log T)` work in :math:`\lceil\log_2(T+1)\rceil` rounds, which
on the CPU beats the work-efficient two-sweep scan for the sizes where a scan pays at all.

The same algebra is the structured doubling of :mod:`trajopt.dare.doubling`, there with
every stage equal.  :math:`W` is invertible when the :math:`J` are positive semidefinite
(the eigenvalues of :math:`C_i J_j` are then real and nonnegative); for indefinite costs it
may not be, and the caller checks the result (:func:`scan_values` reports elements whose
:math:`R` is not positive definite; the DDP backward pass compares the scan's values with
the Riccati step's, see ``docs/performance.md``).

Shapes: stages lead, then any batch dimensions: ``F`` (T, ..., n, n+m), ``L``
(T, ..., n+m, 1+n+m) (the packing of :func:`~trajopt.riccati.expansion.joint_blocks`),
every stage of the same sizes, ``n1 = n``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._linalg import sym
from .expansion import DenseStage, DenseStages

__all__ = ["ScanValues", "scan_values", "scanned_step", "scan_batch", "stacked_stages",
           "broadcast_stages",
           "scan_pays", "AGREEMENT", "MIN_STAGES", "MAX_WORK", "MAX_WORK_CUDA"]

#: fewest stages for which the solvers take the scan (below it the recursion is as fast)
MIN_STAGES = 16
#: largest ``batch * (n + m)^2`` for which they take it on the CPU: the scan does
#: O(T log T) small matrix operations against the recursion's O(T), so it pays only where
#: the recursion is bound by per-operation dispatch (``docs/performance.md``)
MAX_WORK = 256
#: the same on a GPU, where every kernel launch costs ~10 us whatever its size (H200,
#: ``benchmarks/bench_gpu.py --only f``, values only: the scan 2-5.5x faster up to this
#: work -- T = 100, n + m = 11, batch 512 -- 1.1x at 123,904, slower beyond; at
#: T = 1,000, n + m = 14, 2.3x faster at 50,176, 0.72x at 200,704)
MAX_WORK_CUDA = 65536

#: largest relative difference between the scan's values and the Riccati step's, in units
#: of the dtype's eps (:meth:`ScanValues.agrees`): well-conditioned problems agree to
#: ~10 eps; a large penalty (an augmented Lagrangian's 1e5..1e7 Hessians) gives 1e-13 ..
#: 4e-12 in float64, where the scan's value gradients are that much less accurate than
#: the recursion's and the recursion is taken instead (``docs/performance.md``)
AGREEMENT = 128


@dataclass(frozen=True)
class ScanValues:
    """Value derivatives of every stage from :func:`scan_values`.

    Attributes
    ----------
    Vx : (T+1, ..., n)
        Value gradients at the nominal point, stage 0 .. T (the last is the terminal one).
    Vxx : (T+1, ..., n, n)
        Value Hessians, symmetrized.
    ok : (...) bool
        False where some stage's control Hessian of the cost ``R`` was not positive
        definite (the elimination of the control needs it): those elements' values are
        meaningless.
    """

    Vx: torch.Tensor
    Vxx: torch.Tensor
    ok: torch.Tensor

    def agrees(self, Vx: torch.Tensor, Vxx: torch.Tensor, valid: torch.Tensor) -> bool:
        """Whether the Riccati step's values ``Vx`` (T, ..., n), ``Vxx`` (T, ..., n, n) at
        stages 0 .. T-1, computed from this scan's values at 1 .. T, equal the scan's own
        to :data:`AGREEMENT` eps relative to their size, for the elements ``valid`` (...)
        (the others -- a Q_uu that was not positive definite -- are the caller's to
        flag).  A scan that broke down (a nearly singular :math:`I + C_i J_j`) fails it."""
        scale = self.Vxx[:-1].abs().amax((-2, -1)) + self.Vx[:-1].abs().amax(-1)
        diff = torch.maximum((Vxx - self.Vxx[:-1]).abs().amax((-2, -1)),
                             (Vx - self.Vx[:-1]).abs().amax(-1))
        tol = AGREEMENT * torch.finfo(Vxx.dtype).eps
        return bool(((diff <= tol * scale) | ~valid).all())


def scan_pays(T: int, batch: int, size: int, device: torch.device | None = None) -> bool:
    """The solvers' rule: ``T`` stages of ``batch`` problems with ``n + m = size`` on
    ``device`` (the CPU's bound unless it is a CUDA device)."""
    bound = MAX_WORK_CUDA if device is not None and device.type == "cuda" else MAX_WORK
    return T >= MIN_STAGES and batch * size * size <= bound


def stacked_stages(stages) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(F, L, c)`` stacked over the stages (T, ...) of a list of
    :class:`~trajopt.riccati.expansion.DenseStage`, or None where the scan does not apply:
    second-order dynamics terms, stages of different sizes or a state size that changes."""
    if isinstance(stages, DenseStages):   # stacked already
        st = stages.stacked
        if st.F.shape[-2] != st.n or st.fxx is not None:
            return None
        return st.F, st.L, st.c
    s0 = stages[0]
    if s0.F.shape[-2] != s0.n:
        return None
    with_c = s0.c is not None
    for s in stages:
        if (type(s) is not DenseStage or s.fxx is not None or s.F.shape != s0.F.shape
                or s.L.shape != s0.L.shape or (s.c is not None) != with_c
                or (with_c and s.c.shape != s0.c.shape)):
            return None
    return (torch.stack([s.F for s in stages]), torch.stack([s.L for s in stages]),
            torch.stack([s.c for s in stages]) if with_c else None)


def _elements(F: torch.Tensor, L: torch.Tensor, n: int, c: torch.Tensor | None):
    """Per-stage packed elements ``P = [A | b | C]`` (T, ..., n, 2n+1) and
    ``D = [J | eta]`` (T, ..., n, n+1), and the Cholesky ``info`` of every ``R``."""
    A, B = F[..., :n], F[..., n:]
    R = L[..., n:, 1 + n:]
    Lr, info = torch.linalg.cholesky_ex(R)
    # R^-1 [r | M | B'] in one solve
    S = torch.cholesky_solve(torch.cat([L[..., n:, :1 + n], B.transpose(-1, -2)], -1), Lr)
    # [b | A_hat | -C] = [c | A | 0] - B R^-1 [r | M | B']
    lead = torch.cat([A.new_zeros(A.shape[:-1] + (1,)) if c is None else c.unsqueeze(-1),
                      A, torch.zeros_like(A)], -1)
    bAC = torch.baddbmm(lead.flatten(0, -3), B.flatten(0, -3), S.flatten(0, -3), alpha=-1
                        ).view(lead.shape)
    P = torch.cat([bAC[..., 1:1 + n], bAC[..., :1], -bAC[..., 1 + n:]], -1)
    # [eta | J] = [q | Q] - M' R^-1 [r | M]
    MtS = L[..., :n, 1 + n:] @ S[..., :1 + n]
    qQ = L[..., :n, :1 + n] - MtS
    D = torch.cat([qQ[..., 1:], qQ[..., :1]], -1)
    return P, D, info


def _combine(Pi: torch.Tensor, Di: torch.Tensor, Pj: torch.Tensor, Dj: torch.Tensor,
             n: int, eye: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The element of ``i`` followed by ``j`` (flat batches (N, n, 2n+1), (N, n, n+1))."""
    Ai, Ci = Pi[..., :n], Pi[..., n + 1:]
    Aj, Jj, ej = Pj[..., :n], Dj[..., :n], Dj[..., n:]
    Winv = torch.linalg.inv_ex(torch.baddbmm(eye, Ci, Jj))[0]
    # W^-1 [A_i | b_i - C_i eta_j | C_i A_j']
    E = torch.bmm(Ci, torch.cat([ej, Aj.transpose(-1, -2)], -1))
    rhs = torch.cat([Pi[..., :n + 1] - torch.nn.functional.pad(E[..., :1], (n, 0)),
                     E[..., 1:]], -1)
    AX = torch.bmm(Aj, torch.bmm(Winv, rhs))
    P = torch.cat([AX[..., :n], AX[..., n:] + Pj[..., n:]], -1)
    # A_i' W^-T [J_j A_i | J_j b_i + eta_j] + [J_i | eta_i]
    JA = torch.bmm(Jj, Pi[..., :n + 1])
    rhs2 = torch.cat([JA[..., :n], JA[..., n:] + ej], -1)
    D = torch.baddbmm(Di, Ai.transpose(-1, -2), torch.bmm(Winv.transpose(-1, -2), rhs2))
    return P, D


def scan_values(F: torch.Tensor, L: torch.Tensor, n: int, Vx: torch.Tensor,
                Vxx: torch.Tensor, c: torch.Tensor | None = None) -> ScanValues:
    r"""Value derivatives of all stages of an LQ problem by the parallel scan.

    Parameters
    ----------
    F : (T, ..., n, n+m)
        ``[f_x  f_u]`` of every stage.
    L : (T, ..., n+m, 1+n+m)
        The cost blocks ``[[l_x, l_xx, l_xu], [l_u, l_ux, l_uu]]`` of every stage.
    n : int
        State size.
    Vx : (..., n)
        Terminal value gradient.
    Vxx : (..., n, n)
        Terminal value Hessian.
    c : (T, ..., n), optional
        Affine offsets of the dynamics.

    Returns
    -------
    ScanValues
        ``Vx`` (T+1, ..., n) and ``Vxx`` (T+1, ..., n, n) of every stage, equal to the
        sequential recursion of :func:`~trajopt.riccati.step.riccati_step_joint` (with the
        exact policy) up to rounding, and ``ok``.
    """
    T = F.shape[0]
    batch = F.shape[1:-2]
    P, D, info = _elements(F, L, n, c)
    term_D = torch.cat([Vxx, Vx.unsqueeze(-1)], -1).expand(*batch, n, n + 1)
    P = torch.cat([P, torch.zeros_like(P[:1])]).reshape(T + 1, -1, n, 2 * n + 1)
    D = torch.cat([D, term_D.unsqueeze(0)]).reshape(T + 1, -1, n, n + 1)
    eye = torch.eye(n, dtype=F.dtype, device=F.device)
    d = 1
    while d <= T:
        # element t <- element t (x) element t+d, for the t that have a partner
        Pn, Dn = _combine(P[:T + 1 - d].flatten(0, 1), D[:T + 1 - d].flatten(0, 1),
                          P[d:].flatten(0, 1), D[d:].flatten(0, 1), n, eye)
        P = torch.cat([Pn.view(T + 1 - d, *P.shape[1:]), P[T + 1 - d:]])
        D = torch.cat([Dn.view(T + 1 - d, *D.shape[1:]), D[T + 1 - d:]])
        d *= 2
    D = D.view(T + 1, *batch, n, n + 1)
    J = D[..., :n]
    ok = (info == 0).all(0) if T else torch.ones(batch, dtype=torch.bool, device=F.device)
    return ScanValues(Vx=D[..., n], Vxx=sym(J), ok=ok)


def scanned_step(stacked: tuple, n: int, Vx: torch.Tensor, Vxx: torch.Tensor,
                 step: Callable):
    r"""The exact backward pass with the values from :func:`scan_values` and the Riccati
    step run once over all stages (stages as the leading batch dimension), or None.

    Parameters
    ----------
    stacked : (F, L, c)
        The stages stacked by :func:`stacked_stages`; ``n`` the state size.  Their batch
        axes and the terminal value's broadcast to one batch ``...`` (one terminal cost or
        one stage cost for a batch of dynamics; a batch carried by a linear term alone).
    Vx : (..., n), Vxx : (..., n, n)
        Terminal value derivatives.
    step : callable
        ``step(Vx_next, Vxx_next, F, L, n, c)`` with the scan's values at stages 1 .. T
        ((T, ..., n), (T, ..., n, n)) and the stages brought to that batch ->
        ``(result, valid)``: anything with the step's
        value derivatives ``result.Vx`` (T, ..., n) and ``result.Vxx``, and the elements
        (...) whose :math:`Q_{uu}` was positive definite at every stage; or None (a step
        that refuses, e.g. a solver that raises on an indefinite :math:`Q_{uu}`).

    Returns
    -------
    ``result``, or None where a stage's ``R`` is not positive definite, the step returns
    None, or the step's values disagree with the scan's (:meth:`ScanValues.agrees`): the
    caller then runs the recursion.
    """
    batch = scan_batch(stacked, Vx, Vxx)
    F, L, c = (None if v is None else broadcast_stages(v, batch, core) for v, core in (
        (stacked[0], 2), (stacked[1], 2), (stacked[2], 1)))
    vals = scan_values(F, L, n, Vx.expand(*batch, n), Vxx.expand(*batch, n, n), c)
    if not bool(vals.ok.all()):
        return None
    got = step(vals.Vx[1:], vals.Vxx[1:], F, L, n, c)
    if got is None:
        return None
    result, valid = got
    return result if vals.agrees(result.Vx, result.Vxx, valid) else None


def scan_batch(stacked: tuple, Vx: torch.Tensor, Vxx: torch.Tensor) -> torch.Size:
    """The one batch :func:`scanned_step` brings the stacked stages ``(F, L, c)`` and the
    terminal value ``Vx`` (..., n), ``Vxx`` (..., n, n) to (RuntimeError where they do not
    broadcast)."""
    F, L, c = stacked
    return torch.broadcast_shapes(F.shape[1:-2], L.shape[1:-2], Vx.shape[:-1],
                                  Vxx.shape[:-2], () if c is None else c.shape[1:-1])


def broadcast_stages(v: torch.Tensor, batch: torch.Size, core: int) -> torch.Tensor:
    """A stacked array (T, ..., *core) with its batch axes ``...`` broadcast to ``batch``
    (missing leading axes inserted after the stage axis; the stages stay first)."""
    T = v.shape[0]
    return v.reshape(T, *[1] * (len(batch) + 1 + core - v.ndim), *v.shape[1:]).expand(
        T, *batch, *v.shape[-core:])
