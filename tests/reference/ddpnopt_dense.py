"""Slow, literal DDPNOpt (Alg. 3 of the DDPNOpt paper) with dense per-sample matrices.

Every derivative is a dense Jacobian from torch.func on one sample at a time; Q_u^i,
Q_x^i, Q_ux^i, Q_xx^i, k^i, K^i, V_x^i, V_xx^i are formed explicitly as in Eq. 2-4, and the
curvature P (m x m) is built explicitly (Kronecker products written out for EKFAC).  Only
the forward evaluation of a layer (``stage.forward``) is shared with the code under test.
"""

from __future__ import annotations

import torch
from torch.func import grad, hessian, jacrev


def _layer_fn(stage, shape):
    def f(x, u):  # one sample, flat in and out
        return stage.forward(x.reshape(1, *shape), u.reshape(stage.control().shape)).reshape(-1)
    return f


def dense_curvature(kind, g, hp, *, X=None, w=None, Quu=None):
    """(P^{-1}, direction d, S) for the first step from a fresh state.

    g : (m,) mean Q_u (with weight decay); X (B, in') inputs; w (B, out) V_h per sample.
    """
    m = g.numel()
    lr = hp["lr"]
    eye = torch.eye(m, dtype=g.dtype)
    if kind == "identity":
        Pinv = lr * eye
        return Pinv, g, Pinv
    if kind == "rmsprop":
        v = (1 - hp["alpha"]) * g * g
        Pinv = torch.diag(lr / (v.sqrt() + hp["eps"]))
        return Pinv, g, Pinv
    if kind == "adam":
        b1, b2 = hp["betas"]
        mhat = (1 - b1) * g / (1 - b1)
        vhat = (1 - b2) * g * g / (1 - b2)
        Pinv = torch.diag(lr / (vhat.sqrt() + hp["eps"]))
        return Pinv, mhat, Pinv
    if kind == "ekfac":
        B = X.shape[0]
        A = X.T @ X / B
        G = w.T @ w / B
        QA = torch.linalg.eigh(A)[1]
        QG = torch.linalg.eigh(G)[1]
        Q = torch.kron(QG, QA)  # vec in row-major (out, in') order
        grads = torch.stack([torch.outer(w[i], X[i]).reshape(-1) for i in range(B)])
        s = ((grads @ Q) ** 2).mean(0)
        Pinv = Q @ torch.diag(lr / (s + hp["eps"])) @ Q.T
        return Pinv, g, Pinv
    if kind == "exact":
        P = (Quu + hp["regularization"] * eye) / lr
        Pinv = torch.linalg.inv(P)
        return Pinv, g, 2 * Pinv - Pinv @ Quu @ Pinv
    raise ValueError(kind)


def ddpnopt_step(stage_list, x0, phi, kind, hp, *, terminal="gn", tikhonov=0.0,
                 project_psd=False, recursion="per_sample", lu=None, gains=None,
                 cap_gain=False, open_loop_gains=None):
    r"""New controls (list of (out, in')) after one DDPNOpt step from a fresh state.

    ``phi(x_T, i)`` is the loss of sample i; ``terminal`` "gn" (V_xx = grad grad')
    or "hessian" (exact Hessian of phi); ``lu`` (optional, one (out, in') tensor per
    stage) the gradient of an extra running cost l(u) with zero Hessian, added to every
    sample's Q_u (as weight decay's lambda u is).  ``gains`` (a list) receives each
    stage's closed-loop gain past the first, :math:`\rho_t = F' P^{-1} F / \mathbb{E}_i
    [(f_x dx^i)' V'^i f_x dx^i]` with :math:`F = \mathbb{E}_i[Q_{ux}^i dx^i]` (0 where the
    denominator is not positive); ``cap_gain`` scales the feedback term by
    :math:`1/\max(1, \rho_t)` (EKFAC's rule).  ``open_loop_gains`` (a list) receives
    each stage's open-loop gain, last stage first, :math:`(P^{-1} d)^\top \mathbb{E}_i
    [f_u^{i\top} V'^i f_u^i] P^{-1} d / d^\top P^{-1} d` (d the curvature's direction;
    0 where the denominator is not positive).
    """
    T = len(stage_list)
    B = x0.shape[0]
    Us = [st.control().clone() for st in stage_list]
    shapes, xs = [], [x0]
    with torch.no_grad():
        for st, U in zip(stage_list, Us):
            shapes.append(tuple(xs[-1].shape[1:]))
            xs.append(st.forward(xs[-1], U))
    flat = [x.reshape(B, -1) for x in xs]
    Vx = [grad(phi)(flat[-1][i], i) for i in range(B)]
    if terminal == "gn":
        Vxx = [torch.outer(v, v) for v in Vx]
    else:
        Vxx = [hessian(phi)(flat[-1][i], i) for i in range(B)]
    wd = hp.get("weight_decay", 0.0)
    kbar, Ks = [None] * T, [None] * T
    Pinvs, Quxs, fxs, Vnext = [None] * T, [None] * T, [None] * T, [None] * T
    for t in range(T - 1, -1, -1):
        st = stage_list[t]
        f = _layer_fn(st, shapes[t])
        u = Us[t].reshape(-1)
        n1 = flat[t + 1].shape[1]
        eps = tikhonov if t < T - 1 else 0.0
        fx, fu, Qu, Qx, Qux, Qxx = [], [], [], [], [], []
        for i in range(B):
            jx, ju = jacrev(f, argnums=(0, 1))(flat[t][i], u)
            V2 = Vxx[i] + eps * torch.eye(n1, dtype=u.dtype)
            fx.append(jx)
            fu.append(ju)
            extra_lu = 0.0 if lu is None else lu[t].reshape(-1)
            Qu.append(wd * u + extra_lu + ju.T @ Vx[i])
            Qx.append(jx.T @ Vx[i])
            Qux.append(ju.T @ V2 @ jx)
            Qxx.append(jx.T @ V2 @ jx)
        g = torch.stack(Qu).mean(0)
        extra = {}
        if kind == "ekfac":
            X = stage_list[t].unfold(xs[t])[..., 0]
            # w^i = sigma_h' V_x^i: the part of Q_u^i = w x~' (Linear stages)
            out = Us[t].shape[0]
            extra["X"] = X
            extra["w"] = torch.stack([(Qu[i] - wd * u - extra_lu).reshape(out, -1)[:, -1]
                                      for i in range(B)]) if st.has_bias else None
        if kind == "exact":
            m = u.numel()
            Quu = wd * torch.eye(m, dtype=u.dtype)
            for i in range(B):
                V2 = Vxx[i] + eps * torch.eye(n1, dtype=u.dtype)
                Quu = Quu + fu[i].T @ V2 @ fu[i] / B
            extra["Quu"] = Quu
        Pinv, d, S = dense_curvature(kind, g, hp, **extra)
        if open_loop_gains is not None:
            k = Pinv @ d
            M = sum(fu[i].T @ (Vxx[i] + eps * torch.eye(n1, dtype=u.dtype)) @ fu[i]
                    for i in range(B)) / B
            den = float(d @ k)
            open_loop_gains.append(float(k @ M @ k) / den if den > 0 else 0.0)
        Pinvs[t], Quxs[t], fxs[t] = Pinv, Qux, fx
        Vnext[t] = [Vxx[i] + eps * torch.eye(n1, dtype=u.dtype) for i in range(B)]
        kbar[t] = -Pinv @ d
        Ks[t] = [-Pinv @ Qux[i] for i in range(B)]
        # "mean": the value of the applied batch-mean policy (E[Q_u], 1/B correction)
        wB = 1.0 / B if recursion == "mean" else 1.0
        for i in range(B):
            Vx[i] = Qx[i] - Qux[i].T @ S @ (g if recursion == "mean" else Qu[i])
            if project_psd:  # PSD part of V' - V' f_u S f_u' V', then f_x' . f_x
                V2 = Vxx[i] + eps * torch.eye(n1, dtype=u.dtype)
                W = V2 - wB * V2 @ fu[i] @ S @ fu[i].T @ V2
                lam, Q = torch.linalg.eigh(0.5 * (W + W.T))
                Vxx[i] = fx[i].T @ (Q @ torch.diag(lam.clamp(min=0)) @ Q.T) @ fx[i]
            else:
                Vxx[i] = Qxx[i] - wB * Qux[i].T @ S @ Qux[i]
            Vxx[i] = 0.5 * (Vxx[i] + Vxx[i].T)
    new, xhat = [], x0
    with torch.no_grad():
        for t, st in enumerate(stage_list):
            dx = (xhat - xs[t]).reshape(B, -1)
            fb = torch.stack([Ks[t][i] @ dx[i] for i in range(B)]).mean(0)
            if t > 0 and (gains is not None or cap_gain):
                F = torch.stack([Quxs[t][i] @ dx[i] for i in range(B)]).mean(0)
                q = torch.stack([(fxs[t][i] @ dx[i]) @ Vnext[t][i] @ (fxs[t][i] @ dx[i])
                                 for i in range(B)]).mean()
                rho = float(F @ Pinvs[t] @ F / q) if q > 0 else 0.0
                if gains is not None:
                    gains.append(rho)
                if cap_gain:
                    fb = fb / max(1.0, rho)
            du = kbar[t] + fb
            U = Us[t] + du.reshape(Us[t].shape)
            new.append(U)
            xhat = st.forward(xhat, U)
    return new
