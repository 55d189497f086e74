"""Gradient, Hessian and Fisher of a network's batch cross-entropy, formed explicitly over
all parameters flattened (torch.func on the whole network): the reference the LQR
steepest-descent directions are checked against, and the "explicit" peer of the
benchmark and the experiments."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)


def explicit_derivatives(model, x, y, *, hessian: bool = False):
    """``(g, F, H)`` for ``cross_entropy(model(x), y)``: the gradient (m,), the Fisher of
    the softmax output averaged over the batch, ``(1/B) sum_j J_j'(diag p_j - p_j p_j')
    J_j`` (m, m), and the Hessian (m, m) when ``hessian`` (else None); parameters in
    ``model.parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]
    th = torch.cat([p.reshape(-1) for p in params])

    def out(theta):
        ps = torch.split(theta, sizes)
        return torch.func.functional_call(
            model, {n: v.reshape(p.shape) for n, v, p in zip(names, ps, params)}, (x,))

    def loss(theta):
        return F.cross_entropy(out(theta), y)

    g = torch.func.grad(loss)(th)
    Jo = torch.func.jacrev(out)(th).reshape(x.shape[0], -1, th.numel())
    p = torch.softmax(out(th), -1)
    W = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    Fi = torch.einsum("bcm,bcd,bdk->mk", Jo, W, Jo) / x.shape[0]
    H = torch.func.hessian(loss)(th) if hessian else None
    return g, Fi, H


def natural_gradient(model, x, y, damping: float):
    """``(g, -(F + damping I)^{-1} g)``."""
    g, Fi, _ = explicit_derivatives(model, x, y)
    return g, -torch.linalg.solve(Fi + damping * torch.eye(len(g), dtype=g.dtype), g)
