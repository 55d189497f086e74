"""Kept import path: the cooperative policy lives in :mod:`trajopt.riccati.players`."""

from ..riccati.players import CooperativePolicy, cooperative_policy  # noqa: F401
