"""What the nnbridge optimizers share beyond torch.optim.Optimizer: they hold hooks on
their model (no copies: :func:`not_copyable`) and take the model's stages as their one
parameter group (:func:`refuse_second_group`)."""

from __future__ import annotations

from trajopt.errors import InvalidArgumentError

__all__ = ["not_copyable", "refuse_second_group"]


def not_copyable(optimizer) -> None:
    """``__getstate__`` of the optimizers that hold hooks on their model (and the
    model itself): ``copy.deepcopy`` and ``pickle`` would give an object without its
    hooks (torch.optim's state is only the parameter groups and the state), which fails
    at its next step; refuse, pointing to ``state_dict``."""
    name = type(optimizer).__name__
    raise TypeError(f"a {name} cannot be copied or pickled (it holds hooks on its model): "
                    f"save {name}.state_dict() and load it into a new {name}(model, ...) "
                    "with load_state_dict")


def refuse_second_group(optimizer) -> None:
    """Called by ``add_param_group`` before torch.optim's: the one parameter group is the
    model's stages, which the step reads; a second one would be ignored silently."""
    if getattr(optimizer, "param_groups", None):
        raise InvalidArgumentError(
            f"{type(optimizer).__name__} has one parameter group (the model's stages); "
            "add_param_group is not supported")
