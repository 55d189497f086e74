"""The damped Euler pendulum the DDP-loop tests share (states (theta, omega), one torque)."""

import torch

DT = 0.1


def pendulum(x, u, t):
    """One step of ``dt = 0.1`` from (B, 2) states and (B, 1) torques."""
    th, w = x[..., 0], x[..., 1]
    return torch.stack([th + DT * w, w + DT * (u[..., 0] - 0.3 * w - 9.81 * torch.sin(th))],
                       -1)
