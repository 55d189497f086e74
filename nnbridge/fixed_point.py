r"""Fixed-point solvers for batches of maps ``z = fn(z)``, ``z`` (B, n): the DEQ's
forward solve of :math:`z^* = f(z^*, x)` and its costate :math:`\lambda = a + A^\top
\lambda` (:mod:`nnbridge.deq`).

Each returns ``(z, iterations, residual)``: the iterate, the number of ``fn`` calls, and
the largest per-sample relative residual :func:`residuals`; all act per sample (each
sample's own mixing weights / inverse-Jacobian updates), so the batch is a batch of
independent problems.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["SOLVERS", "anderson", "broyden", "picard", "residuals"]


def residuals(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample relative residual ``|fz - z| / (|fz| + 1e-12)``, (B,)."""
    return (fz - z).norm(dim=-1) / (fz.norm(dim=-1) + 1e-12)


def _residual(fz: torch.Tensor, z: torch.Tensor) -> float:
    return float(residuals(fz, z).max())


def picard(fn: Callable, z: torch.Tensor, tol: float, max_iter: int, memory: int = 0
           ) -> tuple[torch.Tensor, int, float]:
    """Plain fixed-point iteration ``z <- fn(z)`` (``memory`` unused: the solvers' common
    signature)."""
    it, res = 0, float("inf")
    while res > tol and it < max_iter:
        fz = fn(z)
        res = _residual(fz, z)
        z = fz
        it += 1
    return z, it, res


def anderson(fn: Callable, z: torch.Tensor, tol: float, max_iter: int, memory: int
             ) -> tuple[torch.Tensor, int, float]:
    """Anderson acceleration (type II, damping 1) with ``memory`` past iterates.  The
    least-squares system is regularized relative to its scale by max(1e-8, 100 eps)
    (float32: 1.2e-5); where it is still singular, that sample takes a plain
    fixed-point step."""
    lam = max(1e-8, 100 * torch.finfo(z.dtype).eps)
    tiny = torch.finfo(z.dtype).tiny
    Z, G = [z], [fn(z)]
    res = _residual(G[0], z)
    z = G[0]
    it = 1
    while res > tol and it < max_iter:
        Z.append(z)
        G.append(fn(z))
        res = _residual(G[-1], z)
        it += 1
        Z, G = Z[-memory:], G[-memory:]
        Fm = torch.stack([g - zz for g, zz in zip(G, Z)], 1)         # (B, k, n)
        k = Fm.shape[1]
        H = Fm @ Fm.transpose(-1, -2)
        scale = H.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1)
        H = H + (lam * scale + tiny) * torch.eye(k, dtype=z.dtype, device=z.device)
        ones = torch.ones(z.shape[0], k, 1, dtype=z.dtype, device=z.device)
        w, info = torch.linalg.solve_ex(H, ones)
        alpha = w / w.sum(1, keepdim=True)                           # sum to 1
        mixed = (alpha * torch.stack(G, 1)).sum(1)
        ok = (info == 0).unsqueeze(-1) & torch.isfinite(mixed).all(-1, keepdim=True)
        z = torch.where(ok, mixed, G[-1])
    return z, it, res


def broyden(fn: Callable, z: torch.Tensor, tol: float, max_iter: int, memory: int
            ) -> tuple[torch.Tensor, int, float]:
    r"""Limited-memory 'good' Broyden on g(z) = f(z, x) - z (inverse-Jacobian
    updates), with a full step, safeguarded: an update whose denominator
    :math:`dz^\top H dg` is below 100 eps of its scale is skipped for that sample (it
    would divide by rounding noise: NaN in float32); a step that makes a sample's
    residual non-finite or 1000 times its best restarts that sample from its best
    iterate with a fixed-point step, and the memory is cleared (Broyden's full step
    is not globally convergent: a cell that is not contractive, e.g. after a large
    training step, sends it to overflow).  Returns the best iterate per sample."""
    eps = 100 * torch.finfo(z.dtype).eps
    fz = fn(z)
    g = fz - z
    Us, Vs = [], []

    def apply_inv(v):                      # H v with H = -I + sum u v'
        out = -v
        for u, vv in zip(Us, Vs):
            out = out + u * (vv * v).sum(-1, keepdim=True)
        return out

    best_z, best_r = z, residuals(fz, z)
    it, res = 1, float(best_r.max())
    while res > tol and it < max_iter and math.isfinite(res):
        dz = -apply_inv(g)
        z_new = z + dz
        f_new = fn(z_new)
        it += 1
        r_new = residuals(f_new, z_new)
        bad = ~torch.isfinite(r_new) | (r_new > 1e3 * best_r)
        if bool(bad.any()):
            Us, Vs = [], []
            restart = fn(best_z)
            it += 1
            z = torch.where(bad.unsqueeze(-1), restart, z_new)
            fz = fn(z)
            it += 1
            g = fz - z
        else:
            g_new = f_new - z_new
            dg = g_new - g
            Hdg = apply_inv(dg)
            # Sherman-Morrison: H += (dz - H dg) dz'H / (dz' H dg)
            vT = -dz
            for u, vv in zip(Us, Vs):
                vT = vT + vv * (u * dz).sum(-1, keepdim=True)
            denom = (vT * dg).sum(-1, keepdim=True)
            ok = denom.abs() > eps * vT.norm(dim=-1, keepdim=True) * dg.norm(
                dim=-1, keepdim=True)
            u = torch.where(ok, (dz - Hdg) / torch.where(ok, denom,
                                                        torch.ones_like(denom)),
                            torch.zeros_like(dz))
            Us.append(u)
            Vs.append(vT)
            Us, Vs = Us[-memory:], Vs[-memory:]
            z, g, fz = z_new, g_new, f_new
        r = residuals(fz, z)
        better = r < best_r
        best_z = torch.where(better.unsqueeze(-1), z, best_z)
        best_r = torch.where(better, r, best_r)
        res = float(best_r.max())
    if not math.isfinite(res):
        return z, it, res
    return best_z, it, res


#: the solvers by name
SOLVERS = {"anderson": anderson, "broyden": broyden, "picard": picard}
