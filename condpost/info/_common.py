"""What the information estimators share: their warning class and the stderr option."""

from __future__ import annotations

from .._errors import CondpostWarning

__all__ = ["InfoWarning"]


class InfoWarning(CondpostWarning):
    """An information estimate is unreliable (saturated bound, ties, too few samples)."""


def _resolve_stderr(stderr: str | None, default: str, allowed: tuple[str, ...], name: str) -> str:
    if stderr is None or stderr is False or stderr == "none":
        return "none"
    if stderr == "auto":
        return default
    if stderr not in allowed:
        why = ""
        if stderr == "bootstrap" and "subsample" in allowed:
            why = (
                " Resampling with replacement duplicates points, and duplicates sit at "
                "distance 0 from each other, which biases nearest-neighbour estimators; "
                "use stderr='subsample' (disjoint subsets) instead."
            )
        raise ValueError(
            f"stderr={stderr!r} is not available for estimator {name!r}; choose one of "
            f"{list(allowed) + ['auto', None]}.{why}"
        )
    return stderr
