"""Eigenbases of Kronecker factors made unique inside repeated eigenvalues
(nnbridge/eigenbasis.py): a property of the basis (invariant under any rotation eigh
could have returned inside a repeated eigenvalue) and of the optimizers that use it (a
permuted batch takes the same EKFAC / DDPNOpt(ekfac) steps)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch import nn

import nnbridge
from nnbridge.eigenbasis import eigenbasis, eigh, untie
from tests._hypothesis import examples


def _clusters(lam, scale):
    tol = 4 * lam.shape[0] * torch.finfo(lam.dtype).eps * scale
    cuts = ((lam[1:] - lam[:-1]) > tol).nonzero().flatten().tolist()
    return list(zip([0, *(c + 1 for c in cuts)], [*(c + 1 for c in cuts), lam.shape[0]]))


def _same_up_to_signs(Q1, Q2):
    """The same columns up to their signs (EKFAC's step does not see a column's sign:
    it enters S squared and P^-1 twice)."""
    signs = torch.sign((Q1 * Q2).sum(0))
    return (Q1 - Q2 * signs).abs().max()


@settings(max_examples=examples(30), deadline=None)
@given(seed=hst.integers(0, 2**31 - 1), n=hst.integers(3, 24), rank=hst.integers(0, 23),
       repeated=hst.integers(0, 3))
def test_the_basis_does_not_depend_on_the_one_eigh_returns(seed, n, rank, repeated):
    """Any orthonormal basis inside each repeated eigenvalue (the null space of a rank
    deficient factor, a repeated nonzero eigenvalue) is untied to the same basis; it is
    an eigenbasis of M."""
    g = torch.Generator().manual_seed(seed)
    rank = min(rank, n)
    X = torch.randn(rank, n, generator=g, dtype=torch.float64)
    M = X.T @ X
    if repeated and n - rank >= 2:     # a repeated nonzero eigenvalue inside the null space
        lam, Q = torch.linalg.eigh(M)
        Z = Q[:, : min(repeated + 1, n - rank)]
        M = M + 3.0 * Z @ Z.T
    lam, Q = eigh(M)
    scale = float(lam.abs().max()) if n else 1.0
    Qr = Q.clone()
    for lo, hi in _clusters(lam, scale):   # another basis eigh could have returned
        Rot = torch.linalg.qr(torch.randn(hi - lo, hi - lo, generator=g,
                                          dtype=torch.float64))[0]
        Qr[:, lo:hi] = Q[:, lo:hi] @ Rot
    coords = torch.diag(torch.arange(1, n + 1, dtype=torch.float64))
    U1, U2 = untie(lam, Q, [coords], scale), untie(lam, Qr, [coords], scale)
    assert _same_up_to_signs(U1, U2) < 1e-10
    torch.testing.assert_close(U1.T @ U1, torch.eye(n, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    D = U1.T @ M @ U1
    torch.testing.assert_close(D, torch.diag(torch.diagonal(D)), rtol=0,
                               atol=1e-12 * max(scale, 1.0))


def test_distinct_eigenvalues_keep_eighs_basis_and_a_null_space_gets_the_coordinates():
    """No repeated eigenvalue: the same tensor back (EKFAC's basis bit for bit).  A
    factor of 3 samples of 6 inputs: a permuted batch rounds M differently and eigh's
    null-space basis follows the rounding; the untied one does not."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    lam, Q = eigh(X.T @ X)
    assert untie(lam, Q, [torch.eye(6, dtype=torch.float64)], float(lam.max())) is Q
    for seed in range(3):
        X = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
        M1 = (X[:, :, None] * X[:, None, :]).sum(0)
        M2 = (X[[2, 0, 1], :, None] * X[[2, 0, 1], None, :]).sum(0)
        assert not torch.equal(M1, M2)
        # eigh's bases of the two roundings differ by O(1) inside the null space (0.4-1.2
        # here); the untied ones by rounding
        assert _same_up_to_signs(eigh(M1)[1], eigh(M2)[1]) > 0.1
        assert _same_up_to_signs(eigenbasis(M1), eigenbasis(M2)) < 1e-12


def test_breakers_apply_in_order_and_batched_factors_one_at_a_time():
    """A first breaker that vanishes on a repeated eigenvalue leaves it to the
    coordinates; a leading (groups) dimension is untied factor by factor."""
    n = 5
    M = torch.zeros(n, n, dtype=torch.float64)
    M[0, 0] = 1.0                                  # eigenvalue 0 of multiplicity 4
    zero_breaker = torch.zeros(n, n, dtype=torch.float64)
    Q = eigenbasis(M, [zero_breaker])
    # the coordinates diag(1..5) on span(e2..e5): the coordinate vectors themselves, in
    # the breaker's order (2..5), then e1 (eigenvalue 1)
    expected = torch.eye(n, dtype=torch.float64)[:, [1, 2, 3, 4, 0]]
    torch.testing.assert_close(Q.abs(), expected, rtol=0, atol=1e-12)
    B = torch.stack([M, torch.diag(torch.tensor([1.0, 1, 2, 2, 2], dtype=torch.float64))])
    QB = eigenbasis(B)
    for k in range(2):
        assert _same_up_to_signs(QB[k], eigenbasis(B[k])) < 1e-12
    # an empty factor (a zero-width layer), one or a batch of them: an empty basis
    for shape in ((0, 0), (2, 0, 0)):
        assert eigenbasis(torch.zeros(shape, dtype=torch.float64)).shape == shape


def _mlp():
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 10))


@pytest.mark.parametrize("make", [
    lambda m: nnbridge.EKFAC(m, lr=0.1),
    lambda m: nnbridge.DDPNOpt(m, curvature="ekfac", lr=0.1, terminal_hessian="ggn"),
    lambda m: nnbridge.GTDDP(m, curvature="ekfac", lr=0.1),
], ids=["EKFAC", "DDPNOpt(ekfac)", "GTDDP(ekfac)"])
def test_a_permuted_batch_takes_the_same_steps_with_rank_deficient_factors(make):
    """Batch 16 against 21 / 65 inputs: every factor is rank deficient in the first
    refresh interval (update_freq 10).  Three steps on a permuted batch equal the steps
    on the batch to 1e-11 of their size (eigh's null-space bases gave 5.7e-3)."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g))
               for _ in range(3)]
    perm = torch.randperm(16, generator=g)
    torch.manual_seed(0)
    start = _mlp()
    finals = []
    for permuted in (False, True):
        model = _mlp()
        model.load_state_dict(start.state_dict())
        opt = make(model)
        for X, y in batches:
            if permuted:
                X, y = X[perm], y[perm]

            def closure(X=X, y=y, opt=opt, model=model):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(X), y)
                loss.backward()
                return loss
            opt.step(closure)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    p0 = torch.cat([p.detach().flatten() for p in start.parameters()])
    assert (finals[0] - finals[1]).norm() <= 1e-11 * (finals[0] - p0).norm()
