"""Shared helpers for clear, actionable errors and warnings."""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "CondpostWarning",
    "CenterWarning",
    "SamplerWarning",
    "ConstraintWarning",
    "nearest",
    "match_patterns",
    "check_finite",
    "warn",
]


class CondpostWarning(UserWarning):
    """Base class of every warning condpost emits."""


class CenterWarning(CondpostWarning):
    """The centre w* is not at a local minimum of the loss."""


class SamplerWarning(CondpostWarning):
    """A sampler diagnostic (divergences, R-hat, ESS, virial ratio) failed."""


class ConstraintWarning(CondpostWarning):
    """A preserved-feature constraint is irrelevant or dominates."""


def _user_stacklevel() -> int:
    """Stack level of the first frame outside condpost (so warnings point at user code)."""
    import inspect
    import os

    pkg = os.path.dirname(os.path.abspath(__file__))
    frame = inspect.currentframe()
    level = 0
    while frame is not None:
        if not os.path.abspath(frame.f_code.co_filename).startswith(pkg):
            return max(level, 1)
        frame = frame.f_back
        level += 1
    return 2


def warn(message: str, category: type[Warning] = CondpostWarning) -> None:
    """Emit a categorised warning attributed to the caller's code."""
    warnings.warn(message, category, stacklevel=_user_stacklevel())


def nearest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates closest to ``name`` (prefix matches first)."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.3)
    stem = name.rstrip("*.").split("*")[0]
    prefixed = [c for c in candidates if stem and c.startswith(stem)]
    out: list[str] = []
    for c in prefixed[:n] + close:
        if c not in out:
            out.append(c)
    if not out:
        out = candidates[:n]
    return out[:n]


def _pattern_matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def match_patterns(
    patterns: str | Sequence[str] | None,
    names: Sequence[str],
    argname: str,
    what: str = "parameter",
) -> list[str]:
    """Names matched by glob ``patterns`` (exact name, glob, or module prefix).

    Every pattern must match at least one name; otherwise a ``ValueError`` lists the
    nearest real names.
    """
    if patterns is None:
        return list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    elif not isinstance(patterns, (list, tuple, set, frozenset)):
        raise TypeError(
            f"{argname} must be a glob pattern (str) or a list of them, naming entries of "
            f"`named_parameters()`; got {type(patterns).__name__} {patterns!r}. For example "
            f"{argname}='0.*' selects the parameters of module '0', {argname}=['0.weight', "
            f"'2.*'] several; leave {argname} out to select all. Nearest {what} names: "
            f"{list(names)[:5]}"
        )
    selected: list[str] = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{argname} must hold strings (glob patterns); got {type(p).__name__}")
        hits = [nm for nm in names if _pattern_matches(nm, p)]
        if not hits:
            raise ValueError(
                f"{argname}={p!r} matches no {what} name. Nearest {what} names: "
                f"{nearest(p, names)}. Patterns are globs over `named_parameters()` names "
                f"(e.g. 'layers.1.*'), exact names, or module paths."
            )
        selected.extend(h for h in hits if h not in selected)
    return [nm for nm in names if nm in selected]


def check_finite(t: torch.Tensor, argname: str) -> None:
    """Raise a ValueError naming ``argname`` when ``t`` holds NaN or inf."""
    if t.is_floating_point() or t.is_complex():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{argname} contains {int(bad.sum())} non-finite value(s) (NaN or inf), "
                f"the first at index {idx}. Clean or drop those entries before building "
                f"the posterior."
            )


# Option names other libraries use for the same thing (Pyro, NumPyro, devinterp, PyTorch
# optimisers): an unknown option with one of these names gets "did you mean" for condpost's.
OPTION_ALIASES: dict[str, str] = {
    "num_samples": "draws",
    "num_draws": "draws",
    "samples": "draws",
    "num_warmup": "warmup",
    "warmup_steps": "warmup",
    "num_burnin_steps": "warmup",
    "burn_in": "warmup",
    "burnin": "warmup",
    "num_chains": "chains",
    "lr": "step_size",
    "learning_rate": "step_size",
    "epsilon": "step_size",
    "eps_step": "step_size",
    "target_accept_prob": "target_accept",
    "full_mass": "dense_mass",
    "thinning": "thin",
    "num_steps_bw_draws": "thin",
    "rng_key": "seed",
    "random_seed": "seed",
    "rng_seed": "seed",
    "disable_progbar": "progress",
    "progress_bar": "progress",
}

# Options that belong to the declaration, not to a sampler run: name where to set them.
DECLARATION_OPTIONS: dict[str, str] = {
    "nbeta": "nβ is part of the declaration: LocalPosterior(..., nbeta=...) or post.with_nbeta(v)",
    "localization": "γ is part of the declaration: LocalPosterior(..., localization=...)",
    "elasticity": "devinterp's elasticity is γ, part of the declaration: "
    "LocalPosterior(..., localization=...)",
    "temperature": "the temperature is set by nβ in the declaration: "
    "LocalPosterior(..., nbeta=...)",
}


def check_options(options: dict, known, where: str, also_valid=()) -> None:
    """Raise ``TypeError`` for unknown keyword options, naming the nearest valid ones.

    ``also_valid`` are names valid at the call site but not in ``known`` (e.g. the
    ``chains``/``warmup``/``draws`` arguments of ``sample``): another library's name for
    one of them (``num_samples`` → ``draws``, ``lr`` → ``step_size``; see
    ``OPTION_ALIASES``) is answered with it.
    """
    if options:
        bad = sorted(options)
        valid = set(known) | set(also_valid)
        hints = []
        for k in bad:
            alias = OPTION_ALIASES.get(k)
            if k in DECLARATION_OPTIONS:
                hints.append(f"{k!r}: {DECLARATION_OPTIONS[k]}")
            elif alias is not None and alias in valid:
                hints.append(f"{k!r} (did you mean {alias!r}? condpost calls it {alias}=)")
            else:
                h = nearest(k, known, n=1)
                if h:
                    hints.append(f"{k!r} (did you mean {h[0]!r}?)")
        hint = "; ".join(hints)
        raise TypeError(
            f"unknown option(s) {bad} for {where}. "
            + (f"{hint}. " if hint else "")
            + f"Valid options: {sorted(known)}"
        )
