"""What every inference back-end shares: seeds, option checks, result types.

This module sits at the bottom of the ``infer`` layer. It imports neither Pyro nor JAX,
so the torch and JAX executors can use it without pulling in the other's library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .._errors import check_options

__all__ = [
    "GUIDES",
    "FitResult",
    "SampleResult",
    "chain_seeds",
    "check_options",
    "check_svi_args",
    "default_rank",
]

#: The variational families, by the name both SVI executors use.
GUIDES = ("normal", "lowrank", "mvn")


def chain_seeds(seed: int, chains: int) -> list[int]:
    """Independent per-chain seeds derived from one user seed (NumPy ``SeedSequence``)."""
    ss = np.random.SeedSequence(int(seed))
    return [int(s.generate_state(1, dtype=np.uint32)[0]) for s in ss.spawn(chains)]


def default_rank(d: int) -> int:
    """The low-rank guide's default rank, ``⌈√d⌉``, on both SVI executors."""
    return int(math.ceil(int(d) ** 0.5))


def check_svi_args(guide, steps, lr, lr_decay, num_particles, average) -> None:
    """Validate the SVI options shared by the Pyro and NumPyro executors."""
    if guide not in GUIDES:
        raise ValueError(f"guide={guide!r} is not available; choose one of {sorted(GUIDES)}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive; got {lr!r}")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must lie in (0, 1]; got {lr_decay!r}")
    if int(num_particles) != num_particles or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer; got {num_particles!r}")
    if not 0 <= average < 1:
        raise ValueError(
            f"average (fraction of final steps to average) must be in [0, 1); got {average}"
        )


class FitResult(NamedTuple):
    """What a variational executor returns: the fitted guide over the flat ``w``.

    ``distribution`` is a torch distribution over ``w`` (detached), ``losses`` the negative
    ELBO per step, ``settings`` the options and timings.
    """

    guide: str
    distribution: Any
    losses: np.ndarray
    settings: dict


@dataclass
class SampleResult:
    """What a sampling executor returns to the driver.

    Attributes
    ----------
    draws : array ``[chains, draws, d]`` or None
        The kept weights (NumPy, torch, or a read-only memory map of a run store); None
        when only statistics were kept.
    stats : dict of ``[chains, ·]`` arrays
        Per-draw statistics the executor already computed: ``loss`` (``L_n``),
        ``virial`` (``(w − w*)·∇U``), ``defect/<name>``, and sampler statistics under
        ``sampler/<name>`` (``sampler/diverging`` among them). The ``ReferenceClass``
        computes only what is missing here.
    settings : dict
        Options, seeds, timings: everything needed to reproduce the run.
    fault : str, optional
        Set when the sampler stopped early (non-finite weights, an exception): the draws
        and statistics then hold what was completed before it, ``settings["draws"]`` the
        number of complete draws per chain.
    store : str, optional
        The run store the draws live in.
    records : dict
        Arrays recorded along the chains beyond ``[chains, draws]`` statistics:
        ``"losses"``, the per-sample losses ``[chains, draws', q]`` of ``record_losses=``.
    """

    draws: Any
    stats: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    fault: str | None = None
    store: str | None = None
    records: dict = field(default_factory=dict)
