"""LQR core benchmark: trajopt vs scipy and slycot on this machine, ratios in one run.

    python benchmarks/bench_lqr_dare.py [--quick]

(s) one DARE n=4 m=2 and n=10 m=3: trajopt "auto" (the default) vs
    ``scipy.linalg.solve_discrete_are`` (and trajopt's "slycot" method when installed);
(a) 1,000 DARE systems n=10, m=3: batched doubling and "auto" vs a Python loop of scipy
    (and of slycot); (b) one DARE n=200; (c) finite-horizon LQR T=1000, n=10, m=4,
    batch 64 vs a plain numpy Riccati recursion looped over the batch and one batched
    over it.
Prints a Markdown table (copied into docs/performance.md and the README); "ratio" is
time / time of the case's reference row (scipy for the DAREs): 0.5 means twice as fast
as scipy.  Times are the best of several runs.  ``dare_rows(quick)`` returns the DARE
rows as dicts for ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trajopt  # noqa: E402
from trajopt.dare._common import prepare, relative_residual  # noqa: E402
from trajopt.dare.backends import slycot_available  # noqa: E402


def best_time(fn, repeat=3):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def best_times_interleaved(fns: dict, rounds: int, block: int) -> dict:
    """Per-call time of each function: the best over ``rounds`` of the mean of ``block``
    back-to-back calls, the functions interleaved round by round (so a noisy moment of a
    shared machine hits all of them)."""
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / block)
    return best


def systems(rng, count, n, m):
    A = rng.normal(size=(count, n, n)) / np.sqrt(n)
    B = rng.normal(size=(count, n, m))
    return A, B, np.eye(n), np.eye(m)


def max_residual(A, B, Q, R, X):
    d = prepare(*(torch.as_tensor(np.ascontiguousarray(v)) for v in (A, B, Q, R)), None, None)
    return float(relative_residual(d, torch.as_tensor(np.asarray(X))).max())


def _row(case, solver, t, ref_t, ref, res):
    return {"case": case, "solver": solver, "time_s": t, "ratio": t / ref_t, "vs": ref,
            "residual": res}


def rows_dare_single(n, m, quick):
    """One small DARE: the default call against scipy's, interleaved."""
    rng = np.random.default_rng(3)
    A, B, Q, R = systems(rng, 1, n, m)
    A, B = A[0], B[0]
    fns = {"scipy": lambda: scipy.linalg.solve_discrete_are(A, B, Q, R),
           "auto": lambda: trajopt.solve_dare(A, B, Q, R)}
    if slycot_available():
        fns["slycot"] = lambda: trajopt.solve_dare(A, B, Q, R, method="slycot")
    t = best_times_interleaved(fns, 5 if quick else 25, 10 if quick else 40)
    case = f"(s) one DARE n={n} m={m}"
    rows = [_row(case, "scipy.linalg.solve_discrete_are", t["scipy"], t["scipy"], "scipy",
                 max_residual(A, B, Q, R, fns["scipy"]())),
            _row(case, "trajopt solve_dare (auto, default)", t["auto"], t["scipy"], "scipy",
                 float(fns["auto"]().residual))]
    if "slycot" in t:
        rows.append(_row(case, "trajopt solve_dare (method='slycot')", t["slycot"],
                         t["scipy"], "scipy", float(fns["slycot"]().residual)))
    return rows


def rows_dare_batch(count, rep):
    rng = np.random.default_rng(0)
    A, B, Q, R = systems(rng, count, 10, 3)
    t_sp, Xs = best_time(lambda: np.stack([scipy.linalg.solve_discrete_are(A[i], B[i], Q, R)
                                           for i in range(count)]), 1)
    t_ours, sol = best_time(lambda: trajopt.solve_dare(A, B, Q, R, method="doubling"), rep)
    t_auto, sol_auto = best_time(lambda: trajopt.solve_dare(A, B, Q, R), rep)
    case = f"(a) {count} DARE n=10 m=3"
    rows = [_row(case, "scipy loop", t_sp, t_sp, "scipy loop", max_residual(A, B, Q, R, Xs)),
            _row(case, "trajopt doubling (batched)", t_ours, t_sp, "scipy loop",
                 max_residual(A, B, Q, R, sol.P)),
            _row(case, "trajopt auto (batched)", t_auto, t_sp, "scipy loop",
                 max_residual(A, B, Q, R, sol_auto.P))]
    if slycot_available():
        t_sl, sl = best_time(lambda: trajopt.solve_dare(A, B, Q, R, method="slycot"), 1)
        rows.append(_row(case, "slycot loop (trajopt method='slycot')", t_sl, t_sp,
                         "scipy loop", max_residual(A, B, Q, R, sl.P)))
    return rows


def rows_dare_large(n, rep):
    rng = np.random.default_rng(1)
    A, B, Q, R = systems(rng, 1, n, 10)
    A, B = A[0], B[0]
    t_s, Xs = best_time(lambda: scipy.linalg.solve_discrete_are(A, B, Q, R), rep)
    t_d, sd = best_time(lambda: trajopt.solve_dare(A, B, Q, R, method="doubling"), rep)
    t_a, sa = best_time(lambda: trajopt.solve_dare(A, B, Q, R), rep)
    case = f"(b) one DARE n={n} m=10"
    rows = [_row(case, "scipy", t_s, t_s, "scipy", max_residual(A, B, Q, R, Xs)),
            _row(case, "trajopt doubling", t_d, t_s, "scipy", max_residual(A, B, Q, R, sd.P)),
            _row(case, "trajopt auto", t_a, t_s, "scipy", max_residual(A, B, Q, R, sa.P))]
    if slycot_available():
        t_l, sl = best_time(lambda: trajopt.solve_dare(A, B, Q, R, method="slycot"), rep)
        rows.append(_row(case, "slycot", t_l, t_s, "scipy", max_residual(A, B, Q, R, sl.P)))
    return rows


def dare_rows(quick: bool) -> list[dict]:
    """The DARE rows (cases (s), (a), (b)) as dicts with keys case, solver, time_s,
    ratio (time / time of the reference row ``vs`` of the case: scipy or the scipy
    loop) and residual (largest relative residual)."""
    rep = 1 if quick else 3
    return (rows_dare_single(4, 2, quick) + rows_dare_single(10, 3, quick)
            + rows_dare_batch(100 if quick else 1000, rep)
            + rows_dare_large(50 if quick else 200, rep))


def numpy_riccati(A, B, Q, R, QT):
    """Plain numpy backward recursion for one time-varying problem (time-major arrays)."""
    P = QT
    Ks = np.empty((A.shape[0], B.shape[-1], A.shape[-1]))
    for t in range(A.shape[0] - 1, -1, -1):
        BtP = B[t].T @ P
        K = -np.linalg.solve(R[t] + BtP @ B[t], BtP @ A[t])
        P = Q[t] + A[t].T @ P @ A[t] + (BtP @ A[t]).T @ K
        P = 0.5 * (P + P.T)
        Ks[t] = K
    return Ks


def numpy_riccati_batched(A, B, Q, R, QT):
    """The same recursion vectorized over a leading batch axis with numpy."""
    P = np.broadcast_to(QT, (A.shape[0],) + QT.shape)
    Ks = np.empty(A.shape[:2] + (B.shape[-1], A.shape[-1]))
    for t in range(A.shape[1] - 1, -1, -1):
        At, Bt = A[:, t], B[:, t]
        BtP = np.swapaxes(Bt, -1, -2) @ P
        K = -np.linalg.solve(R[:, t] + BtP @ Bt, BtP @ At)
        P = Q[:, t] + np.swapaxes(At, -1, -2) @ P @ At + np.swapaxes(BtP @ At, -1, -2) @ K
        P = 0.5 * (P + np.swapaxes(P, -1, -2))
        Ks[:, t] = K
    return Ks


def rows_lqr(T, n, m, batch, rep):
    rng = np.random.default_rng(2)
    A = rng.normal(size=(batch, T, n, n)) / np.sqrt(n)
    B = rng.normal(size=(batch, T, n, m))
    Q = np.broadcast_to(np.eye(n), (batch, T, n, n)).copy()
    R = np.broadcast_to(np.eye(m), (batch, T, m, m)).copy()
    QT = np.eye(n)
    x0 = rng.normal(size=(batch, n))
    prob = trajopt.LQR(A=A, B=B, Q=Q, R=R, QT=QT)
    t_ours, sol = best_time(lambda: trajopt.solve_lqr(prob, x0), rep)
    tA, tB, tQ, tR = (torch.as_tensor(v) for v in (A, B, Q, R))
    tprob = trajopt.LQR(A=tA, B=tB, Q=tQ, R=tR, QT=torch.as_tensor(QT))
    t_torch, _ = best_time(lambda: trajopt.solve_lqr(tprob, torch.as_tensor(x0)), rep)
    t_loop, Ks = best_time(lambda: np.stack([numpy_riccati(A[b], B[b], Q[b], R[b], QT)
                                             for b in range(batch)]), 1)
    t_vec, Kv = best_time(lambda: numpy_riccati_batched(A, B, Q, R, QT), rep)
    err = max(np.abs(sol.K - Ks).max(), np.abs(sol.K - Kv).max())
    label = f"(c) finite LQR T={T} n={n} m={m} batch {batch}"
    ref = "numpy recursion, batched"
    return [_row(label, "trajopt solve_lqr (numpy in/out, + rollout)", t_ours, t_vec, ref,
                 err),
            _row(label, "trajopt solve_lqr (torch in/out, + rollout)", t_torch, t_vec, ref,
                 err),
            _row(label, "numpy recursion, looped over batch", t_loop, t_vec, ref, 0.0),
            _row(label, ref, t_vec, t_vec, ref, 0.0)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = ap.parse_args()
    rep = 1 if args.quick else 3
    print(f"# trajopt LQR/DARE benchmark — {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"scipy {scipy.__version__}, numpy {np.__version__}, "
          f"slycot {'yes' if slycot_available() else 'no'}\n")
    rows = dare_rows(args.quick) + rows_lqr(100 if args.quick else 1000, 10, 4,
                                            8 if args.quick else 64, rep)
    print("| case | solver | time [ms] | ratio | vs | max residual / max dK |")
    print("|---|---|---:|---:|---|---:|")
    last = None
    for r in rows:
        case = "" if r["case"] == last else r["case"]
        last = r["case"]
        print(f"| {case} | {r['solver']} | {1e3 * r['time_s']:.3f} | {r['ratio']:.3f} | "
              f"{r['vs']} | {r['residual']:.1e} |")
    print("\n'ratio' is time / time of the case's 'vs' row: 0.02 means 50x faster than it.")


if __name__ == "__main__":
    main()
