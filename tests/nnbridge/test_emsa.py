"""E-MSA (nnbridge.EMSA): the extended Hamiltonian and its maximization step against a
direct computation on a tiny network (plain autograd on the layers' weights, written
here), the first ascent step against SGD, training, and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nnbridge
from nnbridge.emsa import extended_hamiltonian
from trajopt.errors import InvalidArgumentError, SkippedStepWarning, UnsupportedModelError

DT = torch.float64


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _data(seed=1, S=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, 3, generator=g, dtype=DT), torch.randn(S, 2, generator=g, dtype=DT)


def _direct_step(net, x, y, lr, rho, steps):
    """E-MSA written out for Linear-Tanh-Linear with an MSE loss (mean over the batch):
    states, per-sample costates (p_T = -grad of each sample's loss), and per layer the
    gradient ascent on the batch mean of
    p'f - rho/2 |x_next - f|^2 - rho/2 |p - d(p'f)/dx|^2."""
    W1, b1, W2, b2 = (p.detach() for p in net.parameters())
    S = x.shape[0]
    layers = [lambda z, W, b: torch.tanh(z @ W.T + b), lambda z, W, b: z @ W.T + b]
    x1 = layers[0](x, W1, b1)
    x2 = layers[1](x1, W2, b2)
    p2 = -2 * (x2 - y) / y.shape[1]          # -grad of mean((x2 - y)^2) per sample
    p1 = p2 @ W2                              # d(p2'(W2 x1 + b2))/dx1
    p0 = ((p1 * (1 - x1 ** 2)) @ W1)
    states, costates = [x, x1, x2], [p0, p1, p2]
    out = []
    for t, (W, b) in enumerate(((W1, b1), (W2, b2))):
        W, b = W.clone(), b.clone()
        for _ in range(steps):
            W.requires_grad_()
            b.requires_grad_()
            z = states[t].clone().requires_grad_()
            f = layers[t](z, W, b)
            H = (costates[t + 1] * f).sum()
            (Hx,) = torch.autograd.grad(H, z, create_graph=True)
            val = (H - 0.5 * rho * ((states[t + 1] - f) ** 2).sum()
                   - 0.5 * rho * ((costates[t] - Hx) ** 2).sum()) / S
            gW, gb = torch.autograd.grad(val, (W, b))
            W, b = (W + lr * gW).detach(), (b + lr * gb).detach()
        out += [W, b]
    return out


def _loss(net, x, y):
    return ((net(x) - y) ** 2).mean()


@pytest.mark.parametrize("rho,steps", [(0.0, 1), (1.0, 4), (5.0, 3)])
def test_step_equals_the_direct_computation(rho, steps):
    net = _net()
    x, y = _data()
    want = _direct_step(net, x, y, 0.3, rho, steps)
    opt = nnbridge.EMSA(net, lr=0.3, rho=rho, inner_steps=steps)

    def closure():
        opt.zero_grad()
        loss = _loss(net, x, y)
        loss.backward()
        return loss
    opt.step(closure)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_penalties_vanish_at_the_current_weights_and_first_step_is_sgd():
    """At the current weights the extended Hamiltonian is the plain one (the penalties
    are zero) and its gradient is minus the loss gradient: one ascent step = SGD."""
    net, ref = _net(), _net()
    x, y = _data()
    opt = nnbridge.EMSA(net, lr=0.2, rho=10.0, inner_steps=1)
    loss = _loss(net, x, y)
    opt.zero_grad()
    loss.backward()
    st = opt._stages[1]
    rec = opt._recorder.batch(DT)
    xs = rec.inputs + [rec.output]
    ps = opt.costates(rec.inputs, rec.output_grad)
    U = st.control()
    plain = (ps[2] * st.forward(xs[1], U)).sum() / x.shape[0]
    torch.testing.assert_close(extended_hamiltonian(st, U, xs[1], ps[2], xs[2], ps[1], 10.0),
                               plain, rtol=1e-14, atol=1e-14)
    opt.step()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.2)
    sgd.zero_grad()
    _loss(ref, x, y).backward()
    sgd.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13)


def test_trains_digits():
    """A Linear-Tanh MLP on scikit-learn's digits: the loss falls in 30 iterations."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:256] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[:256])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).float()
    opt = nnbridge.EMSA(net, lr=0.2, rho=0.5, inner_steps=3)
    losses = []
    for _ in range(30):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(X), y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_bad_input_and_skipped_steps():
    net = _net()
    with pytest.raises(InvalidArgumentError, match="lr must be positive"):
        nnbridge.EMSA(net, lr=0.0)
    with pytest.raises(InvalidArgumentError, match="inner_steps"):
        nnbridge.EMSA(net, inner_steps=0)
    with pytest.raises(InvalidArgumentError, match="rho"):
        nnbridge.EMSA(net, rho=-1.0)
    with pytest.raises(TypeError, match="needs the model"):
        nnbridge.EMSA(list(net.parameters()))
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError):
        nnbridge.EMSA(bn)
    opt = nnbridge.EMSA(net)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = _data()

    def bad():
        opt.zero_grad()
        loss = _loss(net, x, y) * float("nan")
        loss.backward()
        return loss
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt.step(bad)
    assert any(issubclass(v.category, SkippedStepWarning) for v in w)
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match="needs a recorded forward and backward"):
        opt.step()


def test_emsa_keeps_a_frozen_layer_and_refuses_training_mode_dropout():
    """A frozen layer moved under EMSA (its Hamiltonian step ran anyway); a Dropout in
    training mode made the re-run stages draw another mask than the recorded pass."""
    from torch.nn import functional as F  # noqa: N812
    X, y = _data()
    model = _net()
    model[0].requires_grad_(False)
    opt = nnbridge.EMSA(model, lr=0.1)
    frozen = model[0].weight.detach().clone()

    def closure(m=model, o=opt):
        o.zero_grad()
        loss = F.mse_loss(m(X), y)
        loss.backward()
        return loss
    opt.step(closure)
    assert torch.equal(frozen, model[0].weight)
    assert not torch.equal(_net()[-1].weight, model[-1].weight)  # the others moved
    torch.manual_seed(0)
    dropped = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5),
                            nn.Linear(6, 2)).to(DT)
    opt = nnbridge.EMSA(dropped, lr=0.1)
    with pytest.raises(InvalidArgumentError, match="Dropout"):
        opt.step(lambda: closure(dropped, opt))
    model[0].weight.requires_grad_(True)  # the bias alone frozen: refused, not moved
    opt = nnbridge.EMSA(model, lr=0.1)
    with pytest.raises(InvalidArgumentError, match="frozen in part"):
        opt.step(lambda: closure(model, opt))


def test_a_regression_with_a_flat_output_equals_sgd():
    """A (B,) output (``.squeeze(-1)`` after the last Linear) and an MSE loss: the
    Hamiltonian indexed a second dimension it does not have (IndexError, a user's trial);
    one ascent step with rho = 0 is SGD's step."""
    class Reg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 5), torch.nn.Linear(5, 1)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))).squeeze(-1)
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    net = Reg().double()
    ref = Reg().double()
    ref.load_state_dict(net.state_dict())
    opt = nnbridge.EMSA(net, lr=0.2, rho=0.0, inner_steps=1)
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    opt.step()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.2)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    sgd.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13)


def test_a_summed_cross_entropy_is_refused_and_the_step_not_taken():
    """EMSA takes any loss, but a softmax cross-entropy summed over the batch (B times
    the costates: weights 1.3e8 after one step in a user trial) is refused by name, the
    weights untouched; the batch mean and a mean squared error pass."""
    import torch.nn.functional as F  # noqa: N812
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = nnbridge.EMSA(m)
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    before = [p.detach().clone() for p in m.parameters()]
    F.cross_entropy(m(X), y, reduction="sum").backward()
    with pytest.raises(InvalidArgumentError, match="reduction='sum'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    for loss in (lambda o: F.cross_entropy(o, y), lambda o: F.mse_loss(o, torch.ones(16, 3))):
        opt.zero_grad()
        loss(m(X)).backward()
        opt.step()
