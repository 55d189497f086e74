"""Plain EKFAC (George et al. 2018) for Linear networks with explicit Kronecker matrices.

Per-sample gradients come from torch.func (vmap of grad over the samples), not from hooks;
the preconditioner is formed as an explicit (m x m) matrix from the eigenbases.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap


def ekfac_run(model, batches, loss_fn, *, lr, eps, alpha, update_freq, steps):
    """Train ``model`` (Linear layers with bias + activations, in place) for ``steps``
    batches; ``loss_fn(output_row, target)`` is the per-sample loss."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    state = [dict() for _ in linears]
    names = dict(model.named_parameters())
    for k in range(1, steps + 1):
        X, y = batches[k - 1]
        B = X.shape[0]
        params = {n: p.detach() for n, p in names.items()}

        def sample_loss(p, x, t):
            return loss_fn(functional_call(model, p, (x.unsqueeze(0),))[0], t)

        per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)
        mean = {n: g.mean(0) for n, g in per.items()}
        # layer inputs, by running the layers one at a time
        inputs, h = [], X
        with torch.no_grad():
            for mod in model:
                if isinstance(mod, torch.nn.Linear):
                    inputs.append(torch.cat([h, torch.ones(B, 1)], 1))
                h = mod(h)
        pnames = [n for n in names if n.endswith("weight")]
        for li, (lin, wname) in enumerate(zip(linears, pnames)):
            bname = wname[:-len("weight")] + "bias"
            Gi = torch.cat([per[wname], per[bname].unsqueeze(-1)], -1)   # (B, out, in')
            w = per[bname]                                                 # V_h per sample
            Xa = inputs[li]
            st = state[li]
            A = Xa.T @ Xa / B
            G = w.T @ w / B
            st["A"] = A if "A" not in st else alpha * st["A"] + (1 - alpha) * A
            st["G"] = G if "G" not in st else alpha * st["G"] + (1 - alpha) * G
            fresh = (k - 1) % update_freq == 0
            if fresh:
                st["QA"] = torch.linalg.eigh(st["A"])[1]
                st["QG"] = torch.linalg.eigh(st["G"])[1]
            Q = torch.kron(st["QG"], st["QA"])
            s = ((Gi.reshape(B, -1) @ Q) ** 2).mean(0)
            st["s"] = s if fresh else alpha * st["s"] + (1 - alpha) * s
            Pinv = Q @ torch.diag(1.0 / (st["s"] + eps)) @ Q.T
            g = torch.cat([mean[wname], mean[bname].unsqueeze(-1)], -1).reshape(-1)
            step = (lr * Pinv @ g).reshape(Gi.shape[1:])
            with torch.no_grad():
                lin.weight -= step[:, :-1]
                lin.bias -= step[:, -1]
