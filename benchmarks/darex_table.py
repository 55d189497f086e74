"""Relative residuals of every DARE method on the Benner-Laub-Mehrmann benchmark examples.

    python benchmarks/darex_table.py

Prints a Markdown table (docs/dare.md holds a copy).  The examples live in
tests/trajopt/darex.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import trajopt  # noqa: E402
from tests.trajopt.darex import DAREX  # noqa: E402
from trajopt.dare._common import prepare, relative_residual  # noqa: E402
from trajopt.dare.backends import slycot_available  # noqa: E402


def main():
    methods = ["doubling", "auto"] + (["slycot"] if slycot_available() else [])
    print("| example | n | scipy | " + " | ".join(methods) + " |")
    print("|---|---:|---|" + "---|" * len(methods))
    for name, (A, B, Q, R) in DAREX.items():
        d = prepare(*(torch.as_tensor(np.array(v, dtype=float)) for v in (A, B, Q, R)),
                    None, None)
        X = scipy.linalg.solve_discrete_are(A, B, Q, R)
        cells = [f"{float(relative_residual(d, torch.as_tensor(X))):.1e}"]
        for method in methods:
            try:
                t0 = time.perf_counter()
                sol = trajopt.solve_dare(A, B, Q, R, method=method)
                ms = 1e3 * (time.perf_counter() - t0)
                cells.append(f"{float(sol.residual):.1e} ({sol.method}, {ms:.1f} ms)")
            except trajopt.errors.TrajoptError as exc:
                cells.append(f"n/a ({type(exc).__name__})")
        print(f"| {name} | {A.shape[0]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help
    main()
