"""Residual spans written the plain way: the explicitly augmented state of GT-DDP Eq. 26.

z_t = [x_t, x_start of every span open at t (start < t <= end), in span order].  The
augmented dynamics copy the residuals, create a new one (= x_t) when a span starts at t
and add the shortcut when it ends at t.  Plain ``trajopt.DDPSolver`` on (F, cost) is then
the reference the span-aware solver must equal.
"""

from __future__ import annotations

import torch

from trajopt import Cost, Dynamics


def augmented_problem(dynamics, cost, spans, dims, mu_sizes):
    """``(F, C)``: augmented Dynamics and Cost.

    dims : state size n_t for t = 0..T; mu_sizes : size of the dynamics' control u_t
    (the rest of the stage's control are the shortcut parameters, in span order).
    """
    T = len(mu_sizes)
    open_ = [[s for s in spans if s.start < t <= s.end] for t in range(T + 1)]

    def split(z, t):
        n = dims[t]
        parts, off = {}, n
        for s in open_[t]:
            k = dims[s.start]
            parts[id(s)] = z[..., off:off + k]
            off += k
        return z[..., :n], parts

    def F(z, w, t):
        x, r = split(z, t)
        m = mu_sizes[t]
        xn = dynamics(x, w[..., :m], t)
        off = m
        for s in spans:
            if s.end != t:
                continue
            res = x if s.start == t else r[id(s)]
            if s.shortcut is None:
                xn = xn + res
            elif s.n_params:
                xn = xn + s.shortcut(res, w[..., off:off + s.n_params])
                off += s.n_params
            else:
                xn = xn + s.shortcut(res)
        out = [xn] + [x if s.start == t else r[id(s)] for s in open_[t + 1]]
        return torch.cat(out, -1)

    class AugCost(Cost):
        def running(self, z, w, t):
            return cost.running(split(z, t)[0], w, t)

        def terminal(self, z):
            return cost.terminal(z[..., :dims[T]])

    return Dynamics(F), AugCost()

