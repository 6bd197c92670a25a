"""MI estimators on distributions with known MI (N = 5,000), and KSG speed.

Run: ``python benchmarks/mi_estimators.py`` (a minute or two on 2 cores; ``--quick`` for
N = 2,000 and fewer tasks; ``--jax`` adds a naive jitted JAX KSG to the speed table. That
is *not* bmi's implementation, whose ~0.8 s at N = 5,000 is quoted in the anchor measurements).

The suite follows the families of Czyż et al. (2023, "Beyond Normal", NeurIPS):
correlated Gaussians from 1×1 to 25×25 (dense and sparse), multivariate Student-t with
zero correlation, and MI-preserving transforms of these (per-coordinate monotone maps and
a spiral rotation ``x ↦ R(v‖x‖²) x``, a diffeomorphism). Every true MI is a closed form:

* Gaussian: ``I = ½ log(det Σ_x det Σ_y / det Σ)``.
* Student-t with shape ``Σ`` and ``ν`` degrees of freedom (Arellano-Valle, Contreras-Reyes
  & Genton 2013, Scand. J. Stat. 40:42): ``I = I_Gauss(Σ) + f(dx) + f(dy) − f(dx+dy)``,
  ``f(p) = log Γ(ν/2) − log Γ((ν+p)/2) + (ν+p)/2 · [ψ((ν+p)/2) − ψ(ν/2)]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.special import digamma, gammaln

import condpost.info as info


# ----------------------------------------------------------------------------- tasks
def _gauss_mi(cov: np.ndarray, dx: int) -> float:
    ld = lambda a: np.linalg.slogdet(a)[1]  # noqa: E731
    return 0.5 * (ld(cov[:dx, :dx]) + ld(cov[dx:, dx:]) - ld(cov))


def dense_cov(dx: int, dy: int, rho: float) -> np.ndarray:
    """All off-diagonal correlations (within and across the blocks) equal to ``rho``."""
    d = dx + dy
    return (1 - rho) * np.eye(d) + rho * np.ones((d, d))


def sparse_cov(dx: int, dy: int, rho: float, pairs: int = 2) -> np.ndarray:
    """``x_i`` and ``y_i`` correlated (``rho``) for ``i < pairs``; everything else independent."""
    c = np.eye(dx + dy)
    for i in range(pairs):
        c[i, dx + i] = c[dx + i, i] = rho
    return c


def student_t_mi(dx: int, dy: int, nu: float, cov: np.ndarray | None = None) -> float:
    def f(p):
        return (
            gammaln(nu / 2)
            - gammaln((nu + p) / 2)
            + (nu + p) / 2 * (digamma((nu + p) / 2) - digamma(nu / 2))
        )

    ig = 0.0 if cov is None else _gauss_mi(cov, dx)
    return float(ig + f(dx) + f(dy) - f(dx + dy))


def sample_gauss(rng, cov, n):
    return rng.standard_normal((n, cov.shape[0])) @ np.linalg.cholesky(cov).T


def sample_t(rng, cov, nu, n):
    z = sample_gauss(rng, cov, n)
    return z / np.sqrt(rng.chisquare(nu, size=(n, 1)) / nu)


def spiral(x: np.ndarray, speed: float = 0.5) -> np.ndarray:
    """Rotate the first two coordinates by ``speed · ‖x‖²`` (invertible: ‖x‖ is kept)."""
    a = speed * np.sum(x**2, axis=1)
    c, s = np.cos(a), np.sin(a)
    out = x.copy()
    out[:, 0] = c * x[:, 0] - s * x[:, 1]
    out[:, 1] = s * x[:, 0] + c * x[:, 1]
    return out


def half_cube(x):
    return x * np.sqrt(np.abs(x))


def wiggly(x):
    return x + 0.4 * np.sin(2 * x)  # derivative 1 + 0.8 cos(2x) > 0: monotone


def normal_cdf(x):
    from scipy.special import ndtr

    return ndtr(x)


def tasks(quick: bool = False):
    """``(name, sampler(rng, n) -> (x, y), true MI)`` for the known-MI suite."""
    out = []

    def gauss_task(name, cov, dx, tx=None, ty=None):
        mi = _gauss_mi(cov, dx)

        def sampler(rng, n):
            z = sample_gauss(rng, cov, n)
            x, y = z[:, :dx], z[:, dx:]
            return (x if tx is None else tx(x)), (y if ty is None else ty(y))

        out.append((name, sampler, mi))

    def t_task(name, dx, dy, nu, tx=None, ty=None):
        cov = np.eye(dx + dy)
        mi = student_t_mi(dx, dy, nu)

        def sampler(rng, n):
            z = sample_t(rng, cov, nu, n)
            x, y = z[:, :dx], z[:, dx:]
            return (x if tx is None else tx(x)), (y if ty is None else ty(y))

        out.append((name, sampler, mi))

    gauss_task("normal 1x1 rho=0.75", dense_cov(1, 1, 0.75), 1)
    gauss_task("normal dense 2x2", dense_cov(2, 2, 0.5), 2)
    gauss_task("normal dense 3x3", dense_cov(3, 3, 0.5), 3)
    gauss_task("normal dense 5x5", dense_cov(5, 5, 0.5), 5)
    if not quick:
        gauss_task("normal dense 25x25", dense_cov(25, 25, 0.5), 25)
    gauss_task("normal sparse 2x2", sparse_cov(2, 2, 0.8), 2)
    gauss_task("normal sparse 3x3", sparse_cov(3, 3, 0.8), 3)
    gauss_task("normal sparse 5x5", sparse_cov(5, 5, 0.8), 5)
    if not quick:
        gauss_task("normal sparse 25x25", sparse_cov(25, 25, 0.8), 25)
    t_task("student-t 1x1 nu=1", 1, 1, 1)
    t_task("student-t 2x2 nu=1", 2, 2, 1)
    t_task("student-t 2x2 nu=2", 2, 2, 2)
    t_task("student-t 3x3 nu=2", 3, 3, 2)
    t_task("student-t 5x5 nu=2", 5, 5, 2)
    t_task("student-t 5x5 nu=3", 5, 5, 3)
    t_task("asinh student-t 1x1 nu=1", 1, 1, 1, np.arcsinh, np.arcsinh)
    gauss_task("normal-cdf dense 3x3", dense_cov(3, 3, 0.5), 3, normal_cdf, normal_cdf)
    gauss_task("half-cube sparse 5x5", sparse_cov(5, 5, 0.8), 5, half_cube, half_cube)
    gauss_task("wiggly 1x1 rho=0.75", dense_cov(1, 1, 0.75), 1, wiggly, wiggly)
    gauss_task("spiral sparse 3x3", sparse_cov(3, 3, 0.8), 3, spiral, None)
    gauss_task("spiral dense 5x5", dense_cov(5, 5, 0.5), 5, spiral, None)
    return out


ESTIMATORS = {
    "default (auto)": dict(estimator="auto"),
    "KSG k=10": dict(estimator="ksg", k=10),
    "Gaussian (CCA)": dict(estimator="gaussian"),
    "Gaussian copula": dict(estimator="copula"),
}


def accuracy_table(n: int, quick: bool, seed: int) -> None:
    rows, errs, times = [], {e: [] for e in ESTIMATORS}, {e: 0.0 for e in ESTIMATORS}
    for i, (name, sampler, mi) in enumerate(tasks(quick)):
        x, y = sampler(np.random.default_rng(seed + i), n)
        cells = [name, f"{mi:.3f}"]
        for est, kw in ESTIMATORS.items():
            t0 = time.perf_counter()
            r = info.mutual_information(x, y, stderr=None, seed=seed + i, **kw)
            times[est] += time.perf_counter() - t0
            errs[est].append(abs(r.value - mi))
            cells.append(f"{r.value:.3f}")
        rows.append(cells)
    head = ["task", "true"] + list(ESTIMATORS)
    w = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    line = lambda c: "| " + " | ".join(s.ljust(w[j]) for j, s in enumerate(c)) + " |"  # noqa: E731
    print(f"\nKnown-MI suite, N = {n} (values in nats; stderr off)\n")
    print(line(head))
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print(line(r))
    print(line(["**mean abs. error**", ""] + [f"**{np.mean(errs[e]):.3f}**" for e in ESTIMATORS]))
    print(line(["max abs. error", ""] + [f"{np.max(errs[e]):.3f}" for e in ESTIMATORS]))
    print(line(["total time (s)", ""] + [f"{times[e]:.1f}" for e in ESTIMATORS]))


# ----------------------------------------------------------------------------- speed
def _jax_ksg():
    """A straightforward jitted JAX KSG (full distance matrices): the speed reference."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import digamma as jdigamma

    @jax.jit
    def ksg(x, y):
        n = x.shape[0]
        dx = jnp.max(jnp.abs(x[:, None] - x[None]), -1)
        dy = jnp.max(jnp.abs(y[:, None] - y[None]), -1)
        eps = -jax.lax.top_k(-jnp.maximum(dx, dy), 11)[0][:, -1]
        nx = (dx < eps[:, None]).sum(1) - 1
        ny = (dy < eps[:, None]).sum(1) - 1
        return (
            jdigamma(10.0) + jdigamma(1.0 * n) - jnp.mean(jdigamma(nx + 1.0) + jdigamma(ny + 1.0))
        )

    return lambda x, y: float(ksg(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))


def _best(fn, reps: int = 3) -> tuple[float, float]:
    """Best wall-clock and best process CPU time (all threads) over ``reps`` runs."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def speed_table(n: int, use_jax: bool) -> None:
    import os

    rng = np.random.default_rng(0)
    jk = _jax_ksg() if use_jax else None
    print(
        f"\nKSG speed, N = {n}, k = 10, no stderr; best of 3; wall / process-CPU seconds; "
        f"torch threads = {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| dims | backend | KSG max-norm | KSG Euclidean | naive JAX KSG (max-norm) | "
        "default (auto, incl. surrogate) |"
    )
    print("|---|---|---|---|---|---|")
    for d in (1, 2, 5, 10, 25):
        cov = dense_cov(d, d, 0.5)
        z = sample_gauss(rng, cov, n)
        x, y = z[:, :d], z[:, d:]

        def run(x=x, y=y, **kw):
            return info.mutual_information(x, y, "ksg", k=10, stderr=None, **kw)

        backend = run().settings["backend"]
        tm = _best(run)
        te = _best(lambda run=run: run(metric="euclidean")) if d > 1 else tm
        ta = _best(lambda x=x, y=y: info.mutual_information(x, y, stderr=None), reps=1)
        tj = _best(lambda x=x, y=y: jk(x, y)) if jk is not None else (float("nan"),) * 2
        cell = lambda t: f"{t[0]:.3f} / {t[1]:.3f}"  # noqa: E731
        print(f"| {d}x{d} | {backend} | {cell(tm)} | {cell(te)} | {cell(tj)} | {cell(ta)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--jax", action="store_true", help="also time a naive jitted JAX KSG (slow; not bmi's)"
    )
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    n = 2000 if a.quick and a.n == 5000 else a.n
    if not a.no_accuracy:
        accuracy_table(n, a.quick, a.seed)
    if not a.no_speed:
        speed_table(n, a.jax)


if __name__ == "__main__":
    main()
