"""Plain dense references for GT-DDP-EKFAC (Theorem 3, Corollary 7 of the GT-DDP paper).

Everything is an explicit matrix over vec of the augmented control W~ (sum out, sum in'),
vec column-major: index i * sum_out + o, so that kron(A, B) vec(X) = vec(B X A') (Eq. 45)
and kron(A, B) is the Kronecker model of Eq. 44 / 50 with A the input factor.  Loops over
samples and positions; shares no code with nnbridge.
"""

from __future__ import annotations

import torch


def vec(X):
    """Column-major vec of (out, in)."""
    return X.T.reshape(-1)


def unvec(v, out, n_in):
    return v.reshape(n_in, out).T


def offsets(sizes):
    out, o = [], 0
    for s in sizes:
        out.append(list(range(o, o + s)))
        o += s
    return out


def block_index(outs, ins, j):
    """vec indices of the real block (j, j) of W~ (in vec order of that block)."""
    rows, cols = offsets(outs)[j], offsets(ins)[j]
    So = sum(outs)
    return torch.tensor([i * So + o for i in cols for o in rows])


def blockdiag(Ms):
    outs = [M.shape[0] for M in Ms]
    ins = [M.shape[1] for M in Ms]
    W = torch.zeros(sum(outs), sum(ins), dtype=Ms[0].dtype)
    r = c = 0
    for M in Ms:
        W[r:r + M.shape[0], c:c + M.shape[1]] = M
        r += M.shape[0]
        c += M.shape[1]
    return W


def dense_joint_solve(Aww, Bww, Ms, eps=0.0):
    """Per player the (j, j) block of (kron(Aww, Bww) + eps I)^{-1} vec(blockdiag(Ms))."""
    K = torch.kron(Aww, Bww)
    K = K + eps * torch.eye(K.shape[0], dtype=K.dtype)
    x = torch.linalg.solve(K, vec(blockdiag(Ms)))
    X = unvec(x, Bww.shape[0], Aww.shape[0])
    outs = offsets([M.shape[0] for M in Ms])
    ins = offsets([M.shape[1] for M in Ms])
    return [X[r][:, c] for r, c in zip(outs, ins)]


def joint_moments(ws, Xs):
    """A_ww = E[a a'] / P, B_ww = E[g g'] / P by loops over samples and positions;
    ws[j] (B, out_j, P), Xs[j] (B, in'_j, P)."""
    B, P = Xs[0].shape[0], Xs[0].shape[-1]
    n_in = sum(X.shape[1] for X in Xs)
    n_out = sum(w.shape[1] for w in ws)
    A = torch.zeros(n_in, n_in, dtype=Xs[0].dtype)
    G = torch.zeros(n_out, n_out, dtype=Xs[0].dtype)
    for b in range(B):
        for p in range(P):
            a = torch.cat([X[b, :, p] for X in Xs])
            g = torch.cat([w[b, :, p] for w in ws])
            A += torch.outer(a, a)
            G += torch.outer(g, g)
    return A / (B * P), G / (B * P)


def joint_gradient(ws, Xs, b):
    """Sample b's joint gradient blockdiag(sum_p w_j x_j') (sum out, sum in')."""
    return blockdiag([sum(torch.outer(w[b, :, p], X[b, :, p]) for p in range(X.shape[-1]))
                      for w, X in zip(ws, Xs)])


class CooperativeEKFACReference:
    """EKFAC on the augmented layer, with explicit kron(QA, QG) (sum out sum in')^2."""

    def __init__(self, lr, eps, alpha, update_freq):
        self.lr, self.eps, self.alpha, self.uf = lr, eps, alpha, update_freq
        self.st = {}

    def update(self, step, ws, Xs):
        st, al = self.st, self.alpha
        A, G = joint_moments(ws, Xs)
        st["A"] = A if "A" not in st else al * st["A"] + (1 - al) * A
        st["G"] = G if "G" not in st else al * st["G"] + (1 - al) * G
        fresh = (step - 1) % self.uf == 0
        if fresh:
            st["QA"] = torch.linalg.eigh(st["A"])[1]
            st["QG"] = torch.linalg.eigh(st["G"])[1]
        Q = torch.kron(st["QA"], st["QG"])
        B = Xs[0].shape[0]
        s = sum((Q.T @ vec(joint_gradient(ws, Xs, b))) ** 2 for b in range(B)) / B
        st["s"] = s if fresh else al * st["s"] + (1 - al) * s
        st["S"] = unvec(st["s"], st["QG"].shape[0], st["QA"].shape[0])

    def matrix(self):
        """P^{-1} over vec(W~) (fictitious blocks included)."""
        Q = torch.kron(self.st["QA"], self.st["QG"])
        return self.lr * Q @ torch.diag(1.0 / (self.st["s"] + self.eps)) @ Q.T

    def inverse(self, Ms):
        x = self.matrix() @ vec(blockdiag(Ms))
        X = unvec(x, self.st["QG"].shape[0], self.st["QA"].shape[0])
        outs = offsets([M.shape[0] for M in Ms])
        ins = offsets([M.shape[1] for M in Ms])
        return [X[r][:, c] for r, c in zip(outs, ins)]
