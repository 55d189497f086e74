"""Suite-wide set-up: the hypothesis profiles (tests/_hypothesis.py)."""

from tests import _hypothesis  # noqa: F401  (registers and loads the profiles)
