"""Lifting a ``torch.nn.Module``: parameter selection, flat vectors, functional forward, capture.

The user's module is never mutated. ``LiftedNetwork`` keeps detached copies of
every parameter and buffer; the lifted parameters live in one flat vector ``w`` and
the forward pass is ``torch.func.functional_call`` on the module with those
copies substituted. Activations at *sites* (module paths such as ``"layers.1"``) are
captured with forward hooks that exist only during the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ._errors import check_finite, match_patterns, nearest

__all__ = ["LiftedNetwork", "resolve_sites", "capture_hooks"]

_STOCHASTIC_IN_TRAINING = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.AlphaDropout,
    nn.RReLU,
)


def resolve_sites(net: nn.Module, sites: str | Sequence[str], argname: str = "sites") -> list[str]:
    """Validate site names (module paths; "" is the root, i.e. the output) and return a list."""
    if isinstance(sites, str):
        sites = [sites]
    modules = dict(net.named_modules())
    names = [n for n in modules if n]
    out = []
    for s in sites:
        if not isinstance(s, str):
            raise TypeError(f"{argname} must be module paths (str); got {type(s).__name__}")
        if s not in modules:
            raise ValueError(
                f"{argname}: {s!r} is not a module path of this network. Nearest sites: "
                f"{nearest(s, names)}. A site is a name from `net.named_modules()`, and its "
                f"activation is that module's output ('' is the whole network's output)."
            )
        out.append(s)
    return out


@contextlib.contextmanager
def capture_hooks(net: nn.Module, sites: Sequence[str], store: dict) -> Iterator[dict]:
    """Temporarily register forward hooks recording each site's output into ``store``."""
    modules = dict(net.named_modules())
    handles = []

    def make_hook(site: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"site {site!r} ({type(module).__name__}) returned a "
                    f"{type(output).__name__}, not a tensor; choose a submodule whose output "
                    f"is a single tensor (e.g. wrap the tuple-returning module or hook a child)."
                )
            store[site] = output

        return hook

    try:
        for s in sites:
            handles.append(modules[s].register_forward_hook(make_hook(s)))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _replace_hooks(net: nn.Module, replace: Mapping[str, torch.Tensor], fired: dict):
    modules = dict(net.named_modules())
    handles = []

    def make(site, value):
        def hook(module, inputs, output):
            fired[site] = fired.get(site, 0) + 1
            if isinstance(output, torch.Tensor) and output.shape != value.shape:
                raise ValueError(
                    f"patched activation for site {site!r} has shape {tuple(value.shape)}; the "
                    f"module outputs {tuple(output.shape)}"
                )
            return value

        return hook

    try:
        for s, v in replace.items():
            handles.append(modules[s].register_forward_hook(make(s, v)))
        yield
    finally:
        for h in handles:
            h.remove()


class LiftedNetwork:
    """A module's parameters split into a lifted flat vector and frozen constants.

    Parameters
    ----------
    net : torch.nn.Module
        The trained network at ``w*``. It is never modified.
    include, exclude : str or sequence of str, optional
        Glob patterns over ``net.named_parameters()`` names selecting the lifted
        parameters (default: all). A pattern may also be a module path, meaning every
        parameter below it. An unmatched pattern raises an error listing the nearest
        names.
    dtype : torch.dtype, optional
        Floating dtype of the lifted vector, frozen copies and data (default: the
        dtype of the network's first parameter).
    center : mapping or tensor, optional
        Override for ``w*``: a flat vector or a ``{name: tensor}`` mapping for the
        lifted parameters. Default: the module's current values.
    """

    def __init__(
        self,
        net: nn.Module,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        center: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
        stochastic = [
            n
            for n, m in net.named_modules()
            if isinstance(m, _STOCHASTIC_IN_TRAINING) and m.training
        ]
        if stochastic:
            raise ValueError(
                f"net has dropout/batch-norm/RReLU modules in training mode ({stochastic[:3]}); "
                f"the posterior needs a deterministic forward pass. Call `net.eval()` first."
            )
        all_params = dict(net.named_parameters())
        if not all_params:
            raise ValueError("net has no parameters to lift")
        names_all = list(all_params)
        selected = match_patterns(include, names_all, "include")
        if exclude is not None:
            excluded = set(match_patterns(exclude, names_all, "exclude"))
            selected = [n for n in selected if n not in excluded]
        # only floating parameters have a density to sample: integer (or bool/complex)
        # ones stay constants at w*, and naming one explicitly is an error
        nonfloat = [n for n in selected if not all_params[n].is_floating_point()]
        if nonfloat:
            kinds = ", ".join(f"{n!r} ({all_params[n].dtype})" for n in nonfloat[:4])
            if include is not None:
                raise TypeError(
                    f"include selects non-floating parameter(s) {kinds}: condpost samples only "
                    f"floating-point weights (an integer parameter has no density to sample, "
                    f"and lifting it as a float would change the network). Leave it out of "
                    f"include= (or add it to exclude=); it then stays fixed at its value."
                )
            from ._errors import warn

            warn(
                f"net has non-floating parameter(s) {kinds}; they are not lifted and stay "
                f"fixed at their values (condpost samples only floating-point weights). Pass "
                f"exclude={nonfloat[:4]!r} to say so and silence this note."
            )
            selected = [n for n in selected if n not in nonfloat]
        if not selected:
            raise ValueError(
                "include/exclude select no parameters; at least one parameter must be lifted. "
                f"Parameters: {names_all[:10]}"
            )
        if dtype is None:
            floating = [p for p in all_params.values() if p.is_floating_point()]
            dtype = floating[0].dtype
        dtype_arg = dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                f"dtype must be a floating torch dtype (e.g. torch.float64); got {dtype_arg!r}"
            )
        self.net = net
        self.dtype = dtype
        self.device = next(iter(all_params.values())).device
        self.names: list[str] = selected
        self.all_names: list[str] = names_all
        self.shapes: list[torch.Size] = [all_params[n].shape for n in selected]
        self.numels: list[int] = [all_params[n].numel() for n in selected]
        self.offsets: list[int] = []
        off = 0
        for k in self.numels:
            self.offsets.append(off)
            off += k
        self.d = off

        def copy(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().clone()
            return t.to(dtype) if t.is_floating_point() else t

        self.frozen: dict[str, torch.Tensor] = {
            n: copy(p) for n, p in all_params.items() if n not in selected
        }
        self.frozen.update({n: copy(b) for n, b in net.named_buffers()})
        for n, t in self.frozen.items():
            check_finite(t, f"net parameter/buffer {n!r}")

        if center is None:
            flat = torch.cat([all_params[n].detach().reshape(-1).to(dtype) for n in selected])
        elif isinstance(center, Mapping):
            missing = [n for n in selected if n not in center]
            if missing:
                raise ValueError(f"center is missing lifted parameters {missing}")
            parts = []
            for n, shp in zip(selected, self.shapes, strict=True):
                c = torch.as_tensor(center[n])
                if c.shape != shp:
                    raise ValueError(f"center[{n!r}] has shape {tuple(c.shape)}; expected {shp}")
                parts.append(c.detach().reshape(-1).to(dtype))
            flat = torch.cat(parts)
        else:
            flat = torch.as_tensor(center).detach().to(dtype).reshape(-1)
            if flat.numel() != self.d:
                raise ValueError(
                    f"center has {flat.numel()} entries; the lifted vector has {self.d}"
                )
        self.center: torch.Tensor = flat.clone().to(self.device)
        self.center.requires_grad_(False)
        check_finite(self.center, "center (w*)")

    # ------------------------------------------------------------------ flat <-> named
    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``w`` of shape ``[..., d]`` into ``{name: tensor[..., *shape]}`` (views)."""
        if w.shape[-1] != self.d:
            raise ValueError(f"w has trailing size {w.shape[-1]}; the lifted vector has d={self.d}")
        batch = tuple(w.shape[:-1])
        return {
            n: w[..., o : o + k].reshape(batch + tuple(s))
            for n, o, k, s in zip(self.names, self.offsets, self.numels, self.shapes, strict=True)
        }

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of ``unflatten``: ``{name: [*batch, *shape]}`` → ``[*batch, d]``."""
        batch = self.batch_shape(params)
        if not batch:
            return torch.cat([params[n].reshape(-1) for n in self.names])
        parts = []
        for n, s in zip(self.names, self.shapes, strict=True):
            p = params[n]
            p = p.reshape(self._own_batch(p, s) + tuple(s))
            parts.append(p.expand(batch + tuple(s)).reshape(batch + (-1,)))
        return torch.cat(parts, -1)

    # ------------------------------------------------------------------ batch dims
    @staticmethod
    def _own_batch(t: torch.Tensor, shape) -> tuple[int, ...]:
        """Leading batch dims of ``t`` beyond the parameter ``shape``, trailing 1s dropped.

        Pyro places a sample dim on the left and pads with singleton plate dims (e.g.
        ``Predictive(parallel=True)`` gives ``[S, ...]`` or ``[S, 1, ...]``, vectorized
        ELBO particles ``[P, 1, ...]``); the padding is dropped so that every parameter
        carries the same batch.
        """
        b = list(t.shape[: t.dim() - len(shape)])
        while b and b[-1] == 1:
            b.pop()
        return tuple(b)

    def batch_shape(self, lifted: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        """The common leading batch shape of the lifted parameters (``()`` if unbatched).

        Batch dims are aligned on the left (sample dim first) and broadcast.
        """
        own = []
        for n, s in zip(self.names, self.shapes, strict=True):
            t = lifted.get(n)
            if t is None:
                continue
            if t.dim() < len(s) or tuple(t.shape[t.dim() - len(s) :]) != tuple(s):
                raise ValueError(
                    f"lifted parameter {n!r} has shape {tuple(t.shape)}; expected {tuple(s)} "
                    f"(optionally with leading batch dims)"
                )
            own.append(self._own_batch(t, s))
        if not any(own):
            return ()
        k = max(len(b) for b in own)
        try:
            return tuple(torch.broadcast_shapes(*[b + (1,) * (k - len(b)) for b in own]))
        except RuntimeError:
            raise ValueError(
                f"the lifted parameters carry incompatible batch dims {sorted(set(own))}; all "
                f"lifted weights must share the same leading batch shape"
            ) from None

    def slice_of(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.numels[i])

    def full_params(self, lifted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(self.frozen)
        out.update(lifted)
        return out

    # ------------------------------------------------------------------ forward
    def call(
        self,
        lifted: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        sites: Sequence[str] = (),
        replace: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Functional forward with the lifted parameters ``lifted``; returns (output, acts).

        ``replace`` maps sites to tensors that replace those modules' outputs (activation
        patching); a replaced site must run exactly once.
        """
        batch = self.batch_shape(lifted) if lifted else ()
        if batch:
            return self._call_batched(lifted, x, sites, replace, batch)
        shapes = dict(zip(self.names, self.shapes, strict=True))
        if any(tuple(v.shape) != tuple(shapes.get(k, v.shape)) for k, v in lifted.items()):
            # singleton batch dims only (e.g. one Pyro sample): drop them
            lifted = {k: v.reshape(shapes[k]) if k in shapes else v for k, v in lifted.items()}
        params = self.full_params(lifted)
        acts: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            fired: dict[str, int] = {}
            if replace:
                stack.enter_context(_replace_hooks(self.net, replace, fired))
            if sites:
                stack.enter_context(capture_hooks(self.net, sites, acts))
            out = functional_call(self.net, params, (x,))
            for s in replace or {}:
                if fired.get(s, 0) != 1:
                    raise RuntimeError(
                        f"activation patching at site {s!r}: the module ran {fired.get(s, 0)} "
                        f"time(s) in one forward pass; patching needs exactly one call"
                    )
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the network returned a {type(out).__name__}; condpost needs a single output "
                f"tensor. Wrap the module so that forward returns one tensor."
            )
        return out, acts

    def _call_batched(self, lifted, x, sites, replace, batch):
        """``call`` for lifted weights with leading batch dims: ``torch.func.vmap`` over them.

        Outputs and activations get shape ``[*batch, *unbatched shape]``.
        """
        from torch.func import vmap

        flat = {}
        B = 1
        for b in batch:
            B *= b
        for n, s in zip(self.names, self.shapes, strict=True):
            t = lifted[n]
            t = t.reshape(self._own_batch(t, s) + tuple(s))
            k = len(batch) - (t.dim() - len(s))
            t = t.reshape(tuple(t.shape[: t.dim() - len(s)]) + (1,) * k + tuple(s))
            flat[n] = t.expand(batch + tuple(s)).reshape((B,) + tuple(s))

        def one(p):
            return self.call(p, x, sites, replace)

        try:
            out, acts = vmap(one, randomness="error")(flat)
        except RuntimeError as e:
            if "vmap" not in str(e) and "randomness" not in str(e):
                raise
            # a forward pass vmap cannot batch (data-dependent control flow, .item()):
            # one call per batch element
            parts = [
                self.call({n: v[i] for n, v in flat.items()}, x, sites, replace) for i in range(B)
            ]
            out = torch.stack([p[0] for p in parts])
            acts = {s: torch.stack([p[1][s] for p in parts]) for s in parts[0][1]}
        out = out.reshape(batch + tuple(out.shape[1:]))
        acts = {s: a.reshape(batch + tuple(a.shape[1:])) for s, a in acts.items()}
        return out, acts

    def forward(self, w: torch.Tensor, x: torch.Tensor, sites: Sequence[str] = ()):
        """Forward pass at flat weights ``w``; returns the output, or (output, acts) if sites."""
        out, acts = self.call(self.unflatten(w), x, sites)
        return (out, acts) if sites else out

    def named_center(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.unflatten(self.center).items()}
