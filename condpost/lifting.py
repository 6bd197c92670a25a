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

from ._errors import check_finite, match_patterns, nearest
from .models import (
    as_index,
    format_index,
    module_output,
    network_kind,
    parse_index,
    replace_output,
    split_indexed,
)
from .models import call as _call_network

__all__ = ["LiftedNetwork", "resolve_sites", "capture_hooks", "site_module"]

_STOCHASTIC_IN_TRAINING = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.AlphaDropout,
    nn.RReLU,
)


def _site_module(modules: Mapping[str, nn.Module], s: str) -> tuple[str, tuple | None]:
    """``(module path, index or None)`` of a site; ``None`` path when it names no module."""
    if s in modules:
        return s, None
    base, idx = split_indexed(s)
    if idx is None or base not in modules:
        return None, None
    index = parse_index(idx)
    if not index or not (index[0] == slice(None) or index[0] is Ellipsis):
        raise ValueError(
            f"site {s!r}: the first axis of an activation is the batch of inputs, and a "
            f"selection must keep it: start the index with ':' (e.g. '{base}[:, -1, 1]' is "
            f"the last position and index 1 of the third axis for every input)."
        )
    return base, index


def site_module(net: nn.Module, site: str) -> str:
    """The module path behind a site (the site without its index suffix)."""
    base, _ = _site_module(dict(net.named_modules()), site)
    if base is None:
        resolve_sites(net, [site])
    return base


def resolve_sites(net: nn.Module, sites: str | Sequence[str], argname: str = "sites") -> list[str]:
    """Validate site names and return a list.

    A site is a module path (``""`` is the root, i.e. the output), optionally with a
    NumPy-style selection that keeps the batch axis: ``"blocks.0.attn.hook_z[:, -1, 1]"``.
    TransformerLens hook points are modules, so hook names are module paths.
    """
    if isinstance(sites, str):
        sites = [sites]
    modules = dict(net.named_modules())
    names = [n for n in modules if n]
    out = []
    for s in sites:
        if not isinstance(s, str):
            raise TypeError(f"{argname} must be module paths (str); got {type(s).__name__}")
        base, _ = _site_module(modules, s)
        if base is None:
            stem = split_indexed(s)[0]
            hooks = [n for n in names if n.rsplit(".", 1)[-1].startswith("hook_")]
            extra = (
                f" This is a TransformerLens model: its sites are hook names such as {hooks[:3]}."
                if hooks and network_kind(net) == "transformerlens"
                else ""
            )
            raise ValueError(
                f"{argname}: {s!r} is not a module path of this network. Nearest sites: "
                f"{nearest(stem, names)}. A site is a name from `net.named_modules()`, and its "
                f"activation is that module's output ('' is the whole network's output); a "
                f"selection may follow in brackets, e.g. 'name[:, -1, 1]'.{extra}"
            )
        out.append(s)
    return out


def _select(t: torch.Tensor, index: tuple | None, site: str) -> torch.Tensor:
    if index is None:
        return t
    try:
        return t[index]
    except IndexError as e:
        raise ValueError(
            f"site {site!r}: the selection does not fit the activation of shape "
            f"{tuple(t.shape)}: {e}"
        ) from None


@contextlib.contextmanager
def capture_hooks(net: nn.Module, sites: Sequence[str], store: dict) -> Iterator[dict]:
    """Temporarily register forward hooks recording each site's output into ``store``.

    Hugging Face modules that return tuples give their hidden state (the first element);
    a site's index suffix selects part of the activation.
    """
    modules = dict(net.named_modules())
    kind = network_kind(net)
    handles = []

    def make_hook(site: str, index):
        def hook(module, inputs, output):
            output = module_output(output, kind)
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"site {site!r} ({type(module).__name__}) returned a "
                    f"{type(output).__name__}, not a tensor; choose a submodule whose output "
                    f"is a single tensor (e.g. wrap the tuple-returning module or hook a child)."
                )
            store[site] = _select(output, index, site)

        return hook

    try:
        for s in sites:
            base, index = _site_module(modules, s)
            handles.append(modules[base].register_forward_hook(make_hook(s, index)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _put(output: torch.Tensor, index: tuple, value: torch.Tensor, site: str) -> torch.Tensor:
    """``output`` with ``output[index]`` replaced by ``value``, out of place (vmap-safe)."""
    pos = _select(
        torch.arange(output.numel(), device=output.device).reshape(output.shape), index, site
    )
    if tuple(pos.shape) != tuple(value.shape):
        raise ValueError(
            f"patched activation for site {site!r} has shape {tuple(value.shape)}; the "
            f"selection has shape {tuple(pos.shape)}"
        )
    flat = output.reshape(-1).scatter(0, pos.reshape(-1), value.reshape(-1).to(output.dtype))
    return flat.reshape(output.shape)


@contextlib.contextmanager
def _replace_hooks(net: nn.Module, replace: Mapping[str, torch.Tensor], fired: dict):
    modules = dict(net.named_modules())
    kind = network_kind(net)
    handles = []

    def make(site, value, index):
        def hook(module, inputs, output):
            fired[site] = fired.get(site, 0) + 1
            out = module_output(output, kind)
            if index is not None:
                return replace_output(output, _put(out, index, value, site), kind)
            if isinstance(out, torch.Tensor) and out.shape != value.shape:
                raise ValueError(
                    f"patched activation for site {site!r} has shape {tuple(value.shape)}; the "
                    f"module outputs {tuple(out.shape)}"
                )
            return replace_output(output, value, kind)

        return hook

    try:
        for s, v in replace.items():
            base, index = _site_module(modules, s)
            handles.append(modules[base].register_forward_hook(make(s, v, index)))
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
        self.kind = network_kind(net)
        chosen = _selection(include, names_all)  # {param: None (whole) or [index, ...]}
        if exclude is not None:
            excluded = set(match_patterns(exclude, names_all, "exclude"))
            chosen = {n: v for n, v in chosen.items() if n not in excluded}
        selected = [n for n in names_all if n in chosen]
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

        def copy(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().clone()
            return t.to(dtype) if t.is_floating_point() else t

        # the lifted vector is a list of pieces: a whole parameter (its name) or a slice
        # of one ("blocks.0.attn.W_Q[1]"); a sliced parameter's other entries stay at w*
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.param_of: dict[str, str] = {}
        self.index_of: dict[str, tuple | None] = {}
        self.bases: dict[str, torch.Tensor] = {}  # sliced parameters at w* (full tensors)
        self._positions: dict[str, torch.Tensor] = {}  # piece -> flat positions [*shape]
        self._gather: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]] = {}
        for n in selected:
            p = all_params[n]
            if chosen[n] is None:
                self.names.append(n)
                self.shapes.append(p.shape)
                self.param_of[n], self.index_of[n] = n, None
                continue
            grid = torch.arange(p.numel(), device=self.device).reshape(p.shape)
            used = torch.zeros(p.numel(), dtype=torch.bool, device=self.device)
            pieces = []
            for idx in chosen[n]:
                piece = f"{n}[{format_index(idx)}]"
                try:
                    pos = grid[idx]
                except (IndexError, TypeError) as e:
                    raise ValueError(
                        f"include: the index [{format_index(idx)}] does not fit parameter "
                        f"{n!r} of shape {tuple(p.shape)}: {e}"
                    ) from None
                if pos.numel() == 0:
                    raise ValueError(f"include: {piece!r} selects no entry of {n!r}")
                flat = pos.reshape(-1)
                if bool(used[flat].any()) or flat.unique().numel() != flat.numel():
                    raise ValueError(
                        f"include: {piece!r} selects entries of {n!r} that are already "
                        f"selected; each entry can be lifted once"
                    )
                used[flat] = True
                pieces.append(piece)
                self.names.append(piece)
                self.shapes.append(pos.shape)
                self.param_of[piece], self.index_of[piece] = n, idx
                self._positions[piece] = pos
            base = copy(p)
            self.bases[n] = base
            rest = torch.nonzero(~used).reshape(-1)
            order = torch.cat([rest] + [self._positions[q].reshape(-1) for q in pieces])
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=self.device)
            # full.reshape(-1) = cat([base at the unlifted entries, piece values...])[inverse]
            self._gather[n] = (pieces, base.reshape(-1)[rest], inverse)
        self.all_names: list[str] = names_all
        self.numels: list[int] = [int(torch.Size(s).numel()) for s in self.shapes]
        self.offsets: list[int] = []
        off = 0
        for k in self.numels:
            self.offsets.append(off)
            off += k
        self.d = off
        self.include_spec = _include_spec(include)

        self.frozen: dict[str, torch.Tensor] = {
            n: copy(p) for n, p in all_params.items() if n not in selected
        }
        self.frozen.update({n: copy(b) for n, b in net.named_buffers()})
        buffers = {n for n, _ in net.named_buffers()}
        for n, t in self.frozen.items():
            if n in buffers and self.kind != "torch" and t.is_floating_point():
                # TransformerLens and HF keep -inf masks (IGNORE) as buffers: NaN only
                if bool(torch.isnan(t).any()):
                    raise ValueError(f"net buffer {n!r} contains NaN")
                continue
            check_finite(t, f"net parameter/buffer {n!r}")
        for n, t in self.bases.items():
            check_finite(t, f"net parameter {n!r}")

        def piece_of(t: torch.Tensor, piece: str) -> torch.Tensor:
            if piece in self._positions:
                return t.reshape(-1)[self._positions[piece].to(t.device)]
            return t

        if center is None:
            flat = torch.cat(
                [
                    piece_of(all_params[self.param_of[q]].detach(), q).reshape(-1).to(dtype)
                    for q in self.names
                ]
            )
        elif isinstance(center, Mapping):
            parts = []
            missing = []
            for q, shp in zip(self.names, self.shapes, strict=True):
                par = self.param_of[q]
                full = all_params[par].shape
                if q in center:
                    c = torch.as_tensor(center[q])
                    if c.shape != shp and q != par and c.shape == full:
                        c = piece_of(c, q)
                elif par in center:  # a full parameter for a sliced piece
                    c = torch.as_tensor(center[par])
                    if c.shape != full:
                        raise ValueError(
                            f"center[{par!r}] has shape {tuple(c.shape)}; expected {tuple(full)}"
                        )
                    c = piece_of(c, q)
                else:
                    missing.append(q)
                    continue
                if c.shape != shp:
                    raise ValueError(f"center[{q!r}] has shape {tuple(c.shape)}; expected {shp}")
                parts.append(c.detach().reshape(-1).to(dtype))
            if missing:
                raise ValueError(f"center is missing lifted parameters {missing}")
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
        """Every parameter and buffer by name: frozen ones, lifted ones, sliced ones filled in.

        A sliced parameter is rebuilt by one gather from its unlifted entries at ``w*`` and
        the lifted pieces (a piece missing from ``lifted`` is taken at ``w*``), so the
        result is differentiable in the pieces and batches under ``vmap``.
        """
        out = dict(self.frozen)
        if not self._gather:
            out.update(lifted)
            return out
        for k, v in lifted.items():
            if k not in self._positions:
                out[k] = v
        for par, (pieces, rest, inverse) in self._gather.items():
            vals = [rest]
            for q in pieces:
                v = lifted.get(q)
                if v is None:
                    v = self.bases[par].reshape(-1)[self._positions[q].reshape(-1)]
                vals.append(
                    v.reshape(-1).to(rest.dtype) if v.dtype != rest.dtype else v.reshape(-1)
                )
            out[par] = torch.cat(vals)[inverse].reshape(self.bases[par].shape)
        return out

    def full_named(self, w: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every parameter by name (full tensors) at the flat weights ``w`` (default ``w*``).

        A ``{name: tensor}`` mapping that ``LiftedNetwork(..., center=...)`` accepts for any
        selection of the same network, sliced or whole.
        """
        w = self.center if w is None else w
        full = self.full_params(self.unflatten(w))
        return {n: full[n] for n in self.all_names if n in full}

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
            out = _call_network(self.net, self.kind, params, x)
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


def _selection(include, names_all: list[str]) -> dict[str, list[tuple] | None]:
    """``include=`` as ``{parameter: None (all of it) or [index, ...]}`` in parameter order.

    ``include`` is None (everything), glob patterns, or a mapping ``{pattern: index}``
    (``None`` for the whole parameter). A pattern ending in a bracketed index whose stem
    names parameters (``"blocks.0.attn.W_Q[1]"``) selects that slice of each.
    """
    if include is None:
        return {n: None for n in names_all}
    entries: list[tuple[str, tuple | None]] = []
    if isinstance(include, Mapping):
        for k, v in include.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"include: a mapping's keys are parameter patterns (str); got {k!r}"
                )
            if v is None or v is True:
                entries.append(_split_pattern(k, names_all))
            else:
                entries.append((k, as_index(v)))
    else:
        if isinstance(include, str):
            pats = [include]
        elif isinstance(include, (list, tuple, set, frozenset)):
            pats = list(include)
        else:
            match_patterns(include, names_all, "include")  # raises its TypeError
            pats = []
        for p in pats:
            if not isinstance(p, str):
                match_patterns([p], names_all, "include")  # raises its TypeError
            entries.append(_split_pattern(p, names_all))
    chosen: dict[str, list[tuple] | None] = {}
    for pat, idx in entries:
        for n in match_patterns([pat], names_all, "include"):
            if idx is None:
                chosen[n] = None
            elif n not in chosen:
                chosen[n] = [idx]
            elif chosen[n] is not None and idx not in chosen[n]:
                chosen[n].append(idx)
    return {n: chosen[n] for n in names_all if n in chosen}


def _split_pattern(p: str, names_all: list[str]) -> tuple[str, tuple | None]:
    """``"W_Q[1]"`` → ``("W_Q", (1,))`` when the stem names parameters; else ``(p, None)``."""
    stem, idx = split_indexed(p)
    if idx is None or any(n == p for n in names_all):
        return p, None
    try:
        match_patterns([stem], names_all, "include")
    except ValueError:
        return p, None  # a glob character class such as "layer.W_[QK]"
    return stem, parse_index(idx)


def _include_spec(include):
    """``include`` in a JSON-able form that selects the same entries (index mappings as
    ``"pattern[index]"`` strings)."""
    if isinstance(include, Mapping):
        return [
            k if v is None or v is True else f"{k}[{format_index(as_index(v))}]"
            for k, v in include.items()
        ]
    if isinstance(include, (set, frozenset)):
        return sorted(include)
    return include
