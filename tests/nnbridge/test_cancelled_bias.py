"""A layer's bias right before a BatchNorm that normalizes with the batch's statistics:
the BatchNorm removes it from every sample's output, its gradient is zero, and under an
adaptive diagonal curvature (``lr / (sqrt(v) + eps)`` of that zero gradient) DDPNOpt's
feedback used to drive it without bound -- the training loss looked normal, evaluation
mode (running statistics) gave chance accuracy (``docs/ddpnopt.md``, "A bias before
BatchNorm")."""

import pytest
import torch
from torch import nn
from torch.nn import functional

import nnbridge
from nnbridge.ddpnopt import DDPNOpt
from nnbridge.stages import StageLinearization


def _digits_like(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 1, 8, 8, generator=g)
    y = (X[:, 0, :4].mean((1, 2)) * 10).long().clamp(0, 9)
    return X, y


def _cnn(linear=False):
    torch.manual_seed(0)
    if linear:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                             nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
                             nn.Linear(32, 10))
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))


def _train(model, opt, X, y, steps=24, batch=64):
    for i in range(steps):
        j = (i * batch) % X.shape[0]
        opt.zero_grad()
        functional.cross_entropy(model(X[j:j + batch]), y[j:j + batch]).backward()
        opt.step()


def _biases(model):
    return [m.bias.detach().clone() for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("curvature", ["adam", "rmsprop"])
@pytest.mark.parametrize("linear", [False, True])
def test_bias_before_batchnorm_stays_where_adam_leaves_it(curvature, linear, monkeypatch):
    """The cancelled biases move as under the first-order step alone (bounded by the
    rate); with the rule switched off they run away (the test can fail)."""
    X, y = _digits_like()
    lr = 5e-3
    ref = _cnn(linear)
    _train(ref, nnbridge.DDPNOpt(ref, lr=lr, curvature=curvature, feedback=False), X, y)
    model = _cnn(linear)
    _train(model, nnbridge.DDPNOpt(model, lr=lr, curvature=curvature), X, y)
    moved = [float(b.norm()) for b in _biases(model)[:-1]]   # the last has no BatchNorm
    bound = [float(b.norm()) + 24 * lr * b.numel() ** 0.5 for b in _biases(ref)[:-1]]
    assert all(m <= b for m, b in zip(moved, bound)), (moved, bound)
    monkeypatch.setattr(DDPNOpt, "_bias_cancelled", lambda self, t: False)
    broken = _cnn(linear)
    _train(broken, nnbridge.DDPNOpt(broken, lr=lr, curvature=curvature), X, y)
    assert max(float(b.norm()) for b in _biases(broken)[:-1]) > 10 * max(bound)


def test_rule_takes_only_a_bias_the_batchnorm_removes():
    """Adaptive diagonal curvatures only; a BatchNorm in evaluation mode (running
    statistics) or a ReLU between them keeps the bias; no bias, nothing to leave out."""
    m = _cnn()
    assert [DDPNOpt(m, curvature="adam")._bias_cancelled(t) for t in range(5)] == [
        True, False, True, False, False]
    assert not any(DDPNOpt(m, curvature=c)._bias_cancelled(t) for c in ("identity", "ekfac")
                   for t in range(5))
    m.eval()
    assert not any(DDPNOpt(m, curvature="adam")._bias_cancelled(t) for t in range(5))
    relu_first = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert not any(DDPNOpt(relu_first, curvature="adam")._bias_cancelled(t) for t in range(3))
    nobias = nn.Sequential(nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert not any(DDPNOpt(nobias, curvature="adam")._bias_cancelled(t) for t in range(3))


@pytest.mark.parametrize("conv", [False, True])
def test_linearization_leaves_the_cancelled_bias_out(conv):
    """With ``cancelled_bias`` the control gradient's and ``gu``'s bias entries are 0 and
    the weight entries those of the plain linearization (float64)."""
    torch.manual_seed(1)
    layer = nn.Conv2d(2, 3, 3, padding=1).double() if conv else nn.Linear(4, 3).double()
    st = DDPNOpt(nn.Sequential(layer, nn.BatchNorm1d(3) if not conv else nn.BatchNorm2d(3),
                               nn.Flatten(), nn.Linear(3 * (16 if conv else 1), 2).double()
                               ).double(), curvature="adam")._stages[0]
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64) if conv else torch.randn(
        5, 4, dtype=torch.float64)
    plain, cut = StageLinearization(st, x), StageLinearization(st, x, cancelled_bias=True)
    h = torch.randn(5, *plain.h_shape, dtype=torch.float64)
    g0, g1 = plain.control_gradient(h), cut.control_gradient(h)
    assert torch.equal(g1[..., -1], torch.zeros_like(g1[..., -1]))
    assert torch.allclose(g1[..., :-1], g0[..., :-1], rtol=0, atol=1e-12)
    assert g0[..., -1].abs().max() > 1e-3
    G = torch.randn_like(plain.U)
    G_bias_only = torch.zeros_like(G)
    G_bias_only[..., -1] = G[..., -1]
    assert cut.gu(G_bias_only).abs().max() == 0
    assert torch.allclose(cut.gu(G - G_bias_only), plain.gu(G - G_bias_only), atol=1e-12)


class _Res(nn.Module):
    """A residual block with biases before every BatchNorm (PyTorch's layer defaults)."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        h = functional.relu(self.b0(self.c0(x)))
        r = functional.relu(self.b1(self.c1(h)))
        return self.fc(functional.relu(h + self.b2(self.c2(r))).flatten(1))


def test_gtddp_bias_before_batchnorm_stays_bounded(monkeypatch):
    """GTDDP(adam) on a residual network: the biases feeding BatchNorms stay within the
    first-order step's reach; with the rule switched off they run away."""
    from nnbridge.graph import GraphStage

    X, y = _digits_like()
    lr = 5e-3

    def run():
        torch.manual_seed(0)
        model = _Res()
        opt = nnbridge.GTDDP(model, lr=lr, curvature="adam")
        _train(model, opt, X, y, steps=12)
        return max(float(m.bias.detach().norm()) for m in (model.c0, model.c1, model.c2))

    kept = run()
    assert kept <= 0.6 + 12 * lr * 2, kept    # init <= ~0.6, each step <= lr per entry
    monkeypatch.setattr(GraphStage, "bias_before_batchnorm", lambda self, j: False)
    assert run() > 10 * kept


def test_graph_rule_takes_only_a_bias_the_batchnorm_removes():
    torch.manual_seed(0)
    opt = nnbridge.GTDDP(_Res(), curvature="adam")
    found = {(t, j): gs.bias_before_batchnorm(j) for t, gs in enumerate(opt._graph.stages)
             for j in range(len(gs.players))}
    names = {(t, j): type(p.module).__name__ for t, gs in enumerate(opt._graph.stages)
             for j, p in enumerate(gs.players)}
    assert {names[k] for k, v in found.items() if v} == {"Conv2d"}
    assert sum(found.values()) == 3   # c0, c1, c2; not the BatchNorms, not fc
    m = _Res().eval()
    assert not any(gs.bias_before_batchnorm(j) for gs in nnbridge.GTDDP(
        m, curvature="adam")._graph.stages for j in range(len(gs.players)))
