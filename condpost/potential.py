"""``Potential``: ``U(w)``, its gradient and its terms, batched over chains.

``U(w) = nβ·L_n(w) + γ/2·‖w − w⁰‖² + Σ_c ρ_c·D_c(w)``, read from the declaration's own
``terms`` (so the formula exists once). ``w⁰`` is the prior centre: ``w*`` for the
local posterior, or another centre (WBIC's global prior at 0) given to the constructor
with its own ``nβ`` and ``γ``. Torch kernels take a ``Potential``; the JAX export
(``condpost.export``) exports the same declaration.
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
        self._vg = batched(
            grad_and_value(self._one), f"potential of {type(post.lifted.net).__name__}"
        )
        self._v = batched(self._one, f"potential value of {type(post.lifted.net).__name__}")

    @property
    def d(self) -> int:
        return self.post.d

    def terms(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-term breakdown at one ``w``: ``loss`` (nβ·L_n), ``localizer``,
        ``constraint/<name>``."""
        t = self.post.terms(w)
        if self.nbeta != self.post.nbeta:
            t["loss"] = t["loss"] * (self.nbeta / self.post.nbeta)
        if self.localization != self.post.localization or self.anchor is not self.post.center:
            diff = w - self.anchor
            t["localizer"] = 0.5 * self.localization * (diff * diff).sum()
        return t

    def _one(self, w):
        return sum(self.terms(w).values())

    def value(self, w: torch.Tensor) -> torch.Tensor:
        """``U`` at ``w`` ``[d]`` (a scalar) or ``[C, d]`` (``[C]``)."""
        return self._one(w) if w.dim() == 1 else self._v(w)

    def value_and_grad(self, w: torch.Tensor, batch=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, ∇U)`` at ``w`` ``[d]`` or ``[C, d]`` (full batch; ``batch`` is reserved
        for minibatch potentials and must be None here)."""
        if batch is not None:
            raise NotImplementedError("Potential.value_and_grad: minibatches go through SG-MCMC")
        if w.dim() == 1:
            g, u = grad_and_value(self._one)(w)
            return u, g
        g, u = self._vg(w)
        return u, g
