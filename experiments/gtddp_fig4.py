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
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import ddpnopt_paper as paper  # noqa: E402

import nnbridge  # noqa: E402
from nnbridge import data  # noqa: E402

#: the block-diagonal forms whose step is compared with the joint one
ERRORS = ("blocks", "full", "outer")


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


class _BlockDiagonalJoint(nnbridge.GTDDP):
    r"""The joint recursion with its value cut to the diagonal blocks after every stage:
    the paper's block-diagonal approximation made exactly (each sample's block is the
    diagonal block of the joint recursion, :math:`\sum_k A_{ki}^\top W_k A_{ki}` where a
    layer couples the samples)."""

    def _riccati_step(self, *args, **kwargs):
        step = super()._riccati_step(*args, **kwargs)
        if step.value is None:
            return step
        V, B = step.value.Vxx[0], step.B
        n = V.shape[0] // B
        W = torch.zeros_like(V).reshape(B, n, B, n)
        idx = torch.arange(B)
        W[idx, :, idx, :] = V.reshape(B, n, B, n)[idx, :, idx, :]
        cut = dataclasses.replace(step.value, Vxx=W.reshape(1, B * n, B * n))
        return dataclasses.replace(step, step=dataclasses.replace(step.step, value=cut))


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


def joint_values(model: nn.Module, X: torch.Tensor, y: torch.Tensor, **kw
                 ) -> tuple[list[torch.Tensor], dict[str, float]]:
    r"""The joint value Hessians of one step on (X, y), last stage first, and the errors
    of the block-diagonal steps' feedback relative to the joint one's,
    :math:`\|\delta - \delta_{joint}\| / \|\delta_{joint} - \delta_{open}\|`
    (``feedback=False`` is the open-loop step) for the exact diagonal blocks
    (:class:`_BlockDiagonalJoint`), GTDDP's per-sample dense ("full") and factored
    ("outer", its default) values; the model is left as it was."""
    kw.setdefault("terminal_hessian", "ggn")   # the same terminal value in every form
    d_joint, opt = _one_step(model, X, y, _Recording, value_hessian="joint", **kw)
    d_open, _ = _one_step(model, X, y, feedback=False)
    errs = {}
    for name, cls, form in (("blocks", _BlockDiagonalJoint, "joint"),
                            ("full", nnbridge.GTDDP, "full"),
                            ("outer", nnbridge.GTDDP, "outer")):
        d, _ = _one_step(model, X, y, cls, value_hessian=form, **kw)
        errs[name] = float((d - d_joint).norm() / (d_joint - d_open).norm())
    return opt.recorded, errs


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
                Vs, errs = joint_values(model, Xtr[probe], ytr[probe])
                rows.append({"step": k, "shares": [off_block_share(V, 4) for V in Vs],
                             "sizes": [V.shape[0] // 4 for V in Vs],
                             "feedback_errors": errs})
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


def resnet_probe(B: int, seed: int = 0) -> dict:
    """The same measurement on the digits ResNet (``nnbridge.models.resnet``: convolutions,
    BatchNorm2d, identity and projection shortcuts), untrained, one batch of B; with
    ``value_psd=False`` in both forms (projecting the (B n)^2 joint matrices costs
    minutes)."""
    import warnings

    from nnbridge.models import resnet
    ds = data.load("digits", "train")
    torch.manual_seed(seed)
    model = resnet((1, 8, 8), 10)
    X, y = ds.X_train[:B].reshape(-1, 1, 8, 8), ds.y_train[:B]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GTDDP: the parameters", UserWarning)
        Vs, errs = joint_values(model, X, y, value_psd=False)
    return {"batch": B, "shares": [off_block_share(V, B) for V in Vs],
            "sizes": [V.shape[0] // B for V in Vs], "feedback_errors": errs}


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [(name, k) for name in ("bn", "no_bn") for k in sorted(res[name]["maps"])]
    fig, axes = plt.subplots(2, len(keys) // 2, figsize=(3.2 * len(keys) // 2, 7.2))
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
    fig.tight_layout(rect=(0, 0, 1, 0.95), h_pad=2.0)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(res: dict, steps: int) -> str:
    lines = ["# GT-DDP Fig. 4: the cross-sample blocks of the batch-augmented value Hessian",
             "", "Regenerated by `python experiments/gtddp_fig4.py` (module docstring: the "
             "protocol). Share of the Frobenius norm of the joint value Hessian "
             "(B = 4) off its diagonal blocks, per stage (the network's input side "
             "first; stage size n per sample in brackets), and the error of a "
             "block-diagonal value's step, ||step - step(joint)|| / ||step(joint) - "
             "step(feedback=False)||: how much of the exact feedback it gets wrong. "
             "\"blocks\": the joint recursion cut to its diagonal blocks at every stage "
             "(the paper's approximation, made exactly); \"full\" / \"outer\": GTDDP's "
             "per-sample dense / factored values, which pull each sample's value back "
             "through the batch's vector-Jacobian product (equal to \"blocks\" where no "
             "layer couples the samples). Terminal Hessian: the exact GGN in every form.",
             ""]
    for name, title in (("bn", "with BatchNorm"), ("no_bn", "without BatchNorm")):
        rows = res[name]["rows"]
        sizes = rows[0]["sizes"][::-1]
        lines += [f"## {title}", "",
                  "| training step | " + " | ".join(f"stage {t + 1} (n={s})"
                                                   for t, s in enumerate(sizes))
                  + " | " + " | ".join(f"error: {e}" for e in ERRORS) + " |",
                  "|---:|" + "---:|" * (len(sizes) + len(ERRORS))]
        for r in rows:
            lines.append(f"| {r['step']} | " + " | ".join(
                f"{v:.3g}" for v in r["shares"][::-1]) + " | "
                + " | ".join(f"{r['feedback_errors'][e]:.3g}" for e in ERRORS) + " |")
        lines.append("")
    if "resnet" in res:
        r = res["resnet"]
        lines += [f"## The digits ResNet (BatchNorm2d), untrained, B = {r['batch']}", "",
                  "| " + " | ".join(f"stage {t + 1} (n={s})" for t, s in
                                    enumerate(r["sizes"][::-1]))
                  + " | " + " | ".join(f"error: {e}" for e in ERRORS) + " |",
                  "|" + "---:|" * (len(r["sizes"]) + len(ERRORS)),
                  "| " + " | ".join(f"{v:.3g}" for v in r["shares"][::-1]) + " | "
                  + " | ".join(f"{r['feedback_errors'][e]:.3g}" for e in ERRORS) + " |", ""]
    lines += ["![Fig. 4](img/gtddp_fig4.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--smoke", action="store_true", help="2 training steps, no ResNet")
    ap.add_argument("--resnet-batch", type=int, default=2,
                    help="batch of the ResNet probe (default 2: ~1 min; 4: ~4 min)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace experiments_fig4.md / .json in --out")
    a = ap.parse_args(argv)
    if paper.results_paths(a, "experiments_fig4") is None:  # never replaced silently
        return 2
    torch.set_num_threads(1)
    steps = 2 if a.smoke else a.steps
    res = run(steps)
    if not a.smoke:
        res["resnet"] = resnet_probe(a.resnet_batch)
    (a.out / "img").mkdir(parents=True, exist_ok=True)
    plot(res, a.out / "img" / "gtddp_fig4.png")
    (a.out / "experiments_fig4.json").write_text(json.dumps(
        {k: v["rows"] if "rows" in v else v for k, v in res.items()}, indent=1))
    text = report(res, steps)
    (a.out / "experiments_fig4.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
