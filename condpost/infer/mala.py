"""MALA: the Metropolis-adjusted Langevin algorithm, all chains in one batched step.

Proposal ``w' = w − ε∇U(w) + √(2ε)·ξ``, ``ξ ~ N(0, I)``, accepted with probability
``min(1, exp(U(w) − U(w') + log q(w|w') − log q(w'|w)))`` where ``log q(b|a) =
−‖b − a + ε∇U(a)‖²/(4ε)`` (Roberts & Tweedie 1996). The accept step makes the chain
exact for ``exp(−U)``, unlike unadjusted Langevin (SGLD). During warmup each chain's
``log ε`` follows Nesterov dual averaging towards the acceptance rate 0.574, optimal
for MALA in high dimension (Roberts & Rosenthal 1998; the dual-averaging constants are
Hoffman & Gelman 2014's); ``freeze`` fixes ε at its averaged value.

This module is the whole sampler: the kernel below and one registry line
(``condpost.infer.registry``). The generic driver (``condpost.infer.kernel``) runs it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..potential import Potential

__all__ = ["MALA", "MALAState", "MALAInfo"]


class MALAState(NamedTuple):
    w: torch.Tensor  # [C, d]
    u: torch.Tensor  # [C] potential at w
    g: torch.Tensor  # [C, d] gradient at w
    log_eps: torch.Tensor  # [C]
    log_eps_bar: torch.Tensor  # [C]
    h_bar: torch.Tensor  # [C]
    t: int
    adapting: bool


class MALAInfo(NamedTuple):
    accept_prob: torch.Tensor  # [C]
    diverging: torch.Tensor  # [C]
    potential: torch.Tensor  # [C]
    step_size: torch.Tensor  # [C]


class MALA:
    """MALA kernel on a declaration's ``Potential``.

    Options: ``step_size`` (initial ε; default ``0.1/√d`` times the prior scale
    ``γ^{-1/2}``, capped at 1), ``target_accept`` (0.574), ``adapt_step_size`` (True).
    """

    def __init__(self, post, *, step_size=None, target_accept=0.574, adapt_step_size=True):
        if not 0 < target_accept < 1:
            raise ValueError(f"target_accept must lie in (0, 1); got {target_accept!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be positive; got {step_size!r}")
        self.potential = Potential(post)
        d = post.d
        if step_size is None:
            step_size = min(1.0, post.localization**-0.5) ** 2 * 0.1 / math.sqrt(d)
        self.eps0 = float(step_size)
        self.target = float(target_accept)
        self.adapt = bool(adapt_step_size)
        self.settings = {
            "initial_step_size": self.eps0,
            "target_accept": self.target,
            "adapt_step_size": self.adapt,
        }

    def init(self, position: torch.Tensor, key: int) -> MALAState:
        w = position.detach()
        u, g = self.potential.value_and_grad(w)
        C = w.shape[0]
        le = torch.full((C,), math.log(self.eps0), dtype=w.dtype, device=w.device)
        return MALAState(
            w, u.detach(), g.detach(), le, le.clone(), torch.zeros_like(le), 0, self.adapt
        )

    def step(self, key: int, state: MALAState, batch=None) -> tuple[MALAState, MALAInfo]:
        w, u, g = state.w, state.u, state.g
        eps = state.log_eps.exp()[:, None]
        gen = torch.Generator(device=w.device).manual_seed(int(key))
        xi = torch.randn(w.shape, generator=gen, dtype=w.dtype, device=w.device)
        prop = w - eps * g + (2 * eps).sqrt() * xi
        u_p, g_p = self.potential.value_and_grad(prop)
        u_p, g_p = u_p.detach(), g_p.detach()
        fwd = -((prop - w + eps * g) ** 2).sum(-1) / (4 * eps[:, 0])
        bwd = -((w - prop + eps * g_p) ** 2).sum(-1) / (4 * eps[:, 0])
        log_a = (u - u_p) + bwd - fwd
        log_a = torch.where(torch.isfinite(log_a), log_a, torch.full_like(log_a, -math.inf))
        acc_p = log_a.clamp(max=0).exp()
        unif = torch.rand(w.shape[0], generator=gen, dtype=w.dtype, device=w.device)
        take = unif < acc_p
        diverging = ~torch.isfinite(u_p) | (u_p - u > 1000)
        w = torch.where(take[:, None], prop, w)
        u = torch.where(take, u_p, u)
        g = torch.where(take[:, None], g_p, g)
        le, leb, hb, t = state.log_eps, state.log_eps_bar, state.h_bar, state.t + 1
        if state.adapting:  # dual averaging (Hoffman & Gelman 2014, Alg. 5), per chain
            mu = math.log(10 * self.eps0)
            eta = 1.0 / (t + 10)
            hb = (1 - eta) * hb + eta * (self.target - acc_p)
            le = mu - math.sqrt(t) / 0.05 * hb
            k = t**-0.75
            leb = k * le + (1 - k) * leb
        new = MALAState(w, u, g, le, leb, hb, t, state.adapting)
        return new, MALAInfo(acc_p, diverging, u, le.exp())

    def freeze(self, state: MALAState) -> MALAState:
        """End of warmup: fix each chain's ε at its dual-averaged value."""
        if not state.adapting:
            return state
        return state._replace(log_eps=state.log_eps_bar.clone(), adapting=False)
