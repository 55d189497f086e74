"""The training command and its run loop: smoke runs, determinism, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nnbridge import data, train
from nnbridge.training import RunConfig, parse_optimizer, run
from trajopt.errors import InvalidArgumentError

pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _float32():
    """The command trains in float32 (the package conftest switches tests to float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def test_split_is_fixed_and_standardized():
    a, b = data.load("wine"), data.load("wine")
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_eval, b.y_eval)
    assert len(a.X_train) + len(a.X_eval) == 178
    assert abs(len(a.X_eval) - 0.3 * 178) <= 1
    torch.testing.assert_close(a.X_train.mean(0), torch.zeros(13), atol=1e-5, rtol=0)
    v = data.load("wine", split="train")
    assert len(v.X_train) + len(v.X_eval) == len(a.X_train)
    d = data.load("digits")
    assert d.image_shape == (1, 8, 8) and d.n_classes == 10 and d.n_features == 64


def test_cli_smoke_writes_results(tmp_path):
    out = tmp_path / "out"
    rc = train.main(["--epochs", "1", "--seeds", "2", "--optimizer", "sgd,ddpnopt,ekfac",
                     "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["optimizer"], r["seed"]) for r in res["runs"]] == [
        ("sgd", 0), ("sgd", 1), ("ddpnopt-adam", 0), ("ddpnopt-adam", 1), ("ekfac", 0),
        ("ekfac", 1)]
    for r in res["runs"]:
        # one epoch: above twice chance (10 classes); SGD at lr 0.1 is the slowest (~36%)
        assert 0.2 < r["test_accuracy"] <= 1 and r["final_train_loss"] > 0
        assert r["time_per_step"] > 0 and r["skipped_steps"] == 0
    assert res["config"]["dataset"] == "digits"
    assert (out / "results.csv").read_text().splitlines()[0].startswith("optimizer,seed")
    assert (out / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("args", [["--dataset", "wine", "--optimizer", "rmsprop,ddpnopt-sgd"],
                                  ["--model", "cnn", "--optimizer", "adam,ddpnopt-ekfac",
                                   "--batch-size", "128"],
                                  ["--dataset", "iris", "--optimizer", "vanilla-ddp"]])
def test_cli_other_datasets_and_models(args, capsys):
    assert train.main(["--epochs", "1", "--seeds", "1", "--no-progress", *args]) == 0
    table = capsys.readouterr().out
    assert table.count("| ") >= 3 and "nan" not in table


def _curves(res):
    return {k: v for k, v in res.history.items() if k != "step_time"}


def test_same_seed_same_numbers_and_other_seed_differs():
    cfg = RunConfig(optimizer="ddpnopt-adam", epochs=1, seed=3)
    a, b = run(cfg), run(cfg)
    assert _curves(a) == _curves(b)
    c = run(RunConfig(optimizer="ddpnopt-adam", epochs=1, seed=4))
    assert _curves(c)["train_loss"] != _curves(a)["train_loss"]


@pytest.mark.parametrize("opt", ["adam", "ddpnopt-rmsprop", "ekfac"])
def test_resumed_run_continues_identically(opt, tmp_path):
    ck = tmp_path / "run.pt"
    full = run(RunConfig(optimizer=opt, epochs=3, seed=1))
    run(RunConfig(optimizer=opt, epochs=1, seed=1), checkpoint=ck)   # "interrupted"
    resumed = run(RunConfig(optimizer=opt, epochs=3, seed=1), checkpoint=ck)
    assert _curves(resumed) == _curves(full)
    assert resumed.test_accuracy == full.test_accuracy
    with pytest.raises(InvalidArgumentError, match="another configuration"):
        run(RunConfig(optimizer=opt, epochs=3, seed=2), checkpoint=ck)


@pytest.mark.parametrize("args,msg", [
    (["--dataset", "mnist"], "invalid choice"),
    (["--optimizer", "adam,lbfgs"], "unknown optimizer 'lbfgs'"),
    (["--lr", "-0.1"], "learning rate must be >= 0"),
    (["--epochs", "0"], "must be > 0"),
    (["--dataset", "wine", "--model", "cnn"], "needs image data"),
])
def test_bad_arguments_one_line_no_traceback(args, msg):
    p = subprocess.run([sys.executable, "-m", "nnbridge.train", "--no-progress", *args],
                       capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_optimizer_names():
    assert parse_optimizer("ddpnopt", "rmsprop") == ("ddpnopt-rmsprop", "rmsprop")
    assert parse_optimizer("DDPNOpt-identity") == ("ddpnopt-sgd", "identity")
    assert parse_optimizer("ddp") == ("vanilla-ddp", "exact")
    with pytest.raises(InvalidArgumentError, match="optimizer must be one of"):
        parse_optimizer("newton")
    with pytest.raises(InvalidArgumentError, match="lr"):
        RunConfig(lr=float("nan"))


def test_a_diverging_run_warns():
    with pytest.warns(RuntimeWarning, match="diverged"):
        # RMSprop moves every weight by ~lr per step: 40 steps of 1e37 overflow float32
        r = run(RunConfig(optimizer="rmsprop", lr=1e37, epochs=1, seed=0))
    assert not r.final_train_loss < float("inf")
