"""Networks written the way people write them (a custom nn.Module with its own forward,
functional activations, views) decompose from their torch.fx graph into the stages of the
equivalent nn.Sequential; what is not a chain of stages is refused with the node named."""

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import nnbridge
from nnbridge.stages import StageLinearization
from trajopt.errors import UnsupportedModelError

from .conftest import closure_for, cnn, data, mlp


class CustomMLP(nn.Module):
    """mlp() of conftest written with a forward: functional tanh, a method relu."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.fc1, self.fc2, self.head = seq[0], seq[2], seq[4]

    def forward(self, x):
        x = x.view(x.size(0), -1)
        x = torch.tanh(self.fc1(x))
        x = self.fc2(x).relu()
        return self.head(x)


class CustomCNN(nn.Module):
    """cnn() of conftest with F.relu, torch.tanh and a flatten by view."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.c1, self.c2, self.fc = seq[0], seq[2], seq[5]

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = torch.tanh(self.c2(x))
        return self.fc(x.view(x.shape[0], -1))


def _run(pre, sts, x):
    for p in pre:
        x = p(x)
    for st in sts:
        x = st.forward(x)
    return x


@pytest.mark.parametrize("make,wrap,shape", [(mlp, CustomMLP, (4,)),
                                             (cnn, CustomCNN, (1, 5, 5))])
def test_custom_forward_reproduces_the_model_and_its_derivatives(make, wrap, shape):
    seq = make()
    model = wrap(seq)
    pre, sts = nnbridge.stages(model)
    assert [st.module for st in sts] == [m for m in seq if isinstance(m, (nn.Linear, nn.Conv2d))]
    x, _ = data(B=3, shape=shape)
    torch.testing.assert_close(_run(pre, sts, x), model(x), rtol=0, atol=0)
    h = x
    for p in pre:
        h = p(h)
    for st in sts:  # operator-form derivatives against dense torch.func Jacobians
        lin = StageLinearization(st, h)
        fx, fu = lin.jacobians()
        Y = torch.randn(3, 2, fx.shape[1])
        torch.testing.assert_close(lin.fx_T(Y), Y @ fx, rtol=1e-12, atol=1e-12)
        w = lin.factors(Y)
        per = torch.einsum("bjop,bip->bjoi", w, lin.X).reshape(3, 2, -1)
        torch.testing.assert_close(per, Y @ fu, rtol=1e-12, atol=1e-12)
        h = st.forward(h)


@pytest.mark.parametrize("curvature", ["adam", "ekfac", "exact"])
def test_ddpnopt_on_a_custom_module_equals_the_sequential(curvature):
    """Same weights, same batches: DDPNOpt on the custom-forward module takes the steps
    it takes on the nn.Sequential (1e-12 over 5 steps)."""
    seq = mlp()
    custom = CustomMLP(copy.deepcopy(seq))
    kw = dict(curvature=curvature, lr=0.05)
    if curvature == "exact":
        kw.update(value_hessian="full")
    opts = [nnbridge.DDPNOpt(m, **kw) for m in (seq, custom)]
    for step in range(5):
        X, y = data(B=6, seed=step)
        for opt, m in zip(opts, (seq, custom)):
            opt.step(closure_for(opt, m, X, y))
    for p, q in zip(seq.parameters(), custom.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert not any(torch.equal(p, q) for p, q in zip(seq.parameters(), mlp().parameters()))


def test_compiled_model_is_unwrapped():
    model = CustomMLP(mlp())
    pre, sts = nnbridge.stages(torch.compile(model))
    assert [st.module for st in sts] == [model.fc1, model.fc2, model.head]


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(x + torch.relu(self.a(x)))


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(x, self.a.weight)


class _Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return F.dropout(self.a(x), 0.5, self.training)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x, z):
        return self.a(x) + z


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return -self.a(x)


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x), x


@pytest.mark.parametrize("model,match", [
    (_Residual(), r"node 'add' .* skip connection"),
    (nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)), r"LSTM.*supported: Linear, Conv1d, Conv2d"),
    (_Functional(), r"parameter 'a.weight' outside its module"),
    (_Dropout(), r"F.dropout's `training` flag"),
    (_TwoInputs(), r"more than one input"),
    (_Branchy(), r"torch.fx cannot trace _Branchy.forward"),
    (_Tuple(), r"return one tensor"),
    (nn.Sequential(nn.ReLU()), r"nothing to optimize"),
])
def test_what_is_not_a_chain_is_refused_by_name(model, match):
    with pytest.raises(UnsupportedModelError, match=match):
        nnbridge.stages(model)
    with pytest.raises(TypeError):  # UnsupportedModelError is a TypeError
        nnbridge.DDPNOpt(model)


def test_ddpnopt_on_a_compiled_model_equals_the_plain_one():
    """torch.compile'd (eager backend here; inductor gives the same to 1e-16, slowly):
    the hooks of the recorder see the compiled forward passes."""
    model, ref = mlp(), mlp()
    compiled = torch.compile(model, backend="eager")
    opt, ropt = nnbridge.DDPNOpt(compiled, lr=0.05), nnbridge.DDPNOpt(ref, lr=0.05)
    for step in range(3):
        X, y = data(B=6, seed=step)
        opt.step(closure_for(opt, compiled, X, y))
        ropt.step(closure_for(ropt, ref, X, y))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


_GLOBAL_SQUASH = [False]


class _Sneaky(nn.Module):
    """A forward the traced graph does not show: it branches on a Python attribute (or a
    global) that changes after tracing."""

    def __init__(self, on_global=False):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        self.squash = False
        self.on_global = on_global

    def forward(self, x):
        h = self.a(x)
        squash = _GLOBAL_SQUASH[0] if self.on_global else self.squash
        return self.b(torch.tanh(h) if squash else h)


@pytest.mark.parametrize("change", ["attribute", "global"])
def test_a_forward_that_left_its_graph_is_caught_at_the_step(change):
    """An attribute the trace read is compared at every step (``traced_values``, naming
    it); what the trace cannot name (a global) by the check of the decomposition
    against the first recorded batch."""
    model = _Sneaky(on_global=change == "global")
    opt = nnbridge.DDPNOpt(model, lr=0.05)
    if change == "global":
        _GLOBAL_SQUASH[0] = True
        match = "stage 0 .* does not give what"
    else:
        model.squash = True
        match = "model: squash changed after the optimizer traced the model"
    X, y = data(B=6)
    before = [p.clone() for p in model.parameters()]
    try:
        with pytest.raises(UnsupportedModelError, match=match):
            opt.step(closure_for(opt, model, X, y))
    finally:
        _GLOBAL_SQUASH[0] = False
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class _Normed(nn.Module):
    """Embedding before the first stage, LayerNorm (or BatchNorm) between stages."""

    def __init__(self, norm="layer"):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(12, 4)
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.norm = {"layer": lambda: nn.LayerNorm(6), "batch": lambda: nn.BatchNorm1d(6),
                     "group": lambda: nn.GroupNorm(2, 6)}[norm]()

    def forward(self, i):
        return self.fc2(self.norm(torch.tanh(self.fc1(self.emb(i)))))


def _tokens(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (8,), generator=g), torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_modules_without_a_ddp_model_get_the_base_update(norm):
    """feedback=False: DDPNOpt(adam) on a network with an Embedding and a LayerNorm /
    BatchNorm (training mode, its affine parameters a stage) equals torch.optim.Adam on
    all its parameters, 1e-12 over 5 steps; the Embedding, which has no DDP model, is
    named in a warning."""
    model, ref = _Normed(norm), _Normed(norm)
    with pytest.warns(UserWarning, match=r"\['emb'\] have no DDP model"):
        opt = nnbridge.DDPNOpt(model, lr=0.01, curvature="adam", feedback=False)
    ropt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for step in range(5):
        i, y = _tokens(step)
        opt.step(closure_for(opt, model, i, y))
        ropt.step(closure_for(ropt, ref, i, y))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["layer", "batch", "group"])
def test_norm_affine_parameters_are_stages_with_feedback(norm):
    """LayerNorm / BatchNorm affine parameters are a stage h = gamma n(x) + beta (one
    (1, 2) control block per feature / channel): its operators equal the dense Jacobians
    -- per sample for LayerNorm, of the whole batch for a training-mode BatchNorm (its
    statistics couple the samples) -- and the feedback step trains them."""
    from nnbridge.batchnorm import batch_coupled
    model = _Normed(norm)
    with pytest.warns(UserWarning, match=r"\['emb'\]"):
        opt = nnbridge.DDPNOpt(model, lr=0.05, curvature="adam")
    pre, sts = nnbridge.stages(model)
    assert [type(st.module) for st in sts] == [nn.Linear, type(model.norm), nn.Linear]
    i, y = _tokens(0)
    x = torch.tanh(model.fc1(model.emb(i))).detach()      # the norm stage's input
    B, n = x.shape
    with batch_coupled([model]):
        lin = StageLinearization(sts[1], x)
        U = lin.U

        def batch_map(z, u):   # the whole batch, flat in and out
            return sts[1].forward(z.reshape(B, n), u.reshape(U.shape)).reshape(-1)
        jx, ju = torch.func.jacrev(batch_map, argnums=(0, 1))(x.reshape(-1), U.reshape(-1))
        Y = torch.randn(B, 2, n)
        dX = torch.randn(B, n)
        Yb = Y.transpose(0, 1).reshape(2, -1)                  # 2 batch cotangents
        torch.testing.assert_close(lin.fx_T(Y), (Yb @ jx).reshape(2, B, n).transpose(0, 1),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.fx(dX), (jx @ dX.reshape(-1)).reshape(B, n),
                                   rtol=1e-12, atol=1e-12)
        per = torch.einsum("bj...op,b...ip->j...oi", lin.factors(Y), lin.X)
        torch.testing.assert_close(per.reshape(2, -1), Yb @ ju, rtol=1e-12, atol=1e-12)
        if norm != "batch":   # no coupling: block diagonal
            off = jx.reshape(B, n, B, n)[0, :, 1]
            assert float(off.abs().max()) == 0.0
        else:
            off = jx.reshape(B, n, B, n)[0, :, 1]
            assert float(off.abs().max()) > 1e-3
    losses = [opt.step(closure_for(opt, model, i, y)).item() for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(model.norm.weight, torch.ones(6))



@pytest.mark.parametrize("shape,bn", [((5,), nn.BatchNorm1d), ((5, 7), nn.BatchNorm1d),
                                      ((5, 4, 3), nn.BatchNorm2d)])
def test_training_batchnorm_stage_equals_the_module(shape, bn):
    """A training-mode BatchNorm stage against the module itself (torch's batch_norm with
    running statistics, on a copy: the output) and against the normalization written out
    (the batch mean, the biased variance as a mean of squares, ``eps`` inside the root:
    the batch Jacobians in x and in (gamma, beta) by ``jacrev``), against the stage's
    ``fx_T`` / ``fx`` (J = 3 cotangents a sample through its ``vmap``) and its per-sample
    control factors, float64 to 1e-12."""
    from nnbridge.batchnorm import batch_coupled
    torch.manual_seed(5)
    C, B = shape[0], 6
    norm = bn(C)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    model = nn.Sequential(nn.Identity(), norm)
    model.train()
    _, sts = nnbridge.stages(model)
    x = 2 * torch.randn(B, *shape) + 1
    ref = copy.deepcopy(norm)
    view = (1, C) + (1,) * (len(shape) - 1)

    def written_out(z, w, b):   # the whole batch, flat in and out
        z = z.reshape(B, *shape)
        dims = [0] + list(range(2, z.ndim))
        mean = z.mean(dims, keepdim=True)
        var = ((z - mean) ** 2).mean(dims, keepdim=True)
        return ((z - mean) / torch.sqrt(var + norm.eps) * w.reshape(view)
                + b.reshape(view)).reshape(-1)
    with batch_coupled([model]):
        lin = StageLinearization(sts[-1], x)
        torch.testing.assert_close(lin.x_next.reshape(B, -1), ref(x).reshape(B, -1),
                                   rtol=1e-12, atol=1e-12)
        jx, jw, jb = torch.func.jacrev(written_out, argnums=(0, 1, 2))(
            x.reshape(-1), norm.weight.detach(), norm.bias.detach())
        n = x[0].numel()
        Y = torch.randn(B, 3, n)
        Yb = Y.transpose(0, 1).reshape(3, -1)
        torch.testing.assert_close(lin.fx_T(Y), (Yb @ jx).reshape(3, B, n).transpose(0, 1),
                                   rtol=1e-12, atol=1e-12)
        dX = torch.randn(B, n)
        torch.testing.assert_close(lin.fx(dX), (jx @ dX.reshape(-1)).reshape(B, n),
                                   rtol=1e-12, atol=1e-12)
        per = torch.einsum("bj...op,b...ip->j...oi", lin.factors(Y), lin.X).reshape(3, C, 2)
        torch.testing.assert_close(per, torch.stack([Yb @ jw, Yb @ jb], -1),
                                   rtol=1e-12, atol=1e-12)

def test_batchnorm_in_training_mode_uses_the_recorded_batch_statistics():
    """In the DDP pass a training-mode BatchNorm normalizes with the statistics of the
    batch it sees (the norm test above checks its batch Jacobian); the optimizer leaves
    its mode and running statistics as the training loop's forward pass left them."""
    model = _Normed("batch")
    with pytest.warns(UserWarning):
        opt = nnbridge.DDPNOpt(model, lr=0.05)
    i, y = _tokens(0)
    # the optimizer's passes leave the running statistics alone
    opt.zero_grad()
    nn.functional.cross_entropy(model(i), y).backward()
    buffers = [b.clone() for b in model.norm.buffers()]
    opt.step()
    assert all(torch.equal(b, c) for b, c in zip(model.norm.buffers(), buffers))
    assert model.norm.training
    losses = [opt.step(closure_for(opt, model, i, y)).item() for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]


def test_modules_without_a_per_sample_derivative_are_refused_between_stages():
    class _Rnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.rnn, self.out = nn.Linear(4, 4), nn.GRU(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.rnn(self.fc(x))[0])
    with pytest.raises(UnsupportedModelError, match=r"'rnn' \(GRU\) .* sample by sample"):
        nnbridge.stages(_Rnn())


@pytest.mark.parametrize("conv,shape", [
    (lambda: nn.Conv1d(2, 3, 3, padding=1), (2, 9)),
    (lambda: nn.Conv1d(2, 3, 4, padding="same"), (2, 9)),               # asymmetric
    (lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="reflect", stride=2), (2, 9)),
    (lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular", dilation=2), (2, 9)),
    (lambda: nn.Conv2d(2, 3, (2, 3), padding="same", bias=False), (2, 5, 6)),
    (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate", stride=2), (2, 5, 6)),
    (lambda: nn.Conv2d(2, 3, 3, padding="valid", dilation=(1, 2)), (2, 5, 6)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 6)),               # grouped
    (lambda: nn.Conv2d(4, 4, 3, stride=2, groups=4, bias=False), (4, 5, 6)),    # depthwise
    (lambda: nn.Conv1d(4, 6, 4, padding="same", groups=2), (4, 9)),
])
def test_convolutions_with_any_padding_equal_their_dense_jacobians(conv, shape):
    torch.manual_seed(0)
    layer = conv()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten())
    pre, sts = nnbridge.stages(model)
    x = torch.randn(3, *shape)
    torch.testing.assert_close(_run(pre, sts, x), model(x), rtol=1e-14, atol=1e-14)
    lin = StageLinearization(sts[0], x)
    fx, fu = lin.jacobians()
    Y = torch.randn(3, 2, fx.shape[1])
    dX = torch.randn(3, fx.shape[2])
    torch.testing.assert_close(lin.fx_T(Y), Y @ fx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.fx(dX), (fx @ dX.unsqueeze(-1)).squeeze(-1),
                               rtol=1e-12, atol=1e-12)
    w = lin.factors(Y)
    per = torch.einsum("bj...op,b...ip->bj...oi", w, lin.X).reshape(3, 2, -1)
    torch.testing.assert_close(per, Y @ fu, rtol=1e-12, atol=1e-12)
    U = lin.U
    torch.testing.assert_close(sts[0].join(sts[0].split(U)), U, rtol=0, atol=0)
    # the pre-activation change of a control direction G, against the dense Jacobian
    G = torch.randn_like(U)
    dh = lin.gu(G)
    torch.testing.assert_close(lin.from_h(dh.unsqueeze(1)).squeeze(1),
                               fu @ G.reshape(-1), rtol=1e-12, atol=1e-12)


def test_a_1d_cnn_trains_with_ddpnopt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 5, padding="same"), nn.ReLU(),
                          nn.Conv1d(4, 4, 3, stride=2, padding=1, padding_mode="reflect"),
                          nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8, 3))
    X = torch.randn(16, 1, 16)
    y = torch.randint(0, 3, (16,))
    for curvature in ("adam", "ekfac"):
        m = copy.deepcopy(model)
        opt = nnbridge.DDPNOpt(m, lr=0.01 if curvature == "adam" else 0.1,
                               curvature=curvature)
        losses = [opt.step(closure_for(opt, m, X, y)).item() for _ in range(15)]
        assert losses[-1] < 0.7 * losses[0], (curvature, losses)


class _Halves(nn.Module):
    """The grouped convolution Conv2d(4, 4, 3, stride=2, groups=2) written as two
    ordinary convolutions on the channel halves, concatenated (two players)."""

    def __init__(self, grouped):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, stride=2), nn.Conv2d(2, 2, 3, stride=2)
        with torch.no_grad():
            for k, m in enumerate((self.a, self.b)):
                m.weight.copy_(grouped.weight[2 * k:2 * k + 2])
                m.bias.copy_(grouped.bias[2 * k:2 * k + 2])

    def forward(self, x):
        return torch.cat([self.a(x[:, :2]), self.b(x[:, 2:])], 1)


@pytest.mark.parametrize("curvature", ["adam", "ekfac"])
def test_a_grouped_convolution_is_its_groups_as_separate_layers(curvature):
    """Block-diagonal control over the groups: DDPNOpt(adam) with feedback on a network
    with a grouped convolution takes the steps GT-DDP takes on the same network with that
    layer written as one convolution per group (two players of one stage); EKFAC's one
    Kronecker pair per group is EKFAC on each separate layer."""
    from .conftest import grouped_cnn
    a = grouped_cnn()
    convs = list(a)
    convs[4] = nn.Conv2d(4, 4, 1)       # the depthwise one: ungrouped here
    with torch.no_grad():
        convs[4].weight.copy_(torch.diag_embed(a[4].weight[:, 0, 0, 0])[..., None, None])
        convs[4].bias.copy_(a[4].bias)
    a = nn.Sequential(*convs)
    b = nn.Sequential(convs[0], convs[1], _Halves(convs[2]), *[copy.deepcopy(m)
                                                              for m in convs[3:]])
    b[0] = copy.deepcopy(convs[0])
    if curvature == "ekfac":   # per layer (GTDDP's EKFAC would couple the two players)
        oa, ob = nnbridge.EKFAC(a, update_freq=2), nnbridge.EKFAC(b, update_freq=2)
    else:
        kw = dict(lr=1e-2, curvature=curvature, terminal_hessian="ggn")  # (defaults differ)
        oa, ob = nnbridge.DDPNOpt(a, **kw), nnbridge.GTDDP(b, **kw)
    for s in range(4):
        Xs, ys = data(B=6, shape=(1, 5, 5), seed=s)
        oa.step(closure_for(oa, a, Xs, ys))
        ob.step(closure_for(ob, b, Xs, ys))
    g = a[2]
    torch.testing.assert_close(g.weight, torch.cat([b[2].a.weight, b[2].b.weight]),
                               rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(g.bias, torch.cat([b[2].a.bias, b[2].b.bias]),
                               rtol=1e-11, atol=1e-12)
    for m, n in [(a[0], b[0]), (a[7], b[7])]:
        torch.testing.assert_close(m.weight, n.weight, rtol=1e-11, atol=1e-12)


def test_the_ddp_pass_runs_batchnorm_on_the_batch_it_sees():
    """Backward and feedback passes run a training-mode BatchNorm (between stages, no
    affine parameters) in training mode, normalizing with the batch's own statistics;
    its running statistics are untouched and restored as the module's own tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False), nn.Tanh(),
                          nn.Linear(6, 3))
    opt = nnbridge.DDPNOpt(model, lr=0.05, curvature="adam")
    X, y = data(B=8)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    seen = []
    handle = model[1].register_forward_pre_hook(
        lambda m, a: seen.append((m.training, m.running_mean is None)))
    buffers = list(model[1].buffers())
    values = [b.clone() for b in buffers]
    opt.step()
    handle.remove()
    assert seen and all(s == (True, True) for s in seen)
    assert all(a is b for a, b in zip(model[1].buffers(), buffers))
    assert all(torch.equal(b, c) for b, c in zip(model[1].buffers(), values))


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_a_parametrized_layer_is_refused_by_name(wrap):
    """weight_norm / spectral_norm make a layer's weight a function of other parameters:
    the optimizers failed with torch's "can't optimize a non-leaf Tensor"."""
    import warnings

    from torch.nn.utils import parametrizations
    from torch.nn.utils import weight_norm as old_weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old hook-based weight_norm
        layer = (old_weight_norm if wrap == "old_weight_norm" else
                 getattr(parametrizations, wrap))(nn.Linear(4, 3))
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), layer, nn.Tanh(), nn.Linear(3, 2))
    for make in (nnbridge.DDPNOpt, nnbridge.GTDDP, nnbridge.EKFAC):
        with pytest.raises(UnsupportedModelError, match="layer '2'.*computed weight"):
            make(model)


def test_groupnorm_on_images_is_a_stage_with_exact_operators():
    """GroupNorm's affine parameters (one (1, 2) block per channel, shared over the H W
    positions) as a stage on images: the stage's operators equal the dense Jacobians of
    the module, sample by sample (GroupNorm couples no samples), and DDPNOpt trains it
    (it was updated by the base optimizer, with a warning)."""
    import warnings
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "updated by the base optimizer" warning
        opt = nnbridge.DDPNOpt(model, lr=0.01, curvature="adam")
    _, sts = nnbridge.stages(model)
    assert [type(st.module) for st in sts] == [nn.Conv2d, nn.GroupNorm, nn.Linear]
    B = 3
    x = torch.randn(B, 4, 5, 5, dtype=torch.float64)
    lin = StageLinearization(sts[1], x)
    U = lin.U

    def batch_map(z, u):
        return sts[1].forward(z.reshape(x.shape), u.reshape(U.shape)).reshape(-1)
    jx, ju = torch.func.jacrev(batch_map, argnums=(0, 1))(x.reshape(-1), U.reshape(-1))
    n = x[0].numel()
    Y = torch.randn(B, 2, *lin.fx(x).shape[1:], dtype=torch.float64)
    Yb = Y.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(lin.fx_T(Y).reshape(B, 2, -1).transpose(0, 1).reshape(2, -1),
                               Yb @ jx, rtol=1e-12, atol=1e-12)
    per = torch.einsum("bj...op,b...ip->j...oi", lin.factors(Y), lin.X)
    torch.testing.assert_close(per.reshape(2, -1), Yb @ ju, rtol=1e-12, atol=1e-12)
    assert float(jx.reshape(B, n, B, n)[0, :, 1].abs().max()) == 0.0
    X, y = torch.randn(16, 1, 5, 5, dtype=torch.float64), torch.arange(16) % 3
    before = model[1].weight.detach().clone()
    losses = [opt.step(closure_for(opt, model, X, y)).item() for _ in range(10)]
    assert losses[-1] < losses[0] and not torch.equal(before, model[1].weight)


class _BatchFromInput(nn.Module):
    """``B = x.size(0)`` (or ``x.shape[0]``, ``x.size()[0]``) at the top of forward, used
    after the convolutions: ``h.view(B, -1)``."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.c1, self.c2 = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        B = {"size": lambda: x.size(0), "shape": lambda: x.shape[0],
             "size()": lambda: x.size()[0], "own": lambda: None,
             "features": lambda: x.size(1)}[self.mode]()
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        if self.mode == "own":
            return self.fc(h.view(h.size(0), -1))
        if self.mode == "features":
            return self.fc(h.view(-1, 48 * B))
        return self.fc(h.view(B, -1))


@pytest.mark.parametrize("mode", ["size", "shape", "size()"])
def test_the_batch_size_of_the_input_read_after_the_first_stage(mode):
    """A user's trial: ``h.view(x.size(0), -1)`` with x the model's input was refused as a
    skip connection. The batch size is every stage's: it is read from the stage's own
    value, and the steps equal those of ``h.view(h.size(0), -1)`` bit for bit."""
    X, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    torch.manual_seed(0)
    models = [_BatchFromInput("own"), _BatchFromInput(mode)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        opt = nnbridge.DDPNOpt(m)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(m(X), y).backward()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_another_dimension_of_the_input_read_later_is_still_refused():
    with pytest.raises(UnsupportedModelError, match="uses a value of the input transform"):
        nnbridge.DDPNOpt(_BatchFromInput("features"))
