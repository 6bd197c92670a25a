"""Stochastic variational inference (Pyro) on the conditioned local posterior.

The model has one flat latent site ``"w"`` with the local prior ``N(w*, γ⁻¹I)`` and
a factor ``−(nβ L_n(w) + Σ ρ_c D_c(w))``, so the guide targets exactly the same
density as NUTS. The guides are Pyro's autoguides (``AutoDiagonalNormal``,
``AutoLowRankMultivariateNormal``, ``AutoMultivariateNormal``); the ELBO gradient uses
the sticking-the-landing estimator, whose noise vanishes at the optimum, and the
reported moments are Polyak-averaged over the final iterates. The guide is started at a *clone* of ``w*`` (Pyro's
``init_to_value`` would share the tensor, and Adam would then move ``w*`` in place).

Gaussian variational families under-disperse on singular, ridge-shaped posteriors:
use SVI for exploration and initialisation, not for LLC or MI (docs/theory.md §1.5).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
)
from tqdm.auto import tqdm

from .._errors import SamplerWarning, warn
from .base import FitResult, check_svi_args, default_rank

if TYPE_CHECKING:  # pragma: no cover
    from ..posterior import LocalPosterior

__all__ = ["run_svi"]

_GUIDES = {
    "normal": AutoDiagonalNormal,
    "lowrank": AutoLowRankMultivariateNormal,
    "mvn": AutoMultivariateNormal,
}


def _moments(g, guide: str) -> dict[str, torch.Tensor]:
    q = g.get_posterior()
    if guide == "normal":
        return {"loc": q.base_dist.loc.detach().clone(), "var": q.base_dist.scale.detach() ** 2}
    if guide == "lowrank":
        return {
            "loc": q.loc.detach().clone(),
            "cov_factor": q.cov_factor.detach().clone(),
            "cov_diag": q.cov_diag.detach().clone(),
        }
    L = q.scale_tril.detach()
    return {"loc": q.loc.detach().clone(), "cov": L @ L.T}


def _detached(q, guide: str):
    if guide == "normal":
        b = q.base_dist
        return dist.Normal(b.loc.detach(), b.scale.detach()).to_event(1)
    if guide == "lowrank":
        return dist.LowRankMultivariateNormal(
            q.loc.detach(), q.cov_factor.detach(), q.cov_diag.detach()
        )
    return dist.MultivariateNormal(q.loc.detach(), scale_tril=q.scale_tril.detach())


def _batched_potential(post):
    """U over a batch of weight vectors ``[P, d]`` (vmap, or a loop where vmap fails)."""
    from ..potential import Potential

    return Potential(post).value


def run_svi(
    post: LocalPosterior,
    *,
    guide: str = "normal",
    steps: int = 2000,
    seed: int = 0,
    lr: float = 0.01,
    lr_decay: float = 0.01,
    num_particles: int = 1,
    rank: int | None = None,
    init_scale: float | None = None,
    average: float = 0.25,
    progress: bool = True,
) -> FitResult:
    check_svi_args(guide, steps, lr, lr_decay, num_particles, average)
    center = post.center
    sd = post.localization**-0.5

    def model():
        w = pyro.sample("w", dist.Normal(center, torch.full_like(center, sd)).to_event(1))
        u = post.potential(w) - 0.5 * post.localization * ((w - center) ** 2).sum()
        pyro.factor("condpost/loss_and_constraints", -u)

    def init_loc(site):
        # a fresh copy: the optimiser must never write into w*
        return center.detach().clone()

    if init_scale is None:
        init_scale = 0.1 * min(sd, 1.0)
    kw = {"init_loc_fn": init_loc, "init_scale": float(init_scale)}
    if guide == "lowrank":
        kw["rank"] = default_rank(post.d) if rank is None else int(rank)
    losses = np.empty(int(steps))
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), pyro.settings.context(module_local_params=True):
        torch.manual_seed(int(seed))
        g = _GUIDES[guide](model, **kw)
        g()  # initialise parameters
        potential = _batched_potential(post)
        log_norm = 0.5 * post.d * math.log(post.localization / (2 * math.pi))

        def elbo():
            # "sticking the landing" estimator (Roeder, Wu & Duvenaud 2017): the score term
            # of log q is dropped by detaching q's parameters, so the gradient noise vanishes
            # when q matches the target. Value: −ELBO up to nothing (normaliser included).
            q = g.get_posterior()
            w = q.rsample((int(num_particles),))
            logq = _detached(q, guide).log_prob(w)
            return (potential(w) + logq).mean() - log_norm

        opt = torch.optim.Adam(g.parameters(), lr=float(lr))
        sched = torch.optim.lr_scheduler.ExponentialLR(
            opt, gamma=float(lr_decay) ** (1.0 / max(int(steps), 1))
        )
        bar = tqdm(range(int(steps)), desc=f"SVI ({guide})", disable=not progress, leave=False)
        avg_from = int(steps) - int(average * int(steps))
        acc: dict[str, torch.Tensor] = {}
        n_avg = 0
        for i in bar:
            opt.zero_grad()
            loss = elbo()
            loss.backward()
            opt.step()
            sched.step()
            losses[i] = float(loss.detach())
            if not math.isfinite(losses[i]):
                raise FloatingPointError(
                    f"SVI loss became non-finite at step {i}; lower lr (now {lr}) or init_scale"
                )
            if progress and i % 50 == 0:
                bar.set_postfix(loss=f"{losses[i]:.4g}", refresh=False)
            if i >= avg_from:
                # Polyak–Ruppert averaging of the fitted moments over the last iterates
                with torch.no_grad():
                    cur = _moments(g, guide)
                n_avg += 1
                for key, val in cur.items():
                    acc[key] = val if key not in acc else acc[key] + (val - acc[key]) / n_avg
        if not acc:
            with torch.no_grad():
                acc = _moments(g, guide)
        if guide == "normal":
            fitted = torch.distributions.Independent(
                torch.distributions.Normal(acc["loc"], acc["var"].sqrt()), 1
            )
        elif guide == "lowrank":
            fitted = torch.distributions.LowRankMultivariateNormal(
                acc["loc"], acc["cov_factor"], acc["cov_diag"]
            )
        else:
            fitted = torch.distributions.MultivariateNormal(
                acc["loc"], covariance_matrix=acc["cov"]
            )
    if len(losses) >= 200:
        k = len(losses) // 10
        tail, before = losses[-k:], losses[-3 * k : -k]
        if np.mean(tail) > np.mean(before) + 4 * np.std(before) / np.sqrt(len(before)) + 1e-9:
            warn(
                "the SVI loss rose over the last tenth of the run; the fit may not have "
                "converged. Lower lr or raise steps.",
                SamplerWarning,
            )
    settings = {
        "method": "svi",
        "backend": "pyro",
        "guide": guide,
        "steps": int(steps),
        "seed": int(seed),
        "lr": float(lr),
        "lr_decay": float(lr_decay),
        "num_particles": int(num_particles),
        "init_scale": float(init_scale),
        "rank": kw.get("rank"),
        "average": float(average),
        "wall_time_s": time.perf_counter() - t0,
    }
    return FitResult(guide, fitted, losses, settings)
