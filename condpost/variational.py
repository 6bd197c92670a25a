"""``SVIResult``: a fitted Gaussian variational approximation of a local posterior.

Both SVI executors (Pyro, NumPyro) return a ``condpost.infer.base.FitResult``;
``LocalPosterior.fit`` wraps it here, next to ``ReferenceClass``, so that ``sample``
turns the fitted guide into a reference class without the executors importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .infer.base import FitResult, SampleResult
from .reference import ReferenceClass

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior

__all__ = ["SVIResult"]


@dataclass
class SVIResult:
    """A fitted Gaussian variational approximation over the flat lifted vector ``w``.

    Attributes
    ----------
    distribution : torch.distributions.Distribution
        The fitted guide (detached).
    losses : numpy.ndarray
        Negative ELBO (nats) per step.
    settings : dict
        The executor, its options and timings.
    """

    posterior: LocalPosterior
    guide: str
    distribution: torch.distributions.Distribution
    losses: np.ndarray
    settings: dict = field(default_factory=dict)

    @classmethod
    def from_fit(cls, post: LocalPosterior, fit: FitResult) -> SVIResult:
        return cls(post, fit.guide, fit.distribution, np.asarray(fit.losses), dict(fit.settings))

    @property
    def mean(self) -> torch.Tensor:
        return self.distribution.mean

    def covariance(self) -> torch.Tensor:
        d = self.distribution
        if isinstance(d, torch.distributions.Independent):
            return torch.diag(d.base_dist.scale**2)
        return d.covariance_matrix

    def sample(self, n: int = 1000, *, seed: int = 0) -> ReferenceClass:
        """Draw ``n`` independent samples into a ``ReferenceClass``."""
        if int(n) != n or n < 4:
            raise ValueError(f"n must be an integer ≥ 4; got {n!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            W = self.distribution.sample((int(n),))
        settings = dict(self.settings)
        settings.update({"method": "svi", "draws": int(n), "chains": 1, "sample_seed": int(seed)})
        result = SampleResult(draws=W.reshape(1, int(n), -1), settings=settings)
        return ReferenceClass.from_result(self.posterior, result)
