"""Information measures in nats: mutual information and entropy.

``mutual_information(x, y, estimator=...)`` and ``entropy(x, ...)`` work on arrays
(numpy or torch, ``[N]`` or ``[N, d]``). Given a :class:`condpost.ReferenceClass` as the
first argument, they compute the ensemble targets of docs/theory.md §3.4.5 instead
(``condpost.info.ensemble``). Estimators and their biases: ``docs/estimators.md``.

This package imports numpy, scipy and torch only (never jax).
"""

from __future__ import annotations

from typing import Any

from .estimators import (
    ENTROPY_ESTIMATORS,
    MI_ESTIMATORS,
    InfoResult,
    InfoWarning,
    gaussian_mixture_mi,
)
from .estimators import entropy as _entropy_arrays
from .estimators import mutual_information as _mi_arrays

__all__ = [
    "InfoResult",
    "InfoWarning",
    "mutual_information",
    "entropy",
    "gaussian_mixture_mi",
    "MI_ESTIMATORS",
    "ENTROPY_ESTIMATORS",
]


def _is_reference(obj: Any) -> bool:
    from ..reference import ReferenceClass

    return isinstance(obj, ReferenceClass)


def mutual_information(x: Any, y: Any = None, estimator: str = "auto", **kwargs: Any) -> InfoResult:
    """Mutual information in nats, on arrays or across a reference class.

    * ``mutual_information(x, y, estimator="auto", *, k=, standardize=True, stderr="auto",
      seed=0, **opts)``: paired samples ``x [N, dx]``, ``y [N, dy]``; see
      :func:`condpost.info.estimators.mutual_information`.
    * ``mutual_information(ref, probes=..., a=site, b=site, target=...)``: the ensemble
      targets of a :class:`condpost.ReferenceClass`; see
      :func:`condpost.info.ensemble.mutual_information`.
    """
    if _is_reference(x):
        if y is not None:
            raise TypeError(
                "mutual_information(ref, ...) takes keyword arguments after the reference "
                "class (probes=, a=, b=, target=), not a second positional array"
            )
        from . import ensemble

        return ensemble.mutual_information(x, estimator=estimator, **kwargs)
    if y is None:
        raise TypeError("mutual_information(x, y) needs paired samples y (got y=None)")
    return _mi_arrays(x, y, estimator, **kwargs)


def entropy(x: Any, estimator: str = "auto", **kwargs: Any) -> InfoResult:
    """Entropy in nats, on an array or across a reference class.

    * ``entropy(x, estimator="auto", *, k=, standardize=True, stderr="auto", seed=0)``:
      see :func:`condpost.info.estimators.entropy`.
    * ``entropy(ref, probes=..., site=..., ...)``: see :func:`condpost.info.ensemble.entropy`.
    """
    if _is_reference(x):
        from . import ensemble

        return ensemble.entropy(x, estimator=estimator, **kwargs)
    return _entropy_arrays(x, estimator, **kwargs)
