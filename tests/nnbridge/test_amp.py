"""Loss scaling with ``torch.amp.GradScaler`` (``nnbridge/amp.py``): the optimizers take
the unscaled loop's steps.

The scale is a power of two, so a scaled backward pass without overflow gives the
gradients times S exactly, and the steps must equal the unscaled loop's bit for bit.
Until session 29 DDPNOpt / GT-DDP / EMSA refused the scaled loss as a "summed" one and
EKFAC took its S^2-scaled factors silently (its parameters 0.12 off in 5 steps)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import nnbridge
from trajopt.errors import InvalidArgumentError

from .conftest import data

pytestmark = pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"),
                                reason="torch.amp.GradScaler on the CPU needs torch >= 2.3")

OPTIMIZERS = {
    "ddpnopt-adam": lambda m, **kw: nnbridge.DDPNOpt(m, lr=1e-2, **kw),
    "ddpnopt-ekfac": lambda m, **kw: nnbridge.DDPNOpt(m, curvature="ekfac", **kw),
    "ddpnopt-identity-per-sample": lambda m, **kw: nnbridge.DDPNOpt(
        m, curvature="identity", value_recursion="per_sample", **kw),
    "ddpnopt-adam-no-feedback": lambda m, **kw: nnbridge.DDPNOpt(m, feedback=False, **kw),
    "gtddp-adam": lambda m, **kw: nnbridge.GTDDP(m, lr=1e-2, **kw),
    "gtddp-ekfac": lambda m, **kw: nnbridge.GTDDP(m, curvature="ekfac", **kw),
    "ekfac": lambda m, **kw: nnbridge.EKFAC(m, **kw),
    "gtekfac": lambda m, **kw: nnbridge.GTEKFAC(m, **kw),
    "emsa": lambda m, **kw: nnbridge.EMSA(m, lr=0.2, **kw),
}


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3)).to(dtype)


def _train(name, scaler=None, *, dtype=torch.float64, steps=3, clip=None, pass_scaler=False,
           autocast=False):
    """``steps`` steps of the usual AMP loop (``scaler=None``: the plain loop); with
    ``clip``, the gradients are unscaled (``scaler.unscale_``) and clipped before the
    step. Returns the parameters and the optimizer."""
    X, y = data(B=8 * steps)
    model = _model(dtype)
    opt = OPTIMIZERS[name](model, **({"grad_scaler": scaler} if pass_scaler else {}))
    for xb, yb in zip(X.split(8), y.split(8)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(xb.to(dtype)), yb)
        if scaler is None:
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            continue
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()], opt


def _scaler(**kw):
    # growth every step: the scale differs between steps (2^10, 2^11, ...)
    return torch.amp.GradScaler("cpu", **{"init_scale": 2.0 ** 10, "growth_interval": 1,
                                          **kw})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_scaled_loss_takes_the_unscaled_steps(name, dtype):
    plain, _ = _train(name, dtype=dtype)
    scaler = _scaler()
    scaled, _ = _train(name, scaler, dtype=dtype)
    assert scaler.get_scale() == 2.0 ** 13     # three steps taken, none skipped
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))


@pytest.mark.parametrize("name", ["ddpnopt-adam", "gtddp-ekfac", "ekfac"])
def test_under_autocast(name):
    """bf16 autocast and a scaler, the usual mixed-precision loop (on the CPU)."""
    plain, _ = _train(name, dtype=torch.float32, autocast=True)
    scaled, _ = _train(name, _scaler(), dtype=torch.float32, autocast=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))


@pytest.mark.parametrize("name", ["ddpnopt-adam", "ddpnopt-ekfac", "gtddp-adam", "emsa"])
def test_unscaled_and_clipped_before_the_step_with_the_scaler_passed(name):
    """torch's recipe for clipping under a scaler (``scaler.unscale_(opt)``, clip,
    ``scaler.step(opt)``): equal to clipping the unscaled gradients."""
    plain, _ = _train(name, clip=0.05)
    scaled, _ = _train(name, _scaler(), clip=0.05, pass_scaler=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))


def test_unscaled_before_the_step_without_the_scaler_is_refused():
    model = _model(torch.float64)
    opt = nnbridge.DDPNOpt(model)
    scaler = _scaler()
    X, y = data(B=8)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(F.cross_entropy(model(X), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(InvalidArgumentError, match=r"grad_scaler=scaler"):
        scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["ddpnopt-adam", "ddpnopt-ekfac", "ekfac", "emsa"])
def test_an_overflowing_step_is_skipped_with_the_state_untouched(name):
    """An inf in the first step's gradients (an overflow): the scaler finds it, the step
    is skipped (no parameter, no state moved) and its record dropped; from the lowered
    scale on, the steps are the plain loop's on the later batches."""
    X, y = data(B=24)
    model = _model(torch.float64)
    opt = OPTIMIZERS[name](model)
    scaler = _scaler()
    before = [p.detach().clone() for p in model.parameters()]
    for k, (xb, yb) in enumerate(zip(X.split(8), y.split(8))):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(xb), yb)).backward()
        if k == 0:
            with torch.no_grad():
                model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if k == 0:
            assert scaler.get_scale() == 2.0 ** 9
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert not opt.state
    plain = _model(torch.float64)
    opt2 = OPTIMIZERS[name](plain)
    for xb, yb in zip(X[8:].split(8), y[8:].split(8)):
        opt2.zero_grad()
        F.cross_entropy(plain(xb), yb).backward()
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


def test_a_refused_scaled_step_leaves_no_scale_on_the_optimizer():
    """The scaler removes ``grad_scale`` / ``found_inf`` only after a step that returns;
    after a refused one a plain ``step()`` must not divide by a stale scale."""
    model = _model(torch.float64)
    opt = nnbridge.DDPNOpt(model, lr=1e-2)
    scaler = _scaler()
    X, y = data(B=16)
    scaler.scale(F.cross_entropy(model(X[:8]), y[:8])).backward()
    scaler.unscale_(opt)
    with pytest.raises(InvalidArgumentError):
        scaler.step(opt)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    plain = _model(torch.float64)
    opt2 = nnbridge.DDPNOpt(plain, lr=1e-2)
    for m, o in ((model, opt), (plain, opt2)):
        o.zero_grad()
        F.cross_entropy(m(X[8:]), y[8:]).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


def test_without_feedback_a_first_order_step_needs_no_scaler_after_unscale():
    """``feedback=False`` with Adam reads only ``p.grad`` (unscaled by the scaler): the
    clipping recipe works without ``grad_scaler=``, equal to the plain loop."""
    plain, _ = _train("ddpnopt-adam-no-feedback", clip=0.05)
    scaled, _ = _train("ddpnopt-adam-no-feedback", _scaler(), clip=0.05)
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))
