"""torch → JAX: the same potential ``U(w)``, exported once and lowered op by op.

The JAX backend does not ask for the model to be rewritten in JAX. The potential
``U(w) = nβ·L_n(w) + γ/2‖w − w*‖² + Σ_c ρ_c D_c(w)`` that ``LocalPosterior`` writes in
torch (network, likelihood and constraints together) is traced with
``torch.export.export`` to an FX graph of core-ATen ops (``run_decompositions``),
and each op is lowered to ``jax.numpy``/``jax.lax`` through a small op table
(:mod:`condpost._aten_jax`). The data, probes, frozen weights and ``w*`` are lifted
constants of the graph; they become JAX arrays closed over by the lowered function,
so the result is a pure, jittable, differentiable function of the flat weights.

Float64 needs ``jax_enable_x64``. It is switched on (``jax.config.update``, the same
as ``numpyro.enable_x64()``) only when a float64 export is requested; after that,
JAX creates float64 arrays for float64 inputs process-wide.

Examples
--------
>>> jp = to_jax(post)                           # doctest: +SKIP
>>> jax.jit(jax.value_and_grad(jp.potential))(jp.center)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

try:
    import jax
    import jax.numpy as jnp
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "condpost.export needs JAX: install it with `pip install condpost[jax]` (or "
        "`pip install jax numpyro`)."
    ) from e

from . import _aten_jax
from ._aten_jax import NO_OPS, OPS, Lowering, jax_dtype

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior

__all__ = [
    "to_jax",
    "export_function",
    "ExportedFunction",
    "JaxPotential",
    "ExportError",
    "UnsupportedOpError",
    "supported_ops",
    "enable_x64",
]


class ExportError(NotImplementedError):
    """``torch.export`` could not trace the potential (data-dependent Python control flow,
    an untraceable op, ...). The message names the cause; ``__cause__`` is torch's error."""


class UnsupportedOpError(NotImplementedError):
    """An ATen op in the exported graph has no JAX lowering.

    Attributes
    ----------
    op : str
        The ATen overload, e.g. ``"aten.special_bessel_j0.default"``.
    node : str
        The FX node that calls it.
    location : str
        The module path and source line that produced it (from the node's
        ``nn_module_stack`` and ``stack_trace``), when torch recorded them.
    """

    def __init__(self, message: str, op: str = "", node: str = "", location: str = "") -> None:
        super().__init__(message)
        self.op, self.node, self.location = op, node, location


def enable_x64() -> None:
    """Turn on JAX float64 (``jax_enable_x64``), as ``numpyro.enable_x64()`` does.

    This is a process-wide JAX setting; ``to_jax``/``export_function`` call it only for
    float64 exports.
    """
    jax.config.update("jax_enable_x64", True)


def supported_ops() -> list[str]:
    """Names of the core-ATen ops with a JAX lowering (sorted)."""
    return sorted(_op_name(op) for op in OPS)


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return (
            f"aten.{target._opname}.{target._overloadname}"
            if target.namespace == "aten"
            else (str(target))
        )
    return getattr(target, "__name__", str(target))


# --------------------------------------------------------------------------- location
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')
_INTERNAL = ("/torch/", "/condpost/export.py")


def _location(node) -> str:
    """Module path and the innermost user source line of an FX node."""
    parts = []
    stack = node.meta.get("nn_module_stack") or {}
    mods = [(str(p), c) for p, c in stack.values() if str(p) not in ("", "net")]
    if mods:
        path, cls = mods[-1]
        path = path[4:] if path.startswith("net.") else path  # to_jax registers the net as "net"
        cls = cls.__qualname__ if isinstance(cls, type) else str(cls)
        parts.append(f"module {path!r} ({cls})")
    trace = node.meta.get("stack_trace") or ""
    frames = [f for f in _FRAME.findall(trace) if not any(s in f[0] for s in _INTERNAL)]
    if frames:
        f, line, fn, code = frames[-1]
        parts.append(f'File "{f}", line {line}, in {fn}: {code.strip()}')
    return "; ".join(parts) if parts else "(torch recorded no module path or source line)"


def _unsupported(node, others: Sequence[str] = (), origin: str = "") -> UnsupportedOpError:
    op = _op_name(node.target)
    loc = _location(node)
    if origin and not loc.startswith(("module", "File")):
        loc = f"inside {origin}"
    more = sorted(set(others) - {op})
    msg = (
        f"torch → JAX export: the ATen op `{op}` has no JAX lowering (FX node `{node.name}`).\n"
        f"  where: {loc}\n"
        + (f"  other unsupported ops in this graph: {more}\n" if more else "")
        + "  how to proceed: rewrite that line with supported ops (see "
        "condpost.export.supported_ops() and docs/export.md), or pass a lowering "
        f"`extra_ops={{torch.ops.{op}: jax_fn}}` to to_jax/export_function (jax_fn takes "
        "the op's ATen arguments as JAX arrays and Python values), or sample with the "
        "torch backend (backend='pyro')."
    )
    return UnsupportedOpError(msg, op=op, node=node.name, location=loc)


# --------------------------------------------------------------------------- export
class _Wrap(nn.Module):
    """``fn`` as a module; ``net`` (optional) is registered so that torch records the
    module path of every op it runs (``nn_module_stack``), even through
    ``functional_call``."""

    def __init__(self, fn: Callable, net: nn.Module | None = None) -> None:
        super().__init__()
        self.fn = fn
        if net is not None:
            self.net = net

    def forward(self, *args):
        return self.fn(*args)


@contextlib.contextmanager
def _quiet_export():
    # torch.export emits internal deprecation chatter (pytree, tracing); none of it is
    # actionable for condpost users, and the test suite runs with warnings as errors.
    # On a failed trace it also prints the partial FX graph to stderr and logs symbolic-
    # shape warnings; both are captured here (the error says why in one line instead).
    import io
    import logging

    loggers = [
        lg
        for name, lg in list(logging.root.manager.loggerDict.items())
        if name.startswith("torch") and isinstance(lg, logging.Logger)
    ] + [logging.getLogger("torch")]
    levels = [(lg, lg.level) for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()) as err:
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        for lg, _ in levels:
            lg.setLevel(logging.ERROR)
        try:
            yield err
        finally:
            for lg, lv in levels:
                lg.setLevel(lv)


def _user_line(text: str) -> str:
    """The last ``# File: ... code: ...`` line of a partial FX graph outside torch and condpost."""
    import os

    pkg = os.path.dirname(os.path.abspath(__file__))
    best = ""
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("# File: "):
            continue
        where = line[len("# File: ") :]
        if "site-packages/torch" in where or where.startswith(pkg):
            continue
        best = where
    return best


class ExportedFunction:
    """A torch function lowered to JAX: call it with JAX arrays in place of tensors.

    Pure and jittable; constants of the graph (captured tensors, parameters, buffers)
    are closed over as JAX arrays. Attributes: ``ops`` (sorted ATen op names),
    ``export_seconds`` (``torch.export`` plus lowering set-up), ``exported_program``.
    """

    def __init__(
        self, ep, extra_ops: Mapping | None, float_dtype, precision, origin: str = ""
    ) -> None:
        self.exported_program = ep
        self._origin = origin
        self._ctx = Lowering(precision)
        self._float_dtype = float_dtype
        table = dict(OPS)
        if extra_ops:
            table.update(extra_ops)
        self._table = table
        graph = ep.graph
        sig = ep.graph_signature
        self._nodes = [n for n in graph.nodes if n.op == "call_function"]
        ops = {n.target for n in self._nodes if n.target not in NO_OPS}
        missing = [n for n in self._nodes if n.target not in NO_OPS and n.target not in table]
        if missing:
            raise _unsupported(missing[0], [_op_name(n.target) for n in missing], origin)
        self.ops = sorted(_op_name(op) for op in ops)
        # placeholders: user inputs in order, everything else a closed-over constant
        self._user_inputs: list[str] = []
        self._consts: dict[str, Any] = {}
        kinds = torch.export.graph_signature.InputKind
        used = {n.name for n in graph.nodes if n.op == "placeholder" and n.users}
        for spec in sig.input_specs:
            name = spec.arg.name
            if spec.kind == kinds.USER_INPUT:
                self._user_inputs.append(name)
                continue
            if name not in used:
                continue
            if spec.kind in (kinds.PARAMETER, kinds.BUFFER):
                t = (
                    ep.state_dict[spec.target]
                    if spec.target in ep.state_dict
                    else (ep.constants[spec.target])
                )
            elif spec.kind == kinds.CONSTANT_TENSOR:
                t = ep.constants[spec.target]
            else:
                raise UnsupportedOpError(
                    f"torch → JAX export: graph input {name!r} of kind {spec.kind.name} is not "
                    f"supported (only tensors, parameters, buffers and constants are)"
                )
            self._consts[name] = self._const(t)
        (out_node,) = [n for n in graph.nodes if n.op == "output"]
        self._outputs = out_node.args[0]
        self._out_spec = ep.call_spec.out_spec
        self._in_spec = ep.call_spec.in_spec
        self._placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
        self._meta_dtype = {}
        for n in self._nodes:
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                self._meta_dtype[n.name] = self._map_dtype(val.dtype)
        self.export_seconds = float("nan")

    def _map_dtype(self, dt: torch.dtype):
        if dt.is_floating_point and self._float_dtype is not None:
            return self._float_dtype
        return jax_dtype(dt)

    def _const(self, t: torch.Tensor):
        t = t.detach().cpu()
        if t.is_floating_point():
            dt = self._map_dtype(t.dtype)
            return jnp.asarray(
                t.to(torch.float64).numpy() if t.dtype != torch.float32 else t.numpy(), dtype=dt
            )
        return jnp.asarray(t.numpy(), dtype=jax_dtype(t.dtype))

    def __call__(self, *args):
        flat, spec = pytree.tree_flatten((args, {}))
        if len(flat) != len(self._user_inputs):
            raise TypeError(
                f"the exported function takes {len(self._user_inputs)} array argument(s); got "
                f"{len(flat)}"
            )
        env: dict[str, Any] = dict(self._consts)
        for name, a in zip(self._user_inputs, flat, strict=True):
            a = jnp.asarray(a)
            if jnp.issubdtype(a.dtype, jnp.floating) and self._float_dtype is not None:
                a = a.astype(self._float_dtype)
            env[name] = a
        ctx, table = self._ctx, self._table

        def load(a):
            if isinstance(a, torch.fx.Node):
                v = env[a.name]
                if isinstance(v, _aten_jax._NotLowered):
                    raise UnsupportedOpError(
                        f"torch → JAX export: `{a.name}` is a secondary output that is not "
                        f"lowered (e.g. max-pool indices); it is used at {_location(a)}"
                    )
                return v
            if isinstance(a, (list, tuple)):
                return type(a)(load(x) for x in a)
            if isinstance(a, torch.dtype):
                return a
            return a

        for node in self._nodes:
            op = node.target
            if op in NO_OPS:
                continue
            fn = table[op]
            a = [load(x) for x in node.args]
            kw = {k: load(v) for k, v in node.kwargs.items()}
            try:
                out = fn(ctx, *a, **kw) if _aten_jax.needs_context(op) else fn(*a, **kw)
            except UnsupportedOpError:
                raise
            except NotImplementedError as e:
                err = _unsupported(node, origin=self._origin)
                raise UnsupportedOpError(
                    f"{err}\n  reason: {e}", op=err.op, node=err.node, location=err.location
                ) from None
            want = self._meta_dtype.get(node.name)
            if want is not None and hasattr(out, "dtype") and out.dtype != want:
                out = out.astype(want)
            env[node.name] = out
        outs = [load(o) if isinstance(o, torch.fx.Node) else o for o in self._outputs]
        return pytree.tree_unflatten(outs, self._out_spec)

    def __repr__(self) -> str:
        return f"ExportedFunction(inputs={len(self._user_inputs)}, ops={len(self.ops)})"


def export_function(
    fn: Callable,
    example_args: Sequence[torch.Tensor] | torch.Tensor,
    *,
    extra_ops: Mapping | None = None,
    dtype=None,
    precision="highest",
) -> ExportedFunction:
    """Export a torch function of tensors and lower it to a JAX callable.

    ``fn`` is traced by ``torch.export.export(strict=False)`` at ``example_args``
    (shapes are fixed to theirs), decomposed to core ATen, and each op is mapped to
    ``jax.numpy``/``lax`` through the op table. Tensors that ``fn`` closes over become
    constants of the JAX function.

    Parameters
    ----------
    fn : callable
        Torch function of tensors (a module's ``forward`` works too).
    example_args : tensor or sequence of tensors
        Example inputs; the JAX callable takes arrays of the same shapes, in the same
        positions.
    extra_ops : mapping, optional
        Additional lowerings ``{torch.ops.aten.<op>.<overload>: jax_fn}``, taking the
        op's ATen arguments; they override the table.
    dtype : {None, "float32", "float64"} or dtype, optional
        Compute every floating value in this dtype (default: the graph's own dtypes).
        Any float64 in the graph (or ``dtype=float64``) turns on ``jax_enable_x64``.
    precision : str or jax.lax.Precision
        Precision of matrix products and convolutions (default ``"highest"``: full
        float32 on GPUs, no TF32).

    Returns
    -------
    ExportedFunction
        Callable on JAX arrays; attributes ``ops``, ``export_seconds``.

    Raises
    ------
    UnsupportedOpError
        When the graph contains an op without a lowering; the message names the op, the
        FX node and the module path and source line that produced it.
    """
    t0 = time.perf_counter()
    if isinstance(example_args, torch.Tensor):
        example_args = (example_args,)
    example_args = tuple(example_args)
    float_dtype = None
    if dtype is not None:
        float_dtype = jnp.dtype(str(dtype).replace("torch.", ""))
        if not jnp.issubdtype(float_dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating dtype; got {dtype!r}")
    if isinstance(precision, str):
        precision = jax.lax.Precision[precision.upper()]
    module = fn if isinstance(fn, nn.Module) else _Wrap(fn)
    with _quiet_export() as err:
        try:
            ep = torch.export.export(module, example_args, strict=False)
        except Exception as e:  # torch raises many types here; the caller needs one
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            graph = str(getattr(e, "partial_fx_graph", "") or "") + err.getvalue()
            at = _user_line(graph)
            at = f" at {at[:200]}" if at else ""
            raise ExportError(
                f"torch.export could not trace the model{at} ({type(e).__name__}: "
                f"{first[:200]}). Make forward traceable (no Python branches on tensor "
                f"values), or use backend='pyro'."
            ) from e
        _detach_no_grad_regions(ep)
        ep = ep.run_decompositions(_decomposition_table())
    needs64 = float_dtype == jnp.float64 or (
        float_dtype is None and _graph_uses_float64(ep, example_args)
    )
    if needs64:
        enable_x64()
    out = ExportedFunction(ep, extra_ops, float_dtype, precision, _describe(fn))
    out.export_seconds = time.perf_counter() - t0
    return out


def _describe(fn) -> str:
    """``module.qualname (file:line)`` of the exported callable, for error messages."""
    target = fn.fn if isinstance(fn, _Wrap) else fn
    target = type(target).forward if isinstance(target, nn.Module) else target
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
    try:
        import inspect

        file = inspect.getsourcefile(target)
        line = inspect.getsourcelines(target)[1]
        return f"{name} ({file}:{line})"
    except (TypeError, OSError):
        return name


def _graph_uses_float64(ep, example_args) -> bool:
    for a in example_args:
        if isinstance(a, torch.Tensor) and a.dtype == torch.float64:
            return True
    for t in list(ep.state_dict.values()) + list(ep.constants.values()):
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return True
    for n in ep.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dtype == torch.float64:
            return True
    return False


def _detach_no_grad_regions(ep) -> None:
    """Keep ``torch.no_grad()`` semantics through decomposition.

    ``torch.export`` records a ``no_grad`` block as a ``wrap_with_set_grad_enabled(False,
    ...)`` node, which ``run_decompositions`` inlines, forgetting that its results carry
    no gradient. Each of its outputs is passed through ``aten.detach`` first (lowered to
    ``lax.stop_gradient``), as torch's autograd would treat it.
    """
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    if hop is None:
        return
    graph = ep.graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not hop or node.args[0] is not False:
            continue
        for user in list(node.users):
            with graph.inserting_after(user):
                det = graph.call_function(torch.ops.aten.detach.default, (user,))
            det.meta = dict(user.meta)
            user.replace_all_uses_with(det, delete_user_cb=lambda u, d=det: u is not d)
            changed = True
    if changed:
        ep.graph_module.recompile()


def _decomposition_table():
    """Core-ATen decompositions, minus a few ops kept whole for a better JAX lowering.

    ``softplus`` is kept so that its lowering can use the overflow-free
    ``logaddexp(βx, 0)/β`` (the decomposition ``log1p(exp(βx))`` has a NaN gradient
    where ``exp`` overflows in the unselected branch of its ``where``). ``detach`` is
    kept because its decomposition, ``alias``, forgets that it stops gradients.
    """
    table = torch.export.default_decompositions()
    for op in (torch.ops.aten.softplus.default, torch.ops.aten.detach.default):
        with contextlib.suppress(KeyError):
            del table[op]
    return table


# --------------------------------------------------------------------------- posterior
class JaxPotential:
    """A ``LocalPosterior``'s potential and loss as pure JAX functions of flat ``w``.

    Attributes
    ----------
    potential : callable
        ``w [d] -> U(w)``, equal to ``post.potential(w)`` (jittable, differentiable).
    loss : callable
        ``w [d] -> L_n(w)``, the mean per-sample NLL, equal to ``post.loss(w)``.
    d : int
        Number of lifted parameters.
    dtype : numpy dtype
        ``float32`` or ``float64``.
    center : jax.Array
        ``w*``.
    ops : list of str
        Core-ATen ops in the exported graph (sorted).
    export_seconds : float
        Wall time of ``torch.export`` plus the lowering set-up (not JAX compilation).
    """

    def __init__(self, fn: ExportedFunction, d: int, dtype, center) -> None:
        self._fn = fn
        self.d, self.dtype, self.center = d, dtype, center
        self.ops = fn.ops
        self.export_seconds = fn.export_seconds

    def potential(self, w):
        """``U(w)``."""
        return self._fn(w)[0]

    def loss(self, w):
        """``L_n(w)``."""
        return self._fn(w)[1]

    def potential_and_loss(self, w):
        """``(U(w), L_n(w))`` from one graph."""
        return self._fn(w)

    def __repr__(self) -> str:
        return f"JaxPotential(d={self.d}, dtype={self.dtype}, ops={len(self.ops)})"


def to_jax(
    post: LocalPosterior,
    dtype=None,
    *,
    extra_ops: Mapping | None = None,
    precision="highest",
) -> JaxPotential:
    """Export a ``LocalPosterior``'s potential ``U(w)`` and loss ``L_n(w)`` to JAX.

    The network, likelihood, localizer and every constraint are inside the exported
    graph; data, probes, targets, frozen weights and ``w*`` are constants.

    Parameters
    ----------
    post : LocalPosterior
        The declaration (constraints included) to export.
    dtype : {None, "float32", "float64"} or torch/numpy dtype, optional
        Computation dtype (default: ``post.dtype``). A dtype other than ``post``'s
        re-declares the posterior in that dtype first (``post._replace(dtype=...)``).
        Float64 turns on ``jax_enable_x64``.
    extra_ops : mapping, optional
        Extra lowerings ``{torch.ops.aten.<op>.<overload>: jax_fn}``.
    precision : str or jax.lax.Precision
        Matmul/convolution precision (default ``"highest"``).

    Returns
    -------
    JaxPotential
        ``potential``, ``loss``, ``d``, ``dtype``, ``center``, ``ops``,
        ``export_seconds``.
    """
    if not all(hasattr(post, a) for a in ("potential", "loss", "lifted", "center", "_replace")):
        raise TypeError(f"to_jax expects a LocalPosterior; got {type(post).__name__}")
    post.data.require_memory("to_jax (the JAX export holds every data row as a constant)")
    tdt = _torch_dtype(dtype, post.dtype)
    if tdt != post.dtype:
        post = post._replace(dtype=tdt)
    if post.device.type != "cpu":
        raise ValueError(
            f"to_jax exports from CPU tensors; the posterior lives on {post.device}. "
            f"Declare it on CPU (JAX places the arrays on its own devices)."
        )
    if tdt == torch.float64:
        enable_x64()

    def both(w):
        return post.potential(w), post.loss(w)

    fn = export_function(
        _Wrap(both, post.lifted.net),
        (post.center.clone(),),
        extra_ops=extra_ops,
        precision=precision,
    )
    jdt = jax_dtype(tdt)
    center = jnp.asarray(post.center.detach().cpu().numpy(), dtype=jdt)
    return JaxPotential(fn, post.d, jdt, center)


def _torch_dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
        out = {"float32": torch.float32, "float64": torch.float64}.get(name)
        if out is None:
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {dtype!r}")
    if out not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64; got {out}")
    return out
