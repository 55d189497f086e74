"""Smoke tests: every example and the demo commands run end to end (tiny settings)."""

import importlib.util
import json
from pathlib import Path

import pytest

from trajopt import demo

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def _load(path: Path):
    """The script at ``path`` imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, tmp_path, capsys):
    module = _load(path)
    args = ["--smoke"] + (["--out", str(tmp_path)] if "--out" in path.read_text() else [])
    module.main(args)
    out = capsys.readouterr().out
    assert out.strip()
    for png in tmp_path.glob("*.png"):
        assert png.stat().st_size > 1000


def test_demo_lqr_and_solve(tmp_path, capsys):
    assert demo.main(["lqr", "--out", str(tmp_path), "--horizon", "20"]) == 0
    assert (tmp_path / "lqr_two_mass.png").exists()
    assert demo.main(["solve", "double_integrator", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "iter" in out and "converged" in out
    assert (tmp_path / "ddp_double_integrator.png").exists()
    assert demo.main(["list"]) == 0


def test_demo_bad_arguments_exit_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["solve", "no_such_problem"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_out_before_the_command_is_kept(tmp_path, monkeypatch):
    """--out given before the command (as for --horizon) is where the plot goes; the
    subcommand's default used to overwrite it (the plot went to ./demo_out)."""
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--out", str(tmp_path / "here"), "solve", "double_integrator"]) == 0
    assert (tmp_path / "here" / "ddp_double_integrator.png").exists()
    assert not (tmp_path / "demo_out").exists()


@pytest.mark.parametrize("x0,msg", [("1,2,3", "--x0 has 3 numbers"),
                                    ("nan,0", "--x0 must be finite")])
def test_demo_bad_x0_exits_with_one_line(tmp_path, capsys, x0, msg):
    """A wrong --x0 is argparse's one-line error, exit 2 (it printed a traceback)."""
    with pytest.raises(SystemExit) as info:
        demo.main(["solve", "pendulum", "--x0", x0, "--out", str(tmp_path)])
    assert info.value.code == 2 and msg in capsys.readouterr().err


def _experiment(name: str):
    """The script ``experiments/<name>.py`` imported as a module."""
    return _load(Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py")


def test_paper_experiments_smoke(tmp_path):
    """experiments/ddpnopt_paper.py end to end (wine, 1 epoch, no Fig. 3)."""
    module = _experiment("ddpnopt_paper")
    assert module.main(["--smoke", "--skip-fig3", "--workers", "1", "--out",
                        str(tmp_path)]) == 0
    text = (tmp_path / "experiments.md").read_text()
    assert "| ddpnopt-adam |" in text and "| ekfac | 0.01 |" in text and "nan" not in text
    assert (tmp_path / "img" / "ablation.png").stat().st_size > 10_000
    assert (tmp_path / "img" / "table3_wine.png").stat().st_size > 10_000


def test_thesis_steepest_experiments_smoke(tmp_path):
    """experiments/thesis_steepest.py end to end (a few steps of each part)."""
    module = _experiment("thesis_steepest")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "experiments_steepest.md").read_text()
    assert "| euclidean | 3 |" in text and "| kl | 3 |" in text and "nan" not in text
    assert (tmp_path / "img" / "steepest_neumann.png").stat().st_size > 10_000


def test_terminal_hessian_experiment_smoke(tmp_path):
    """experiments/terminal_hessian.py end to end (1 epoch, 1 seed, one lr per curvature)."""
    module = _experiment("terminal_hessian")
    assert module.main(["--smoke", "--workers", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "experiments_terminal.md").read_text()
    assert "| identity | 0.1 |" in text and "| adam | 0.003 |" in text and "nan" not in text


def test_mnist1d_experiment_smoke(tmp_path):
    """experiments/mnist1d_experiment.py end to end (1 epoch, 1 seed, 1 grid value)."""
    pytest.importorskip("mnist1d")
    module = _experiment("mnist1d_experiment")
    assert module.main(["--smoke", "--workers", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "experiments_mnist1d.md").read_text()
    assert "| ddpnopt-adam |" in text and "Smoke run" in text and "nan" not in text
    assert (tmp_path / "img" / "mnist1d.png").stat().st_size > 10_000


def test_gtddp_table2_smoke(tmp_path):
    """experiments/gtddp_table2.py end to end (1 epoch on 64 samples, 1 seed, 1 grid
    value; MNIST-1D not run: its cost is measured and stated)."""
    pytest.importorskip("mnist1d")
    module = _experiment("gtddp_table2")
    assert module.main(["--smoke", "--workers", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "experiments_gtddp.md").read_text()
    for m in ("sgd", "rmsprop", "adam", "ekfac"):
        assert f"| {m} |" in text and f"| gtddp-{m} |" in text
    assert "Theorem 3" in text and "MNIST-1D: not run" in text
    assert (tmp_path / "img" / "gtddp_digits.png").stat().st_size > 10_000
    raw = json.loads((tmp_path / "experiments_gtddp.json").read_text())
    assert len(raw["digits"]["test"]) == 8 and len(raw["digits"]["feedback"]) == 8
    # --report-only rewrites the page from those numbers, without --overwrite
    (tmp_path / "experiments_gtddp.md").write_text("stale")
    assert module.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert "| gtddp-adam |" in (tmp_path / "experiments_gtddp.md").read_text()


@pytest.mark.parametrize("name,stem", [
    ("gtddp_table2", "experiments_gtddp"), ("gtddp_fig4", "experiments_fig4"),
    ("mnist1d_experiment", "experiments_mnist1d"), ("terminal_hessian", "experiments_terminal"),
    ("thesis_steepest", "experiments_steepest"), ("ddpnopt_paper", "experiments")])
@pytest.mark.parametrize("existing", [".md", ".json"])
def test_experiments_refuse_to_replace_results_without_overwrite(tmp_path, capsys, name,
                                                                  stem, existing):
    """An experiment whose results page (or its raw numbers) is already in --out stops
    before running, naming --overwrite, and leaves the file alone (these six replaced
    them silently; ddpnopt_paper did not even take --overwrite: a docs trial)."""
    module = _experiment(name)
    kept = tmp_path / f"{stem}{existing}"
    kept.write_text("earlier results")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert kept.read_text() == "earlier results"
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]


def test_gtddp_fig4_smoke(tmp_path):
    """experiments/gtddp_fig4.py end to end (2 training steps): the off-block shares are
    in [0, 1] for every stage, with and without BatchNorm, and the picture exists."""
    module = _experiment("gtddp_fig4")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "experiments_fig4.json").read_text())
    for name in ("bn", "no_bn"):
        for row in raw[name]:
            assert row["shares"] and all(0 <= v <= 1 for v in row["shares"])
            assert set(row["feedback_errors"]) == {"blocks", "full", "outer"}
            assert all(v >= 0 for v in row["feedback_errors"].values())
    assert (tmp_path / "img" / "gtddp_fig4.png").stat().st_size > 10_000


def test_demo_solve_options(tmp_path, capsys):
    """--horizon before or after the command, --x0, --limit, and the x-y path for a
    vehicle; bad values are refused."""
    assert demo.main(["--horizon", "25", "solve", "double_integrator",
                      "--out", str(tmp_path)]) == 0
    assert "T=25" in capsys.readouterr().out
    assert demo.main(["solve", "unicycle", "--horizon", "20", "--x0", "0,0.5,0",
                      "--limit", "none", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "T=20" in out and "limits=None" in out
    assert (tmp_path / "ddp_unicycle.png").stat().st_size > 1000
    with pytest.raises(SystemExit) as info:   # argparse's one-line error, as the others
        demo.main(["solve", "unicycle", "--x0", "0,1", "--out", str(tmp_path)])
    assert info.value.code == 2 and "--x0 has 2 numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["solve", "unicycle", "--limit", "-1", "--out", str(tmp_path)])


def test_emsa_table3_smoke(tmp_path):
    """experiments/emsa_table3.py end to end (wine, 1 epoch), beside the stored rows; it
    refuses to overwrite its results."""
    module = _experiment("emsa_table3")
    args = ["--smoke", "--workers", "1", "--out", str(tmp_path)]
    assert module.main(args) == 0
    text = (tmp_path / "experiments_emsa.md").read_text()
    assert "| emsa | 0.05 |" in text and "| ddpnopt-adam |" in text and "nan" not in text
    assert module.main(args) == 2
    assert module.main(args + ["--overwrite"]) == 0


def test_ode_experiments_smoke(tmp_path):
    """experiments/ode_experiments.py end to end (digits 1 epoch, the flow on 256
    samples): tables, both pictures, and no overwrite without --overwrite."""
    pytest.importorskip("sklearn")
    module = _experiment("ode_experiments")
    args = ["--smoke", "--workers", "1", "--out", str(tmp_path)]
    assert module.main(args) == 0
    text = (tmp_path / "experiments_ode.md").read_text()
    assert "| gtddp-adam |" in text and "test NLL" in text and "nan" not in text
    for img in ("ode_curves.png", "cnf_moons.png"):
        assert (tmp_path / "img" / img).stat().st_size > 1000
    assert module.main(args) == 2


def test_ode_variations_smoke(tmp_path):
    """experiments/ode_variations.py end to end (128 samples, 1 epoch); its sanity row
    (GT-DDP without feedback) is Adam's number."""
    pytest.importorskip("mnist1d")
    module = _experiment("ode_variations")
    for setup in ("ode", "cnn-sgd"):
        args = ["--smoke", "--workers", "1", "--setup", setup, "--out", str(tmp_path)]
        assert module.main(args) == 0
        rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in
                (tmp_path / f"experiments_variations_{setup}.md").read_text().splitlines()
                if line.startswith("| ") and "variant" not in line}
        assert rows["feedback=False"] == rows["base"]


def test_ocnopt_experiments_smoke(tmp_path):
    """experiments/ocnopt_experiments.py end to end (64 samples, 1 epoch): the three
    parts' tables and pictures; no overwrite without --overwrite."""
    module = _experiment("ocnopt_experiments")
    args = ["--smoke", "--workers", "1", "--out", str(tmp_path)]
    assert module.main(args) == 0
    text = (tmp_path / "experiments_ocnopt.md").read_text()
    for part in ("| ddpnopt-ekfac |", "| gtddp-sgd |", "| ekfac | 0.03 |", "memory overhead",
                 "| bandit |"):
        assert part in text
    assert "nan" not in text
    for img in ("ocnopt_ablation.png", "ocnopt_lr_robustness.png"):
        assert (tmp_path / "img" / img).stat().st_size > 1000
    assert module.main(args) == 2


def test_experiment_grid_on_ray_equals_the_process_pool(tmp_path):
    """The same tiny grid (experiments/emsa_table3.py --smoke) on a local Ray instance and
    on the local process pool: the same results files, number for number (timings
    aside)."""
    pytest.importorskip("ray")
    import ray
    module = _experiment("emsa_table3")
    pool, on_ray = tmp_path / "pool", tmp_path / "ray"
    assert module.main(["--smoke", "--workers", "2", "--out", str(pool)]) == 0
    try:
        assert module.main(["--smoke", "--workers", "2", "--ray", "--out", str(on_ray)]) == 0
    finally:
        ray.shutdown()
    timing = ("wall", "time_per_step")

    def numbers(path):
        raw = json.loads((path / "experiments_emsa.json").read_text())["wine"]
        return raw["selection"], [{k: v for k, v in r.items() if k not in timing}
                                  for r in raw["table3"]]
    a, b = numbers(pool), numbers(on_ray)
    assert a == b and len(a[1]) == 2
