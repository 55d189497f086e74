"""nnbridge: torch networks as batched dynamics for trajopt (network training as optimal
control).

* :func:`stages` -- a network decomposed once into stages x_{t+1} = sigma_t(g_t(x_t, u_t));
* :class:`DDPNOpt` -- the DDP Neural Optimizer (torch.optim API), curvatures identity /
  rmsprop / adam / ekfac / exact, feedback policies from trajopt's operator Riccati step;
* :func:`graph_stages`, :class:`GTDDP` -- residual and branching networks on the
  augmented state, the Game-Theoretic DDP optimizer;
* :class:`AlignmentBandit` -- GT-DDP whose placement of the off-chain layers an EXP3++
  bandit (:class:`EXP3PP`) chooses during training (OCNOpt Sec. VI-B);
* :class:`EKFAC` -- the eigenvalue-corrected Kronecker-factored baseline;
* :class:`EMSA` -- the extended method of successive approximations (Li et al. 2018),
  the Pontryagin-based baseline of the DDPNOpt paper;
* :func:`lqr_direction` -- gradient / natural-gradient / Newton directions as an LQR
  (thesis Ch. 3);
* :class:`ODEBlock` -- Neural-ODE blocks (fixed-step Runge-Kutta), trained by
  :class:`GTDDP` as stages sharing one control;
* :class:`DEQ` -- deep equilibrium models with the gradient from the infinite-horizon LQR;
* ``python -m nnbridge.train`` -- the training command (:mod:`nnbridge.train`).
"""

from .alignment import EXP3PP, AlignmentBandit
from .ddpnopt import EKFAC, DDPNOpt
from .decompose import stages
from .deq import DEQ, DEQBlock
from .emsa import EMSA
from .graph import graph_stages
from .gtddp import GTDDP, GTEKFAC
from .ode import ODEBlock
from .recorder import capture
from .stages import Stage, StageLinearization
from .steepest import LQRDescent, lqr_direction

__version__ = "0.1.0"
__all__ = ["stages", "graph_stages", "GTDDP", "GTEKFAC", "Stage", "StageLinearization", "capture",
           "DDPNOpt", "EKFAC", "lqr_direction", "LQRDescent", "DEQ", "DEQBlock", "EMSA",
           "ODEBlock", "AlignmentBandit", "EXP3PP"]
