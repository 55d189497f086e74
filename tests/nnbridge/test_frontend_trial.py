"""Session 30's user trial (front end): random operations in ``forward``, the dropout
family, non-tensor outputs and optional ``forward`` arguments (docs/ddpnopt.md, "How a
network becomes stages" and "In a training script")."""

from __future__ import annotations

import collections
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import nnbridge
from trajopt.errors import InvalidArgumentError, UnsupportedModelError

from .conftest import closure_for, data

# the deterministic terminal Hessian: the sampled Fisher's generator is seeded from
# torch.initial_seed() at the first step (docs/ddpnopt.md), which these tests reseed
OPTIMIZERS = {
    "DDPNOpt": lambda m: nnbridge.DDPNOpt(m, curvature="adam", lr=1e-3,
                                          terminal_hessian="ggn"),
    "DDPNOpt(feedback=False)": lambda m: nnbridge.DDPNOpt(m, curvature="adam", lr=1e-3,
                                                          feedback=False),
    "GTDDP": lambda m: nnbridge.GTDDP(m, curvature="adam", lr=1e-3, terminal_hessian="ggn"),
    "EKFAC": lambda m: nnbridge.EKFAC(m),
    "EMSA": lambda m: nnbridge.EMSA(m, lr=0.1),
    "LQRDescent": lambda m: nnbridge.LQRDescent(m, lr=0.1),
}


class _Inject(nn.Module):
    """Two layers with ``op(h)`` between them (``where="stage"``) or ``op(x)`` before the
    first (``where="input"``)."""

    def __init__(self, op, where="stage"):
        super().__init__()
        self.a, self.b, self.op, self.where = nn.Linear(4, 6), nn.Linear(6, 3), op, where

    def forward(self, x):
        if self.where == "input":
            x = self.op(x)
        h = torch.tanh(self.a(x))
        if self.where == "stage":
            h = self.op(h)
        return self.b(h)


RANDOM_OPS = {
    "randn_like": lambda h: h + 1e-3 * torch.randn_like(h),
    "rand_like": lambda h: h * torch.rand_like(h),
    "randint_like": lambda h: h * torch.randint_like(h, 2),
    "randn": lambda h: h + torch.randn(h.shape),
    "rand": lambda h: h + torch.rand(h.shape),
    "randint": lambda h: h * torch.randint(0, 2, h.shape),
    "randperm": lambda h: h[:, torch.randperm(h.size(1))],
    "bernoulli": lambda h: h * torch.bernoulli(torch.sigmoid(h)),
    "normal": lambda h: torch.normal(h, 1e-3),
    "poisson": lambda h: h + torch.poisson(h.abs()),
    "multinomial": lambda h: h * torch.multinomial(torch.softmax(h, 1), 1),
    "gumbel_softmax": lambda h: F.gumbel_softmax(h),
    "dropout1d": lambda h: F.dropout1d(h[:, :, None], 0.2)[:, :, 0],
    "dropout2d": lambda h: F.dropout2d(h[:, :, None, None], 0.2)[:, :, 0, 0],
    "dropout3d": lambda h: F.dropout3d(h[:, :, None, None, None], 0.2)[:, :, 0, 0, 0],
    "alpha_dropout": lambda h: F.alpha_dropout(h, 0.1, True),
    "feature_alpha_dropout": lambda h: F.feature_alpha_dropout(h, 0.1, True),
    "dropout (training=False traced)": lambda h: F.dropout(h, 0.1, False),
    "rrelu": lambda h: F.rrelu(h, training=True),
    "bernoulli()": lambda h: h * h.sigmoid().bernoulli(),
    "bernoulli_": lambda h: h * h.detach().clone().bernoulli_(0.5),
    "normal_": lambda h: h + h.detach().clone().normal_(),
    "uniform_": lambda h: h * h.detach().clone().uniform_(),
    "random_": lambda h: h * h.detach().clone().random_(0, 2),
    "exponential_": lambda h: h * h.detach().clone().exponential_(),
    "geometric_": lambda h: h * h.detach().clone().geometric_(0.5),
    "cauchy_": lambda h: h + h.detach().clone().cauchy_(),
    "log_normal_": lambda h: h * h.detach().clone().log_normal_(),
}


#: the dropout functions: torch.fx fixes their ``training`` flag when it traces, so every
#: optimizer refuses them at construction (use the nn modules)
TRACED_FLAG = {"dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
               "feature_alpha_dropout", "dropout (training=False traced)"}
#: the optimizers that re-run the stages on the recorded batch
RERUN = {"DDPNOpt", "GTDDP", "EMSA", "LQRDescent"}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("op", sorted(RANDOM_OPS))
def test_a_random_operation_between_stages_is_refused_where_stages_are_rerun(op, name):
    """Session 30: ``h + 1e-3 * torch.randn_like(h)`` was accepted and the feedback / DDP
    passes drew new noise (DDPNOpt(adam)'s update 76 % off with the RNG state at
    step()); ``F.dropout1d`` and friends were refused only as 'a branch on
    self.training'.  The dropout functions are refused at construction by every
    optimizer; a random function or method is refused by the optimizers that re-run the
    stages, at the step, naming the node (both decompositions, either mode) -- EKFAC
    and ``feedback=False`` take it (session 31; they were refused at construction)."""
    for mode in (True, False):
        model = _Inject(RANDOM_OPS[op]).train(mode)
        if op in TRACED_FLAG:
            with pytest.raises(UnsupportedModelError, match=r"node '\w+' \(call_"):
                OPTIMIZERS[name](model)
            continue
        opt = OPTIMIZERS[name](model)
        X, y = data(B=8, shape=(4,))
        closure = closure_for(opt, model, X, y)
        if name in RERUN:
            with pytest.raises(InvalidArgumentError, match=r"stage 0: node '\w+' \(call_"
                                                           r".*draws random numbers"):
                opt.step(closure)
        else:
            before = [p.detach().clone() for p in model.parameters()]
            opt.step(closure)
            assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
            assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_feedback_false_with_noise_between_layers_is_torch_optims_adam():
    """The noise is drawn by the training loop's own forward pass; the step reads only
    p.grad: the same updates as torch.optim.Adam with the same random stream."""
    torch.manual_seed(0)
    model = _Inject(RANDOM_OPS["randn_like"])
    twin = copy.deepcopy(model)
    ours = nnbridge.DDPNOpt(model, curvature="adam", lr=1e-3, feedback=False)
    ref = torch.optim.Adam(twin.parameters(), lr=1e-3)
    X, y = data(B=8, shape=(4,))
    for step in range(3):
        for m, opt in ((model, ours), (twin, ref)):
            torch.manual_seed(step)
            opt.zero_grad()
            F.cross_entropy(m(X), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def _update(model, make, seed_at_step, closure=False, shape=(4,)):
    """The update of one step on a pass recorded under seed 5, the RNG reseeded with
    ``seed_at_step`` just before ``step()`` (only the random state differs)."""
    model = copy.deepcopy(model)
    before = copy.deepcopy(model)
    opt = make(model)
    X, y = data(B=8, shape=shape)

    def run():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        return loss
    torch.manual_seed(5)
    if closure:   # LQRDescent needs one: reseeded inside it, after the pass
        def wrapped():
            loss = run()
            torch.manual_seed(seed_at_step)
            return loss
        opt.step(wrapped)
    else:
        run()
        torch.manual_seed(seed_at_step)
        opt.step()
    return [p.detach() - q.detach() for p, q in zip(model.parameters(), before.parameters())]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_noise_on_the_input_before_the_first_layer_is_taken_exactly(name):
    """Noise before the first stage is fine: the recorded first-stage input holds the
    drawn noise and nothing re-runs the input transform: the step does not depend on
    the RNG state at step(), bit for bit."""
    torch.manual_seed(0)
    model = _Inject(lambda x: x + 0.1 * torch.randn_like(x), where="input")
    closure = name == "LQRDescent"
    a = _update(model, OPTIMIZERS[name], 1, closure)
    b = _update(model, OPTIMIZERS[name], 2, closure)
    assert any(bool(u.abs().max() > 0) for u in a)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def _conv_net(drop: nn.Module, dims: int) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, padding=1) if dims == 1 else nn.Conv2d(2, 3, 3, padding=1)
    return nn.Sequential(conv, nn.ReLU(), drop, nn.Flatten(), nn.Linear(3 * 4 ** dims, 3))


DROPOUTS = {
    "Dropout1d": (lambda: nn.Dropout1d(0.3), 1),
    "Dropout2d": (lambda: nn.Dropout2d(0.3), 2),
    "AlphaDropout": (lambda: nn.AlphaDropout(0.3), 2),
    "FeatureAlphaDropout": (lambda: nn.FeatureAlphaDropout(0.3), 2),
    "RReLU": (lambda: nn.RReLU(), 2),
}


@pytest.mark.parametrize("name", ["DDPNOpt", "GTDDP", "EMSA", "LQRDescent"])
@pytest.mark.parametrize("drop", sorted(DROPOUTS))
def test_the_dropout_family_in_training_mode_is_refused_by_name(drop, name):
    """nn.Dropout2d & co. were not recognised as dropout (isinstance nn.Dropout): the
    feedback pass drew a new mask, refused only by the first-step check's 'branch on
    self.training' or, once that had passed, accepted silently.  Where the optimizer
    re-runs the stages they are refused by name in training mode, like nn.Dropout."""
    make, dims = DROPOUTS[drop]
    model = _conv_net(make(), dims)
    X, y = data(B=6, shape=(2,) + (4,) * dims)
    opt = OPTIMIZERS[name](model)
    with pytest.raises(InvalidArgumentError, match=drop):
        opt.step(closure_for(opt, model, X, y))


@pytest.mark.parametrize("name", ["DDPNOpt", "GTDDP"])
@pytest.mark.parametrize("drop", sorted(DROPOUTS))
def test_the_dropout_family_after_an_eval_mode_first_step_is_refused(drop, name):
    """The trial's 'late dropout': the first step in eval mode (its decomposition check
    passed), then training mode: Dropout2d was accepted and the update depended on the
    RNG state at step()."""
    make, dims = DROPOUTS[drop]
    model = _conv_net(make(), dims)
    X, y = data(B=6, shape=(2,) + (4,) * dims)
    opt = OPTIMIZERS[name](model)
    model.eval()
    opt.step(closure_for(opt, model, X, y))
    model.train()
    with pytest.raises(InvalidArgumentError, match=drop):
        opt.step(closure_for(opt, model, X, y))


@pytest.mark.parametrize("name", ["DDPNOpt(feedback=False)", "EKFAC", "DDPNOpt", "GTDDP"])
@pytest.mark.parametrize("drop", sorted(DROPOUTS) + ["Dropout3d"])
def test_the_dropout_family_steps_do_not_depend_on_the_rng_at_step(drop, name):
    """Where nothing re-runs the stages (no feedback, EKFAC), training-mode dropout is
    taken; in eval mode every optimizer takes it.  Either way the step is independent of
    the RNG state at step(), bit for bit."""
    if drop == "Dropout3d":
        make, dims = (lambda: nn.Dropout3d(0.3)), 2
        model = _conv_net(nn.Sequential(nn.Unflatten(1, (3, 1)), make(), nn.Flatten(1, 2)),
                          dims)
    else:
        make, dims = DROPOUTS[drop]
        model = _conv_net(make(), dims)
    if name in ("DDPNOpt", "GTDDP"):
        model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ups = [_update(model, OPTIMIZERS[name], s, shape=(2,) + (4,) * dims)
               for s in (1, 2)]
    assert any(bool(u.abs().max() > 0) for u in ups[0])
    assert all(torch.equal(u, v) for u, v in zip(*ups))


_Out = collections.namedtuple("_Out", "logits")


@dataclasses.dataclass
class _DOut:
    logits: torch.Tensor


class _Returns(nn.Module):
    def __init__(self, wrap, features=False):
        super().__init__()
        self.a, self.b, self.wrap, self.features = nn.Linear(4, 6), nn.Linear(6, 3), wrap, \
            features

    def forward(self, x, return_features: bool = False, mask=None):
        h = torch.tanh(self.a(x))
        if mask is not None:
            h = h * mask
        out = self.b(h)
        if return_features:
            return out, h
        return self.wrap(out)


WRAPS = {"_Out (a namedtuple)": _Out, "_DOut (a dataclass)": _DOut,
         "tuple": lambda t: (t,), "dict": lambda t: {"logits": t}}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_a_namedtuple_or_dataclass_output_is_refused_at_construction(wrap, name):
    """Session 30: a namedtuple / dataclass output was accepted at construction and
    every step then said 'no forward and backward pass of the model was recorded'."""
    with pytest.raises(UnsupportedModelError, match=rf"return one tensor; it returns a "
                                                    rf"{wrap.replace('(', '.').replace(')', '.')}"):
        OPTIMIZERS[name](_Returns(WRAPS[wrap]))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optional_forward_arguments_are_traced_with_their_defaults(name):
    """Session 30: ``forward(self, x, return_features=False)`` was refused as 'a branch
    on tensor values', ``forward(self, x, mask=None)`` as 'more than one input'.  They are
    traced with their defaults (the call model(x)); the steps equal those of the same
    network without the arguments, bit for bit."""
    torch.manual_seed(0)
    model = _Returns(lambda t: t)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = copy.deepcopy(model.a), copy.deepcopy(model.b)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))
    closure = name == "LQRDescent"
    a = _update(model, OPTIMIZERS[name], 1, closure)
    b = _update(Plain(), OPTIMIZERS[name], 1, closure)
    assert any(bool(u.abs().max() > 0) for u in a)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("name", ["DDPNOpt", "DDPNOpt(feedback=False)", "GTDDP", "EKFAC",
                                  "EMSA"])
def test_a_loop_passing_the_optional_argument_is_refused_by_name(name):
    """The traced graph is the call model(x): a pass with ``mask=...`` is refused
    naming the argument; one returning a tuple (``return_features=True``) leaves no
    record, and the step's error says the model returned a tuple (it said only that no
    pass was recorded)."""
    X, y = data(B=6)
    model = _Returns(lambda t: t)
    opt = OPTIMIZERS[name](model)
    opt.zero_grad()
    F.cross_entropy(model(X, mask=torch.ones(6, 6)), y).backward()
    with pytest.raises(UnsupportedModelError, match=r"called with mask=<Tensor>"):
        opt.step()
    if name == "DDPNOpt(feedback=False)":
        return   # Adam on p.grad: needs no record
    opt.zero_grad()
    F.cross_entropy(model(X, True)[0], y).backward()
    with pytest.raises(RuntimeError, match=r"returned a tuple, not a tensor \(called with "
                                           r"return_features=True\)"):
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(X, return_features=False), y).backward()   # the default
    opt.step()
