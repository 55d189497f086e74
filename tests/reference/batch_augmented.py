"""Slow, literal DDP on the batch-augmented state (DDPNOpt's batch formulation; GT-DDP
Sec. 4.2, Fig. 1's "previous work"), with dense matrices.

The B samples of a batch are one state X = [x^1; ...; x^B]; each stage is a function of
the whole batch (so a layer that couples the samples, BatchNorm in training mode, is
differentiated as it is) and of one shared control u_t.  Everything is formed explicitly
from torch.autograd Jacobians of the batch functions the test writes by hand:

    A_t = dX_{t+1}/dX_t (B n1 x B n),  Bu_t = dX_{t+1}/du_t (B n1 x m_t),
    V_X = grad Phi(X_T),  V_XX = the Gauss-Newton matrix of Phi = mean_i CE(x_T^i, y^i),
    Q_u = Bu' V_X,  Q_uX = Bu' V_XX A,  Q_XX = A' V_XX A,
    k = -P^{-1} Q_u,  K = -P^{-1} Q_uX,
    V_X <- A' V_X - Q_uX' P^{-1} Q_u,  V_XX <- Q_XX - Q_uX' P^{-1} Q_uX   (Q_uu := P),

then the forward pass du_t = k_t + K_t (Xhat_t - X_t) through the nonlinear stages.  No
code is shared with the solvers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _ggn_of_mean_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Block diagonal (B C x B C): (diag p_i - p_i p_i') / B."""
    B, C = logits.shape
    p = torch.softmax(logits, -1)
    H = torch.zeros(B * C, B * C, dtype=logits.dtype)
    for i in range(B):
        H[i * C:(i + 1) * C, i * C:(i + 1) * C] = (torch.diag(p[i]) - torch.outer(p[i], p[i])) / B
    return H


def batch_augmented_step(stages: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                         controls: Sequence[torch.Tensor], X0: torch.Tensor,
                         y: torch.Tensor, Pinv: Sequence[torch.Tensor] | None = None, *,
                         exact: tuple[float, float] | None = None) -> list[torch.Tensor]:
    """One DDP step on the batch-augmented state.

    Parameters
    ----------
    stages : list of callables
        ``f_t(X_flat, u_flat) -> X_next_flat`` on the whole batch, flattened sample after
        sample; the last one returns the logits (B C,).
    controls : list of Tensor
        Flat controls u_t.
    X0 : (B n0,)
    y : (B,) class labels
    Pinv : list of (m_t, m_t)
        The inverse curvature of each stage (a curvature model: Q_uu := P).
    exact : (lr, mu), optional
        Instead of ``Pinv``: vanilla DDP, P = (Q_uu + mu I) / lr with the exact
        Q_uu = Bu' V_XX Bu, and the value of that policy under the true Q_uu,
        V = Q_XX - Q_Xu S Q_uX with S = 2 P^{-1} - P^{-1} Q_uu P^{-1}.

    Returns
    -------
    list of Tensor
        The new flat controls.
    """
    T = len(stages)
    B = y.shape[0]
    X = [X0]
    for f, u in zip(stages, controls):
        X.append(f(X[-1], u))
    A, Bu = [], []
    for t in range(T):
        a, b = torch.autograd.functional.jacobian(stages[t], (X[t], controls[t]))
        A.append(a)
        Bu.append(b)
    logits = X[T].reshape(B, -1)

    def Phi(z):
        return torch.nn.functional.cross_entropy(z.reshape(B, -1), y)

    VX = torch.autograd.functional.jacobian(Phi, X[T])
    VXX = _ggn_of_mean_cross_entropy(logits)
    k, K = [None] * T, [None] * T
    for t in range(T - 1, -1, -1):
        Qu = Bu[t].T @ VX
        QuX = Bu[t].T @ VXX @ A[t]
        QXX = A[t].T @ VXX @ A[t]
        if exact is None:
            Pi = S = Pinv[t]
        else:
            lr, mu = exact
            Quu = Bu[t].T @ VXX @ Bu[t]
            Pi = torch.linalg.inv((Quu + mu * torch.eye(Quu.shape[0], dtype=Quu.dtype)) / lr)
            S = 2 * Pi - Pi @ Quu @ Pi
        k[t] = -Pi @ Qu
        K[t] = -Pi @ QuX
        VX = A[t].T @ VX - QuX.T @ S @ Qu
        VXX = QXX - QuX.T @ S @ QuX
        VXX = 0.5 * (VXX + VXX.T)
    new = []
    Xhat = X0
    for t in range(T):
        u = controls[t] + k[t] + K[t] @ (Xhat - X[t])
        new.append(u)
        Xhat = stages[t](Xhat, u)
    return new
