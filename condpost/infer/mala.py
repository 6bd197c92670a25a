"""MALA: the Metropolis-adjusted Langevin algorithm, all chains in one batched step.

Proposal ``w' = w − ε∇U(w) + √(2ε)·ξ``, ``ξ ~ N(0, I)``, accepted with probability
``min(1, exp(U(w) − U(w') + log q(w|w') − log q(w'|w)))`` where ``log q(b|a) =
−‖b − a + ε∇U(a)‖²/(4ε)`` (Roberts & Tweedie 1996). The accept step makes the chain
exact for ``exp(−U)``, unlike unadjusted Langevin (SGLD). During warmup each chain's
``log ε`` follows Nesterov dual averaging towards the acceptance rate 0.574, optimal
for MALA in high dimension (Roberts & Rosenthal 1998; the dual-averaging constants are
Hoffman & Gelman 2014's); ``freeze`` fixes ε at its averaged value.

Preconditioning (``metric="diagonal"``, the default). With a diagonal inverse metric
``m`` the proposal is ``w' = w − ε m⊙∇U(w) + √(2ε) √m⊙ξ`` and ``log q(b|a) =
−Σ_j (b − a + ε m⊙∇U(a))_j² / (4ε m_j)``, still exact for any fixed ``m``. During warmup
``m`` is re-estimated at the ends of doubling windows (steps 75, 150, 300, …, as in
Stan's windowed adaptation): the chains' mean within-chain variance over the window,
shrunk towards 10⁻³ by ``5/(k+5)`` for ``k`` steps, after which dual averaging restarts
from the current ε. A local posterior whose directions have very different scales
(stiff constraint directions next to loose ones, the usual case at finite γ) then mixes
at the rate of its *relative* spread, not of its smallest scale.

This module is the whole sampler: the kernel below and one registry line
(``condpost.infer.registry``). The generic driver (``condpost.infer.driver``) runs it.
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
    t: int  # steps taken
    adapting: bool
    inv_metric: torch.Tensor  # [d] diagonal inverse metric m (ones: identity)
    da_t: int = 0  # steps since dual averaging (re)started
    mu: float = 0.0  # dual averaging's shrinkage point log(10 ε) at its (re)start
    wf_n: int = 0  # steps in the current metric window
    wf_mean: torch.Tensor | None = None  # [C, d] within-window running mean
    wf_m2: torch.Tensor | None = None  # [C, d] within-window sum of squared deviations
    window_end: int = 75  # step at which the metric is next re-estimated


class MALAInfo(NamedTuple):
    accept_prob: torch.Tensor  # [C]
    diverging: torch.Tensor  # [C]
    potential: torch.Tensor  # [C]
    step_size: torch.Tensor  # [C]


class MALA:
    """MALA kernel on a declaration's ``Potential``.

    Options: ``step_size`` (initial ε; default ``0.1/√d`` times the prior scale
    ``γ^{-1/2}``, capped at 1), ``target_accept`` (0.574), ``adapt_step_size`` (True),
    ``metric`` (``"diagonal"``, adapted in warmup, or ``"identity"``).
    """

    def __init__(
        self,
        post,
        *,
        step_size=None,
        target_accept=0.574,
        adapt_step_size=True,
        metric="diagonal",
    ):
        if not 0 < target_accept < 1:
            raise ValueError(f"target_accept must lie in (0, 1); got {target_accept!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be positive; got {step_size!r}")
        if metric not in ("diagonal", "identity"):
            raise ValueError(f"metric must be 'diagonal' or 'identity'; got {metric!r}")
        self.metric = metric
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
            "metric": metric,
        }

    def init(self, position: torch.Tensor, key: int) -> MALAState:
        w = position.detach()
        u, g = self.potential.value_and_grad(w)
        C = w.shape[0]
        le = torch.full((C,), math.log(self.eps0), dtype=w.dtype, device=w.device)
        ones = torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
        z = torch.zeros_like(w)
        return MALAState(
            w,
            u.detach(),
            g.detach(),
            le,
            le.clone(),
            torch.zeros_like(le),
            0,
            self.adapt,
            ones,
            0,
            math.log(10 * self.eps0),
            0,
            z,
            z.clone(),
            75,
        )

    def step(self, key: int, state: MALAState, batch=None) -> tuple[MALAState, MALAInfo]:
        w, u, g, m = state.w, state.u, state.g, state.inv_metric
        eps = state.log_eps.exp()[:, None]
        gen = torch.Generator(device=w.device).manual_seed(int(key))
        xi = torch.randn(w.shape, generator=gen, dtype=w.dtype, device=w.device)
        prop = w - eps * m * g + (2 * eps * m).sqrt() * xi
        u_p, g_p = self.potential.value_and_grad(prop)
        u_p, g_p = u_p.detach(), g_p.detach()
        fwd = -((prop - w + eps * m * g) ** 2 / m).sum(-1) / (4 * eps[:, 0])
        bwd = -((w - prop + eps * m * g_p) ** 2 / m).sum(-1) / (4 * eps[:, 0])
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
        new = state._replace(w=w, u=u, g=g, t=t)
        if state.adapting:  # dual averaging (Hoffman & Gelman 2014, Alg. 5), per chain
            if self.adapt:
                mu, td = state.mu, state.da_t + 1
                eta = 1.0 / (td + 10)
                hb = (1 - eta) * hb + eta * (self.target - acc_p)
                le = mu - math.sqrt(td) / 0.05 * hb
                k = td**-0.75
                leb = k * le + (1 - k) * leb
                new = new._replace(log_eps=le, log_eps_bar=leb, h_bar=hb, da_t=td)
            if self.metric == "diagonal":
                new = self._adapt_metric(new)
        return new, MALAInfo(acc_p, diverging, u, new.log_eps.exp())

    def _adapt_metric(self, s: MALAState) -> MALAState:
        """Welford update of the window's moments; at the window's end, the new metric."""
        n = s.wf_n + 1
        delta = s.w - s.wf_mean
        mean = s.wf_mean + delta / n
        m2 = s.wf_m2 + delta * (s.w - mean)
        s = s._replace(wf_n=n, wf_mean=mean, wf_m2=m2)
        if s.t < s.window_end or n < 10:
            return s
        var = (m2 / (n - 1)).mean(0)  # the chains' mean within-window variance
        var = (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))
        # keep the proposal's typical variance ε·m: ε scales by the geometric mean of
        # m_old/m_new
        shift = float((s.inv_metric.log() - var.log()).mean().clamp(-7.0, 7.0))
        le = s.log_eps_bar + shift
        le = le if self.adapt else s.log_eps
        z = torch.zeros_like(s.w)
        return s._replace(
            inv_metric=var,
            wf_n=0,
            wf_mean=z,
            wf_m2=z.clone(),
            window_end=2 * s.window_end,
            log_eps=le,
            log_eps_bar=le.clone(),
            h_bar=torch.zeros_like(s.h_bar),
            da_t=0,
            mu=float(le.mean()) + math.log(10),
        )

    def freeze(self, state: MALAState) -> MALAState:
        """End of warmup: fix each chain's ε at its dual-averaged value."""
        if not state.adapting:
            return state
        return state._replace(
            log_eps=state.log_eps_bar.clone(), adapting=False, wf_mean=None, wf_m2=None
        )
