"""The core-ATen → JAX op table used by :mod:`condpost.export`.

Each entry maps a ``torch.ops.aten`` overload to a pure function of JAX arrays and
Python values with the overload's signature (positional and keyword arguments as
they appear on the FX node). Ops returning several tensors return a tuple.
``OPS`` is built once at import and never mutated; extra lowerings are passed
explicitly to ``export_function(..., extra_ops=...)``.

Lowerings follow the ATen semantics documented in ``native_functions.yaml`` and the
torch reference decompositions (``torch/_refs``), re-expressed with ``jax.numpy`` and
``jax.lax``; matrix products and convolutions use ``precision`` (default
``lax.Precision.HIGHEST``, so float32 matmuls on GPUs do not silently drop to TF32).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

__all__ = ["OPS", "NO_OPS", "jax_dtype", "Lowering"]

aten = torch.ops.aten

_TORCH_TO_NP = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: jnp.bfloat16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
    torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}


def jax_dtype(dtype: torch.dtype | None):
    """The JAX dtype of a torch dtype (``None`` stays ``None``).

    Canonicalized for the current ``jax_enable_x64`` setting: without it, int64 maps to
    int32 (indices) and float64 to float32, as JAX itself would store them.
    """
    if dtype is None:
        return None
    try:
        return jax.dtypes.canonicalize_dtype(_TORCH_TO_NP[dtype])
    except KeyError:
        raise TypeError(f"torch dtype {dtype} has no JAX equivalent in condpost.export") from None


class Lowering:
    """Context of one lowering: the matmul/conv precision (threaded to ops that take it)."""

    def __init__(self, precision=lax.Precision.HIGHEST) -> None:
        self.precision = precision


OPS: dict = {}
# ops that only check metadata or order side effects: evaluated as no-ops
NO_OPS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_async.msg,
}
_NEEDS_CTX: set = set()


def _reg(*ops, ctx: bool = False) -> Callable:
    def deco(fn):
        for op in ops:
            OPS[op] = fn
            if ctx:
                _NEEDS_CTX.add(op)
        return fn

    return deco


def needs_context(op) -> bool:
    return op in _NEEDS_CTX


def _dim(d, ndim):
    return d + ndim if d < 0 else d


def _dims(dim, ndim):
    """ATen's ``int[1]? dim``: None or [] means all dimensions."""
    if dim is None:
        return None
    if isinstance(dim, int):
        dim = [dim]
    if len(dim) == 0:
        return None
    return tuple(_dim(d, ndim) for d in dim)


# --------------------------------------------------------------------------- elementwise
def _unary(op, fn):
    OPS[op] = lambda x: fn(x)


for _op, _fn in [
    (aten.neg.default, jnp.negative),
    (aten.abs.default, jnp.abs),
    (aten.exp.default, jnp.exp),
    (aten.expm1.default, jnp.expm1),
    (aten.exp2.default, jnp.exp2),
    (aten.log.default, jnp.log),
    (aten.log1p.default, jnp.log1p),
    (aten.log2.default, jnp.log2),
    (aten.log10.default, jnp.log10),
    (aten.sqrt.default, jnp.sqrt),
    (aten.rsqrt.default, lax.rsqrt),
    (aten.reciprocal.default, jnp.reciprocal),
    (aten.sin.default, jnp.sin),
    (aten.cos.default, jnp.cos),
    (aten.tan.default, jnp.tan),
    (aten.asin.default, jnp.arcsin),
    (aten.acos.default, jnp.arccos),
    (aten.atan.default, jnp.arctan),
    (aten.sinh.default, jnp.sinh),
    (aten.cosh.default, jnp.cosh),
    (aten.tanh.default, jnp.tanh),
    (aten.asinh.default, jnp.arcsinh),
    (aten.acosh.default, jnp.arccosh),
    (aten.atanh.default, jnp.arctanh),
    (aten.sigmoid.default, jax.nn.sigmoid),
    (aten.erf.default, jax.scipy.special.erf),
    (aten.erfc.default, jax.scipy.special.erfc),
    (aten.erfinv.default, jax.scipy.special.erfinv),
    (aten.relu.default, jax.nn.relu),
    (aten.sign.default, jnp.sign),
    (aten.floor.default, jnp.floor),
    (aten.ceil.default, jnp.ceil),
    (aten.trunc.default, jnp.trunc),
    (aten.round.default, jnp.round),
    (aten.isnan.default, jnp.isnan),
    (aten.isinf.default, jnp.isinf),
    (aten.logical_not.default, jnp.logical_not),
    (aten.bitwise_not.default, jnp.invert),
    (aten.lgamma.default, jax.scipy.special.gammaln),
]:
    _unary(_op, _fn)


@_reg(aten.add.Tensor)
def _add(a, b, *, alpha=1):
    return a + b if alpha == 1 else a + alpha * b


@_reg(aten.sub.Tensor)
def _sub(a, b, *, alpha=1):
    return a - b if alpha == 1 else a - alpha * b


@_reg(aten.mul.Tensor, aten.mul.Scalar)
def _mul(a, b):
    return a * b


@_reg(aten.div.Tensor)
def _div(a, b):
    return jnp.true_divide(a, b)


@_reg(aten.div.Tensor_mode)
def _div_mode(a, b, *, rounding_mode=None):
    q = jnp.true_divide(a, b)
    if rounding_mode == "trunc":
        return jnp.trunc(q)
    if rounding_mode == "floor":
        return jnp.floor_divide(a, b)
    return q


@_reg(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor)
def _pow(a, b):
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        if float(b).is_integer() and abs(b) <= 64:
            return lax.integer_pow(a, int(b))  # exact x·x·… as torch does for small powers
    return jnp.power(a, b)


@_reg(aten.pow.Scalar)
def _pow_scalar(a, b):
    return jnp.power(a, b)


@_reg(aten.fmod.Tensor, aten.fmod.Scalar)
def _fmod(a, b):
    return jnp.fmod(a, b)


@_reg(aten.remainder.Tensor, aten.remainder.Scalar)
def _remainder(a, b):
    return jnp.remainder(a, b)


@_reg(aten.hypot.default)
def _hypot(a, b):
    return jnp.hypot(a, b)


@_reg(aten.atan2.default)
def _atan2(a, b):
    return jnp.arctan2(a, b)


@_reg(aten.maximum.default)
def _maximum(a, b):
    return jnp.maximum(a, b)


@_reg(aten.minimum.default)
def _minimum(a, b):
    return jnp.minimum(a, b)


@_reg(aten.clamp.default, aten.clamp.Tensor)
def _clamp(x, min=None, max=None):
    if min is not None:
        x = jnp.maximum(x, min)
    if max is not None:
        x = jnp.minimum(x, max)
    return x


@_reg(aten.where.self)
def _where(c, a, b):
    return jnp.where(c, a, b)


for _op, _fn in [
    (aten.eq, jnp.equal),
    (aten.ne, jnp.not_equal),
    (aten.lt, jnp.less),
    (aten.le, jnp.less_equal),
    (aten.gt, jnp.greater),
    (aten.ge, jnp.greater_equal),
]:
    OPS[_op.Tensor] = OPS[_op.Scalar] = (lambda f: lambda a, b: f(a, b))(_fn)

for _op, _fn in [
    (aten.logical_and.default, jnp.logical_and),
    (aten.logical_or.default, jnp.logical_or),
    (aten.logical_xor.default, jnp.logical_xor),
    (aten.bitwise_and.Tensor, jnp.bitwise_and),
    (aten.bitwise_or.Tensor, jnp.bitwise_or),
]:
    OPS[_op] = (lambda f: lambda a, b: f(a, b))(_fn)


# --------------------------------------------------------------------------- activations
@_reg(aten.gelu.default)
def _gelu(x, *, approximate="none"):
    if approximate == "tanh":
        # torch: 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + jnp.tanh(inner))
    return 0.5 * x * (1.0 + jax.scipy.special.erf(x * (1.0 / math.sqrt(2.0))))


@_reg(aten.leaky_relu.default)
def _leaky_relu(x, negative_slope=0.01):
    return jnp.where(x > 0, x, x * negative_slope)


@_reg(aten.hardtanh.default)
def _hardtanh(x, min_val=-1.0, max_val=1.0):
    return jnp.clip(x, min_val, max_val)


@_reg(aten.elu.default)
def _elu(x, alpha=1.0, scale=1.0, input_scale=1.0):
    # torch: scale·x for x > 0, scale·α·(exp(input_scale·x) − 1) otherwise
    neg = alpha * jnp.expm1(jnp.minimum(x, 0) * input_scale)
    return scale * jnp.where(x > 0, x, neg)


@_reg(aten.softplus.default)
def _softplus(x, beta=1.0, threshold=20.0):
    # torch: x where βx > threshold, else log1p(exp(βx))/β; the overflow-free form
    # logaddexp(βx, 0)/β has the same value and a finite gradient everywhere
    bx = x * beta
    return jnp.where(bx > threshold, x, jnp.logaddexp(bx, 0.0) / beta)


# --------------------------------------------------------------------------- softmax / norms
@_reg(aten._softmax.default)
def _softmax(x, dim, half_to_float=False):
    return jax.nn.softmax(x, axis=dim)


@_reg(aten._log_softmax.default)
def _log_softmax(x, dim, half_to_float=False):
    return jax.nn.log_softmax(x, axis=dim)


@_reg(aten.native_layer_norm.default)
def _layer_norm(x, normalized_shape, weight, bias, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    xc = x - mean
    var = jnp.mean(xc * xc, axis=axes, keepdims=True)
    rstd = lax.rsqrt(var + eps)
    out = xc * rstd
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


def _bn_shape(p, ndim):
    return p.reshape((1, -1) + (1,) * (ndim - 2))


@_reg(aten._native_batch_norm_legit_no_training.default)
def _batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps):
    out = (x - _bn_shape(running_mean, x.ndim)) * _bn_shape(lax.rsqrt(running_var + eps), x.ndim)
    if weight is not None:
        out = out * _bn_shape(weight, x.ndim)
    if bias is not None:
        out = out + _bn_shape(bias, x.ndim)
    empty = jnp.zeros((0,), x.dtype)
    return out, empty, empty


@_reg(aten.native_group_norm.default)
def _group_norm(x, weight, bias, N, C, HxW, group, eps):
    xs = x.reshape(N, group, -1)
    mean = jnp.mean(xs, axis=-1, keepdims=True)
    xc = xs - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    rstd = lax.rsqrt(var + eps)
    out = (xc * rstd).reshape(x.shape)
    if weight is not None:
        out = out * _bn_shape(weight, x.ndim)
    if bias is not None:
        out = out + _bn_shape(bias, x.ndim)
    return out, mean.reshape(N, group), rstd.reshape(N, group)


# --------------------------------------------------------------------------- linear algebra
@_reg(aten.mm.default, ctx=True)
def _mm(ctx, a, b):
    return jnp.matmul(a, b, precision=ctx.precision)


@_reg(aten.bmm.default, ctx=True)
def _bmm(ctx, a, b):
    return jnp.matmul(a, b, precision=ctx.precision)


@_reg(aten.addmm.default, ctx=True)
def _addmm(ctx, bias, a, b, *, beta=1, alpha=1):
    prod = jnp.matmul(a, b, precision=ctx.precision)
    if alpha != 1:
        prod = alpha * prod
    if beta == 0:
        return prod
    return (bias if beta == 1 else beta * bias) + prod


@_reg(aten._linalg_eigh.default)
def _eigh(a, UPLO="L", compute_v=True):
    # torch differentiates eigh as a function of the (assumed symmetric) matrix; JAX's
    # symmetrize_input=True gives the same symmetric gradient.
    w, v = jnp.linalg.eigh(a, UPLO=UPLO, symmetrize_input=True)
    return w, v if compute_v else jnp.zeros((0,), a.dtype)


@_reg(aten._linalg_svd.default)
def _svd(a, full_matrices=False, compute_uv=True, driver=None):
    if not compute_uv:
        s = jnp.linalg.svd(a, compute_uv=False)
        empty = jnp.zeros((0,), a.dtype)
        return empty, s, empty
    u, s, vh = jnp.linalg.svd(a, full_matrices=full_matrices)
    return u, s, vh


@_reg(aten._linalg_det.default)
def _det(a):
    # (det, LU, pivots); only the determinant is lowered
    return jnp.linalg.det(a), _NOT_LOWERED, _NOT_LOWERED


@_reg(aten._linalg_slogdet.default)
def _slogdet(a):
    sign, logabs = jnp.linalg.slogdet(a)
    return sign, logabs, _NOT_LOWERED, _NOT_LOWERED


@_reg(aten.diagonal.default)
def _diagonal(x, offset=0, dim1=0, dim2=1):
    return jnp.diagonal(x, offset=offset, axis1=dim1, axis2=dim2)


# --------------------------------------------------------------------------- convolution / pooling
@_reg(aten.convolution.default, ctx=True)
def _convolution(
    ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups
):
    nsp = x.ndim - 2
    if transposed:
        raise NotImplementedError(
            "aten.convolution with transposed=True (ConvTranspose) has no JAX lowering yet"
        )
    spatial = "DHW"[-nsp:] if nsp <= 3 else None
    if spatial is None:
        raise NotImplementedError(f"aten.convolution over {nsp} spatial dims is not lowered")
    lhs = "NC" + spatial
    rhs = "OI" + spatial
    out = lax.conv_general_dilated(
        x,
        weight,
        window_strides=tuple(stride),
        padding=[(p, p) for p in padding],
        rhs_dilation=tuple(dilation),
        dimension_numbers=(lhs, rhs, lhs),
        feature_group_count=groups,
        precision=ctx.precision,
    )
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * nsp)
    return out


def _pool_args(x, kernel_size, stride, padding, dilation, nsp):
    def tup(v, default):
        if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
            v = default
        if isinstance(v, int):
            v = [v]
        v = list(v)
        return tuple(v * nsp if len(v) == 1 else v)

    k = tup(kernel_size, None)
    s = tup(stride, k)
    p = tup(padding, 0)
    d = tup(dilation, 1)
    lead = x.ndim - nsp
    return (
        (1,) * lead + k,
        (1,) * lead + s,
        [(0, 0)] * lead + [(pi, pi) for pi in p],
        (1,) * lead + d,
    )


def _max_pool(nsp):
    def fn(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
        if ceil_mode:
            raise NotImplementedError("max pooling with ceil_mode=True is not lowered")
        win, strides, pads, dil = _pool_args(x, kernel_size, stride, padding, dilation, nsp)
        init = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
        out = lax.reduce_window(x, np.array(init, x.dtype), lax.max, win, strides, pads, None, dil)
        return out, _NOT_LOWERED  # the argmax indices are not lowered

    return fn


OPS[aten.max_pool2d_with_indices.default] = _max_pool(2)


def _avg_pool(nsp):
    def fn(
        x,
        kernel_size,
        stride=(),
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    ):
        if ceil_mode:
            raise NotImplementedError("average pooling with ceil_mode=True is not lowered")
        win, strides, pads, dil = _pool_args(x, kernel_size, stride, padding, 1, nsp)
        zero = np.array(0, x.dtype)
        total = lax.reduce_window(x, zero, lax.add, win, strides, pads, None, dil)
        if divisor_override:
            return total / divisor_override
        if count_include_pad or all(p == (0, 0) for p in pads):
            return total / math.prod(win)
        ones = jnp.ones(x.shape[-nsp:], x.dtype)
        cnt = lax.reduce_window(ones, zero, lax.add, win[-nsp:], strides[-nsp:], pads[-nsp:])
        return total / cnt

    return fn


OPS[aten.avg_pool2d.default] = _avg_pool(2)  # avg_pool1d decomposes to it


# --------------------------------------------------------------------------- indexing
@_reg(aten.embedding.default)
def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return jnp.take(weight, indices, axis=0)


@_reg(aten.gather.default)
def _gather(x, dim, index, sparse_grad=False):
    return jnp.take_along_axis(x, index, axis=dim)


@_reg(aten.index_select.default)
def _index_select(x, dim, index):
    return jnp.take(x, index, axis=dim)


@_reg(aten.index.Tensor)
def _index(x, indices):
    key = []
    for i in indices:
        if i is None:
            key.append(slice(None))
        elif i.dtype == jnp.bool_:
            raise NotImplementedError(
                "boolean-mask indexing has a data-dependent shape; use torch.where instead"
            )
        else:
            key.append(i)
    return x[tuple(key)]


@_reg(aten.index_put.default)
def _index_put(x, indices, values, accumulate=False):
    key = tuple(slice(None) if i is None else i for i in indices)
    return x.at[key].add(values) if accumulate else x.at[key].set(values)


@_reg(aten.slice.Tensor)
def _slice(x, dim=0, start=None, end=None, step=1):
    key = [slice(None)] * x.ndim
    n = x.shape[dim]
    start = 0 if start is None else start
    end = n if end is None else end
    # ATen clamps out-of-range bounds (e.g. end = 2**63 - 1)
    start = max(min(start + n if start < 0 else start, n), 0)
    end = max(min(end + n if end < 0 else end, n), 0)
    key[dim] = slice(start, end, step)
    return x[tuple(key)]


@_reg(aten.select.int)
def _select(x, dim, index):
    return lax.index_in_dim(x, index, axis=_dim(dim, x.ndim), keepdims=False)


@_reg(aten.split_with_sizes.default)
def _split_with_sizes(x, split_sizes, dim=0):
    cuts = np.cumsum(split_sizes)[:-1].tolist()
    return tuple(jnp.split(x, cuts, axis=dim))


@_reg(aten.cat.default)
def _cat(tensors, dim=0):
    tensors = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)] or tensors[:1]
    return jnp.concatenate(tensors, axis=dim)


@_reg(aten.constant_pad_nd.default)
def _constant_pad_nd(x, pad, value=0):
    # pad lists (before, after) pairs starting from the last dimension; negative crops
    cfg = [(0, 0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        cfg[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(x, jnp.array(value, x.dtype), cfg)


@_reg(aten.flip.default)
def _flip(x, dims):
    return jnp.flip(x, axis=tuple(dims))


@_reg(aten.repeat.default)
def _repeat(x, repeats):
    lead = len(repeats) - x.ndim
    return jnp.tile(x.reshape((1,) * lead + x.shape), repeats)


# --------------------------------------------------------------------------- shape
@_reg(aten.view.default)
def _view(x, size):
    return jnp.reshape(x, tuple(size))


@_reg(aten.permute.default)
def _permute(x, dims):
    return jnp.transpose(x, tuple(dims))


@_reg(aten.expand.default)
def _expand(x, size, *, implicit=False):
    lead = len(size) - x.ndim
    shape = tuple(x.shape[i - lead] if s == -1 else s for i, s in enumerate(size))
    return jnp.broadcast_to(x, shape)


@_reg(aten.squeeze.dims)
def _squeeze(x, dim):
    dims = _dims(dim, x.ndim)
    if dims is None:
        return jnp.squeeze(x)
    return jnp.squeeze(x, axis=tuple(d for d in dims if x.shape[d] == 1))


@_reg(aten.unsqueeze.default)
def _unsqueeze(x, dim):
    return jnp.expand_dims(x, _dim(dim, x.ndim + 1))


@_reg(aten.clone.default, aten.alias.default)  # alias: a full-range view, e.g. w[..., 0:d]
def _clone(x, *, memory_format=None):
    return x


@_reg(aten.detach.default)
def _detach(x):
    return lax.stop_gradient(x)


@_reg(aten._to_copy.default)
def _to_copy(x, *, dtype=None, layout=None, device=None, pin_memory=None, **kw):
    return x if dtype is None else x.astype(jax_dtype(dtype))


@_reg(aten.copy.default)
def _copy(x, src, non_blocking=False):
    return jnp.broadcast_to(src, x.shape).astype(x.dtype)


# --------------------------------------------------------------------------- reductions
@_reg(aten.sum.dim_IntList)
def _sum(x, dim=None, keepdim=False, *, dtype=None):
    return jnp.sum(x, axis=_dims(dim, x.ndim), keepdims=keepdim, dtype=jax_dtype(dtype))


@_reg(aten.mean.dim)
def _mean(x, dim=None, keepdim=False, *, dtype=None):
    return jnp.mean(x, axis=_dims(dim, x.ndim), keepdims=keepdim, dtype=jax_dtype(dtype))


@_reg(aten.mean.default)
def _mean_all(x, *, dtype=None):
    return jnp.mean(x, dtype=jax_dtype(dtype))


@_reg(aten.prod.dim_int)
def _prod(x, dim, keepdim=False, *, dtype=None):
    return jnp.prod(x, axis=dim, keepdims=keepdim, dtype=jax_dtype(dtype))


@_reg(aten.prod.default)
def _prod_all(x, *, dtype=None):
    return jnp.prod(x, dtype=jax_dtype(dtype))


@_reg(aten.amax.default)
def _amax(x, dim=(), keepdim=False):
    return jnp.max(x, axis=_dims(dim, x.ndim), keepdims=keepdim)


@_reg(aten.amin.default)
def _amin(x, dim=(), keepdim=False):
    return jnp.min(x, axis=_dims(dim, x.ndim), keepdims=keepdim)


@_reg(aten.max.default)
def _max_all(x):
    return jnp.max(x)


@_reg(aten.min.default)
def _min_all(x):
    return jnp.min(x)


@_reg(aten.max.dim)
def _max_dim(x, dim, keepdim=False):
    return jnp.max(x, axis=dim, keepdims=keepdim), jnp.argmax(x, axis=dim, keepdims=keepdim)


@_reg(aten.min.dim)
def _min_dim(x, dim, keepdim=False):
    return jnp.min(x, axis=dim, keepdims=keepdim), jnp.argmin(x, axis=dim, keepdims=keepdim)


@_reg(aten.argmax.default)
def _argmax(x, dim=None, keepdim=False):
    if dim is None:
        return jnp.argmax(x.reshape(-1))
    return jnp.argmax(x, axis=dim, keepdims=keepdim)


@_reg(aten.argmin.default)
def _argmin(x, dim=None, keepdim=False):
    if dim is None:
        return jnp.argmin(x.reshape(-1))
    return jnp.argmin(x, axis=dim, keepdims=keepdim)


def _correction(correction, unbiased=None):
    return 1 if correction is None else correction


@_reg(aten.var.correction)
def _var(x, dim=None, *, correction=None, keepdim=False):
    return jnp.var(x, axis=_dims(dim, x.ndim), ddof=_correction(correction), keepdims=keepdim)


@_reg(aten.var_mean.correction)
def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    axes = _dims(dim, x.ndim)
    return (
        jnp.var(x, axis=axes, ddof=_correction(correction), keepdims=keepdim),
        jnp.mean(x, axis=axes, keepdims=keepdim),
    )


@_reg(aten.any.dim, aten.any.dims)
def _any(x, dim=None, keepdim=False):
    return jnp.any(x, axis=_dims(dim, x.ndim), keepdims=keepdim)


@_reg(aten.any.default)
def _any_all(x):
    return jnp.any(x)


@_reg(aten.cumsum.default)
def _cumsum(x, dim, *, dtype=None):
    return jnp.cumsum(x, axis=dim, dtype=jax_dtype(dtype))


@_reg(aten.cumprod.default)
def _cumprod(x, dim, *, dtype=None):
    return jnp.cumprod(x, axis=dim, dtype=jax_dtype(dtype))


@_reg(aten.linalg_vector_norm.default)
def _vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    if dtype is not None:
        x = x.astype(jax_dtype(dtype))
    axes = _dims(dim, x.ndim)
    a = jnp.abs(x)
    if ord == 2:
        return jnp.sqrt(jnp.sum(a * a, axis=axes, keepdims=keepdim))
    if ord == 1:
        return jnp.sum(a, axis=axes, keepdims=keepdim)
    if ord == math.inf:
        return jnp.max(a, axis=axes, keepdims=keepdim)
    if ord == -math.inf:
        return jnp.min(a, axis=axes, keepdims=keepdim)
    if ord == 0:
        return jnp.sum(a != 0, axis=axes, keepdims=keepdim).astype(x.dtype)
    return jnp.sum(a**ord, axis=axes, keepdims=keepdim) ** (1.0 / ord)


@_reg(aten.sort.default)
def _sort(x, dim=-1, descending=False):
    idx = jnp.argsort(-x if descending else x, axis=dim, stable=True)
    return jnp.take_along_axis(x, idx, axis=dim), idx


@_reg(aten.topk.default)
def _topk(x, k, dim=-1, largest=True, sorted=True):
    xm = jnp.moveaxis(x, dim, -1)
    vals, idx = lax.top_k(xm if largest else -xm, k)
    vals = vals if largest else -vals
    return jnp.moveaxis(vals, -1, dim), jnp.moveaxis(idx, -1, dim)


# --------------------------------------------------------------------------- creation
def _float_default(dtype):
    return jax_dtype(dtype if dtype is not None else torch.get_default_dtype())


@_reg(aten.full.default)
def _full(size, fill_value, *, dtype=None, layout=None, device=None, pin_memory=None):
    if dtype is None and isinstance(fill_value, bool):
        dtype = torch.bool
    elif dtype is None and isinstance(fill_value, int):
        dtype = torch.int64
    return jnp.full(tuple(size), fill_value, dtype=_float_default(dtype))


@_reg(aten.full_like.default)
def _full_like(x, fill_value, *, dtype=None, layout=None, device=None, pin_memory=None, **kw):
    return jnp.full(x.shape, fill_value, dtype=jax_dtype(dtype) if dtype else x.dtype)


@_reg(aten.empty.memory_format)
def _empty(size, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return jnp.zeros(tuple(size), dtype=_float_default(dtype))


@_reg(aten.scalar_tensor.default)
def _scalar_tensor(s, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.asarray(s, dtype=_float_default(dtype))


@_reg(aten.arange.start_step)
def _arange(start, end, step=1, *, dtype=None, layout=None, device=None, pin_memory=None):
    if dtype is None:
        ints = all(isinstance(v, int) for v in (start, end, step))
        dtype = torch.int64 if ints else torch.get_default_dtype()
    return jnp.arange(start, end, step, dtype=jax_dtype(dtype))


# --------------------------------------------------------------------------- python
OPS[operator.getitem] = operator.getitem


class _NotLowered:
    """Placeholder for secondary outputs that are not lowered (e.g. max-pool indices)."""

    def __repr__(self) -> str:
        return "<not lowered>"


_NOT_LOWERED = _NotLowered()
