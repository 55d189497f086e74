r"""Deep equilibrium models whose gradient is an infinite-horizon LQR (thesis papers/002,
Ch. 4, Thm 4.1.1 and 4.2.1).

``DEQ(cell)(x)`` returns the fixed point :math:`z^* = f(z^*, x)` of ``cell(z, x)``.  The
backward pass solves, per sample, the infinite-horizon LQR of Thm 4.1.1 for the
Euclidean divergence,

.. math::

    \min \sum_{i \ge 0} a^\top \tilde z_i + \tfrac12 \tilde u_i^\top \tilde u_i, \quad
    \tilde z_{i+1} = A \tilde z_i + B \tilde u_i,

with :math:`A = \partial f/\partial z`, :math:`B = [\partial f/\partial \theta \mid
\partial f/\partial x]` at :math:`z^*` and :math:`a = \partial L/\partial z^*`, through
:func:`trajopt.solve_infinite_lqr` (the DARE, here with the solution P = 0, and the
linear-term fixed point :math:`\lambda = (I - A^\top)^{-1} a`).  The gradient is
:math:`-\tilde u^* = B^\top \lambda`, which is the implicit-function-theorem gradient
(Thm 4.2.1).  Dense per-sample Jacobians are formed: small cells only.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from trajopt import solve_infinite_lqr
from trajopt.errors import (
    ConvergenceWarning,
    InvalidArgumentError,
    NonFiniteError,
    NotStabilizableError,
    NumericalError,
    ShapeError,
)
from trajopt.riccati import push_through_control, surrogate_control

__all__ = ["DEQ", "DEQBlock", "SOLVERS", "DEFAULT_TOL"]

SOLVERS = ("anderson", "broyden", "picard")
#: the forward solve's default relative tolerance by dtype (about 100 eps)
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-5, torch.bfloat16: 1e-2,
               torch.float16: 1e-3}


class DEQBlock(nn.Module):
    """A DEQ cell made of layers, each called as ``layer(h, x)`` (h the previous layer's
    output, x the injected input): ``cell(z, x) = layers[-1](...layers[0](z, x)..., x)``.
    With it :meth:`DEQ.cyclic_lqr_gradient` solves the per-layer cyclic LQR (thesis
    Sec. 4.3)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        if not layers:
            raise InvalidArgumentError("DEQBlock needs at least one layer")
        self.layers = nn.ModuleList(layers)

    def forward(self, z, x):
        for layer in self.layers:
            z = layer(z, x)
        return z


class DEQ(nn.Module):
    """Fixed point of ``cell(z, x)`` with the LQR backward pass (module docstring).

    Parameters
    ----------
    cell : nn.Module
        Called as ``cell(z, x)`` on batches; ``z`` has shape ``(B, *z_shape)``.
    z_shape : tuple of int, optional
        Per-sample shape of z (default: that of x).
    solver : {"anderson", "broyden", "picard"}
    tol : float, optional
        Stop when ``max_b |f(z_b, x_b) - z_b| / (|f(z_b, x_b)| + 1e-12) <= tol``.
        Default: by the dtype of x, :data:`DEFAULT_TOL` (1e-8 in float64, 1e-5 in float32,
        1e-3 in the half types: about 100 eps, which the iterations reach; torch's
        default float32 cannot reach float64's 1e-8).
    max_iter : int
    memory : int
        History length of Anderson and Broyden.

    Attributes
    ----------
    stats : dict
        ``iterations`` and ``residual`` of the last forward solve.
    """

    def __init__(self, cell: nn.Module, z_shape: tuple[int, ...] | None = None, *,
                 solver: str = "anderson", tol: float | None = None, max_iter: int = 200,
                 memory: int = 6):
        super().__init__()
        if solver not in SOLVERS:
            raise InvalidArgumentError(f"solver must be one of {', '.join(SOLVERS)}; got "
                                       f"{solver!r}")
        if (tol is not None and not tol > 0) or int(max_iter) < 1 or int(memory) < 1:
            raise InvalidArgumentError(f"need tol > 0, max_iter >= 1, memory >= 1; got "
                                       f"{tol}, {max_iter}, {memory}")
        self.cell, self.z_shape = cell, z_shape
        self.solver, self.tol, self.max_iter, self.memory = solver, tol, int(max_iter), memory
        self.stats: dict = {}

    # ------------------------------------------------------------------ forward solve
    def _f(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        return self.cell(z.reshape(B, *self._zs), x).reshape(B, -1)

    def _tol(self, dtype: torch.dtype) -> float:
        return self.tol if self.tol is not None else DEFAULT_TOL.get(dtype, 1e-3)

    def _check_cell(self, z: torch.Tensor, x: torch.Tensor) -> None:
        """One call of the cell at z0 = 0: a clear error when z_shape is wrong."""
        B = z.shape[0]
        given = "z_shape" if self.z_shape is not None else "z_shape (default: x's)"
        try:
            out = self.cell(z.reshape(B, *self._zs), x)
        except (RuntimeError, ValueError, IndexError) as e:
            raise ShapeError(f"DEQ: cell(z, x) fails for z of shape {(B, *self._zs)} from "
                             f"{given} and x of shape {tuple(x.shape)}: "
                             f"{str(e).splitlines()[0]}; pass DEQ(cell, z_shape=...)") from e
        if tuple(out.shape) != (B, *self._zs):
            raise ShapeError(f"DEQ: cell(z, x) must return z's shape {(B, *self._zs)} (from "
                             f"{given}); got {tuple(out.shape)}: pass DEQ(cell, "
                             f"z_shape={tuple(out.shape[1:])}) if that is z's shape")

    def fixed_point(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`z^*` ``(B, *z_shape)`` without a graph."""
        self._zs = tuple(self.z_shape or x.shape[1:])
        B = x.shape[0]
        z = x.new_zeros(B, int(torch.tensor(self._zs).prod()) if self._zs else 1)
        tol = self._tol(z.dtype)
        with torch.no_grad():
            self._check_cell(z, x)
            z, it, res = getattr(self, f"_{self.solver}")(z, x, tol)
        # a NaN residual ends the iteration loops at once (NaN > tol is false): the
        # iterate may still be finite, so both are checked
        if not bool(torch.isfinite(z).all()) or not math.isfinite(res):
            raise NonFiniteError(f"DEQ: the {self.solver} iteration produced NaN/inf "
                                 f"(residual {res}; is the cell contractive?)")
        if res > tol:
            warnings.warn(f"DEQ: {self.solver} did not reach tol {tol} in {it} "
                          f"iterations (relative residual {res:.2e})", ConvergenceWarning,
                          stacklevel=3)
        self.stats = {"iterations": it, "residual": res}
        return z.reshape(B, *self._zs)

    def _residuals(self, fz, z) -> torch.Tensor:
        """Per-sample relative residual |f(z) - z| / (|f(z)| + 1e-12), (B,)."""
        return (fz - z).norm(dim=-1) / (fz.norm(dim=-1) + 1e-12)

    def _residual(self, fz, z) -> float:
        return float(self._residuals(fz, z).max())

    def _picard(self, z, x, tol):
        it, res = 0, float("inf")
        while res > tol and it < self.max_iter:
            fz = self._f(z, x)
            res = self._residual(fz, z)
            z = fz
            it += 1
        return z, it, res

    def _anderson(self, z, x, tol):
        """Anderson acceleration (type II, damping 1) with ``memory`` past iterates.  The
        least-squares system is regularized relative to its scale by max(1e-8, 100 eps)
        (float32: 1.2e-5); where it is still singular, that sample takes a plain
        fixed-point step."""
        lam = max(1e-8, 100 * torch.finfo(z.dtype).eps)
        tiny = torch.finfo(z.dtype).tiny
        Z, G = [z], [self._f(z, x)]
        res = self._residual(G[0], z)
        z = G[0]
        it = 1
        while res > tol and it < self.max_iter:
            Z.append(z)
            G.append(self._f(z, x))
            res = self._residual(G[-1], z)
            it += 1
            Z, G = Z[-self.memory:], G[-self.memory:]
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

    def _broyden(self, z, x, tol):
        r"""Limited-memory 'good' Broyden on g(z) = f(z, x) - z (inverse-Jacobian
        updates), with a full step, safeguarded: an update whose denominator
        :math:`dz^\top H dg` is below 100 eps of its scale is skipped for that sample (it
        would divide by rounding noise: NaN in float32); a step that makes a sample's
        residual non-finite or 1000 times its best restarts that sample from its best
        iterate with a fixed-point step, and the memory is cleared (Broyden's full step
        is not globally convergent: a cell that is not contractive, e.g. after a large
        training step, sends it to overflow).  Returns the best iterate per sample."""
        eps = 100 * torch.finfo(z.dtype).eps
        fz = self._f(z, x)
        g = fz - z
        Us, Vs = [], []

        def apply_inv(v):                      # H v with H = -I + sum u v'
            out = -v
            for u, vv in zip(Us, Vs):
                out = out + u * (vv * v).sum(-1, keepdim=True)
            return out

        best_z, best_r = z, self._residuals(fz, z)
        it, res = 1, float(best_r.max())
        while res > tol and it < self.max_iter and math.isfinite(res):
            dz = -apply_inv(g)
            z_new = z + dz
            f_new = self._f(z_new, x)
            it += 1
            r_new = self._residuals(f_new, z_new)
            bad = ~torch.isfinite(r_new) | (r_new > 1e3 * best_r)
            if bool(bad.any()):
                Us, Vs = [], []
                restart = self._f(best_z, x)
                it += 1
                z = torch.where(bad.unsqueeze(-1), restart, z_new)
                fz = self._f(z, x)
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
                Us, Vs = Us[-self.memory:], Vs[-self.memory:]
                z, g, fz = z_new, g_new, f_new
            r = self._residuals(fz, z)
            better = r < best_r
            best_z = torch.where(better.unsqueeze(-1), z, best_z)
            best_r = torch.where(better, r, best_r)
            res = float(best_r.max())
        if not math.isfinite(res):
            return z, it, res
        return best_z, it, res

    # ------------------------------------------------------------------ module
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fixed_point(x)
        if not torch.is_grad_enabled():
            return z
        params = [p for p in self.cell.parameters()]
        return _LQRGradient.apply(self, z, x, *params)

    def lqr_gradient(self, z: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
        """Gradients ``(dL/dx, [dL/dtheta])`` from the infinite-horizon LQR, given the
        fixed point ``z`` and ``a = dL/dz``."""
        B = z.shape[0]
        zf = z.detach().reshape(B, -1)
        A, Bp, Bx = _jacobians(self.cell, z, x)
        n, mp = zf.shape[1], Bp.shape[-1]
        Bm = torch.cat([Bp, Bx], -1)
        q = a.reshape(B, -1).to(zf.dtype)
        Lr, G = surrogate_control(Bm, 1.0)
        eye = torch.eye(n, dtype=zf.dtype, device=zf.device).expand(B, n, n)
        try:
            sol = solve_infinite_lqr(A, Lr, zf.new_zeros(B, n, n), eye, q=q)
        except NotStabilizableError as err:
            # df/dz has an eigenvalue within rounding of the unit circle (a fixed point
            # that attracts slowly, common in float32: the DARE's margin is 1000 n eps),
            # where the DARE cannot certify P = 0; the implicit gradient is the LQR's
            # wherever the fixed point attracts (Thm 4.2.1) and is defined wherever
            # I - df/dz is regular: solved for directly, for the batch
            warnings.warn(
                f"DEQ: the infinite-horizon LQR has no certified stabilizing solution "
                f"({str(err).split(';')[0]}; df/dz has an eigenvalue within rounding of "
                f"the unit circle there): the batch's gradient is the implicit one by a "
                f"direct solve of (I - df/dz)' w = dL/dz (docs/steepest.md, the DEQ's "
                f"backward)", UserWarning, stacklevel=3)
            g = _implicit_gradient(A, Bm, q)
            return g[:, mp:].reshape(x.shape), _unflatten(g[:, :mp].sum(0), self.cell)
        # -k of the original LQR: B'(I + P G)^{-1} p (= B' lambda, P = 0 here)
        g = -push_through_control(Bm, 1.0, sol.P, G, sol.p)   # (B, m)
        # P = 0 (no state cost) is the stabilizing solution exactly where the fixed point
        # attracts (every eigenvalue of df/dz inside the unit circle): only there is the
        # LQR's value the implicit gradient; elsewhere its P != 0 stabilizes another
        # problem, and the implicit gradient B' (I - A')^{-1} q is solved for directly
        away = sol.P.abs().amax((-2, -1)) > 0
        if bool(away.any()):
            g = g.clone()
            g[away] = _implicit_gradient(A[away], Bm[away], q[away])
            warnings.warn(
                f"DEQ: the fixed point of {int(away.sum())} of {B} samples is not "
                f"attracting (df/dz has an eigenvalue of magnitude >= 1 there): their "
                f"gradient is the implicit one by a direct solve of (I - df/dz)' w = dL/dz, "
                f"not the infinite-horizon LQR (docs/steepest.md, the DEQ's backward)",
                UserWarning, stacklevel=3)
        return g[:, mp:].reshape(x.shape), _unflatten(g[:, :mp].sum(0), self.cell)

    def lqr_update(self, x: torch.Tensor, y, loss, head: nn.Module, *,
                   divergence: str = "kl", damping: float = 1e-3,
                   z: torch.Tensor | None = None) -> list[torch.Tensor]:
        r"""The steepest-descent direction for the cell's parameters from the
        infinite-horizon LQR of Thm 4.1.1 (thesis Alg. 1), on the batch.

        The state is batch-augmented (``A = blockdiag_j A_j``, ``B`` stacked, shared
        parameters); the objective is ``loss(head(z*), y)``.  ``"euclidean"``:
        :math:`Q = 0, R = (1 + \delta) I` (minus the gradient, scaled); ``"kl"``:
        :math:`Q = \tfrac1B \mathrm{blockdiag}_j J_j^\top (\mathrm{diag}\,p_j - p_j
        p_j^\top) J_j`, the Fisher of the softmax of ``head`` in z-space, and
        :math:`R = \delta I` (the adjoint of the divergence vanishes at z*, so the
        Hamiltonian terms do).  Solved by :func:`trajopt.solve_infinite_lqr` (DARE and
        the linear-term fixed point); the direction is the steady state
        :math:`\tilde u^* = K \tilde z^* + k`, :math:`\tilde z^* = (I - A - BK)^{-1} B k`
        (Eq. 4.1.12).

        ``z``: the fixed point of ``x`` when the caller already has it (e.g. from the
        forward pass of the same step); solved here otherwise.

        Returns one tensor per ``cell.parameters()`` entry.
        """
        if divergence not in ("euclidean", "kl"):
            raise InvalidArgumentError(f"divergence must be 'euclidean' or 'kl'; got "
                                       f"{divergence!r}")
        if not damping >= 0 or (divergence == "kl" and not damping > 0):
            raise InvalidArgumentError(f"damping must be >= 0 (> 0 for 'kl'); got {damping}")
        z = (self.fixed_point(x) if z is None else z).detach()
        B = z.shape[0]
        zs = z.shape[1:]
        zf = z.reshape(B, -1)
        n = zf.shape[1]
        Aj, Bp, _ = _jacobians(self.cell, z, x, with_x=False)
        Bm = Bp.reshape(B * n, -1)
        A = torch.block_diag(*Aj.unbind(0))

        def objective(zflat):
            return loss(head(zflat.reshape(B, *zs)), y)

        a = torch.func.grad(objective)(zf.reshape(-1).clone())
        if divergence == "euclidean":                    # R = r I
            Q, r = zf.new_zeros(B * n, B * n), 1.0 + damping
        else:
            Jh = torch.func.vmap(torch.func.jacrev(lambda zi: head(zi.reshape(1, *zs))
                                                   .reshape(-1)))(zf)      # (B, C, n)
            with torch.no_grad():
                prob = torch.softmax(head(z).reshape(B, -1), -1)
            W = torch.diag_embed(prob) - prob.unsqueeze(-1) * prob.unsqueeze(-2)
            Q = torch.block_diag(*(Jh.transpose(-1, -2) @ W @ Jh).unbind(0)) / B
            r = damping
        Q, a = Q.detach(), a.detach()
        Lr, G = surrogate_control(Bm, r)
        N = B * n
        eyeN = torch.eye(N, dtype=zf.dtype, device=zf.device)
        sol = solve_infinite_lqr(A, Lr, 0.5 * (Q + Q.T), eyeN, q=a)
        # steady state (Eq. 4.1.12) in the surrogate, then the parameters by push-through
        zt = torch.linalg.solve(eyeN - A - Lr @ sol.K, Lr @ sol.k)
        u = push_through_control(Bm, r, sol.P, G, sol.P @ A @ zt + sol.p)
        return _unflatten(u, self.cell)

    def cyclic_lqr_gradient(self, x: torch.Tensor, a: torch.Tensor):
        """The gradient of the previous method through the cyclic LQR of thesis Sec. 4.3
        (Eq. 4.3.1-4.3.4, :func:`trajopt.solve_cyclic_lqr`), one phase per layer of a
        :class:`DEQBlock` cell: phase n has the state h_n (h_0 = z*), ``A_n`` and ``B_n =
        [d layer_n / d theta_n | d layer_n / d x]``; the linear cost ``a`` sits on phase
        0 (the state z).  Returns ``(dL/dx, [dL/dtheta])`` like :meth:`lqr_gradient`."""
        from trajopt import solve_cyclic_lqr
        if not isinstance(self.cell, DEQBlock):
            raise InvalidArgumentError("cyclic_lqr_gradient needs a DEQBlock cell")
        z = self.fixed_point(x).detach()
        B = z.shape[0]
        xd = x.detach()
        hs = [z]
        with torch.no_grad():
            for layer in self.cell.layers:
                hs.append(layer(hs[-1], xd))
        As, Bs, mps = [], [], []
        for layer, h in zip(self.cell.layers, hs[:-1]):
            Ja, Bp, Bx = _jacobians(layer, h, xd)
            As.append(Ja)
            Bs.append(torch.cat([Bp, Bx], -1))
            mps.append(Bp.shape[-1])
        dtype = z.dtype
        Qs = [z.new_zeros(B, A.shape[-1], A.shape[-1]) for A in As]
        Rs = [torch.eye(b.shape[-1], dtype=dtype).expand(B, b.shape[-1], b.shape[-1])
              for b in Bs]
        qs = [a.reshape(B, -1).to(dtype)] + [z.new_zeros(B, A.shape[-1]) for A in As[1:]]
        sol = solve_cyclic_lqr(As, Bs, Qs, Rs, qs=qs)
        gx = torch.zeros_like(xd)
        grads = []
        for layer, mp, k in zip(self.cell.layers, mps, sol.k):
            grads += _unflatten(-k[:, :mp].sum(0), layer)
            gx = gx - k[:, mp:].reshape(x.shape)
        return gx, grads


def _jacobians(module: nn.Module, h: torch.Tensor, x: torch.Tensor, with_x: bool = True):
    """Per-sample Jacobians of ``module(h, x)`` at the batch: ``A`` (B, n1, n) with
    respect to h, ``Bp`` (B, n1, m) with respect to the module's parameters (flattened
    in ``parameters()`` order) and ``Bx`` (B, n1, d) with respect to x (None unless
    ``with_x``)."""
    B = h.shape[0]
    names = [n for n, _ in module.named_parameters()]
    params = {n: p.detach() for n, p in module.named_parameters()}
    hshape = h.shape[1:]

    def f(hi, xi, p):
        return torch.func.functional_call(module, p, (hi.reshape(1, *hshape),
                                                      xi[None])).reshape(-1)

    argnums = (0, 2, 1) if with_x else (0, 2)
    J = torch.func.vmap(torch.func.jacrev(f, argnums=argnums), in_dims=(0, 0, None))(
        h.detach().reshape(B, -1), x.detach(), params)
    n1 = J[0].shape[1]
    Bp = torch.cat([J[1][k].reshape(B, n1, -1) for k in names], -1)
    return J[0], Bp, (J[2].reshape(B, n1, -1) if with_x else None)


def _unflatten(flat: torch.Tensor, module: nn.Module) -> list[torch.Tensor]:
    """Split a flat (m,) vector into tensors shaped like ``module.parameters()``."""
    out, off = [], 0
    for p in module.parameters():
        out.append(flat[off:off + p.numel()].reshape(p.shape))
        off += p.numel()
    return out


def _implicit_gradient(A: torch.Tensor, Bm: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r""":math:`B^\top (I - A^\top)^{-1} q` per sample, (b, m), for A (b, n, n), Bm (b, n,
    m), q (b, n): the implicit-function gradient of a fixed point z = f(z, .) with
    A = df/dz; ``NumericalError`` where 1 is an eigenvalue of A (no implicit gradient)."""
    n = A.shape[-1]
    M = torch.eye(n, dtype=A.dtype, device=A.device) - A.transpose(-1, -2)
    w, info = torch.linalg.solve_ex(M, q.unsqueeze(-1))
    if bool((info != 0).any()) or not bool(torch.isfinite(w).all()):
        raise NumericalError(
            "DEQ: I - df/dz is singular at the fixed point (df/dz has the eigenvalue 1): "
            "the fixed point is not isolated and has no implicit gradient")
    return (Bm.transpose(-1, -2) @ w).squeeze(-1)


class _LQRGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, deq, z, x, *params):
        ctx.deq = deq
        ctx.save_for_backward(z, x)
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        z, x = ctx.saved_tensors
        gx, gp = ctx.deq.lqr_gradient(z, x, grad)
        return (None, None, gx if ctx.needs_input_grad[2] else None, *gp)
