"""Stage decomposition, operator-form derivatives vs dense torch.func Jacobians, hooks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch import nn

import nnbridge
from nnbridge.stages import StageLinearization, make_stage
from tests._hypothesis import examples

from .conftest import cnn, data, mlp


def test_decomposition():
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 3), nn.ReLU()),
                          nn.Dropout(0.0), nn.Linear(3, 2, bias=False), nn.Tanh())
    pre, st = nnbridge.stages(model)
    assert [type(m) for m in pre] == [nn.Flatten]
    assert [type(s.module) for s in st] == [nn.Linear, nn.Linear]
    assert [tuple(type(p) for p in s.post) for s in st] == [(nn.ReLU, nn.Dropout), (nn.Tanh,)]
    assert st[0].control().shape == (3, 5) and st[1].control().shape == (2, 3)
    x = torch.randn(6, 4)
    h = x
    for s in st:
        h = s.forward(h)
    torch.testing.assert_close(h, model(x))


@pytest.mark.parametrize("model_fn,shape", [(mlp, (4,)), (cnn, (1, 5, 5))])
def test_operators_equal_dense_jacobians(model_fn, shape):
    model = model_fn()
    _, st_list = nnbridge.stages(model)
    x, _ = data(B=3, shape=shape)
    for st in st_list:
        lin = StageLinearization(st, x)
        fx, fu = lin.jacobians()           # torch.func, (B, n1, n), (B, n1, m)
        B, n1, n = fx.shape
        Y = torch.randn(B, 2, n1)
        dX = torch.randn(B, n)
        torch.testing.assert_close(lin.fx_T(Y), Y @ fx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.fx(dX), (fx @ dX.unsqueeze(-1)).squeeze(-1),
                                   rtol=1e-12, atol=1e-12)
        mean = (Y[:, 0].unsqueeze(1) @ fu).squeeze(1).mean(0)
        torch.testing.assert_close(lin.fu_T_mean(Y[:, 0]).reshape(-1), mean,
                                   rtol=1e-12, atol=1e-12)
        # factored per-sample cotangents: w^i X^i' == fu^i' y^i
        w = lin.factors(Y)
        per = torch.einsum("bjop,bip->bjoi", w, lin.X).reshape(B, 2, -1)
        torch.testing.assert_close(per, Y @ fu, rtol=1e-12, atol=1e-12)
        x = st.forward(x)


def test_capture_with_inplace_relu():
    """Pre-activation gradients seen by the tensor hooks are those of h itself, even when
    ReLU(inplace=True) overwrites h's storage."""
    model = mlp(inplace=True)
    _, st_list = nnbridge.stages(model)
    X, y = data(B=4)
    with nnbridge.capture(model, st_list, h_grads=True) as rec:
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
    # reference: run the layers by hand, keep h, differentiate
    hs, x = [], X
    for st in st_list:
        h = st.affine(x)
        h.retain_grad()
        hs.append(h)
        x = st.post_fn(h)
    nn.functional.cross_entropy(x, y).backward()
    for got, h in zip(rec.h_grads, hs):
        torch.testing.assert_close(got, h.grad, rtol=1e-13, atol=1e-15)
    assert all(len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0
               for m in model.modules())


def _unfold_reference(st, x):
    """F.unfold of the padded input with the row of ones, plainly."""
    g = st.conv
    X = nn.functional.unfold(g.input(x), g.kernel, dilation=g.dilation, padding=g.inner,
                             stride=g.stride)
    if st.groups != 1:
        X = X.reshape(X.shape[0], st.groups, -1, X.shape[-1])
    if st.has_bias:
        X = torch.cat([X, X.new_ones(*X.shape[:-2], 1, X.shape[-1])], -2)
    return X


@settings(max_examples=examples(40), deadline=None)
@given(one_d=hst.booleans(), groups=hst.sampled_from([1, 2]), k=hst.integers(1, 3),
       stride=hst.integers(1, 2), dilation=hst.integers(1, 2), bias=hst.booleans(),
       padding=hst.sampled_from([0, 1, "same"]),
       mode=hst.sampled_from(["zeros", "reflect", "circular"]), size=hst.integers(5, 8))
def test_conv_unfold_and_weight_gradient(one_d, groups, k, stride, dilation, bias, padding,
                                         mode, size):
    """The strided unfold equals F.unfold (bitwise); a convolution's control gradient
    (its weight gradient by convolution_backward) equals the sum of the factored
    per-sample cotangents w x~' over the unfolded input; value_gradient leaves out
    exactly the control gradient of the cotangents the caller already holds."""
    if padding == "same" and stride > 1:
        stride = 1
    cls = nn.Conv1d if one_d else nn.Conv2d
    torch.manual_seed(0)
    m = cls(4, 6, k, stride=stride, dilation=dilation, padding=padding, groups=groups,
            bias=bias, padding_mode=mode).double()
    st = make_stage(0, m, (nn.Tanh(),))
    shape = (3, 4, size) if one_d else (3, 4, size, size + 1)
    x = torch.randn(*shape, dtype=torch.float64)
    X = st.unfold(x)
    assert torch.equal(X, _unfold_reference(st, x))
    h = torch.randn(3, *m(x).shape[1:], dtype=torch.float64)
    w = st.factor_view(h)
    lead = "bop,bip->oi" if groups == 1 else "bgop,bgip->goi"
    lin = StageLinearization(st, x)
    torch.testing.assert_close(lin.control_gradient(h), torch.einsum(lead, w, X),
                               rtol=1e-12, atol=1e-12)
    Y = torch.randn(3, lin.n1, dtype=torch.float64)
    sent = 0.3 * h
    lin_s = StageLinearization(st, x, sent=sent)
    torch.testing.assert_close(lin_s.value_gradient(Y),
                               lin.fu_T_mean(Y) - lin.control_gradient(3 * sent) / 3,
                               rtol=1e-12, atol=1e-12)
