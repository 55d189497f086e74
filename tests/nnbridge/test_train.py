"""The training command and its run loop: smoke runs, determinism, resume, bad input."""

from __future__ import annotations

import json
import math
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


def test_cli_validation_runs_say_which_split_they_report(capsys):
    """--validation: the table's column named the test split (the header said validation)."""
    assert train.main(["--epochs", "1", "--seeds", "1", "--no-progress", "--dataset", "iris",
                       "--optimizer", "sgd", "--validation"]) == 0
    out = capsys.readouterr().out
    assert "| validation accuracy % |" in out and "test accuracy" not in out


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
    with pytest.raises(InvalidArgumentError, match=r"another configuration: seed=1 \(now 2\)$"):
        run(RunConfig(optimizer=opt, epochs=3, seed=2), checkpoint=ck)


@pytest.mark.parametrize("args,msg", [
    (["--dataset", "svhn"], "invalid choice"),
    (["--dataset", "mnist", "--data-root", "/nonexistent"], "nothing is downloaded"),
    (["--optimizer", "adam,lbfgs"], "unknown optimizer 'lbfgs'"),
    (["--lr", "-0.1"], "learning rate must be >= 0"),
    (["--epochs", "0"], "must be > 0"),
    (["--dataset", "wine", "--model", "cnn"], "needs image or signal data"),
    (["--device", "foo"], "--device foo: not a device"),
    (["--device", "meta"], "meta tensor holds no data"),
    (["--seed0", str(2 ** 64)], "must be in [0, 2**63)"),
    (["--batch-size", str(2 ** 64)], "must be <= 2147483647"),
    (["--out", "/proc/version"], "exists and is not a directory"),
    (["--checkpoint-dir", "/proc/version"], "exists and is not a directory"),
    (["--out", "/proc/nnbridge_cannot_write_here"], "cannot write there"),
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


def test_a_diverging_run_warns_while_it_happens_and_at_the_end():
    with pytest.warns(RuntimeWarning) as caught:
        # RMSprop moves every weight by ~lr per step: 40 steps of 1e37 overflow float32
        r = run(RunConfig(optimizer="rmsprop", lr=1e37, epochs=1, seed=0))
    assert not r.final_train_loss < float("inf")
    msgs = [str(w.message) for w in caught]
    assert any("is diverging: non-finite training loss at step" in m for m in msgs)
    assert "diverged" in msgs[-1]


def _results_dir(tmp_path):
    out = tmp_path / "out"
    assert train.main(["--epochs", "1", "--seeds", "1", "--optimizer", "sgd",
                       "--dataset", "iris", "--no-progress", "--out", str(out)]) == 0
    return out


def test_a_reused_out_is_refused_before_training_unless_overwrite(tmp_path, capsys):
    out = _results_dir(tmp_path)
    before = (out / "results.json").read_text()
    with pytest.raises(SystemExit) as e:
        train.main(["--epochs", "1", "--seeds", "1", "--optimizer", "adam", "--dataset",
                    "iris", "--no-progress", "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    assert train.main(["--epochs", "1", "--seeds", "1", "--optimizer", "adam", "--dataset",
                       "iris", "--no-progress", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"][0]["optimizer"] == "adam"


@pytest.mark.parametrize("name", ["results.csv", "curves.png"])
def test_any_result_file_in_out_is_kept_without_overwrite(tmp_path, capsys, name):
    """A results.csv / curves.png already in --out (another tool's, or a run whose
    results.json was moved) is refused like results.json (it was replaced silently)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"my data\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--epochs", "1", "--seeds", "1", "--optimizer", "adam", "--dataset",
                    "iris", "--no-progress", "--out", str(out)])
    assert e.value.code == 2 and name in capsys.readouterr().err
    assert (out / name).read_bytes() == b"my data\n"


def test_a_diverging_run_writes_strict_json_and_the_plot(tmp_path):
    """lr 1e30: the loss overflows; results.json has null (not NaN), curves.png exists."""
    out = tmp_path / "out"
    with pytest.warns(RuntimeWarning, match="diverg"):
        assert train.main(["--epochs", "1", "--seeds", "1", "--optimizer", "rmsprop",
                           "--lr", "1e30", "--dataset", "iris", "--no-progress",
                           "--out", str(out)]) == 0
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    res = json.loads(text)
    assert res["runs"][0]["final_train_loss"] is None
    assert (out / "curves.png").stat().st_size > 5_000


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped", "foreign", "dir"])
def test_damaged_checkpoints_are_refused_by_name(tmp_path, damage):
    from nnbridge.checkpoint import load_checkpoint
    ck = tmp_path / "run.pt"
    cfg = RunConfig(optimizer="ddpnopt-adam", dataset="iris", epochs=1, seed=0)
    run(cfg, checkpoint=ck)
    raw = ck.read_bytes()
    if damage == "empty":
        ck.write_bytes(b"")
    elif damage == "truncated":
        ck.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped":  # 64 bytes in the middle of the payload
        mid = len(raw) // 2
        ck.write_bytes(raw[:mid] + bytes(b ^ 0xFF for b in raw[mid:mid + 64])
                       + raw[mid + 64:])
    elif damage == "foreign":
        ck.unlink()
        torch.save({"model": torch.ones(2)}, ck)
    else:
        ck.unlink()
        ck.mkdir()
    with pytest.raises(InvalidArgumentError, match=str(ck)):
        run(RunConfig(optimizer="ddpnopt-adam", dataset="iris", epochs=2, seed=0),
            checkpoint=ck)
    if damage != "dir":
        with pytest.raises(InvalidArgumentError):
            load_checkpoint(ck)


def test_a_checkpoint_is_not_shortened(tmp_path):
    ck = tmp_path / "run.pt"
    run(RunConfig(optimizer="adam", dataset="iris", epochs=2, seed=0), checkpoint=ck)
    with pytest.raises(InvalidArgumentError, match="holds 2 epochs"):
        run(RunConfig(optimizer="adam", dataset="iris", epochs=1, seed=0), checkpoint=ck)


def test_device_with_an_index_trains():
    r = run(RunConfig(optimizer="ddpnopt-adam", dataset="iris", epochs=1, device="cpu:0"))
    assert 0 < r.test_accuracy <= 1


def test_missing_optional_packages_are_named_before_training(monkeypatch, capsys):
    """A base install (no [plot] extra): the command names what is missing and how to
    get it, instead of a ModuleNotFoundError after the first run."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tqdm" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        train.main(["--epochs", "1", "--seeds", "1", "--dataset", "iris"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "missing tqdm" in err and "[plot]" in err
    assert "--no-progress" in err


def test_mnist1d_is_generated_locally_with_its_own_split():
    """MNIST-1D from mnist1d.make_dataset (seed 42, the authors' 4000 / 1000 split),
    standardized with the training statistics; the validation split is a stratified 20%
    of the training part; the default CNN on it is a Conv1d network."""
    pytest.importorskip("mnist1d")
    from mnist1d.data import get_dataset_args, make_dataset
    ref = make_dataset(get_dataset_args())
    d = data.load("mnist1d")
    assert d.X_train.shape == (4000, 40) and d.X_eval.shape == (1000, 40)
    assert d.n_classes == 10 and d.image_shape == (1, 40)
    assert torch.equal(d.y_eval, torch.as_tensor(ref["y_test"], dtype=torch.int64))
    raw = torch.as_tensor(ref["x"], dtype=torch.float64)
    std = (raw - raw.mean(0)) / raw.std(0, unbiased=False)
    torch.testing.assert_close(d.X_train.double(), std, rtol=1e-5, atol=1e-5)
    v = data.load("mnist1d", split="train")
    assert len(v.X_train) == 3200 and len(v.X_eval) == 800
    assert torch.bincount(v.y_eval).min() >= 70  # stratified: ~80 per class
    from nnbridge.models import default_model
    net = default_model("cnn", d)
    assert isinstance(net[0], torch.nn.Conv1d)
    assert net(d.X_train[:2].reshape(2, 1, 40)).shape == (2, 10)


def test_cli_trains_a_1d_cnn_on_mnist1d(capsys):
    pytest.importorskip("mnist1d")
    assert train.main(["--dataset", "mnist1d", "--model", "cnn", "--epochs", "1",
                       "--seeds", "1", "--batch-size", "256", "--optimizer",
                       "adam,ddpnopt", "--no-progress"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| adam")
            or line.startswith("| ddpnopt")]
    assert len(rows) == 2 and "nan" not in table
    for row in rows:  # one epoch: above chance (10 classes)
        assert float(row.split("|")[4].split()[0]) > 15


# ------------------------------------------------------------------ ResNet and GT-DDP
def _small(name, n=48):
    """The first ``n`` training and evaluation samples of a dataset (fast runs)."""
    import dataclasses
    ds = data.load(name)
    return dataclasses.replace(ds, X_train=ds.X_train[:n], y_train=ds.y_train[:n],
                               X_eval=ds.X_eval[:n], y_eval=ds.y_eval[:n])


@pytest.mark.parametrize("shape,conv", [((1, 8, 8), torch.nn.Conv2d),
                                        ((1, 40), torch.nn.Conv1d)])
def test_resnet_has_identity_and_projection_shortcuts_on_the_stage_graph(shape, conv):
    import nnbridge
    from nnbridge.models import resnet
    model = resnet(shape, 10)
    assert not isinstance(model, torch.nn.Sequential)
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)
            } == {conv}
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    g = nnbridge.graph_stages(model)
    # stem conv + BN, block 1 (identity: a residual across conv1, bn1, conv2, bn2),
    # block 2 (projection: its conv and BN are players where the residual merges, at
    # bn2), fc, head; BatchNorm affine parameters are stages
    assert [len(s.players) for s in g.stages] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 1, 1]
    assert [len(s.inputs) - 1 for s in g.stages] == [0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0]
    sc = g.stages[9].players[1].module
    assert sc.kernel_size in ((1, 1), (1,)) and sc.stride in ((2, 2), (2,))


def test_gtddp_optimizer_names():
    import nnbridge
    from nnbridge.models import resnet
    from nnbridge.training import DEFAULT_LR, OPTIMIZERS, make_optimizer
    assert parse_optimizer("gtddp", "rmsprop") == ("gtddp-rmsprop", "rmsprop")
    assert parse_optimizer("GTDDP-identity") == ("gtddp-sgd", "identity")
    assert parse_optimizer("gtddp_ekfac") == ("gtddp-ekfac", "ekfac")
    for c in ("sgd", "rmsprop", "adam", "ekfac"):
        assert f"gtddp-{c}" in OPTIMIZERS
        assert DEFAULT_LR[f"gtddp-{c}"] == DEFAULT_LR[f"ddpnopt-{c}"]
    model = resnet((1, 8, 8), 10)
    opt = make_optimizer("gtddp-adam", model, 1e-3)     # BN affine: stages, no warning
    assert isinstance(opt, nnbridge.GTDDP) and opt.param_groups[0]["feedback"]
    assert type(opt.curvature).__name__ == "Adam"
    base = make_optimizer("ekfac", model, 0.1)          # per-layer EKFAC, any network
    assert type(base) is nnbridge.EKFAC and not base.param_groups[0]["feedback"]
    assert isinstance(make_optimizer("ekfac", torch.nn.Sequential(torch.nn.Linear(2, 2)),
                                     0.1), nnbridge.EKFAC)


@pytest.mark.filterwarnings("ignore:GTDDP. the parameters")
@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
@pytest.mark.parametrize("opt", ["gtddp-sgd", "gtddp-ekfac", "ekfac"])
def test_resnet_runs_with_gtddp(dataset, opt):
    if dataset == "mnist1d":
        pytest.importorskip("mnist1d")
    r = run(RunConfig(dataset=dataset, model="resnet", optimizer=opt, epochs=1,
                      batch_size=16, seed=0), _small(dataset))
    assert len(r.history["step"]) == 3 and r.skipped_steps == 0
    assert all(math.isfinite(v) for v in r.history["train_loss"])
    assert 0 <= r.test_accuracy <= 1


@pytest.mark.filterwarnings("ignore:GTDDP. the parameters")
def test_cli_resnet_with_gtddp_on_digits(capsys):
    assert train.main(["--model", "resnet", "--optimizer", "sgd,gtddp", "--curvature",
                       "sgd", "--epochs", "1", "--seeds", "1", "--batch-size", "512",
                       "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| sgd |" in table and "| gtddp-sgd |" in table and "nan" not in table


def test_cli_resnet_on_mnist1d(capsys):
    pytest.importorskip("mnist1d")
    assert train.main(["--dataset", "mnist1d", "--model", "resnet", "--optimizer", "adam",
                       "--epochs", "1", "--seeds", "1", "--batch-size", "256",
                       "--no-progress"]) == 0
    assert "| adam |" in capsys.readouterr().out


def test_cli_resnet_refuses_tabular_data():
    p = subprocess.run([sys.executable, "-m", "nnbridge.train", "--no-progress", "--dataset",
                        "iris", "--model", "resnet"], capture_output=True, text=True)
    assert p.returncode == 2 and "--model resnet needs image or signal data" in p.stderr
    assert "Traceback" not in p.stderr


def test_terminal_hessian_reaches_ddpnopt_and_not_the_baselines():
    """RunConfig.terminal_hessian (--terminal-hessian): DDPNOpt trains differently with
    "ggn" than with "fisher"; a torch.optim baseline ignores it (identical runs); an
    unknown name is refused."""
    def losses(opt, th):
        cfg = RunConfig(optimizer=opt, epochs=1, terminal_hessian=th)
        return run(cfg).history["train_loss"]
    assert losses("ddpnopt-sgd", "ggn") != losses("ddpnopt-sgd", "fisher")
    assert losses("sgd", "ggn") == losses("sgd", None)
    with pytest.raises(InvalidArgumentError, match="terminal_hessian"):
        RunConfig(terminal_hessian="hessian")


def test_a_refused_run_leaves_no_empty_folder(tmp_path, capsys):
    """--out and --checkpoint-dir are tried for writing before training; a run refused
    after that (here: a CNN on tabular data) leaves no folder behind (it left empty
    ones); a run that trains makes them."""
    out, ck = tmp_path / "a" / "out", tmp_path / "ck"
    with pytest.raises(SystemExit) as e:
        train.main(["--epochs", "1", "--seeds", "1", "--optimizer", "adam", "--dataset",
                    "iris", "--model", "cnn", "--no-progress", "--out", str(out),
                    "--checkpoint-dir", str(ck)])
    assert e.value.code == 2 and "--model cnn" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not ck.exists()
    assert train.main(["--epochs", "1", "--seeds", "1", "--optimizer", "adam", "--dataset",
                       "iris", "--no-progress", "--out", str(out), "--checkpoint-dir",
                       str(ck)]) == 0
    assert (out / "results.json").exists() and any(ck.iterdir())


def test_evaluation_is_in_eval_mode_and_leaves_batchnorm_statistics_alone(monkeypatch):
    """The accuracies the command reports are the model's in eval mode (running
    statistics, as a user evaluates it), and evaluating does not feed the evaluation data
    into the running statistics: only the training steps' forward passes count."""
    import nnbridge.training as training
    made = []

    def capture(*args, **kwargs):
        made.append(training_default(*args, **kwargs))
        return made[-1]
    training_default = training.default_model
    monkeypatch.setattr(training, "default_model", capture)
    seen = []
    real = training._evaluate

    def spy(model, X, y):
        out = real(model, X, y)
        seen.append(model.training)  # the mode is restored after
        model.eval()
        with torch.no_grad():
            ref = float((model(X).argmax(-1) == y).double().mean())
        model.train(seen[-1])
        assert out[1] == ref, "the reported accuracy is not the eval-mode one"
        return out
    monkeypatch.setattr(training, "_evaluate", spy)
    r = run(RunConfig(dataset="digits", model="resnet", optimizer="sgd", epochs=2,
                      batch_size=16, seed=0), _small("digits"))
    model = made[0]
    steps = len(r.history["step"])
    assert steps == 6 and seen == [True] * 6  # before training, then 2 an epoch
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert int(bn.num_batches_tracked) == steps
