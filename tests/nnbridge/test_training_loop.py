"""DDPNOpt in an ordinary training loop: step() with and without a closure, gradient
accumulation, a penalty in the loss, gradient clipping, a summed loss and autocast, each
against a reference written here or the literal Alg. 3 (tests/reference/ddpnopt_dense)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import nnbridge
from tests.reference.ddpnopt_dense import ddpnopt_step
from trajopt.errors import InvalidArgumentError, UnsupportedModelError

from .conftest import closure_for, data, mlp

LRS = {"identity": 0.3, "rmsprop": 1e-2, "adam": 1e-2, "ekfac": 0.1, "exact": 1.0}
CURVATURES = ["identity", "rmsprop", "adam", "ekfac"]


def _opt(model, curvature, **kw):
    extra = {"regularization": 2.0} if curvature == "exact" else {}
    return nnbridge.DDPNOpt(model, lr=LRS[curvature], curvature=curvature,
                            terminal_hessian="ggn", **extra, **kw)


def _reference(opt, X, y, *, recursion="mean", **kw):
    def phi(xT, i):
        return -torch.log_softmax(xT, -1)[y[i]]
    hp = {**dict(opt.param_groups[0]), **kw.pop("hp", {})}
    return ddpnopt_step(opt._stages, X, phi, opt.curvature.name, hp, terminal="hessian",
                        project_psd=True, recursion=recursion, **kw)


def _rel_error(opt, ref, U0):
    return max(float((st.control() - r).abs().max() / (r - u0).abs().max())
               for st, r, u0 in zip(opt._stages, ref, U0))


@pytest.mark.parametrize("curvature", CURVATURES + ["exact"])
def test_step_without_a_closure_equals_the_closure_step(curvature):
    """HF Trainer / Accelerate call ``optimizer.step()`` after their own forward and
    backward: the recorded passes give the closure step bit for bit, also when zero_grad
    comes between the forward and the backward pass and an evaluation forward pass under
    no_grad comes between the backward pass and the step."""
    X, y = data(B=6)
    X2, _ = data(B=3, seed=5)
    m1, m2 = mlp(), mlp()
    o1, o2 = _opt(m1, curvature), _opt(m2, curvature)
    for k in range(3):
        o1.step(closure_for(o1, m1, X, y))
        if k == 1:
            out = m2(X)
            o2.zero_grad()
            F.cross_entropy(out, y).backward()
        else:
            o2.zero_grad()
            F.cross_entropy(m2(X), y).backward()
        with torch.no_grad():
            m2(X2)
        assert o2.step() is None
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(next(m1.parameters()), next(mlp().parameters()))


@pytest.mark.parametrize("recursion", ["mean", "per_sample"])
@pytest.mark.parametrize("curvature", CURVATURES + ["exact"])
def test_gradient_accumulation_is_one_batch(curvature, recursion):
    """Two micro-batches of 3 (each loss / 2, the usual scaling) before one step: the step
    of the literal Alg. 3 on the batch of 6."""
    X, y = data(B=6)
    model = mlp()
    opt = _opt(model, curvature, value_recursion=recursion)
    ref = _reference(opt, X, y, recursion=recursion)
    U0 = [st.control().clone() for st in opt._stages]
    opt.zero_grad()
    for half in (slice(0, 3), slice(3, 6)):
        (F.cross_entropy(model(X[half]), y[half]) / 2).backward()
    opt.step()
    assert _rel_error(opt, ref, U0) < 1e-11


@pytest.mark.parametrize("recursion", ["mean", "per_sample"])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_l2_penalty_in_the_loss_is_weight_decay(curvature, recursion):
    """``loss + lam/2 |theta|^2`` in the closure is the running cost of weight decay:
    the literal Alg. 3 with weight_decay=lam (for the curvature models, which leave
    weight decay out of P)."""
    X, y = data(B=5)
    model = mlp()
    lam = 0.05
    opt = _opt(model, curvature, value_recursion=recursion)
    ref = _reference(opt, X, y, recursion=recursion, hp={"weight_decay": lam})
    U0 = [st.control().clone() for st in opt._stages]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss = loss + lam / 2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss
    opt.step(closure)
    assert _rel_error(opt, ref, U0) < 1e-11


@pytest.mark.parametrize("curvature", CURVATURES)
def test_gradient_clipping_is_a_running_cost(curvature):
    """clip_grad_norm_ in the closure scales p.grad by c: the change, (c - 1) times the
    back-propagated gradient, is the gradient of a running cost on u (docs/ddpnopt.md),
    i.e. the literal Alg. 3 with that l_u; and clipping really changes the step."""
    X, y = data(B=5)
    model, plain = mlp(), mlp()
    opt, opt_plain = _opt(model, curvature), _opt(plain, curvature)
    seen = {}

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        seen["grads"] = [p.grad.clone() for p in model.parameters()]
        max_norm = 0.05
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)
        seen["c"] = min(1.0, max_norm / (float(norm) + 1e-6))  # torch's coefficient
        return loss
    U0 = [st.control().clone() for st in opt._stages]
    grads_at = {id(p): i for i, p in enumerate(model.parameters())}
    ref_holder = {}

    def closure_and_reference():
        loss = closure()
        lu = [(seen["c"] - 1) * st.join([seen["grads"][grads_at[id(p)]] for p in st.params()])
              for st in opt._stages]
        ref_holder["ref"] = _reference(opt, X, y, lu=lu)
        return loss
    opt.step(closure_and_reference)
    assert seen["c"] < 0.9  # the clipping is active
    assert _rel_error(opt, ref_holder["ref"], U0) < 1e-11
    opt_plain.step(closure_for(opt_plain, plain, X, y))
    assert _rel_error(opt, [st.control() for st in opt_plain._stages], U0) > 1e-3


def test_clipping_without_feedback_is_torch_optim():
    X, y = data(B=8)
    m1, m2 = mlp(), mlp()
    o1 = nnbridge.DDPNOpt(m1, lr=0.2, curvature="identity", feedback=False, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.2, momentum=0.9)
    for _ in range(5):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            F.cross_entropy(m(X), y).backward()
            nn.utils.clip_grad_norm_(m.parameters(), 0.3)
            o.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("confident", [False, True])
def test_a_summed_cross_entropy_is_refused(confident):
    """reduction='sum' makes V_x B times too large (the step diverges): refused, named;
    also when the model is confident (its output gradient tiny: a bound on the norms
    let a sum through there)."""
    X, y = data(B=8)
    model = mlp()
    if confident:
        with torch.no_grad():
            model[-1].weight.mul_(300.0)
            y = model(X).argmax(-1)
            g_sum = torch.softmax(model(X), -1) - F.one_hot(y, 3)
            assert float(8 * g_sum.abs().sum(-1).mean()) < 2  # the sum's norms look small
    opt = nnbridge.DDPNOpt(model, lr=0.1, curvature="identity")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y, reduction="sum")
        loss.backward()
        return loss
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(InvalidArgumentError, match="reduction='sum'"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    opt.step(closure_for(opt, model, X, y))  # the mean is fine


@pytest.mark.parametrize("kind", ["class_weights", "ignore_index", "unequal_micro_batches"])
def test_weighted_means_of_the_cross_entropy_pass_the_loss_check(kind):
    """torch's weight= / ignore_index (a mean normalized by the weights) and unequal
    micro-batches each scaled 1/K make some samples' gradients larger than a plain
    mean's: the per-sample bound refused them at whichever batch went over it (a run
    crashed at a random step); the batch mean of the norms stays <= 2. The same loss
    summed is still refused."""
    X, y = data(B=8)
    y = torch.tensor([0, 1, 2, 2, 0, 1, 2, 0])
    model = mlp()
    opt = nnbridge.DDPNOpt(model, lr=0.01)
    weight = torch.tensor([1.0, 1.0, 6.0], dtype=X.dtype)
    target = torch.where(torch.arange(8) < 5, -100, y)  # 5 of 8 unlabelled

    def loss_of(reduction):
        opt.zero_grad()
        if kind == "class_weights":
            loss = F.cross_entropy(model(X), y, weight=weight, reduction=reduction)
        elif kind == "ignore_index":
            loss = F.cross_entropy(model(X), target, ignore_index=-100, reduction=reduction)
        else:  # micro-batches of 6 and 2, each loss / 2
            loss = sum(F.cross_entropy(model(xb), yb, reduction=reduction) / 2
                       for xb, yb in zip(X.split(6), y.split(6)))
        loss.backward()
        return loss
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(InvalidArgumentError, match="reduction='sum'"):
        opt.step(lambda: loss_of("sum"))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    opt.step(lambda: loss_of("mean"))
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


@pytest.mark.parametrize("outputs", [1, 3])
def test_a_regression_loss_under_the_cross_entropy_default_is_refused(outputs):
    """F.mse_loss while DDPNOpt keeps loss='cross_entropy': refused naming loss='mse' (it
    used to blame a summed loss, or pass with the cross-entropy curvature); cross-entropy
    with label smoothing or soft targets passes (its gradient p - q sums to 0 over the
    classes too)."""
    X, _ = data(B=8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(X.shape[1], 8), nn.Tanh(), nn.Linear(8, outputs)).to(X.dtype)
    opt = nnbridge.DDPNOpt(model, lr=0.01)
    Y = 0.05 * torch.randn(8, outputs, dtype=X.dtype)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        return loss
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(InvalidArgumentError, match="^loss: .*loss='mse'"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    nnbridge.DDPNOpt(model, lr=0.01, loss="mse").step(closure)   # declared: fine


@pytest.mark.parametrize("kind", ["smoothing", "soft"])
def test_cross_entropy_variants_pass_the_loss_check(kind):
    X, y = data(B=8)
    model = mlp()
    opt = nnbridge.DDPNOpt(model, lr=0.01)
    soft = torch.softmax(torch.randn(8, 3, dtype=X.dtype), -1)

    def closure():
        opt.zero_grad()
        out = model(X)
        if kind == "smoothing":
            loss = F.cross_entropy(out, y, label_smoothing=0.1)
        else:
            loss = F.cross_entropy(out, soft)
        loss.backward()
        return loss
    opt.step(closure)


def _autocast_step(curvature, seed, autocast):
    X, y = data(B=16)
    model = mlp(seed).float()
    opt = nnbridge.DDPNOpt(model, lr=LRS[curvature], curvature=curvature)
    U0 = [st.control().clone() for st in opt._stages]

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(X.float()), y)
        loss.backward()
        return loss
    opt.step(closure)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return torch.cat([(st.control() - u).flatten() for st, u in zip(opt._stages, U0)])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("curvature", ["identity", "ekfac", "adam"])
def test_autocast_bf16_step_runs_in_float32(curvature, seed):
    """A bf16 autocast forward/backward: the DDP pass runs in the parameters' float32.
    Identity / EKFAC: the update matches the float32 step to bf16's resolution (the
    recorded activations carry ~3 significant digits; observed 0.2-0.6 %, bound 1 %).
    Adam: finite and float32 only -- its first-step feedback gain lr / (|g| + eps) is
    ~1e6 on elements with tiny gradients, which turns bf16's rounding into 0.2-25 %
    differences (docs/ddpnopt.md, "Mixed precision")."""
    d16 = _autocast_step(curvature, seed, True)
    assert bool(torch.isfinite(d16).all())
    if curvature != "adam":
        d32 = _autocast_step(curvature, seed, False)
        assert float((d16 - d32).norm() / d32.norm()) < 1e-2


@pytest.mark.parametrize("cls", [nnbridge.DDPNOpt, nnbridge.GTDDP])
@pytest.mark.parametrize("curvature", ["ekfac", "adam"])
def test_a_layer_without_a_gradient_keeps_its_value_with_weight_decay(cls, curvature):
    """Every curvature and both optimizers (GT-DDP's EKFAC has its own open-loop step):
    a layer whose gradients are None is skipped even with weight decay."""
    X, y = data(16)
    model = mlp()
    opt = cls(model, lr=0.1, curvature=curvature, feedback=False, weight_decay=1e-2,
              terminal_hessian="ggn")
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(X), y).backward()
    model[-1].weight.grad = model[-1].bias.grad = None
    before = model[-1].weight.detach().clone()
    opt.step()
    assert torch.equal(before, model[-1].weight)


@pytest.mark.parametrize("curvature,base,kw", [
    ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2), {}),
    ("identity", lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9), {"momentum": 0.9})])
def test_parameters_without_a_gradient_are_skipped_as_torch_optim_does(curvature, base, kw):
    """zero_grad() (set_to_none) and step() with no backward: torch.optim leaves the
    parameters and their state alone; DDPNOpt(feedback=False), "exactly the base
    optimizer", moved them with zero gradients (momentum, Adam's moments). Also a layer
    that received no gradient in a step while others did."""
    X, y = data(16)
    models = [mlp(), mlp()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [base(models[0].parameters()),
            _opt(models[1], curvature, feedback=False, **kw)]
    for model, opt in zip(models, opts):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(X), y).backward()
            opt.step()
        opt.zero_grad()  # only the first layer gets a gradient now
        before = [p.detach().clone() for p in model.parameters()]
        first = model[0]
        F.cross_entropy(model(X), y).backward()
        for p in model.parameters():
            if p is not first.weight and p is not first.bias:
                p.grad = None
        opt.step()
        moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
        assert moved == [True, True] + [False] * (len(moved) - 2)
        opt.zero_grad()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda m: nnbridge.DDPNOpt(m), lambda m: nnbridge.EKFAC(m), lambda m: nnbridge.GTDDP(m),
    lambda m: nnbridge.EMSA(m), lambda m: nnbridge.LQRDescent(m, lr=0.1),
    lambda m: nnbridge.AlignmentBandit(m)])
def test_copying_or_pickling_an_optimizer_is_refused_pointing_to_state_dict(make):
    """copy.deepcopy and pickle kept only torch.optim's fields (no hooks on the model):
    the copy failed at its next step with an AttributeError."""
    import copy
    import pickle
    opt = make(mlp())
    for copier in (copy.deepcopy, copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match="state_dict"):
            copier(opt)


@pytest.mark.parametrize("make", [
    lambda m: nnbridge.DDPNOpt(m), lambda m: nnbridge.EMSA(m),
    lambda m: nnbridge.LQRDescent(m, lr=0.1)])
def test_a_second_parameter_group_is_refused(make):
    """The step reads the one group (the model's stages): EMSA and LQRDescent accepted a
    second group and ignored it (an added parameter with gradient 1 never moved)."""
    opt = make(mlp())
    with pytest.raises(InvalidArgumentError, match="one parameter group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})


@pytest.mark.parametrize("bad", [lambda m: m.parameters(), lambda m: [m]])
def test_lqr_descent_needs_the_model(bad):
    """LQRDescent(model.parameters()) failed with a raw AttributeError."""
    with pytest.raises(TypeError, match="model"):
        nnbridge.LQRDescent(bad(mlp()), lr=0.1)


class _Probe(nn.Module):
    """Linear probing: a backbone run under torch.no_grad() in forward, a trained head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16),
                                      nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.backbone(x)
        return self.head(h)


@pytest.mark.parametrize("make", [
    lambda m: nnbridge.DDPNOpt(m, curvature="adam"),
    lambda m: nnbridge.DDPNOpt(m, curvature="identity"),
    lambda m: nnbridge.DDPNOpt(m, curvature="ekfac"),
    lambda m: nnbridge.GTDDP(m, curvature="adam"),
    lambda m: nnbridge.EMSA(m, lr=0.1)])
def test_layers_run_under_no_grad_in_forward_are_kept(make):
    """A user's trial: the DDP pass carried the value through the backbone and moved it
    (DDPNOpt(adam) 0.05 in 10 steps, LQRDescent 0.4) though it got no gradient; torch.optim
    leaves it. Now it is kept bit for bit (a frozen layer of the step), the head trains."""
    X, y = data(32)
    torch.manual_seed(0)
    model = _Probe()
    opt = make(model)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    head = model.head.weight.detach().clone()
    for _ in range(3):
        opt.step(closure_for(opt, model, X, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))
    assert not torch.equal(head, model.head.weight)


def test_lqr_descent_refuses_a_layer_without_a_gradient():
    X, y = data(32)
    model = _Probe()
    opt = nnbridge.LQRDescent(model, lr=0.1)
    with pytest.raises(UnsupportedModelError, match="got no gradient"):
        opt.step(closure_for(opt, model, X, y))


@pytest.mark.parametrize("make", [
    lambda m: nnbridge.DDPNOpt(m), lambda m: nnbridge.DDPNOpt(m, terminal_hessian="ggn"),
    lambda m: nnbridge.GTDDP(m)])
def test_a_cross_entropy_over_positions_is_refused_by_the_softmax_curvatures(make):
    """Token tagging, logits (B, C, L) and F.cross_entropy(out, y): the terminal Hessian
    took one softmax over all C x L logits (1.4 times the true one off, coupling the
    positions; a user's trial). Refused by name now, as LQRDescent's KL does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.Tanh(), nn.Conv1d(8, 3, 1))
    X, y = torch.randn(8, 2, 5), torch.randint(0, 3, (8, 5))
    opt = make(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(InvalidArgumentError, match=r"output is \(8, 3, 5\)"):
        opt.step(closure_for(opt, model, X, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("make", [lambda m: nnbridge.EMSA(m, lr=0.2),
                                  lambda m: nnbridge.LQRDescent(m, lr=0.1),
                                  lambda m: nnbridge.DDPNOpt(m)])
def test_two_layers_sharing_a_weight_are_refused(make):
    """Tied weights (``b.weight = a.weight``): EMSA and LQRDescent applied only the last
    use's gradient (a user's trial); every optimizer refuses them, naming the stages."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                          nn.Linear(4, 3))
    model[2].weight = model[0].weight
    with pytest.raises(InvalidArgumentError, match="stages 0 and 1 share a parameter"):
        make(model)


@pytest.mark.parametrize("curvature", ["adam", "rmsprop", "identity"])
def test_a_sparse_embedding_gradient(curvature):
    """nn.Embedding(sparse=True) before the stages: Adam's and RMSprop's dense moments
    raised raw aten errors (a user's trial); refused by name now, parameters untouched
    (torch.optim.Adam refuses sparse gradients too); SGD's curvature takes them."""
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 4, sparse=True)
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(self.emb(x).sum(1))))
    torch.manual_seed(0)
    model = Bag()
    X, y = torch.randint(0, 20, (16, 5)), torch.randint(0, 3, (16,))
    with pytest.warns(UserWarning, match="emb"):
        opt = nnbridge.DDPNOpt(model, curvature=curvature)
    before = [p.detach().clone() for p in model.parameters()]
    if curvature == "identity":
        opt.step(closure_for(opt, model, X, y))
        assert not torch.equal(before[0], model.emb.weight)
        return
    with pytest.raises(InvalidArgumentError, match="emb.weight has a sparse gradient"):
        opt.step(closure_for(opt, model, X, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ekfac_refuses_a_layer_with_a_call_without_gradient():
    """A layer called twice, once under torch.no_grad(): EKFAC's factors need every call's
    gradient; it raised AttributeError on None (a user's trial), now names the stage."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.fc1(x))
            with torch.no_grad():
                g = self.fc2(h)
            return self.fc3(torch.tanh(self.fc2(h)) + 0 * g)
    X, y = data(16)
    torch.manual_seed(0)
    model = Twice()
    opt = nnbridge.EKFAC(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedModelError, match=r"stage 1 \(Linear\): one of its calls"):
        opt.step(closure_for(opt, model, X, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _same_steps_with_and_without(make, step):
    """Three steps of a fresh ``mlp()`` under ``make(model)``, each ``step(model, opt, s,
    extra)`` (which ends in ``opt.step()``), without and with the extra passes: the
    parameters are equal bit for bit."""
    params = []
    for extra in (False, True):
        model = mlp()
        opt = make(model)
        for s in range(3):
            step(model, opt, s, extra)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [
    lambda m: nnbridge.DDPNOpt(m, lr=0.05), lambda m: nnbridge.GTDDP(m, lr=0.05),
    lambda m: nnbridge.EKFAC(m, lr=0.05), lambda m: nnbridge.EMSA(m)],
    ids=["ddpnopt", "gtddp", "ekfac", "emsa"])
@pytest.mark.parametrize("extra", ["autograd.grad", "model.zero_grad", "p.grad = None",
                                   "autograd.grad of the parameters after"])
def test_a_pass_whose_gradients_are_discarded_is_not_part_of_the_step(make, extra):
    """An adversarial example's gradient taken with ``torch.autograd.grad`` (it never
    reaches ``.grad``; also one of the parameters, after the training pass), or a
    validation pass whose gradients the user clears with
    ``model.zero_grad()`` / ``p.grad = None``, before the training pass: torch.optim's
    step does not see them, and neither does ours (EKFAC and EMSA took them into the
    step: 0.04 / 0.14 off in 8 steps; DDPNOpt and GTDDP refused the loss as "summed")."""
    def step(model, opt, s, with_extra):
        X, y = data(B=6, seed=s)
        Xv, yv = data(B=4, seed=10 + s)
        opt.zero_grad()
        if with_extra and extra.endswith("after"):
            F.cross_entropy(model(X), y).backward()
            # a validation gradient of the parameters (logging, a MAML inner step)
            torch.autograd.grad(F.cross_entropy(model(Xv), yv), list(model.parameters()))
            opt.step()
            return
        if with_extra:
            if extra == "autograd.grad":
                x = Xv.clone().requires_grad_()
                torch.autograd.grad(F.cross_entropy(model(x), yv), x)
            else:
                F.cross_entropy(model(Xv), yv).backward()
                if extra == "model.zero_grad":
                    model.zero_grad()
                else:
                    for p in model.parameters():
                        p.grad = None
        F.cross_entropy(model(X), y).backward()
        opt.step()
    _same_steps_with_and_without(make, step)


@pytest.mark.parametrize("make", [lambda m: nnbridge.DDPNOpt(m, curvature="adam", lr=1e-2),
                                  lambda m: nnbridge.GTDDP(m, curvature="adam", lr=1e-2)],
                         ids=["ddpnopt", "gtddp"])
def test_a_layer_whose_gradients_the_loop_zeroed_stays(make):
    """``layer.weight.grad.zero_(); layer.bias.grad.zero_()`` before ``step()`` (keeping
    a layer in place): Adam does not move it, and the DDP step keeps it too (its feedback
    moved it 2.4 at Adam's rate over a zero second moment); a layer with a gradient in
    part is refused by name, nothing changed."""
    X, y = data(B=8)
    model = mlp()
    opt = make(model)
    layer = model[2]
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(X), y).backward()
    layer.weight.grad.zero_()
    layer.bias.grad.zero_()
    opt.step()
    assert torch.equal(layer.weight, before[2]) and torch.equal(layer.bias, before[3])
    assert not torch.equal(model[0].weight, before[0])
    now = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(X), y).backward()
    layer.weight.grad = None
    with pytest.raises(InvalidArgumentError, match=r"\['weight'\] have no gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), now))
    layer.bias.grad = None      # as the message says; the recorded batch is still there
    opt.step()
    assert torch.equal(layer.weight, now[2]) and not torch.equal(model[0].weight, now[0])


def test_an_optimizer_on_a_slice_of_the_model_says_so():
    """``DDPNOpt(model[:3])`` with the whole model run: nothing is recorded (the slice's
    own forward never runs); the message said only "run the forward pass"."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3))
    opt = nnbridge.DDPNOpt(model[:3])
    X, y = data(B=6)
    F.cross_entropy(model(X.to(model[0].weight.dtype)), y).backward()
    with pytest.raises(RuntimeError, match="slice or a part of the model"):
        opt.step()


def test_a_backward_pass_that_failed_does_not_block_the_next_steps():
    """A backward pass that raised (an error in a user's hook) never ran the recorder's
    end-of-pass callback; the next pass still counts."""
    model = mlp()
    opt = nnbridge.EKFAC(model, lr=0.05)
    X, y = data(B=6)
    out = model(X)

    def fail(g):
        raise RuntimeError("a user's hook failed")
    handle = model[0].weight.register_hook(fail)
    with pytest.raises(RuntimeError, match="user's hook"):
        F.cross_entropy(out, y).backward()
    handle.remove()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    assert not torch.equal(model[0].weight, before[0])


@pytest.mark.parametrize("make", [
    lambda m: nnbridge.DDPNOpt(m, lr=0.05), lambda m: nnbridge.EKFAC(m, lr=0.05),
    lambda m: nnbridge.EMSA(m)], ids=["ddpnopt", "ekfac", "emsa"])
@pytest.mark.parametrize("case", ["input gradient first", "backward, zero_grad, backward"])
def test_one_forward_pass_run_backward_twice_records_what_reached_grad(make, case):
    """The same forward pass run backward twice (free adversarial training's input
    gradient with ``retain_graph``, then the training backward; or backward,
    ``model.zero_grad()``, backward): the record holds the pass that is in ``.grad``,
    not the sum of both (a review found the output gradient doubled)."""
    def step(model, opt, s, twice):
        X, y = data(B=6, seed=s)
        opt.zero_grad()
        x = X.clone().requires_grad_()
        loss = F.cross_entropy(model(x), y)
        if twice and case == "input gradient first":
            torch.autograd.grad(loss, x, retain_graph=True)
        elif twice:
            loss.backward(retain_graph=True)
            model.zero_grad()
        loss.backward()
        opt.step()
    _same_steps_with_and_without(make, step)


@pytest.mark.parametrize("make", [nnbridge.DDPNOpt, nnbridge.GTDDP, nnbridge.EKFAC,
                                  nnbridge.EMSA, nnbridge.LQRDescent])
def test_a_lazy_model_before_its_dry_run_is_refused_by_name(make):
    """``nn.LazyLinear`` before any forward pass: the first training step failed inside
    the recorder's hooks with torch's error about uninitialized parameters (a user's
    trial); refused when the optimizer is built now, and after the dry run it trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.LazyLinear(3))
    with pytest.raises(InvalidArgumentError, match=r"'0.weight' is not initialized"):
        make(model)
    X, y = data(B=6)
    with torch.no_grad():
        model(X)
    opt = make(model)
    before = model[0].weight.detach().clone()
    opt.step(closure_for(opt, model, X, y))
    assert not torch.equal(before, model[0].weight)


@pytest.mark.parametrize("cls", ["DDPNOpt", "EKFAC", "GTDDP", "EMSA"])
def test_an_optimizer_kept_alive_beside_a_new_one_holds_one_record(cls):
    """An optimizer replaced by a new one on the same model but still referenced (an
    old LR scheduler holds it) records every pass of the loop; the new optimizer's
    ``zero_grad()`` resets ``.grad``, which discards the earlier passes of the old one:
    they were kept as unused records before (session 30's user trial: 30 records, 34 MiB
    after 30 steps). Its own step afterwards takes the last pass only, as its ``.grad``."""
    model = mlp()
    old = getattr(nnbridge, cls)(model)
    scheduler = torch.optim.lr_scheduler.StepLR(old, 10)   # keeps `old` alive
    new = getattr(nnbridge, cls)(model)
    for seed in range(5):
        x, y = data(B=8, seed=seed)
        new.zero_grad()
        F.cross_entropy(model(x), y).backward()
        new.step()
    assert len(old._recorder._chunks) == 1
    assert scheduler.optimizer is old
    x, y = data(B=8, seed=9)
    new.zero_grad()
    F.cross_entropy(model(x), y).backward()
    rec = old._recorder.batch()
    assert rec is not None and rec.output_grad.shape[0] == 8
