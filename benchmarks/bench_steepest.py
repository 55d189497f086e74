"""Natural-gradient direction through the LQR (thesis Ch. 3) against autograd + an
explicitly formed Fisher, one run.

    python benchmarks/bench_steepest.py [--quick]

* model: MLP 16 -> w -> w -> 10 (tanh), batch 8, float64, CPU, damping 1e-3;
* "LQR": ``nnbridge.lqr_direction(divergence="kl")`` (batch-augmented dense A_i, B_i,
  Riccati recursion; per-layer solves of size m_i);
* "LQR + Neumann": the same with ``neumann_terms=8`` (no factorization);
* "explicit": the Jacobian of the outputs w.r.t. all parameters by torch.func, the Fisher
  F = J' W J / B (m x m), and ``torch.linalg.solve(F + damping I, g)``;
* time: median of 3 (1 warm-up); memory: peak RSS growth of a fresh process.

Second table: one ``LQRDescent`` direction (kl) on the digits MLP 64-32x4-10 (tanh,
float64) at growing batch sizes: the default path (the LQR in output space, size B x 10,
``solve="auto"``: conjugate gradients from B x 10 >= 2048) against the same system solved
directly (``solve="direct"``, Cholesky; skipped above batch 1024, where it needs
B^2 x 800 bytes) and the batch-augmented Riccati recursion (size B x 32 per stage;
skipped above batch 64, where it takes minutes); damping 1e-3 (LQRDescent's default) and
1e-5 (a harder system for CG).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from _child import run_child  # noqa: E402

import nnbridge  # noqa: E402
from tests.reference.fisher_dense import natural_gradient  # noqa: E402


def build(w: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(),
                          nn.Linear(w, 10)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    return model, x, y


def measure(fn, repeat):
    """``(first result, times of `repeat` calls after it, peak RSS growth in MB)``."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, times, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024


def digits_mlp(batch):
    from nnbridge.models import mlp
    torch.manual_seed(0)
    model = mlp(64, 10).double()          # the digits MLP, 64-32x4-10, tanh
    g = torch.Generator().manual_seed(1)
    return (model, torch.randn(batch, 64, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (batch,), generator=g))


def run_batch(cfg):
    """One direction on the digits MLP: "output" (``cfg["solve"]``) or "riccati"."""
    from nnbridge import stages
    from nnbridge.steepest import _direction
    torch.set_num_threads(cfg["threads"])
    model, x, y = digits_mlp(cfg["batch"])
    _, sts = stages(model)

    def fn():
        with torch.no_grad():
            xs = [x]
            for st in sts:
                xs.append(st.forward(xs[-1]))
        out = xs[-1]
        aN = torch.func.grad(lambda o: F.cross_entropy(o.reshape(out.shape), y))(
            out.reshape(-1))
        return _direction(model, sts, xs, aN, None, "kl", cfg.get("damping", 1e-3),
                          riccati=cfg["kind"] == "riccati", solve=cfg.get("solve", "auto"))
    ref, times, mem_mb = measure(fn, 2)
    flat = torch.cat([v.reshape(-1) for v in ref])
    return {"time": min(times), "mem_mb": mem_mb, "norm": float(flat.norm()),
            "direction": flat.tolist()}


def run_one(cfg):
    if "batch" in cfg:
        return run_batch(cfg)
    torch.set_num_threads(cfg["threads"])
    model, x, y = build(cfg["w"])
    if cfg["kind"] == "explicit":
        def fn():
            return natural_gradient(model, x, y, 1e-3)[1]
    else:
        terms = 8 if cfg["kind"] == "neumann" else None

        def fn():
            return nnbridge.lqr_direction(model, x, y, F.cross_entropy, divergence="kl",
                                          damping=1e-3, neumann_terms=terms)
    _, times, mem_mb = measure(fn, 3)
    m = sum(p.numel() for p in model.parameters())
    return {"time": statistics.median(times), "mem_mb": mem_mb, "m": m}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", metavar="PNG",
                    help="also draw the batch table (time against batch, log-log) to PNG")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(run_one(json.loads(a.child))))
        return
    widths = (8,) if a.quick else (8, 16, 32, 64)
    print(f"torch {torch.__version__}, {a.threads} threads, float64, batch 8, CPU\n")
    print("| width | parameters | explicit Fisher ms | LQR ms | ratio | LQR + Neumann ms "
          "| ratio | explicit MB | LQR MB | Neumann MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w in widths:
        r = {}
        for kind in ("explicit", "lqr", "neumann"):
            cfg = {"w": w, "kind": kind, "threads": a.threads}
            r[kind] = run_child(__file__, cfg)
        e = r["explicit"]["time"]
        print(f"| {w} | {r['lqr']['m']} | {1e3 * e:.1f} | {1e3 * r['lqr']['time']:.1f} | "
              f"{r['lqr']['time'] / e:.2f}x | {1e3 * r['neumann']['time']:.1f} | "
              f"{r['neumann']['time'] / e:.2f}x | {r['explicit']['mem_mb']:.1f} | "
              f"{r['lqr']['mem_mb']:.1f} | {r['neumann']['mem_mb']:.1f} |", flush=True)
    cases = [(8, 1e-3), (256, 1e-3)] if a.quick else \
        [(8, 1e-3), (32, 1e-3), (64, 1e-3), (128, 1e-3), (256, 1e-3), (1024, 1e-3),
         (4096, 1e-3), (256, 1e-5), (1024, 1e-5)]
    print(f"\nLQRDescent direction (kl), digits MLP 64-32x4-10, float64, {a.threads} threads\n")
    print("| batch | damping | default (auto) ms | MB | direct ms | MB | direct / auto "
          "| relative difference | batch-augmented Riccati ms | MB | Riccati / auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    times = []   # (batch, damping, auto, direct or None, riccati or None), seconds
    for b, damping in cases:
        cfg = {"batch": b, "kind": "output", "threads": a.threads, "damping": damping}
        o = run_child(__file__, cfg)
        d = r = None
        if b <= 1024:
            d = run_child(__file__, {**cfg, "solve": "direct"})
            x, y = (torch.tensor(r["direction"], dtype=torch.float64) for r in (o, d))
            dc = (f"{1e3 * d['time']:.1f} | {d['mem_mb']:.0f} | "
                  f"{d['time'] / o['time']:.1f}x | "
                  f"{float((x - y).norm() / y.norm()):.1e}")
        else:
            dc = "(skipped) | | | "
        if b <= (8 if a.quick else 64):
            r = run_child(__file__, {**cfg, "kind": "riccati"})
            rc = (f"{1e3 * r['time']:.0f} | {r['mem_mb']:.0f} | "
                  f"{r['time'] / o['time']:.0f}x")
        else:
            rc = "(skipped) | | "
        print(f"| {b} | {damping:g} | {1e3 * o['time']:.1f} | {o['mem_mb']:.0f} | {dc} | "
              f"{rc} |", flush=True)
        times.append((b, damping, o["time"], d and d["time"], r and r["time"]))
    if a.plot:
        plot_batches(times, a.plot, a.threads)


def plot_batches(times, path, threads):
    """Time of one LQRDescent direction against the batch, log-log: "auto" (CG from
    B x 10 >= 2048), the direct solve and the batch-augmented Riccati recursion, solid at
    damping 1e-3 and single markers at the other dampings."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for col, label, style in ((2, "default (solve=\"auto\")", "o-"),
                              (3, "direct (Cholesky, B x 10 system)", "s--"),
                              (4, "batch-augmented Riccati", "^:")):
        pts = [(t[0], t[col]) for t in times if t[1] == 1e-3 and t[col] is not None]
        if pts:
            line, = ax.plot(*zip(*pts), style, label=label)
            other = [(t[0], t[col]) for t in times if t[1] != 1e-3 and t[col] is not None]
            if other:
                ax.plot(*zip(*other), style[0], mfc="none", color=line.get_color(),
                        label=f"{label.split(' (')[0]}, damping 1e-5")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("seconds per direction")
    ax.set_title(f"LQRDescent (KL, damping 1e-3), digits MLP, float64, {threads} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nplot written to {path}")


if __name__ == "__main__":
    main()
