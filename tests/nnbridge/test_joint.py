"""value_hessian="joint": DDP on the batch-augmented state (the dense (B n x B n) value
with its cross-sample blocks), against a literal dense reference (tests/reference/
batch_augmented.py) on a chain with a batch-coupled BatchNorm and on a residual network
with a parametrized shortcut; and equal to the per-sample dense value at B = 1."""

import pytest
import torch
from torch import nn

import nnbridge
from tests.nnbridge.conftest import closure_for, data
from tests.nnbridge.test_gtddp import ResMLP
from tests.reference.batch_augmented import batch_augmented_step
from trajopt.errors import InvalidArgumentError

LR = 0.3


def _linear(x, u, n_out, n_in, B):
    W, b = u[:n_out * n_in].reshape(n_out, n_in), u[n_out * n_in:]
    return x.reshape(B, n_in) @ W.T + b


def _flat(lin: nn.Linear) -> torch.Tensor:
    return torch.cat([lin.weight.detach().reshape(-1), lin.bias.detach()])


class BNChain(nn.Module):
    """Linear -> tanh -> Linear -> BatchNorm (no affine: batch statistics only) -> tanh
    -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.l0, self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.bn = nn.BatchNorm1d(5, affine=False)

    def forward(self, x):
        return self.l2(torch.tanh(self.bn(self.l1(torch.tanh(self.l0(x))))))


def _chain():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                         nn.Linear(4, 3))


def _step(opt, model, X, y):
    opt.step(closure_for(opt, model, X, y))


def test_joint_chain_with_batchnorm_equals_the_dense_batch_augmented_ddp():
    """B = 5, SGD's curvature (P = I / lr), BatchNorm in training mode coupling the
    samples: one DDPNOpt step with value_hessian="joint" equals the literal dense DDP on
    the batch-augmented state, whose Jacobians are autograd's of the batch functions."""
    torch.set_default_dtype(torch.float64)
    try:
        model = BNChain()
        X, y = data(B=5)
        B = X.shape[0]
        u = [_flat(m) for m in (model.l0, model.l1, model.l2)]
        eps = model.bn.eps

        def bn(h):
            return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + eps)

        stages = [lambda x, u: torch.tanh(_linear(x, u, 5, 4, B)).reshape(-1),
                  lambda x, u: torch.tanh(bn(_linear(x, u, 5, 5, B))).reshape(-1),
                  lambda x, u: _linear(x, u, 3, 5, B).reshape(-1)]
        want = batch_augmented_step(stages, u, X.reshape(-1), y,
                                    [LR * torch.eye(v.numel()) for v in u])
        opt = nnbridge.DDPNOpt(model, lr=LR, curvature="identity", value_hessian="joint",
                               value_psd=False)
        _step(opt, model, X, y)
        got = [_flat(m) for m in (model.l0, model.l1, model.l2)]
        step = [w - v for w, v in zip(want, u)]
        for g, w, s in zip(got, want, step):
            assert torch.allclose(g, w, atol=1e-12 * s.abs().max(), rtol=0), (g - w).abs().max()
        # the cross-sample blocks matter: the per-sample dense value gives another step
        model2 = BNChain()
        opt2 = nnbridge.DDPNOpt(model2, lr=LR, curvature="identity", value_hessian="full",
                                value_psd=False)
        _step(opt2, model2, X, y)
        diff = max(float((_flat(m) - w).abs().max()) for m, w in
                   zip((model2.l0, model2.l1, model2.l2), want))
        assert diff > 1e-6 * max(float(s.abs().max()) for s in step)
    finally:
        torch.set_default_dtype(torch.float32)


def test_joint_residual_network_equals_the_dense_batch_augmented_ddp():
    """GTDDP on ResMLP (identity span, a shortcut player P), B = 4: the joint step equals
    the dense DDP on the batch-augmented state written by hand as a chain on
    [x, x_r] (GT-DDP Eq. 26) with the players' controls concatenated."""
    torch.set_default_dtype(torch.float64)
    try:
        model = ResMLP()
        X, y = data(B=4, shape=(3,))
        B, d = 4, 4
        mods = (model.l0, model.l1, model.l2, model.l3, model.p)
        u = [_flat(m) for m in mods]
        m3 = u[3].numel()

        def f0(x, v):
            return torch.tanh(_linear(x, v, d, 3, B)).reshape(-1)

        def f1(x, v):              # -> [x2, x1]
            x1 = x.reshape(B, d)
            return torch.cat([torch.tanh(_linear(x1, v, d, d, B)), x1], 1).reshape(-1)

        def f2(y_, v):             # [x2, x1] -> [x3, x2]
            x2, x1 = y_.reshape(B, 2 * d).split(d, 1)
            return torch.cat([torch.tanh(_linear(x2, v, d, d, B)) + x1, x2], 1).reshape(-1)

        def f3(y_, v):             # [x3, x2] -> L3 x3 + P x2
            x3, x2 = y_.reshape(B, 2 * d).split(d, 1)
            return (_linear(x3, v[:m3], 3, d, B) + _linear(x2, v[m3:], 3, d, B)).reshape(-1)

        ctrl = [u[0], u[1], u[2], torch.cat([u[3], u[4]])]
        want = batch_augmented_step([f0, f1, f2, f3], ctrl, X.reshape(-1), y,
                                    [LR * torch.eye(v.numel()) for v in ctrl])
        want = want[:3] + [want[3][:m3], want[3][m3:]]
        opt = nnbridge.GTDDP(model, lr=LR, curvature="identity", value_hessian="joint",
                             value_psd=False)
        _step(opt, model, X, y)
        for m, w, v in zip(mods, want, u):
            s = float((w - v).abs().max())
            assert torch.allclose(_flat(m), w, atol=1e-12 * s, rtol=0), \
                (_flat(m) - w).abs().max() / s
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("curvature", ["identity", "adam", "ekfac"])
@pytest.mark.parametrize("cls", [nnbridge.DDPNOpt, nnbridge.GTDDP])
def test_joint_equals_full_at_batch_size_one(cls, curvature):
    """With one sample there are no cross-sample blocks: "joint" is "full", 3 steps (EKFAC:
    1 step; with one sample its Kronecker factors are rank deficient, the eigenbasis of
    their null space is arbitrary, and from the second step on the eigenvalue estimates
    made in that basis depend on rounding: the two forms drift apart by ~1e-4)."""
    torch.set_default_dtype(torch.float64)
    try:
        X, y = data(B=1, shape=(3,))
        nets = [ResMLP() if cls is nnbridge.GTDDP else _chain() for _ in range(2)]
        opts = [cls(n, lr=0.05, curvature=curvature, value_hessian=v)
                for n, v in zip(nets, ("full", "joint"))]
        for _ in range(1 if curvature == "ekfac" else 3):
            for o, n in zip(opts, nets):
                _step(o, n, X, y)
        for p, q in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.allclose(p, q, atol=1e-13, rtol=0)
    finally:
        torch.set_default_dtype(torch.float32)


def test_joint_refuses_the_exact_curvature():
    with pytest.raises(InvalidArgumentError, match="value_hessian='joint'"):
        nnbridge.DDPNOpt(ResMLP(), curvature="exact", value_hessian="joint")


class InceptionMLP(nn.Module):
    """x = tanh(stem x0); y = [tanh(a x), tanh(b2 tanh(b1 x)), tanh(c x)]; out = fc y:
    three branches merged by concatenation, so a, c and b2 are the three players of
    b2's stage."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.stem, self.a, self.b1 = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 3)
        self.b2, self.c, self.fc = nn.Linear(3, 2), nn.Linear(4, 2), nn.Linear(6, 3)

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        y = torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b2(torch.tanh(self.b1(x)))),
                       torch.tanh(self.c(x))], 1)
        return self.fc(y)


def _inception_reference(model, X, y, **how):
    """The reference step on InceptionMLP written as a chain on [h, x] with the three
    branches' controls concatenated (b2, a, c) at the merge stage."""
    B = X.shape[0]
    mods = (model.stem, model.b1, model.b2, model.a, model.c, model.fc)
    u = [_flat(m) for m in mods]
    mb2, ma = u[2].numel(), u[3].numel()

    def f0(x, v):
        return torch.tanh(_linear(x, v, 4, 3, B)).reshape(-1)

    def f1(x, v):                 # -> [h1, x]
        x = x.reshape(B, 4)
        return torch.cat([torch.tanh(_linear(x, v, 3, 4, B)), x], 1).reshape(-1)

    def f2(z, v):                 # [h1, x] -> [a, b2, c]
        h1, x = z.reshape(B, 7).split([3, 4], 1)
        vb2, va, vc = v[:mb2], v[mb2:mb2 + ma], v[mb2 + ma:]
        return torch.cat([torch.tanh(_linear(x, va, 2, 4, B)),
                          torch.tanh(_linear(h1, vb2, 2, 3, B)),
                          torch.tanh(_linear(x, vc, 2, 4, B))], 1).reshape(-1)

    def f3(z, v):
        return _linear(z, v, 3, 6, B).reshape(-1)

    ctrl = [u[0], u[1], torch.cat(u[2:5]), u[5]]
    if "lr" in how:
        how = {"Pinv": [how["lr"] * torch.eye(v.numel()) for v in ctrl]}
    new = batch_augmented_step([f0, f1, f2, f3], ctrl, X.reshape(-1), y, **how)
    mc = u[4].numel()
    return mods, u, new[:2] + list(new[2].split([mb2, ma, mc])) + new[3:]


@pytest.mark.parametrize("how", ["exact", "joint"])
def test_inception_step_equals_ddp_on_the_joint_control_of_the_branches(how):
    """Three branches merged by concatenation are three players of one stage:
    * "exact", B = 1: GTDDP with the exact curvature (the dense joint Q_ww of the three
      players) is vanilla DDP on the joint control (b2, a, c), P = (Q_uu + mu I) / lr;
    * "joint", B = 3, SGD's curvature: the batch-augmented step on the same."""
    torch.set_default_dtype(torch.float64)
    try:
        model = InceptionMLP()
        if how == "exact":
            X, y = data(B=1, shape=(3,))
            mods, u, want = _inception_reference(model, X, y, exact=(0.5, 1.0))
            opt = nnbridge.GTDDP(model, lr=0.5, curvature="exact", regularization=1.0,
                                 value_hessian="full")
        else:
            X, y = data(B=3, shape=(3,))
            mods, u, want = _inception_reference(model, X, y, lr=LR)
            opt = nnbridge.GTDDP(model, lr=LR, curvature="identity",
                                 value_hessian="joint", value_psd=False)
        assert [len(gs.players) for gs in nnbridge.graph_stages(model).stages] == [1, 1, 3, 1]
        _step(opt, model, X, y)
        for m, w, v in zip(mods, want, u):
            s = float((w - v).abs().max())
            assert s > 0
            assert torch.allclose(_flat(m), w, atol=1e-10 * s, rtol=0), \
                (_flat(m) - w).abs().max() / s
    finally:
        torch.set_default_dtype(torch.float32)
