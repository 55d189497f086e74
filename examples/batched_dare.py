"""Solve 1,000 DAREs at once with the batched doubling solver and check them against
scipy on a few.

    python examples/batched_dare.py [--smoke]
"""

import argparse
import time

import numpy as np
import scipy.linalg

import trajopt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    args = ap.parse_args(argv)
    count = 20 if args.smoke else 1000
    rng = np.random.default_rng(0)
    A = rng.normal(size=(count, 6, 6)) / np.sqrt(6)
    B = rng.normal(size=(count, 6, 2))
    t0 = time.perf_counter()
    sol = trajopt.solve_dare(A, B, np.eye(6), np.eye(2))
    print(f"{count} DAREs in {1e3 * (time.perf_counter() - t0):.1f} ms with {sol.method!r}; "
          f"max relative residual {sol.residual.max():.1e}")
    for i in range(3):
        ref = scipy.linalg.solve_discrete_are(A[i], B[i], np.eye(6), np.eye(2))
        print(f"  system {i}: max |P - P_scipy| = {np.abs(sol.P[i] - ref).max():.1e}, "
              f"spectral radius of A + BK = {np.abs(sol.closed_loop_eigvals[i]).max():.3f}")


if __name__ == "__main__":
    main()
