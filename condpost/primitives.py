"""Pyro-facing primitives: ``lift``, ``temper``, ``preserve``, ``capture``, ``init_to_center``.

They compose with Pyro's own handlers (``trace``, ``condition``, ``block``, ``scale``,
``substitute``) because each is an ordinary sample/factor statement or a small
``pyro.poutine.messenger.Messenger`` that does one job.

Example
-------
>>> import math, torch, pyro, pyro.distributions as dist
>>> import condpost as cp
>>> net = torch.nn.Linear(3, 2).double()
>>> x, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 2, dtype=torch.float64)
>>> def model():
...     f = cp.lift("net", net, localization=1.0)
...     out = f(x)
...     with cp.temper(nbeta="wbic", n=50), pyro.plate("data", 50):
...         pyro.sample("y", dist.Normal(out, 0.5).to_event(1), obs=y)
>>> tr = pyro.poutine.trace(model).get_trace()
>>> sorted(n for n in tr.nodes if n.startswith("net."))
['net.bias', 'net.weight']
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.messenger import Messenger
from torch import nn

from .lifting import LiftedNetwork, capture_hooks, resolve_sites

__all__ = [
    "lift",
    "temper",
    "preserve",
    "capture",
    "init_to_center",
    "LiftedFunction",
    "TemperMessenger",
    "resolve_nbeta",
    "check_localization",
]

_CONSTRAINT_KEY = "condpost_constraint"
_CENTER_KEY = "condpost_center"


def resolve_nbeta(nbeta, n: int | None, argname: str = "nbeta") -> float:
    """``"wbic"`` → ``n/log n``; a positive finite number → itself; anything else → error."""
    if isinstance(nbeta, str):
        if nbeta != "wbic":
            raise ValueError(
                f"{argname} must be 'wbic' (n/log n) or a positive number; got {nbeta!r}"
            )
        if n is None:
            raise ValueError(f"{argname}='wbic' needs the sample size n")
        if n < 2:
            raise ValueError(f"{argname}='wbic' (n/log n) needs n ≥ 2; got n={n}")
        return n / math.log(n)
    try:
        v = float(nbeta)
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be 'wbic' or a positive number; got {nbeta!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(
            f"{argname} (nβ, the inverse temperature times n) must be positive and finite; got "
            f"{nbeta!r}. Use 'wbic' for the default n/log n."
        )
    return v


def check_localization(localization) -> float:
    try:
        g = float(localization)
    except (TypeError, ValueError):
        raise TypeError(
            f"localization (γ) must be a positive number; got {localization!r}"
        ) from None
    if not (g > 0 and math.isfinite(g)):
        raise ValueError(
            f"localization (γ, the precision of the local prior N(w*, γ⁻¹I)) must be positive and "
            f"finite; got {localization!r}. γ = 0 is not local: the chain can leave the basin of "
            f"w*. Start with localization=1.0 and check that λ̂ is stable over a decade of γ."
        )
    return g


class LiftedFunction:
    """The network with its lifted parameters bound to sampled values.

    Calling it runs the functional forward pass. It is returned by ``lift``.
    """

    def __init__(
        self,
        name: str,
        lifted: LiftedNetwork,
        params: dict[str, torch.Tensor],
        scale: float = 1.0,
    ) -> None:
        self.name = name
        self.lifted = lifted
        self.params = params
        self.scale = scale
        self._capture: list[tuple[list[str], dict]] = []

    @property
    def net(self) -> nn.Module:
        return self.lifted.net

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network with the sampled weights.

        Weights with leading batch dims (``Predictive(parallel=True)``, vectorized ELBO
        particles) give an output of shape ``[*batch, *output shape]`` (``torch.func.vmap``
        over the batch; Pyro's singleton plate padding is dropped).
        """
        sites: list[str] = []
        for s, _ in self._capture:
            sites.extend(t for t in s if t not in sites)
        out, acts = self.lifted.call(self.params, x, sites)
        for site in sites:
            dep = _site_depends_on_lifted(self.lifted, site, x, self.scale)
            if dep is not True:
                # cp.preserve on this activation raises (no autograd path) or warns (zero
                # gradient), like the declarative API
                acts[site]._condpost_unaffected = (self.name, site, dep)  # type: ignore[attr-defined]
        for s, store in self._capture:
            store.update({k: acts[k] for k in s})
        return out

    def flat(self) -> torch.Tensor:
        """The lifted parameters as one flat vector (``[*batch, d]`` when batched)."""
        return self.lifted.flatten(self.params)


def _site_depends_on_lifted(lifted: LiftedNetwork, site: str, x, scale: float):
    """Whether the activation at ``site`` depends on the lifted weights (cached per network).

    True when its gradient with respect to the lifted vector is non-zero at ``w*`` or at
    a random point at the prior's scale, on up to 64 rows of ``x``; ``"structural"`` when
    there is no autograd path, ``"zero"`` when the gradient is zero at both points.
    """
    if not isinstance(x, torch.Tensor):
        return True
    key = (site, tuple(x.shape[1:]), x.dtype, scale)
    cache = lifted.__dict__.setdefault("_site_dependence", {})
    hit = cache.get(key)
    if hit is not None:
        return hit
    xs = x[:64] if x.dim() > 0 else x
    gen = torch.Generator().manual_seed(0)
    c = lifted.center
    noise = torch.randn(c.shape, generator=gen, dtype=c.dtype).to(c.device)
    dep: bool | str = "zero"
    for w0 in (c, c + scale * noise):
        w = w0.detach().clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                _, acts = lifted.call(lifted.unflatten(w), xs, [site])
                a = acts[site]
                if not a.requires_grad:
                    dep = "structural"
                    break
                r = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(a)
                (g,) = torch.autograd.grad((a * r).sum(), w, allow_unused=True)
        except Exception:  # noqa: BLE001 - the check must never break a working model
            dep = True
            break
        if g is None:
            dep = "structural"
            break
        if bool((g != 0).any()):
            dep = True
            break
    cache[key] = dep
    return dep


_LIFT_CACHE: dict[tuple, LiftedNetwork] = {}


def _lifted_for(net, include, exclude, dtype, center) -> LiftedNetwork:
    if isinstance(net, LiftedNetwork):
        return net
    if center is not None:
        return LiftedNetwork(net, include, exclude, dtype, center)

    def norm(p):
        return None if p is None else ((p,) if isinstance(p, str) else tuple(p))

    state = tuple((p.data_ptr(), p._version) for p in net.parameters())
    key = (id(net), norm(include), norm(exclude), dtype, state)
    hit = _LIFT_CACHE.get(key)
    if hit is None or hit.net is not net:
        if len(_LIFT_CACHE) > 64:
            _LIFT_CACHE.clear()
        hit = _LIFT_CACHE[key] = LiftedNetwork(net, include, exclude, dtype, None)
    return hit


def lift(
    name: str,
    net: nn.Module | LiftedNetwork,
    *,
    localization: float,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    center=None,
    dtype: torch.dtype | None = None,
) -> LiftedFunction:
    """Put sample sites ``"<name>.<param>"`` on the lifted parameters of ``net``.

    Each site has the local prior ``Normal(w*, γ^{-1/2})`` (event dims = the
    parameter's shape), centred at the module's current weights ``w*``. Frozen
    parameters stay constants (never ``pyro.param`` sites, so SVI cannot train them).
    The module itself is not modified.

    Parameters
    ----------
    name : str
        Prefix of the sample sites.
    net : torch.nn.Module
        The trained network.
    localization : float
        γ > 0, the precision of the local prior.
    include, exclude : str or sequence of str, optional
        Glob patterns over ``net.named_parameters()`` names (or module paths) selecting
        the lifted parameters (default: all); the others stay constants at ``w*``.
    center : tensor or mapping, optional
        Override for ``w*`` (default: the module's current weights).
    dtype : torch.dtype, optional
        Dtype of the lifted weights (default: the network's).

    Returns
    -------
    LiftedFunction
        Call it on inputs to run the network with the sampled weights.
    """
    gamma = check_localization(localization)
    lifted = _lifted_for(net, include, exclude, dtype, center)
    scale = gamma**-0.5
    params = {}
    for pname, c in lifted.named_center().items():
        params[pname] = pyro.sample(
            f"{name}.{pname}",
            dist.Normal(c, torch.full_like(c, scale)).to_event(c.dim()),
            infer={_CENTER_KEY: c},
        )
    return LiftedFunction(name, lifted, params, scale)


class TemperMessenger(Messenger):
    """Scale the log-likelihood of *observed* sites by ``β = nβ/n``, and nothing else.

    Unlike ``pyro.poutine.scale``, latent sites (the local prior) and
    ``constraint/*`` factor sites made by ``preserve`` are left unscaled even when
    they sit inside the context, so the target is exactly
    ``exp(−nβ L_n(w) − γ/2‖w − w*‖² − Σ ρ_c D_c)``.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"]:
            return
        if msg["infer"].get(_CONSTRAINT_KEY, False):
            return
        msg["scale"] = self.scale * msg["scale"]


def temper(nbeta="wbic", n: int | None = None) -> TemperMessenger:
    """Context that tempers the likelihood: observed sites are scaled by ``nβ/n``.

    Parameters
    ----------
    nbeta : float or "wbic"
        nβ; ``"wbic"`` means ``n/log n``.
    n : int
        Number of samples defining ``L_n`` (required: β = nβ/n).
    """
    if n is None:
        raise ValueError(
            "temper needs n, the number of samples in the likelihood: it scales the summed "
            "log-likelihood by β = nβ/n"
        )
    n = int(n)
    if n <= 0:
        raise ValueError(f"temper: n must be a positive integer; got {n}")
    return TemperMessenger(resolve_nbeta(nbeta, n) / n)


def preserve(
    name: str,
    value: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    tolerance: float | None = None,
    strength: float | None = None,
    nbeta: float | None = None,
    log_factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add the soft constraint factor site ``"constraint/<name>"``.

    Gaussian defect ``D = mean((value − target)²)`` over the ``k`` entries, with

    * ``tolerance=σ``: log-factor ``−‖value − target‖²/(2σ²)`` (``ρ = k/(2σ²)``);
    * ``strength=α`` and ``nbeta``: log-factor ``−nβ·α·D`` (relative mode, ``N_c = n``);
    * or a ready ``log_factor`` (``−ρ D`` of any defect family).

    The site is never scaled by ``temper``. Returns the log-factor.

    A ``value`` with more dims than ``target`` (lifted weights with batch dims, as under
    ``Predictive(parallel=True)`` or vectorized ELBO particles) gives one log-factor per
    batch element, placed on the outermost enclosing plate of that size.

    Raises ``ValueError`` when ``value`` does not depend on any weight lifted by
    ``cp.lift`` (an activation captured at a site upstream of every lifted weight, or a
    constant while the lifted weights are being differentiated): such a factor is a
    constant and cannot change the posterior.
    """
    if log_factor is None:
        if value is None or target is None:
            raise ValueError("preserve needs value= and target=, or a log_factor=")
        if (tolerance is None) == (strength is None):
            raise ValueError("preserve: give exactly one of tolerance= or strength=")
        _check_value_depends(name, value)
        diff = value - target
        dims = _event_dims(value, target)
        if tolerance is not None:
            if not tolerance > 0:
                raise ValueError(f"preserve: tolerance must be positive; got {tolerance!r}")
            denom = 2.0 * float(tolerance) ** 2
            if not (denom > 0 and math.isfinite(1.0 / denom)):
                raise ValueError(
                    f"preserve({name!r}): tolerance={tolerance!r} is too small to represent "
                    f"(1/(2σ²) overflows); use a tolerance of at least 1e-150, and in practice "
                    f"one the sampler can resolve (see the Constraints page)"
                )
            log_factor = -_reduce(diff * diff, dims, "sum") / denom
        else:
            if nbeta is None:
                raise ValueError("preserve(strength=α) needs nbeta= (ρ = nβ·α)")
            if not strength > 0:
                raise ValueError(f"preserve: strength must be positive; got {strength!r}")
            log_factor = -float(nbeta) * float(strength) * _reduce(diff * diff, dims, "mean")
        log_factor = _align_to_plate(log_factor)
    unit = dist.Unit(log_factor)
    pyro.sample(
        f"constraint/{name}",
        unit,
        obs=unit.sample(),
        infer={"is_auxiliary": True, _CONSTRAINT_KEY: True},
    )
    return log_factor


def _event_dims(value, target):
    """The trailing dims of ``value`` that ``target`` describes; None means all of them."""
    if (
        isinstance(value, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and target.dim() >= 1
        and value.dim() > target.dim()
    ):
        return tuple(range(-target.dim(), 0))
    return None


def _reduce(t: torch.Tensor, dims, how: str) -> torch.Tensor:
    if dims is None:
        return t.sum() if how == "sum" else t.mean()
    return t.sum(dims) if how == "sum" else t.mean(dims)


def _align_to_plate(lf):
    """Put a ``[S]`` log-factor on the outermost enclosing plate of size ``S``.

    Pyro's vectorizing plates (``Predictive(parallel=True)``, vectorized ELBO particles)
    sit at ``dim = −max_plate_nesting − 1``; a factor of shape ``[S]`` must be shaped
    ``[S, 1, ..., 1]`` to line up with it (else the plate broadcasts it to ``[S, S]``).
    """
    if not isinstance(lf, torch.Tensor) or lf.dim() != 1:
        return lf
    from pyro.poutine.indep_messenger import IndepMessenger
    from pyro.poutine.runtime import _PYRO_STACK

    dims = [
        m.dim
        for m in _PYRO_STACK
        if isinstance(m, IndepMessenger) and m.dim is not None and m.size == lf.shape[0]
    ]
    if not dims:
        return lf
    dim = min(dims)
    return lf.reshape((lf.shape[0],) + (1,) * (-dim - 1))


def _check_value_depends(name: str, value) -> None:
    """Raise when the preserved ``value`` cannot depend on the lifted weights."""
    src = getattr(value, "_condpost_unaffected", None)
    reason = None
    if src is not None:
        lname, site, kind = src
        if kind == "zero":
            from ._errors import ConstraintWarning, warn

            warn(
                f"cp.preserve({name!r}): the activation at site {site!r} has zero gradient "
                f"with respect to the weights lifted by cp.lift({lname!r}, ...) at w* and "
                f"nearby (e.g. every unit dead on these inputs), so this factor may not change "
                f"the posterior.",
                ConstraintWarning,
            )
            return
        reason = (
            f"the activation at site {site!r} does not depend on any weight lifted by "
            f"cp.lift({lname!r}, ...) (no gradient path from the lifted weights to it)"
        )
    elif isinstance(value, torch.Tensor) and not value.requires_grad:
        from pyro.poutine.runtime import _PYRO_STACK
        from pyro.poutine.trace_messenger import TraceMessenger

        for m in _PYRO_STACK:
            if not isinstance(m, TraceMessenger):
                continue
            lifted = [
                k
                for k, site in m.trace.nodes.items()
                if site.get("type") == "sample"
                and _CENTER_KEY in (site.get("infer") or {})
                and isinstance(site.get("value"), torch.Tensor)
                and site["value"].requires_grad
            ]
            if lifted:
                reason = (
                    f"value does not depend on any lifted weight: the lifted sites "
                    f"{lifted[:4]} are being differentiated but value has no gradient path "
                    f"to them"
                )
                break
    if reason is not None:
        raise ValueError(
            f"cp.preserve({name!r}): {reason}, so the factor constraint/{name} is a constant "
            f"and cannot change the posterior; the declarative API refuses it the same way "
            f'("does not depend on any lifted parameter"). Preserve an activation downstream '
            f"of the lifted weights, or lift parameters that feed this site (include=...)."
        )


@contextlib.contextmanager
def capture(f: LiftedFunction | nn.Module, sites: str | Sequence[str]) -> Iterator[dict]:
    """Record the outputs of ``sites`` (module paths) during calls inside the context.

    Works on a ``LiftedFunction`` from ``lift`` or on a plain module (for
    example to compute targets at ``w*``). Yields a dict ``site → tensor`` filled by
    the last call.
    """
    net = f.net if isinstance(f, LiftedFunction) else f
    if not isinstance(net, nn.Module):
        raise TypeError(f"capture needs a lifted function or an nn.Module; got {type(f).__name__}")
    sites = resolve_sites(net, sites)
    store: dict[str, torch.Tensor] = {}
    if isinstance(f, LiftedFunction):
        entry = (sites, store)
        f._capture.append(entry)
        try:
            yield store
        finally:
            f._capture.remove(entry)
    else:
        with capture_hooks(net, sites, store):
            yield store


def init_to_center(net=None, *, fallback: Callable | None = init_to_median):
    """Pyro init strategy: lifted sites start at (a clone of) ``w*``.

    Sites created by ``lift`` carry their centre; other sites use ``fallback``.
    Values are cloned, so optimisers can never write into ``w*``. The optional
    ``net`` argument is accepted for readability (``init_to_center(net)``).
    """

    def init(site):
        c = site["infer"].get(_CENTER_KEY)
        if c is not None:
            return c.detach().clone()
        if fallback is None:
            raise ValueError(f"init_to_center: site {site['name']!r} was not made by cp.lift")
        return fallback(site)

    return init
