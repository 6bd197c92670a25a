"""Likelihoods: per-sample negative log-likelihoods ``ℓ_i(w)`` in nats.

``L_n(w) = (1/n) Σ_i ℓ_i(w)`` is the *mean* per-sample NLL (docs/theory.md §1.1). Each
likelihood also knows how to emit the matching Pyro observation site, so that the
Pyro model form and the potential form agree exactly (normalising constants
included).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from ._errors import check_finite

__all__ = [
    "Likelihood",
    "Categorical",
    "Gaussian",
    "Bernoulli",
    "CausalLM",
    "CustomNLL",
    "as_likelihood",
]


class Likelihood:
    """Base class. Subclasses implement ``nll`` (shape ``[n]``) and ``observe``."""

    name = "likelihood"

    def prepare_targets(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        y = torch.as_tensor(y)
        check_finite(y, "data[1] (targets y)")
        return y.to(dtype) if y.is_floating_point() else y

    def validate(self, output: torch.Tensor, y: torch.Tensor) -> None:
        """Raise a clear error if ``output`` and ``y`` do not fit this likelihood."""

    def nll(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean_nll(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``L_B = (1/m) Σ_i ℓ_i`` over a batch of ``m`` rows (a scalar).

        Subclasses may override it with a fused form (fewer autograd nodes than ``nll``
        followed by a mean); it must equal ``nll(output, y).mean()`` up to rounding.
        """
        return self.nll(output, y).mean()

    def mean_nll_parts(self, output: torch.Tensor, y: torch.Tensor):
        """``(raw, scale, const)`` with ``mean_nll = scale·raw + const``, or None.

        ``raw`` is a tensor and ``scale``, ``const`` are Python floats, so a gradient of
        ``c·mean_nll`` is one reverse pass through ``raw`` seeded with ``c·scale`` (the
        SG-MCMC hot path). None where the likelihood has no such split.
        """
        return None

    def observe(self, name: str, output: torch.Tensor, y: torch.Tensor) -> None:
        """Pyro observation statement(s) whose log-prob sums to ``-Σ_i ℓ_i``."""
        raise NotImplementedError

    def to_config(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _batch_dims(output: torch.Tensor) -> int:
    return output.dim() - 1


class Categorical(Likelihood):
    """Categorical likelihood on logits ``[n, ..., C]`` with integer labels ``[n, ...]``.

    ``ℓ_i = -log softmax(f(x_i))[y_i]``, summed over any extra (e.g. sequence) axes.
    """

    name = "categorical"

    def prepare_targets(self, y, dtype):
        y = torch.as_tensor(y)
        if y.is_floating_point():
            if not bool((y == y.round()).all()):
                raise ValueError("Categorical needs integer class labels in data[1]; got floats")
            y = y.long()
        return y

    def validate(self, output, y):
        if output.dim() < 2:
            raise ValueError(
                f"Categorical expects logits of shape [n, ..., C]; the network output has shape "
                f"{tuple(output.shape)}"
            )
        if tuple(output.shape[:-1]) != tuple(y.shape):
            raise ValueError(
                f"Categorical: labels have shape {tuple(y.shape)} but logits have shape "
                f"{tuple(output.shape)}; labels must have shape {tuple(output.shape[:-1])}"
            )
        C = output.shape[-1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
            bad = y[(y < 0) | (y >= C)]
            raise ValueError(
                f"Categorical: labels must lie in [0, {C}) for {C} logits; found "
                f"{sorted(set(int(v) for v in bad[:5]))}. Check the label encoding or the "
                f"network's output size."
            )

    def nll(self, output, y):
        lp = F.log_softmax(output, dim=-1)
        ll = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return -ll.reshape(ll.shape[0], -1).sum(-1)

    def mean_nll_parts(self, output, y):
        if y.dtype != torch.long or tuple(output.shape[:-1]) != tuple(y.shape):
            return None
        flat = output.reshape(-1, output.shape[-1])
        raw = F.cross_entropy(flat, y.reshape(-1), reduction="sum")
        return raw, 1.0 / max(output.shape[0], 1), 0.0

    def mean_nll(self, output, y):
        pr = self.mean_nll_parts(output, y)
        return self.nll(output, y).mean() if pr is None else pr[0] * pr[1]

    def observe(self, name, output, y):
        pyro.sample(name, dist.Categorical(logits=output).to_event(y.dim() - 1), obs=y)


class Gaussian(Likelihood):
    """Gaussian likelihood ``y ~ N(f(x; w), scale²)`` with a required noise ``scale``.

    ``ℓ_i = Σ_j [(y_ij − f_ij)²/(2 s²) + log s + ½ log 2π]``. ``scale`` is required
    because mean-squared error silently rescales ``nβ`` by ``2s²/k`` (docs/theory.md §1.1).
    """

    name = "gaussian"

    def __init__(self, scale: float | torch.Tensor) -> None:
        s = torch.as_tensor(scale, dtype=torch.float64)
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueError(f"Gaussian(scale=...) must be positive and finite; got {scale!r}")
        self.scale = scale

    def _s(self, output):
        return torch.as_tensor(self.scale, dtype=output.dtype, device=output.device)

    def validate(self, output, y):
        if output.shape != y.shape:
            hint = ""
            if output.dim() == y.dim() + 1 and output.shape[-1] == 1:
                hint = " (use y.unsqueeze(-1) for a single output)"
            raise ValueError(
                f"Gaussian: targets have shape {tuple(y.shape)} but the network output has "
                f"shape {tuple(output.shape)}; they must match{hint}"
            )

    def nll(self, output, y):
        if isinstance(self.scale, (int, float)):  # scalar: no tensor construction per call
            s = float(self.scale)
            k = output[0].numel() if output.dim() > 0 else 1
            const = k * (math.log(s) + 0.5 * math.log(2 * math.pi))
            r = (y - output).reshape(output.shape[0], -1)
            return r.square().sum(-1) * (0.5 / (s * s)) + const
        s = self._s(output)
        e = 0.5 * ((y - output) / s) ** 2 + torch.log(s) + 0.5 * math.log(2 * math.pi)
        e = e.expand_as(output)
        return e.reshape(e.shape[0], -1).sum(-1)

    def mean_nll_parts(self, output, y):
        if not isinstance(self.scale, (int, float)) or output.shape != y.shape:
            return None
        if output.dtype != y.dtype:
            return None
        s, m = float(self.scale), max(output.shape[0], 1)
        k = output.numel() // m
        # mse_loss: one kernel forward and one backward (no separate neg/square nodes)
        raw = F.mse_loss(output, y, reduction="sum")
        return raw, 0.5 / (s * s * m), k * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def mean_nll(self, output, y):
        pr = self.mean_nll_parts(output, y)
        return self.nll(output, y).mean() if pr is None else pr[0] * pr[1] + pr[2]

    def observe(self, name, output, y):
        s = self._s(output).expand_as(output)
        pyro.sample(name, dist.Normal(output, s).to_event(_batch_dims(output)), obs=y)

    def to_config(self):
        s = self.scale
        return {"name": self.name, "scale": s.tolist() if isinstance(s, torch.Tensor) else s}


class Bernoulli(Likelihood):
    """Bernoulli likelihood on logits, targets in {0, 1}, summed over non-batch axes."""

    name = "bernoulli"

    def prepare_targets(self, y, dtype):
        y = torch.as_tensor(y)
        check_finite(y, "data[1] (targets y)")
        return y.to(dtype)

    def validate(self, output, y):
        if output.shape != y.shape:
            raise ValueError(
                f"Bernoulli: targets have shape {tuple(y.shape)} but logits have shape "
                f"{tuple(output.shape)}; they must match"
            )
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("Bernoulli: targets must be 0 or 1")

    def nll(self, output, y):
        e = F.binary_cross_entropy_with_logits(output, y, reduction="none")
        return e.reshape(e.shape[0], -1).sum(-1)

    def observe(self, name, output, y):
        pyro.sample(name, dist.Bernoulli(logits=output).to_event(_batch_dims(output)), obs=y)


class CausalLM(Likelihood):
    """Next-token likelihood of a causal language model, padding masked.

    The network maps token ids ``[n, T]`` to logits ``[n, T, V]``; the targets are labels
    ``[n, T]`` aligned with the inputs (``input_ids`` with ``ignore_index`` at padding,
    as ``condpost.models.causal_lm_data`` makes them, Hugging Face's ``labels``
    convention). The logits at position ``t`` predict the label at ``t + 1``:

    ``ℓ_i = − Σ_{t < T−1, y_{i,t+1} ≠ ignore} log softmax(f(x_i)_t)[y_{i,t+1}]``,

    the per-sequence sum of the per-token NLL over unmasked tokens, so ``n`` counts
    sequences and ``L_n`` is the mean NLL per sequence (not per token).
    """

    name = "causal_lm"

    def __init__(self, ignore_index: int = -100) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"CausalLM(ignore_index=...) must be an int; got {ignore_index!r}")
        self.ignore_index = ignore_index

    def prepare_targets(self, y, dtype):
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(
                f"CausalLM needs integer token labels [n, T] in data[1]; got dtype {y.dtype}. "
                f"Use condpost.models.causal_lm_data(input_ids, attention_mask)."
            )
        return y.long()

    def validate(self, output, y):
        if output.dim() != 3 or y.dim() != 2 or tuple(output.shape[:2]) != tuple(y.shape):
            raise ValueError(
                f"CausalLM expects logits [n, T, V] and labels [n, T]; got logits "
                f"{tuple(output.shape)} and labels {tuple(y.shape)}"
            )
        if y.shape[1] < 2:
            raise ValueError("CausalLM needs sequences of at least 2 tokens (T ≥ 2)")
        V = output.shape[-1]
        real = y[y != self.ignore_index]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= V):
            bad = real[(real < 0) | (real >= V)]
            raise ValueError(
                f"CausalLM: labels must lie in [0, {V}) or equal ignore_index="
                f"{self.ignore_index}; found {sorted(set(int(v) for v in bad[:5]))}"
            )

    def nll(self, output, y):
        logits = output[..., :-1, :]
        lab = y[..., 1:]
        keep = lab != self.ignore_index
        safe = torch.where(keep, lab, torch.zeros_like(lab))
        lp = F.log_softmax(logits, dim=-1)
        safe = safe.expand(lp.shape[:-1])
        ll = lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        return -(ll * keep.to(ll.dtype)).sum(-1)

    def mean_nll_parts(self, output, y):
        if output.dim() != 3 or y.dtype != torch.long or tuple(output.shape[:2]) != tuple(y.shape):
            return None
        V = output.shape[-1]
        raw = F.cross_entropy(
            output[:, :-1].reshape(-1, V),
            y[:, 1:].reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        return raw, 1.0 / max(output.shape[0], 1), 0.0

    def mean_nll(self, output, y):
        pr = self.mean_nll_parts(output, y)
        return self.nll(output, y).mean() if pr is None else pr[0] * pr[1]

    def observe(self, name, output, y):
        pyro.factor(name, -self.nll(output, y))

    def to_config(self):
        return {"name": self.name, "ignore_index": self.ignore_index}


class CustomNLL(Likelihood):
    """A user callable ``fn(output, y) -> per-sample NLL [n]`` (nats, not averaged)."""

    name = "custom"

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        if not callable(fn):
            raise TypeError("likelihood must be a condpost likelihood or a callable")
        self.fn = fn

    def validate(self, output, y):
        v = self.fn(output, y)
        n = output.shape[0]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (n,):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"likelihood callable must return per-sample negative log-likelihoods of shape "
                f"[n] = ({n},); it returned {shape}. Use reduction='none' (e.g. "
                f"F.cross_entropy(out, y, reduction='none')) and sum over non-batch axes."
            )
        check_finite(v, "the likelihood's per-sample NLL at w*")

    def nll(self, output, y):
        return self.fn(output, y)

    def observe(self, name, output, y):
        pyro.factor(name, -self.fn(output, y))

    def to_config(self):
        return {"name": self.name, "fn": getattr(self.fn, "__qualname__", repr(self.fn))}


def as_likelihood(lik) -> Likelihood:
    if isinstance(lik, Likelihood):
        return lik
    if isinstance(lik, type) and issubclass(lik, Likelihood):
        raise TypeError(f"likelihood must be an instance, e.g. {lik.__name__}(); got the class")
    if callable(lik):
        return CustomNLL(lik)
    raise TypeError(
        f"likelihood must be Categorical(), Gaussian(scale=...), Bernoulli() or a callable "
        f"returning per-sample NLLs; got {type(lik).__name__}"
    )
