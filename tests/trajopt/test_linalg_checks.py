"""``trajopt._linalg.finite_rows`` and ``norm1`` (the fast forms of the solvers' finiteness
checks and 1-norms), and ``trajopt._checks``' shape helpers (``same_shapes``,
``same_shapes_by_position``, ``broadcast_shapes``: the per-stage loop's fast forms)
against the plain expressions they replace."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._hypothesis import examples
from trajopt._checks import broadcast_shapes, same_shapes, same_shapes_by_position
from trajopt._linalg import finite_rows, norm1

SPECIALS = [0.0, -1.5, 1e300, -1e308, 3e38, math.inf, -math.inf, math.nan]


@settings(max_examples=examples(80), deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.lists(st.integers(0, 4), min_size=1,
                                                   max_size=4),
       dims=st.integers(1, 3), dtype=st.sampled_from([torch.float64, torch.float32,
                                                        torch.float16]),
       specials=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(SPECIALS)),
                         max_size=4))
def test_finite_rows_is_isfinite_all(seed, shape, dims, dtype, specials):
    """Equal to ``isfinite(x).all`` over the last ``dims`` dimensions for any shape
    (empty elements and an empty batch included), with NaN, +-inf and values that
    overflow the dtype planted at random."""
    dims = min(dims, len(shape))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    flat = x.view(-1)
    for pos, v in specials:
        if flat.numel():
            flat[pos % flat.numel()] = v
    x = x.to(dtype)
    want = torch.isfinite(x).flatten(-dims).all(-1)
    got = finite_rows(x, dims)
    assert got.dtype == torch.bool and got.shape == want.shape
    assert torch.equal(got, want)


def test_finite_rows_of_large_finite_entries_and_bad_dims():
    """Large finite entries whose sum overflows (the failure a sum-based check has) are
    finite; dims outside 1..ndim is an error, not a reduction over everything."""
    import pytest
    for x in (torch.full((2, 3, 3), 1e308, dtype=torch.float64),
              torch.full((2, 3, 3), -3e38, dtype=torch.float32),
              torch.full((2, 3, 3), 4e4, dtype=torch.float16)):
        assert bool(finite_rows(x).all()) and finite_rows(x).shape == (2,)
    with pytest.raises(ValueError, match="dims"):
        finite_rows(torch.ones(2, 3), 0)
    with pytest.raises(ValueError, match="dims"):
        finite_rows(torch.ones(2, 3), 3)


@settings(max_examples=examples(60), deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(0, 3), r=st.integers(1, 6),
       c=st.integers(1, 6), scale=st.sampled_from([1e-300, 1.0, 1e300]))
def test_norm1_is_the_matrix_one_norm(seed, batch, r, c, scale):
    """Equal to ``torch.linalg.matrix_norm(x, 1)`` (the largest column sum of magnitudes)
    up to the order of summation: 4 eps relative."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, r, c, generator=g, dtype=torch.float64) * scale
    got, want = norm1(x), torch.linalg.matrix_norm(x, 1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=4 * torch.finfo(x.dtype).eps, atol=0)


def test_norm1_propagates_nan_and_inf_and_takes_empty_matrices():
    x = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
    x[1, 0, 2], x[2, 1, 1] = math.nan, -math.inf
    got = norm1(x)
    assert float(got[0]) == 1.0 and math.isnan(float(got[1])) and float(got[2]) == math.inf
    for shape in ((2, 0, 0), (2, 3, 0), (2, 0, 3)):
        e = torch.zeros(shape)
        assert torch.equal(norm1(e), torch.linalg.matrix_norm(e, 1))


_SHAPES = st.lists(st.lists(st.integers(0, 3), max_size=3), max_size=5)


@settings(max_examples=examples(120), deadline=None)
@given(shapes=_SHAPES, second=_SHAPES)
def test_shape_helpers_are_the_plain_comparisons(shapes, second):
    """``same_shapes`` is "every shape equals the first" (True for none),
    ``same_shapes_by_position`` that per position of rows, and ``broadcast_shapes`` is
    torch's: the same shape, or the same error."""
    ts = [torch.empty(s) for s in shapes]
    assert same_shapes(ts) == all(t.shape == ts[0].shape for t in ts)
    rows = [(a, torch.empty(b)) for a, b in zip(ts, second)]
    assert same_shapes_by_position(rows) == all(
        all(a.shape == b.shape for a, b in zip(r, rows[0])) for r in rows)
    try:
        want = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        want = None
    if want is None:
        try:
            broadcast_shapes(*shapes)
        except RuntimeError:
            pass
        else:
            raise AssertionError(f"no error for {shapes}")
    else:
        got = broadcast_shapes(*shapes)
        assert got == want and type(got) is torch.Size
