"""Classical trajectory-optimization problems, each a Dynamics + Cost + default x0 and
horizon (``trajopt.problems.get(name)``)."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import InvalidArgumentError
from ._problem import Problem
from .acrobot import acrobot
from .cartpole import cartpole
from .double_integrator import double_integrator
from .pendulum import mpc_pendulum, pendulum
from .unicycle import unicycle

__all__ = ["Problem", "get", "names", "pendulum", "mpc_pendulum", "cartpole", "acrobot",
           "unicycle", "double_integrator"]

_REGISTRY: dict[str, Callable[..., Problem]] = {
    "pendulum": pendulum,
    "mpc_pendulum": mpc_pendulum,
    "cartpole": cartpole,
    "acrobot": acrobot,
    "unicycle": unicycle,
    "double_integrator": double_integrator,
}


def names() -> list[str]:
    """The registered problem names."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs) -> Problem:
    """Build a named problem; keyword arguments go to its constructor."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown problem {name!r}; choose from {names()}") \
            from None
    return factory(**kwargs)
