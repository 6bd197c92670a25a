"""Preserved-feature constraints: soft observation factors ``exp(−ρ_c D_c(w))``.

Each constraint is a *feature map* ``f_c(w)`` (activations on fixed probes, a subset
of weights, ...) plus a *defect* ``D_c(w) ≥ 0`` with ``D_c(w*) = 0`` and a strength
``ρ_c > 0`` (THEORY §2). The strength is given in one of two modes:

* absolute ``tolerance`` σ (feature units): ``ρ_c = k_c/(2σ²)`` so that
  ``ρ_c D_c = ‖f_c(w) − f_c(w*)‖²/(2σ²)`` for the Gaussian defect
  ``D_c = (1/k_c) ‖f_c(w) − f_c(w*)‖²``;
* relative ``strength`` α (loss units): ``ρ_c = β·N_c·α = nβ·α·N_c/n`` with
  ``N_c = n`` by default, so one unit of mean defect costs α nats of mean NLL.

Constraints are declarations; :meth:`Constraint.bind` resolves them against a
posterior (sites, probes, ``w*``) and returns a :class:`BoundConstraint`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ._errors import check_finite, match_patterns, nearest
from .lifting import LiftedNetwork, resolve_sites

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior

__all__ = [
    "Constraint",
    "BoundConstraint",
    "ForwardView",
    "Activations",
    "WeightZeroPattern",
]


class ForwardView:
    """Read-only view of the network at one weight setting, shared by all constraints.

    Forward passes on each probe set run once and capture every site the constraints
    need on that probe set.
    """

    def __init__(
        self,
        lifted: LiftedNetwork,
        params: Mapping[str, torch.Tensor],
        plan: Mapping[int, tuple[torch.Tensor, list[str]]],
        forward=None,
        flat: torch.Tensor | None = None,
    ) -> None:
        self._lifted = lifted
        self.flat = flat
        self._params = params
        self._plan = plan
        self._cache: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self._forward = forward

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        """Lifted parameters by name (frozen ones are available via ``lifted.frozen``)."""
        return self._params

    def _run(self, probes: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key = id(probes)
        if key not in self._cache:
            sites = self._plan[key][1] if key in self._plan else []
            if self._forward is not None:
                self._cache[key] = self._forward(probes, sites)
            else:
                self._cache[key] = self._lifted.call(self._params, probes, sites)
        return self._cache[key]

    def activation(self, probes: torch.Tensor, site: str) -> torch.Tensor:
        return self._run(probes)[1][site]

    def output(self, probes: torch.Tensor) -> torch.Tensor:
        return self._run(probes)[0]


@dataclass
class BoundConstraint:
    """A constraint resolved against one posterior. ``penalty(view) = ρ·D(view)``."""

    name: str
    kind: str
    family: str
    k: int
    rho: float
    tolerance: float | None
    strength: float | None
    spec: Constraint
    target: torch.Tensor | None = None
    probes: torch.Tensor | None = None
    sites: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def feature(self, view: ForwardView) -> torch.Tensor:
        return self.spec._feature(self, view)

    def defect(self, view: ForwardView) -> torch.Tensor:
        return self.spec._defect(self, view)

    def penalty(self, view: ForwardView) -> torch.Tensor:
        return self.rho * self.defect(view)

    def to_config(self) -> dict:
        cfg = {
            "name": self.name,
            "kind": self.kind,
            "family": self.family,
            "k": self.k,
            "rho": self.rho,
            "tolerance": self.tolerance,
            "strength": self.strength,
            "sites": list(self.sites),
            "spread": self.state.get("spread"),
            "num_zero": self.state.get("num_zero"),
        }
        cfg.update(self.spec._config())
        return cfg


class Constraint:
    """Base class of preserved-feature declarations.

    Parameters
    ----------
    tolerance : float, optional
        Absolute tolerance σ in the feature's units (``ρ = k/(2σ²)``).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Name of the factor site ``constraint/<name>``; a default is derived.
    """

    kind = "constraint"
    family = "gaussian"

    def __init__(
        self,
        *,
        tolerance: float | None = None,
        strength: float | None = None,
        name: str | None = None,
        n_c: int | None = None,
    ) -> None:
        if (tolerance is None) == (strength is None):
            raise ValueError(
                f"{type(self).__name__}: give exactly one of tolerance= (absolute, feature "
                f"units) or strength= (relative, loss units); got tolerance={tolerance!r}, "
                f"strength={strength!r}"
            )
        for arg, v in (("tolerance", tolerance), ("strength", strength)):
            if v is not None and (not _is_pos_finite(v)):
                raise ValueError(
                    f"{type(self).__name__}: {arg} must be a positive finite number; got {v!r}"
                )
        if n_c is not None and int(n_c) <= 0:
            raise ValueError(f"n_c must be a positive integer; got {n_c!r}")
        self.tolerance = None if tolerance is None else float(tolerance)
        self.strength = None if strength is None else float(strength)
        self.n_c = n_c
        self.name = name

    # -- subclass API ---------------------------------------------------------
    def _default_name(self) -> str:
        return self.kind

    def _prepare(self, post: LocalPosterior, bound: BoundConstraint) -> None:
        """Resolve sites/probes/targets into ``bound``; set ``bound.k``."""
        raise NotImplementedError

    def _feature(self, bound: BoundConstraint, view: ForwardView) -> torch.Tensor:
        raise NotImplementedError

    def _defect(self, bound: BoundConstraint, view: ForwardView) -> torch.Tensor:
        diff = self._feature(bound, view) - bound.target
        return (diff * diff).sum() / bound.k

    def _config(self) -> dict:
        return {}

    # -- binding ----------------------------------------------------------------
    def bind(self, post: LocalPosterior) -> BoundConstraint:
        bound = BoundConstraint(
            name=self.name or self._default_name(),
            kind=self.kind,
            family=self.family,
            k=0,
            rho=0.0,
            tolerance=self.tolerance,
            strength=self.strength,
            spec=self,
        )
        self._prepare(post, bound)
        if bound.k <= 0:
            raise ValueError(f"constraint {bound.name!r} has an empty feature")
        _check_depends_on_lifted(post, bound)
        if bound.target is not None:
            t = bound.target.detach().to(torch.float64)
            t = t.reshape(t.shape[0], -1) if bound.probes is not None else t.reshape(-1, 1)
            bound.state["spread"] = float(((t - t.mean(0)) ** 2).sum())
        if self.tolerance is not None:
            bound.rho = bound.k / (2.0 * self.tolerance**2)
        else:
            n_c = self.n_c if self.n_c is not None else post.n
            bound.rho = post.nbeta * self.strength * n_c / post.n
        return bound

    def __repr__(self) -> str:
        mode = (
            f"tolerance={self.tolerance}"
            if self.tolerance is not None
            else (f"strength={self.strength}")
        )
        return f"{type(self).__name__}({self._default_name()!r}, {mode})"


def _check_depends_on_lifted(post: LocalPosterior, bound: BoundConstraint) -> None:
    """Raise if the feature does not depend on any lifted weight (its gradient is zero)."""
    w = post.center.clone().requires_grad_(True)
    with torch.enable_grad():
        plan = {} if bound.probes is None else {id(bound.probes): (bound.probes, bound.sites)}
        view = ForwardView(post.lifted, post.lifted.unflatten(w), plan, flat=w)
        f = bound.feature(view)
        if not f.requires_grad:
            g = torch.zeros_like(w)
        else:
            gen = torch.Generator(device="cpu").manual_seed(0)
            r = torch.randn(f.shape, generator=gen, dtype=f.dtype).to(f.device)
            (g,) = torch.autograd.grad((f * r).sum(), w, allow_unused=True)
            g = torch.zeros_like(w) if g is None else g
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"constraint {bound.name!r}: the feature's gradient at w* is not finite")
    if bool((g == 0).all()):
        raise ValueError(
            f"constraint {bound.name!r} does not depend on any lifted parameter (its gradient "
            f"at w* is zero), so it cannot change the posterior. Lift parameters that feed it "
            f"(include=...); lifted now: {post.lifted.names[:6]}"
        )


def _is_pos_finite(v) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f > 0 and f == f and f != float("inf")


def _prepare_probes(post: LocalPosterior, probes, argname: str = "probes") -> torch.Tensor:
    x = post.x
    p = torch.as_tensor(probes)
    if p.is_floating_point():
        p = p.to(dtype=post.dtype)
    p = p.to(x.device)
    check_finite(p, argname)
    if p.dim() != x.dim() or tuple(p.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(
            f"{argname} has shape {tuple(p.shape)}; the training inputs have shape "
            f"{tuple(x.shape)}, so probes need shape [m, {', '.join(map(str, x.shape[1:]))}]"
        )
    if p.shape[0] == 0:
        raise ValueError(f"{argname} is empty")
    if p.dtype != x.dtype:
        raise TypeError(f"{argname} has dtype {p.dtype}; the training inputs have {x.dtype}")
    return p


class Activations(Constraint):
    """Preserve the activations of ``site`` on fixed ``probes`` (THEORY C1).

    Feature ``f(w) = A_site(P; w)`` (stacked over probes), Gaussian defect
    ``D(w) = (1/k) Σ_{x∈P} ‖A_site(x; w) − A_site(x; w*)‖²`` with ``k`` the number of
    probe-activation entries. With ``tolerance=σ`` the factor is
    ``exp(−‖A(P; w) − A(P; w*)‖² / (2σ²))``: activations stay within σ (RMS) of ``w*``'s.

    This constraint is basis-dependent: it also pins continuous symmetries such as
    ReLU unit rescaling.

    Parameters
    ----------
    site : str
        Module path whose output is preserved (``"layers.1"``, ``"blocks.0.mlp"``).
    probes : tensor ``[m, *input_shape]``
        Fixed probe inputs.
    """

    kind = "activations"

    def __init__(self, site: str, probes, tolerance=None, strength=None, name=None, n_c=None):
        super().__init__(tolerance=tolerance, strength=strength, name=name, n_c=n_c)
        if not isinstance(site, str):
            raise TypeError(f"Activations: site must be a module path (str); got {site!r}")
        self.site = site
        self.probes = probes

    def _default_name(self) -> str:
        return f"activations:{self.site}"

    def _prepare(self, post, bound):
        (site,) = resolve_sites(post.lifted.net, [self.site], argname="Activations(site)")
        p = _prepare_probes(post, self.probes, "Activations(probes)")
        with torch.no_grad():
            _, acts = post.lifted.call(post.lifted.unflatten(post.center), p, [site])
        target = acts[site].detach().clone()
        check_finite(target, f"activations at site {site!r} on the probes at w*")
        bound.probes, bound.sites, bound.target, bound.k = p, [site], target, target.numel()

    def _feature(self, bound, view):
        return view.activation(bound.probes, bound.sites[0])

    def _config(self):
        return {"site": self.site, "m": int(torch.as_tensor(self.probes).shape[0])}


class WeightZeroPattern(Constraint):
    """Keep the near-zero weights of ``w*`` near zero (THEORY C6-i).

    ``Z* = {i : |w*_i| < threshold}`` over the lifted coordinates of the parameters
    matched by ``params``. Feature ``f(w) = w_{Z*}``; Gaussian defect
    ``D(w) = (1/|Z*|) Σ_{i∈Z*} (w_i − t_i)²``. With ``target="center"`` (default)
    ``t = w*_{Z*}``, so ``D(w*) = 0`` and the factor is exactly THEORY §4.1's
    ``exp(−‖C(w − w*)‖²/(2σ²))`` with rows ``e_iᵀ``. With ``target="zero"``, ``t = 0``
    (the literal C6 formula ``Σ w_i²/(2σ²)``, a pruning prior).

    Parameters
    ----------
    params : str or sequence of str
        Glob patterns over lifted parameter names.
    threshold : float
        Magnitude below which a weight of ``w*`` counts as zero.
    """

    kind = "zero_pattern"

    def __init__(
        self,
        params: str | Sequence[str],
        threshold: float,
        tolerance=None,
        strength=None,
        name=None,
        target: str = "center",
        n_c=None,
    ):
        super().__init__(tolerance=tolerance, strength=strength, name=name, n_c=n_c)
        if not _is_pos_finite(threshold):
            raise ValueError(f"WeightZeroPattern: threshold must be positive; got {threshold!r}")
        if target not in ("center", "zero"):
            raise ValueError(
                f"WeightZeroPattern: target must be 'center' or 'zero'; got {target!r}"
            )
        self.params = params
        self.threshold = float(threshold)
        self.target_mode = target

    def _default_name(self) -> str:
        p = self.params if isinstance(self.params, str) else ",".join(self.params)
        return f"zero_pattern:{p}"

    def _prepare(self, post, bound):
        lifted = post.lifted
        try:
            names = match_patterns(self.params, lifted.names, "WeightZeroPattern(params)")
        except ValueError:
            frozen_hits = match_patterns(self.params, lifted.all_names, "WeightZeroPattern(params)")
            raise ValueError(
                f"WeightZeroPattern(params={self.params!r}) matches only parameters that are not "
                f"lifted ({frozen_hits[:5]}); frozen weights cannot move, so the constraint would "
                f"do nothing. Lift them with include=..., or pick among the lifted parameters: "
                f"{nearest(str(self.params), lifted.names)}"
            ) from None
        idx = []
        for nm in names:
            sl = lifted.slice_of(nm)
            local = (lifted.center[sl].abs() < self.threshold).nonzero().reshape(-1)
            idx.append(local + sl.start)
        flat_idx = torch.cat(idx)
        if flat_idx.numel() == 0:
            mags = torch.cat([lifted.center[lifted.slice_of(nm)].abs() for nm in names])
            raise ValueError(
                f"WeightZeroPattern: no weight of {names} has |w*| < threshold={self.threshold}; "
                f"the smallest magnitude is {float(mags.min()):.3g}. Raise the threshold."
            )
        bound.state["index"] = flat_idx
        bound.state["params"] = names
        bound.state["num_zero"] = int(flat_idx.numel())
        if self.target_mode == "center":
            bound.target = lifted.center[flat_idx].clone()
        else:
            bound.target = torch.zeros(flat_idx.numel(), dtype=post.dtype, device=post.device)
        bound.k = int(flat_idx.numel())

    def _feature(self, bound, view):
        w = view.flat if view.flat is not None else view._lifted.flatten(view.weights)
        return w[bound.state["index"]]

    def _config(self):
        return {
            "params": self.params,
            "threshold": self.threshold,
            "target": self.target_mode,
        }
