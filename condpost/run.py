"""The one driver behind ``LocalPosterior.sample``: from a method name to a ``SampleResult``.

For every method and executor it

1. finds the method in the registry (``condpost.infer.registry``), with "did you mean"
   for a misspelt name, and picks the executor: the method's default, except that
   NUTS/HMC use NumPyro on the JAX export when the model exports and Pyro otherwise
   (with a one-line note saying why);
2. checks the counts (``chains``, ``warmup``, ``draws``) and every option against the
   runner's signature, naming the nearest valid option for an unknown one;
3. warns once when warmup is shorter than the method needs;
4. runs torch executors with the fastest intra-op thread count for the model (one
   thread is often several times faster for a small network on a busy CPU), restoring
   the user's setting afterwards; ``num_threads=`` overrides;
5. calls the runner, which returns a ``SampleResult`` (draws, the statistics it
   measured, settings, and a fault if it stopped early);
6. records the executor, the thread count and the note in the settings, and warns once
   about divergent transitions.

``LocalPosterior.sample`` then builds the ``ReferenceClass`` from the result, computing
only the statistics the sampler did not.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._errors import SamplerWarning, check_options, warn
from ._threads import fastest_threads
from .infer import registry
from .infer.base import SampleResult

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior

__all__ = ["sample", "pick_backend"]

_TORCH = ("pyro", "torch")


def _count(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) or int(v) != v or v < lo:
        raise ValueError(f"{name} must be an integer ≥ {lo}; got {v!r}")
    return int(v)


def pick_backend(post: LocalPosterior, m: registry.Method, backend: str | None):
    """``(backend, note)``: the executor to use and, when it is not the user's or the
    method's first choice, a one-line reason."""
    if backend is not None:
        backend = str(backend).lower()
        if backend == "jax" and "jax" not in m.backends and "numpyro" in m.backends:
            backend = "numpyro"
        if backend == "torch" and "torch" not in m.backends and "pyro" in m.backends:
            backend = "pyro"
        registry.runner(m, backend)  # validates the name
        return backend, None
    backend = m.default
    if backend == "numpyro" and "pyro" in m.backends:
        reason = _export_problem(post)
        if reason is not None:
            return "pyro", (
                f"{m.name}: running on Pyro, not NumPyro, because {reason}. Pass "
                f"backend='pyro' to choose it explicitly."
            )
    return backend, None


def _export_problem(post: LocalPosterior) -> str | None:
    """None if the posterior exports to JAX (cached), else why not in a few words."""
    if post.device.type != "cpu":
        return f"the posterior lives on {post.device} and the JAX export reads CPU tensors"
    try:
        from .infer.numpyro import cached_export
    except ImportError as e:  # pragma: no cover - jax is a core dependency
        return f"JAX/NumPyro are not importable ({e})"
    # a failed export is remembered on the declaration (a success is cached by the export)
    key = (tuple(id(b) for b in post.constraints), float(post.nbeta), float(post.localization))
    memo = post.__dict__.get("_condpost_export_problem")
    if memo is not None and memo[0] == key:
        return memo[1]
    try:
        cached_export(post)
    except (NotImplementedError, ImportError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = f"the model does not export to JAX ({first[:160]})"
        post.__dict__["_condpost_export_problem"] = (key, reason)
        return reason
    return None


def sample(
    post: LocalPosterior,
    method: str = "nuts",
    *,
    chains: int = 4,
    warmup: int = 1000,
    draws: int = 1000,
    seed: int = 0,
    backend: str | None = None,
    progress: bool = True,
    **options,
) -> SampleResult:
    """Run ``method`` on ``post`` and return the executor's ``SampleResult``."""
    m = registry.get(method)
    if m.kind == "sgmcmc":
        post.data.require_random_access(f"method={m.name!r}")
    else:  # full-batch gradients, or a potential exported over all rows
        post.data.require_memory(f"method={m.name!r}")
    if isinstance(draws, str):
        raise ValueError(
            f"draws must be an integer ≥ 1; got {draws!r}. draws='auto' (run until λ̂ is "
            f"reliable) goes through LocalPosterior.sample or condpost.sample_auto."
        )
    if m.kind == "sgmcmc" and isinstance(options.get("step_size"), str):
        from .stepsize import resolve_step_size

        options = resolve_step_size(post, m.name, options, seed=int(seed), progress=progress)
    chains = _count("chains", chains, 1)
    warmup = _count("warmup", warmup, 0)
    draws = _count("draws", draws, 1)
    seed = _count("seed", seed, 0)
    backend, note = pick_backend(post, m, backend)
    fn = registry.runner(m, backend)
    names, var = registry.options(fn)
    # torch's intra-op threads while the run lasts, on every executor (JAX executors use
    # torch only around the run; their own threading is fixed when jax is imported)
    requested = options.pop("num_threads", None)
    if not var:
        check_options(
            {k: v for k, v in options.items() if k not in names},
            names,
            f"method={m.name!r} on backend={backend!r}",
            also_valid=("chains", "warmup", "draws", "seed", "backend", "progress"),
        )
    if note:
        print(note)
    if m.min_warmup and warmup < m.min_warmup:
        warn(
            f"warmup={warmup} is very short for {m.name}: step-size (and mass-matrix) "
            f"adaptation needs a few hundred steps; below {m.min_warmup} the draws can be "
            f"all divergent or far from stationary.",
            SamplerWarning,
        )
    common = dict(
        method=m.name, chains=chains, warmup=warmup, draws=draws, seed=seed, progress=progress
    )
    t0 = time.perf_counter()
    if backend in _TORCH:
        with fastest_threads(_gradient_probe(post), requested, device=post.device) as nt:
            result = fn(post, **common, **options)
        threads = nt
    else:
        with fastest_threads(None, requested, device=post.device):
            result = fn(post, **common, **options)
        threads = requested
    if not isinstance(result, SampleResult):  # pragma: no cover - a user's runner
        raise TypeError(
            f"the runner of method={m.name!r}, backend={backend!r} returned "
            f"{type(result).__name__}; a runner must return condpost.infer.base.SampleResult"
        )
    s = result.settings
    s.setdefault("method", m.name)
    s.setdefault("backend", backend)
    s.setdefault("chains", chains)
    s.setdefault("warmup", warmup)
    s.setdefault("draws", draws)
    s.setdefault("seed", seed)
    s.setdefault("wall_time_s", time.perf_counter() - t0)
    if threads is not None:
        s["num_threads"] = threads
    if note:
        s["backend_note"] = note
    _warn_divergences(result, m.name)
    return result


def _gradient_probe(post: LocalPosterior):
    """One gradient of U at w*: the unit of work the thread choice is timed on."""
    w0 = post.center.detach().clone()
    batch = None
    if not post.data.in_memory:  # streamed data: one minibatch, never all rows
        batch = post.data.head(256)

    def probe():
        w = w0.clone().requires_grad_(True)
        with torch.enable_grad():
            if batch is None:
                u = post.potential(w)
            else:
                u = post.likelihood.mean_nll(post.lifted.forward(w, batch[0]), batch[1])
            u.backward()

    return probe


def _warn_divergences(result: SampleResult, method: str) -> None:
    div = result.stats.get("sampler/diverging")
    if div is None:
        return
    div = np.asarray(div, dtype=bool)
    ndiv = int(div.sum())
    if ndiv:
        per_chain = div.sum(1).tolist()
        shown = per_chain if len(per_chain) <= 8 else per_chain[:8] + ["…"]
        warn(
            f"{ndiv} divergent transition(s) after warmup in {method} (per chain: {shown}). "
            f"The draws are kept and flagged (ReferenceClass.diverging), but estimates may be "
            f"biased. Raise target_accept (e.g. 0.95), lengthen warmup, loosen very tight "
            f"tolerances, or increase localization.",
            SamplerWarning,
        )
