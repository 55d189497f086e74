"""Stage decomposition, operator-form derivatives vs dense torch.func Jacobians, hooks."""

import pytest
import torch
from torch import nn

import nnbridge
from nnbridge.stages import StageLinearization

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
