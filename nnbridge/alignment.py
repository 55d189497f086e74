r"""Adaptive layer alignment (OCNOpt Sec. VI-B): an EXP3++ bandit chooses, step by step,
where GT-DDP places the layers off the main chain.

GT-DDP's policy depends on the stage at which a shortcut's (or a parallel branch's) layer
acts as a player (the "not unique" remark under Eq. 15): at the merge, where its output
is used (:func:`nnbridge.graph.graph_stages`' default), or at the split, where its input
is the state (its output is then carried as a residual).  :class:`AlignmentBandit` keeps
one :class:`nnbridge.GTDDP` per candidate alignment (an *arm*), all sharing one
parameter-group list and one curvature state, and at every step

1. draws an arm from :class:`EXP3PP`'s distribution,
2. takes that arm's GT-DDP step on the closure's batch,
3. evaluates the closure again and feeds the bandit the loss
   :math:`\ell = \min(1, \tfrac12 L_{\text{after}} / L_{\text{before}})` (0.5: no change;
   our choice, ``docs/alignment.md``); the module buffers this pass updates (BatchNorm's
   running statistics) are restored, so it measures without training.

:class:`EXP3PP` is EXP3++ (Seldin & Slivkins, ICML 2014) with the parametrization of
Seldin & Lugosi (COLT 2017): learning rate :math:`\eta_t = \tfrac12\sqrt{\ln K / (tK)}`,
exploration :math:`\varepsilon_t(a) = \min\{\tfrac1{2K}, \eta_t, \xi_t(a)\}` with
:math:`\xi_t(a) = \beta \ln t / (t \hat\Delta_t(a)^2)` and the gap estimate
:math:`\hat\Delta_t(a) = \max(0, \mathrm{LCB}_t(a) - \min_b \mathrm{UCB}_t(b))` from the
empirical mean losses :math:`\pm\sqrt{\alpha \ln(t K^{1/\alpha}) / (2 N_t(a))}`;
:math:`p_t(a) = (1 - \sum_b \varepsilon_t(b))\,\rho_t(a) + \varepsilon_t(a)`,
:math:`\rho_t \propto \exp(-\eta_t \tilde L_{t-1})` with the importance-weighted
cumulative losses :math:`\tilde L`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from trajopt.errors import InvalidArgumentError

from .graph import Alignment
from .gtddp import GTDDP
from .optimizer_base import not_copyable

__all__ = ["EXP3PP", "AlignmentBandit"]


class EXP3PP:
    """EXP3++ over ``arms`` arms with losses in [0, 1] (module docstring).

    Parameters
    ----------
    arms : int
        K >= 2.
    alpha, beta : float
        The gap estimate's confidence parameter and the exploration constant (Seldin &
        Lugosi's defaults 3 and 256).
    seed : int
        Seed of the bandit's own generator (the global random stream is not used).

    Examples
    --------
    >>> b = EXP3PP(2, seed=0)
    >>> a = b.draw()
    >>> b.update(a, 0.3)
    >>> b.probabilities().sum().item()
    1.0
    """

    def __init__(self, arms: int, *, alpha: float = 3.0, beta: float = 256.0, seed: int = 0):
        if isinstance(arms, bool) or not isinstance(arms, int) or arms < 2:
            raise InvalidArgumentError(f"arms must be an integer >= 2; got {arms!r}")
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise InvalidArgumentError(f"{name} must be a positive number; got {v!r}")
        self.K, self.alpha, self.beta = arms, float(alpha), float(beta)
        self.t = 0                                            # rounds played
        self.weighted = torch.zeros(arms, dtype=torch.float64)  # L~: importance-weighted
        self.total = torch.zeros(arms, dtype=torch.float64)     # sum of observed losses
        self.pulls = torch.zeros(arms, dtype=torch.float64)
        self._gen = torch.Generator().manual_seed(seed)
        self._last: torch.Tensor | None = None   # the distribution of the pending draw

    def probabilities(self) -> torch.Tensor:
        """:math:`p_{t+1}`, the distribution of the next draw (K,)."""
        t, K = self.t + 1, self.K
        eta = 0.5 * math.sqrt(math.log(K) / (t * K))
        eps = torch.full((K,), min(0.5 / K, eta), dtype=torch.float64)
        if self.t > 0:
            gap = self._gap(t)
            xi = self.beta * math.log(t) / (t * gap.clamp_min(1e-150) ** 2)
            eps = torch.minimum(eps, torch.where(gap > 0, xi, math.inf))
        rho = torch.softmax(-eta * self.weighted, 0)
        return (1 - eps.sum()) * rho + eps

    def _gap(self, t: int) -> torch.Tensor:
        n = self.pulls
        mean = torch.where(n > 0, self.total / n.clamp_min(1), torch.zeros_like(n))
        width = torch.where(n > 0, torch.sqrt(self.alpha * math.log(t * self.K ** (
            1 / self.alpha)) / (2 * n.clamp_min(1))), torch.full_like(n, math.inf))
        ucb = (mean + width).clamp(max=1.0)
        lcb = (mean - width).clamp(min=0.0)
        return (lcb - ucb.min()).clamp(min=0.0)

    def draw(self) -> int:
        """An arm drawn from :meth:`probabilities` with the bandit's generator."""
        self._last = self.probabilities()
        return int(torch.multinomial(self._last, 1, generator=self._gen))

    def update(self, arm: int, loss: float) -> None:
        """Feed the loss in [0, 1] of ``arm``, drawn by the last :meth:`draw`."""
        if not (isinstance(arm, int) and 0 <= arm < self.K):
            raise InvalidArgumentError(f"arm must be an integer in [0, {self.K}); got {arm!r}")
        if not (0.0 <= loss <= 1.0):
            raise InvalidArgumentError(f"loss must be in [0, 1]; got {loss!r}")
        p = self._last
        if p is None:
            raise RuntimeError("EXP3PP.update without a draw: call draw() first")
        self.weighted[arm] += loss / float(p[arm])
        self.total[arm] += loss
        self.pulls[arm] += 1
        self.t += 1
        self._last = None

    def state_dict(self) -> dict:
        return {"t": self.t, "weighted": self.weighted.clone(), "total": self.total.clone(),
                "pulls": self.pulls.clone(), "generator": self._gen.get_state(),
                "alpha": self.alpha, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        if state["weighted"].shape != (self.K,):
            raise InvalidArgumentError(f"state: saved for {state['weighted'].numel()} arms, "
                                       f"this bandit has {self.K}")
        self.t = int(state["t"])
        self.weighted, self.total = state["weighted"].clone(), state["total"].clone()
        self.pulls = state["pulls"].clone()
        self._gen.set_state(state["generator"])
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])


def _value(loss) -> float:
    if loss is None:
        raise TypeError("AlignmentBandit: the closure must return the loss (the bandit "
                        "measures each step by it)")
    return float(loss.detach()) if torch.is_tensor(loss) else float(loss)


class AlignmentBandit(torch.optim.Optimizer):
    """GT-DDP whose alignment an EXP3++ bandit chooses at every step (module docstring).

    Parameters
    ----------
    model : nn.Module
        A network :func:`nnbridge.graph.graph_stages` decomposes.
    lr : float, optional
    arms : sequence of alignments
        Candidate alignments (``"merge"``, ``"split"`` or dicts by layer name), at least
        two; default ``("merge", "split")``.
    seed : int
        The bandit's seed.
    **kwargs
        :class:`nnbridge.GTDDP`'s arguments; the curvature must keep one state per layer
        (``"identity"``, ``"rmsprop"``, ``"adam"``; ``"exact"`` keeps none): EKFAC's
        cooperative factors are laid out by stage, which the arms change.

    Notes
    -----
    ``step`` needs a closure (it evaluates the loss after the step); the parameter
    groups are shared by the arms, so LR schedulers and ``zero_grad`` act on all of them.
    """

    __getstate__ = not_copyable  # copy.deepcopy / pickle: a clear error

    def __init__(self, model: nn.Module, lr: float | None = None, *,
                 arms: Sequence[Alignment] = ("merge", "split"), seed: int = 0,
                 **kwargs: Any):
        if kwargs.get("curvature", "adam") == "ekfac":
            raise InvalidArgumentError(
                "curvature='ekfac': the cooperative Kronecker factors are kept per stage, "
                "and the arms change the stages; use 'identity', 'rmsprop', 'adam' or "
                "'exact'")
        if isinstance(arms, str):  # list("merge") would be five one-letter arms
            raise InvalidArgumentError(f"arms: a sequence of at least two alignments, e.g. "
                                       f"('merge', 'split'); got the string {arms!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidArgumentError(f"seed must be an integer; got {seed!r}")
        arms = list(arms)
        if len(arms) < 2:
            raise InvalidArgumentError(f"arms: at least two alignments; got {arms!r}")
        self.arms = arms
        self.model = model
        self.optimizers = [GTDDP(model, lr, alignment=a, **kwargs) for a in arms]
        first = self.optimizers[0]
        for o in self.optimizers[1:]:
            o.param_groups = first.param_groups
            o.state = first.state
        self.bandit = EXP3PP(len(arms), seed=seed)
        #: the last 1000 steps: (arm, loss before, loss after)
        self.history: deque[tuple[int, float, float]] = deque(maxlen=1000)
        super().__init__(first.param_groups, first.defaults)
        self.param_groups = first.param_groups
        self.state = first.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the arm the bandit draws; returns the closure's loss before it."""
        if closure is None or not callable(closure):
            raise TypeError("AlignmentBandit.step needs a closure (zero_grad, forward, "
                            "loss.backward(), return the loss): it measures the step's effect")
        arm = self.bandit.draw()
        before = self.optimizers[arm].step(closure)
        # the measuring pass must leave no trace: BatchNorm's running statistics (and any
        # other buffer a training-mode forward updates) are put back as they were
        saved = [b.detach().clone() for b in self.model.buffers()]
        with torch.enable_grad():
            after = closure()
        with torch.no_grad():
            for b, v in zip(self.model.buffers(), saved):
                b.copy_(v)
        b, a = _value(before), _value(after)
        if math.isfinite(b) and math.isfinite(a) and b > 0:
            self.bandit.update(arm, min(1.0, 0.5 * a / b))
        else:
            self.bandit.update(arm, 1.0)
        self.history.append((arm, b, a))
        return before

    def state_dict(self) -> dict:
        """The arms' shared state, the bandit's, and every arm's own generator of the
        sampled Fisher (``terminal_hessian="fisher"``; only the first arm's was kept, so
        a resumed run drew other samples on the other arms)."""
        out = self.optimizers[0].state_dict()
        out["bandit"] = self.bandit.state_dict()
        rngs = [o.state_dict().get("fisher_rng") for o in self.optimizers[1:]]
        if any(r is not None for r in rngs):
            out["arm_fisher_rngs"] = rngs
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        bandit = state_dict.pop("bandit", None)
        rngs = state_dict.pop("arm_fisher_rngs", [None] * (len(self.optimizers) - 1))
        first = self.optimizers[0]
        first.load_state_dict(state_dict)       # replaces its groups and state: share again
        for o, rng in zip(self.optimizers[1:], rngs):
            core = {k: v for k, v in state_dict.items() if k != "fisher_rng"}
            o.load_state_dict(core if rng is None else {**core, "fisher_rng": rng})
        for o in self.optimizers[1:] + [self]:
            o.param_groups, o.state = first.param_groups, first.state
        if bandit is not None:
            self.bandit.load_state_dict(bandit)
