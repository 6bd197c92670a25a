"""``LocalPosterior``: the backend-neutral declaration of a conditioned, tempered local posterior.

.. math::

    \\pi_C(w) \\propto \\exp\\Big\\{-n\\beta L_n(w) - \\tfrac{\\gamma}{2}\\|w-w^*\\|^2
    - \\sum_c \\rho_c D_c(w)\\Big\\}

with ``L_n`` the mean per-sample NLL, ``nβ`` the inverse temperature times ``n``
(default ``n/log n``, docs/theory.md §1.4), ``γ`` the localization and ``ρ_c D_c`` the
preserved-feature factors (docs/theory.md §2). The potential ``U(w)`` is written once in
torch; the Pyro model form (``LocalPosterior.model``) is built from the public
primitives, and both give the same log density.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._errors import CenterWarning, check_finite, check_options, warn
from .constraints import BoundConstraint, Constraint, ForwardView
from .data import DataSource, Tensors, as_source
from .lifting import LiftedNetwork
from .likelihoods import Likelihood, as_likelihood
from .primitives import check_localization, lift, preserve, resolve_nbeta, temper

__all__ = ["LocalPosterior"]


class LocalPosterior:
    """A tempered local posterior around a trained network, optionally conditioned.

    Parameters
    ----------
    net : torch.nn.Module
        The trained network at ``w*``. It is never modified. A TransformerLens
        ``HookedTransformer`` or a Hugging Face causal LM works as it is (docs/models.md).
    data : tuple (x, y), DataLoader, dataset or iterable of batches
        The ``n`` samples that define ``L_n``: tensors ``(x, y)`` in memory, a
        ``torch.utils.data.DataLoader`` or map-style dataset (rows gathered on demand),
        a token mapping or dataset with ``input_ids`` and ``attention_mask`` (with
        ``CausalLM()``), or a re-iterable of ``(x, y)`` batches (full passes only).
        Held as ``post.data`` (``condpost.data``; docs/data.md).
    likelihood : Likelihood or callable
        ``Categorical()``, ``Gaussian(scale=s)``, ``Bernoulli()``, or a callable
        ``(output, y) -> per-sample NLL [n]``.
    nbeta : float or "wbic"
        nβ; ``"wbic"`` (default) is ``n/log n``. Note that devinterp's default is the
        batch size over its log, not this.
    localization : float
        γ > 0, precision of the local prior ``N(w*, γ⁻¹ I)``. Required: there is no
        zero default.
    include, exclude : str or sequence of str, optional
        Glob patterns over ``net.named_parameters()`` names (or module paths) selecting
        which parameters are lifted (default: all); the rest stay at ``w*``. Lifting a
        subset is the weight-refined setting (docs/theory.md C10). ``include`` also lifts
        slices: ``"blocks.0.attn.W_Q[1]"`` or ``{"blocks.0.attn.W_Q": (1,)}`` is head 1
        only (docs/models.md).
    dtype : torch.dtype, optional
        Computation dtype (default: the network's). Use ``torch.float64`` for exact tests.
    center : tensor or mapping, optional
        Override ``w*`` (default: the module's current weights).
    check_center : bool
        Warn when ``w*`` is far from a minimum of ``L_n`` (default True).
    """

    def __init__(
        self,
        net: nn.Module,
        data: tuple[torch.Tensor, torch.Tensor],
        likelihood: Likelihood | Callable,
        *,
        nbeta: float | str = "wbic",
        localization: float,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        center=None,
        check_center: bool = True,
    ) -> None:
        self.lifted = LiftedNetwork(net, include, exclude, dtype, center)
        self.dtype = self.lifted.dtype
        self.device = self.lifted.device
        self.likelihood = as_likelihood(likelihood)
        # an index mapping ({"blocks.0.attn.W_Q": (1,)}) is kept as "pattern[index]"
        # strings: the same selection, and JSON-able for the run's config
        self.include, self.exclude = self.lifted.include_spec, exclude
        if isinstance(data, Tensors):  # a re-declaration on the same tensors
            data = (data.x, data.y)
        elif isinstance(data, DataSource):  # ... on the same stream: re-bound to this dtype
            data = data.raw
        src = as_source(data, self._prepare_batch, tokens=self._token_spec())
        if not isinstance(src, tuple):
            src.raw = data
            self.data: DataSource = src
            self._declare_streamed(src, nbeta, localization)
        else:
            self._declare_tensors(src, nbeta, localization)
        self._specs: list[Constraint] = []
        self._bound: list[BoundConstraint] = []
        self._plan: dict[int, tuple[torch.Tensor, list[str]]] = {}
        self.center_check: dict = {}
        self.calibration: dict = {}
        if check_center:
            self.center_check = self._check_center()

    def _declare_tensors(self, data, nbeta, localization) -> None:
        """The declaration on in-memory tensors ``data = (x, y)`` (``Tensors``)."""
        x = torch.as_tensor(data[0])
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(
                f"data is empty: data[0] (inputs x) has shape {tuple(x.shape)}, so there are no "
                f"samples to define L_n. Pass x of shape [n, ...] and y of shape [n, ...] with "
                f"n ≥ 1 (n ≥ 2 for nbeta='wbic')."
            )
        if x.is_floating_point():
            x = x.to(self.dtype)
        x = x.to(self.device)
        check_finite(x, "data[0] (inputs x)")
        y = _bool_targets(torch.as_tensor(data[1]), self.likelihood)
        y = self.likelihood.prepare_targets(y, self.dtype).to(self.device)
        if y.dim() == 0:
            raise ValueError(
                f"data[1] (targets y) is a scalar; it needs one target per sample, shape "
                f"[{x.shape[0]}, ...]"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"data: x has {x.shape[0]} samples but y has {y.shape[0]}; they must match"
            )
        self.data = Tensors(x, y)
        self.n = int(x.shape[0])
        self.nbeta = resolve_nbeta(nbeta, self.n)
        self.nbeta_spec = nbeta if isinstance(nbeta, str) else float(nbeta)
        self.localization = check_localization(localization)
        out = _forward_at_center(self.lifted, self.center, x)
        if not _REDECLARING:
            _check_deterministic_and_gradients(self.lifted, self.center, x, self.localization)
        self.likelihood.validate(out, y)
        with torch.no_grad():
            nll = self.likelihood.nll(out, y)
        if tuple(nll.shape) != (self.n,):
            raise ValueError(
                f"likelihood returned shape {tuple(nll.shape)}; expected per-sample NLLs ({self.n},)"
            )
        check_finite(nll, "the per-sample NLL at w*")
        self.loss_center = float(nll.mean())

    def _declare_streamed(self, src: DataSource, nbeta, localization) -> None:
        """The declaration on a streamed source: one checked pass over its batches at
        ``w*`` (forward, likelihood, finiteness; the first batch's also checked for a
        deterministic forward), ``n`` counted and ``L_n(w*)`` summed batch by batch."""
        if src.n:  # a bad nbeta is refused before the pass
            resolve_nbeta(nbeta, src.n)
        self.nbeta_spec = nbeta if isinstance(nbeta, str) else float(nbeta)
        self.localization = check_localization(localization)
        total = 0.0
        for b, (xb, yb) in enumerate(src.scan()):
            check_finite(xb, f"data= batch {b} (inputs x)")
            out = _forward_at_center(self.lifted, self.center, xb)
            if b == 0 and not _REDECLARING:
                _check_deterministic_and_gradients(self.lifted, self.center, xb, self.localization)
            self.likelihood.validate(out, yb)
            with torch.no_grad():
                nll = self.likelihood.nll(out, yb)
            if tuple(nll.shape) != (xb.shape[0],):
                raise ValueError(
                    f"likelihood returned shape {tuple(nll.shape)} on batch {b} of data=; "
                    f"expected per-sample NLLs ({xb.shape[0]},)"
                )
            check_finite(nll, f"the per-sample NLL at w* (batch {b} of data=)")
            total += float(nll.sum(dtype=torch.float64))
        self.n = int(src.n)
        self.nbeta = resolve_nbeta(nbeta, self.n)
        self.loss_center = total / self.n

    def _token_spec(self):
        """``(ignore_index, mask_in_x)`` for token batches (``CausalLM``), else None."""
        from .likelihoods import CausalLM
        from .models import network_kind

        if not isinstance(self.likelihood, CausalLM):
            return None
        return self.likelihood.ignore_index, network_kind(self.lifted.net) != "torch"

    def _prepare_batch(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of a streamed source as the declaration computes with it: floating
        inputs in its dtype, targets encoded by the likelihood, both on its device."""
        x = torch.as_tensor(x)
        if x.is_floating_point():
            x = x.to(self.dtype)
        y = _bool_targets(torch.as_tensor(y), self.likelihood)
        y = self.likelihood.prepare_targets(y, self.dtype)
        return x.to(self.device), y.to(self.device)

    @property
    def x(self) -> torch.Tensor:
        """The inputs ``[n, ...]`` (in-memory data only; a streamed source raises)."""
        self.data.require_memory("post.x (all inputs at once)")
        return self.data.x

    @property
    def y(self) -> torch.Tensor:
        """The targets ``[n, ...]`` (in-memory data only; a streamed source raises)."""
        self.data.require_memory("post.y (all targets at once)")
        return self.data.y

    # ------------------------------------------------------------------ basics
    @property
    def center(self) -> torch.Tensor:
        """``w*`` as a flat vector (a private copy; never aliased by inference)."""
        return self.lifted.center

    @property
    def d(self) -> int:
        return self.lifted.d

    @property
    def constraints(self) -> list[BoundConstraint]:
        return list(self._bound)

    def __repr__(self) -> str:
        cs = ", ".join(b.name for b in self._bound) or "none"
        return (
            f"LocalPosterior(d={self.d}, n={self.n}, nbeta={self.nbeta:.4g}, "
            f"localization={self.localization:g}, likelihood={self.likelihood!r}, constraints=[{cs}])"
        )

    def preserve(self, constraint: Constraint) -> LocalPosterior:
        """Add a preserved-feature constraint; returns ``self`` for chaining."""
        if not isinstance(constraint, Constraint):
            raise TypeError(
                f"preserve expects a condpost constraint (e.g. cp.Activations(...)); got "
                f"{type(constraint).__name__}"
            )
        bound = constraint.bind(self)
        if any(b.name == bound.name for b in self._bound):
            raise ValueError(
                f"a constraint named {bound.name!r} is already declared; pass name=... to tell "
                f"them apart"
            )
        self._specs.append(constraint)
        self._bound.append(bound)
        for probes, req_sites in bound.requests():
            key = id(probes)
            p, sites = self._plan.get(key, (probes, []))
            sites = sites + [s for s in req_sites if s not in sites]
            self._plan[key] = (p, sites)
        return self

    def refined(
        self, *, include=None, exclude=None, data=None, nbeta=None, localization=None
    ) -> LocalPosterior:
        """The weight- and/or data-refined declaration (``condpost.slt.refined_posterior``):
        only ``include``/``exclude`` lifted (the rest at this declaration's ``w*``), and/or
        ``data`` defining ``L_n``. ``nbeta`` and ``localization`` default to this
        declaration's; constraints are not carried over."""
        lifted = self.lifted
        if include is None and exclude is None:
            include, exclude = self.include, self.exclude
        # w* as full parameters, which a declaration of any selection (sliced or whole) takes
        center = lifted.full_named(self.center)
        return LocalPosterior(
            lifted.net,
            self.data if data is None else data,
            self.likelihood,
            nbeta=self.nbeta_spec if nbeta is None else nbeta,
            localization=self.localization if localization is None else localization,
            include=include,
            exclude=exclude,
            dtype=self.dtype,
            center=center,
            check_center=data is None,
        )

    def with_nbeta(self, nbeta) -> LocalPosterior:
        """A copy of this declaration at another nβ (constraints re-bound)."""
        return self._replace(nbeta=nbeta)

    def _replace(self, **kw) -> LocalPosterior:
        args = dict(
            nbeta=self.nbeta_spec,
            localization=self.localization,
            include=self.include,
            exclude=self.exclude,
            dtype=self.dtype,
            center=self.lifted.center,
            check_center=False,
        )
        specs = kw.pop("constraints", self._specs)
        args.update(kw)
        _REDECLARING.append(True)  # the checks of the network already ran for this one
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*non-floating parameter")
                new = LocalPosterior(self.lifted.net, self.data, self.likelihood, **args)
        finally:
            _REDECLARING.pop()
        for c in specs:
            new.preserve(c)
        return new

    # ------------------------------------------------------------------ potential
    def _as_w(self, w) -> torch.Tensor:
        w = torch.as_tensor(w)
        if w.shape[-1:] != (self.d,):
            raise ValueError(f"w must have trailing size d={self.d}; got shape {tuple(w.shape)}")
        return w.to(dtype=self.dtype, device=self.device)

    def view(self, w: torch.Tensor) -> ForwardView:
        return ForwardView(
            self.lifted, self.lifted.unflatten(w), self._plan, flat=w, loss_fn=self.loss
        )

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """``L_n(w)``: the mean per-sample NLL on the data.

        A streamed ``data=`` (DataLoader, dataset, iterable of batches) is summed batch by
        batch; under autograd the graph of every batch is then kept until the backward
        pass, so gradients of ``L_n`` over data beyond memory go through ``evaluate``.
        """
        if self.data.in_memory:
            out = self.lifted.forward(w, self.data.x)
            return self.likelihood.nll(out, self.data.y).mean()
        total = None
        for xb, yb in self.data.batches():
            s = self.likelihood.nll(self.lifted.forward(w, xb), yb).sum()
            total = s if total is None else total + s
        return total / self.n

    def terms(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-term breakdown of ``U(w)``: ``loss`` (nβ·L_n), ``localizer``, ``constraint/<name>``."""
        w = self._as_w(w)
        out = {"loss": self.nbeta * self.loss(w)}
        diff = w - self.center
        out["localizer"] = 0.5 * self.localization * (diff * diff).sum()
        if self._bound:
            v = self.view(w)
            for b in self._bound:
                out[f"constraint/{b.name}"] = b.penalty(v)
        return out

    def potential(self, w: torch.Tensor) -> torch.Tensor:
        """``U(w) = nβ L_n(w) + γ/2‖w − w*‖² + Σ_c ρ_c D_c(w)`` (target ∝ e^{−U})."""
        return sum(self.terms(w).values())

    def log_density(self, w: torch.Tensor) -> torch.Tensor:
        """``−U(w)`` plus the local prior's normaliser ``(d/2) log(γ/2π)``.

        This equals the log joint of the Pyro model form (``model``), constants
        included, so the two can be compared to float precision.
        """
        return -self.potential(w) + 0.5 * self.d * math.log(self.localization / (2 * math.pi))

    def defects(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """``D_c(w)`` for each constraint (before the strength ρ_c)."""
        v = self.view(self._as_w(w))
        return {b.name: b.defect(v) for b in self._bound}

    # ------------------------------------------------------------------ Pyro model form
    def model(self) -> None:
        """The Pyro model form, written with the public primitives.

        Sample sites ``"net.<param>"`` (local prior), the tempered likelihood site
        ``"y"`` inside ``plate("data")``, and one factor ``"constraint/<name>"`` per
        constraint. Its log joint equals ``log_density`` at the same weights.

        Lifted weights with leading batch dims (``Predictive(parallel=True)``, vectorized
        ELBO particles) are evaluated per batch element. Then a likelihood other than
        ``Categorical`` is emitted as the factor site ``"y"`` (the same tempered
        log-likelihood, but not a sample site to draw predictions from).
        """
        import pyro

        self.data.require_memory("LocalPosterior.model (the Pyro model form: Pyro NUTS/HMC, SVI)")
        f = lift("net", self.lifted, localization=self.localization)
        out = f(self.x)
        batch = self.lifted.batch_shape(f.params)
        if batch:
            self._model_batched(f, out, batch)
            return
        with temper(self.nbeta, self.n):
            with pyro.plate("data", self.n):
                self.likelihood.observe("y", out, self.y)
        if self._bound:
            v = ForwardView(self.lifted, f.params, self._plan, loss_fn=self.loss)
            for b in self._bound:
                if b.family == "gaussian" and b.target is not None:
                    if b.tolerance is not None:
                        preserve(b.name, b.feature(v), b.target, tolerance=b.tolerance)
                    else:
                        preserve(b.name, log_factor=-b.rho * b.defect(v))
                else:
                    preserve(b.name, log_factor=-b.penalty(v))

    def _model_batched(self, f, out: torch.Tensor, batch: tuple[int, ...]) -> None:
        """``model`` for lifted weights with batch dims ``batch``: per-element densities."""
        import pyro

        from ._batching import batched
        from .likelihoods import Categorical
        from .primitives import _align_to_plate

        with temper(self.nbeta, self.n):
            with pyro.plate("data", self.n):
                if isinstance(self.likelihood, Categorical):
                    self.likelihood.observe("y", out, self.y)
                else:
                    flat_out = out.reshape((-1,) + tuple(out.shape[len(batch) :]))
                    nll = torch.stack([self.likelihood.nll(o, self.y) for o in flat_out])
                    pyro.factor("y", -nll.reshape(batch + (self.n,)))
        if not self._bound:
            return
        W = f.flat().reshape(-1, self.d)
        for b in self._bound:

            def pen(w, b=b):
                return b.penalty(self.view(w))

            lf = -batched(pen, f"constraint {b.name!r} (batched model)")(W)
            preserve(b.name, log_factor=_align_to_plate(lf.reshape(batch)))

    def flat_to_sites(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map a flat ``w`` to the model form's site values ``{"net.<param>": tensor}``."""
        return {f"net.{k}": v for k, v in self.lifted.unflatten(self._as_w(w)).items()}

    # ------------------------------------------------------------------ batched evaluation
    def evaluate(
        self,
        W: torch.Tensor,
        *,
        grad: bool = True,
        loss: bool = True,
        defects: bool = True,
        chunk: int = 256,
    ) -> dict:
        """Per-draw statistics for draws ``W`` of shape ``[S, d]``.

        Returns a dict of tensors ``[S]``: ``loss`` (L_n) when ``loss``, ``defect/<name>``
        (D_c) and ``exact/<name>/<key>`` when ``defects``, and with ``grad=True``
        ``virial`` = ``(w − w*)·∇U(w)``.
        """
        from torch.func import grad as fgrad

        from ._batching import batched

        W = self._as_w(W).reshape(-1, self.d)
        bound = self._bound if defects else []
        c = self.center

        def one(w):
            out = {}
            if grad:
                g = fgrad(self.potential)(w)
                out["virial"] = ((w - c) * g).sum()
            if loss:
                out["loss"] = self.loss(w)
            if bound:
                v = self.view(w)
                for b in bound:
                    out[f"defect/{b.name}"] = b.defect(v)
                for b in bound:
                    for k, val in b.exact(v).items():
                        out[f"exact/{b.name}/{k}"] = val
            return out

        if not (grad or loss or bound) or W.shape[0] == 0:
            return {}
        if not self.data.in_memory and (grad or loss):
            return self._evaluate_streamed(W, grad=grad, loss=loss, bound=bound, chunk=chunk)
        fn = batched(one, f"evaluate ({type(self.lifted.net).__name__})")
        parts = []
        with torch.no_grad():  # torch.func.grad inside still differentiates
            for i in range(0, W.shape[0], chunk):
                parts.append(fn(W[i : i + chunk]))
        return {k: torch.cat([p[k].detach() for p in parts]) for k in parts[0]}

    def _evaluate_streamed(self, W, *, grad, loss, bound, chunk) -> dict:
        """``evaluate`` on a streamed source: one pass over the data, each batch applied
        to every draw (in groups of at most ``chunk`` draws, and fewer for large batches),
        accumulating ``Σ_i ℓ_i(w)`` and its gradient; the localizer's and the
        constraints' gradients are added once."""
        from torch.func import grad as fgrad
        from torch.func import grad_and_value

        from ._batching import batched

        K, c, lik, fwd = W.shape[0], self.center, self.likelihood, self.lifted.forward
        name = type(self.lifted.net).__name__
        tot = torch.zeros(K, dtype=torch.float64, device=W.device)
        gsum = torch.zeros_like(W) if grad else None
        with torch.no_grad():
            for xb, yb in self.data.batches():
                G = max(1, min(chunk, (1 << 12) // max(int(xb.shape[0]), 1)))

                def part(w, xb=xb, yb=yb):
                    return lik.nll(fwd(w, xb), yb).sum()

                fn = batched(grad_and_value(part) if grad else part, f"evaluate ({name})")
                for i in range(0, K, G):
                    if grad:
                        g, v = fn(W[i : i + G])
                        gsum[i : i + G] += g.detach()
                    else:
                        v = fn(W[i : i + G])
                    tot[i : i + G] += v.detach().to(torch.float64)
            out: dict[str, torch.Tensor] = {}
            if grad:
                diff = W - c
                gU = gsum * (self.nbeta / self.n) + self.localization * diff
                if self._bound:

                    def pen(w):
                        v = self.view(w)
                        return sum(b.penalty(v) for b in self._bound)

                    gp = batched(fgrad(pen), f"evaluate ({name})")
                    gU = gU + torch.cat([gp(W[i : i + chunk]) for i in range(0, K, chunk)])
                out["virial"] = (diff * gU).sum(-1)
            if loss:
                out["loss"] = (tot / self.n).to(W.dtype)
            if bound:

                def one(w):
                    v = self.view(w)
                    o = {f"defect/{b.name}": b.defect(v) for b in bound}
                    for b in bound:
                        for k, val in b.exact(v).items():
                            o[f"exact/{b.name}/{k}"] = val
                    return o

                fd = batched(one, f"evaluate ({name})")
                parts = [fd(W[i : i + chunk]) for i in range(0, K, chunk)]
                out.update({k: torch.cat([p[k].detach() for p in parts]) for k in parts[0]})
        return out

    # ------------------------------------------------------------------ centre check
    def _check_center(self, max_iter: int = 50) -> dict:
        """Is ``w*`` near a minimum? Estimate the quadratic-model shift of λ̂.

        With ``g = ∇(nβ L_n)(w*)`` and ``H`` its Hessian, the locally Gaussian posterior
        has mean shift ``δ = −(H + γI)⁻¹ g`` and
        ``E[nβ ΔL] − ½tr(HΣ) = ½ δᵀHδ + gᵀδ`` (docs/theory.md §4.1), computed here by conjugate
        gradients on Hessian-vector products.
        """
        from torch.func import grad as fgrad
        from torch.func import jvp

        c = self.center

        def parts():
            """``nβ·L_n`` as a sum of terms: one for in-memory data, one per batch of a
            streamed source (so a gradient or Hessian-vector product holds one batch)."""
            if self.data.in_memory:
                yield lambda w: self.nbeta * self.loss(w)
                return
            k = self.nbeta / self.n
            lik, fwd = self.likelihood, self.lifted.forward
            for xb, yb in self.data.batches():
                yield lambda w, xb=xb, yb=yb: k * lik.nll(fwd(w, xb), yb).sum()

        def total(fn):
            out = None
            for tl in parts():
                v = fn(tl)
                out = v if out is None else out + v
            return out

        def grad_of(tl):
            try:
                return fgrad(tl)(c).detach()
            except Exception:  # noqa: BLE001
                w = c.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(tl(w), w)
                return g

        g = total(grad_of)
        gnorm = float(g.norm())
        info = {"grad_norm": gnorm, "lambda_shift": 0.0, "negative_curvature": False}
        if gnorm == 0.0:
            return info

        def hvp_of(tl, v):
            try:
                with warnings.catch_warnings():
                    # forward-over-reverse may trigger torch's own jit deprecation notices
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return jvp(fgrad(tl), (c,), (v,))[1].detach()
            except Exception:  # noqa: BLE001
                w = c.clone().requires_grad_(True)
                (gg,) = torch.autograd.grad(tl(w), w, create_graph=True)
                (hv,) = torch.autograd.grad(gg, w, v)
                return hv.detach()

        def hvp(v):
            return total(lambda tl: hvp_of(tl, v))

        gamma = self.localization
        # CG for (H + γ I) s = g
        s = torch.zeros_like(g)
        r = g.clone()
        p = r.clone()
        rs = float(r @ r)
        for _ in range(max_iter):
            Ap = hvp(p) + gamma * p
            pAp = float(p @ Ap)
            if pAp <= 0:
                info["negative_curvature"] = True
                break
            alpha = rs / pAp
            s = s + alpha * p
            r = r - alpha * Ap
            rs_new = float(r @ r)
            if rs_new**0.5 < 1e-6 * gnorm:
                break
            p = r + (rs_new / rs) * p
            rs = rs_new
        delta = -s
        shift = 0.5 * float(delta @ hvp(delta)) + float(g @ delta)
        info["lambda_shift"] = shift
        if info["negative_curvature"]:
            warn(
                f"w* is not at a local minimum of the localized loss nβ·L_n + γ/2‖w − w*‖²: the "
                f"Hessian plus γ has a negative-curvature direction (|∇(nβ L_n)(w*)| = {gnorm:.3g}). "
                f"λ̂ and the reference class are then dominated by the descent away from w*. "
                f"Train w* further, or increase localization.",
                CenterWarning,
            )
        elif shift < -0.5:
            warn(
                f"w* is not at a minimum of L_n: |∇(nβ L_n)(w*)| = {gnorm:.3g}. In the local "
                f"quadratic model this lowers E[λ̂] by about {-shift:.3g} (docs/theory.md §4.2: λ̂ ≈ d/2 − "
                f"nβ·(L_n(w*) − min L_n)), and can make λ̂ negative. Refine w* with a few "
                f"full-batch gradient/L-BFGS steps, or use a smaller nbeta.",
                CenterWarning,
            )
        return info

    # ------------------------------------------------------------------ inference
    def sample(
        self,
        method: str = "nuts",
        *,
        chains: int = 4,
        warmup: int = 1000,
        draws: int = 1000,
        seed: int = 0,
        backend: str | None = None,
        progress: bool = True,
        **kwargs,
    ):
        """Sample the posterior and return a ``ReferenceClass``.

        Parameters
        ----------
        method : str
            A method of the registry (``condpost.infer.registry.methods()``): ``"nuts"``
            and ``"hmc"`` (full batch), ``"chees"`` (many-chain HMC on JAX), ``"mala"``,
            and the SG-MCMC methods ``"sgld"``, ``"rmsprop_sgld"``, ``"sghmc"``,
            ``"sgnht"`` (minibatches, vectorized chains).
        chains : int
            Number of chains (default 4), each started at ``w*``.
        warmup : int
            Warmup (adaptation) iterations per chain, discarded (default 1000).
        draws : int
            Kept draws per chain (default 1000).
        seed : int
            Seed; each chain gets an independent stream derived from it.
        backend : str, optional
            The executor. Default: the method's own, except that NUTS/HMC run on NumPyro
            (the potential exported to JAX) when the model exports, and on Pyro otherwise,
            with a one-line note saying why. ``backend="pyro"`` picks Pyro.
        progress : bool
            Show a progress bar (compilation included).
        **kwargs
            The method's options (an unknown name gets "did you mean"). NUTS/HMC:
            ``target_accept`` (0.8), ``max_tree_depth`` (10), ``dense_mass`` (False),
            ``step_size`` (initial, adapted), ``num_steps`` (HMC),
            ``adapt_step_size``/``adapt_mass_matrix`` (True), ``init_jitter`` (0). On the
            torch executors ``num_threads`` sets torch's intra-op threads while sampling;
            by default the faster of one thread and torch's setting is timed and used, and
            the user's setting is restored afterwards.
        """
        from .reference import ReferenceClass
        from .run import sample

        if isinstance(draws, str) and draws.lower() == "auto":
            # rounds of the same run until the plateau, virial, R-hat and MC-error
            # criteria hold (condpost.auto; SG-MCMC methods)
            from .auto import sample_auto_result

            result = sample_auto_result(
                self,
                method,
                chains=chains,
                warmup=warmup,
                seed=seed,
                backend=backend,
                progress=progress,
                **kwargs,
            )
            return ReferenceClass.from_result(self, result)
        result = sample(
            self,
            method,
            chains=chains,
            warmup=warmup,
            draws=draws,
            seed=seed,
            backend=backend,
            progress=progress,
            **kwargs,
        )
        return ReferenceClass.from_result(self, result)

    def fit(
        self,
        method: str = "svi",
        *,
        guide: str = "normal",
        steps: int = 2000,
        seed: int = 0,
        lr: float = 0.01,
        backend: str = "pyro",
        progress: bool = True,
        **kwargs,
    ):
        """Variational fit; returns an ``SVIResult`` with ``.sample(n)``.

        Parameters
        ----------
        guide : {"normal", "lowrank", "mvn"}
            Mean-field, low-rank-plus-diagonal, or full-covariance Gaussian, started at ``w*``.
        steps : int
            Number of Adam steps (default 2000).
        lr : float
            Initial learning rate (default 0.01), decayed 100× over the run.
        """
        from .infer import registry
        from .run import _count
        from .variational import SVIResult

        self.data.require_memory(f"fit(method={method!r}) (variational inference, full-batch)")
        seed = _count("seed", seed, 0)
        steps = _count("steps", steps, 1)
        m = registry.get(method, kind="vi")
        backend = "numpyro" if backend == "jax" else backend
        fn = registry.runner(m, backend)
        names, var = registry.options(fn)
        if not var:
            check_options(
                {k: v for k, v in kwargs.items() if k not in names},
                names,
                f"fit method={m.name!r} on backend={backend!r}",
                also_valid=("guide", "steps", "seed", "lr", "backend", "progress"),
            )
        fit = fn(self, guide=guide, steps=steps, seed=seed, lr=lr, progress=progress, **kwargs)
        return SVIResult.from_fit(self, fit)

    # ------------------------------------------------------------------ metadata
    def fingerprint(self) -> dict:
        """What must match for two sets of draws to belong to this declaration.

        A dict of component → hash (data, likelihood, architecture, lifted selection,
        centre, constraints) or value (nβ, γ, L_n(w*)); see ``condpost.fingerprint``.
        Computed once per declaration (constraints added later recompute it).
        """
        key = len(self._bound)
        cached = getattr(self, "_fingerprint", None)
        if cached is None or cached[0] != key:
            from .fingerprint import fingerprint

            cached = (key, fingerprint(self))
            self._fingerprint = cached
        return dict(cached[1])

    def config(self) -> dict:
        return {
            "n": self.n,
            "d": self.d,
            "nbeta": self.nbeta,
            "nbeta_spec": self.nbeta_spec,
            "localization": self.localization,
            "likelihood": self.likelihood.to_config(),
            "include": self.include,
            "exclude": self.exclude,
            "dtype": str(self.dtype).replace("torch.", ""),
            "lifted": {
                "names": list(self.lifted.names),
                "shapes": [list(s) for s in self.lifted.shapes],
            },
            "constraints": [b.to_config() for b in self._bound],
            "fingerprint": self.fingerprint(),
            "loss_center": self.loss_center,
            "center_check": dict(self.center_check),
        }


# ---------------------------------------------------------------------- declaration checks
_REDECLARING: list[bool] = []  # non-empty while _replace re-declares a checked posterior


def _bool_targets(y: torch.Tensor, likelihood: Likelihood) -> torch.Tensor:
    """Boolean targets: class labels 0/1 for Categorical, kept for Bernoulli, refused for Gaussian."""
    if y.dtype != torch.bool:
        return y
    from .likelihoods import Categorical, Gaussian

    if isinstance(likelihood, Categorical):
        return y.long()  # False/True are the classes 0/1
    if isinstance(likelihood, Gaussian):
        raise TypeError(
            "data[1] (targets y) is boolean, but Gaussian(scale=...) needs real-valued "
            "targets. For binary labels use cp.Bernoulli() (one logit) or cp.Categorical() "
            "(two logits); if you do mean 0/1 regression targets pass y.to(torch.float64)."
        )
    return y


def _forward_at_center(lifted: LiftedNetwork, center: torch.Tensor, x: torch.Tensor):
    """The network's output at ``w*`` on ``x``, with errors that say which input is wrong."""
    n = int(x.shape[0])
    desc = f"data[0] (inputs x) of shape {tuple(x.shape)} and dtype {x.dtype}"
    try:
        with torch.no_grad():
            out = lifted.forward(center, x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        hints = []
        if not x.is_floating_point() and any(
            k in str(e) for k in ("dtype", "Long", "Int", "Float", "Double", "type")
        ):
            hints.append(
                f"x has integer dtype {x.dtype}, but the network computes with floating "
                f"inputs: pass x.to({lifted.dtype}) (condpost keeps integer inputs as they "
                f"are, because embedding layers need token ids)"
            )
        if x.dim() == 1:
            hints.append(
                "x is 1-D: condpost reads its first dimension as the n samples, so each "
                "sample is a scalar; for a network that takes one feature per sample pass "
                "x.unsqueeze(-1) (shape [n, 1])"
            )
        hint = (" " + "; ".join(hints) + ".") if hints else ""
        raise ValueError(
            f"the network's forward pass failed at w* on {desc}: {type(e).__name__}: {msg}.{hint}"
        ) from e
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        hint = (
            " x is 1-D: for one feature per sample pass x.unsqueeze(-1) (shape [n, 1])."
            if x.dim() == 1
            else ""
        )
        raise ValueError(
            f"the network's output on {desc} has shape {shape}; its first dimension must be "
            f"the n = {n} samples of x (one output per sample).{hint}"
        )
    return out


def _check_deterministic_and_gradients(
    lifted: LiftedNetwork, center, x, localization: float
) -> None:
    """At declaration: the forward must be deterministic, and every lifted weight must matter.

    Two forward passes at ``w*`` on the same rows (at most 256) must agree (else
    ``ValueError``: dropout/RReLU in training mode, ``F.dropout(training=True)``, or
    ``torch.randn`` in ``forward``). Then the output's gradient along a random direction
    is taken with respect to the lifted vector at ``w*`` and at two draws of the local
    prior; a lifted parameter tensor whose gradient is zero at all three (``.detach()``,
    ``torch.round``, an unused parameter) gets a warning naming it. Units that are merely
    dead at ``w*`` revive nearby and are not reported.
    """
    xs = x[:256]
    gen = torch.Generator().manual_seed(0)
    w = center.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            o1 = lifted.forward(w, xs)
    except Exception:  # noqa: BLE001 - the full-data forward worked; be lenient here
        return
    with torch.no_grad():
        o2 = lifted.forward(center, xs)
    a, b = o1.detach(), o2
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"net: two forward passes at w* on the same inputs gave outputs of shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}; the posterior needs a deterministic "
            f"forward pass."
        )
    if a.is_floating_point():
        eps = torch.finfo(a.dtype).eps
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        finite = torch.isfinite(a) & torch.isfinite(b)
        diff = float((a - b)[finite].abs().max()) if bool(finite.any()) else 0.0
        differs = diff > 1e3 * eps * scale or bool((finite != torch.isfinite(b)).any())
    else:
        diff, differs = float("nan"), not torch.equal(a, b)
    if differs:
        raise ValueError(
            f"net: the forward pass is random: two calls at w* on the same {xs.shape[0]} "
            f"input(s) gave outputs that differ by up to {diff:.3g}, so U(w) changes from "
            f"one evaluation to the next and no sampler can target it. Typical causes: "
            f"dropout or RReLU in training mode, F.dropout(..., training=True), or "
            f"torch.randn/torch.rand inside forward. Call net.eval(), pass "
            f"training=self.training to functional dropout, or remove the randomness "
            f"(draw any noise once outside forward and pass it in)."
        )
    zero = list(lifted.names)
    points = [None] + [
        center + localization**-0.5 * torch.randn(center.shape, generator=gen).to(center)
        for _ in range(2)
    ]
    for w0 in points:  # zero at w* and at two draws of the local prior: identically zero
        if w0 is not None:
            w = w0.detach().clone().requires_grad_(True)
            try:
                with torch.enable_grad():
                    o1 = lifted.forward(w, xs)
            except Exception:  # noqa: BLE001
                return
        if not (o1.requires_grad and o1.is_floating_point() and o1.numel()):
            continue
        r = torch.randn(o1.shape, generator=gen, dtype=torch.float64).to(o1)
        try:
            (g,) = torch.autograd.grad((o1 * r).sum(), w, allow_unused=True)
        except RuntimeError:
            return
        if g is not None:
            zero = [nm for nm in zero if not bool((g[lifted.slice_of(nm)] != 0).any())]
        if not zero:
            return
    if zero:
        shown = zero[:6] + (["…"] if len(zero) > 6 else [])
        warn(
            f"net: the gradient of the network's output with respect to the lifted "
            f"parameter(s) {shown} is identically zero (at w* and at two draws of the local "
            f"prior, on {xs.shape[0]} input(s)), so "
            f"the likelihood does not constrain them and they move only under the local "
            f"prior. Typical causes: .detach(), torch.round/argmax or integer casts in "
            f"forward, or a parameter forward never uses. If "
            f"that is not intended, remove the operation that blocks the gradient; otherwise "
            f"leave them out of the lifted set (exclude=...)."
        )
