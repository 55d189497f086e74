"""``trajopt._linalg.thin_qr``: CholeskyQR2 (the GPU default) against Householder QR, and
a whole GT-DDP step with CholeskyQR2 forced on the CPU against the default."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F  # noqa: N812

import trajopt._linalg as linalg
from tests._hypothesis import examples

DT = torch.float64


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), n=st.integers(1, 12),
       r=st.integers(1, 6), log_cond=st.sampled_from([0, 3, 6]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_cholesky2_is_a_qr(seed, B, n, r, log_cond, dtype):
    """Z = Q R with Q orthonormal and R upper triangular with a non-negative diagonal; for
    a well-conditioned Z the same Q and R as Householder's (conditioning up to 1e6;
    float32 falls back where CholeskyQR2 would lose orthogonality)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=DT))[0]
    k = min(n, r)
    V = torch.linalg.qr(torch.randn(B, r, r, generator=g, dtype=DT))[0]
    s = torch.logspace(0, -log_cond, k, dtype=DT)
    Z = (U[..., :k] * s) @ V[..., :k, :]                     # (B, n, r), cond 10^log_cond
    Z = Z.to(dtype)
    Q, R = linalg.thin_qr(Z, "cholesky2")
    Qh, Rh = linalg.thin_qr(Z, "householder")
    eps = torch.finfo(dtype).eps
    tol = 50 * k * eps
    assert Q.shape == Qh.shape and R.shape == Rh.shape
    torch.testing.assert_close(Q @ R, Z, rtol=0, atol=tol * float(Z.abs().max()) + tol)
    eye = torch.eye(Q.shape[-1], dtype=dtype)
    torch.testing.assert_close(Q.mT @ Q, eye.expand_as(Q.mT @ Q), rtol=0, atol=tol)
    assert torch.equal(R, R.triu())
    assert bool((torch.diagonal(R, dim1=-2, dim2=-1) >= 0).all())
    assert bool((torch.diagonal(Rh, dim1=-2, dim2=-1) >= 0).all())
    if log_cond == 0:   # well conditioned: the same (unique) factors from both methods
        torch.testing.assert_close(Q, Qh, rtol=0, atol=tol)
        torch.testing.assert_close(R, Rh, rtol=0, atol=tol * float(Z.abs().max()) + tol)


def test_cholesky2_falls_back_on_rank_deficient_factors():
    """A factor with a repeated column (exactly singular Gram matrix): Householder's."""
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(3, 7, 3, generator=g, dtype=DT)
    Z[..., 2] = Z[..., 0]
    Q, R = linalg.thin_qr(Z, "cholesky2")
    Qh, Rh = linalg.thin_qr(Z, "householder")
    assert torch.equal(Q, Qh) and torch.equal(R, Rh)
    assert bool((torch.diagonal(R, dim1=-2, dim2=-1) >= 0).all())


def test_thin_qr_rule_and_bad_method():
    assert linalg.qr_method(torch.zeros(2, 5, 3)) == "householder"      # CPU
    with pytest.raises(ValueError, match="method"):
        linalg.thin_qr(torch.zeros(5, 3), "gram")


@pytest.mark.parametrize("curvature", ["identity", "ekfac"])
def test_gtddp_step_with_cholesky2_equals_householder(monkeypatch, curvature):
    """Two GT-DDP steps on the BatchNorm ResNet (rank-9 GGN factors downdated with the
    PSD projection on every stage): CholeskyQR2 forced == the CPU default (Householder).
    Batch 48, so that EKFAC's Kronecker factors have full rank (with rank-deficient ones
    EKFAC's step depends on the eigenbasis chosen inside the null space: docs/ddpnopt.md)."""
    import nnbridge
    from nnbridge.models import resnet
    g = torch.Generator().manual_seed(4)
    X = torch.randn(48, 1, 8, 8, generator=g, dtype=DT)
    y = torch.randint(0, 10, (48,), generator=g)
    calls = []

    def train():
        torch.manual_seed(0)
        model = resnet((1, 8, 8), 10).to(DT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = nnbridge.GTDDP(model, lr=0.05, curvature=curvature)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(X), y).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    ref = train()
    rule = linalg.qr_method
    monkeypatch.setattr(linalg, "qr_method", lambda Z: calls.append(1) or "cholesky2")
    out = train()
    monkeypatch.setattr(linalg, "qr_method", rule)
    assert calls, "the downdate did not go through thin_qr"
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
