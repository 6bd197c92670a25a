"""The one list of inference methods.

Every method ``post.sample(...)`` and ``post.fit(...)`` accept is a row here: its
name, the executors (back-ends) that run it and which one is the default, what kind of
method it is, and the warmup below which the driver warns. The driver, the docs' tables,
``calibrate_step_size`` and the error messages all read this registry; nothing else
lists method names.

A row points to its runner by ``"module:function"`` and is imported only when used, so
registering a JAX method does not import JAX. A runner has the signature
``runner(post, *, method, chains, warmup, draws, seed, progress, **options) ->
SampleResult``; its keyword-only parameters after those are the method's options, which
the driver checks (with "did you mean") before calling it.

Add a method of your own with ``register`` (a runner), or, for a torch kernel written to
the sampler contract (``init(position, ...) -> State``, ``step(key, state, batch=None)
-> (State, Info)``), with ``register_kernel``; then ``post.sample("name")`` runs it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from .._errors import nearest

__all__ = ["Method", "register", "register_kernel", "methods", "get", "runner", "options"]

#: the arguments every runner takes from the driver (not options)
COMMON = ("post", "method", "chains", "warmup", "draws", "seed", "progress")


@dataclass
class Method:
    """One registered method.

    ``backends`` maps an executor name (``"pyro"``, ``"numpyro"``, ``"jax"``,
    ``"torch"``) to its runner (a callable or ``"module:function"``). ``default`` is the
    executor used when the user names none; ``kind`` is ``"mcmc"`` (full-batch, exact),
    ``"sgmcmc"`` (minibatch), or ``"vi"`` (``post.fit``). ``min_warmup``: the driver warns
    below it.
    """

    name: str
    backends: dict[str, Callable | str]
    default: str
    kind: str = "mcmc"
    min_warmup: int = 0
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    backend: str,
    runner: Callable | str,
    *,
    default: bool = False,
    kind: str = "mcmc",
    min_warmup: int = 0,
    description: str = "",
) -> Method:
    """Register ``runner`` as executor ``backend`` of method ``name`` (see the module doc)."""
    name = name.lower()
    if kind not in ("mcmc", "sgmcmc", "vi"):
        raise ValueError(f"kind must be 'mcmc', 'sgmcmc' or 'vi'; got {kind!r}")
    m = _REGISTRY.get(name)
    if m is None:
        m = _REGISTRY[name] = Method(name, {}, backend, kind, min_warmup, description)
    elif m.kind != kind:
        raise ValueError(f"method {name!r} is registered as kind {m.kind!r}, not {kind!r}")
    m.backends[backend] = runner
    if default:
        m.default = backend
    if description:
        m.description = description
    m.min_warmup = max(m.min_warmup, int(min_warmup))
    return m


def register_kernel(
    name: str,
    kernel: Callable | str,
    *,
    description: str = "",
    min_warmup: int = 0,
) -> Method:
    """Register a torch kernel written to the sampler contract as method ``name``.

    ``kernel(post, **options)`` returns an object with ``init(position, key) -> State``
    and ``step(key, state, batch=None) -> (State, Info)`` (NamedTuples; ``State`` has a
    field ``w`` ``[chains, d]``; ``Info`` may carry ``diverging``, ``accept_prob``,
    ``potential`` ``[chains]``); the generic kernel driver (``condpost.infer.driver``)
    runs it with vectorized chains, warmup, thinning, progress and fault handling.
    """
    run = _KernelRunner(kernel)
    return register(
        name,
        "torch",
        run,
        default=True,
        kind="mcmc",
        min_warmup=min_warmup,
        description=description,
    )


class _KernelRunner:
    """The runner of a registered kernel: the generic kernel driver with that kernel.

    Its signature (what the driver checks options against) is the driver's own options
    (``thin``, ``init_jitter``) plus the kernel constructor's, read on first use.
    """

    def __init__(self, kernel: Callable | str):
        self.kernel = kernel

    def _make(self) -> Callable:
        self.kernel = _resolve(self.kernel)
        return self.kernel

    @property
    def __signature__(self) -> inspect.Signature:
        from .driver import run_kernel

        kw = inspect.Parameter.KEYWORD_ONLY
        params = [inspect.Parameter(a, kw) for a in COMMON[1:]]
        skip = {"post", "make", "options", *COMMON}
        for src in (run_kernel, self._make()):
            for p in inspect.signature(src).parameters.values():
                if p.name not in skip and p.kind in (kw, p.POSITIONAL_OR_KEYWORD):
                    params.append(inspect.Parameter(p.name, kw, default=p.default))
                    skip.add(p.name)
        return inspect.Signature(params)

    def __call__(self, post, **kw):
        from .driver import run_kernel

        return run_kernel(post, self._make(), **kw)


def _resolve(ref: Callable | str) -> Callable:
    if callable(ref):
        return ref
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


def methods(kind: str | None = None) -> list[str]:
    """Registered method names (of one ``kind``, if given), in registration order."""
    return [m.name for m in _REGISTRY.values() if kind is None or m.kind == kind]


def get(name: str, *, kind: str | tuple[str, ...] = ("mcmc", "sgmcmc")) -> Method:
    """The registered method ``name``; a ``ValueError`` with the nearest names if unknown."""
    kinds = (kind,) if isinstance(kind, str) else kind
    key = str(name).lower()
    m = _REGISTRY.get(key)
    if m is None or m.kind not in kinds:
        known = [n for k in kinds for n in methods(k)]
        near = nearest(key, known, 1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        extra = ""
        if m is not None and m.kind == "vi":
            extra = f" {name!r} is a variational method: use post.fit({name!r})."
        elif m is not None:
            extra = f" {name!r} is a sampler: use post.sample({name!r})."
        raise ValueError(f"method={name!r} is not available{hint}; choose one of {known}.{extra}")
    return m


def runner(m: Method, backend: str) -> Callable:
    """The runner of method ``m`` on executor ``backend`` (imported on first use)."""
    if backend not in m.backends:
        raise ValueError(
            f"backend={backend!r} is not available for method={m.name!r}; choose one of "
            f"{sorted(m.backends)} (pass backend={m.default!r}, or leave it unset)"
        )
    fn = _resolve(m.backends[backend])
    m.backends[backend] = fn
    return fn


def options(fn: Callable) -> tuple[list[str], bool]:
    """A runner's option names (keyword parameters beyond the common ones) and whether it
    takes arbitrary ``**options``."""
    sig = inspect.signature(fn)
    names, var = [], False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var = True
        elif p.name not in COMMON and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return names, var


# ----------------------------------------------------------------------------- the table
_P = "condpost.infer"
register(
    "nuts",
    "numpyro",
    f"{_P}.numpyro:run_numpyro_mcmc",
    default=True,
    min_warmup=50,
    description="No-U-Turn HMC, full batch",
)
register("nuts", "pyro", f"{_P}.nuts:run_pyro_mcmc", min_warmup=50)
register(
    "hmc",
    "numpyro",
    f"{_P}.numpyro:run_numpyro_mcmc",
    default=True,
    min_warmup=50,
    description="static-length HMC, full batch",
)
register("hmc", "pyro", f"{_P}.nuts:run_pyro_mcmc", min_warmup=50)
register(
    "chees",
    "jax",
    f"{_P}.chees:run_chees",
    default=True,
    min_warmup=100,
    description="many-chain ChEES-HMC on the JAX export",
)
for _m, _d in (
    ("sgld", "stochastic-gradient Langevin"),
    ("rmsprop_sgld", "RMSProp-preconditioned SGLD"),
    ("sghmc", "stochastic-gradient HMC"),
    ("sgnht", "stochastic-gradient Nosé–Hoover thermostat"),
):
    register(_m, "torch", f"{_P}.sgmcmc:run_sgmcmc", default=True, kind="sgmcmc", description=_d)
register_kernel(
    "mala",
    f"{_P}.mala:MALA",
    min_warmup=50,
    description="Metropolis-adjusted Langevin, full batch, vectorized chains",
)
register(
    "svi",
    "pyro",
    f"{_P}.svi:run_svi",
    default=True,
    kind="vi",
    description="Gaussian variational inference",
)
register("svi", "numpyro", f"{_P}.numpyro_svi:run_numpyro_svi", kind="vi")
