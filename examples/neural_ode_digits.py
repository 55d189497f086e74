"""A Neural-ODE classifier on digits, written the way people write one (a custom module,
a field with torchdiffeq's f(t, x) signature, a loop with a scheduler and gradient
clipping), trained by Adam and by GT-DDP(adam); both curves plotted.

    python examples/neural_ode_digits.py [--epochs 8] [--lr 0.005] [--out DIR] [--smoke]

The ODE block's layers are called at every Runge-Kutta stage of every step: GT-DDP
takes the block as one stage whose controls are shared by those calls (``docs/ode.md``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import nnbridge
from nnbridge import data as datasets


class Field(nn.Module):
    """dx/dt = W2 tanh(W1 [x; t] + b1) + b2."""

    def __init__(self, n: int, hidden: int):
        super().__init__()
        self.inner, self.outer = nn.Linear(n + 1, hidden), nn.Linear(hidden, n)

    def forward(self, t, x):
        return self.outer(torch.tanh(self.inner(torch.cat([x, t.expand(len(x), 1)], 1))))


class ODEClassifier(nn.Module):
    def __init__(self, n_in: int = 64, width: int = 32, n_out: int = 10):
        super().__init__()
        self.encode = nn.Linear(n_in, width)
        self.ode = nnbridge.ODEBlock(Field(width, width), t0=0.0, t1=1.0, steps=4,
                                     method="rk4")
        self.decode = nn.Linear(width, n_out)

    def forward(self, x):
        return self.decode(self.ode(torch.tanh(self.encode(x))))


def train(kind: str, data, epochs: int, lr: float, seed: int = 0):
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = ODEClassifier()
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if kind == "Adam"
           else nnbridge.GTDDP(model, lr=lr, curvature="adam"))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(Xtr), generator=g).split(32):
            opt.zero_grad()
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
    with torch.no_grad():
        acc = float((model(Xte).argmax(-1) == yte).double().mean())
    return losses, acc, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    a = ap.parse_args(argv)
    epochs = 1 if a.smoke else a.epochs
    ds = datasets.load("digits")       # fixed split, standardized (nnbridge.data)
    data = (ds.X_train, ds.y_train, ds.X_eval, ds.y_eval)
    if a.smoke:
        data = tuple(t[:96] for t in data)
    curves = {}
    for kind in ("Adam", "GT-DDP(adam)"):
        losses, acc, sec = train(kind, data, epochs, a.lr)
        curves[kind] = losses
        print(f"{kind:13s} test accuracy {100 * acc:.2f}%  final train loss "
              f"{sum(losses[-20:]) / len(losses[-20:]):.4f}  ({sec:.1f} s)")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, ls in curves.items():
        ax.plot(ls, label=kind, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (minibatch)")
    ax.set_title("Neural-ODE classifier on digits")
    ax.legend()
    fig.tight_layout()
    path = a.out / "neural_ode_digits.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
