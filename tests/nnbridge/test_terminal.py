"""The terminal value of the network OCP (nnbridge.terminal): the Gauss-Newton factors
against autograd Hessians of torch's losses, the sampled Fisher against its expectation,
and the option checks."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

import nnbridge
from nnbridge.terminal import fisher_factor, ggn_factor, terminal_value
from trajopt.errors import InvalidArgumentError, ShapeError
from trajopt.riccati import DenseValue, RankOneValue, RankRValue

from .conftest import mlp

DT = torch.float64


def _per_sample_hessians(loss_fn, out, target):
    """B * d^2 loss / d out_i^2 for the batch-mean loss: the per-sample phi's Hessian."""
    B = out.shape[0]
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o, target), out)
    return B * torch.stack([H[i, :, i, :] for i in range(B)])


@pytest.mark.parametrize("loss,loss_fn,target", [
    ("cross_entropy", F.cross_entropy, torch.tensor([0, 3, 6, 2])),
    ("mse", F.mse_loss, torch.randn(4, 7, generator=torch.Generator().manual_seed(1),
                                    dtype=DT))])
def test_ggn_equals_the_autograd_hessian_of_torchs_loss(loss, loss_fn, target):
    out = torch.randn(4, 7, generator=torch.Generator().manual_seed(0), dtype=DT)
    H = _per_sample_hessians(loss_fn, out, target)
    Z = ggn_factor(out, loss)
    torch.testing.assert_close(Z @ Z.transpose(-1, -2), H, rtol=1e-12, atol=1e-14)
    Vx = torch.zeros(4, 7, dtype=DT)
    outer = terminal_value(Vx, out, "ggn", loss, "outer")
    full = terminal_value(Vx, out, "ggn", loss, "full")
    assert isinstance(outer, RankRValue) and isinstance(full, DenseValue)
    torch.testing.assert_close(outer.Vxx, H, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(full.Vxx, H, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_sampled_fisher_is_unbiased_for_the_ggn(loss):
    torch.manual_seed(0)
    out = torch.randn(1, 5, dtype=DT).expand(40_000, 5)
    z = fisher_factor(out, loss)
    emp = (z.unsqueeze(-1) * z.unsqueeze(-2)).mean(0)
    Z = ggn_factor(out[:1], loss)[0]
    # 40,000 draws: the standard error of each entry is below 5e-3
    torch.testing.assert_close(emp, Z @ Z.T, rtol=0, atol=1.5e-2)
    assert not torch.allclose(emp, torch.zeros_like(emp), atol=1e-2)


def test_empirical_and_callables():
    Vx = torch.randn(3, 4, dtype=DT)
    out = torch.randn(3, 4, dtype=DT)
    emp = terminal_value(Vx, out, "empirical", "cross_entropy", "outer")
    assert isinstance(emp, RankOneValue) and torch.equal(emp.z, Vx)
    Z = torch.randn(3, 4, 2, dtype=DT)
    low = terminal_value(Vx, out, lambda o: Z, "cross_entropy", "outer")
    assert isinstance(low, RankRValue)
    torch.testing.assert_close(low.Vxx, Z @ Z.transpose(-1, -2))
    dense = terminal_value(Vx, out, lambda o: Z, "cross_entropy", "full")
    torch.testing.assert_close(dense.Vxx, Z @ Z.transpose(-1, -2))
    H = torch.eye(4, dtype=DT).expand(3, 4, 4)
    assert torch.equal(terminal_value(Vx, out, lambda o: H, "mse", "full").Vxx, H)
    with pytest.raises(ShapeError, match="terminal_hessian must return"):
        terminal_value(Vx, out, lambda o: torch.ones(3, 5, dtype=DT), "mse", "outer")


def test_options_are_checked():
    with pytest.raises(InvalidArgumentError, match="terminal_hessian must be one of"):
        nnbridge.DDPNOpt(mlp(), terminal_hessian="hessian")
    with pytest.raises(InvalidArgumentError, match="loss must be one of"):
        nnbridge.DDPNOpt(mlp(), loss="nll")


def test_ggn_factor_of_cross_entropy_has_classes_minus_one_columns():
    """Z_0 = diag(sqrt p) - p sqrt(p)' has the null vector sqrt(p); the factor keeps the
    n - 1 other directions: Z Z' equals the autograd Hessian of cross-entropy, also for
    a confident sample on the last class (where the Householder vector is largest) and
    for two classes (one column)."""
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 10):
        out = 4 * torch.randn(6, n, generator=g, dtype=torch.float64)
        out[0, -1], out[1, 0] = 60.0, 60.0
        Z = ggn_factor(out, "cross_entropy")
        assert Z.shape == (6, n, n - 1)
        for i in range(6):
            H = torch.autograd.functional.hessian(
                lambda s: torch.nn.functional.cross_entropy(s[None], torch.tensor([0])),
                out[i])
            torch.testing.assert_close(Z[i] @ Z[i].T, H, rtol=0, atol=1e-15)
