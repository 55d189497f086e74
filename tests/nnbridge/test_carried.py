"""DDPNOpt's backward pass carries the value gradient as V_x = K + Z a, K the gradient the
training loop's backward pass sent to each stage's module (recorded), and pulls back only
the value's directions.  Float64: the step equals the step of the plain pull-back of V_x,
the carried path is taken where the record is the pull-back, and it is refused (the plain
pull-back runs) where something else entered the recorded gradients: a penalty on the
activations, a second consumer of a stage input, a detach."""

import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import nnbridge
from nnbridge.ddpnopt import DDPNOpt
from nnbridge.stages import StageLinearization


class Net(nn.Module):
    """A custom module (not an nn.Sequential) with an in-place ReLU, optionally with a
    penalty on a stage input or on a pre-activation (added to the loss)."""

    def __init__(self, extra=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8)
        self.fc3, self.fc4 = nn.Linear(8, 8), nn.Linear(8, 4)
        self.extra = extra
        self.penalty = None

    def forward(self, x):
        h1 = torch.tanh(self.fc1(x))
        h2 = F.relu(self.fc2(h1), inplace=True)
        if self.extra == "penalty":          # on a stage input
            self.penalty = 1e-2 * (h2 ** 2).sum()
        z3 = self.fc3(h2)
        if self.extra == "pre_penalty":      # on a pre-activation
            self.penalty = 1e-2 * (z3 ** 2).sum()
        return self.fc4(torch.tanh(z3))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.ReLU(inplace=True),
                         nn.Linear(8, 4))


def _run(model_fn, shape, carried, monkeypatch, steps=2, *, dtype=torch.float64, batch=5,
         autocast=False, **kw):
    """Parameters after ``steps`` DDPNOpt steps (model and data in ``dtype``, the forward
    pass under a bf16 autocast if asked) and, per stage pull-back, whether the stage
    returned a carried one."""
    torch.manual_seed(0)
    model = model_fn().to(dtype)
    monkeypatch.setattr(DDPNOpt, "_carries_gradient", carried)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = nnbridge.DDPNOpt(model, **kw)
    monkeypatch.undo()
    taken = []
    orig = StageLinearization.carried_pullback

    def spy(self, K):
        out = orig(self, K)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(StageLinearization, "carried_pullback", spy)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(batch, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (batch,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(X), y)
        if getattr(model, "penalty", None) is not None:
            loss = loss + model.penalty
        loss.backward()
        opt.step()
    monkeypatch.undo()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), taken


OPTS = [dict(lr=1e-2, curvature="adam"),                          # rank one (Fisher)
        dict(lr=0.1, curvature="identity", terminal_hessian="ggn"),  # rank r
        dict(lr=1e-2, curvature="rmsprop", value_recursion="per_sample"),
        # update_freq=1: with B = 5 samples EKFAC's Kronecker factors are rank
        # deficient, and an eigenbasis kept from an earlier step rotates its degenerate
        # (null) subspace with the last bit of the factors' inputs: the next step then
        # moves by ~1e-5 under any rounding change, carried or not
        dict(lr=0.05, curvature="ekfac", value_psd=False, update_freq=1)]


@pytest.mark.parametrize("kw", OPTS, ids=lambda kw: kw["curvature"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_carried_step_equals_the_plain_pull_back(model, kw, monkeypatch):
    fn, shape = (Net, (6,)) if model == "mlp" else (_cnn, (1, 6, 6))
    a, taken = _run(fn, shape, True, monkeypatch, **kw)
    b, none = _run(fn, shape, False, monkeypatch, **kw)
    assert taken and all(taken) and none == []
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("extra", ["penalty", "pre_penalty"])
def test_a_gradient_the_dynamics_do_not_explain_is_not_carried(extra, monkeypatch):
    """A penalty on a stage input or on a pre-activation adds to the recorded gradients:
    the stage that sees the difference refuses the carried pull-back (and so do the
    stages before it), and the step is the plain pull-back's, which models the terminal
    loss and the dynamics only, as before."""
    a, taken = _run(lambda: Net(extra), (6,), True, monkeypatch, lr=1e-2)
    b, _ = _run(lambda: Net(extra), (6,), False, monkeypatch, lr=1e-2)
    # the stage whose output the penalty reads refuses (stage 1 for its input h2, stage
    # 2 for its pre-activation), the later ones carry, the earlier ones get nothing
    assert taken == ([True, True, False] if extra == "penalty" else [True, False]) * 2
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dense_values_and_gtddp_do_not_record_input_gradients(monkeypatch):
    """value_hessian='full' has no directions to carry with; GT-DDP's graph stages pull
    the gradient back themselves: neither takes the carried path."""
    _, taken = _run(Net, (6,), True, monkeypatch, lr=1e-2, value_hessian="full")
    assert taken == []
    torch.manual_seed(0)
    opt = nnbridge.GTDDP(Net().double(), lr=1e-2)
    assert not opt._recorder.input_grads


def test_float32_saturated_tanh_keeps_the_carried_path(monkeypatch):
    """float32 with saturated tanh units: sigma' = 1 - y^2 carries an absolute rounding
    error of ~eps that autograd's tanh backward rounds otherwise (measured up to 108 eps
    relative to |sigma' K|, 0.5 eps of |K|): the check's |K| term accepts it, and the
    step is the plain pull-back's up to float32 rounding."""
    def net():
        m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
        with torch.no_grad():
            for lin in (m[0], m[2]):
                lin.weight.mul_(6.0)          # most units saturate
        return m

    f32 = dict(dtype=torch.float32, batch=64, steps=1, lr=1e-2)
    a, taken = _run(net, (6,), True, monkeypatch, **f32)
    b, _ = _run(net, (6,), False, monkeypatch, **f32)
    assert taken == [True, True]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_norm_stage_before_a_flatten(monkeypatch):
    """A BatchNorm stage whose post ends with nn.Flatten: its sigma' comes from the
    recomputed pre-activation (not from one sample's layer output), it does not carry,
    and the step equals the plain pull-back's."""
    def net():
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8, 4))

    a, taken = _run(net, (6,), True, monkeypatch, lr=1e-2)
    b, _ = _run(net, (6,), False, monkeypatch, lr=1e-2)
    assert taken == [True, False] * 2       # the last Linear carries, the Norm stage not
    # two steps through the batch statistics: rounding differences (1e-16 in the carried
    # V_x) grow to ~1e-10 relative in one element; a wrong pull-back would be O(1)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_autocast_records_are_not_carried(monkeypatch):
    """Under a bf16 autocast the gradients autograd sent to the stage inputs are bf16
    products: the recorder drops them (the DDP pass pulls V_x back in float32 itself),
    while a float32 run of the same ReLU network carries at every stage."""
    def net():
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                             nn.Linear(16, 4))

    f32 = dict(dtype=torch.float32, batch=32, steps=1, lr=1e-2)  # autocast: float32 only
    assert _run(net, (6,), True, monkeypatch, **f32)[1] == [True, True]
    assert _run(net, (6,), True, monkeypatch, autocast=True, **f32)[1] == []
