"""Rollouts of linear dynamics: the stage loop against the parallel scan, per device.

    python benchmarks/bench_rollout.py [--device cuda] [--quick] [--json FILE]

What ``Chain.simulate`` does with a ``LinearDynamics`` model and an affine law
(``trajopt.lqr.affine_scan``): the open loop ``u_t = ff_t`` (maps shared by the batch) and
the closed loop ``u_t = ff_t + K_t (x_t - xbar_t)`` with each element's own gains (own
maps), time-invariant ``A``, ``B``, T stages.  Each case is timed with the rule forced
either way (``trajopt.ddp.chain.rollout_pays`` patched), median of a few runs after a
warm-up, synchronized on a GPU; the cost of the rollout (one ``QuadraticCost`` call over
all stages) is in both.  Printed: loop / scan ms, their ratio, whether the scan held its
self-check, what the default rule picks, and the largest state difference relative to the
largest state.  The rule's bounds (``MAX_WORK``, ``MAX_WORK_CUDA``) come from such tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trajopt  # noqa: E402
import trajopt.ddp.chain as chain_mod  # noqa: E402
from trajopt.ddp.chain import AffineLaw, Chain  # noqa: E402
from trajopt.lqr.affine_scan import rollout_pays  # noqa: E402


def _case(T, n, m, batch, shared, device, dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.eye(n, dtype=dtype) + 0.3 / n ** 0.5 * torch.randn(n, n, generator=g,
                                                                 dtype=dtype)
    A = A / torch.linalg.eigvals(A).abs().max().clamp(min=1.0)   # a stable-ish plant
    B = torch.randn(n, m, generator=g, dtype=dtype)
    ff = list(torch.randn(T, batch, m, generator=g, dtype=dtype).to(device).unbind(0))
    x0 = torch.randn(batch, n, generator=g, dtype=dtype).to(device)
    if shared:
        law = AffineLaw(ff)
    else:   # a stabilizing-ish feedback with a little per-element variation
        K0 = -0.2 * torch.linalg.pinv(B) @ A
        K = K0 + 0.01 * torch.randn(T, batch, m, n, generator=g, dtype=dtype)
        xbar = torch.randn(T, batch, n, generator=g, dtype=dtype)
        law = AffineLaw(ff, list(K.to(device).unbind(0)), list(xbar.to(device).unbind(0)))
    eye_n, eye_m = (torch.eye(k, dtype=dtype, device=device) for k in (n, m))
    chain = Chain(trajopt.LinearDynamics(A.to(device), B.to(device)),
                  trajopt.QuadraticCost(eye_n, eye_m, eye_n))

    def control(t, xs):
        return law.ff[t] if law.K is None else law.ff[t] + (
            law.K[t] @ (xs[t] - law.xbar[t]).unsqueeze(-1)).squeeze(-1)
    return lambda: chain.simulate(x0, T, control, law=law)


def _timed(fn, repeat, cuda):
    out = fn()
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def measure(T, n, m, batch, shared, device, dtype, repeat):
    """One row: loop ms, scan ms, whether the scan held, the default's pick, state diff."""
    run = _case(T, n, m, batch, shared, device, dtype)
    cuda = device.type == "cuda"
    held = []
    real = chain_mod.checked_states

    def spy(*a):
        out = real(*a)
        held.append(out is not None)
        return out
    try:
        chain_mod.checked_states = spy
        chain_mod.rollout_pays = lambda *a: False
        t_loop, loop = _timed(run, repeat, cuda)
        chain_mod.rollout_pays = lambda *a: True
        t_scan, scan = _timed(run, repeat, cuda)
    finally:
        chain_mod.rollout_pays = rollout_pays
        chain_mod.checked_states = real
    X, Y = torch.stack(loop.xs), torch.stack(scan.xs)
    diff = float((X - Y).abs().max() / X.abs().max())
    return dict(T=T, n=n, m=m, batch=batch, maps="shared" if shared else "own",
                device=str(device), dtype=str(dtype).replace("torch.", ""),
                loop_ms=t_loop, scan_ms=t_scan, ratio=t_loop / t_scan,
                scan_held=all(held), default="scan" if rollout_pays(
                    T, batch, n, shared, device) else "loop", diff=diff)


def main(argv=None) -> list[dict]:
    """Print the table; return its rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--quick", action="store_true", help="a few small cases (smoke run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return []
    dtype = getattr(torch, args.dtype)
    if args.quick:
        grid = [(20, 4, 2, b, s) for b in (1, 8) for s in (True, False)]
        repeat = 2
    else:
        batches = (1, 16, 64, 256, 1024, 2048, 4096) if device.type == "cuda" else (1, 4, 16, 64)
        grid = [(100, n, m, b, s) for n, m in ((8, 3), (20, 5)) for s in (True, False)
                for b in batches]
        grid += [(1000, 8, 3, b, s) for s in (True, False) for b in batches[:3]]
        repeat = 7
    rows = []
    head = (f"{'T':>5} {'n':>3} {'m':>2} {'maps':>6} {'batch':>6} {'loop ms':>9} "
            f"{'scan ms':>9} {'loop/scan':>9} {'held':>5} {'default':>7} {'diff':>8}")
    print(f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), {args.dtype}, torch {torch.__version__}")
    print(head)
    for T, n, m, b, s in grid:
        r = measure(T, n, m, b, s, device, dtype, repeat)
        rows.append(r)
        print(f"{T:>5} {n:>3} {m:>2} {r['maps']:>6} {b:>6} {r['loop_ms']:>9.2f} "
              f"{r['scan_ms']:>9.2f} {r['ratio']:>9.2f} {str(r['scan_held']):>5} "
              f"{r['default']:>7} {r['diff']:>8.1e}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
