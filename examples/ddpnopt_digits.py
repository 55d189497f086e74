"""Train the paper's digits MLP with Adam and with DDPNOpt(adam), same learning rate, and
plot both training curves.

    python examples/ddpnopt_digits.py [--epochs 20] [--lr 0.005] [--out DIR] [--smoke]

The default rate, 5e-3, is the one both chose on the validation split
(``docs/experiments.md``) and DDPNOpt's default.

scikit-learn's digits (1797 8x8 images, no download), standardized, 70/30 split (seed 0);
MLP 64 -> 32 -> 32 -> 32 -> 32 -> 10 with tanh (App. A.3.1), batch 32, float32.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import nnbridge


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split
    X, y = sk_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=seed, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-8
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, width = [], 64
    for _ in range(4):
        layers += [nn.Linear(width, 32), nn.Tanh()]
        width = 32
    return nn.Sequential(*layers, nn.Linear(32, 10))


def train(kind: str, data, epochs: int, lr: float, seed: int = 0):
    Xtr, ytr, Xte, yte = data
    model = mlp(seed)
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if kind == "Adam"
           else nnbridge.DDPNOpt(model, lr=lr, curvature="adam"))
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(Xtr), generator=g).split(32):
            def closure(idx=idx):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
                loss.backward()
                return loss
            losses.append(float(opt.step(closure).detach()))
    with torch.no_grad():
        acc = float((model(Xte).argmax(-1) == yte).double().mean())
    return losses, acc, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=5e-3,
                    help="learning rate of both (default 5e-3, both optimizers' own)")
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    a = ap.parse_args(argv)
    epochs = 1 if a.smoke else a.epochs
    data = load_digits()
    curves = {}
    for kind in ("Adam", "DDPNOpt(adam)"):
        losses, acc, sec = train(kind, data, epochs, a.lr)
        curves[kind] = losses
        print(f"{kind:14s} test accuracy {100 * acc:.2f}%  final train loss "
              f"{sum(losses[-20:]) / len(losses[-20:]):.4f}  ({sec:.1f} s)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    a.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, losses in curves.items():
        k = 10
        smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1])
                  for i in range(len(losses))]
        ax.plot(smooth, label=kind)
    ax.set(xlabel="step", ylabel="training loss (running mean of 10)", yscale="log",
           title=f"digits MLP, lr = {a.lr}")
    ax.legend()
    fig.tight_layout()
    path = a.out / "ddpnopt_digits.png"
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
