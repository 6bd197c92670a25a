"""Mutual information and entropy across a reference class (docs/theory.md §3.4).

For one fixed network the activations at two sites are deterministic functions of
each other, so ``I(A;B | W=w)`` is infinite (continuous inputs) or trivially the
entropy of the probe partition (finite probe set). Over the (conditioned) tempered
local posterior, with weights ``W ~ π_C`` independent of the input ``X``, the
weight noise turns the network into a channel and the mutual information becomes
finite; it depends on the precision scale ``(nβ, γ, σ_c)``, which every result
records. Three targets (docs/theory.md §3.4.5):

``"observational"``
    ``I(A;B)`` under the joint law of ``(X, W)``, ``A = g_A(X, W)``, ``B = g_B(X, W)``.
``"channel"``
    ``I(A'; C_W(A'))``: the source activation ``A'`` is drawn independently of the
    weights ``W`` that run the sub-network ``a → b`` (activation patching, as in
    ``CircuitMap``). This removes common-cause dependence through shared upstream
    weights and measures what the reference class of circuits transmits.
``"input"``
    ``I(X; B)`` with ``X`` uniform over a finite probe set of size ``m`` (so
    ``I ≤ log m``, checked): how well the ensemble's activations at ``b`` tell the
    probes apart when one does not know which member of the class ran.

Sampling design (docs/theory.md §3.4.7). ``S`` weight draws × ``m`` probes give ``S·m`` pairs
that are *not* independent: pairs that share a weight draw (or a probe) are coupled,
and k-nearest-neighbour estimators, which assume iid pairs, read that coupling as
information. Every estimate here is therefore built from **iid pairs**: pair ``i``
gets its own weight draw ``w_{s_i}``, used by no other pair, and its own probe
``x_{j_i}``, drawn independently of ``s_i`` (without replacement when there are at
least as many probes as pairs; otherwise a balanced, shuffled assignment, i.e. ``X``
uniform over the probe set). Hence the number of pairs is at most the number of
draws (half of it for ``"channel"`` with ``source="mixture"``, where each pair
needs a second, independent draw ``w'`` to produce ``A' = A(x; w')``).

Error bars: a two-way half-sampling bootstrap (a delete-d jackknife with d = n/2,
Shao & Wu 1989, Ann. Statist. 17:1176) over weight draws and probes. Each replicate
keeps a random half of the weight draws and (when the probes are a sample, see
``resample``) a random half of the probes, re-forms iid pairs from them, recomputes the
activations and re-runs the same estimator with the same settings. For a statistic
whose fluctuations are additive over draws and probes, the variance of a
half-sample estimate about its mean equals the variance of the full estimate
(the delete-d factor ``(n−d)/d`` is 1), so ``stderr`` is the standard deviation of
the replicates. Half-samples, unlike resampling with replacement, never duplicate a
point, which would give k-NN estimators zero distances. The bootstrap measures
sampling variability, not the estimator's own bias (KSG and Kozachenko–Leonenko are
biased at finite N; see ``docs/information.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._errors import warn

if TYPE_CHECKING:  # pragma: no cover
    from ..reference import ReferenceClass

__all__ = ["mutual_information", "entropy", "TARGETS"]

TARGETS = ("observational", "channel", "input")
_SOURCES = ("mixture", "center")
_LABELLED_ESTIMATORS = ("auto", "ross", "gaussian_mixture")


# ---------------------------------------------------------------------------- helpers
def _result_cls():
    from .estimators import InfoResult

    return InfoResult


def _array_mi(x, y, estimator, seed, opts, stderr="auto"):
    from .estimators import mutual_information as mi

    return mi(x, y, estimator=estimator, seed=seed, stderr=stderr, **opts)


def _array_entropy(x, estimator, seed, opts, stderr="auto"):
    from .estimators import entropy as ent

    return ent(x, estimator=estimator, seed=seed, stderr=stderr, **opts)


def _check_target(target: str, allowed: Sequence[str] = TARGETS) -> str:
    if not isinstance(target, str) or target not in allowed:
        from .._errors import nearest

        hint = nearest(str(target), allowed, n=1)
        raise ValueError(
            f"target={target!r} is not one of {list(allowed)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + ". 'observational' = I(A;B) under (X, W); 'channel' = I(A'; C_W(A')) with A' "
            "independent of W; 'input' = I(X;B) over a finite probe set (≤ log m)."
        )
    return target


def _positive_int(name: str, v, allow_none: bool = True) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer; got {v!r}")
    return int(v)


def _resolve_resample(resample, target: str, m: int) -> tuple[str, ...]:
    if resample == "auto":
        # A finite probe set that *defines* X (target="input", or a handful of probes)
        # is not a sample from a population: resampling it would change the target.
        return ("draws", "probes") if (target != "input" and m >= 20) else ("draws",)
    if isinstance(resample, str):
        resample = {"both": ("draws", "probes")}.get(resample, (resample,))
    axes = tuple(resample)
    bad = [a for a in axes if a not in ("draws", "probes")]
    if bad or not axes:
        raise ValueError(
            f"resample must be 'auto', 'both', 'draws', 'probes' or a tuple of 'draws'/'probes'; "
            f"got {resample!r}"
        )
    if "probes" in axes and m < 4:
        raise ValueError(
            f"resample includes 'probes' but there are only {m} probes: half-samples of them "
            f"change the target. Resample 'draws' only, or pass a larger probe sample."
        )
    return axes


def _pairs(draw_pool: np.ndarray, probe_pool: np.ndarray, n: int, rng, two_draws: bool):
    """iid pairs: each weight draw used once; probes independent of the draws."""
    need = 2 * n if two_draws else n
    if need > draw_pool.size:
        raise ValueError(
            f"{n} pairs need {need} distinct weight draws; only {draw_pool.size} are available"
        )
    perm = rng.permutation(draw_pool)
    s = perm[:n]
    s2 = perm[n : 2 * n] if two_draws else None
    if probe_pool.size >= n:
        j = rng.choice(probe_pool, size=n, replace=False)
    else:
        reps = -(-n // probe_pool.size)
        j = np.concatenate([rng.permutation(probe_pool) for _ in range(reps)])[:n]
        j = rng.permutation(j)
    return s, j, s2


def _distinct_rows(v: np.ndarray) -> tuple[int, np.ndarray]:
    """Number of distinct rows and an integer label per row."""
    _, inv = np.unique(np.ascontiguousarray(v), axis=0, return_inverse=True)
    inv = np.asarray(inv).reshape(-1)
    return int(inv.max()) + 1, inv


class _Forward:
    """Activations for arbitrary (draw, probe) index pairs, optionally patched."""

    def __init__(self, ref: ReferenceClass, probes, chunk: int = 512):
        from ..constraints import _prepare_probes

        post = ref._need_posterior("information estimates")
        self.post = post
        self.p = _prepare_probes(post, probes, "probes")
        self.W = torch.as_tensor(ref.flat().reshape(-1, ref.d), dtype=post.dtype).to(post.device)
        self.chunk = chunk

    def __call__(self, s, j, sites, replace_site=None, replace_vals=None) -> dict:
        lifted = self.post.lifted
        sites = list(sites)

        def one(w, x, r=None):
            rep = None if r is None else {replace_site: r.unsqueeze(0)}
            _, acts = lifted.call(lifted.unflatten(w), x.unsqueeze(0), sites, replace=rep)
            return {k: acts[k][0] for k in sites}

        from .._batching import batched

        bone = batched(one, f"activations ({type(lifted.net).__name__})")

        out: dict[str, list] = {k: [] for k in sites}
        s_t = torch.as_tensor(s, dtype=torch.long)
        j_t = torch.as_tensor(j, dtype=torch.long)
        with torch.no_grad():
            for i in range(0, len(s_t), self.chunk):
                w = self.W[s_t[i : i + self.chunk]]
                x = self.p[j_t[i : i + self.chunk]]
                args = (w, x)
                if replace_vals is not None:
                    args = (w, x, replace_vals[i : i + self.chunk])
                res = bone(*args)
                for k in sites:
                    out[k].append(res[k])
        return {k: torch.cat(v) for k, v in out.items()}


def _flat64(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(t.shape[0], -1).to(torch.float64).cpu().numpy()


def _precision_settings(ref: ReferenceClass) -> dict:
    cons = {}
    for c in ref.config.get("constraints", []):
        cons[c["name"]] = {
            "kind": c.get("kind"),
            "tolerance": c.get("tolerance"),
            "strength": c.get("strength"),
            "rho": c.get("rho"),
        }
    return {
        "nbeta": ref.nbeta,
        "localization": ref.localization,
        "constraints": cons,
        "method": ref.settings.get("method"),
    }


# ---------------------------------------------------------------------- labelled estimators
def _labelled_mi(labels, y, estimator, seed, opts) -> tuple[float, str, dict]:
    """MI between labels (discrete) and continuous y; returns (value, name, settings)."""
    if estimator not in _LABELLED_ESTIMATORS:
        raise ValueError(
            f"estimator={estimator!r}: one side takes only finitely many values (a finite probe "
            f"set), so continuous estimators (KSG, Gaussian) would see exact ties. Use "
            f"{list(_LABELLED_ESTIMATORS)}: 'ross' (k-NN for discrete × continuous) or "
            f"'gaussian_mixture' (Gaussian fit of B per label, exact mixture MI)."
        )
    y = np.asarray(y, dtype=np.float64)
    sd = y.std(0)
    y = (y - y.mean(0)) / np.where(sd > 0, sd, 1.0)
    if estimator in ("auto", "ross"):
        # Ross (2014) discrete × continuous k-NN: the array estimator's "mixed" counts. The
        # preconditions (more than k pairs per value) are checked before any sampling
        # (_check_labelled); a half-sample that still holds a value seen once drops it,
        # and values seen ≤ k times use k_i = N_ℓ − 1 (Ross's own rule), so this never
        # fails after the draws have been spent.
        from .estimators import _mixed_value

        k = int(opts.get("k", 3))
        _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
        codes = codes.reshape(-1)
        dropped = 0
        if counts.min() < 2:
            keep = counts[codes] >= 2
            dropped = int((~keep).sum())
            _, codes = np.unique(codes[keep], return_inverse=True)
            codes, y = codes.reshape(-1), y[keep]
        st = {"k": k}
        if dropped:
            st["dropped_singletons"] = dropped
        return _mixed_value(codes, y, k, {"backend": "auto"}), "ross", st
    from .estimators import gaussian_mixture_mi

    classes, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    means = np.stack([y[inv == c].mean(0) for c in range(len(classes))])
    covs = np.stack([np.atleast_2d(np.cov(y[inv == c], rowvar=False)) for c in range(len(classes))])
    kw = {k: opts[k] for k in ("method", "nodes", "n_samples") if k in opts}
    res = gaussian_mixture_mi(means, covs, counts / counts.sum(), seed=seed, **kw)
    return float(res.value), "gaussian_mixture", dict(res.settings)


# ---------------------------------------------------------------------------- core
class _Plan:
    """Everything needed to produce (X-side, Y-side) samples for a set of pairs."""

    def __init__(self, ref, probes, a, b, target, source, kind):
        from ..lifting import resolve_sites

        post = ref._need_posterior("information estimates")
        self.kind = kind
        self.target = target
        self.source = source
        self.fw = _Forward(ref, probes)
        self.m = int(self.fw.p.shape[0])
        self.S = int(ref.chains * ref.num_draws)
        net = post.lifted.net
        self.a = None if a is None else resolve_sites(net, a, "a")[0]
        self.b = None if b is None else resolve_sites(net, b, "b")[0]

    def two_draws(self) -> bool:
        return self.target == "channel" and self.source == "mixture"

    def samples(self, s, j, s2):
        """(x-side array or labels, y-side array, x_is_label)."""
        t = self.target
        if t == "input":
            y = self.fw(s, j, [self.b])[self.b]
            return j.copy(), _flat64(y), True
        if t == "observational":
            sites = [self.a] if self.b is None else [self.a, self.b]
            acts = self.fw(s, j, sites)
            ya = None if self.b is None else _flat64(acts[self.b])
            return _flat64(acts[self.a]), ya, False
        # channel: A' independent of the weights that run a → b
        if self.source == "mixture":
            a_prime = self.fw(s2, j, [self.a])[self.a]
        else:
            center = self.fw.post.center
            with torch.no_grad():
                _, acts = self.fw.post.lifted.call(
                    self.fw.post.lifted.unflatten(center), self.fw.p, [self.a]
                )
            a_prime = acts[self.a][torch.as_tensor(j, dtype=torch.long)]
        y = self.fw(s, j, [self.b], replace_site=self.a, replace_vals=a_prime)[self.b]
        return _flat64(a_prime), _flat64(y), False


def _estimate_pairs(x, y, x_is_label, estimator, seed, opts, kind, stderr="auto"):
    """One estimate on one set of pairs; returns (value, resolved name, settings, raw).

    A side with fewer distinct values than half the pairs (probe identities, or
    activations that do not depend on the lifted weights) is treated as discrete:
    plug-in when both sides are, the Ross k-NN or Gaussian-mixture estimator when one is,
    the array estimators of ``condpost.info.estimators`` otherwise.
    """
    if kind == "entropy":
        n_x, lab = (None, None) if x_is_label else _distinct_rows(x)
        if x_is_label or n_x < 0.5 * len(x):
            labels = np.asarray(x if x_is_label else lab, dtype=np.int64)
            res = _array_entropy(labels, "plugin", seed, {}, stderr)
        else:
            res = _array_entropy(x, estimator, seed, opts, stderr)
        return float(res.value), res.estimator, dict(res.settings), res
    if x_is_label:
        labels = x
    else:
        n_x, lab = _distinct_rows(x)
        labels = lab if n_x < 0.5 * len(x) else None
    n_y, lab_y = _distinct_rows(y)
    y_discrete = n_y < 0.5 * len(y)
    if labels is not None and y_discrete:
        if estimator not in ("auto", "plugin"):
            raise ValueError(
                f"estimator={estimator!r}: both sides take finitely many values here, so only "
                f"the plug-in estimator applies (estimator='auto' or 'plugin')"
            )
        li, yi = np.asarray(labels, dtype=np.int64), np.asarray(lab_y, dtype=np.int64)
        res = _array_mi(li, yi, "plugin", seed, {}, stderr)
        return float(res.value), res.estimator, dict(res.settings), res
    if labels is not None or y_discrete:
        lab, cont = (labels, y) if labels is not None else (lab_y, x)
        val, name, st = _labelled_mi(lab, cont, estimator, seed, opts)
        return val, name, st, None
    res = _array_mi(x, y, estimator, seed, opts, stderr)
    return float(res.value), res.estimator, dict(res.settings), res


def _samples(plan, kind, s, j, s2):
    x, y, lab = plan.samples(s, j, s2)
    if kind == "entropy" and plan.target == "channel":
        return y, None, False  # h(C_W(A')) at site b
    return x, y, lab


def _atoms(x, x_is_label) -> int | None:
    if x_is_label:
        return len(np.unique(x))
    n, _ = _distinct_rows(x)
    return n if n < 0.5 * len(x) else None


# ------------------------------------------------------------------- MI: structure first
_PROJECT_PER_DIM = 50  # fewer pairs per coordinate than this: project high-dimensional sides


class _Side:
    """One side of the MI pairs.

    ``labels`` (an integer per probe) when the side is a function of the probe alone
    (the probe identity for ``"input"``, or a site that no lifted weight acts before):
    it then takes ``K`` distinct values and ``I ≤ log K``. ``None`` when it varies with
    the weights (a continuous random variable across the class).
    """

    def __init__(self, name: str, what: str, labels=None, dim: int = 0, table=None):
        self.name = name
        self.what = what
        self.labels = labels
        self.dim = dim
        self.table = table  # activations at every probe (patching values), when labelled

    @property
    def K(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1

    def min_probes_per_value(self) -> int:
        return int(np.bincount(self.labels).min())


def _weight_dependent(acts: torch.Tensor, nd: int) -> bool:
    """Whether activations ``[nd·q, ...]`` (nd draws × q probes) differ between draws.

    Activations that no lifted weight affects are computed by exactly the same
    operations for every draw, so they agree bit for bit.
    """
    v = acts.reshape(nd, -1)
    return bool((v != v[:1]).any())


def _fire_order(post, sites: list[str], x: torch.Tensor) -> list[str]:
    """Order in which the sites' modules finish in one forward pass at ``w*``."""
    from ..lifting import site_module

    modules = dict(post.lifted.net.named_modules())
    order: list[str] = []
    handles = [
        modules[site_module(post.lifted.net, st)].register_forward_hook(
            lambda mod, inp, out, st=st: order.append(st)
        )
        for st in sites
    ]
    try:
        with torch.no_grad():
            post.lifted.call(post.lifted.unflatten(post.center), x)
    finally:
        for h in handles:
            h.remove()
    return order


def _check_channel_order(plan, rng) -> str | None:
    """``target="channel"`` needs ``a`` to feed ``b``; raises if ``a`` is not upstream.

    Returns a note when ``b`` does not change under an intervention on ``a`` (no path
    from ``a`` to ``b``: the channel MI is 0 in law).
    """
    a, b = plan.a, plan.b
    post = plan.fw.post
    order = _fire_order(post, [a, b], plan.fw.p[:1])
    for st, role in ((a, "a"), (b, "b")):
        if st not in order:
            raise ValueError(
                f"target='channel': site {role}={st!r} did not run in a forward pass on the "
                f"probes, so no activation there can be patched or read"
            )
    if order.index(a) > order.index(b):
        raise ValueError(
            f"target='channel' needs site a={a!r} to feed site b={b!r}, but {b!r} finishes "
            f"before {a!r} in the forward pass (or {a!r} contains {b!r}), so an intervention on "
            f"a cannot change b. Swap them (a={b!r}, b={a!r}), or use target='observational' "
            f"for the dependence between two sites in either order."
        )
    q = min(plan.m, 16)
    j = rng.choice(plan.m, q, replace=False)
    s = np.zeros(q, dtype=np.int64)
    acts = plan.fw(s, j, [a, b])
    va, vb = acts[a], acts[b]
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
    noise = torch.randn(va.shape, generator=gen, dtype=torch.float64).to(va)
    scale = float(va.detach().abs().mean()) + 1e-3 if va.is_floating_point() else 1.0
    patched = (va + 0.5 * scale * noise) if va.is_floating_point() else va
    vb2 = plan.fw(s, j, [b], replace_site=a, replace_vals=patched)[b]
    if torch.equal(vb, vb2):
        return (
            f"site b={b!r} did not change when site a={a!r} was intervened on (patched with "
            f"perturbed activations): no path from a to b, so the channel MI is 0 in law and "
            f"the estimate measures only estimator noise. Use target='observational' for "
            f"dependence through shared weights."
        )
    return None


def _inspect(plan, rng) -> tuple[_Side, _Side, list[str]]:
    """Classify both sides before any pairing or bootstrap (a few small forward passes)."""
    notes: list[str] = []
    t = plan.target
    S, m = plan.S, plan.m
    q, nd = min(m, 32), min(S, 4)
    jj = rng.choice(m, q, replace=False)
    dd = rng.choice(S, nd, replace=False)
    s, j = np.repeat(dd, q), np.tile(jj, nd)
    all_j = np.arange(m)
    all_s = np.full(m, dd[0])

    def labelled(site):
        tab = plan.fw(all_s, all_j, [site])[site]
        _, lab = _distinct_rows(_flat64(tab))
        return lab, tab

    if t == "channel":
        note = _check_channel_order(plan, rng)
        if note:
            notes.append(note)
    if t == "input":
        xs = _Side("X", "the probe identity", labels=np.arange(m), dim=1)
    else:
        va = plan.fw(s, j, [plan.a])[plan.a]
        a_dep = _weight_dependent(va, nd)
        da = int(va[0].numel())
        if t == "channel" and plan.source == "center":
            post = plan.fw.post
            with torch.no_grad():
                _, acts = post.lifted.call(post.lifted.unflatten(post.center), plan.fw.p, [plan.a])
            tab = acts[plan.a]
            _, lab = _distinct_rows(_flat64(tab))
            xs = _Side("A'", f"A' = A(x; w*) at site a={plan.a!r}", lab, da, tab)
        elif a_dep:
            xs = _Side("A" if t == "observational" else "A'", f"site a={plan.a!r}", None, da)
        else:
            lab, tab = labelled(plan.a)
            xs = _Side(
                "A" if t == "observational" else "A'",
                f"site a={plan.a!r} (no lifted weight acts before it)",
                lab,
                da,
                tab,
            )
    if t == "channel":
        # B = C_W(A'): does it vary with W for a fixed A'? Patch with one draw's values.
        base = plan.fw(dd[:1].repeat(q), jj, [plan.a])[plan.a]
        vb = plan.fw(
            s,
            j,
            [plan.b],
            replace_site=plan.a,
            replace_vals=base.repeat(nd, *[1] * (base.dim() - 1)),
        )[plan.b]
        b_dep = _weight_dependent(vb, nd) or xs.labels is None
    else:
        vb = plan.fw(s, j, [plan.b])[plan.b]
        b_dep = _weight_dependent(vb, nd)
    db = int(vb[0].numel())
    if b_dep:
        ys = _Side("B", f"site b={plan.b!r}", None, db)
    else:
        if t == "channel":
            tab_b = plan.fw(all_s, all_j, [plan.b], replace_site=plan.a, replace_vals=xs.table)[
                plan.b
            ]
            _, lab_b = _distinct_rows(_flat64(tab_b))
        else:
            lab_b, _ = labelled(plan.b)
        ys = _Side("B", f"site b={plan.b!r} (no lifted weight acts on it)", lab_b, db)
    return xs, ys, notes


def _guaranteed_count(n: int, pool: int, mp: int) -> int:
    """Pairs per value guaranteed by the balanced probe assignment (0: not guaranteed).

    With fewer probes than pairs every probe of the pool is used ``⌊n/pool⌋`` or more
    times; a value held by ``mp`` probes of the pool gets at least ``mp·⌊n/pool⌋``.
    Without replacement (``pool ≥ n``) nothing is guaranteed.
    """
    return mp * (n // pool) if pool < n else 0


def _choose(xs: _Side, ys: _Side, *, n: int, bootstrap: int, axes, m: int, estimator, opts):
    """The estimator for these sides, with every precondition checked (before sampling)."""
    half = n // 2
    boot_pool = m // 2 if "probes" in axes else m
    disc = []
    for side in (xs, ys):
        K = side.K
        if K is None:
            disc.append(False)
            continue
        if K <= n // 2:
            disc.append(True)
            continue
        if m >= n and K >= n:  # a sample of a continuous input law; almost no ties
            disc.append(False)
            continue
        k = int(opts.get("k", 3))
        need_pairs = 2 * (k + 1) * K * (2 if bootstrap else 1)
        raise ValueError(
            f"{side.name} ({side.what}) is a function of the probe and takes K = {K} distinct "
            f"values over the {m} probes, but the {n} pairs see each value only "
            f"~{n / K:.1f} times: continuous estimators would read the exact ties as "
            f"information (impossible values above log K = {math.log(K):.3g}), and the "
            f"discrete estimators need more than k = {k} pairs per value"
            f"{' in each half-sample of the bootstrap' if bootstrap else ''}. Fix: more "
            f"draws (pairs ≥ {need_pairs}), fewer probes (at most {max(n // (2 * (k + 1) * (2 if bootstrap else 1)), 1)}), "
            f"at least {n} probes from a continuous input law, or a smaller k."
        )
    dx, dy = disc
    if dx and dy:
        if estimator not in ("auto", "plugin"):
            raise ValueError(
                f"estimator={estimator!r}: both sides take finitely many values here "
                f"({xs.name}: {xs.K}, {ys.name}: {ys.K}), so only the plug-in estimator applies "
                f"(estimator='auto' or 'plugin')"
            )
        # With fewer probes than pairs, the balanced assignment makes the empirical law of
        # the probes uniform up to N mod m: the plug-in then has no sampling bias to
        # correct (Miller-Madow would over-correct). With a probe sample of m ≥ N the pairs
        # are a sample, and the Miller-Madow correction applies.
        mm = bool(opts.get("miller_madow", m >= n))
        return {
            "kind": "plugin",
            "name": "plugin",
            "opts": {"miller_madow": mm},
            "why": f"both sides are functions of the probe ({xs.K} and {ys.K} values): plug-in "
            + (
                "with the Miller-Madow correction (the probes are a sample: m ≥ N)"
                if mm
                else "without bias correction (the balanced probe assignment makes the "
                "empirical law of the probes uniform, so the plug-in has no sampling bias)"
            ),
        }
    if dx or dy:
        lab, cont = (xs, ys) if dx else (ys, xs)
        if estimator not in _LABELLED_ESTIMATORS:
            raise ValueError(
                f"estimator={estimator!r}: {lab.name} ({lab.what}) takes only finitely many values "
                f"(K = {lab.K}) over the probes, so continuous estimators (KSG, Gaussian) would see exact ties. "
                f"Use {list(_LABELLED_ESTIMATORS)}: 'ross' (k-NN for discrete × continuous) or "
                f"'gaussian_mixture' (Gaussian fit of the other side per value, exact mixture MI)."
            )
        name = "ross" if estimator == "auto" else estimator
        mp = lab.min_probes_per_value() if "probes" not in axes else 1
        full = _guaranteed_count(n, m, lab.min_probes_per_value())
        at_half = _guaranteed_count(half, boot_pool, mp) if bootstrap else full
        if name == "ross":
            k = opts.get("k", 3)
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(f"k must be a positive integer (Ross k-NN order); got {k!r}")
            need, what = int(k) + 1, f"k = {k}"
        else:
            need, what = cont.dim + 2, f"a {cont.dim}-dimensional covariance"
        expected = n * lab.min_probes_per_value() / m
        got = at_half if (full or m < n) else (expected / 2 if bootstrap else expected)
        if got < need:
            size = f"{half} pairs of each bootstrap half-sample" if bootstrap else f"{n} pairs"
            if m < n:
                need_n = (
                    2 * boot_pool * -(-need // mp)
                    if bootstrap
                    else m * -(-need // lab.min_probes_per_value())
                )
            else:
                need_n = int(
                    math.ceil(need * m / lab.min_probes_per_value() * (2 if bootstrap else 1))
                )
            raise ValueError(
                f"estimator={name!r} needs at least {need} pairs per value of {lab.name} "
                f"({what}); {lab.name} ({lab.what}) takes K = {lab.K} values over {m} probes, "
                f"and the {size} guarantee only {got:g} for the rarest value. Fix (checked "
                f"before any sampling): more draws so that pairs ≥ {need_n}"
                + (f", k={max(int(got) - 1, 1)}" if name == "ross" and got >= 2 else "")
                + ", fewer probes"
                + (", or bootstrap=0 (no error bar)" if bootstrap else "")
                + "."
            )
        return {
            "kind": "labelled",
            "name": name,
            "opts": dict(opts),
            "discrete_side": "x" if dx else "y",
            "why": f"{lab.name} is a function of the probe with K = {lab.K} values and "
            f"{cont.name} varies with the weights: "
            + (
                "the discrete-continuous k-NN estimator of Ross (2014)"
                if name == "ross"
                else "a Gaussian fit per value and the exact mixture MI"
            ),
        }
    d = xs.dim + ys.dim
    name, why = estimator, "as requested"
    if estimator == "auto":
        if d > 100 or n < _PROJECT_PER_DIM * d:
            name = "pca_copula_ksg"
            why = (
                f"dx + dy = {d} with N = {n} pairs (fewer than {_PROJECT_PER_DIM} per "
                f"coordinate): each side with more than "
                f"{opts.get('components', 4)} coordinates is projected onto its leading "
                f"principal components, then copula-KSG (a lower bound by data processing)"
                if d > 8
                else f"dx + dy = {d} with only N = {n} pairs: copula-KSG"
            )
            if d <= 8:
                name = "copula_ksg"
        else:
            name, why = "auto", "continuous pairs: the array estimator's automatic choice"
    if name in _LABELLED_ESTIMATORS[1:]:
        raise ValueError(
            f"estimator={estimator!r} is for a side that takes finitely many values; here both "
            f"sides vary with the weights (continuous). Use 'auto' or a continuous estimator."
        )
    if half <= d + 1 and name in ("gaussian", "copula", "copula_ksg"):
        raise ValueError(
            f"estimator={name!r} needs more pairs than dimensions (dx + dy = {d}) in each "
            f"bootstrap half-sample; got {half}. Use more draws or estimator='pca_copula_ksg'."
        )
    return {"kind": "continuous", "name": name, "opts": dict(opts), "why": why}


def _mi_samples(plan, xs: _Side, ys: _Side, s, j, s2):
    """(x, y) for the pairs: probe labels for labelled sides, float arrays otherwise."""
    t = plan.target
    if t == "input":
        y = plan.fw(s, j, [plan.b])[plan.b]
        return j.copy(), _flat64(y)
    if t == "observational":
        need = [st for st, side in ((plan.a, xs), (plan.b, ys)) if side.labels is None]
        acts = plan.fw(s, j, need) if need else {}
        x = xs.labels[j] if xs.labels is not None else _flat64(acts[plan.a])
        y = ys.labels[j] if ys.labels is not None else _flat64(acts[plan.b])
        return x, y
    # channel: A' independent of the weights that run a → b
    if xs.table is not None:
        a_prime = xs.table[torch.as_tensor(j, dtype=torch.long)]
    else:
        a_prime = plan.fw(s2, j, [plan.a])[plan.a]
    x = xs.labels[j] if xs.labels is not None else _flat64(a_prime)
    if ys.labels is not None:
        return x, ys.labels[j]
    y = plan.fw(s, j, [plan.b], replace_site=plan.a, replace_vals=a_prime)[plan.b]
    return x, _flat64(y)


def _mi_estimate(choice, x, y, seed, stderr="auto"):
    """(raw value, resolved name, estimator settings, array notes, array stderr)."""
    import warnings

    from ._common import InfoWarning

    with warnings.catch_warnings():
        # bounds and failures are judged once, on the full sample, by the caller
        warnings.simplefilter("ignore", InfoWarning)
        if choice["kind"] == "plugin":
            res = _array_mi(
                np.asarray(x, dtype=np.int64),
                np.asarray(y, dtype=np.int64),
                "plugin",
                seed,
                choice["opts"],
                stderr,
            )
        elif choice["kind"] == "labelled":
            lab, cont = (x, y) if choice["discrete_side"] == "x" else (y, x)
            val, name, st = _labelled_mi(lab, cont, choice["name"], seed, choice["opts"])
            return float(val), name, st, [], float("nan")
        else:
            res = _array_mi(x, y, choice["name"], seed, choice["opts"], stderr)
    raw = float(res.details.get("raw_value", res.value))
    return raw, res.estimator, dict(res.settings), list(res.notes), float(res.stderr)


def _check_pairs(pool, pairs, per_pair: int) -> int:
    max_pairs = pool.size // per_pair
    if pairs is None:
        pairs = max_pairs
    if pairs > max_pairs:
        raise ValueError(
            f"pairs={pairs} would reuse weight draws: {pool.size} draws give at most {max_pairs} "
            f"iid (x, w) pairs{' (each channel pair needs two draws)' if per_pair == 2 else ''}. "
            f"Pairs that share a draw are dependent and k-NN estimators read that dependence as "
            f"information. Sample more draws or lower pairs."
        )
    if pairs < 20:
        raise ValueError(f"pairs={pairs} is too few for an information estimate (need ≥ 20)")
    return pairs


def _half_sample_bootstrap(
    replicate, rng, pool, plan, axes, bootstrap, pairs, two, desc, progress
) -> np.ndarray:
    """Two-way half-sampling bootstrap: each replicate draws half the weight draws (and
    half the probes when ``"probes" in axes``), ``pairs // 2`` pairs from them, and
    returns ``replicate(s, j, s2)`` (the estimate on those pairs)."""
    from tqdm.auto import tqdm

    probe_pool = np.arange(plan.m)
    reps = []
    for _ in tqdm(
        range(bootstrap), desc=desc, disable=not progress, leave=False, dynamic_ncols=True
    ):
        dpool = rng.choice(pool, pool.size // 2, replace=False)
        ppool = (
            rng.choice(probe_pool, plan.m // 2, replace=False) if "probes" in axes else probe_pool
        )
        reps.append(replicate(*_pairs(dpool, ppool, pairs // 2, rng, two)))
    return np.asarray(reps)


def _bootstrap_note(axes) -> str:
    return (
        "stderr: two-way half-sampling bootstrap (delete-d jackknife, d = n/2) over "
        f"{'weight draws and probes' if 'probes' in axes else 'weight draws'}; sampling "
        "error only, not the estimator's bias."
    )


def _run_mi(
    ref, plan, *, rng, pool, pairs, resample, estimator, bootstrap, seed, progress, opts, on_bound
):
    """Mutual information: classify the sides, choose and check the estimator, then sample."""

    from ._common import InfoWarning

    target = plan.target
    if on_bound not in ("label", "raise"):
        raise ValueError(
            f"on_bound must be 'label' (return the bound, labelled, with a warning) or 'raise'; "
            f"got {on_bound!r}"
        )
    axes = _resolve_resample(resample, target, plan.m)
    if target == "input" and estimator in ("auto", "ross"):
        # the probe identity is the discrete side: check k against the pairs per probe
        # before any forward pass (b is assumed to vary with the weights, as it must for
        # I(X;B) to be more than a partition entropy)
        n0 = _check_pairs(pool, pairs, 1)
        xs0 = _Side("X", "the probe identity", labels=np.arange(plan.m), dim=1)
        _choose(
            xs0,
            _Side("B", "", None, 1),
            n=n0,
            bootstrap=bootstrap,
            axes=axes,
            m=plan.m,
            estimator=estimator,
            opts=opts,
        )
    xs, ys, notes = _inspect(plan, rng)
    two = target == "channel" and plan.source == "mixture" and xs.table is None
    pairs = _check_pairs(pool, pairs, 2 if two else 1)
    choice = _choose(
        xs, ys, n=pairs, bootstrap=bootstrap, axes=axes, m=plan.m, estimator=estimator, opts=opts
    )
    notes.insert(0, f"estimator {choice['name']!r}: {choice['why']}")
    if target == "channel" and xs.labels is not None and plan.source == "mixture":
        notes.append(
            "no lifted weight acts before site a, so A' = A(x) for every member: the channel "
            "and observational targets are the same quantity here (one draw per pair)"
        )
    probe_pool = np.arange(plan.m)
    s, j, s2 = _pairs(pool, probe_pool, pairs, rng, two)
    x, y = _mi_samples(plan, xs, ys, s, j, s2)
    raw, name, est_settings, arr_notes, arr_se = _mi_estimate(choice, x, y, seed)
    notes.extend(arr_notes)
    fixed = dict(choice)
    if choice["kind"] == "continuous":
        fixed["name"] = name  # replicates use the estimator resolved on the full set

    def replicate(sb, jb, s2b):
        xb, yb = _mi_samples(plan, xs, ys, sb, jb, s2b)
        return _mi_estimate(fixed, xb, yb, int(rng.integers(2**31)), stderr=None)[0]

    reps = _half_sample_bootstrap(
        replicate,
        rng,
        pool,
        plan,
        axes,
        bootstrap,
        pairs,
        two,
        f"bootstrap mi [{target}]",
        progress,
    )
    reps = np.asarray(reps)
    stderr = float(reps.std(ddof=1)) if reps.size > 1 else float("nan")
    if not np.isfinite(stderr) and np.isfinite(arr_se):
        stderr = arr_se
    # ---- what the data can resolve: log K for a side with K values, log N for N pairs
    ceilings: list[tuple[float, str, float]] = []
    label_bound = None
    for side in (xs, ys):
        if side.labels is not None:
            K = side.K
            what = "m" if target == "input" and side is xs else "K"
            b_ = math.log(K)
            if label_bound is None or b_ < label_bound:
                label_bound = b_
            ceilings.append(
                (
                    b_,
                    f"the bound log {what} = {b_:.4g} ({what} = {K} distinct values of "
                    f"{side.name}, {side.what})",
                    max(2 * stderr if np.isfinite(stderr) else 0.0, 1e-3, (K - 1) / pairs),
                )
            )
    ceilings.append(
        (
            math.log(pairs),
            f"log N = {math.log(pairs):.4g}, what N = {pairs} pairs can resolve",
            max(2 * stderr if np.isfinite(stderr) else 0.0, 1e-3),
        )
    )
    ceiling, why, tol = min(ceilings, key=lambda c: c[0])
    value, at_bound = raw, False
    if np.isfinite(raw) and raw > ceiling:
        value, at_bound = ceiling, True
        failed = raw - ceiling > tol
        msg = (
            f"the estimate {raw:.4g} nats exceeds {why}"
            + (
                " by more than its error: the estimator is biased here (too few pairs for "
                "the dimension, or k too small). "
                if failed
                else " within the estimator's finite-sample offset. "
            )
            + f"The value reported is the bound {ceiling:.4g} (result.bound = True): "
            "read it as 'at the resolution limit', not as an estimate."
        )
        notes.append(msg)
        if failed:
            if on_bound == "raise":
                raise ValueError(msg + " (on_bound='raise')")
            warn(msg, InfoWarning)
    if label_bound is not None and value > label_bound - max(tol, 0.02):
        notes.append(
            f"at the bound log m = {label_bound:.4g}: the values are (almost) perfectly "
            f"distinguishable across the class; a larger value cannot be resolved."
        )
    if value > math.log(pairs) - 1.0:
        notes.append(
            f"estimate {value:.3g} nats is near log N = {math.log(pairs):.3g} (N = {pairs} "
            f"pairs): sample-based estimators cannot resolve more than ~log N; use more "
            f"draws or report a lower bound."
        )
    if bootstrap and reps.size:
        notes.append(_bootstrap_note(axes))
    settings: dict[str, Any] = {
        "target": target,
        "quantity": "mutual_information",
        "a": plan.a,
        "b": plan.b,
        "source": plan.source if target == "channel" else None,
        "estimator": name,
        "estimator_reason": choice["why"],
        "estimator_settings": est_settings,
        "estimator_opts": dict(opts),
        "sides": {
            side.name: {"what": side.what, "values": side.K, "dim": side.dim} for side in (xs, ys)
        },
        "num_draws_available": plan.S,
        "num_draws_used": int(pool.size),
        "num_probes": plan.m,
        "pairs": int(pairs),
        "atoms": xs.K,
        "bound": label_bound,
        "upper_bound": ceiling,
        "raw_value": raw,
        "bootstrap": int(bootstrap),
        "resample": list(axes),
        "bootstrap_mean": float(reps.mean()) if reps.size else None,
        "seed": seed,
        **_precision_settings(ref),
    }
    if np.isfinite(arr_se):
        settings["estimator_stderr"] = arr_se
    InfoResult = _result_cls()
    return InfoResult(
        value=float(value),
        stderr=stderr,
        estimator=name,
        settings=settings,
        n=int(pairs),
        notes=tuple(notes),
        details={"raw_value": raw},
        upper_bound=float(ceiling),
        bound=at_bound,
    )


def _run(
    ref,
    kind,
    *,
    probes,
    a,
    b,
    target,
    estimator,
    draws,
    pairs,
    bootstrap,
    resample,
    source,
    seed,
    progress,
    opts,
    on_bound="label",
):

    from ..reference import ReferenceClass

    if not isinstance(ref, ReferenceClass):
        raise TypeError(f"ref must be a ReferenceClass; got {type(ref).__name__}")
    if source not in _SOURCES:
        raise ValueError(
            f"source={source!r} must be 'mixture' (A' = A(x; w') with an independent draw w') "
            f"or 'center' (A' = A(x; w*))"
        )
    draws = _positive_int("draws", draws)
    pairs = _positive_int("pairs", pairs)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an integer ≥ 0 (0 disables it); got {bootstrap!r}")
    if bootstrap == 1:
        raise ValueError("bootstrap=1 gives no spread; use 0 (off) or ≥ 20 replicates")
    plan = _Plan(ref, probes, a, b, target, source, kind)
    if target == "input" and plan.m < 2:
        raise ValueError("target='input' needs at least 2 probes (I(X;B) ≤ log m = 0 with one)")
    rng = np.random.default_rng(seed)
    S_all = plan.S
    if draws is not None and draws > S_all:
        raise ValueError(
            f"draws={draws} exceeds the {S_all} draws in this reference class "
            f"({ref.chains} chains × {ref.num_draws})"
        )
    pool = np.arange(S_all) if draws is None else np.sort(rng.choice(S_all, draws, replace=False))
    if kind == "mi":
        return _run_mi(
            ref,
            plan,
            rng=rng,
            pool=pool,
            pairs=pairs,
            resample=resample,
            estimator=estimator,
            bootstrap=bootstrap,
            seed=seed,
            progress=progress,
            opts=opts,
            on_bound=on_bound,
        )
    pairs = _check_pairs(pool, pairs, 2 if plan.two_draws() else 1)
    axes = _resolve_resample(resample, target, plan.m)
    probe_pool = np.arange(plan.m)
    s, j, s2 = _pairs(pool, probe_pool, pairs, rng, plan.two_draws())
    x, y, x_is_label = _samples(plan, kind, s, j, s2)
    value, name, est_settings, raw = _estimate_pairs(x, y, x_is_label, estimator, seed, opts, kind)
    # the replicates use the estimator resolved on the full set (no re-picking by "auto")
    fixed = estimator if name in ("plugin",) else name

    def replicate(sb, jb, s2b):
        xb, yb, lab_b = _samples(plan, kind, sb, jb, s2b)
        seed_b = int(rng.integers(2**31))
        return _estimate_pairs(xb, yb, lab_b, fixed, seed_b, opts, kind, stderr=None)[0]

    reps = _half_sample_bootstrap(
        replicate,
        rng,
        pool,
        plan,
        axes,
        bootstrap,
        pairs,
        plan.two_draws(),
        f"bootstrap {kind} [{target}]",
        progress,
    )
    reps = np.asarray(reps)
    stderr = float(reps.std(ddof=1)) if reps.size > 1 else float("nan")
    notes: list[str] = []
    atoms, bound = _atoms(x, x_is_label), None  # entropy: no resolution ceiling applied
    if bootstrap and reps.size:
        notes.append(_bootstrap_note(axes))
    settings: dict[str, Any] = {
        "target": target,
        "quantity": "entropy",  # mutual information returned through _run_mi above
        "a": plan.a,
        "b": plan.b,
        "source": source if target == "channel" else None,
        "estimator": name,
        "estimator_settings": est_settings,
        "estimator_opts": dict(opts),
        "num_draws_available": S_all,
        "num_draws_used": int(pool.size),
        "num_probes": plan.m,
        "pairs": int(pairs),
        "atoms": atoms,
        "bound": bound,
        "bootstrap": int(bootstrap),
        "resample": list(axes),
        "bootstrap_mean": float(reps.mean()) if reps.size else None,
        "seed": seed,
        **_precision_settings(ref),
    }
    if raw is not None and np.isfinite(getattr(raw, "stderr", float("nan"))):
        settings["estimator_stderr"] = float(raw.stderr)
    InfoResult = _result_cls()
    return InfoResult(
        value=float(value),
        stderr=stderr,
        estimator=name,
        settings=settings,
        n=int(pairs),
        notes=tuple(notes),
    )


def mutual_information(
    ref: ReferenceClass,
    *,
    probes,
    a: str | None = None,
    b: str,
    target: str = "observational",
    estimator: str = "auto",
    draws: int | None = None,
    pairs: int | None = None,
    bootstrap: int = 200,
    resample="auto",
    source: str = "mixture",
    seed: int = 0,
    progress: bool = True,
    on_bound: str = "label",
    **estimator_opts,
):
    """Mutual information between two sites across a reference class (docs/theory.md §3.4.5).

    Parameters
    ----------
    ref : ReferenceClass
        Draws of a (conditioned) local posterior, with its declaration attached.
    probes : torch.Tensor
        Inputs ``[m, ...]``: ``X`` is uniform over them (a finite probe set) or they are
        an iid sample of a continuous input law (use ``m ≥ pairs``).
    a, b : str
        Sites (module paths; ``""`` is the output). ``a`` is unused for ``"input"``.
    target : {"observational", "channel", "input"}
        ``I(A;B)`` under ``(X, W)``; ``I(A'; C_W(A'))`` with ``A'`` independent of ``W``
        (``a`` must feed ``b``); or ``I(X;B)`` over the probe set (≤ log m).
    estimator : str
        ``"auto"`` or any name of ``condpost.info.mutual_information`` for continuous
        pairs; when one side takes finitely many values (``"input"``, or activations that
        do not depend on the lifted weights) ``"auto"``/``"ross"`` (k-NN, Ross 2014) or
        ``"gaussian_mixture"`` (a Gaussian fit of ``B`` per value and the exact mixture
        MI; exact for linear-in-weights readouts of a Gaussian posterior, an
        approximation otherwise).
    draws : int, optional
        Use a random subset of this many weight draws (default all).
    pairs : int, optional
        Number of iid ``(x, w)`` pairs (default: the number of draws; half of it for
        ``"channel"`` with ``source="mixture"``). Never more: a draw is used once.
    bootstrap : int
        Half-sampling replicates for ``stderr`` (default 200; 0 disables it).
    resample : "auto", "draws", "probes", "both" or tuple
        Bootstrap axes. ``"auto"``: weight draws always; probes too when they are a
        sample (``m ≥ 20`` and ``target != "input"``).
    source : {"mixture", "center"}
        ``"channel"`` only: ``A' = A(x; w')`` with an independent draw ``w'`` (the
        activation law over the class), or ``A' = A(x; w*)``.
    seed : int
        Seed of pairing, bootstrap and any estimator randomness.
    progress : bool
        Progress bar over bootstrap replicates.
    **estimator_opts
        Passed to the array estimator (e.g. ``k``).

    Returns
    -------
    InfoResult
        ``value`` (nats), ``stderr`` (bootstrap), ``estimator`` and ``settings`` with the
        target, sites, ``nβ``, ``γ``, constraint tolerances, draws, probes, pairs.
    """
    target = _check_target(target)
    if target == "input":
        if a is not None:
            raise ValueError(
                "target='input' measures I(X;B) with X the probe identity: leave a=None (got "
                f"a={a!r}); for activations at a use target='observational'"
            )
    elif a is None:
        raise ValueError(f"target={target!r} needs the site a (a module path)")
    if a is not None and a == b:
        raise ValueError(f"a and b are the same site {a!r}; I(A;A) is the entropy: use entropy()")
    return _run(
        ref,
        "mi",
        probes=probes,
        a=a,
        b=b,
        target=target,
        estimator=estimator,
        draws=draws,
        pairs=pairs,
        bootstrap=bootstrap,
        resample=resample,
        source=source,
        seed=seed,
        progress=progress,
        opts=estimator_opts,
        on_bound=on_bound,
    )


def entropy(
    ref: ReferenceClass,
    *,
    probes,
    a: str,
    b: str | None = None,
    target: str = "observational",
    estimator: str = "auto",
    draws: int | None = None,
    pairs: int | None = None,
    bootstrap: int = 200,
    resample="auto",
    source: str = "mixture",
    seed: int = 0,
    progress: bool = True,
    **estimator_opts,
):
    """Differential entropy of activations across a reference class, with bootstrap errors.

    ``target="observational"``: ``h(A)`` of the site ``a`` under iid ``(x, w)`` pairs.
    ``target="channel"``: ``h(C_W(A'))`` at site ``b`` with ``A'`` at site ``a`` drawn
    independently of ``W`` (as in ``mutual_information``). Activations that take
    finitely many values get the plug-in (discrete) entropy. Other arguments as in
    ``mutual_information``. Differential entropies depend on the units of the
    activations (a rescaling by ``c`` shifts ``h`` by ``dim·log|c|``); estimator options
    such as standardisation are those of ``condpost.info.entropy`` on arrays.
    """
    target = _check_target(target, ("observational", "channel"))
    if target == "channel" and b is None:
        raise ValueError("target='channel' needs b, the site downstream of a whose entropy to take")
    if target == "observational" and b is not None:
        raise ValueError("target='observational' takes one site a; b is for target='channel'")
    res = _run(
        ref,
        "entropy",
        probes=probes,
        a=a,
        b=b,
        target=target,
        estimator=estimator,
        draws=draws,
        pairs=pairs,
        bootstrap=bootstrap,
        resample=resample,
        source=source,
        seed=seed,
        progress=progress,
        opts=estimator_opts,
    )
    return res
