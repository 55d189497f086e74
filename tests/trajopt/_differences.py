"""Central finite differences of a re-solved problem, for the gradient tests."""

from __future__ import annotations

import torch


def central_differences(leaves, value, eps: float = 1e-4) -> torch.Tensor:
    """``d value() / d leaf`` for every entry of every leaf (float64 tensors changed in
    place and restored), by central differences with step ``eps``; ``value()`` re-solves
    and returns a number."""
    fd = []
    for leaf in leaves:
        flat = leaf.data.view(-1)
        for i in range(flat.numel()):
            vals = []
            for sgn in (1, -1):
                flat[i] += sgn * eps
                with torch.no_grad():
                    vals.append(float(value()))
                flat[i] -= sgn * eps
            fd.append((vals[0] - vals[1]) / (2 * eps))
    return torch.tensor(fd, dtype=torch.float64)
