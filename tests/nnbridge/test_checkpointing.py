"""Activation checkpointing (``torch.utils.checkpoint``) in the model's forward pass: the
optimizers take the same steps as on the model without it.

The reentrant variant (``use_reentrant=True``, torch's default when the argument is not
given) runs the checkpointed layers under ``no_grad`` in the forward pass and again, with
gradients, inside the backward pass; until session 29 the recorder saw no gradient at
those layers, and DDPNOpt / GT-DDP took a wrong step silently (0.02 / 0.2 off in 4 steps
of a user's trial) while EKFAC refused them as layers "run under torch.no_grad()"."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import nnbridge
from trajopt.errors import UnsupportedModelError

from .conftest import data

OPTIMIZERS = {
    "ddpnopt-adam": lambda m: nnbridge.DDPNOpt(m, lr=1e-2),
    "ddpnopt-ekfac": lambda m: nnbridge.DDPNOpt(m, curvature="ekfac"),
    "ddpnopt-identity-per-sample": lambda m: nnbridge.DDPNOpt(
        m, curvature="identity", value_recursion="per_sample"),
    "gtddp-adam": lambda m: nnbridge.GTDDP(m, lr=1e-2),
    "gtddp-ekfac": lambda m: nnbridge.GTDDP(m, curvature="ekfac"),
    "ekfac": lambda m: nnbridge.EKFAC(m),
    "emsa": lambda m: nnbridge.EMSA(m, lr=0.2),
    "lqr-descent": lambda m: nnbridge.LQRDescent(m, lr=0.1),
}


class _Net(nn.Module):
    """A first layer, a checkpointed block of two layers (with dropout), an output layer."""

    def __init__(self, mode=None, preserve=True, p=0.0):
        super().__init__()
        self.mode, self.preserve = mode, preserve
        self.l0, self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(8, 3)

    def block(self, h):
        return torch.tanh(self.l2(self.drop(torch.tanh(self.l1(h)))))

    def forward(self, x):
        h = torch.tanh(self.l0(x))
        if self.mode is not None:
            h = checkpoint(self.block, h, use_reentrant=self.mode == "reentrant",
                           preserve_rng_state=self.preserve)
        else:
            h = self.block(h)
        return self.out(h)


def _train(make, mode, steps=3, batches=1, **kw):
    """``steps`` steps from a fixed start, each over ``batches`` micro-batches whose
    losses are summed before one backward pass (two forward passes in flight); the
    parameters after them."""
    X, y = data(B=8 * batches)
    torch.manual_seed(0)
    model = _Net(mode, **kw)
    opt = make(model)

    def closure():
        opt.zero_grad()
        loss = sum(F.cross_entropy(model(xb), yb) / batches
                   for xb, yb in zip(X.split(8), y.split(8)))
        loss.backward()
        return loss
    for _ in range(steps):
        torch.manual_seed(1)     # the dropout masks
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_checkpointed_block_takes_the_plain_steps(name, mode):
    """Bit for bit the steps on the model without checkpointing (float64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = _train(OPTIMIZERS[name], None)
        ckpt = _train(OPTIMIZERS[name], mode)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))


@pytest.mark.parametrize("name", ["ddpnopt-adam", "gtddp-ekfac", "ekfac"])
def test_two_forward_passes_in_one_backward_pass(name):
    """Two micro-batches' losses summed before one backward pass: both checkpointed
    blocks are recomputed in it, each matched to its own forward pass by its input."""
    plain = _train(OPTIMIZERS[name], None, batches=2)
    ckpt = _train(OPTIMIZERS[name], "reentrant", batches=2)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))


def test_dropout_in_the_block_with_the_rng_state_preserved():
    """Dropout inside the block (the DDP feedback and EMSA refuse it; EKFAC takes it):
    the recomputation draws the forward pass's masks."""
    plain = _train(OPTIMIZERS["ekfac"], None, p=0.3)
    ckpt = _train(OPTIMIZERS["ekfac"], "reentrant", p=0.3)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))


def test_a_recomputation_with_other_dropout_masks_is_refused():
    """``preserve_rng_state=False``: the recomputed block sees other dropout masks than
    the recorded pass (its gradient is not the recorded inputs'): refused by name, the
    parameters untouched."""
    X, y = data(B=8)
    torch.manual_seed(0)
    model = _Net("reentrant", preserve=False, p=0.5)
    opt = nnbridge.EKFAC(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(X), y).backward()
    with pytest.raises(UnsupportedModelError, match=r"stage 2 \(Linear\) was recomputed"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()     # the refused record is gone: a plain pass steps again
    model.mode = None
    F.cross_entropy(model(X), y).backward()
    opt.step()
    assert not torch.equal(before[0], model.l0.weight)


class _Body(nn.Module):
    def __init__(self, ckpt):
        super().__init__()
        self.ckpt = ckpt
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                                  nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if not self.ckpt:
            return self.head(self.body(x))
        with warnings.catch_warnings():   # torch asks for use_reentrant; its default
            warnings.simplefilter("ignore", UserWarning)
            return self.head(checkpoint_sequential(self.body, 2, x.requires_grad_()))


@pytest.mark.parametrize("name", ["ddpnopt-adam", "gtddp-ekfac"])
def test_checkpoint_sequential_with_torch_default(name):
    """``checkpoint_sequential`` in ``forward`` without ``use_reentrant`` (reentrant)."""
    X, y = data(B=8)
    params = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _Body(ckpt)
        opt = OPTIMIZERS[name](model)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(X.clone()), y).backward()
            opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


def _steps(mode, name, passes):
    """3 steps of ``OPTIMIZERS[name]`` on ``_Net(mode)``, each step's passes run by
    ``passes(model, X, y)``; the parameters after them."""
    X, y = data(B=8)
    torch.manual_seed(0)
    model = _Net(mode)
    opt = OPTIMIZERS[name](model)
    for _ in range(3):
        opt.zero_grad()
        passes(model, X, y)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _retained_twice(model, X, y):
    loss = F.cross_entropy(model(X), y)
    (0.5 * loss).backward(retain_graph=True)
    (0.5 * loss).backward()


def _logged_first(model, X, y):
    float(F.cross_entropy(model(X), y))     # a forward pass with gradients, no backward
    F.cross_entropy(model(X), y).backward()


@pytest.mark.parametrize("passes", [_retained_twice, _logged_first])
@pytest.mark.parametrize("name", ["ddpnopt-adam", "gtddp-ekfac", "ekfac"])
def test_a_retained_graph_and_a_stale_forward_pass(name, passes):
    """A review's cases: a retained graph run backward twice recomputes the block twice
    (the second recomputation was matched to nothing: half the gradient at the block,
    DDPNOpt 0.02 off); an earlier forward pass of the same batch with gradients (a
    logged loss) took the training pass's recomputation (0.02-0.1 off)."""
    plain = _steps(None, name, passes)
    ckpt = _steps("reentrant", name, passes)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))


class _Raise(torch.autograd.Function):
    fail = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if _Raise.fail:
            raise ArithmeticError("a backward pass that fails")
        return g


@pytest.mark.parametrize("mode", [None, "reentrant"])
def test_a_failed_backward_pass_then_the_usual_steps(mode):
    """A backward pass that raised after recomputing the block left the recorder taking
    every later pass as part of the dead one (no step ever again, a review); and after
    any failed pass the next step was refused (its chunk counted as it stood).
    ``zero_grad()`` now ends the failed pass: the steps after it are the plain ones."""
    X, y = data(B=8)
    torch.manual_seed(0)
    model = _Net(mode)
    opt = nnbridge.EKFAC(model)
    block = model.block
    model.block = lambda h: block(_Raise.apply(h))
    _Raise.fail = True
    try:
        with pytest.raises(ArithmeticError):
            F.cross_entropy(model(X), y).backward()
    finally:
        _Raise.fail = False
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    ref = _steps(None, "ekfac", lambda m, X, y: F.cross_entropy(m(X), y).backward())
    assert all(torch.equal(a, b) for a, b in zip(ref, model.parameters()))
