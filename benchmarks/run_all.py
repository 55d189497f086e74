"""Every figure of the issue "Speed for control problems" in one run, as a Markdown table
with ratios against the peers measured in the same run.

    python benchmarks/run_all.py [--quick] [--skip-mpc]

Rows (goals from the issue):

* pendulum swing-up T=100, trajopt with a user-written ``f(x, u, t)`` and ``trajopt.Cost``
  (no flags) vs crocoddyl FDDP with a Python action model: <= 3x crocoddyl's time;
* LQ n=8 m=3 T=100 (QuadraticCost) vs crocoddyl's C++ ``ActionModelLQR``: <= 5x, with the
  dynamics as a user-written callable and as ``trajopt.LinearDynamics``;
* MPC step, cart-pole T=50, 3 iterations, warm start: < 50 ms;
* the DARE rows (1,000 batched DAREs vs a scipy loop; one small DARE, "auto" vs scipy)
  from ``bench_lqr_dare.dare_rows`` when that exists;
* mpc.pytorch's pendulum T=100, batch 256: >= 5x faster (mpc.pytorch runs in its own
  virtual environment, see ``bench_ddp.py``; skipped by ``--quick`` and ``--skip-mpc``).

crocoddyl and mpc.pytorch are optional: a row says "not installed" when they are absent.
``--quick`` times each case once after a warm-up (the smoke test runs it); the full run
takes the best of 3.  Times are wall clock on whatever else the machine is doing: on a
shared machine repeat the run and take the best.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import bench_ddp  # noqa: E402


def _ratio_row(d: dict, goal: float) -> dict:
    """A row whose goal is ``trajopt <= goal x peer``."""
    out = dict(figure=d["figure"], goal=f"<= {goal:g}x the peer's time",
               trajopt=f"{d['trajopt_ms']:.1f} ms ({d['trajopt_note']})")
    if "peer_ms" not in d:
        return dict(out, peer=d.get("peer", "-"), ratio="-", met="-")
    r = d["trajopt_ms"] / d["peer_ms"]
    return dict(out, peer=f"{d['peer']}: {d['peer_ms']:.1f} ms ({d['peer_note']})",
                ratio=f"{r:.2f}x the peer's time", met="met" if r <= goal else "missed")


def ddp_rows(quick: bool, skip_mpc: bool) -> list[dict]:
    rep = 1 if quick else 3
    rows = [_ratio_row(bench_ddp.row_pendulum(100, rep), 3.0),
            _ratio_row(bench_ddp.row_lq(100, rep), 5.0),
            _ratio_row(bench_ddp.row_lq(100, rep, linear=True), 5.0)]
    m = bench_ddp.row_mpc_step(50, 5 if quick else 20)
    rows.append(dict(figure=m["figure"], goal="< 50 ms",
                     trajopt=f"{m['trajopt_ms']:.1f} ms ({m['trajopt_note']})", peer="-",
                     ratio="-", met="met" if m["trajopt_ms"] < 50 else "missed"))
    return rows


def dare_section(quick: bool) -> list[dict]:
    try:
        from bench_lqr_dare import dare_rows
    except ImportError:
        return [dict(figure="DARE rows (1,000 batched DAREs; one DARE n=4 / n=10)",
                     goal="-", trajopt="-", peer="-", ratio="-",
                     met="not available yet (bench_lqr_dare.dare_rows)")]
    return [_as_row(d) for d in dare_rows(quick)]


def _as_row(d: dict) -> dict:
    """A row of ``dare_rows`` (keys case, solver, time_s, vs, ratio = time / time of the
    ``vs`` row of the case, residual): the goal of the issue where the case has one --
    "(s)" one small DARE, the default call within 1.5x scipy; "(a)" the batch, >= 50x
    faster than the scipy loop -- and unknown keys shown as notes."""
    known = ("case", "solver", "time_s", "vs", "ratio", "residual")
    case, solver = str(d.get("case", "?")), str(d.get("solver", "?"))
    ratio = d.get("ratio")
    trajopt_row = solver.startswith("trajopt") and ratio is not None
    goal, met = "-", "-"
    if case.startswith("(s)"):
        goal = "<= 1.5x scipy's time (default call)"
        if trajopt_row and "default" in solver:
            met = "met" if ratio <= 1.5 else "missed"
    elif case.startswith("(a)"):
        goal = ">= 50x faster than the scipy loop"
        if trajopt_row and "doubling" in solver:
            met = "met" if 1 / ratio >= 50 else "missed"
    time = f"{1e3 * d['time_s']:.2f} ms" if "time_s" in d else "-"
    res = f", residual {d['residual']:.1e}" if "residual" in d else ""
    notes = "; ".join(f"{k}={v}" for k, v in d.items() if k not in known)
    return dict(figure=case, goal=goal, trajopt=f"{solver}: {time}{res}"
                + (f" ({notes})" if notes else ""),
                peer=str(d.get("vs", "-")),
                ratio="-" if ratio is None else f"{ratio:.3g}x the {d.get('vs', 'peer')}'s "
                                                f"time", met=met)


def mpc_pytorch_row(quick: bool, skip: bool) -> list[dict]:
    figure = "mpc.pytorch pendulum T=100, batch 256"
    if quick or skip:
        return [dict(figure=figure, goal=">= 5x faster", trajopt="-", peer="-", ratio="-",
                     met="skipped (--quick / --skip-mpc)")]
    rows = bench_ddp.rows_mpc(256, 100, 100, 1e-4, 1)
    ours, peer = rows[0], rows[1]
    out = dict(figure=figure, goal=">= 5x faster",
               trajopt=f"{1e3 * ours[2]:.0f} ms (mean cost {ours[3]:.4g}, {ours[4]})")
    if not peer[2] == peer[2]:  # nan: not available
        return [dict(out, peer="mpc.pytorch not installed", ratio="-", met="-")]
    r = peer[2] / ours[2]
    return [dict(out, peer=f"mpc.pytorch: {1e3 * peer[2]:.0f} ms (mean cost {peer[3]:.4g})",
                 ratio=f"{r:.2f}x faster", met="met" if r >= 5 else "missed")]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="time once; skip mpc.pytorch")
    ap.add_argument("--skip-mpc", action="store_true", help="skip mpc.pytorch")
    args = ap.parse_args(argv)
    print(f"# Speed for control problems — {platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)\n")
    rows = ddp_rows(args.quick, args.skip_mpc) + dare_section(args.quick) + \
        mpc_pytorch_row(args.quick, args.skip_mpc)
    print("| figure | goal | trajopt | peer | ratio | goal met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['figure']} | {r['goal']} | {r['trajopt']} | {r['peer']} | "
              f"{r['ratio']} | {r['met']} |")
    return rows


if __name__ == "__main__":
    main()
