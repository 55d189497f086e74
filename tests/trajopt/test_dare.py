"""DARE solvers against scipy, slycot and the Benner-Laub-Mehrmann benchmark examples."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import trajopt
from tests._hypothesis import examples
from trajopt.dare import backends
from trajopt.dare._common import prepare, relative_residual
from trajopt.errors import ConvergenceWarning, NotStabilizableError, SolverUnavailableError

from .darex import DAREX

METHODS = ["scipy", "slycot", "doubling", "auto"]


def rel_residual_np(A, B, Q, R, X, E=None, S=None):
    t = [None if v is None else torch.as_tensor(np.array(v, dtype=float))
         for v in (A, B, Q, R, E, S)]
    return float(relative_residual(prepare(*t), torch.as_tensor(np.array(X))))


def random_system(rng, n, m, *, with_e=False, with_s=False):
    """A random well-posed DARE: the joint cost [[Q, S], [S', R]] is positive definite."""
    A = rng.normal(size=(n, n))
    B = rng.normal(size=(n, m))
    L = rng.normal(size=(n + m, n + m))
    W = L @ L.T / (n + m) + np.diag([0.01] * n + [0.5] * m)
    Q, R = W[:n, :n], W[n:, n:]
    E = np.eye(n) + 0.2 * rng.uniform(-1, 1, size=(n, n)) / n if with_e else None
    S = 0.5 * W[:n, n:] if with_s else None
    return A, B, Q, R, E, S


@settings(max_examples=examples(25), deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       with_e=st.booleans(), with_s=st.booleans())
def test_all_methods_agree_with_scipy(n, m, seed, with_e, with_s):
    A, B, Q, R, E, S = random_system(np.random.default_rng(seed), n, m,
                                     with_e=with_e, with_s=with_s)
    try:
        # scipy's balancing is wrong with E (docs/dare.md): compare with it switched off
        ref = scipy.linalg.solve_discrete_are(A, B, Q, R, e=E, s=S, balanced=E is None)
    except np.linalg.LinAlgError:  # a draw too close to the unit circle for scipy
        assume(False)
    scipy_res = rel_residual_np(A, B, Q, R, ref, E, S)
    # a draw whose solution scipy itself cannot reach to the bound below is too
    # ill-conditioned for it (seed 301, n = 6, m = 1, with E: scipy's own residual 3.3e-10,
    # the methods' answers 1e-9 apart; a flaky failure of session 33's torch trials)
    assume(scipy_res <= 1e-10)
    scale = max(1.0, np.abs(ref).max())
    for method in METHODS:
        sol = trajopt.solve_dare(A, B, Q, R, E, S, method=method)
        np.testing.assert_allclose(sol.P, ref, rtol=0, atol=1e-8 * scale, err_msg=method)
        np.testing.assert_array_equal(sol.P, sol.P.T)
        assert np.abs(sol.closed_loop_eigvals).max() < 1
        assert sol.residual <= 1e-10, (method, sol.residual)
        # no larger residual than scipy's -- without E: since session 31 a descriptor
        # answer of "auto" is chosen by its forward error (Newton steps in Hewer's form,
        # docs/dare.md "A nearly singular E"; checked against a many-digit reference in
        # test_dare_descriptor.py), and its residual is then rounding noise that can end
        # above scipy's (n = 6, m = 1, seed 182584: residual 3.1e-12 against scipy's
        # 2.7e-12 with a forward error of 1.4e-11 against scipy's 4.1e-11)
        if method == "auto" and E is None:
            assert sol.residual <= max(scipy_res, 4 * np.finfo(float).eps)
        G = R + B.T @ sol.P @ B
        Kref = -np.linalg.solve(G, B.T @ sol.P @ A + (0 if S is None else S.T))
        np.testing.assert_allclose(sol.K, Kref, rtol=1e-9, atol=1e-10)
        Acl = A + B @ sol.K
        eig_ref = np.linalg.eigvals(Acl if E is None else np.linalg.solve(E, Acl))
        np.testing.assert_allclose(np.sort_complex(sol.closed_loop_eigvals),
                                   np.sort_complex(eig_ref), atol=1e-8)


@pytest.mark.parametrize("name", list(DAREX))
def test_benchmark_collection_residual_no_worse_than_scipy(name):
    A, B, Q, R = DAREX[name]
    scipy_res = rel_residual_np(A, B, Q, R, scipy.linalg.solve_discrete_are(A, B, Q, R))
    sol = trajopt.solve_dare(A, B, Q, R)  # auto
    # "no worse than scipy" with a floor at a few ulps: both are at rounding level there
    assert sol.residual <= max(scipy_res, 4 * np.finfo(float).eps), (sol.residual, scipy_res)
    assert np.abs(sol.closed_loop_eigvals).max() < 1
    slycot_sol = trajopt.solve_dare(A, B, Q, R, method="slycot")
    scale = np.abs(slycot_sol.P).max()
    # darex12 is ill conditioned: slycot itself is only accurate to ~1e-5 there
    tol = 1e-4 if name == "darex12" else 1e-7
    np.testing.assert_allclose(sol.P, slycot_sol.P, atol=tol * scale, rtol=0)


def test_scipy_balancing_bug_with_e_is_avoided():
    A, B, Q, R, E, _ = random_system(np.random.default_rng(1), 2, 2, with_e=True)
    raw = scipy.linalg.solve_discrete_are(A, B, Q, R, e=E)
    ours = trajopt.solve_dare(A, B, Q, R, E, method="scipy")
    ref = trajopt.solve_dare(A, B, Q, R, E, method="slycot")
    assert rel_residual_np(A, B, Q, R, raw, E) > 1e-4  # the bug, as of scipy 1.17
    assert ours.residual < 1e-14
    np.testing.assert_allclose(ours.P, ref.P, rtol=1e-10, atol=1e-12)


def test_batched_doubling_equals_looped_scipy():
    rng = np.random.default_rng(0)
    systems = [random_system(rng, 5, 2) for _ in range(12)]
    A, B, Q, R = (np.stack([s[i] for s in systems]).reshape(3, 4, *systems[0][i].shape)
                  for i in range(4))
    sol = trajopt.solve_dare(A, B, Q, R, method="doubling")
    assert sol.P.shape == (3, 4, 5, 5) and sol.K.shape == (3, 4, 2, 5)
    assert sol.residual.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            ref = scipy.linalg.solve_discrete_are(A[i, j], B[i, j], Q[i, j], R[i, j])
            np.testing.assert_allclose(sol.P[i, j], ref, rtol=1e-9, atol=1e-9)


def test_numpy_equals_torch_and_dtype_kept():
    A, B, Q, R, E, S = random_system(np.random.default_rng(1), 4, 2, with_s=True)
    sn = trajopt.solve_dare(A, B, Q, R, S=S, method="doubling")
    stt = trajopt.solve_dare(*(torch.tensor(v) for v in (A, B, Q, R)), S=torch.tensor(S),
                             method="doubling")
    assert isinstance(stt.P, torch.Tensor) and isinstance(sn.P, np.ndarray)
    np.testing.assert_allclose(sn.P, stt.P.numpy(), rtol=1e-14, atol=1e-14)
    s32 = trajopt.solve_dare(*(torch.tensor(v, dtype=torch.float32) for v in (A, B, Q, R)),
                             method="doubling")
    assert s32.P.dtype == torch.float32
    ref = scipy.linalg.solve_discrete_are(A, B, Q, R)
    # single precision: eps_32 = 1.2e-7 times the DARE's conditioning
    np.testing.assert_allclose(s32.P.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_broadcast_shared_b_over_batch_of_a():
    rng = np.random.default_rng(2)
    A = rng.normal(size=(6, 3, 3))
    B = rng.normal(size=(3, 1))
    sol = trajopt.solve_dare(A, B, np.eye(3), np.eye(1), method="auto")
    assert sol.P.shape == (6, 3, 3)
    np.testing.assert_allclose(
        sol.P[4], scipy.linalg.solve_discrete_are(A[4], B, np.eye(3), np.eye(1)),
        rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_unstable_uncontrollable_mode_raises(method):
    A = np.diag([1.5, 0.5])
    B = np.array([[0.0], [1.0]])
    with pytest.raises(NotStabilizableError):
        trajopt.solve_dare(A, B, np.eye(2), np.eye(1), method=method)


def test_uncontrollable_mode_named_in_message():
    A = np.diag([2.0, 0.5])
    B = np.array([[0.0], [1.0]])
    with pytest.raises(NotStabilizableError, match=r"lambda = \(?2"):
        trajopt.solve_dare(A, B, np.eye(2), np.eye(1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_the_unstabilizable_element_of_a_batch_is_named(method, bad):
    """The error names the failing element of the caller's batch, also where "auto" hands
    a part of the batch to a per-element back end (it named the position in that part)
    and where the others need that back end too (undetectable but stabilizable: doubling
    cannot solve them)."""
    und = (np.diag([0.5, 1.2]), np.array([[1.0], [1.0]]), np.diag([1.0, 0.0]))
    wrong = (np.diag([0.5, 1.3]), np.array([[1.0], [0.0]]), np.eye(2))
    A, B, Q = (torch.tensor(np.stack([(wrong if i == bad else und)[k] for i in range(3)]))
               for k in range(3))
    if method == "doubling":  # it cannot solve the others: a batch of stabilizable ones
        A, B, Q = A.clone(), B.clone(), torch.eye(2).expand(3, 2, 2)
    with pytest.raises(NotStabilizableError, match=rf"batch element \({bad},\).*1\.3"):
        trajopt.solve_dare(A, B, Q, torch.eye(1, dtype=A.dtype), method=method)


def test_slycot_missing(monkeypatch):
    A, B, Q, R, _, _ = random_system(np.random.default_rng(3), 3, 1)
    monkeypatch.setattr(backends, "slycot_available", lambda: False)
    with pytest.raises(SolverUnavailableError, match="slycot"):
        trajopt.solve_dare(A, B, Q, R, method="slycot")
    # auto still solves a batch doubling cannot (singular R: darex3) through scipy
    A3, B3, Q3, R3 = DAREX["darex3"]
    sol = trajopt.solve_dare(np.stack([A3, A3]), B3, Q3, R3)
    assert "scipy" in sol.method and "slycot" not in sol.method


def test_an_inaccurate_back_end_is_never_returned_silently(monkeypatch):
    """issue "Nothing silent" #8: slycot with E and S once answered with residual 2e-3
    where scipy's was 3e-9.  Here slycot's answer is spoiled on purpose: "auto" (which
    falls back to the reference back ends where doubling fails: made to fail here)
    returns scipy's answer instead, and method="slycot" warns with the residual (raises
    above 1e-3: no solution)."""
    import trajopt.dare.backends as backends
    import trajopt.dare.solve as dsolve
    from trajopt.errors import NumericalError
    rng = np.random.default_rng(5)
    A, B, Q, R, E, S = random_system(rng, 4, 2, with_e=True, with_s=True)
    true = trajopt.solve_dare(A, B, Q, R, E=E, S=S, method="scipy")

    def no_doubling(d, **kw):
        raise NumericalError("doubling made to fail by the test")

    def spoiled(d):
        return torch.as_tensor(true.P, dtype=d.A.dtype).expand(*d.batch, 4, 4) * 1.01

    monkeypatch.setattr(backends, "slycot_available", lambda: True)
    monkeypatch.setattr(backends, "solve_slycot", spoiled)    # "auto"'s reference
    monkeypatch.setattr(dsolve, "solve_slycot", spoiled)      # method="slycot"
    monkeypatch.setattr(dsolve, "solve_doubling", no_doubling)
    sol = trajopt.solve_dare(np.stack([A, A]), B, Q, R, E=E, S=S)
    assert "scipy" in sol.method
    assert float(np.max(sol.residual)) <= 10 * float(true.residual) + 1e-14
    with pytest.raises(NumericalError, match="slycot back end returned no solution"):
        trajopt.solve_dare(A, B, Q, R, E=E, S=S, method="slycot")   # residual > 1e-3
    # P 1 % off (of the scaled problem's solution): inaccurate, not wrong -- a warning
    monkeypatch.setattr(dsolve, "solve_slycot", lambda d: dsolve.solve_scipy(d) * 1.01)
    with pytest.warns(ConvergenceWarning, match="relative residual"):
        trajopt.solve_dare(A, B, Q, R, E=E, S=S, method="slycot")


def test_auto_rule():
    rng = np.random.default_rng(4)
    A, B, Q, R, _, _ = random_system(rng, 3, 1)
    # one small system: scipy's pencil method (+ Newton only when not at rounding level)
    assert trajopt.solve_dare(A, B, Q, R).method.startswith("scipy")
    # a batch: doubling
    batch = trajopt.solve_dare(np.stack([A, 0.5 * A]), B, Q, R)
    assert batch.method.startswith("doubling")
    # one large system: doubling
    A40, B40, Q40, R40, _, _ = random_system(rng, 40, 3)
    assert trajopt.solve_dare(A40 / 4, B40, Q40, R40).method.startswith("doubling")
    # a batch with singular R: the reference solver
    A3, B3, Q3, R3 = DAREX["darex3"]
    sol = trajopt.solve_dare(np.stack([A3, A3]), B3, Q3, R3)
    assert sol.method in ("slycot", "scipy")


def test_newton_refinement_repairs_a_perturbed_solution():
    A, B, Q, R, _, _ = random_system(np.random.default_rng(5), 6, 2)
    d = prepare(*(torch.tensor(v) for v in (A, B, Q, R)), None, None)
    from trajopt.dare.newton import newton_refine
    X = torch.tensor(scipy.linalg.solve_discrete_are(A, B, Q, R))
    Xp = X + 1e-4 * torch.eye(6)
    Xr, res = newton_refine(d, Xp, steps=3)
    assert float(res) < 1e-14 and float(relative_residual(d, Xp)) > 1e-7
    np.testing.assert_allclose(Xr, X, rtol=1e-10, atol=1e-10)


def test_doubling_on_the_gpu_if_present():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    A, B, Q, R, _, _ = random_system(np.random.default_rng(6), 5, 2)
    t = [torch.tensor(v, device="cuda") for v in (A, B, Q, R)]
    sol = trajopt.solve_dare(*t, method="doubling")
    assert sol.P.device.type == "cuda"
    np.testing.assert_allclose(sol.P.cpu().numpy(),
                               scipy.linalg.solve_discrete_are(A, B, Q, R), rtol=1e-9,
                               atol=1e-9)


def test_auto_raises_where_no_back_end_found_a_solution():
    """An indefinite R without a stabilizing solution (a docs trial): "auto" returned
    scipy's answer with relative residual 0.08 and a warning; scipy itself raises. It
    raises NumericalError with the residual now; so does the explicit "scipy" (session
    30's user trial: it returned an indefinite P with a warning, even with refine=2 --
    scipy's own call on the cost scaled by 1/2 does not raise)."""
    from trajopt.errors import NumericalError
    A, B = np.array([[1.0, 0.1], [0.0, 1.0]]), np.array([[0.0], [0.1]])
    with pytest.raises(NumericalError, match="no back end found a solution"):
        trajopt.solve_dare(A, B, np.eye(2), -np.eye(1))
    for refine in (0, 2):
        with pytest.raises(NumericalError, match="scipy back end returned no solution"):
            trajopt.solve_dare(A, B, np.eye(2), -np.eye(1), method="scipy", refine=refine)
    with pytest.raises(scipy.linalg.LinAlgError):
        scipy.linalg.solve_discrete_are(A, B, np.eye(2), -np.eye(1))


def _double_integrator():
    return np.array([[1.0, 0.1], [0.0, 1.0]]), np.array([[0.0], [0.1]])


@pytest.mark.parametrize("solve", ["dare", "dare batched", "dare torch doubling", "care",
                                   "infinite", "infinite continuous"])
def test_results_pickle(solve):
    """The Riccati results pickle (multiprocessing, joblib, caches), before and after
    their closed-loop eigenvalues are read (the lazy eigenvalues were a local closure)."""
    import pickle
    A, B = _double_integrator()
    Q, R = np.eye(2), np.eye(1)
    sol = {
        "dare": lambda: trajopt.solve_dare(A, B, Q, R),
        "dare batched": lambda: trajopt.solve_dare(np.stack([A, 0.5 * A]), B, Q, R),
        "dare torch doubling": lambda: trajopt.solve_dare(
            *(torch.tensor(v) for v in (A, B, Q, R)), method="doubling"),
        "care": lambda: trajopt.solve_care(A - np.eye(2), B, Q, R),
        "infinite": lambda: trajopt.solve_infinite_lqr(A, B, Q, R),
        "infinite continuous": lambda: trajopt.solve_infinite_lqr(A - np.eye(2), B, Q, R,
                                                                  time="continuous"),
    }[solve]()
    for read_first in (False, True):
        if read_first:
            assert np.asarray(sol.closed_loop_eigvals).shape[-1] == 2
        back = pickle.loads(pickle.dumps(sol))
        np.testing.assert_array_equal(np.asarray(back.P), np.asarray(sol.P))
        np.testing.assert_array_equal(np.asarray(back.closed_loop_eigvals),
                                      np.asarray(sol.closed_loop_eigvals))


@pytest.mark.parametrize("solve", [trajopt.solve_dare, trajopt.solve_care,
                                   trajopt.solve_infinite_lqr])
def test_empty_batches_and_states_are_refused_by_name(solve):
    """errors.md: empty batches are refused at the boundary (they raised torch's
    "max(): Expected reduction dim" or numpy's "zero-size array")."""
    A, B = _double_integrator()
    with pytest.raises(trajopt.errors.ShapeError, match="A has an empty batch"):
        solve(np.zeros((0, 2, 2)), B, np.eye(2), np.eye(1))
    with pytest.raises(trajopt.errors.ShapeError, match="Q has an empty batch"):
        solve(torch.tensor(A), torch.tensor(B), torch.zeros(3, 0, 2, 2, dtype=torch.float64),
              torch.eye(1, dtype=torch.float64))
    with pytest.raises(trajopt.errors.ShapeError, match="A must have at least one state"):
        solve(np.zeros((0, 0)), np.zeros((0, 1)), np.zeros((0, 0)), np.eye(1))


def test_a_scalar_r_is_a_one_by_one_matrix_as_in_scipy():
    A, B = _double_integrator()
    for R in (2.0, 2, np.float64(2.0), np.array(2.0)):
        np.testing.assert_allclose(trajopt.solve_dare(A, B, np.eye(2), R).P,
                                   scipy.linalg.solve_discrete_are(A, B, np.eye(2), 2.0),
                                   rtol=1e-12)
    t = trajopt.solve_dare(torch.tensor(A), torch.tensor(B), torch.eye(2, dtype=torch.float64),
                           torch.tensor(2.0, dtype=torch.float64))
    np.testing.assert_allclose(t.P.numpy(), scipy.linalg.solve_discrete_are(A, B, np.eye(2), 2.0),
                               rtol=1e-12)
    np.testing.assert_allclose(
        trajopt.solve_care(A - np.eye(2), B, np.eye(2), 2.0).P,
        scipy.linalg.solve_continuous_are(A - np.eye(2), B, np.eye(2), 2.0), rtol=1e-12)
