"""Slow, literal DDP of an unrolled OCP whose controls are shared by several stages.

The network is written out by the test as a chain of per-sample stage functions
``x_{t+1} = f_t(x_t, theta)`` on flat states, each reading some named parameter vectors.
A parameter is *decided* at one stage (``decide[t]``: the names chosen there) and is from
then on part of the state: the augmented state of stage t is
``y_t = [x_t, theta_c for c carried into t]`` (carried: decided before t and read at t or
later).  A stage with decisions has the control ``u = [theta_d for d decided at t]`` and
``y_{t+1} = [f_t(x_t, theta), theta_c ...]``; a stage without decisions has no control.

One DDPNOpt step with the exact curvature (Alg. 3; vanilla DDP with a Gauss-Newton
expansion, per-sample values, one control shared by the samples):

* ``Q_u^i = F_u^i' v^i + lam u``, ``Q_uu = E_i F_u^i' V^i F_u^i + lam I``,
  ``Q_uy^i = F_u^i' V^i F_y^i``, ``P = (Q_uu + mu I) / lr``,
  ``S = 2 P^-1 - P^-1 Q_uu P^-1``;
* ``k = -P^-1 E_i Q_u^i``, ``K^i = -P^-1 Q_uy^i``;
* ``v^i <- F_y^i' v^i - Q_uy^i' S Q_u^i``, ``V^i <- F_y^i' V^i F_y^i - Q_uy^i' S Q_uy^i``
  (no decision: the same without the corrections);
* forward: ``delta u = k + E_i K^i delta y^i`` with ``delta y`` including the deviations of
  the carried parameters.

Every Jacobian is a dense ``torch.func.jacrev`` of one sample; the terminal value is the
gradient and Hessian of the per-sample loss.  Nothing is shared with nnbridge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch.func import grad, hessian, jacrev


def flat_control(layer) -> torch.Tensor:
    """A Linear layer's parameters as the flat control ``[W | b]`` (row-major), detached."""
    return torch.cat([layer.weight, layer.bias[:, None]], 1).reshape(-1).detach().clone()


def affine(theta: torch.Tensor, x: torch.Tensor, n_out: int) -> torch.Tensor:
    """``W x + b`` for the flat control ``theta = [W | b]`` of :func:`flat_control`, one
    sample."""
    M = theta.reshape(n_out, -1)
    return M[:, :-1] @ x + M[:, -1]


def cross_entropy(y: torch.Tensor):
    """``phi(x_T, i)``: the cross-entropy of sample i's logits against ``y[i]``."""
    def phi(xT, i):
        return F.cross_entropy(xT[None], y[i:i + 1])
    return phi


def unrolled_step(fs, uses, decide, params, x0, phi, *, lam=0.0, mu=0.0, lr=1.0,
                  recursion="per_sample"):
    """New parameter vectors (dict name -> flat tensor) after one step.

    fs : list of callables ``f_t(x, theta) -> x_next`` (one sample, flat; ``theta`` a dict)
    uses : list of lists of names read by each stage
    decide : dict stage -> list of names decided there (every name exactly once, at or
        before its first use)
    params : dict name -> flat tensor (the nominal parameters)
    x0 : (B, n0) inputs;  phi(x_T, i): the loss of sample i
    recursion : "per_sample" (the corrections above) or "mean" (the value of the applied
        batch-mean policy: ``E_j Q_u^j`` in place of ``Q_u^i`` and ``1/B`` on the Hessian
        correction)
    """
    T = len(fs)
    last = {k: max(t for t in range(T) if k in uses[t]) for k in params}
    when = {k: t for t, ks in decide.items() for k in ks}
    carried = [[k for k in params if when[k] < t <= last[k]] for t in range(T + 1)]

    def aug(t):
        """y_{t+1} = F_t(y_t, u) for one sample, flat."""
        dec = decide.get(t, [])

        def F(y, u):
            n_x = y.numel() - sum(params[k].numel() for k in carried[t])
            theta, off = {}, n_x
            for k in carried[t]:
                theta[k] = y[off:off + params[k].numel()]
                off += params[k].numel()
            off = 0
            for k in dec:
                theta[k] = u[off:off + params[k].numel()]
                off += params[k].numel()
            x1 = fs[t](y[:n_x], theta)
            return torch.cat([x1] + [theta[k] for k in carried[t + 1]])
        return F

    B = x0.shape[0]
    xs = [x0]
    with torch.no_grad():
        for t in range(T):
            xs.append(torch.stack([fs[t](xs[-1][i], params) for i in range(B)]))

    def y_of(t, x, theta):
        return torch.cat([x] + [theta[k] for k in carried[t]])

    ys = [[y_of(t, xs[t][i], params) for i in range(B)] for t in range(T + 1)]
    us = [torch.cat([params[k] for k in decide.get(t, [])]) if decide.get(t) else
          x0.new_zeros(0) for t in range(T)]
    v = [grad(phi)(xs[T][i], i) for i in range(B)]
    V = [hessian(phi)(xs[T][i], i) for i in range(B)]
    ks, Ks = [None] * T, [None] * T
    for t in range(T - 1, -1, -1):
        F = aug(t)
        Fy, Fu = zip(*[jacrev(F, argnums=(0, 1))(ys[t][i], us[t]) for i in range(B)])
        if us[t].numel() == 0:
            v = [Fy[i].T @ v[i] for i in range(B)]
            V = [Fy[i].T @ V[i] @ Fy[i] for i in range(B)]
            continue
        u = us[t]
        m = u.numel()
        eye = torch.eye(m, dtype=u.dtype)
        Qu = [Fu[i].T @ v[i] + lam * u for i in range(B)]
        Quu = sum(Fu[i].T @ V[i] @ Fu[i] for i in range(B)) / B + lam * eye
        Quy = [Fu[i].T @ V[i] @ Fy[i] for i in range(B)]
        Pinv = torch.linalg.inv((Quu + mu * eye) / lr)
        S = 2 * Pinv - Pinv @ Quu @ Pinv
        ks[t] = -Pinv @ (sum(Qu) / B)
        Ks[t] = [-Pinv @ Quy[i] for i in range(B)]
        g = [sum(Qu) / B] * B if recursion == "mean" else Qu
        w = 1.0 / B if recursion == "mean" else 1.0
        v = [Fy[i].T @ v[i] - Quy[i].T @ S @ g[i] for i in range(B)]
        V = [Fy[i].T @ V[i] @ Fy[i] - w * Quy[i].T @ S @ Quy[i] for i in range(B)]
    new = dict(params)
    xhat = [x0[i] for i in range(B)]
    with torch.no_grad():
        for t in range(T):
            dec = decide.get(t, [])
            if dec:
                dy = [y_of(t, xhat[i], new) - ys[t][i] for i in range(B)]
                du = ks[t] + sum(Ks[t][i] @ dy[i] for i in range(B)) / B
                off = 0
                for k in dec:
                    n = params[k].numel()
                    new[k] = params[k] + du[off:off + n]
                    off += n
            xhat = [fs[t](xhat[i], new) for i in range(B)]
    return new
