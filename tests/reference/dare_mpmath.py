"""A descriptor DARE in many digits: the slow, plainly written reference for the tests of
a nearly singular E (``tests/trajopt/test_dare_descriptor.py``).

``E x+ = A x + B u`` is ``x+ = E^{-1}(A x + B u)``; the value ``x' Y x`` of that standard
problem is the limit of the Riccati value iteration from ``Y = 0``, and the descriptor
DARE's solution is ``X = E^{-T} Y E^{-1}`` (its terms ``A'XA``, ``E'XE``, ``B'XA`` are
those of the standard DARE in ``Y``).  Everything is done in mpmath with ``digits``
decimal digits, so the float64 data are taken exactly and the only rounding is at the
end.
"""

from __future__ import annotations

import mpmath
import numpy as np


def descriptor_dare(A, B, Q, R, E, digits: int = 1200, max_iter: int = 400) -> np.ndarray:
    """The stabilizing solution X of ``A'XA - E'XE - A'XB (R + B'XB)^{-1} B'XA + Q = 0``
    (float64 numpy in and out); raises when the iteration has not settled to 1e-40."""
    with mpmath.workdps(digits):
        Ei = mpmath.inverse(mpmath.matrix(E))
        At, Bt = Ei * mpmath.matrix(A), Ei * mpmath.matrix(B)
        Qm, Rm = mpmath.matrix(Q), mpmath.matrix(R)
        Y = mpmath.zeros(*np.shape(A))
        for _ in range(max_iter):
            G = Bt.T * Y * At
            Y_next = At.T * Y * At - G.T * mpmath.inverse(Rm + Bt.T * Y * Bt) * G + Qm
            change = mpmath.mnorm(Y_next - Y, 1) / mpmath.mnorm(Y_next, 1)
            Y = Y_next
            if change < mpmath.mpf(10) ** -40:
                X = Ei.T * Y * Ei
                return np.array(X.tolist(), dtype=float)
    raise RuntimeError(f"value iteration not settled after {max_iter} steps "
                       f"(change {float(change):.1e}): raise digits")
