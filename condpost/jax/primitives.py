"""NumPyro-facing primitives: ``lift``, ``temper``, ``preserve``, ``capture``/``site``,
``init_to_center``.

They mirror ``condpost.primitives`` (the Pyro side) statement for statement, so a
model written with them has the log joint

.. math::

    \\log p(w, y) = \\sum_{\\text{lifted}} \\log N(w_j \\mid w^*_j, \\gamma^{-1})
      + \\beta \\sum_i \\log p(y_i \\mid x_i, w) - \\sum_c \\rho_c D_c(w),
    \\qquad \\beta = n\\beta / n,

i.e. ``−U(w)`` of docs/theory.md §1.2 plus the local prior's normaliser ``(d/2) log(γ/2π)``.
Each primitive is an ordinary ``numpyro.sample`` statement or a small
``numpyro.primitives.Messenger``, so they compose with NumPyro's handlers (``trace``,
``substitute``, ``condition``, ``block``, ``seed``, ``scale``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.distribution import Unit
from numpyro.infer.initialization import init_to_median
from numpyro.primitives import Messenger, apply_stack

from .._errors import match_patterns, nearest
from ..primitives import check_localization, resolve_nbeta

__all__ = [
    "lift",
    "temper",
    "preserve",
    "capture",
    "site",
    "site_names",
    "init_to_center",
    "TemperMessenger",
]

_CONSTRAINT_KEY = "condpost_constraint"
_CENTER_KEY = "condpost_center"
_SITE_TYPE = "condpost_site"


# ---------------------------------------------------------------------------- lift
def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k).strip(".[]'\"")


def _path_name(path) -> str:
    return ".".join(_key_name(k) for k in path)


def _is_float_array(x) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.floating)


def site_names(params) -> list[str]:
    """Dotted names of the floating-point array leaves of a pytree (the liftable ones).

    Dict keys, attribute names and sequence indices are joined with ``"."``, like
    ``torch.nn.Module.named_parameters()``: ``{"layers": [{"weight": ...}]}`` gives
    ``"layers.0.weight"``; an Equinox ``MLP`` gives ``"layers.0.weight"`` too.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [_path_name(p) for p, leaf in leaves if _is_float_array(leaf)]


def lift(
    name: str,
    params,
    *,
    localization: float,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    center=None,
):
    """Put sample sites ``"<name>.<path>"`` on the lifted leaves of a parameter pytree.

    Each selected leaf gets the local prior ``Normal(w*, γ^{-1/2})`` with the leaf's
    shape as event shape, where ``w*`` is the leaf's value in ``center`` (default:
    ``params`` itself). Other leaves (frozen parameters, integer buffers, functions in
    an Equinox module) stay constants.

    Parameters
    ----------
    name : str
        Prefix of the sample sites.
    params : pytree
        The trained parameters ``w*`` (dict of arrays, Equinox module, Flax params...).
    localization : float
        γ > 0, the precision of the local prior.
    include, exclude : str or sequence of str, optional
        Glob patterns over the dotted leaf names (see ``site_names``), exact names or
        prefixes (``"layers.1"`` selects everything below it). Default: every floating
        leaf.
    center : pytree, optional
        ``w*`` with the same structure as ``params`` (default: ``params``).

    Returns
    -------
    pytree
        ``params`` with the lifted leaves replaced by the sampled values; pass it to
        your forward function.
    """
    if not isinstance(name, str):
        raise TypeError(f"lift: name must be a str (the site prefix); got {type(name).__name__}")
    gamma = check_localization(localization)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_path_name(p) for p, _ in flat]
    liftable = [n for n, (_, leaf) in zip(names, flat, strict=True) if _is_float_array(leaf)]
    if not liftable:
        raise ValueError(
            "lift: params has no floating-point array leaves to lift; pass the parameter "
            "pytree (e.g. a dict of arrays or an Equinox module)"
        )
    selected = match_patterns(include, liftable, "include")
    if exclude is not None:
        dropped = set(match_patterns(exclude, liftable, "exclude"))
        selected = [n for n in selected if n not in dropped]
    if not selected:
        raise ValueError(f"include/exclude select no parameters; liftable leaves: {liftable[:10]}")
    if center is None:
        centers = [leaf for _, leaf in flat]
    else:
        cflat, ctree = jax.tree_util.tree_flatten_with_path(center)
        if ctree != treedef:
            raise ValueError(
                "lift: center must have the same pytree structure as params; got "
                f"{ctree} vs {treedef}"
            )
        centers = [leaf for _, leaf in cflat]
    chosen = set(selected)
    scale = gamma**-0.5
    out = []
    for nm, (_, leaf), c in zip(names, flat, centers, strict=True):
        if nm not in chosen:
            out.append(leaf)
            continue
        c = jnp.asarray(c)
        if c.shape != jnp.shape(leaf):
            raise ValueError(
                f"lift: center leaf {nm!r} has shape {c.shape}; params has {jnp.shape(leaf)}"
            )
        site_name = f"{name}.{nm}" if nm else name
        out.append(
            numpyro.sample(
                site_name,
                dist.Normal(c, jnp.full_like(c, scale)).to_event(c.ndim),
                infer={_CENTER_KEY: c},
            )
        )
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------- temper
class TemperMessenger(Messenger):
    """Scale the log-likelihood of *observed* sites by ``β = nβ/n``, and nothing else.

    Unlike ``numpyro.handlers.scale``, latent sites (the local prior from ``lift``) and
    the ``constraint/*`` factor sites made by ``preserve`` are left unscaled even inside
    the context. Other observed sites, including a plain ``numpyro.factor``, are
    scaled (as on the Pyro side).
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def process_message(self, msg) -> None:
        if msg["type"] != "sample" or not msg.get("is_observed"):
            return
        if (msg.get("infer") or {}).get(_CONSTRAINT_KEY, False):
            return
        msg["scale"] = self.scale if msg.get("scale") is None else self.scale * msg["scale"]


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
    if int(n) != n or n <= 0:
        raise ValueError(f"temper: n must be a positive integer; got {n!r}")
    n = int(n)
    return TemperMessenger(resolve_nbeta(nbeta, n) / n)


# ---------------------------------------------------------------------------- preserve
def preserve(
    name: str,
    value=None,
    target=None,
    *,
    tolerance: float | None = None,
    strength: float | None = None,
    nbeta: float | None = None,
    log_factor=None,
):
    """Add the soft constraint factor site ``"constraint/<name>"``.

    Gaussian defect ``D = mean((value − target)²)`` over the ``k`` entries, with

    * ``tolerance=σ``: log-factor ``−‖value − target‖²/(2σ²)`` (``ρ = k/(2σ²)``);
    * ``strength=α`` and ``nbeta``: log-factor ``−nβ·α·D`` (relative mode, ``N_c = n``);
    * or a ready ``log_factor`` (``−ρ D`` of any defect family).

    The site is never scaled by ``temper``. Returns the log-factor.
    """
    if log_factor is None:
        if value is None or target is None:
            raise ValueError("preserve needs value= and target=, or a log_factor=")
        if (tolerance is None) == (strength is None):
            raise ValueError("preserve: give exactly one of tolerance= or strength=")
        value, target = jnp.asarray(value), jnp.asarray(target)
        if jnp.shape(value) != jnp.shape(target):
            raise ValueError(
                f"preserve: value has shape {jnp.shape(value)} but target has "
                f"{jnp.shape(target)}; they must match"
            )
        diff = value - target
        if tolerance is not None:
            if not tolerance > 0:
                raise ValueError(f"preserve: tolerance must be positive; got {tolerance!r}")
            log_factor = -jnp.sum(diff * diff) / (2.0 * float(tolerance) ** 2)
        else:
            if nbeta is None:
                raise ValueError("preserve(strength=α) needs nbeta= (ρ = nβ·α)")
            if not strength > 0:
                raise ValueError(f"preserve: strength must be positive; got {strength!r}")
            log_factor = -float(nbeta) * float(strength) * jnp.mean(diff * diff)
    log_factor = jnp.asarray(log_factor)
    unit = Unit(log_factor)
    numpyro.sample(
        f"constraint/{name}",
        unit,
        obs=unit.sample(None),
        infer={"is_auxiliary": True, _CONSTRAINT_KEY: True},
    )
    return log_factor


# ---------------------------------------------------------------------------- capture
def site(name: str, value):
    """Mark ``value`` as the activation of site ``name`` and return it unchanged.

    Call it inside your forward function (``h = site("layers.1", h)``); a surrounding
    ``capture`` records it. Outside any ``capture`` it is the identity and adds
    nothing to NumPyro traces' sample sites.
    """
    from numpyro.primitives import _PYRO_STACK

    if not _PYRO_STACK:
        return value
    msg = {
        "type": _SITE_TYPE,
        "name": f"condpost/site/{name}",
        _SITE_TYPE: name,
        "fn": lambda v: v,
        "args": (value,),
        "kwargs": {},
        "value": value,
        "cond_indep_stack": [],
    }
    return apply_stack(msg)["value"]


class _Capture(Messenger):
    def __init__(self, sites: list[str], store: dict) -> None:
        super().__init__()
        self.sites = sites
        self.store = store
        self.seen: list[str] = []

    def process_message(self, msg) -> None:
        nm = None
        if msg["type"] == _SITE_TYPE:
            nm = msg[_SITE_TYPE]
        elif msg["type"] == "deterministic":
            nm = msg["name"]
        if nm is None:
            return
        if nm not in self.seen:
            self.seen.append(nm)
        if nm in self.sites:
            self.store[nm] = msg["value"]


@contextlib.contextmanager
def capture(sites: str | Sequence[str]) -> Iterator[dict]:
    """Record the values of ``sites`` marked with ``site(...)`` (or ``numpyro.deterministic``).

    Yields a dict ``site → array`` filled by the calls inside the context (the last
    call wins, as on the Pyro side). When the block finishes without an error, every
    requested site must have been seen; otherwise a ``ValueError`` lists the sites that
    were.
    """
    if isinstance(sites, str):
        sites = [sites]
    sites = list(sites)
    for s in sites:
        if not isinstance(s, str):
            raise TypeError(f"capture: sites must be strings; got {type(s).__name__}")
    store: dict = {}
    handler = _Capture(sites, store)
    with handler:
        yield store
    missing = [s for s in sites if s not in store]
    if missing:
        hint = (
            f"Sites seen: {handler.seen[:10]} (nearest to {missing[0]!r}: "
            f"{nearest(missing[0], handler.seen)})."
            if handler.seen
            else "No site was marked: call condpost.jax.site(name, value) in the forward pass."
        )
        raise ValueError(f"capture: site(s) {missing} were not produced inside the block. {hint}")


# ---------------------------------------------------------------------------- init
def init_to_center(site=None, *, fallback: Callable | None = init_to_median):  # noqa: F811
    """NumPyro init strategy: sites made by ``lift`` start at ``w*``.

    Use as ``NUTS(model, init_strategy=init_to_center)``. Other latent sites use
    ``fallback`` (default ``init_to_median``; ``None`` raises for them).
    """
    if site is None:
        return partial(init_to_center, fallback=fallback)
    if site["type"] == "sample" and not site.get("is_observed"):
        c = (site.get("infer") or {}).get(_CENTER_KEY)
        if c is not None:
            return c
        if fallback is None:
            raise ValueError(f"init_to_center: site {site['name']!r} was not made by lift")
    if fallback is None:
        return None
    return fallback(site)
