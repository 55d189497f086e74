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
from trajopt.errors import ConvergenceWarning, InvalidArgumentError, NonFiniteError
from trajopt.riccati import push_through_control, surrogate_control

__all__ = ["DEQ", "DEQBlock", "SOLVERS"]

SOLVERS = ("anderson", "broyden", "picard")


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
        Called as ``cell(z, x)`` on batches; ``z`` has shape (B, *z_shape).
    z_shape : tuple of int, optional
        Per-sample shape of z (default: that of x).
    solver : {"anderson", "broyden", "picard"}
    tol : float
        Stop when ``max_b |f(z_b, x_b) - z_b| / (|f(z_b, x_b)| + 1e-12) <= tol``.
    max_iter : int
    memory : int
        History length of Anderson and Broyden.

    Attributes
    ----------
    stats : dict
        ``iterations`` and ``residual`` of the last forward solve.
    """

    def __init__(self, cell: nn.Module, z_shape: tuple[int, ...] | None = None, *,
                 solver: str = "anderson", tol: float = 1e-8, max_iter: int = 200,
                 memory: int = 6):
        super().__init__()
        if solver not in SOLVERS:
            raise InvalidArgumentError(f"solver must be one of {', '.join(SOLVERS)}; got "
                                       f"{solver!r}")
        if not tol > 0 or int(max_iter) < 1 or int(memory) < 1:
            raise InvalidArgumentError(f"need tol > 0, max_iter >= 1, memory >= 1; got "
                                       f"{tol}, {max_iter}, {memory}")
        self.cell, self.z_shape = cell, z_shape
        self.solver, self.tol, self.max_iter, self.memory = solver, tol, int(max_iter), memory
        self.stats: dict = {}

    # ------------------------------------------------------------------ forward solve
    def _f(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        return self.cell(z.reshape(B, *self._zs), x).reshape(B, -1)

    def fixed_point(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`z^*` (B, *z_shape) without a graph."""
        self._zs = tuple(self.z_shape or x.shape[1:])
        B = x.shape[0]
        z = x.new_zeros(B, int(torch.tensor(self._zs).prod()) if self._zs else 1)
        with torch.no_grad():
            z, it, res = getattr(self, f"_{self.solver}")(z, x)
        # a NaN residual ends the iteration loops at once (NaN > tol is false): the
        # iterate may still be finite, so both are checked
        if not bool(torch.isfinite(z).all()) or not math.isfinite(res):
            raise NonFiniteError(f"DEQ: the {self.solver} iteration produced NaN/inf "
                                 f"(residual {res}; is the cell contractive?)")
        if res > self.tol:
            warnings.warn(f"DEQ: {self.solver} did not reach tol {self.tol} in {it} "
                          f"iterations (relative residual {res:.2e})", ConvergenceWarning,
                          stacklevel=3)
        self.stats = {"iterations": it, "residual": res}
        return z.reshape(B, *self._zs)

    def _residual(self, fz, z) -> float:
        return float(((fz - z).norm(dim=-1) / (fz.norm(dim=-1) + 1e-12)).max())

    def _picard(self, z, x):
        it, res = 0, float("inf")
        while res > self.tol and it < self.max_iter:
            fz = self._f(z, x)
            res = self._residual(fz, z)
            z = fz
            it += 1
        return z, it, res

    def _anderson(self, z, x, lam: float = 1e-8):
        """Anderson acceleration (type II, damping 1) with ``memory`` past iterates."""
        Z, G = [z], [self._f(z, x)]
        res = self._residual(G[0], z)
        z = G[0]
        it = 1
        while res > self.tol and it < self.max_iter:
            Z.append(z)
            G.append(self._f(z, x))
            res = self._residual(G[-1], z)
            it += 1
            Z, G = Z[-self.memory:], G[-self.memory:]
            Fm = torch.stack([g - zz for g, zz in zip(G, Z)], 1)         # (B, k, n)
            k = Fm.shape[1]
            H = Fm @ Fm.transpose(-1, -2)
            scale = H.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1)
            H = H + (lam * scale + 1e-300) * torch.eye(k, dtype=z.dtype, device=z.device)
            ones = torch.ones(z.shape[0], k, 1, dtype=z.dtype, device=z.device)
            w = torch.linalg.solve(H, ones)
            alpha = w / w.sum(1, keepdim=True)                           # sum to 1
            z = (alpha * torch.stack(G, 1)).sum(1)
        return z, it, res

    def _broyden(self, z, x):
        """Limited-memory 'good' Broyden on g(z) = f(z, x) - z (inverse-Jacobian
        updates), with a full step."""
        g = self._f(z, x) - z
        Us, Vs = [], []

        def apply_inv(v):                      # H v with H = -I + sum u v'
            out = -v
            for u, vv in zip(Us, Vs):
                out = out + u * (vv * v).sum(-1, keepdim=True)
            return out

        it, res = 1, self._residual(g + z, z)
        while res > self.tol and it < self.max_iter:
            dz = -apply_inv(g)
            z_new = z + dz
            g_new = self._f(z_new, x) - z_new
            dg = g_new - g
            Hdg = apply_inv(dg)
            # Sherman-Morrison: H += (dz - H dg) dz'H / (dz' H dg)
            vT = -dz
            for u, vv in zip(Us, Vs):
                vT = vT + vv * (u * dz).sum(-1, keepdim=True)
            denom = (vT * dg).sum(-1, keepdim=True)
            denom = torch.where(denom.abs() < 1e-30, torch.full_like(denom, 1e-30), denom)
            Us.append((dz - Hdg) / denom)
            Vs.append(vT)
            Us, Vs = Us[-self.memory:], Vs[-self.memory:]
            z, g = z_new, g_new
            it += 1
            res = self._residual(g + z, z)
        return z, it, res

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
        sol = solve_infinite_lqr(A, Lr, zf.new_zeros(B, n, n), eye, q=q)
        # -k of the original LQR: B'(I + P G)^{-1} p (= B' lambda, P = 0 here)
        g = -push_through_control(Bm, 1.0, sol.P, G, sol.p)   # (B, m)
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
