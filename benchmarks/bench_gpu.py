"""GPU columns: the batched cases on a CUDA device against the CPU, ratios in one run.

    python benchmarks/bench_gpu.py [--quick] [--json FILE] [--only abcdefg]

(a) DAREs n=10, m=3, batched doubling: 1,000 and 10,000 systems on the GPU against the
    same call on the CPU and a Python loop of scipy (the CPU peer);
(b) finite-horizon LQR T=1000, n=10, m=4 at batch 64 and 4,096 (torch in / out), the
    default (the values' scan where ``scan_pays``) and the recursion forced;
(c) one DDPNOpt step (adam curvature, feedback, default terminal Hessian) and one
    torch.optim.Adam step on the digits MLP (64-32x4-10) at batch 32 and 4,096;
(d) the network rows of the issue "Speed for the network optimizers" on the GPU: one
    DDPNOpt(adam) / Adam step on the 6 x 256 ReLU MLP at batch 128, and one GT-DDP step
    (sgd / adam / ekfac curvature, defaults) against its base (torch.optim SGD / Adam,
    ``GTDDP(curvature="ekfac", feedback=False)``) on the digits ResNet at batch 128 and
    1,024, each with its peak GPU memory: ``torch.cuda.max_memory_allocated`` above what
    model, data and optimizer hold before the first step;
(e) iLQR (``solve_ddp``, user-written pendulum dynamics, QuadraticCost, 30 iterations) on
    256 and 4,096 pendulums, T=100, GPU against CPU;
(f) the values' scan rule on the GPU (``MAX_WORK_CUDA`` of ``trajopt.riccati.scan``):
    ``solve_lqr`` without its rollout (``x0=None``) by the recursion and by the scan,
    each forced, T=100 n=8 m=3 and T=1000 n=10 m=4 over batches from 64 to 4,096 (the
    first row of each pair is the recursion, so the scan's ratio is scan / recursion);
(g) one LQRDescent (natural-gradient, "kl") direction on the digits MLP (64-32x4-10,
    float64, damping 1e-3) by batch: the default (``solve="auto"``: the direct solve or
    conjugate gradients on the output-space Gramian by the cost model of
    ``nnbridge.gramian``, whose constants differ by device) and the direct Cholesky solve on
    the GPU (up to batch 4,096: B^2 x 800 bytes), and "auto" on the CPU (up to 4,096);
    error: relative difference from the first row's direction.
Times are the best of a few runs after a warm-up, with ``torch.cuda.synchronize()``;
float64 for (a), (b), (e), float32 for (c), (d).  Residuals: relative DARE residual (max
over the batch), K difference GPU vs CPU for (b), control difference for (e).  Without
CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trajopt  # noqa: E402
import trajopt.riccati.scan as scan  # noqa: E402
from trajopt.dare._common import prepare, relative_residual  # noqa: E402


def best_time(fn, repeat=3, cuda=False):
    fn()
    if cuda:
        torch.cuda.synchronize()
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _residual(A, B, Q, R, X):
    d = prepare(*(torch.as_tensor(v).cpu() for v in (A, B, Q, R)), None, None)
    return float(relative_residual(d, torch.as_tensor(X).cpu()).max())


def rows_dare(count, rep, scipy_loop):
    rng = np.random.default_rng(0)
    n, m = 10, 3
    A = rng.normal(size=(count, n, n)) / np.sqrt(n)
    B = rng.normal(size=(count, n, m))
    Q, R = np.eye(n), np.eye(m)
    args_cpu = [torch.as_tensor(v) for v in (A, B, Q, R)]
    args_gpu = [v.cuda() for v in args_cpu]
    t_gpu, sg = best_time(lambda: trajopt.solve_dare(*args_gpu, method="doubling"), rep, True)
    t_cpu, sc = best_time(lambda: trajopt.solve_dare(*args_cpu, method="doubling"), rep)
    rows = [(f"(a) {count} DARE n=10 m=3", "trajopt doubling, GPU", t_gpu,
             _residual(A, B, Q, R, sg.P)),
            ("", "trajopt doubling, CPU", t_cpu, _residual(A, B, Q, R, sc.P))]
    if scipy_loop:
        t_sp, Xs = best_time(lambda: np.stack([scipy.linalg.solve_discrete_are(
            A[i], B[i], Q, R) for i in range(count)]), 1)
        rows.append(("", "scipy loop, CPU", t_sp, _residual(A, B, Q, R, Xs)))
    return rows


def _lqr(A, B, device):
    """A finite-horizon LQR with unit costs for stacked A (batch, T, n, n), B (batch, T,
    n, m), on ``device``."""
    batch, T, n, m = B.shape
    A, B = A.to(device), B.to(device)

    def eye(k):
        return torch.eye(k, dtype=A.dtype, device=A.device)
    return trajopt.LQR(A=A, B=B, Q=eye(n).expand(batch, T, n, n),
                       R=eye(m).expand(batch, T, m, m), QT=eye(n))


@contextlib.contextmanager
def _cuda_bound(bound):
    """The values scan's GPU bound set to ``bound`` (0: the recursion forced)."""
    old, scan.MAX_WORK_CUDA = scan.MAX_WORK_CUDA, bound
    try:
        yield
    finally:
        scan.MAX_WORK_CUDA = old


def rows_lqr(T, batch, rep):
    rng = np.random.default_rng(2)
    n, m = 10, 4
    A = torch.as_tensor(rng.normal(size=(batch, T, n, n)) / np.sqrt(n))
    B = torch.as_tensor(rng.normal(size=(batch, T, n, m)))
    x0 = torch.as_tensor(rng.normal(size=(batch, n)))
    cpu, gpu = _lqr(A, B, "cpu"), _lqr(A, B, "cuda")
    t_gpu, sg = best_time(lambda: trajopt.solve_lqr(gpu, x0.cuda()), rep, True)
    with _cuda_bound(0):  # the recursion, for comparison
        t_rec, sr = best_time(lambda: trajopt.solve_lqr(gpu, x0.cuda()), rep, True)
    t_cpu, sc = best_time(lambda: trajopt.solve_lqr(cpu, x0), rep)
    pick = "scan" if scan.scan_pays(T, batch, n + m, torch.device("cuda")) else "recursion"
    return [(f"(b) finite LQR T={T} n=10 m=4 batch {batch}",
             f"trajopt solve_lqr, GPU (default: {pick})", t_gpu,
             float((sg.K.cpu() - sc.K).abs().max())),
            ("", "trajopt solve_lqr, GPU, the recursion", t_rec,
             float((sr.K.cpu() - sc.K).abs().max())),
            ("", "trajopt solve_lqr, CPU", t_cpu, 0.0)]


def rows_rule(rep, quick):
    """(f): recursion and scan, each forced, by batch."""
    rows = []
    grid = [(100, 8, 3, b) for b in ((64, 1024) if quick else (64, 256, 512, 1024, 2048,
                                                                   4096))]
    if not quick:
        grid += [(1000, 10, 4, b) for b in (64, 256, 1024)]
    for T, n, m, batch in grid:
        g = torch.Generator().manual_seed(3)
        A = torch.randn(batch, T, n, n, generator=g, dtype=torch.float64) / n ** 0.5
        B = torch.randn(batch, T, n, m, generator=g, dtype=torch.float64)
        prob = _lqr(A, B, "cuda")
        times, Ks = [], []
        for forced in (0, 1 << 40):
            with _cuda_bound(forced):
                t, sol = best_time(lambda p=prob: trajopt.solve_lqr(p), rep, True)
            times.append(t)
            Ks.append(sol.K)
        work = batch * (n + m) ** 2
        diff = float((Ks[1] - Ks[0]).abs().max() / Ks[0].abs().max())
        pick = "scan" if scan.scan_pays(T, batch, n + m, torch.device("cuda")) else "recursion"
        rows.append((f"(f) values only, T={T} n={n} m={m} batch {batch} (work {work}, "
                     f"default {pick})", "recursion forced", times[0], 0.0))
        rows.append(("", "scan forced", times[1], diff))
    return rows


def rows_ddpnopt(batch, rep):
    import nnbridge
    from nnbridge.models import mlp

    def make(device):
        torch.manual_seed(0)
        return mlp(64, 10).to(device)       # the digits MLP, 64-32x4-10, tanh

    rows = []
    for device in ("cuda", "cpu"):
        g = torch.Generator().manual_seed(1)
        X = torch.randn(batch, 64, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        for name in ("DDPNOpt(adam)", "torch.optim.Adam"):
            model = make(device)
            opt = (nnbridge.DDPNOpt(model, lr=2e-3) if name.startswith("DDPNOpt")
                   else torch.optim.Adam(model.parameters(), lr=2e-3))
            t, _ = best_time(_closure_step(model, opt, X, y), rep, device == "cuda")
            label = f"(c) one step, digits MLP, batch {batch}" if not rows else ""
            rows.append((label, f"{name}, {device.upper() if device == 'cpu' else 'GPU'}",
                         t, float("nan")))
    return rows


def _peak_step(step, rep, device):
    """Best time of ``step`` and the peak GPU memory (MB) it allocates above what is held
    before its first call (nan on the CPU)."""
    if device != "cuda":
        return best_time(step, rep)[0], float("nan")
    gc.collect()        # what earlier rows left is freed before the base, not inside the peak
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t, _ = best_time(step, rep, True)
    return t, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _closure_step(model, opt, X, y):
    from torch import nn

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss
    return lambda: opt.step(closure)


def rows_networks(rep, quick, devices=("cuda",)):
    """(d): the 6 x 256 MLP (DDPNOpt(adam) vs Adam) and the digits ResNet (GT-DDP vs its
    base), time and peak memory, each configuration from the same seed."""
    import warnings

    from torch import nn

    import nnbridge
    from nnbridge.models import resnet

    def mlp256():
        layers = [nn.Linear(64, 256), nn.ReLU()]
        for _ in range(4):
            layers += [nn.Linear(256, 256), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(256, 10))

    configs = [("6 x 256 ReLU MLP, batch 128", mlp256, (64,), 128, [
        ("torch.optim.Adam", lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)),
        ("DDPNOpt(adam)", lambda m: nnbridge.DDPNOpt(m, lr=1e-3, curvature="adam"))])]
    base = [("torch.optim.SGD", lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
            ("GTDDP(sgd)", lambda m: nnbridge.GTDDP(m, lr=0.1, curvature="identity")),
            ("torch.optim.Adam", lambda m: torch.optim.Adam(m.parameters(), lr=2e-3)),
            ("GTDDP(adam)", lambda m: nnbridge.GTDDP(m, lr=2e-3, curvature="adam")),
            ("EKFAC (GTDDP feedback=False)", lambda m: nnbridge.GTDDP(
                m, lr=0.03, curvature="ekfac", feedback=False)),
            ("GTDDP(ekfac)", lambda m: nnbridge.GTDDP(m, lr=0.03, curvature="ekfac"))]
    for batch in ((128,) if quick else (128, 1024)):
        configs.append((f"digits ResNet, batch {batch}", lambda: resnet((1, 8, 8), 10),
                        (1, 8, 8), batch, base))
    for device in devices:      # cuBLAS / cuDNN handles and workspaces: before any peak
        w = torch.randn(8, 8, device=device, requires_grad=True)
        torch.nn.functional.conv2d((w @ w).view(1, 1, 8, 8), w[:3, :3].reshape(1, 1, 3, 3)
                                   ).sum().backward()
    rows = []
    for label, build, shape, batch, opts in configs:
        for device in devices:
            g = torch.Generator().manual_seed(1)
            X = torch.randn(batch, *shape, generator=g).to(device)
            y = torch.randint(0, 10, (batch,), generator=g).to(device)
            for k, (name, make) in enumerate(opts):
                torch.manual_seed(0)
                model = build().to(device)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "GTDDP: the parameters", UserWarning)
                    opt = make(model)
                t, mem = _peak_step(_closure_step(model, opt, X, y), rep, device)
                case = f"(d) one step, {label}" if not rows or k == 0 and device == \
                    devices[0] else ""
                where = "GPU" if device == "cuda" else "CPU"
                rows.append((case, f"{name}, {where}", t, float("nan"), mem))
    return rows


def rows_ilqr(batch, rep, devices=("cuda", "cpu")):
    """(e): iLQR on ``batch`` pendulums, T = 100, 30 iterations, GPU against CPU."""
    import math

    def f(x, u, t):
        th, dth = x[..., 0], x[..., 1]
        return torch.stack([th + 0.05 * dth,
                            dth + 0.05 * (u[..., 0] - 0.1 * dth - 9.81 * torch.sin(th))], -1)

    def solve(dev):
        dt = torch.float64
        eye = torch.eye(2, dtype=dt, device=dev)
        cost = trajopt.QuadraticCost(0.01 * eye, 0.1 * torch.eye(1, dtype=dt, device=dev),
                                     100 * eye, x_ref=torch.tensor([math.pi, 0.0], dtype=dt,
                                                                   device=dev))
        x0 = torch.zeros(batch, 2, dtype=dt, device=dev)
        x0[:, 0] = torch.linspace(-0.3, 0.3, batch, dtype=dt)
        return trajopt.solve_ddp(f, cost, x0, torch.zeros(batch, 100, 1, dtype=dt,
                                                          device=dev),
                                 max_iter=30, tol=1e-14)
    rows, us = [], {}
    for dev in devices:
        t, r = best_time(lambda dev=dev: solve(dev), rep, dev == "cuda")
        us[dev] = r.us.cpu()
        err = float((us[dev] - us[devices[0]]).abs().max())
        rows.append((f"(e) iLQR, {batch} pendulums T=100, 30 it" if not rows else "",
                     f"trajopt solve_ddp, {'GPU' if dev == 'cuda' else 'CPU'}", t, err,
                     float("nan")))
    return rows


def rows_lqr_descent(rep, quick, gpu="cuda"):
    """(g): the natural-gradient direction by batch, GPU ("auto", "direct") and CPU."""
    import nnbridge
    from nnbridge.models import mlp
    rows = []
    for batch in ((256, 1024) if quick else (256, 1024, 1536, 2048, 4096, 16384)):
        g = torch.Generator().manual_seed(1)
        X = torch.randn(batch, 64, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (batch,), generator=g)
        ref = None
        for dev, how in ((gpu, "auto"), (gpu, "direct"), ("cpu", "auto")):
            if batch > 4096 and (how == "direct" or dev == "cpu"):
                continue
            torch.manual_seed(0)
            model = mlp(64, 10).to(dev, torch.float64)
            Xd, yd = X.to(dev), y.to(dev)
            where = "GPU" if dev == gpu else "CPU"
            try:
                t, d = best_time(lambda m=model, Xd=Xd, yd=yd, how=how: nnbridge.lqr_direction(
                    m, Xd, yd, torch.nn.functional.cross_entropy, divergence="kl",
                    damping=1e-3, solve=how), rep if batch <= 1024 else 1, dev == "cuda")
            except torch.cuda.OutOfMemoryError:
                print(f"(g) batch {batch}, solve={how!r}, {where}: out of memory")
                continue
            flat = torch.cat([v.reshape(-1) for v in d]).cpu()
            ref = flat if ref is None else ref
            rows.append((f"(g) LQRDescent direction, digits MLP, batch {batch}"
                         if ref is flat else "",
                         f"solve={how!r}, {where}", t,
                         float((flat - ref).norm() / ref.norm())))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--only", default="abcdefg", help="the cases to run, e.g. 'd' (default "
                    "all: abcdefg)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured")
        return 0
    rep = 2 if a.quick else 5
    rows = []
    if "a" in a.only:
        rows += rows_dare(1000, rep, True)
        if not a.quick:
            rows += rows_dare(10_000, rep, False)
    if "b" in a.only:
        rows += rows_lqr(1000 if not a.quick else 100, 64, rep)
        if not a.quick:
            rows += rows_lqr(1000, 4096, 2)
    if "c" in a.only:
        for batch in ((32, 4096) if not a.quick else (32,)):
            rows += rows_ddpnopt(batch, rep)
    if "f" in a.only:
        rows += rows_rule(rep, a.quick)
    if "g" in a.only:
        rows += rows_lqr_descent(rep, a.quick)
    rows = [r + (float("nan"),) for r in rows]
    if "d" in a.only:
        rows += rows_networks(rep, a.quick)
    if "e" in a.only:
        for batch in ((256,) if a.quick else (256, 4096)):
            rows += rows_ilqr(batch, 1 if batch > 256 else rep)
    name = torch.cuda.get_device_name()
    print(f"GPU: {name}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}\n")
    print("| case | solver | time | ratio to the first row | residual / error | "
          "peak GPU memory | memory ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    first = first_mem = None
    for case, solver, t, res, mem in rows:
        if case:
            first, first_mem = t, mem
        print(f"| {case} | {solver} | {t * 1e3:.2f} ms | {t / first:.2f} | {res:.1e} | "
              f"{mem:.1f} MB | {mem / first_mem:.2f} |".replace("nan MB", "-")
              .replace("| nan |", "| - |").replace("| nan |", "| - |"))
    if a.json is not None:
        a.json.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
