"""The feedback term's curvature and closed-loop gain (``OperatorStep.feedback_terms``,
``StateFeedback``) against dense per-sample formulas, float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._hypothesis import examples
from trajopt.riccati import (
    DenseOperatorStage,
    DenseResponse,
    DenseValue,
    RankOneValue,
    RankRValue,
    joint_riccati_step,
    operator_riccati_step,
)

D = torch.float64


def _stage(g, B, n, n1, m):
    A = torch.randn(B, n1, n, generator=g, dtype=D)
    Bu = torch.randn(B, n1, m, generator=g, dtype=D)
    return A, Bu, DenseOperatorStage(A, Bu)


def _value(kind, g, B, n1):
    """A next value V' of each representation, with its dense per-sample Hessian."""
    Vx = torch.randn(B, n1, generator=g, dtype=D)
    if kind == "rank one":
        v = RankOneValue(Vx=Vx, c=torch.rand(B, generator=g, dtype=D) + 0.1,
                         z=torch.randn(B, n1, generator=g, dtype=D))
    elif kind == "rank r":
        v = RankRValue(Vx=Vx, Z=torch.randn(B, n1, 2, generator=g, dtype=D))
    elif kind == "rank r, core":
        L = torch.randn(B, 2, 2, generator=g, dtype=D)
        v = RankRValue(Vx=Vx, Z=torch.randn(B, n1, 2, generator=g, dtype=D),
                       C=L @ L.transpose(-1, -2))
    else:
        Z = torch.randn(B, n1, n1, generator=g, dtype=D)
        v = DenseValue(Vx, Z @ Z.transpose(-1, -2))
    return v, v.Vxx


@pytest.mark.parametrize("kind", ["rank one", "rank r", "rank r, core", "dense"])
@pytest.mark.parametrize("psd", [False, True])
@pytest.mark.parametrize("tikhonov", [0.0, 0.3])
@settings(max_examples=examples(8), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), n=st.integers(1, 4),
       n1=st.integers(2, 4), m=st.integers(1, 4))
def test_feedback_terms_equal_the_dense_formulas(seed, B, n, n1, m, kind, psd, tikhonov):
    """cotangent Y^i = V'(A^i dX^i) (with Tikhonov's eps I), curvature
    q^i = (A^i dX^i)' V' A^i dX^i, for every value representation, with and without the
    PSD projection (the factor map of Z = QR) -- the fast path of the factored values
    (coordinates off the pulled-back factor) and the general one (f_x dX)."""
    g = torch.Generator().manual_seed(seed)
    A, Bu, stage = _stage(g, B, n, n1, m)
    value, V = _value(kind, g, B, n1)
    P = torch.eye(m, dtype=D) * 3.0
    step = operator_riccati_step(value, stage, lambda Qu, v: DenseResponse(stage, P),
                                 project_psd=psd, recursion="mean", tikhonov=tikhonov)
    dX = torch.randn(B, n, generator=g, dtype=D)
    change = torch.einsum("bij,bj->bi", A, dX)
    V = V + tikhonov * torch.eye(n1, dtype=D)
    Y = torch.einsum("bij,bj->bi", V, change)
    terms = step.feedback_terms(dX)
    torch.testing.assert_close(terms.cotangent, Y, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(terms.curvature, (change * Y).sum(-1), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(step.feedback_cotangent(dX), Y, rtol=1e-11, atol=1e-11)
    assert step.feedback_terms(dX, curvature=False).curvature is None


def _gain(F, PF, q):
    return float((F * PF).sum() / q.mean())


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 5), n=st.integers(1, 4),
       n1=st.integers(2, 4), m=st.integers(1, 6), factor=st.sampled_from([0.25, 1.0, 4.0]))
def test_loop_gain_is_the_rayleigh_quotient_of_the_closed_loop(seed, B, n, n1, m, factor):
    """rho = <F, P^-1 F> / E_i[q^i] is -sum_i a_i' V b_i / sum_i a_i' V a_i with the
    state change's a_i = A^i dX^i and the feedback's response b_i = Bu^i du_fb: the share
    of the change the feedback cancels in the value's metric.  With P the batch's exact
    E[Bu' V' Bu] it lies in [0, 1] (the model's Newton step); with P = that / 4 it can
    exceed 1, with P = 4x that it is at most 1/4."""
    g = torch.Generator().manual_seed(seed)
    A, Bu, stage = _stage(g, B, n, n1, m)
    value, V = _value("rank one", g, B, n1)
    Quu = torch.einsum("bim,bij,bjk->mk", Bu, V, Bu) / B + 1e-9 * torch.eye(m, dtype=D)
    P = factor * Quu
    step = operator_riccati_step(value, stage, lambda Qu, v: DenseResponse(stage, P),
                                 project_psd=True, recursion="mean")
    dX = torch.randn(B, n, generator=g, dtype=D)
    terms = step.feedback_terms(dX)
    F = stage.fu_T_mean(terms.cotangent)
    PF = torch.linalg.solve(P, F)
    rho = _gain(F, PF, terms.curvature)
    a = torch.einsum("bij,bj->bi", A, dX)
    b = torch.einsum("bij,j->bi", Bu, -PF)
    want = float(-torch.einsum("bi,bij,bj->", a, V, b) / torch.einsum("bi,bij,bj->", a, V, a))
    assert abs(rho - want) <= 1e-9 * max(1.0, abs(want))
    assert -1e-12 <= rho <= 1.0 / factor + 1e-9


def test_loop_gain_of_the_joint_form():
    """The batch-augmented form (JointStep): one "sample", the curvature
    dX' Fx' V Fx dX, and F = Fu' V Fx dX / B: the same Rayleigh quotient."""
    g = torch.Generator().manual_seed(3)
    B, n, n1, m = 3, 2, 3, 2
    A, Bu, stage = _stage(g, B, n, n1, m)
    Z = torch.randn(B * n1, B * n1, generator=g, dtype=D)
    V = Z @ Z.T
    P = torch.eye(m, dtype=D) * 0.7
    step = joint_riccati_step(DenseValue(Vx=torch.zeros(1, B * n1, dtype=D), Vxx=V[None]),
                              stage, lambda Qu, val: DenseResponse(stage, P), samples=B)
    dX = torch.randn(B, n, generator=g, dtype=D)
    terms = step.feedback_terms(dX)
    Fx, Fu = torch.block_diag(*A), Bu.reshape(B * n1, m)
    a = Fx @ dX.reshape(-1)
    torch.testing.assert_close(terms.curvature, (a @ V @ a).reshape(1), rtol=1e-12, atol=0)
    F = step.stage.fu_T_mean(terms.cotangent)
    torch.testing.assert_close(F, step.feedback(dX), rtol=1e-12, atol=1e-12)
    PF = torch.linalg.solve(P, F)
    b = Fu @ -PF
    rho = float((F * PF).sum() / (terms.curvature.sum() / B))
    assert abs(rho - float(-(a @ V @ b) / (a @ V @ a))) < 1e-10
