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
(Thm 4.2.1).  Two paths (``DEQ(backward=)``): ``"dare"`` forms the dense per-sample
Jacobians and solves the DARE, which certifies P = 0 (small cells); ``"costate"`` solves
only the linear term's fixed point, matrix-free, with the forward pass's solver and one
vector-Jacobian product of the cell an iteration (what the LQR is where P = 0: any state
size, e.g. a convolutional cell); ``"auto"`` chooses by the dense Jacobians' size.
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

from .fixed_point import SOLVERS

__all__ = ["DEQ", "DEQBlock", "SOLVERS", "DEFAULT_TOL", "DENSE_LIMIT"]

#: the largest dense per-sample Jacobians (numbers, ``B n (n + m)``) for which
#: ``backward="auto"`` takes the DARE path (measured: docs/steepest.md, the DEQ's backward)
DENSE_LIMIT = 2 ** 22

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
    r"""Fixed point of ``cell(z, x)`` with the LQR backward pass (module docstring).

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
    backward : {"auto", "dare", "costate"}
        How the backward pass solves the LQR (module docstring).  ``"dare"``: the dense
        per-sample Jacobians (``B n (n + m)`` numbers, m the cell's parameters and x's
        size) and the DARE, which certifies ``P = 0``, with the implicit gradient by a
        direct solve where it does not hold.  ``"costate"``: at an attracting fixed point
        the LQR's ``P`` and gain are 0, and what is left is its linear term's fixed point
        :math:`\lambda = a + A^\top \lambda`, solved here with ``solver`` at ``tol``,
        one vector-Jacobian product of the cell an iteration: matrix-free, any state
        size (a convolutional cell).  ``"auto"`` (default): ``"dare"`` where the dense
        Jacobians have at most :data:`DENSE_LIMIT` numbers, else ``"costate"``.

    Attributes
    ----------
    stats : dict
        ``iterations`` and ``residual`` of the last forward solve; after a backward
        pass, ``backward`` (the path taken) and, for ``"costate"``,
        ``backward_iterations`` and ``backward_residual``.
    """

    def __init__(self, cell: nn.Module, z_shape: tuple[int, ...] | None = None, *,
                 solver: str = "anderson", tol: float | None = None, max_iter: int = 200,
                 memory: int = 6, backward: str = "auto"):
        super().__init__()
        if backward not in ("auto", "dare", "costate"):
            raise InvalidArgumentError(f"backward must be 'auto', 'dare' or 'costate'; got "
                                       f"{backward!r}")
        if solver not in SOLVERS:
            raise InvalidArgumentError(f"solver must be one of {', '.join(SOLVERS)}; got "
                                       f"{solver!r}")
        if (tol is not None and not tol > 0) or int(max_iter) < 1 or int(memory) < 1:
            raise InvalidArgumentError(f"need tol > 0, max_iter >= 1, memory >= 1; got "
                                       f"{tol}, {max_iter}, {memory}")
        self.cell, self.z_shape = cell, z_shape
        self.solver, self.tol, self.max_iter, self.memory = solver, tol, int(max_iter), memory
        self.backward = backward
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
            z, it, res = SOLVERS[self.solver](lambda w: self._f(w, x), z, tol,
                                              self.max_iter, self.memory)
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

    # ------------------------------------------------------------------ module
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fixed_point(x)
        if not torch.is_grad_enabled():
            return z
        params = [p for p in self.cell.parameters()]
        return _LQRGradient.apply(self, z, x, *params)

    def gradient(self, z: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
        """Gradients ``(dL/dx, [dL/dtheta])`` given the fixed point ``z`` and ``a =
        dL/dz``, by the path ``backward`` names (class docstring)."""
        how = self.backward
        if how == "auto":
            dense = z.shape[0] * z[0].numel() * (z[0].numel() + x[0].numel() + sum(
                p.numel() for p in self.cell.parameters()))
            how = "dare" if dense <= DENSE_LIMIT else "costate"
        self.stats["backward"] = how
        return (self.lqr_gradient if how == "dare" else self.costate_gradient)(z, x, a)

    def costate_gradient(self, z: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
        r"""Gradients ``(dL/dx, [dL/dtheta])`` from the LQR's linear-term fixed point
        :math:`\lambda = a + A^\top \lambda` (``backward="costate"``): ``solver`` at
        ``tol``, :math:`A^\top \lambda` by a vector-Jacobian product of the cell at
        (z, x), then :math:`B^\top \lambda` by one more.  Equal to :meth:`lqr_gradient`
        at an attracting fixed point (the LQR's ``P`` and gain are 0 there); elsewhere
        Anderson and Broyden still solve :math:`(I - A^\top) \lambda = a` where they
        converge, Picard does not.  No Jacobian is formed, so a fixed point that is not
        isolated (``I - A`` singular to the working precision), which the DARE path
        refuses, is not detected here: where that matters, use ``backward="dare"``."""
        B = z.shape[0]
        params = [p for p in self.cell.parameters() if p.requires_grad]
        buffers = [b.detach().clone() for b in self.cell.buffers()]
        try:
            with torch.enable_grad():
                zr = z.detach().reshape(B, -1).requires_grad_()
                xr = x.detach().requires_grad_(x.is_floating_point())
                self._zs = tuple(z.shape[1:])
                fz = self._f(zr, xr)
            q = a.reshape(B, -1).to(fz.dtype)

            def costate(lam):
                return q + torch.autograd.grad(fz, zr, lam, retain_graph=True)[0]
            tol = self._tol(q.dtype)
            lam, it, res = SOLVERS[self.solver](costate, torch.zeros_like(q), tol,
                                                self.max_iter, self.memory)
            if not bool(torch.isfinite(lam).all()) or not math.isfinite(res):
                raise NonFiniteError(
                    f"DEQ: the {self.solver} iteration of the costate produced NaN/inf "
                    f"(residual {res}; is the fixed point attracting?)")
            if res > tol:
                warnings.warn(f"DEQ: the costate's {self.solver} iteration did not reach "
                              f"tol {tol} in {it} iterations (relative residual {res:.2e})",
                              ConvergenceWarning, stacklevel=3)
            self.stats.update(backward_iterations=it, backward_residual=res)
            wrt = ([xr] if xr.requires_grad else []) + params
            got = list(torch.autograd.grad(fz, wrt, lam, allow_unused=True)) if wrt else []
        finally:   # the cell's call leaves it as it was (BatchNorm's running statistics)
            with torch.no_grad():
                for b, v in zip(self.cell.buffers(), buffers):
                    b.copy_(v)
        gx = got.pop(0) if xr.requires_grad else None
        # as the DARE path: zeros for a trainable parameter the cell's output does not use
        by_param = {id(p): torch.zeros_like(p) if g is None else g
                    for p, g in zip(params, got)}
        return (None if gx is None else gx.reshape(x.shape),
                [by_param.get(id(p)) for p in self.cell.parameters()])

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
            # that attracts very slowly: within 4 eps kappa |A| of it, float32 mostly),
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
        else:
            # -k of the original LQR: B'(I + P G)^{-1} p (= B' lambda, P = 0 here)
            g = -push_through_control(Bm, 1.0, sol.P, G, sol.p)   # (B, m)
            # P = 0 (no state cost) is the stabilizing solution exactly where the fixed
            # point attracts (every eigenvalue of df/dz inside the unit circle): only there
            # is the LQR's value the implicit gradient; elsewhere its P != 0 stabilizes
            # another problem, and the implicit gradient B' (I - A')^{-1} q is solved for
            # directly
            away = sol.P.abs().amax((-2, -1)) > 0
            if bool(away.any()):
                g = g.clone()
                g[away] = _implicit_gradient(A[away], Bm[away], q[away])
                warnings.warn(
                    f"DEQ: the fixed point of {int(away.sum())} of {B} samples is not "
                    f"attracting (df/dz has an eigenvalue of magnitude >= 1 there): their "
                    f"gradient is the implicit one by a direct solve of (I - df/dz)' w = "
                    f"dL/dz, not the infinite-horizon LQR (docs/steepest.md, the DEQ's "
                    f"backward)", UserWarning, stacklevel=3)
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
    A = df/dz; ``NumericalError`` where 1 is an eigenvalue of A to the working precision
    (``I - A`` of condition number above ``0.01 / eps``: no isolated fixed point, no
    implicit gradient; a solve there returns rounding noise)."""
    n = A.shape[-1]
    M = torch.eye(n, dtype=A.dtype, device=A.device) - A.transpose(-1, -2)
    w, info = torch.linalg.solve_ex(M, q.unsqueeze(-1))
    cond = torch.linalg.cond(M)
    limit = 0.01 / torch.finfo(A.dtype).eps
    if bool((info != 0).any()) or not bool(torch.isfinite(w).all()) or \
            not bool((cond <= limit).all()):
        raise NumericalError(
            f"DEQ: I - df/dz is singular at the fixed point to the working precision "
            f"(condition number {float(cond.max()):.3g} > 0.01 / eps = {limit:.3g}: df/dz "
            f"has the eigenvalue 1): the fixed point is not isolated and has no implicit "
            f"gradient")
    return (Bm.transpose(-1, -2) @ w).squeeze(-1)


class _LQRGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, deq, z, x, *params):
        ctx.deq = deq
        ctx.save_for_backward(z, x)
        return z.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):   # no graph of the gradient: a double backward is refused
        z, x = ctx.saved_tensors
        gx, gp = ctx.deq.gradient(z, x, grad)
        return (None, None, gx if ctx.needs_input_grad[2] else None, *gp)
