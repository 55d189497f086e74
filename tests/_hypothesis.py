"""Hypothesis profiles: one flag for a longer property run.

    pytest                                   # "default": the example counts as written
    pytest --hypothesis-profile ci           # the same counts, derandomized (CI)
    pytest --hypothesis-profile thorough     # ten times the examples

(or ``HYPOTHESIS_PROFILE=thorough``).  Every ``@settings`` in the suite writes its count
as ``max_examples=examples(n)``, so a profile scales them all.
"""

from __future__ import annotations

import os

from hypothesis import settings

BASE = 100
settings.register_profile("default", max_examples=BASE)
settings.register_profile("ci", max_examples=BASE, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=10 * BASE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def examples(n: int) -> int:
    """``n`` scaled by the active profile (default / ci: n, thorough: 10 n)."""
    return max(1, n * settings().max_examples // BASE)
