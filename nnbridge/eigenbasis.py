r"""Eigenbases of Kronecker factors (EKFAC, GT-EKFAC), unique where eigh's is not.

A Kronecker factor :math:`A = \mathbb{E}[\tilde x \tilde x^\top]` or
:math:`G = \mathbb{E}[w w^\top]` often has a repeated eigenvalue: always a zero one when
it is rank deficient (fewer samples times positions than the layer's fan-in, e.g. 257
inputs at batch 128, until the running average has seen enough batches), and by
construction in a cooperative stage's joint factor (:mod:`nnbridge.cooperative`).
Inside a repeated eigenvalue ``eigh``'s basis is rounding's choice -- the order of the
samples, the ranks' all-reduce, the device's eigensolver -- and EKFAC's eigenvalue
re-estimate :math:`S = \mathbb{E}[(Q_G^\top G_i Q_A)^2]` is not invariant under a change
of basis there: the later batches of the refresh interval have gradients in those
directions.  A permuted batch changed EKFAC's and DDPNOpt(ekfac)'s step by 0.6 % after
three float64 steps of a 64-wide MLP at batch 16 (4e-15 with the basis made unique), and
so did two ranks against one process.

:func:`untie` makes the basis inside each repeated eigenvalue the one that diagonalizes
a *tie-breaker* there: a symmetric matrix that depends on the statistics only, not on
their order, and is generic on the eigenspace (distinct eigenvalues there).  The last
one is always the coordinates, :math:`\mathrm{diag}(1, 2, \ldots, N)` (the layer's own
order of inputs or outputs: not a function of the batch, generic on a subspace in
general position); a cluster that no tie-breaker separates keeps eigh's basis (e.g. a
null space made of duplicated input features, x0 = x3 and x1 = x2, on which the
coordinates have a repeated eigenvalue: one that never gets gradients, whose basis the
step does not see).  Columns are fixed up to their signs, which the step does not see
either (they enter S squared and P^-1 twice).  Where the eigenvalues are distinct
nothing changes (the same tensor is returned).

Cost: an eigendecomposition of each repeated eigenvalue's size and a few host
synchronizations per factor, at a refresh; a factor with a leading dimension (a grouped
or depthwise convolution) is untied group by group in Python where a group has a
repeated eigenvalue (the others are found in one pass), so a depthwise float64 layer
with many rank-deficient channels pays per channel (512 groups of 10 x 10, rank 4: 191
ms against eigh's 7 ms, a review's measurement).

The coordinates break ties in float64 only (:func:`eigenbasis_of`): at float32's
rounding floor, 4 N eps of the largest eigenvalue, most of a deep ReLU layer's spectrum
counts as one repeated eigenvalue (223-255 of 257 at every refresh of a 6 x 256 MLP at
batch 128), and re-basing it doubled each refresh (80 -> 165 ms; +30 % a step at
``update_freq=10``).  float32 EKFAC keeps eigh's basis there, and with it the order
dependence: 1 % of the step after three steps of the 64-wide MLP at batch 16 (2e-6 with
the coordinates), 3e-8 of the parameters on the 6 x 256 MLP.  A cooperative stage's own
tie-breaker (:mod:`nnbridge.cooperative`) applies in every precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["eigh", "eigenbasis", "eigenbasis_of", "untie"]


def eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues ascending, eigenvectors)`` of a symmetric factor (..., N, N).
    LAPACK's float32 ``eigh`` can fail to converge on an ill-conditioned factor (dead
    ReLU features give many repeated zero eigenvalues; found by the MNIST-1D experiment
    as a raw ``LinAlgError`` mid-training): it is then computed in float64 and cast
    back.  Where even that fails, or the factor is not finite, the result is NaN, so
    that the step's non-finite check skips the step and leaves the optimizer's state as
    it was."""
    if bool(torch.isfinite(M).all()):
        for dtype in dict.fromkeys((M.dtype, torch.float64)):
            try:
                lam, Q = torch.linalg.eigh(M.to(dtype))
                return lam.to(M.dtype), Q.to(M.dtype)
            except RuntimeError:  # torch.linalg.LinAlgError: no convergence
                continue
    return torch.full_like(M[..., 0], float("nan")), torch.full_like(M, float("nan"))


def eigenbasis(M: torch.Tensor, breakers: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The eigenvectors (..., N, N) of the symmetric factor ``M`` (:func:`eigh`), the
    basis inside each repeated eigenvalue fixed by ``breakers`` (symmetric (N, N), a
    function of the statistics) and then by the coordinates (:func:`untie`; a leading
    dimension, a grouped convolution's groups, one factor at a time)."""
    lam, Q = eigh(M)
    if M.shape[-1] == 0 or not breakers and Q.dtype != torch.float64:
        return Q     # (nothing to untie by: eigenbasis_of)
    if M.dim() > 2:
        flat_lam, flat_Q = lam.reshape(-1, lam.shape[-1]), Q.reshape(-1, *Q.shape[-2:])
        # the factors with a repeated eigenvalue (untie's rule), found in one pass: the
        # others keep eigh's basis without a host synchronization each
        tol = _tie_tolerance(lam.shape[-1], lam.dtype, flat_lam.abs().amax(-1))
        tied = ((flat_lam[:, 1:] - flat_lam[:, :-1]) <= tol[:, None]).any(-1)
        ks = tied.nonzero().flatten().tolist()
        out = flat_Q.clone() if ks else flat_Q
        for k in ks:
            out[k] = eigenbasis_of(flat_lam[k], flat_Q[k], breakers)
        return out.reshape(Q.shape)
    return eigenbasis_of(lam, Q, breakers)


def eigenbasis_of(lam: torch.Tensor, Q: torch.Tensor,
                  breakers: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """:func:`untie` of one factor's ``eigh`` result (``lam`` (N,), ``Q`` (N, N)) with
    ``breakers``, and in float64 the coordinates, at the factor's own scale.

    Not the coordinates in lower precisions: there the repeated eigenvalues, those
    closer than 4 N eps of the largest, are most of a deep layer's spectrum, and
    re-basing them doubled a refresh (module docstring)."""
    if (not breakers and Q.dtype != torch.float64 or Q.shape[0] == 0
            or not bool(torch.isfinite(lam).all())):
        return Q
    if Q.dtype == torch.float64:
        coordinates = torch.arange(1, Q.shape[0] + 1, dtype=Q.dtype, device=Q.device)
        breakers = [*breakers, torch.diag(coordinates)]
    return untie(lam, Q, breakers, float(lam.abs().max()))


def untie(lam: torch.Tensor, Q: torch.Tensor, breakers: Sequence[torch.Tensor],
          scale: float) -> torch.Tensor:
    r"""Eigenvectors ``Q`` (N, n) (orthonormal columns; eigenvalues ``lam`` (n,)
    ascending) with the basis inside each repeated eigenvalue -- consecutive
    eigenvalues closer than :math:`4 N \epsilon_{\mathrm{mach}}` ``scale``, where the
    eigenvectors are rounding's choice -- made the eigenvectors of the first breaker
    compressed to it, :math:`C^\top T C` (C the cluster's columns), their own ties by
    the next breaker, and so on (breakers symmetric (N, N)).  Returns ``Q`` itself when
    no eigenvalue repeats, else a new tensor."""
    n = Q.shape[-1]
    if not breakers or n < 2 or not bool(torch.isfinite(Q).all()):
        return Q
    cuts = ((lam[1:] - lam[:-1]) > _tie_tolerance(Q.shape[0], lam.dtype, scale)
            ).nonzero().flatten().tolist()
    edges = [0, *(c + 1 for c in cuts), n]
    if len(edges) == n + 1:                               # no repeated eigenvalue
        return Q
    T = breakers[0].to(Q.dtype)
    # the compressed breaker's eigenvalues are rounded at T's scale, not at theirs (a
    # breaker that vanishes on the cluster leaves it to the next)
    t_scale = float(torch.linalg.matrix_norm(T))
    Q = Q.clone()
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi - lo > 1:
            C = Q[:, lo:hi]
            R = C.transpose(0, 1) @ T @ C
            mu, V = eigh(0.5 * (R + R.transpose(0, 1)))
            if bool(torch.isfinite(V).all()):
                Q[:, lo:hi] = untie(mu, C @ V, breakers[1:], t_scale)
    return Q


def _tie_tolerance(N: int, dtype: torch.dtype, scale):
    r"""Consecutive eigenvalues of an N x N factor closer than this are one repeated
    eigenvalue (their eigenvectors rounding's choice): :math:`4 N \epsilon` ``scale``
    (``scale`` a number or a tensor of them)."""
    return 4 * N * torch.finfo(dtype).eps * scale
