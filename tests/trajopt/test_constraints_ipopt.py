"""Constrained DDP against casadi + IPOPT on the same discretized problems
(tests/reference/casadi_ocp.py, typed independently of trajopt):

* the pendulum swing-up with the terminal equality x_T = (pi, 0);
* the cart-pole swing-up on a track |x| <= 0.4 (the unconstrained one travels 0.69 m);
* the unicycle to its goal around two round obstacles on its unconstrained path.

Two checks per problem, in float64 with the solver's tol = 1e-12:

1. IPOPT started at our solution, told it is near one (small barrier parameter), stops
   within a few iterations at the same point: our solution is a KKT point of IPOPT's
   problem, feasible to 1e-6, and a local optimum (IPOPT's iterates do not leave it);
2. started from the same guess as ours (the rollout of zero controls), IPOPT reaches the
   same optimum on the pendulum and the unicycle; on the cart-pole it reaches another
   local optimum whose cost is higher than ours (22.820 against 22.786).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trajopt
from trajopt import problems

casadi_ocp = pytest.importorskip("tests.reference.casadi_ocp")
pytest.importorskip("casadi")

OBSTACLES = ((1.0, 0.1, 0.25), (1.7, 0.6, 0.2))
CASES = {
    "pendulum": (lambda: problems.pendulum(reach_goal=True), casadi_ocp.pendulum_goal),
    "cartpole": (lambda: problems.cartpole(track=0.4),
                 lambda: casadi_ocp.cartpole_track(track=0.4)),
    "unicycle": (lambda: problems.unicycle(obstacles=OBSTACLES),
                 lambda: casadi_ocp.unicycle_obstacles(obstacles=OBSTACLES)),
}


def _rollout(p):
    xs = [p.x0]
    for t in range(p.T):
        xs.append(p.dynamics(xs[-1], p.us0[t], t))
    return torch.stack(xs).numpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_constrained_optimum_matches_ipopt(name):
    make, make_ocp = CASES[name]
    p, ocp = make(), make_ocp()
    res = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, control_limits=p.control_limits,
                            constraints=p.constraints, max_iter=1000, tol=1e-12)
    assert res.reason == "converged"
    assert float(res.max_violation) <= 1e-6
    J = float(res.cost)
    # 1. IPOPT polishes our solution and stays
    near = casadi_ocp.solve(ocp, p.x0.numpy(), res.xs.numpy(), res.us.numpy(), near=True)
    assert near["status"] == "Solve_Succeeded" and near["iterations"] <= 10
    assert abs(J - near["cost"]) <= 1e-6 * abs(near["cost"])
    np.testing.assert_allclose(res.us.numpy(), near["us"], atol=1e-3)
    np.testing.assert_allclose(res.xs.numpy(), near["xs"], atol=1e-4)
    # 2. IPOPT from the same initial guess
    cold = casadi_ocp.solve(ocp, p.x0.numpy(), _rollout(p), p.us0.numpy())
    assert cold["status"] == "Solve_Succeeded"
    if name == "cartpole":  # another local optimum, worse than ours
        assert J < cold["cost"] - 1e-3
    else:
        assert abs(J - cold["cost"]) <= 1e-6 * abs(cold["cost"])
        np.testing.assert_allclose(res.us.numpy(), cold["us"], atol=1e-3)
