"""The operator step's per-sample shortcuts (the feedback read off the pulled-back factor,
the downdate from the response's Gram matrix in control space) are exact where the stage
acts sample by sample, and are not taken where it does not (BatchNorm in training mode
couples the samples): a step with the shortcuts forced on or off, float64."""

import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import nnbridge
from nnbridge.graph_ops import GraphLinearization
from nnbridge.models import resnet
from nnbridge.stages import StageLinearization


def _step(model_fn, opt_fn, force, monkeypatch, bn_train=True):
    torch.manual_seed(0)
    model = model_fn().double()
    model.train(bn_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opt_fn(model)
    if force is not None:
        for cls in (StageLinearization, GraphLinearization):
            monkeypatch.setattr(cls, "samplewise", property(lambda self, f=force: f))
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=g)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    monkeypatch.undo()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(4, 4, 3, padding=1, stride=2, groups=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64, 10))


OPTS = {
    "gtddp-adam-ggn": lambda m: nnbridge.GTDDP(m, lr=1e-2, curvature="adam"),
    "gtddp-ekfac": lambda m: nnbridge.GTDDP(m, lr=0.05, curvature="ekfac"),
    "ddpnopt-adam": lambda m: nnbridge.DDPNOpt(m, lr=1e-2, curvature="adam"),
    "ddpnopt-sgd-ggn": lambda m: nnbridge.DDPNOpt(m, lr=0.1, curvature="identity",
                                                  terminal_hessian="ggn"),
}


@pytest.mark.parametrize("name", sorted(OPTS))
def test_shortcuts_are_exact_on_samplewise_stages(name, monkeypatch):
    """Without batch coupling (a CNN; the ResNet with BatchNorm in eval mode) the shortcuts
    give the step of the plain path to 1e-10, and they are taken."""
    model_fn = _cnn if name.startswith("ddpnopt") else (lambda: resnet((1, 8, 8), 10))
    on = _step(model_fn, OPTS[name], True, monkeypatch, bn_train=False)
    off = _step(model_fn, OPTS[name], False, monkeypatch, bn_train=False)
    auto = _step(model_fn, OPTS[name], None, monkeypatch, bn_train=False)
    scale = off.abs().max()
    assert (on - off).abs().max() <= 1e-10 * scale
    assert (auto - on).abs().max() <= 1e-12 * scale


def test_batchnorm_in_training_mode_is_detected(monkeypatch):
    """BatchNorm in training mode couples the samples: the per-sample shortcuts would give
    another step (so forcing them on differs), and the detected path is the plain one."""
    fn = OPTS["gtddp-adam-ggn"]
    model_fn = lambda: resnet((1, 8, 8), 10)  # noqa: E731
    on = _step(model_fn, fn, True, monkeypatch)
    off = _step(model_fn, fn, False, monkeypatch)
    auto = _step(model_fn, fn, None, monkeypatch)
    scale = off.abs().max()
    assert (on - off).abs().max() > 1e-6 * scale
    assert (auto - off).abs().max() <= 1e-12 * scale
