"""Neural-ODE blocks and controls shared by several stages: the integrator against
torchdiffeq, the stage graph, and one GT-DDP step against the literal DDP of the unrolled
OCP with the shared parameters carried in the state (tests/reference/shared_unrolled.py)."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import nnbridge
from tests.nnbridge.conftest import closure_for, data
from tests.reference.shared_unrolled import affine, cross_entropy, flat_control, unrolled_step
from trajopt.errors import InvalidArgumentError

torchdiffeq = pytest.importorskip("torchdiffeq")


class Field(nn.Module):
    """f(t, x) = b(tanh(a([x, t]))): time-dependent, two layers."""

    def __init__(self, n=4, h=5):
        super().__init__()
        self.a, self.b = nn.Linear(n + 1, h), nn.Linear(h, n)

    def forward(self, t, x):
        return self.b(torch.tanh(self.a(torch.cat([x, t.expand(x.shape[0], 1)], 1))))


class ODENet(nn.Module):
    def __init__(self, steps=2, method="euler", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(3, 4)
        self.ode = nnbridge.ODEBlock(Field(), 0.0, 1.0, steps=steps, method=method)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.ode(torch.tanh(self.inp(x))))


# ------------------------------------------------------------------ the integrator
@pytest.mark.parametrize("ours,theirs", [("euler", "euler"), ("midpoint", "midpoint"),
                                         ("rk38", "rk4")])
def test_fixed_steps_equal_torchdiffeq(ours, theirs):
    """torchdiffeq's fixed-grid solvers (its "rk4" is the 3/8 rule) on the same grid."""
    torch.manual_seed(0)
    f = Field(2, 6)
    x = torch.randn(5, 2)
    got = nnbridge.ODEBlock(f, 0.0, 1.5, steps=6, method=ours)(x)
    want = torchdiffeq.odeint(f, x, torch.tensor([0.0, 1.5]), method=theirs,
                              options={"step_size": 0.25})[-1]
    assert float((got - want).detach().abs().max()) < 1e-14


def test_classic_rk4_converges_at_order_four():
    torch.manual_seed(0)
    f = Field(2, 6)
    x = torch.randn(5, 2)
    ref = torchdiffeq.odeint(f, x, torch.tensor([0.0, 1.0]), method="dopri5", rtol=1e-13,
                             atol=1e-13)[-1]
    errs = [float((nnbridge.ODEBlock(f, steps=s)(x) - ref).abs().max()) for s in (2, 4, 8)]
    for e0, e1 in zip(errs, errs[1:]):
        assert 12 < e0 / e1 < 20       # 2^4 = 16


def test_bad_arguments_are_named():
    f = Field()
    for kw, name in [({"steps": 0}, "steps"), ({"steps": 2.0}, "steps"),
                     ({"method": "rk45"}, "method"), ({"t1": 0.0}, "t1"),
                     ({"t0": float("nan")}, "t0")]:
        with pytest.raises(InvalidArgumentError, match=name):
            nnbridge.ODEBlock(f, **kw)
    with pytest.raises(InvalidArgumentError, match="func"):
        nnbridge.ODEBlock(3)


# ------------------------------------------------------------------ the stage graph
@pytest.mark.parametrize("method,calls", [("euler", 2), ("rk4", 8)])
def test_an_ode_block_is_one_stage_whose_players_are_its_layers(method, calls):
    model = ODENet(steps=2, method=method)
    g = nnbridge.graph_stages(model)
    assert [len(s.players) for s in g.stages] == [1, 2, 1]
    assert g.stages[1].calls == [calls, calls]
    assert [p.module for p in g.stages[1].players] == [model.ode.func.a, model.ode.func.b]
    X, _ = data(B=4, shape=(3,))
    for train in (True, False):
        model.train(train)
        assert torch.equal(g(X), model(X))


def test_raw_input_skip_and_tied_weights_decompose():
    """A skip from the raw input (a parameter-free input transform): x_0 is the input.
    A layer applied twice in a chain: one stage with one player called twice."""
    class RawSkip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(2.0 * x))) + x

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    X, _ = data(B=3, shape=(4,))
    for model, calls in ((RawSkip(), [[1], [1]]), (Tied(), [[2], [1]])):
        g = nnbridge.graph_stages(model)
        assert [s.calls for s in g.stages] == calls
        assert torch.equal(g(X), model(X))
    assert nnbridge.graph_stages(RawSkip()).raw_input


def test_recorded_calls_give_the_shared_gradient():
    """The recorder keeps every call of a shared layer: the sum over calls and samples of
    (pre-activation gradient) x (unfolded input)' is the layer's gradient."""
    from nnbridge.stages import outer_sum

    model = ODENet(steps=3, method="midpoint")
    g = nnbridge.graph_stages(model)
    players = g.players
    X, y = data(B=5, shape=(3,))
    with nnbridge.capture(model, players, h_grads=True) as rec:
        model.zero_grad()
        F.cross_entropy(model(X), y, reduction="sum").backward()
    assert [len(c) for c in rec.calls] == [1, 6, 1, 6]     # inp, a, out; then b
    assert torch.equal(rec.model_input, X)
    stage_of = {id(p): (s, j) for s in g.stages for j, p in enumerate(s.players)}
    for k, p in enumerate(players):
        s, j = stage_of[id(p)]
        got = outer_sum(p.factor_view(rec.h_grads[k]), s.unfold(j, rec.calls[k]))
        want = p.join([q.grad for q in p.params()])
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_len_of_a_traced_tensor_is_its_batch_size():
    """``len(x)`` in a forward pass (common in ODE fields) traces as ``x.size(0)``;
    ``len`` of anything else is the builtin, also after tracing."""
    class LenField(nn.Module):
        def __init__(self):
            super().__init__()
            self.lins = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])

        def forward(self, t, x):
            for k in range(len(self.lins)):
                x = torch.tanh(self.lins[k](x + t.expand(len(x), 1)))
            return x

    model = nn.Sequential(nn.Linear(2, 3), nnbridge.ODEBlock(LenField(), steps=2),
                          nn.Linear(3, 2))
    g = nnbridge.graph_stages(model)
    X, _ = data(B=5, shape=(2,))
    assert torch.equal(g(X), model(X))
    assert g.stages[1].calls == [8, 8]
    assert len([1, 2]) == 2 and len.__module__ == "builtins"


# ------------------------------------------------------------------ the step

def _unrolled(model, steps):
    """ODENet (Euler) written out as one stage per layer call, the residual x_k carried
    through the stage that computes z_k = tanh(a([x_k, t_k]))."""
    h = 1.0 / steps

    fs = [lambda x, th: torch.tanh(affine(th["inp"], x, 4))]
    uses = [["inp"]]
    for k in range(steps):
        t = k * h
        fs.append(lambda x, th, t=t: torch.cat(
            [x, torch.tanh(affine(th["a"], torch.cat([x, x.new_full((1,), t)]), 5))]))
        fs.append(lambda y, th: y[:4] + h * affine(th["b"], y[4:], 4))
        uses += [["a"], ["b"]]
    fs.append(lambda x, th: affine(th["out"], x, 3))
    uses.append(["out"])
    params = {"inp": flat_control(model.inp), "a": flat_control(model.ode.func.a),
              "b": flat_control(model.ode.func.b), "out": flat_control(model.out)}
    return fs, uses, params


@pytest.mark.parametrize("B,recursion", [(1, "mean"), (3, "mean"), (3, "per_sample")])
def test_exact_step_is_ddp_on_the_unrolled_ocp(B, recursion):
    """With the exact curvature, one GTDDP step on a Neural-ODE network (Euler, 2 steps:
    the layers a and b are used at 2 stages each) is the DDP step of the unrolled OCP with
    the shared parameters carried in the state from the block's first stage."""
    steps = 2
    X, y = data(B=B, shape=(3,))
    model = ODENet(steps=steps)
    lam, mu, lr = 0.05, 0.3, 0.7
    fs, uses, params = _unrolled(model, steps)
    T = len(fs)

    phi = cross_entropy(y)

    want = unrolled_step(fs, uses, {0: ["inp"], 1: ["a", "b"], T - 1: ["out"]}, params, X,
                         phi, lam=lam, mu=mu, lr=lr, recursion=recursion)
    opt = nnbridge.GTDDP(model, curvature="exact", value_hessian="full", weight_decay=lam,
                         regularization=mu, lr=lr, value_psd=False,
                         value_recursion=recursion)
    opt.step(closure_for(opt, model, X, y))
    got = {"inp": flat_control(model.inp), "a": flat_control(model.ode.func.a),
           "b": flat_control(model.ode.func.b), "out": flat_control(model.out)}
    for k in params:
        scale = float((want[k] - params[k]).abs().max())
        assert float((got[k] - want[k]).abs().max()) < 1e-10 * scale, k


def test_deciding_each_parameter_at_its_first_use_is_another_step():
    """Deciding b at its own first use (feedback on the block's first output z_0)
    instead of at the block's start: the same quadratic model, but the feedback pass
    feeds the nonlinear deviation of z_0, so the step differs at second order (here by
    ~5 % of b's step); the reference distinguishes the two."""
    steps = 2
    X, y = data(B=2, shape=(3,))
    model = ODENet(steps=steps)
    fs, uses, params = _unrolled(model, steps)
    T = len(fs)

    phi = cross_entropy(y)

    joint = unrolled_step(fs, uses, {0: ["inp"], 1: ["a", "b"], T - 1: ["out"]}, params,
                          X, phi, lam=0.05, mu=0.3, lr=0.7)
    late = unrolled_step(fs, uses, {0: ["inp"], 1: ["a"], 2: ["b"], T - 1: ["out"]}, params,
                         X, phi, lam=0.05, mu=0.3, lr=0.7)
    assert float((joint["b"] - late["b"]).abs().max()) > 1e-6


def test_tied_weights_step_is_ddp_on_the_unrolled_ocp():
    """One Linear applied twice in a chain (no residual): the shared control decided at
    its first call, B = 2, exact curvature."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    model = Tied()
    X, y = data(B=2, shape=(4,))

    fs = [lambda x, th: torch.tanh(affine(th["a"], x, 4)),
          lambda x, th: torch.tanh(affine(th["a"], x, 4)),
          lambda x, th: affine(th["b"], x, 3)]
    params = {"a": flat_control(model.a), "b": flat_control(model.b)}

    phi = cross_entropy(y)

    want = unrolled_step(fs, [["a"], ["a"], ["b"]], {0: ["a"], 2: ["b"]}, params, X, phi,
                         lam=0.0, mu=0.2, lr=1.0, recursion="mean")
    opt = nnbridge.GTDDP(model, curvature="exact", value_hessian="full", regularization=0.2,
                         value_psd=False)
    opt.step(closure_for(opt, model, X, y))
    for k, m in (("a", model.a), ("b", model.b)):
        scale = float((want[k] - params[k]).abs().max())
        assert float((flat_control(m) - want[k]).abs().max()) < 1e-10 * scale, k


def test_first_layer_called_off_the_chain_first():
    """S is called off the chain (on tanh(x)) before its chain call (on x): x_0 is the
    chain call's input.  S's calls join its stage and M's (b = S(tanh x) is computed with
    M, before O uses it); the exact step is the unrolled DDP with S and M decided at the
    start and O at the end (inputs of size ~1, where taking the off-chain call's input
    as x_0 differs)."""
    class OffFirst(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.S, self.M, self.O = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            b = self.S(torch.tanh(x))
            h = torch.tanh(self.M(torch.tanh(self.S(x))))
            return self.O(h + b)

    model = OffFirst()
    X, y = data(B=2, shape=(3,), classes=2)
    X = 2 * X

    fs = [lambda x, th: torch.cat([torch.tanh(affine(th["S"], x, 3)), x]),
          lambda z, th: torch.cat([torch.tanh(affine(th["M"], z[:3], 3)), z[3:]]),
          lambda z, th: affine(th["O"], z[:3] + affine(th["S"], torch.tanh(z[3:]), 3), 2)]
    params = {k: flat_control(getattr(model, k)) for k in ("S", "M", "O")}

    phi = cross_entropy(y)

    assert [s.calls for s in nnbridge.graph_stages(model).stages] == [[2, 1], [1]]
    want = unrolled_step(fs, [["S"], ["M"], ["O", "S"]], {0: ["S", "M"], 2: ["O"]}, params,
                         X, phi, lam=0.0, mu=0.5, lr=1.0, recursion="mean")
    opt = nnbridge.GTDDP(model, curvature="exact", value_hessian="full",
                         regularization=0.5, value_psd=False)
    opt.step(closure_for(opt, model, X, y))
    for k in params:
        scale = float((want[k] - params[k]).abs().max())
        assert float((flat_control(getattr(model, k)) - want[k]).abs().max()) < 1e-10 * scale, k


def test_tying_the_first_and_last_layer_warns_that_nothing_is_left_to_feed_back():
    class FirstLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.m = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.a(torch.tanh(self.m(torch.tanh(self.a(x)))))

    with pytest.warns(UserWarning, match="into one: GT-DDP's step has no feedback"):
        g = nnbridge.graph_stages(FirstLast())
    assert [s.calls for s in g.stages] == [[2, 1]]


def test_ekfac_takes_every_call_of_a_shared_layer():
    """nnbridge.EKFAC on an ODE network (one Kronecker pair over all calls of a layer) is
    GT-DDP's EKFAC without feedback (no cooperation for layers called several times)."""
    X, y = data(B=8, shape=(3,))
    a, b = ODENet(method="midpoint"), ODENet(method="midpoint")
    ours = nnbridge.EKFAC(a, lr=0.05, update_freq=2)
    ref = nnbridge.GTDDP(b, curvature="ekfac", lr=0.05, update_freq=2, feedback=False)
    for _ in range(4):
        ours.step(closure_for(ours, a, X, y))
        ref.step(closure_for(ref, b, X, y))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ in a training loop
@pytest.mark.parametrize("name,theirs", [("adam", torch.optim.Adam),
                                         ("identity", torch.optim.SGD)])
def test_without_feedback_it_is_the_base_optimizer(name, theirs):
    """The open-loop part of a shared control is its total gradient over all calls."""
    X, y = data(B=8, shape=(3,))
    a, b = ODENet(method="rk4"), ODENet(method="rk4")
    ours = nnbridge.GTDDP(a, curvature=name, lr=1e-2, feedback=False)
    ref = theirs(b.parameters(), lr=1e-2)
    for _ in range(4):
        ours.step(closure_for(ours, a, X, y))
        ref.zero_grad()
        F.cross_entropy(b(X), y).backward()
        ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("curvature", ["adam", "ekfac", "exact"])
def test_trains_an_ode_classifier(curvature):
    """An RK4 ODE block in a custom module, a loop with clipping and a scheduler: the loss
    falls, the feedback changes the step."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=g)
    y = (X[:, 0] + X[:, 1] ** 2 > 0.5).long() + (X[:, 2] > 1).long()
    model = ODENet(method="rk4")
    lr = {"adam": 1e-2, "ekfac": 0.05, "exact": 0.5}[curvature]
    opt = nnbridge.GTDDP(model, curvature=curvature, lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10, 0.5)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
