"""``Potential``: ``U(w)``, its gradient and its terms, batched over chains.

``U(w) = nβ·L(w) + γ/2·‖w − w⁰‖² + Σ_c ρ_c·D_c(w)`` (docs/theory.md §1). ``L`` is the
full-data mean NLL ``L_n`` (the declaration's ``loss``) or, given a minibatch, its
estimate ``L_B`` from the likelihood's ``mean_nll``. ``w⁰`` is the prior centre: ``w*``
for the local posterior, or another centre (WBIC's global prior at 0) given to the
constructor with its own ``nβ`` and ``γ``. Every torch sampler takes a ``Potential``
(SG-MCMC through ``data_terms`` on minibatches, its ``torch.compile`` path through
``value_and_grad``); the JAX export (``condpost.export``) exports the same declaration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.func import grad_and_value

from ._batching import batched

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior

__all__ = ["Potential"]


class Potential:
    """The potential of a declaration, for one ``w`` ``[d]`` or a batch ``[C, d]``.

    Parameters
    ----------
    post : LocalPosterior
    nbeta, localization : float, optional
        Override ``nβ`` and ``γ`` (default: the declaration's).
    anchor : tensor ``[d]``, optional
        The prior centre (default ``w*``).
    """

    def __init__(self, post: LocalPosterior, *, nbeta=None, localization=None, anchor=None):
        self.post = post
        self.nbeta = float(post.nbeta if nbeta is None else nbeta)
        self.localization = float(post.localization if localization is None else localization)
        self.anchor = post.center if anchor is None else torch.as_tensor(anchor).to(post.center)
        self._net = type(post.lifted.net).__name__
        self._vg = batched(grad_and_value(self._one), f"potential of {self._net}")
        self._v = batched(self._one, f"potential value of {self._net}")
        self._vgb = None

    @property
    def d(self) -> int:
        return self.post.d

    @property
    def global_prior(self) -> bool:
        """True when the prior centre or precision is not the declaration's (WBIC)."""
        p = self.post
        return self.localization != p.localization or self.anchor is not p.center

    def localizer(self, w: torch.Tensor) -> torch.Tensor:
        """``γ/2‖w − w⁰‖²`` at ``[..., d]`` (its gradient ``γ(w − w⁰)`` is closed-form)."""
        diff = w - self.anchor
        return (0.5 * self.localization) * (diff * diff).sum(-1)

    def data_terms(self, w: torch.Tensor, batch, forward=None):
        """``(nβ·L_B + Σ_c ρ_c D_c, L_B)`` at one ``w`` ``[d]`` on a minibatch ``(xb, yb)``.

        The localizer is left out: samplers add its gradient in closed form. ``forward``
        replaces ``lifted.forward`` (same values; SG-MCMC passes a cheaper one).
        """
        xb, yb = batch
        loss = self._batch_loss(w, xb, yb, forward)
        return sum(self._penalties(w).values(), self.nbeta * loss), loss

    def _batch_loss(self, w, xb, yb, forward=None):
        post = self.post
        fwd = post.lifted.forward if forward is None else forward
        return post.likelihood.mean_nll(fwd(w, xb), yb)

    def _penalties(self, w) -> dict[str, torch.Tensor]:
        post = self.post
        if not post.constraints:
            return {}
        v = post.view(w)
        return {f"constraint/{b.name}": b.penalty(v) for b in post.constraints}

    def terms(self, w: torch.Tensor, batch=None) -> dict[str, torch.Tensor]:
        """Per-term breakdown at one ``w``: ``loss`` (nβ·L_n, or nβ·L_B on ``batch``),
        ``localizer``, ``constraint/<name>``."""
        if batch is None:
            t = self.post.terms(w)
            if self.nbeta != self.post.nbeta:
                t["loss"] = t["loss"] * (self.nbeta / self.post.nbeta)
        else:
            t = {"loss": self.nbeta * self._batch_loss(w, *batch), "localizer": None}
            t.update(self._penalties(w))
        if batch is not None or self.global_prior:
            t["localizer"] = self.localizer(w)
        return t

    def _one(self, w, xb=None, yb=None):
        return sum(self.terms(w, None if xb is None else (xb, yb)).values())

    def value(self, w: torch.Tensor) -> torch.Tensor:
        """``U`` at ``w`` ``[d]`` (a scalar) or ``[C, d]`` (``[C]``)."""
        return self._one(w) if w.dim() == 1 else self._v(w)

    def value_and_grad(self, w: torch.Tensor, batch=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, ∇U)`` at ``w`` ``[d]`` or ``[C, d]``: full data, or on ``batch = (xb, yb)``
        (for ``[C, d]``, one minibatch per chain: ``xb [C, m, ...]``, ``yb [C, m, ...]``)."""
        if batch is not None:
            if w.dim() == 1:
                g, u = grad_and_value(self._one)(w, *batch)
                return u, g
            if self._vgb is None:
                self._vgb = batched(
                    grad_and_value(self._one), f"minibatch potential of {self._net}"
                )
            g, u = self._vgb(w, *batch)
            return u, g
        if w.dim() == 1:
            g, u = grad_and_value(self._one)(w)
            return u, g
        g, u = self._vg(w)
        return u, g
