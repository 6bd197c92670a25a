"""Preserved-feature constraints: soft observation factors ``exp(−ρ_c D_c(w))``.

Each constraint is a *feature map* ``f_c(w)`` (activations on fixed probes, a subset
of weights, ...) plus a *defect* ``D_c(w) ≥ 0`` with ``D_c(w*) = 0`` and a strength
``ρ_c > 0`` (docs/theory.md §2). The strength is given in one of two modes:

* absolute ``tolerance`` σ (feature units): ``ρ_c = k_c/(2σ²)`` so that
  ``ρ_c D_c = ‖f_c(w) − f_c(w*)‖²/(2σ²)`` for the Gaussian defect
  ``D_c = (1/k_c) ‖f_c(w) − f_c(w*)‖²``;
* relative ``strength`` α (loss units): ``ρ_c = β·N_c·α = nβ·α·N_c/n`` with
  ``N_c = n`` by default, so one unit of mean defect costs α nats of mean NLL.

Constraints are declarations; ``Constraint.bind`` resolves them against a
posterior (sites, probes, ``w*``) and returns a ``BoundConstraint``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ._errors import ConstraintWarning, check_finite, match_patterns, nearest, warn
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

    ``activation(probes, site)``, ``output(probes)``, ``weights`` (lifted parameters by
    name), ``flat`` (the lifted vector) and ``loss()`` (``L_n``). Forward passes on each
    probe set run once and capture every site requested on it.
    """

    def __init__(
        self,
        lifted: LiftedNetwork,
        params: Mapping[str, torch.Tensor],
        plan: Mapping[int, tuple[torch.Tensor, list[str]]],
        forward=None,
        flat: torch.Tensor | None = None,
        loss_fn=None,
    ) -> None:
        self._lifted = lifted
        self.flat = flat
        self._params = params
        self._plan = plan
        self._cache: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self._forward = forward
        self._loss_fn = loss_fn
        self._loss = None

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        """Lifted parameters by name (frozen ones are available via ``lifted.frozen``)."""
        return self._params

    def weight(self, name: str) -> torch.Tensor:
        """A parameter by name: the lifted value if lifted, else the frozen constant."""
        if name in self._params:
            return self._params[name]
        if name in self._lifted.frozen:
            return self._lifted.frozen[name]
        raise KeyError(f"no parameter {name!r}; nearest: {nearest(name, self._lifted.all_names)}")

    def _run(self, probes: torch.Tensor, extra: Sequence[str] = ()):
        key = id(probes)
        hit = self._cache.get(key)
        if hit is not None and all(s in hit[1] for s in extra):
            return hit
        sites = list(self._plan[key][1]) if key in self._plan else []
        if hit is not None:
            sites += [s for s in hit[1] if s not in sites]
        sites += [s for s in extra if s not in sites]
        if self._forward is not None:
            res = self._forward(probes, sites)
        else:
            res = self._lifted.call(self._params, probes, sites)
        self._cache[key] = res
        return res

    def activation(self, probes: torch.Tensor, site: str) -> torch.Tensor:
        return self._run(probes, (site,))[1][site]

    def output(self, probes: torch.Tensor) -> torch.Tensor:
        return self._run(probes)[0]

    def patched(self, probes: torch.Tensor, source: str, value: torch.Tensor, target: str):
        """Activation at ``target`` when ``source``'s output is replaced by ``value``."""
        _, acts = self._lifted.call(self._params, probes, [target], replace={source: value})
        return acts[target]

    def loss(self) -> torch.Tensor:
        """``L_n`` at these weights (needs a posterior-made view)."""
        if self._loss is None:
            if self._loss_fn is None:
                raise RuntimeError("this view has no training loss attached")
            w = self.flat if self.flat is not None else self._lifted.flatten(self._params)
            self._loss = self._loss_fn(w)
        return self._loss


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

    def requests(self) -> list[tuple[torch.Tensor, list[str]]]:
        """(probes, sites) pairs whose forward passes this constraint reads."""
        out = list(self.state.get("requests", []))
        if self.probes is not None:
            out.append((self.probes, list(self.sites)))
        return out

    def feature(self, view: ForwardView) -> torch.Tensor:
        return self.spec._feature(self, view)

    def exact(self, view: ForwardView) -> dict[str, torch.Tensor]:
        """Exact (non-surrogate) discrete statistics at this draw, e.g. fraction active."""
        return self.spec._exact(self, view)

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
        cfg["side"] = self.spec.side
        cfg["margin"] = self.spec.margin
        cfg["exact"] = list(self.state.get("exact_keys", []))
        cfg.update(self.spec._config())
        return cfg


class Constraint:
    """Base class of preserved-feature declarations.

    Parameters
    ----------
    tolerance : float, optional
        Absolute tolerance σ in the feature's units (``ρ = k/(2σ²)``), independent of nβ.
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``): one unit of mean defect
        costs α nats of mean NLL. Give exactly one of ``tolerance`` and ``strength``.
    name : str, optional
        Name of the constraint and of its factor site ``constraint/<name>``; a default
        is derived from the type and its arguments.
    n_c : int, optional
        ``N_c`` in ``ρ = nβ·α·N_c/n`` (relative mode only). Default ``n``, so α counts
        like the training loss; ``n_c=m`` counts the probes as ``m`` extra observations.
    side : {"two", "upper"}
        ``"two"`` (default): stay near ``w*``'s value. ``"upper"``: be no larger than
        ``w*``'s value, a one-sided hinge² ``max(0, f(w) − f(w*) − margin)²`` (family
        ``"hinge"``).
    margin : float
        Slack δ ≥ 0 of the hinge² (``side="upper"`` only; default 0).
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
        side: str = "two",
        margin: float = 0.0,
    ) -> None:
        if side not in ("two", "upper"):
            raise ValueError(
                f"{type(self).__name__}: side must be 'two' (stay near w*'s value) or 'upper' "
                f"(no larger than w*'s value, a hinge²); got {side!r}"
            )
        if not (margin >= 0):
            raise ValueError(f"{type(self).__name__}: margin must be ≥ 0; got {margin!r}")
        self.side = side
        self.margin = float(margin)
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
        if self.side == "upper":
            diff = torch.relu(diff - self.margin)
        return (diff * diff).sum() / bound.k

    def _exact(self, bound: BoundConstraint, view: ForwardView) -> dict[str, torch.Tensor]:
        return {}

    def _family(self) -> str:
        return "hinge" if self.side == "upper" else self.family

    def _config(self) -> dict:
        return {}

    # -- binding ----------------------------------------------------------------
    def bind(self, post: LocalPosterior) -> BoundConstraint:
        bound = BoundConstraint(
            name=self.name or self._default_name(),
            kind=self.kind,
            family=self._family(),
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
        with torch.no_grad():
            bound.state["exact_keys"] = list(bound.exact(post.view(post.center)))
        if bound.target is not None and bound.target.dim() > 0:
            t = bound.target.detach().to(torch.float64)
            t = t.reshape(t.shape[0], -1) if bound.probes is not None else t.reshape(-1, 1)
            bound.state["spread"] = float(((t - t.mean(0)) ** 2).sum())
        if self.tolerance is not None:
            bound.rho = _tolerance_rho(post, bound, self.tolerance)
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
    """Make sure the feature depends on the lifted weights.

    Structurally independent features (no autograd path to the lifted vector) are an
    error. A connected feature whose gradient is numerically zero at w* and at two random
    points at the prior's scale γ^{-1/2} is an error for user ``Feature`` constraints and a
    warning for built-in constraints (e.g. all units dead on the probes).
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    scale = post.localization**-0.5
    points = [post.center] + [
        post.center + scale * torch.randn(post.d, generator=gen, dtype=post.dtype).to(post.device)
        for _ in range(2)
    ]
    plan = {id(p): (p, sites) for p, sites in bound.requests()}
    structural = False
    for i, w0 in enumerate(points):
        w = w0.clone().requires_grad_(True)
        with torch.enable_grad():
            view = ForwardView(
                post.lifted, post.lifted.unflatten(w), plan, flat=w, loss_fn=post.loss
            )
            f = bound.feature(view)
            g = None
            if f.requires_grad:
                r = torch.randn(f.shape, generator=gen, dtype=f.dtype).to(f.device)
                (g,) = torch.autograd.grad((f * r).sum(), w, allow_unused=True)
        if g is None:
            structural = True
            break
        if i == 0 and not bool(torch.isfinite(g).all()):
            raise ValueError(
                f"constraint {bound.name!r}: the feature's gradient at w* is not finite"
            )
        if bool((g != 0).any()):
            return
    msg = (
        f"constraint {bound.name!r} does not depend on any lifted parameter (its gradient is "
        f"zero at w* and nearby), so it cannot change the posterior. Lift parameters that feed "
        f"it (include=...); lifted now: {post.lifted.names[:6]}"
    )
    if structural or isinstance(bound.spec, Feature):
        raise ValueError(msg)
    warn(msg, ConstraintWarning)


# A tolerance this many times below the feature's spread under the local prior sets a
# length scale that HMC/NUTS cannot bridge (tree depth 10 is 1023 leapfrog steps).
_TOLERANCE_RATIO_WARN = 1e4


def _tolerance_rho(post: LocalPosterior, bound: BoundConstraint, sigma: float) -> float:
    """``ρ = k/(2σ²)``, refusing a tolerance below what the numbers or a sampler can resolve.

    * ``ValueError`` when ``ρ`` is not representable (``σ² = 0`` or overflow) or ``σ`` is
      below the floating-point resolution of the feature at ``w*`` (a few ulps of its
      largest entry in the posterior's dtype);
    * a ``ConstraintWarning`` when ``σ`` is over ``10⁴`` times smaller than the RMS change
      of the feature at a draw of the local prior ``N(w*, γ⁻¹I)`` (the binding ratio at
      such a draw, ``D/σ²``, exceeds 10⁸): the sampler would need about that many
      leapfrog steps per independent draw.
    """
    name = bound.name
    denom = 2.0 * sigma * sigma
    rho = bound.k / denom if denom > 0 else math.inf
    if not math.isfinite(rho):
        raise ValueError(
            f"constraint {name!r}: tolerance={sigma!r} is too small to represent: "
            f"ρ = k/(2σ²) overflows in floating point. A tolerance is in the feature's "
            f"units (RMS per entry); choose one the sampler can resolve, e.g. a few percent "
            f"of the feature's typical size."
        )
    plan = {id(p): (p, sites) for p, sites in bound.requests()}

    def view_at(w):
        return ForwardView(post.lifted, post.lifted.unflatten(w), plan, flat=w, loss_fn=post.loss)

    try:
        with torch.no_grad():
            scale = 0.0
            if bound.target is not None and bound.target.is_floating_point():
                scale = float(bound.target.detach().abs().max()) if bound.target.numel() else 0.0
            if bound.family == "gaussian":
                f = bound.feature(view_at(post.center))
                if isinstance(f, torch.Tensor) and f.is_floating_point() and f.numel():
                    scale = max(scale, float(f.detach().abs().max()))
            eps = torch.finfo(post.dtype).eps
            if scale > 0 and sigma < 4 * eps * scale:
                raise ValueError(
                    f"constraint {name!r}: tolerance={sigma:.3g} is below the floating-point "
                    f"resolution of this feature in {str(post.dtype).replace('torch.', '')} "
                    f"(its entries reach {scale:.3g}, and one rounding step is about "
                    f"{eps * scale:.2g}): the constraint would only measure rounding error. "
                    f"Use a tolerance of at least {1e3 * eps * scale:.2g} (a few percent of the "
                    f"feature's size is typical), or declare the posterior with "
                    f"dtype=torch.float64."
                )
            gen = torch.Generator(device="cpu").manual_seed(1)
            prior_sd = post.localization**-0.5
            ds = []
            for _ in range(2):
                z = torch.randn(post.d, generator=gen, dtype=post.dtype).to(post.device)
                d = float(bound.defect(view_at(post.center + prior_sd * z)))
                if math.isfinite(d):
                    ds.append(d)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - a heuristic check must never break a declaration
        return rho
    if ds:
        ratio = math.sqrt(max(sum(ds) / len(ds), 0.0)) / sigma
        if ratio > _TOLERANCE_RATIO_WARN:
            loose = math.sqrt(sum(ds) / len(ds)) / _TOLERANCE_RATIO_WARN
            warn(
                f"constraint {name!r}: tolerance={sigma:.3g} is {ratio:.2g} times smaller than "
                f"the feature's RMS change at a draw of the local prior N(w*, γ⁻¹I) "
                f"({sigma * ratio:.3g}). The constrained directions are then {ratio:.2g} times "
                f"narrower than the rest, and HMC/NUTS need about that many leapfrog steps per "
                f"independent draw (tree depth 10 allows 1023): expect divergences or chains "
                f"that barely move. Loosen it (tolerance ≥ {loose:.2g} keeps the ratio below "
                f"{_TOLERANCE_RATIO_WARN:.0e}), or raise localization.",
                ConstraintWarning,
            )
    return rho


def _is_pos_finite(v) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f > 0 and f == f and f != float("inf")


def _prepare_probes(post: LocalPosterior, probes, argname: str = "probes") -> torch.Tensor:
    x = post.x if post.data.in_memory else post.data.x_like  # a streamed source: one row
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


def _linear_cka(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between ``[m, p]`` and ``[m, q]`` representations (Kornblith et al. 2019)."""
    Xc = X - X.mean(0, keepdim=True)
    Yc = Y - Y.mean(0, keepdim=True)
    K, L = Xc @ Xc.T, Yc @ Yc.T
    eps = torch.finfo(X.dtype).tiny
    return (K * L).sum() / (
        (K * K).sum().clamp_min(eps).sqrt() * (L * L).sum().clamp_min(eps).sqrt()
    )


class Activations(Constraint):
    """Preserve the activations of ``site`` on fixed ``probes`` (docs/theory.md C1).

    ``measure="mse"`` (default): feature ``f(w) = A_site(P; w)`` (stacked over probes),
    Gaussian defect ``D(w) = (1/k) Σ_{x∈P} ‖A_site(x; w) − A_site(x; w*)‖²`` with ``k``
    the number of probe-activation entries. With ``tolerance=σ`` the factor is
    ``exp(−‖A(P; w) − A(P; w*)‖² / (2σ²))``: activations stay within σ (RMS) of ``w*``'s.
    This is basis-dependent: it also pins continuous symmetries such as ReLU unit
    rescaling.

    ``measure="cka"``: the basis-free defect ``D(w) = 1 − CKA(A(P; w), A(P; w*))`` with
    linear CKA over the probes, invariant to rotations and isotropic scaling of the
    site's units; ``k = 1`` and ``tolerance=σ`` gives the factor ``exp(−D/(2σ²))``.

    Parameters
    ----------
    site : str
        Module path whose output is preserved (``"layers.1"``, ``"blocks.0.mlp"``; ``""``
        is the network output).
    probes : torch.Tensor
        Fixed probe inputs, shape ``[m, *input_shape]``, same dtype as the training
        inputs.
    tolerance : float, optional
        Absolute tolerance σ in activation units, RMS per entry (``ρ = k/(2σ²)``); with
        ``measure="cka"``, ``k = 1`` and σ is in units of ``sqrt(1 − CKA)``.
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"activations:<site>"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    measure : {"mse", "cka"}
        Gaussian defect on the raw activations (default) or ``1 − CKA``.
    side : {"two", "upper"}
        ``"upper"``: activations no larger than at ``w*`` (``"mse"`` only) (hinge²).
    margin : float
        Slack of the hinge² with ``side="upper"`` (default 0).
    """

    kind = "activations"

    def __init__(
        self,
        site: str,
        probes,
        tolerance=None,
        strength=None,
        name=None,
        n_c=None,
        measure: str = "mse",
        side: str = "two",
        margin: float = 0.0,
    ):
        super().__init__(
            tolerance=tolerance, strength=strength, name=name, n_c=n_c, side=side, margin=margin
        )
        if not isinstance(site, str):
            raise TypeError(f"Activations: site must be a module path (str); got {site!r}")
        if measure not in ("mse", "cka"):
            raise ValueError(f"Activations: measure must be 'mse' or 'cka'; got {measure!r}")
        self.site = site
        self.probes = probes
        self.measure = measure

    def _family(self) -> str:
        return "cka" if self.measure == "cka" else super()._family()

    def _default_name(self) -> str:
        return f"activations:{self.site}" + (":cka" if self.measure == "cka" else "")

    def _prepare(self, post, bound):
        (site,) = resolve_sites(post.lifted.net, [self.site], argname="Activations(site)")
        p = _prepare_probes(post, self.probes, "Activations(probes)")
        target = _activation_at_center(post, p, site)
        if self.measure == "cka" and p.shape[0] < 3:
            raise ValueError("Activations(measure='cka') needs at least 3 probes")
        bound.probes, bound.sites, bound.target = p, [site], target
        bound.k = 1 if self.measure == "cka" else target.numel()

    def _feature(self, bound, view):
        return view.activation(bound.probes, bound.sites[0])

    def _defect(self, bound, view):
        if self.measure == "cka":
            a = self._feature(bound, view)
            return 1.0 - _linear_cka(
                a.reshape(a.shape[0], -1), bound.target.reshape(a.shape[0], -1)
            )
        return super()._defect(bound, view)

    def _config(self):
        return {
            "site": self.site,
            "m": int(torch.as_tensor(self.probes).shape[0]),
            "measure": self.measure,
        }


def _activation_at_center(post, probes: torch.Tensor, site: str) -> torch.Tensor:
    with torch.no_grad():
        _, acts = post.lifted.call(post.lifted.unflatten(post.center), probes, [site])
    target = acts[site].detach().clone()
    check_finite(target, f"activations at site {site!r} on the probes at w*")
    return target


class WeightZeroPattern(Constraint):
    """Keep the near-zero weights of ``w*`` near zero (docs/theory.md C6-i).

    ``Z* = {i : |w*_i| < threshold}`` over the lifted coordinates of the parameters
    matched by ``params``. Feature ``f(w) = w_{Z*}``; Gaussian defect
    ``D(w) = (1/|Z*|) Σ_{i∈Z*} (w_i − t_i)²``. With ``target="center"`` (default)
    ``t = w*_{Z*}``, so ``D(w*) = 0`` and the factor is exactly docs/theory.md §4.1's
    ``exp(−‖C(w − w*)‖²/(2σ²))`` with rows ``e_iᵀ``. With ``target="zero"``, ``t = 0``
    (the literal C6 formula ``Σ w_i²/(2σ²)``, a pruning prior). The exact count of
    weights of ``Z*`` with ``|w_i| < threshold`` is reported per draw
    (``exact:zero_count``).

    Parameters
    ----------
    params : str or sequence of str
        Glob patterns over lifted parameter names.
    threshold : float
        Magnitude below which a weight of ``w*`` counts as zero.
    tolerance : float, optional
        Absolute tolerance σ in weight units (``ρ = k/(2σ²)``).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"zero_pattern:<params>"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    target : {"center", "zero"}
        ``"center"`` (default): hold ``Z*`` at ``w*_{Z*}`` (``D(w*) = 0``). ``"zero"``:
        pull it to exactly zero (a pruning prior, ``D(w*) > 0``).
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
        names = _lifted_slices(post, self.params, "WeightZeroPattern(params)")
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


def _zero_pattern_exact(bound, view):
    w = view.flat if view.flat is not None else view._lifted.flatten(view.weights)
    idx = bound.state["index"]
    thr = bound.spec.threshold
    return {"zero_count": (w[idx].abs() < thr).sum().to(w.dtype)}


WeightZeroPattern._exact = lambda self, bound, view: _zero_pattern_exact(bound, view)


class CircuitMap(Constraint):
    """Preserve a circuit's input→output map between two sites (docs/theory.md C2, activation patching).

    The sub-network from ``source`` to ``target`` is run on *injected* source activations
    ``a_j``: ``C_w(a_j)`` is the activation at ``target`` when the module at ``source``
    outputs ``a_j`` (paths that bypass ``source`` are computed from the probes). Gaussian
    defect ``D(w) = (1/k) Σ_j ‖C_w(a_j) − C_{w*}(a_j)‖²``. Everything upstream of
    ``source`` stays free.

    Parameters
    ----------
    source, target : str
        Module paths; ``source`` must feed ``target``.
    probes : torch.Tensor
        Inputs that drive the forward pass (and define the clean activations), shape
        ``[m, *input_shape]``.
    interventions : {"clean", "resample", "mean"} or torch.Tensor
        ``"clean"``: ``a_j = A_source(x_j; w*)``; ``"resample"``: the ``w*`` activations of
        other probes (a fixed random permutation, ``seed``); ``"mean"``: their mean over
        probes; or a tensor of the source activation's shape ``[m, ...]``.
    tolerance : float, optional
        Absolute tolerance σ in units of the target site's activations (``ρ = k/(2σ²)``).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"circuit:<source>-><target>"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    seed : int
        Seed of the permutation used by ``interventions="resample"`` (default 0).
    side : {"two", "upper"}
        ``"upper"``: target activations no larger than at ``w*`` (hinge²).
    """

    kind = "circuit"

    def __init__(
        self,
        source: str,
        target: str,
        probes,
        interventions="clean",
        tolerance=None,
        strength=None,
        name=None,
        n_c=None,
        seed: int = 0,
        side: str = "two",
    ):
        super().__init__(tolerance=tolerance, strength=strength, name=name, n_c=n_c, side=side)
        if not (isinstance(interventions, str) or isinstance(interventions, torch.Tensor)):
            raise TypeError(
                "CircuitMap: interventions must be 'clean', 'resample', 'mean' or a tensor"
            )
        if isinstance(interventions, str) and interventions not in ("clean", "resample", "mean"):
            raise ValueError(
                f"CircuitMap: interventions must be 'clean', 'resample', 'mean' or a tensor; "
                f"got {interventions!r}"
            )
        self.source, self.target, self.probes = source, target, probes
        self.interventions = interventions
        self.seed = seed

    def _default_name(self) -> str:
        return f"circuit:{self.source}->{self.target}"

    def _prepare(self, post, bound):
        src, tgt = resolve_sites(post.lifted.net, [self.source, self.target], "CircuitMap(sites)")
        if src == tgt:
            raise ValueError("CircuitMap: source and target must differ")
        p = _prepare_probes(post, self.probes, "CircuitMap(probes)")
        clean = _activation_at_center(post, p, src)
        iv = self.interventions
        if isinstance(iv, torch.Tensor):
            a = iv.detach().to(dtype=clean.dtype, device=clean.device)
            if a.shape != clean.shape:
                raise ValueError(
                    f"CircuitMap: interventions tensor has shape {tuple(a.shape)}; the source "
                    f"{src!r} outputs {tuple(clean.shape)} on these probes"
                )
            check_finite(a, "CircuitMap(interventions)")
        elif iv == "clean":
            a = clean
        elif iv == "resample":
            m = clean.shape[0]
            if m < 2:
                raise ValueError("CircuitMap(interventions='resample') needs at least 2 probes")
            g = torch.Generator().manual_seed(int(self.seed))
            perm = torch.randperm(m, generator=g)
            fixed = perm == torch.arange(m)
            perm[fixed] = (perm[fixed] + 1) % m  # no probe keeps its own activation
            a = clean[perm]
        else:
            a = clean.mean(0, keepdim=True).expand_as(clean).clone()
        center = post.lifted.unflatten(post.center)
        a_req = a.clone().requires_grad_(True)
        with torch.enable_grad():
            try:
                _, acts = post.lifted.call(center, p, [tgt], replace={src: a_req})
            except RuntimeError as e:
                raise ValueError(f"CircuitMap({src!r} → {tgt!r}): {e}") from None
            out = acts[tgt]
            gsum = None
            if out.requires_grad:
                gsum = torch.autograd.grad(out.sum(), a_req, allow_unused=True)[0]
        if gsum is None or bool((gsum == 0).all()):
            raise ValueError(
                f"CircuitMap: source {src!r} does not feed target {tgt!r} (the target does not "
                f"change when the source activation is patched). Pick a target downstream of "
                f"the source."
            )
        bound.probes, bound.sites = p, [tgt]
        bound.state["source"], bound.state["inject"] = src, a.detach()
        bound.target = out.detach().clone()
        bound.k = bound.target.numel()

    def _feature(self, bound, view):
        return view.patched(
            bound.probes, bound.state["source"], bound.state["inject"], bound.sites[0]
        )

    def _config(self):
        iv = self.interventions if isinstance(self.interventions, str) else "tensor"
        return {"source": self.source, "target_site": self.target, "interventions": iv}


class Outputs(Constraint):
    """Preserve the network's predictions on ``probes`` (docs/theory.md C3).

    With ``kl=α`` (categorical logits): ``D(w) = (1/m) Σ_j KL(p(·|x_j, w*) ‖ p(·|x_j, w))``
    in nats with relative strength α (``ρ = nβ·α·N_c/n``): a tempered likelihood on the
    network's own soft labels (self-distillation), so ``w*`` is an exact minimiser.
    Otherwise the Gaussian defect on the raw outputs, ``D = (1/k)‖f(P; w) − f(P; w*)‖²``,
    with ``tolerance`` or ``strength``. In KL mode the argmax agreement with ``w*`` is
    reported per draw (``exact:argmax_agreement``).

    Parameters
    ----------
    probes : torch.Tensor
        Probe inputs, shape ``[m, *input_shape]`` (the training inputs give
        self-distillation).
    tolerance : float, optional
        Absolute tolerance σ in output units, Gaussian mode only (``ρ = k/(2σ²)``).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"outputs"``, or ``"outputs:kl"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    kl : float, optional
        Relative strength α of the KL defect (KL mode, family ``"kl"``); give it alone,
        without ``tolerance`` or ``strength``.
    """

    kind = "outputs"

    def __init__(
        self, probes, tolerance=None, strength=None, kl: float | None = None, name=None, n_c=None
    ):
        if kl is not None:
            if tolerance is not None or strength is not None:
                raise ValueError("Outputs: give kl=α alone (KL mode), or tolerance/strength")
            super().__init__(strength=kl, name=name, n_c=n_c)
        else:
            super().__init__(tolerance=tolerance, strength=strength, name=name, n_c=n_c)
        self.kl = kl is not None
        self.probes = probes

    def _family(self):
        return "kl" if self.kl else "gaussian"

    def _default_name(self):
        return "outputs:kl" if self.kl else "outputs"

    def _prepare(self, post, bound):
        p = _prepare_probes(post, self.probes, "Outputs(probes)")
        target = _activation_at_center(post, p, "")
        if self.kl:
            if target.dim() < 2:
                raise ValueError("Outputs(kl=...) needs logits of shape [m, ..., C]")
            target = torch.log_softmax(target, -1)
            bound.k = int(target.shape[0])
        else:
            bound.k = target.numel()
        bound.probes, bound.sites, bound.target = p, [""], target

    def _feature(self, bound, view):
        return view.activation(bound.probes, "")

    def _defect(self, bound, view):
        if not self.kl:
            return super()._defect(bound, view)
        logq = torch.log_softmax(self._feature(bound, view), -1)
        logp = bound.target
        kl = (logp.exp() * (logp - logq)).sum(-1)
        return kl.sum() / bound.k

    def _exact(self, bound, view):
        if not self.kl:
            return {}
        out = self._feature(bound, view)
        agree = (out.argmax(-1) == bound.target.argmax(-1)).to(out.dtype).mean()
        return {"argmax_agreement": agree}

    def _config(self):
        return {"kl": self.kl, "m": int(torch.as_tensor(self.probes).shape[0])}


def _default_tau(target: torch.Tensor) -> float:
    scale = float(target.detach().abs().to(torch.float64).std())
    return 0.1 * scale if scale > 0 else 0.1


class ActivationSparsity(Constraint):
    """Preserve how sparse the activations at ``site`` are (docs/theory.md C4).

    The exact statistic, the fraction of active entries ``mean 1[A > 0]``, is a step
    function; the constraint uses a smooth surrogate ``s(w)``:

    * ``"sigmoid"``: ``s = mean sigmoid(A/τ)`` (τ defaults to 10% of the activations'
      scale at ``w*``);
    * ``"l1"``: ``s = mean |A|``;
    * ``"hoyer"``: ``s = mean over probes of ‖a‖₁/‖a‖₂``.

    Defect ``(s(w) − s(w*))²`` (``side="two"``) or the hinge² ``max(0, s(w) − s(w*) −
    margin)²`` (``side="upper"``: no denser than ``w*``); ``k = 1``. The exact fraction
    active is reported per draw.

    Parameters
    ----------
    site : str
        Module path whose output's sparsity is preserved.
    probes : torch.Tensor
        Probe inputs, shape ``[m, *input_shape]``.
    surrogate : {"sigmoid", "l1", "hoyer"}
        The smooth statistic ``s`` (default ``"sigmoid"``).
    tau : float, optional
        Temperature of the sigmoid surrogate (default: 10% of the standard deviation
        of ``|A|`` at ``w*``).
    tolerance : float, optional
        Absolute tolerance σ in units of the surrogate statistic ``s`` (``ρ = k/(2σ²)``).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"sparsity:<site>"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    side : {"two", "upper"}
        ``"upper"``: no denser than ``w*`` (hinge²).
    margin : float
        Slack of the hinge² with ``side="upper"`` (default 0).
    """

    kind = "activation_sparsity"

    def __init__(
        self,
        site: str,
        probes,
        surrogate: str = "sigmoid",
        tau: float | None = None,
        tolerance=None,
        strength=None,
        side: str = "two",
        margin: float = 0.0,
        name=None,
        n_c=None,
    ):
        super().__init__(
            tolerance=tolerance, strength=strength, name=name, n_c=n_c, side=side, margin=margin
        )
        if surrogate not in ("sigmoid", "l1", "hoyer"):
            raise ValueError(f"surrogate must be 'sigmoid', 'l1' or 'hoyer'; got {surrogate!r}")
        if tau is not None and not _is_pos_finite(tau):
            raise ValueError(f"tau must be positive; got {tau!r}")
        self.site, self.probes, self.surrogate, self.tau = site, probes, surrogate, tau

    def _default_name(self):
        return f"sparsity:{self.site}"

    def _prepare(self, post, bound):
        (site,) = resolve_sites(post.lifted.net, [self.site], "ActivationSparsity(site)")
        p = _prepare_probes(post, self.probes, "ActivationSparsity(probes)")
        a = _activation_at_center(post, p, site)
        bound.state["tau"] = float(self.tau) if self.tau is not None else _default_tau(a)
        bound.probes, bound.sites, bound.k = p, [site], 1
        bound.target = self._stat(bound, a).detach()

    def _stat(self, bound, a):
        if self.surrogate == "sigmoid":
            return torch.sigmoid(a / bound.state["tau"]).mean()
        if self.surrogate == "l1":
            return a.abs().mean()
        flat = a.reshape(a.shape[0], -1)
        eps = torch.finfo(a.dtype).eps
        return (flat.abs().sum(1) / (flat.pow(2).sum(1) + eps).sqrt()).mean()

    def _feature(self, bound, view):
        return self._stat(bound, view.activation(bound.probes, bound.sites[0]))

    def _exact(self, bound, view):
        a = view.activation(bound.probes, bound.sites[0])
        return {"fraction_active": (a > 0).to(a.dtype).mean()}

    def _config(self):
        return {"site": self.site, "surrogate": self.surrogate, "tau": self.tau}


class FiringPattern(Constraint):
    """Preserve *which* units fire at ``site`` on ``probes`` (docs/theory.md C5).

    ``z* = 1[A(w*) > 0]``, ``s = sigmoid(A(w)/τ)``; Bernoulli cross-entropy defect
    ``D(w) = (1/k) Σ −[z* log s + (1 − z*) log(1 − s)]`` over the ``k`` probe-unit entries
    (``side="upper"``: only units silent at ``w*`` are penalised for firing — no denser
    than ``w*``). ``D(w*) > 0`` is a constant offset. The exact statistics reported are the
    fraction of entries whose firing matches ``z*`` and the fraction active.

    Parameters
    ----------
    site : str
        Module path whose firing pattern is preserved.
    probes : torch.Tensor
        Probe inputs, shape ``[m, *input_shape]``.
    tau : float, optional
        Sigmoid temperature (default: 10% of the standard deviation of ``|A|`` at
        ``w*``).
    tolerance : float, optional
        Absolute tolerance σ: ``ρ = k/(2σ²)``, so ``ρ D = Σ CE/(2σ²)`` (CE in nats).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"firing:<site>"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    side : {"two", "upper"}
        ``"upper"``: only firing where ``w*`` is silent is penalised (hinge²).
    """

    kind = "firing_pattern"
    family = "bernoulli"

    def __init__(
        self,
        site: str,
        probes,
        tau: float | None = None,
        tolerance=None,
        strength=None,
        side: str = "two",
        name=None,
        n_c=None,
    ):
        super().__init__(tolerance=tolerance, strength=strength, name=name, n_c=n_c, side=side)
        if tau is not None and not _is_pos_finite(tau):
            raise ValueError(f"tau must be positive; got {tau!r}")
        self.site, self.probes, self.tau = site, probes, tau

    def _family(self):
        return "bernoulli"

    def _default_name(self):
        return f"firing:{self.site}"

    def _prepare(self, post, bound):
        (site,) = resolve_sites(post.lifted.net, [self.site], "FiringPattern(site)")
        p = _prepare_probes(post, self.probes, "FiringPattern(probes)")
        a = _activation_at_center(post, p, site)
        bound.state["tau"] = float(self.tau) if self.tau is not None else _default_tau(a)
        bound.probes, bound.sites = p, [site]
        bound.target = (a > 0).to(a.dtype)
        bound.k = a.numel()

    def _feature(self, bound, view):
        return view.activation(bound.probes, bound.sites[0]) / bound.state["tau"]

    def _defect(self, bound, view):
        logits = self._feature(bound, view)
        z = bound.target
        ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, z, reduction="none")
        if self.side == "upper":
            ce = ce * (1 - z)
        return ce.sum() / bound.k

    def _exact(self, bound, view):
        a = view.activation(bound.probes, bound.sites[0])
        fire = (a > 0).to(a.dtype)
        return {
            "pattern_match": (fire == bound.target).to(a.dtype).mean(),
            "fraction_active": fire.mean(),
        }

    def _config(self):
        return {"site": self.site, "tau": self.tau}


def _flat_index(post, names) -> torch.Tensor:
    """Positions of the named lifted parameters in the flat vector w."""
    return torch.cat(
        [torch.arange(post.lifted.slice_of(n).start, post.lifted.slice_of(n).stop) for n in names]
    )


def _lifted_slices(post, params, argname):
    lifted = post.lifted
    try:
        return match_patterns(params, lifted.names, argname)
    except ValueError:
        hits = match_patterns(params, lifted.all_names, argname)
        raise ValueError(
            f"{argname}={params!r} matches only parameters that are not lifted ({hits[:5]}); "
            f"frozen weights cannot move. Lift them with include=..., or pick among the lifted "
            f"parameters: {nearest(str(params), lifted.names)}"
        ) from None


class WeightSparsity(Constraint):
    """Preserve the sparsity of weights (docs/theory.md C6).

    * ``form="zero_pattern"``: ``WeightZeroPattern`` (the recommended, exactly
      linear-Gaussian form; needs ``threshold``).
    * ``form="smoothed_l1"``: scalar ``g(w) = Σ sqrt(w_i² + ε²)``.
    * ``form="smoothed_l0"``: scalar ``g(w) = Σ (1 − exp(−w_i²/(2ε²)))``.

    For the smoothed forms the defect is ``(g(w) − g(w*))²`` (``side="two"``) or
    ``max(0, g(w) − g(w*) − margin)²`` (``side="upper"``: no denser than ``w*``), ``k = 1``.
    The exact count of weights with ``|w_i| < threshold`` (default ε) is reported.

    Parameters
    ----------
    params : str or sequence of str
        Glob patterns over lifted parameter names.
    form : {"smoothed_l1", "smoothed_l0", "zero_pattern"}
        The sparsity statistic (default ``"smoothed_l1"``).
    eps : float
        Smoothing scale ε of the smoothed forms (default 1e-2).
    threshold : float, optional
        Zero threshold; required for ``"zero_pattern"``, otherwise only used for the
        reported count (default ε).
    tolerance : float, optional
        Absolute tolerance σ (``ρ = k/(2σ²)``), in units of ``g`` (weight units for
        ``"zero_pattern"``).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"weight_sparsity:<params>"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    side : {"two", "upper"}
        ``"upper"``: no denser than ``w*`` (smoothed forms) (hinge²).
    margin : float
        Slack of the hinge² with ``side="upper"`` (default 0).
    """

    kind = "weight_sparsity"

    def __init__(
        self,
        params,
        form: str = "smoothed_l1",
        eps: float = 1e-2,
        threshold: float | None = None,
        tolerance=None,
        strength=None,
        side: str = "two",
        margin: float = 0.0,
        name=None,
        n_c=None,
    ):
        if form not in ("zero_pattern", "smoothed_l1", "smoothed_l0"):
            raise ValueError(
                f"form must be 'zero_pattern', 'smoothed_l1' or 'smoothed_l0'; got {form!r}"
            )
        super().__init__(
            tolerance=tolerance, strength=strength, name=name, n_c=n_c, side=side, margin=margin
        )
        if not _is_pos_finite(eps):
            raise ValueError(f"eps must be positive; got {eps!r}")
        if form == "zero_pattern" and threshold is None:
            raise ValueError("WeightSparsity(form='zero_pattern') needs threshold=")
        self.params, self.form, self.eps = params, form, float(eps)
        self.threshold = threshold
        if form == "zero_pattern":
            self._zp = WeightZeroPattern(
                params, threshold, tolerance=tolerance, strength=strength, name=name, n_c=n_c
            )

    def _default_name(self):
        p = self.params if isinstance(self.params, str) else ",".join(self.params)
        return f"weight_sparsity:{p}"

    def _prepare(self, post, bound):
        if self.form == "zero_pattern":
            self._zp._prepare(post, bound)
            return
        names = _lifted_slices(post, self.params, "WeightSparsity(params)")
        idx = _flat_index(post, names)
        bound.state["index"], bound.state["params"] = idx, names
        bound.k = 1
        bound.target = self._g(post.center[idx]).detach()

    def _g(self, w):
        e = self.eps
        if self.form == "smoothed_l1":
            return (w * w + e * e).sqrt().sum()
        return (1 - torch.exp(-w * w / (2 * e * e))).sum()

    def _weights(self, bound, view):
        w = view.flat if view.flat is not None else view._lifted.flatten(view.weights)
        return w[bound.state["index"]]

    def _feature(self, bound, view):
        if self.form == "zero_pattern":
            return self._zp._feature(bound, view)
        return self._g(self._weights(bound, view))

    def _exact(self, bound, view):
        if self.form == "zero_pattern":
            return _zero_pattern_exact(bound, view)
        w = self._weights(bound, view)
        thr = self.threshold if self.threshold is not None else self.eps
        return {"zero_count": (w.abs() < thr).sum().to(w.dtype)}

    def _config(self):
        return {
            "params": self.params,
            "form": self.form,
            "eps": self.eps,
            "threshold": self.threshold,
        }


class LowRank(Constraint):
    """Keep a weight matrix (near) low rank (docs/theory.md C7).

    With ``λ_i`` the eigenvalues of the Gram matrix ``WᵀW`` (or ``WWᵀ``, the smaller),
    i.e. the squared singular values, computed with ``eigvalsh`` (whose backward has no
    ``1/(σ_i² − σ_j²)`` terms, so gradients stay finite at repeated or zero singular
    values):

    * ``"tail_energy"``: ``g = Σ_{i>r} σ_i² = min_{rank ≤ r} ‖W − W_r‖_F²`` (Eckart–Young);
    * ``"nuclear"``: smoothed nuclear norm ``g = Σ_i sqrt(σ_i² + ε²)``;
    * ``"effective_rank"``: ``g = exp H(p)``, ``p_i = s_i/Σ s_j``, ``s_i = sqrt(σ_i² + ε²)``.

    Defect ``(g(w) − g(w*))²`` or, with ``side="upper"`` (no higher rank than ``w*``),
    ``max(0, g(w) − g(w*) − margin)²``; ``k = 1``. The exact numerical rank
    (``σ_i > rtol·σ_max``) is reported per draw.

    Parameters
    ----------
    param : str
        Name of one lifted weight (≥ 2 dims; flattened to ``[out, -1]``).
    rank : int
        Target rank ``r`` of ``"tail_energy"`` (default 1).
    form : {"tail_energy", "nuclear", "effective_rank"}
        The rank statistic ``g`` (default ``"tail_energy"``).
    eps : float
        Smoothing ε of ``"nuclear"`` and ``"effective_rank"`` (default 1e-3).
    rtol : float
        Relative threshold of the reported numerical rank (default 1e-3).
    tolerance : float, optional
        Absolute tolerance σ in units of ``g`` (``ρ = k/(2σ²)``).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"low_rank:<param>"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    side : {"two", "upper"}
        ``"upper"``: no higher rank than ``w*`` (hinge²).
    margin : float
        Slack of the hinge² with ``side="upper"`` (default 0).
    """

    kind = "low_rank"

    def __init__(
        self,
        param: str,
        rank: int = 1,
        form: str = "tail_energy",
        eps: float = 1e-3,
        rtol: float = 1e-3,
        tolerance=None,
        strength=None,
        side: str = "two",
        margin: float = 0.0,
        name=None,
        n_c=None,
    ):
        super().__init__(
            tolerance=tolerance, strength=strength, name=name, n_c=n_c, side=side, margin=margin
        )
        if form not in ("tail_energy", "nuclear", "effective_rank"):
            raise ValueError(
                f"form must be 'tail_energy', 'nuclear' or 'effective_rank'; got {form!r}"
            )
        if int(rank) != rank or rank < 0:
            raise ValueError(f"rank must be a non-negative integer; got {rank!r}")
        self.param, self.rank, self.form = param, int(rank), form
        self.eps, self.rtol = float(eps), float(rtol)

    def _default_name(self):
        return f"low_rank:{self.param}"

    def _prepare(self, post, bound):
        lifted = post.lifted
        if self.param not in lifted.names:
            if self.param in lifted.all_names:
                raise ValueError(
                    f"LowRank(param={self.param!r}) is not lifted; frozen weights cannot move. "
                    f"Lift it with include=..."
                )
            raise ValueError(
                f"LowRank(param={self.param!r}) is not a parameter name; nearest: "
                f"{nearest(self.param, lifted.names)}"
            )
        shape = lifted.shapes[lifted.names.index(self.param)]
        if len(shape) < 2:
            raise ValueError(f"LowRank needs a matrix; {self.param!r} has shape {tuple(shape)}")
        if self.form == "tail_energy" and self.rank >= min(
            shape[0], int(torch.Size(shape[1:]).numel())
        ):
            raise ValueError(
                f"LowRank(rank={self.rank}) ≥ the matrix's smallest dimension {min(shape)}: the "
                f"tail energy is identically zero"
            )
        bound.state["shape"] = tuple(shape)
        bound.k = 1
        bound.target = self._g(
            self._matrix(post.lifted.unflatten(post.center)[self.param])
        ).detach()

    @staticmethod
    def _matrix(W):
        return W.reshape(W.shape[0], -1)

    def _sq_singular(self, M):
        G = M.T @ M if M.shape[0] >= M.shape[1] else M @ M.T
        lam = torch.linalg.eigvalsh(G)  # ascending
        return lam.clamp_min(0.0)

    def _g(self, M):
        lam = self._sq_singular(M)
        if self.form == "tail_energy":
            return lam[: lam.shape[0] - self.rank].sum()
        s = (lam + self.eps**2).sqrt()
        if self.form == "nuclear":
            return s.sum()
        p = s / s.sum()
        return torch.exp(-(p * p.log()).sum())

    def _feature(self, bound, view):
        return self._g(self._matrix(view.weight(self.param)))

    def _exact(self, bound, view):
        M = self._matrix(view.weight(self.param))
        sv = torch.linalg.svdvals(M.detach())
        r = (sv > self.rtol * sv.max()).sum()
        return {"numerical_rank": r.to(M.dtype)}

    def _config(self):
        return {"param": self.param, "rank": self.rank, "form": self.form, "eps": self.eps}


class Quantized(Constraint):
    """Keep weights near a grid ``Δℤ`` (docs/theory.md C8, the sin² surrogate).

    ``D(w) = (1/k) Σ_i (Δ/π)² sin²(π w_i/Δ)``, a smooth stand-in for the squared distance
    to the grid (equal to it to second order near grid points). With ``tolerance=σ``,
    ``ρ D = Σ_i (Δ/π)² sin²(π w_i/Δ)/(2σ²)``. The exact fraction of weights within
    ``Δ/10`` of the grid is reported. ``D(w*) ≠ 0`` unless ``w*`` lies on the grid
    (family ``"grid"``).

    Parameters
    ----------
    params : str or sequence of str
        Glob patterns over lifted parameter names.
    step : float
        Grid spacing Δ > 0.
    tolerance : float, optional
        Absolute tolerance σ in weight units (``ρ = k/(2σ²)``).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"quantized:<params>"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    """

    kind = "quantized"
    family = "grid"

    def __init__(self, params, step: float, tolerance=None, strength=None, name=None, n_c=None):
        super().__init__(tolerance=tolerance, strength=strength, name=name, n_c=n_c)
        if not _is_pos_finite(step):
            raise ValueError(f"Quantized: step must be positive; got {step!r}")
        self.params, self.step = params, float(step)

    def _default_name(self):
        p = self.params if isinstance(self.params, str) else ",".join(self.params)
        return f"quantized:{p}"

    def _prepare(self, post, bound):
        names = _lifted_slices(post, self.params, "Quantized(params)")
        idx = _flat_index(post, names)
        bound.state["index"] = idx
        bound.k = int(idx.numel())
        bound.target = None

    def _feature(self, bound, view):
        w = view.flat if view.flat is not None else view._lifted.flatten(view.weights)
        return w[bound.state["index"]]

    def _defect(self, bound, view):
        w = self._feature(bound, view)
        d = self.step
        return ((d / math.pi) ** 2 * torch.sin(math.pi * w / d) ** 2).sum() / bound.k

    def _exact(self, bound, view):
        w = self._feature(bound, view)
        dist = (w - torch.round(w / self.step) * self.step).abs()
        return {"fraction_on_grid": (dist < self.step / 10).to(w.dtype).mean()}

    def _config(self):
        return {"params": self.params, "step": self.step}


class LossLevel(Constraint):
    """Microcanonical loss level (docs/theory.md C9): ``D(w) = max(0, L_n(w) − L_n(w*) − ε)²``.

    ``k = 1``; with ``tolerance=σ`` (nats), ``ρ D = D/(2σ²)``. Usually choosing ``nβ``
    (the precision-targeted temperature) is the better tool. Always one-sided
    (family ``"hinge"``).

    Parameters
    ----------
    epsilon : float
        Allowed loss rise ε ≥ 0 above ``L_n(w*)``, in nats.
    tolerance : float, optional
        Absolute tolerance σ in nats (``ρ = k/(2σ²)``).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"loss_level"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    """

    kind = "loss_level"

    def __init__(self, epsilon: float, tolerance=None, strength=None, name=None, n_c=None):
        super().__init__(
            tolerance=tolerance, strength=strength, name=name, n_c=n_c, side="upper", margin=0.0
        )
        if not (float(epsilon) >= 0):
            raise ValueError(f"LossLevel: epsilon must be ≥ 0; got {epsilon!r}")
        self.epsilon = float(epsilon)

    def _default_name(self):
        return "loss_level"

    def _prepare(self, post, bound):
        bound.k = 1
        bound.target = torch.tensor(post.loss_center + self.epsilon, dtype=post.dtype)

    def _feature(self, bound, view):
        return view.loss()

    def _config(self):
        return {"epsilon": self.epsilon}


class Feature(Constraint):
    """A user-defined feature ``fn(view) -> tensor`` (Gaussian defect).

    ``view`` is read-only: ``view.activation(probes, site)``, ``view.output(probes)``,
    ``view.weights`` / ``view.weight(name)``, ``view.flat`` and ``view.loss()``.
    ``D(w) = (1/k)‖fn(view_w) − fn(view_{w*})‖²`` (or the hinge² with ``side="upper"``).
    ``fn`` must be differentiable in the lifted weights; it is checked for finite values
    and for depending on at least one lifted weight.

    Parameters
    ----------
    fn : callable
        ``view -> torch.Tensor``, differentiable in the lifted weights.
    tolerance : float, optional
        Absolute tolerance σ in the units of ``fn``'s output (``ρ = k/(2σ²)``).
    strength : float, optional
        Relative strength α in loss units (``ρ = nβ·α·N_c/n``). Give exactly one of
        ``tolerance`` and ``strength``.
    name : str, optional
        Constraint name (default ``"feature:<fn.__name__>"``).
    n_c : int, optional
        ``N_c`` in the relative mode (default ``n``).
    side : {"two", "upper"}
        ``"upper"``: ``fn`` no larger than at ``w*`` (hinge²).
    margin : float
        Slack of the hinge² with ``side="upper"`` (default 0).
    """

    kind = "feature"

    def __init__(
        self,
        fn: Callable,
        tolerance=None,
        strength=None,
        name=None,
        n_c=None,
        side: str = "two",
        margin: float = 0.0,
    ):
        super().__init__(
            tolerance=tolerance, strength=strength, name=name, n_c=n_c, side=side, margin=margin
        )
        if not callable(fn):
            raise TypeError("Feature: fn must be callable (view -> tensor)")
        self.fn = fn

    def _default_name(self):
        return f"feature:{getattr(self.fn, '__name__', 'fn')}"

    def _prepare(self, post, bound):
        with torch.no_grad():
            val = self.fn(post.view(post.center))
        if not isinstance(val, torch.Tensor):
            raise TypeError(f"Feature fn must return a tensor; got {type(val).__name__}")
        if not bool(torch.isfinite(val).all()):
            raise ValueError(f"Feature {bound.name!r}: fn returned non-finite values at w*")
        bound.target = val.detach().clone()
        bound.k = max(int(val.numel()), 1)

    def _feature(self, bound, view):
        return self.fn(view)

    def _config(self):
        return {"fn": getattr(self.fn, "__qualname__", repr(self.fn))}
