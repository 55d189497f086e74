"""The CARE against scipy, ratios in one run.

    python benchmarks/bench_care.py [--quick]

(s) one system n = 4 / n = 10, ``solve_care`` (default "auto") against
    ``scipy.linalg.solve_continuous_are``; (a) 1,000 systems n = 10, m = 3 batched
    ("auto": the sign iteration + two Newton steps) against a Python loop of scipy.
Best of 3 (1 with ``--quick``) wall-clock times, float64, CPU; the residual is the
relative residual of ``trajopt.care`` (max over the batch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trajopt  # noqa: E402
from trajopt.care._common import care_relative_residual  # noqa: E402
from trajopt.dare._common import prepare  # noqa: E402


def _best(fn, rep):
    best, out = float("inf"), None
    fn()
    for _ in range(rep):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _res(A, B, Q, R, X):
    d = prepare(*(torch.as_tensor(v) for v in (A, B, Q, R)), None, None)
    return float(care_relative_residual(d, torch.as_tensor(X)).max())


def rows(quick: bool) -> list[tuple]:
    rep = 1 if quick else 3
    rng = np.random.default_rng(0)
    out = []
    for n, m in ((4, 2), (10, 3)):
        A, B = rng.normal(size=(n, n)), rng.normal(size=(n, m))
        Q, R = np.eye(n), np.eye(m)
        args = (A, B, Q, R)
        t_sp, Xs = _best(lambda a=args: scipy.linalg.solve_continuous_are(*a), rep)
        t_us, s = _best(lambda a=args: trajopt.solve_care(*a), rep)
        out += [(f"(s) one CARE n={n} m={m}", "scipy", t_sp, _res(A, B, Q, R, Xs)),
                ("", f"trajopt default ({s.method})", t_us, _res(A, B, Q, R, s.P))]
    count = 100 if quick else 1000
    A = torch.as_tensor(rng.normal(size=(count, 10, 10)))
    B = torch.as_tensor(rng.normal(size=(count, 10, 3)))
    Q, R = torch.eye(10, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    t_sp, Xs = _best(lambda: np.stack([scipy.linalg.solve_continuous_are(
        A[i].numpy(), B[i].numpy(), Q.numpy(), R.numpy()) for i in range(count)]), 1)
    t_us, s = _best(lambda: trajopt.solve_care(A, B, Q, R), rep)
    out += [(f"(a) {count} CARE n=10 m=3", "scipy loop", t_sp, _res(A, B, Q, R, Xs)),
            ("", f"trajopt batched ({s.method})", t_us, float(s.residual.max()))]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), scipy "
          f"{scipy.__version__}\n")
    print("| case | solver | time | vs the case's first row | residual |")
    print("|---|---|---:|---:|---:|")
    first = None
    for case, solver, t, res in rows(a.quick):
        first = t if case else first
        print(f"| {case} | {solver} | {1e3 * t:.2f} ms | {t / first:.2f}x | {res:.1e} |")


if __name__ == "__main__":
    main()
