"""GT-DDP's Fig. 4: how block-diagonal is the batch-augmented value Hessian?

    python experiments/gtddp_fig4.py [--out docs] [--steps 300] [--smoke]

GT-DDP (Sec. 4.2) drops the cross-sample blocks :math:`V_{x^{(i)} x^{(j)}}` of the value
Hessian of the batch-augmented state, "from an empirical observation (see Fig. 4) that
[it] contains only nontrivial values along the diagonal blocks, even when networks
contain Batch Normalization".  We measure it: a residual MLP on digits (64 -> 32, two
blocks ``x + L2(relu(BN(L1 x)))``, head 10; the same without BatchNorm) is trained by
GT-DDP with SGD's curvature (lr 0.1, batch 32, its default "outer" value); at a few
points of training one more step on a batch of B = 4 is taken with
``value_hessian="joint"`` (the exact dynamic program of the batch, :mod:`trajopt.riccati.
joint`; parameters restored afterwards) and its value Hessians are recorded at every
stage.  Reported: the share of the Frobenius norm off the diagonal blocks,
:math:`\\|V - \\mathrm{blockdiag}(V)\\|_F / \\|V\\|_F`, per stage, and a heat map of
:math:`|V|` at the first residual block (as Fig. 4).  Writes ``experiments_fig4.md`` /
``.json`` and ``img/gtddp_fig4.png``.  ``--smoke``: 2 training steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import nnbridge  # noqa: E402
from nnbridge import data  # noqa: E402


class ResidualMLP(nn.Module):
    def __init__(self, batchnorm: bool, width: int = 32, blocks: int = 2):
        super().__init__()
        self.stem = nn.Linear(64, width)
        norm = (lambda: nn.BatchNorm1d(width)) if batchnorm else nn.Identity
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), norm(), nn.ReLU(),
                                                  nn.Linear(width, width))
                                    for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = torch.relu(x + b(x))
        return self.head(x)


class _Recording(nnbridge.GTDDP):
    """GTDDP that keeps the value of every backward step (the joint form's, here)."""

    def _riccati_step(self, *args, **kwargs):
        step = super()._riccati_step(*args, **kwargs)
        if step.value is not None:
            self.recorded.append(step.value.Vxx[0].detach().clone())
        return step


def off_block_share(V: torch.Tensor, B: int) -> float:
    """:math:`\\|V - \\mathrm{blockdiag}(V)\\|_F / \\|V\\|_F` for V (B n, B n)."""
    n = V.shape[0] // B
    W = V.reshape(B, n, B, n).clone()
    total = float(W.norm())
    idx = torch.arange(B)
    W[idx, :, idx, :] = 0
    return float(W.norm()) / total if total > 0 else 0.0


def _one_step(model: nn.Module, X, y, cls=nnbridge.GTDDP, **kw):
    """(parameter change, optimizer) of one step on a copy of ``model``."""
    m = copy.deepcopy(model)
    opt = cls(m, lr=0.1, curvature="identity", **kw)
    opt.recorded = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(X), y)
        loss.backward()
        return loss

    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt.step(closure)
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]) - before, opt


def joint_values(model: nn.Module, X: torch.Tensor, y: torch.Tensor
                 ) -> tuple[list[torch.Tensor], float]:
    r"""The joint value Hessians of one step on (X, y), last stage first, and the error
    of the block-diagonal ("full") step's feedback relative to the joint one's,
    :math:`\|\delta_{full} - \delta_{joint}\| / \|\delta_{joint} - \delta_{open}\|`
    (``feedback=False`` is the open-loop step); the model is left as it was."""
    d_joint, opt = _one_step(model, X, y, _Recording, value_hessian="joint")
    d_full, _ = _one_step(model, X, y, value_hessian="full")
    d_open, _ = _one_step(model, X, y, feedback=False)
    err = float((d_full - d_joint).norm() / (d_joint - d_open).norm())
    return opt.recorded, err


def run(steps: int, seed: int = 0) -> dict:
    ds = data.load("digits", "train")
    Xtr, ytr = ds.X_train, ds.y_train
    g = torch.Generator().manual_seed(seed)
    probe = torch.randperm(len(Xtr), generator=g)[:4]
    checkpoints = sorted({0, steps // 4, steps})
    out = {}
    for bn in (True, False):
        torch.manual_seed(seed)
        model = ResidualMLP(bn)
        opt = nnbridge.GTDDP(model, lr=0.1, curvature="identity")
        rows, maps = [], {}
        for k in range(steps + 1):
            if k in checkpoints:
                model.train()
                Vs, err = joint_values(model, Xtr[probe], ytr[probe])
                rows.append({"step": k, "shares": [off_block_share(V, 4) for V in Vs],
                             "sizes": [V.shape[0] // 4 for V in Vs],
                             "feedback_error": err})
                maps[k] = Vs[-2] if len(Vs) > 1 else Vs[-1]
            if k == steps:
                break
            idx = torch.randint(0, len(Xtr), (32,), generator=g)

            def closure(idx=idx, opt=opt, model=model):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
                loss.backward()
                return loss
            opt.step(closure)
        out["bn" if bn else "no_bn"] = {"rows": rows, "maps": maps}
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [(name, k) for name in ("bn", "no_bn") for k in sorted(res[name]["maps"])]
    fig, axes = plt.subplots(2, len(keys) // 2, figsize=(3.2 * len(keys) // 2, 6.4))
    for ax, (name, k) in zip(axes.flat, keys):
        V = res[name]["maps"][k].abs()
        ax.imshow((V / V.max()).numpy() ** 0.5, cmap="gray")
        n = V.shape[0] // 4
        for b in range(1, 4):
            ax.axhline(b * n - 0.5, color="tab:red", lw=0.5)
            ax.axvline(b * n - 0.5, color="tab:red", lw=0.5)
        ax.set_title(f"{'BatchNorm' if name == 'bn' else 'no BatchNorm'}, step {k}",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("|V_xx| of the batch-augmented state (B = 4), first residual block "
                 "(sqrt scale)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(res: dict, steps: int) -> str:
    lines = ["# GT-DDP Fig. 4: the cross-sample blocks of the batch-augmented value Hessian",
             "", "Regenerated by `python experiments/gtddp_fig4.py` (module docstring: the "
             "protocol). Share of the Frobenius norm of the joint value Hessian "
             "(B = 4) off its diagonal blocks, per stage (the network's input side "
             "first; stage size n per sample in brackets), and the error of the "
             "block-diagonal value's step: ||step(full) - step(joint)|| / ||step(joint) - "
             "step(feedback=False)||, i.e. how much of the exact feedback the "
             "block-diagonal approximation gets wrong:", ""]
    for name, title in (("bn", "with BatchNorm"), ("no_bn", "without BatchNorm")):
        rows = res[name]["rows"]
        sizes = rows[0]["sizes"][::-1]
        lines += [f"## {title}", "",
                  "| training step | " + " | ".join(f"stage {t + 1} (n={s})"
                                                   for t, s in enumerate(sizes))
                  + " | feedback error of the block-diagonal value |",
                  "|---:|" + "---:|" * (len(sizes) + 1)]
        for r in rows:
            lines.append(f"| {r['step']} | " + " | ".join(
                f"{v:.3g}" for v in r["shares"][::-1]) + f" | {r['feedback_error']:.3g} |")
        lines.append("")
    lines += ["![Fig. 4](img/gtddp_fig4.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--smoke", action="store_true", help="2 training steps")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps = 2 if a.smoke else a.steps
    res = run(steps)
    (a.out / "img").mkdir(parents=True, exist_ok=True)
    plot(res, a.out / "img" / "gtddp_fig4.png")
    (a.out / "experiments_fig4.json").write_text(json.dumps(
        {k: v["rows"] for k, v in res.items()}, indent=1))
    text = report(res, steps)
    (a.out / "experiments_fig4.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
