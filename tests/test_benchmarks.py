"""Smoke test: ``benchmarks/run_all.py --quick`` prints every row of the speed issue's table
(mpc.pytorch skipped; crocoddyl optional; the DARE rows when bench_lqr_dare provides them).
Timings are not checked here: speed is measured by the benchmark scripts."""

import importlib.util
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"


def _bench(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location(name, RUN_ALL.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_all_quick_prints_every_row(capsys):
    module = _bench("run_all")
    rows = module.main(["--quick"])
    out = capsys.readouterr().out
    assert out.count("\n| ") >= len(rows) + 1  # header + one line per row
    figures = " ".join(r["figure"] for r in rows)
    for name in ("pendulum swing-up", "LQ n=8 m=3", "MPC step, cart-pole T=50",
                 "mpc.pytorch pendulum"):
        assert name in figures, name
    assert "DARE" in out
    for r in rows:
        assert set(r) >= {"figure", "goal", "trajopt", "peer", "ratio", "met"}


def test_bench_gtddp_nn_quick_prints_both_tables(capsys):
    """benchmarks/bench_gtddp_nn.py --quick: GT-DDP against its base optimizer and
    value_hessian outer against full, in one process (~10 s)."""
    module = _bench("bench_gtddp_nn")
    res = module.main(["--quick"])
    out = capsys.readouterr().out
    assert "Table 1" in out and "Table 2" in out and "| full / outer |" in out
    assert [r["curvature"] for r in res["base"]] == ["sgd"]
    assert all(r["time"] > 0 for r in res["value_hessian"].values())


def test_bench_gtddp_fig1_quick_prints_the_three_forms(capsys):
    """benchmarks/bench_gtddp_fig1.py --quick: outer / full / joint over two batch sizes,
    in one process."""
    module = _bench("bench_gtddp_fig1")
    res = module.main(["--quick"])
    out = capsys.readouterr().out
    assert "outer / joint time" in out
    assert sorted(res) == [2, 4]
    assert all(r[f]["time"] > 0 for r in res.values() for f in ("outer", "full", "joint"))


def test_bench_care_quick_prints_every_case(capsys):
    """benchmarks/bench_care.py --quick: one CARE n = 4 / 10 and the batch, each against
    scipy, with residuals at rounding level."""
    _bench("bench_care").main(["--quick"])
    out = capsys.readouterr().out
    for case in ("(s) one CARE n=4", "(s) one CARE n=10", "(a) 100 CARE"):
        assert case in out, case
    residuals = [float(line.rsplit("|", 2)[-2]) for line in out.splitlines()
                 if line.startswith("| ") and "e-" in line.rsplit("|", 2)[-2]]
    assert len(residuals) == 6 and max(residuals) < 1e-12


def test_bench_ddp_grad_quick_agrees_with_finite_differences(capsys):
    """benchmarks/bench_ddp_grad.py --quick: trajopt's gradient through the box-limited
    iLQR of mpc.pytorch's pendulum against its own finite differences (mpc.pytorch is
    skipped in the quick run)."""
    res = _bench("bench_ddp_grad").main(["--quick"])
    out = capsys.readouterr().out
    assert "trajopt solve_ddp(params=)" in out and "finite differences" in out
    for ours, fd in zip(res["ours"]["grad"], res["fd"]):
        assert abs(ours - fd) <= 1e-3 * max(abs(fd), 1.0)


def test_bench_constrained_quick_meets_the_constraints(capsys):
    """benchmarks/bench_constrained.py --quick: every problem solved by trajopt and by
    IPOPT, both feasible to 1e-6."""
    import pytest
    pytest.importorskip("casadi")
    res = _bench("bench_constrained").main(["--quick"])
    out = capsys.readouterr().out
    assert "trajopt / IPOPT time" in out and len(res) == 4
    for d in res:
        assert d["trajopt_viol"] <= 1e-6 and d["ipopt_viol"] <= 1e-6, d["case"]
        assert d["trajopt_s"] > 0 and d["ipopt_s"] > 0


def test_run_alternating_alternates_and_keeps_the_minimum(tmp_path):
    """benchmarks/_child.run_alternating: configurations run A B A B in fresh processes;
    each reports its minimum time and memory over the rounds and every round's time."""
    log = tmp_path / "order.txt"
    script = tmp_path / "fake_bench.py"
    script.write_text(
        "import json, sys\n"
        "cfg = json.loads(sys.argv[2])\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(cfg['name'])\n"
        f"n = len(open({str(log)!r}).read())\n"
        "print(json.dumps({'time': 10.0 - n, 'mem_mb': float(n), 'name': cfg['name']}))\n")
    module = _bench("_child")
    a, b = module.run_alternating(str(script), [{"name": "A"}, {"name": "B"}], 3)
    assert log.read_text() == "ABABAB"
    assert a["times"] == [9.0, 7.0, 5.0] and a["time"] == 5.0 and a["mem_mb"] == 1.0
    assert b["times"] == [8.0, 6.0, 4.0] and b["time"] == 4.0 and b["mem_mb"] == 2.0


def test_bench_rollout_quick_scans_and_agrees_with_the_loop(capsys):
    """benchmarks/bench_rollout.py --quick: every case timed both ways, the scan held its
    self-check and its states equal the loop's to rounding."""
    rows = _bench("bench_rollout").main(["--quick"])
    out = capsys.readouterr().out
    assert len(rows) == 4 and out.count("\n") >= len(rows) + 2
    for r in rows:
        assert r["loop_ms"] > 0 and r["scan_ms"] > 0 and r["scan_held"]
        assert r["diff"] < 1e-13


def test_live_bytes_see_a_temporary_tensor():
    """benchmarks/_live.py: the peak of live bytes over a call includes a 16 MB tensor
    the call creates and frees (torch's CPU tensors live in glibc's arenas / mmaps)."""
    import pytest
    import torch
    live = _bench("_live")
    if live.in_use() is None:
        pytest.skip("no glibc mallinfo2 here")

    def make_and_free():
        return float(torch.ones(4_000_000).sum())  # 16 MB of float32, freed at once
    live.live_peak(make_and_free)  # the dispatch mode's first use imports and caches
    before = live.in_use()
    out, peak = live.live_peak(make_and_free)
    assert out == 4_000_000.0
    assert peak - before >= 15 * 2 ** 20
    assert live.in_use() - before < 4 * 2 ** 20  # and it was freed again


def test_bench_steepest_quick_prints_the_batch_table(capsys, tmp_path):
    """benchmarks/bench_steepest.py --quick --plot: the explicit-Fisher row and the batch
    table, whose batch-256 row takes conjugate gradients ("auto") and agrees with the
    direct solve, and its plot."""
    png = tmp_path / "batch.png"
    _bench("bench_steepest").main(["--quick", "--plot", str(png)])
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 256 |")]
    assert len(rows) == 1
    assert 0 < float(rows[0][7]) < 1e-10   # CG ran (not the direct solve) and agrees
    assert "| 8 | 0.001 |" in out and "| 8 | 298 |" in out
