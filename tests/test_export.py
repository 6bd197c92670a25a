"""torch → JAX export (condpost.export): every lowered op and the whole potential vs torch.

Ground truth is torch itself: each lowered op is checked on random inputs against the
torch op it replaces (value, and the vector-Jacobian product with a random cotangent
against ``torch.autograd``), in float32 and float64; the exported potential ``U(w)`` and
its gradient are checked against ``LocalPosterior.potential`` and ``torch.autograd`` at
random ``w`` near ``w*``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import condpost as cp  # noqa: E402
from condpost.export import (  # noqa: E402
    UnsupportedOpError,
    export_function,
    supported_ops,
    to_jax,
)

aten = torch.ops.aten


# --------------------------------------------------------------------------- inputs
# An input spec is (kind, shape): "f" standard normal, "c" standard normal but held
# constant (not differentiated), "p" positive (uniform 0.5..2),
# "u" uniform in (-0.9, 0.9), "i<k>" int64 in [0, k), "b" random bool. Float inputs are
# differentiated; ints and bools are not.
def _make(spec, dtype, gen):
    kind, shape = spec
    if kind in ("f", "c"):
        return torch.randn(shape, generator=gen, dtype=dtype)
    if kind == "p":
        return 0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=dtype)
    if kind == "u":
        return 1.8 * torch.rand(shape, generator=gen, dtype=dtype) - 0.9
    if kind == "b":
        return torch.rand(shape, generator=gen) > 0.5
    if kind.startswith("i"):
        return torch.randint(0, int(kind[1:]), shape, generator=gen)
    raise ValueError(kind)


F34 = ("f", (3, 4))
P34 = ("p", (3, 4))
U34 = ("u", (3, 4))
IMG = ("f", (2, 3, 6, 6))
SEQ = ("f", (2, 3, 7))
QKV = ("f", (2, 2, 5, 4))


def _no_grad_case(x):
    with torch.no_grad():
        y = torch.sin(x) * 2
    return y * x


# name -> (expected ops, torch fn, input specs). Each fn uses its op through the public
# torch API; the test asserts the export really contains the op.
CASES: dict[str, tuple[tuple[str, ...], object, tuple]] = {
    # elementwise, unary
    "neg": (("neg.default",), lambda x: -x, (F34,)),
    "abs": (("abs.default",), torch.abs, (F34,)),
    "exp": (("exp.default",), torch.exp, (F34,)),
    "expm1": (("expm1.default",), torch.expm1, (F34,)),
    "log": (("log.default",), torch.log, (P34,)),
    "log1p": (("log1p.default",), torch.log1p, (P34,)),
    "log2": (("log2.default",), torch.log2, (P34,)),
    "log10": (("log10.default",), torch.log10, (P34,)),
    "sqrt": (("sqrt.default",), torch.sqrt, (P34,)),
    "rsqrt": (("rsqrt.default",), torch.rsqrt, (P34,)),
    "reciprocal": (("reciprocal.default",), torch.reciprocal, (P34,)),
    "sin": (("sin.default",), torch.sin, (F34,)),
    "cos": (("cos.default",), torch.cos, (F34,)),
    "tan": (("tan.default",), torch.tan, (U34,)),
    "asin": (("asin.default",), torch.asin, (U34,)),
    "acos": (("acos.default",), torch.acos, (U34,)),
    "atan": (("atan.default",), torch.atan, (F34,)),
    "sinh": (("sinh.default",), torch.sinh, (F34,)),
    "cosh": (("cosh.default",), torch.cosh, (F34,)),
    "tanh": (("tanh.default",), torch.tanh, (F34,)),
    "asinh": (("asinh.default",), torch.asinh, (F34,)),
    "acosh": (("acosh.default",), lambda x: torch.acosh(x + 1.0), (P34,)),
    "atanh": (("atanh.default",), torch.atanh, (U34,)),
    "sigmoid": (("sigmoid.default",), torch.sigmoid, (F34,)),
    "erf": (("erf.default",), torch.erf, (F34,)),
    "erfinv": (("erfinv.default",), torch.erfinv, (U34,)),
    "erfc": (("erfc.default",), torch.special.erfc, (F34,)),
    "exp2": (("exp2.default",), torch.exp2, (F34,)),
    "lgamma": (("lgamma.default",), torch.lgamma, (P34,)),
    "sign": (("sign.default",), lambda x: torch.sign(x) * x, (F34,)),
    "floor": (("floor.default",), lambda x: torch.floor(3 * x) + x, (F34,)),
    "ceil": (("ceil.default",), lambda x: torch.ceil(3 * x) + x, (F34,)),
    "trunc": (("trunc.default",), lambda x: torch.trunc(3 * x) + x, (F34,)),
    "round": (("round.default",), lambda x: torch.round(3 * x) + x, (F34,)),
    "isnan": (("isnan.default",), lambda x: torch.where(torch.isnan(x.log()), 0.0, x), (F34,)),
    "isinf": (
        ("isinf.default",),
        lambda x: torch.where(torch.isinf(1 / (x > 0).to(x.dtype)), 0.0, x),
        (F34,),
    ),
    "logical_not": (
        ("logical_not.default",),
        lambda x, b: torch.where(torch.logical_not(b), x, 2 * x),
        (F34, ("b", (3, 4))),
    ),
    "bitwise_not": (("bitwise_not.default",), lambda x, i: x * (~i), (F34, ("i5", (3, 4)))),
    # elementwise, binary
    "add": (("add.Tensor",), lambda x, y: x + y, (F34, ("f", (4,)))),
    "add_alpha": (("add.Tensor",), lambda x, y: torch.add(x, y, alpha=2.5), (F34, F34)),
    "sub": (("sub.Tensor",), lambda x, y: x - 0.5 * y, (F34, F34)),
    "rsub": (("sub.Tensor",), lambda x: 1.5 - x, (F34,)),
    "mul": (("mul.Tensor",), lambda x, y: x * y, (F34, ("f", (3, 1)))),
    "mul_scalar_tensor": (
        ("mul.Scalar",),
        lambda q: F.scaled_dot_product_attention(q, q, q),
        (QKV,),
    ),
    "div": (("div.Tensor",), lambda x, y: x / y, (F34, P34)),
    "div_floor": (
        ("div.Tensor_mode",),
        lambda x, y: torch.div(x, y, rounding_mode="floor") + x,
        (F34, P34),
    ),
    "div_trunc": (
        ("div.Tensor_mode",),
        lambda x, y: torch.div(x, y, rounding_mode="trunc") + x,
        (F34, P34),
    ),
    "pow_int": (("pow.Tensor_Scalar",), lambda x: x**3, (F34,)),
    "pow_float": (("pow.Tensor_Scalar",), lambda x: x**1.7, (P34,)),
    "pow_tensor": (("pow.Tensor_Tensor",), lambda x, y: x**y, (P34, F34)),
    "pow_scalar": (("pow.Scalar",), lambda x: 2.0**x, (F34,)),
    "fmod": (("fmod.Scalar",), lambda x: torch.fmod(3 * x, 1.3) + x, (F34,)),
    "fmod_t": (("fmod.Tensor",), lambda x, y: torch.fmod(3 * x, y) + x, (F34, P34)),
    "remainder": (("remainder.Scalar",), lambda x: torch.remainder(3 * x, 1.3) + x, (F34,)),
    "remainder_t": (("remainder.Tensor",), lambda x, y: torch.remainder(3 * x, y) + x, (F34, P34)),
    "atan2": (("atan2.default",), torch.atan2, (F34, F34)),
    "hypot": (("hypot.default",), torch.hypot, (F34, F34)),
    "maximum": (("maximum.default",), torch.maximum, (F34, F34)),
    "minimum": (("minimum.default",), torch.minimum, (F34, F34)),
    "clamp": (("clamp.default",), lambda x: x.clamp(-0.5, 0.7), (F34,)),
    "clamp_min": (("clamp.default",), lambda x: x.clamp_min(0.1), (F34,)),
    "clamp_tensor": (("clamp.Tensor",), lambda x, lo: torch.clamp(x, min=lo), (F34, ("f", (4,)))),
    "where": (("where.self",), lambda x, y: torch.where(x > y, x, y * 2), (F34, F34)),
    "eq": (
        ("eq.Tensor",),
        lambda x, i, j: torch.where(i == j, x, -x),
        (F34, ("i3", (3, 4)), ("i3", (3, 4))),
    ),
    "eq_s": (("eq.Scalar",), lambda x, i: torch.where(i == 1, x, -x), (F34, ("i3", (3, 4)))),
    "ne": (
        ("ne.Tensor",),
        lambda x, i, j: torch.where(i != j, x, -x),
        (F34, ("i3", (3, 4)), ("i3", (3, 4))),
    ),
    "ne_s": (("ne.Scalar",), lambda x, i: torch.where(i != 1, x, -x), (F34, ("i3", (3, 4)))),
    "lt": (("lt.Tensor",), lambda x, y: torch.where(x < y, x, y), (F34, F34)),
    "lt_s": (("lt.Scalar",), lambda x: torch.where(x < 0.2, x, 2 * x), (F34,)),
    "le": (("le.Tensor",), lambda x, y: torch.where(x <= y, x, y), (F34, F34)),
    "le_s": (("le.Scalar",), lambda x: torch.where(x <= 0.2, x, 2 * x), (F34,)),
    "gt": (("gt.Tensor",), lambda x, y: torch.where(x > y, x, y), (F34, F34)),
    "gt_s": (("gt.Scalar",), lambda x: torch.where(x > 0.2, x, 2 * x), (F34,)),
    "ge": (("ge.Tensor",), lambda x, y: torch.where(x >= y, x, y), (F34, F34)),
    "ge_s": (("ge.Scalar",), lambda x: torch.where(x >= 0.2, x, 2 * x), (F34,)),
    "logical_and": (
        ("logical_and.default",),
        lambda x, y: torch.where(torch.logical_and(x > 0, y > 0), x, y),
        (F34, F34),
    ),
    "logical_or": (
        ("logical_or.default",),
        lambda x, y: torch.where(torch.logical_or(x > 0, y > 0), x, y),
        (F34, F34),
    ),
    "logical_xor": (
        ("logical_xor.default",),
        lambda x, y: torch.where(torch.logical_xor(x > 0, y > 0), x, y),
        (F34, F34),
    ),
    "bitwise_and": (
        ("bitwise_and.Tensor",),
        lambda x, i, j: x * (i & j),
        (F34, ("i5", (3, 4)), ("i5", (3, 4))),
    ),
    "bitwise_or": (
        ("bitwise_or.Tensor",),
        lambda x, i, j: x * (i | j),
        (F34, ("i5", (3, 4)), ("i5", (3, 4))),
    ),
    # activations
    "relu": (("relu.default",), F.relu, (F34,)),
    "gelu": (("gelu.default",), F.gelu, (F34,)),
    "gelu_tanh": (("gelu.default",), lambda x: F.gelu(x, approximate="tanh"), (F34,)),
    "silu": (("sigmoid.default", "mul.Tensor"), F.silu, (F34,)),
    "softplus": (("softplus.default",), lambda x: F.softplus(3 * x), (F34,)),
    "softplus_beta": (
        ("softplus.default",),
        lambda x: F.softplus(3 * x, beta=2.0, threshold=3.0),
        (F34,),
    ),
    "leaky_relu": (("leaky_relu.default",), lambda x: F.leaky_relu(x, 0.2), (F34,)),
    "elu": (("elu.default",), F.elu, (F34,)),
    "selu": (("elu.default",), F.selu, (F34,)),
    "hardtanh": (("hardtanh.default",), lambda x: F.hardtanh(2 * x), (F34,)),
    "relu6": (("hardtanh.default",), lambda x: F.relu6(4 * x), (F34,)),
    # softmax and normalisation
    "softmax": (("_softmax.default",), lambda x: torch.softmax(x, -1), (F34,)),
    "log_softmax": (("_log_softmax.default",), lambda x: torch.log_softmax(x, 0), (F34,)),
    "layer_norm": (
        ("native_layer_norm.default",),
        lambda x, w, b: F.layer_norm(x, (3, 7), w, b, eps=1e-5),
        (SEQ, ("f", (3, 7)), ("f", (3, 7))),
    ),
    "batch_norm_eval": (
        ("_native_batch_norm_legit_no_training.default",),
        lambda x, m, v, w, b: F.batch_norm(x, m, v.abs() + 0.5, w, b, training=False),
        (IMG, ("c", (3,)), ("c", (3,)), ("f", (3,)), ("f", (3,))),
    ),
    "group_norm": (
        ("native_group_norm.default",),
        lambda x, w, b: F.group_norm(torch.cat([x, x * x], 1), 2, w, b),
        (IMG, ("f", (6,)), ("f", (6,))),
    ),
    # linear algebra
    "mm": (("mm.default",), lambda a, b: a @ b, (F34, ("f", (4, 5)))),
    "addmm": (("addmm.default",), F.linear, (F34, ("f", (5, 4)), ("f", (5,)))),
    "bmm": (("bmm.default",), torch.bmm, (("f", (2, 3, 4)), ("f", (2, 4, 5)))),
    "eigvalsh": (("_linalg_eigh.default",), lambda a: torch.linalg.eigvalsh(a @ a.T), (F34,)),
    "eigh_vectors": (
        ("_linalg_eigh.default",),
        # eigenvectors up to sign: differentiate a sign-invariant function of them
        lambda a: torch.linalg.eigh(a @ a.T + torch.diag(torch.arange(3.0, dtype=a.dtype)))[1] ** 2,
        (F34,),
    ),
    "svdvals": (("_linalg_svd.default",), torch.linalg.svdvals, (F34,)),
    "svd": (
        ("_linalg_svd.default",),
        lambda a: (lambda u, s, vh: (u * s) @ vh)(*torch.linalg.svd(a, full_matrices=False)),
        (F34,),
    ),
    "det": (("_linalg_det.default",), lambda a: torch.linalg.det(a[:, :3]), (F34,)),
    "slogdet": (("_linalg_slogdet.default",), lambda a: torch.linalg.slogdet(a[:, :3])[1], (F34,)),
    "diagonal": (("diagonal.default",), lambda a: torch.diagonal(a, 1), (F34,)),
    # convolution and pooling
    "conv1d": (
        ("convolution.default",),
        lambda x, w, b: F.conv1d(x, w, b, padding=1),
        (SEQ, ("f", (4, 3, 3)), ("f", (4,))),
    ),
    "conv2d": (
        ("convolution.default",),
        lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, dilation=1),
        (IMG, ("f", (4, 3, 3, 3)), ("f", (4,))),
    ),
    "conv2d_groups": (
        ("convolution.default",),
        lambda x, w: F.conv2d(x, w, stride=1, padding=(1, 0), dilation=2, groups=3),
        (IMG, ("f", (6, 1, 2, 2))),
    ),
    "max_pool2d": (("max_pool2d_with_indices.default",), lambda x: F.max_pool2d(x, 2), (IMG,)),
    "max_pool2d_pad": (
        ("max_pool2d_with_indices.default",),
        lambda x: F.max_pool2d(x, 3, stride=2, padding=1),
        (IMG,),
    ),
    "avg_pool2d": (("avg_pool2d.default",), lambda x: F.avg_pool2d(x, 2), (IMG,)),
    "avg_pool2d_pad": (
        ("avg_pool2d.default",),
        lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False),
        (IMG,),
    ),
    "avg_pool1d": (("avg_pool2d.default",), lambda x: F.avg_pool1d(x, 2), (SEQ,)),
    # indexing
    "embedding": (
        ("embedding.default",),
        lambda w, i: F.embedding(i, w),
        (("f", (6, 4)), ("i6", (2, 5))),
    ),
    "gather": (("gather.default",), lambda x, i: x.gather(1, i), (F34, ("i4", (3, 2)))),
    "index_select": (
        ("index_select.default",),
        lambda x, i: x.index_select(1, i),
        (F34, ("i4", (5,))),
    ),
    "index": (("index.Tensor",), lambda x, i: x[:, i], (F34, ("i4", (5,)))),
    "index_2": (("index.Tensor",), lambda x, i, j: x[i, j], (F34, ("i3", (5,)), ("i4", (5,)))),
    "index_put": (
        ("index_put.default",),
        lambda x, v: x.index_put((torch.tensor([2, 0]),), v),
        (F34, ("f", (2, 4))),
    ),
    "index_put_acc": (
        ("index_put.default",),
        lambda x, v, i: x.index_put((i,), v, accumulate=True),
        (F34, ("f", (5, 4)), ("i3", (5,))),
    ),
    "slice": (("slice.Tensor",), lambda x: x[1:, ::2], (F34,)),
    "full_range_slice": (("alias.default",), lambda x: x[..., 0:4].reshape(2, 6), (F34,)),
    "slice_neg": (("slice.Tensor",), lambda x: x[:, -3:-1], (F34,)),
    "select": (("select.int",), lambda x: x[:, -1] * x[1, :3], (F34,)),
    "split": (("split_with_sizes.default",), lambda x: x.split([1, 3], 1)[1] * 2, (F34,)),
    "cat": (("cat.default",), lambda x, y: torch.cat([x, y], 0), (F34, ("f", (2, 4)))),
    "stack": (("cat.default",), lambda x, y: torch.stack([x, y], 1), (F34, F34)),
    "pad": (("constant_pad_nd.default",), lambda x: F.pad(x, (1, 2, 0, 1), value=0.3), (F34,)),
    "flip": (("flip.default",), lambda x: x.flip(0, 1), (F34,)),
    "repeat": (("repeat.default",), lambda x: x.repeat(2, 1, 2), (F34,)),
    "tril": (("arange.start_step",), lambda x: x.tril(), (F34,)),
    # shape
    "view": (("view.default",), lambda x: x.reshape(2, 6) * 1.0, (F34,)),
    "permute": (("permute.default",), lambda x: x.permute(2, 0, 1), (("f", (2, 3, 4)),)),
    "transpose": (("permute.default",), lambda x: x.T @ x, (F34,)),
    "expand": (("expand.default",), lambda x: x[:, None].expand(3, 2, 4) * 1.0, (F34,)),
    "squeeze": (("squeeze.dims",), lambda x: x.squeeze(1), (("f", (3, 1, 4)),)),
    "unsqueeze": (
        ("unsqueeze.default",),
        lambda x: x.unsqueeze(-1) * x.unsqueeze(0),
        (("f", (3,)),),
    ),
    "detach": (("detach.default",), lambda x: x.detach() * x, (F34,)),
    "no_grad": (("detach.default",), _no_grad_case, (F34,)),
    "copy": (("copy.default",), lambda x: torch.zeros(3, 4, dtype=x.dtype).copy_(x) * 2, (F34,)),
    "clone": (("clone.default",), lambda x: x.clone(memory_format=torch.contiguous_format), (F34,)),
    "to_dtype": (("_to_copy.default",), lambda x, i: x * i.to(x.dtype), (F34, ("i5", (3, 4)))),
    # reductions
    "sum": (("sum.dim_IntList",), lambda x: x.sum(1), (F34,)),
    "sum_all": (("sum.dim_IntList",), lambda x: x.sum(), (F34,)),
    "sum_keepdim": (
        ("sum.dim_IntList",),
        lambda x: x.sum((0, 1), keepdim=True),
        (("f", (2, 3, 4)),),
    ),
    "mean": (("mean.dim",), lambda x: x.mean(0), (F34,)),
    "mean_all": (("mean.default",), lambda x: x.mean(), (F34,)),
    "prod": (("prod.dim_int",), lambda x: x.prod(1), (P34,)),
    "prod_all": (("prod.default",), lambda x: x.prod(), (P34,)),
    "amax": (("amax.default",), lambda x: x.amax(1), (F34,)),
    "amin": (("amin.default",), lambda x: x.amin(0), (F34,)),
    "max_all": (("max.default",), lambda x: x.max(), (F34,)),
    "min_all": (("min.default",), lambda x: x.min(), (F34,)),
    "max_dim": (("max.dim",), lambda x: x.max(1).values * x.max(1).indices, (F34,)),
    "min_dim": (("min.dim",), lambda x: x.min(0).values * x.min(0).indices, (F34,)),
    "argmax": (("argmax.default",), lambda x: x * x.argmax(1, keepdim=True), (F34,)),
    "argmin": (("argmin.default",), lambda x: x * x.argmin(), (F34,)),
    "var": (("var.correction",), lambda x: x.var(1), (F34,)),
    "var_all": (("var.correction",), lambda x: x.var(correction=0), (F34,)),
    "std": (("var.correction",), lambda x: x.std(0), (F34,)),
    "var_mean": (
        ("var_mean.correction",),
        lambda x: torch.var_mean(x, 1)[0] * torch.var_mean(x, 1)[1],
        (F34,),
    ),
    "logsumexp": (
        ("amax.default", "exp.default", "log.default"),
        lambda x: torch.logsumexp(x, 1),
        (F34,),
    ),
    "any": (("any.dim",), lambda x: torch.where((x > 1).any(1, keepdim=True), x, -x), (F34,)),
    "any_all": (("any.default",), lambda x: torch.where((x > 1).any(), x, -x), (F34,)),
    "any_dims": (("any.dims",), lambda x: torch.where((x > 1).any((0, 1)), x, -x), (F34,)),
    "cumsum": (("cumsum.default",), lambda x: x.cumsum(1), (F34,)),
    "cumprod": (("cumprod.default",), lambda x: x.cumprod(0), (P34,)),
    "norm2": (("linalg_vector_norm.default",), lambda x: x.norm(dim=1), (F34,)),
    "norm1": (("linalg_vector_norm.default",), lambda x: torch.linalg.vector_norm(x, 1), (F34,)),
    "norm_inf": (
        ("linalg_vector_norm.default",),
        lambda x: torch.linalg.vector_norm(x, math.inf, 0),
        (F34,),
    ),
    "norm3": (
        ("linalg_vector_norm.default",),
        lambda x: torch.linalg.vector_norm(x, 3.0, 1),
        (F34,),
    ),
    "sort": (("sort.default",), lambda x: x.sort(1, descending=True).values, (F34,)),
    "topk": (("topk.default",), lambda x: x.topk(2, dim=0).values, (F34,)),
    "topk_smallest": (("topk.default",), lambda x: x.topk(2, largest=False).values, (F34,)),
    # creation
    "full": (("full.default",), lambda x: x + torch.full((3, 4), 0.5, dtype=x.dtype), (F34,)),
    "zeros": (
        ("full.default",),
        lambda x: torch.cat([x, torch.zeros(1, 4, dtype=x.dtype)]),
        (F34,),
    ),
    "full_like": (("full_like.default",), lambda x: x * torch.full_like(x, 3.0), (F34,)),
    "scalar_tensor": (("scalar_tensor.default",), lambda x: x.masked_fill(x > 0, 0.25), (F34,)),
    "arange": (("arange.start_step",), lambda x: x * torch.arange(4, dtype=x.dtype), (F34,)),
    "empty": (
        ("empty.memory_format",),
        lambda x: torch.empty(3, 4, dtype=x.dtype).fill_(2.0) * x,
        (F34,),
    ),
    # composites
    "cross_entropy": (
        ("_log_softmax.default", "gather.default"),
        lambda x, y: F.cross_entropy(x, y, reduction="none"),
        (F34, ("i4", (3,))),
    ),
    "bce_logits": (
        ("minimum.default", "log1p.default"),
        lambda x, y: F.binary_cross_entropy_with_logits(x, y),
        (F34, ("p", (3, 4))),
    ),
    "sdpa": (
        ("_softmax.default", "bmm.default"),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        (QKV, QKV, QKV),
    ),
    "sdpa_causal": (
        ("_softmax.default", "bmm.default", "logical_and.default"),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        (QKV, QKV, QKV),
    ),
    "multi_head": (
        ("getitem",),
        lambda x, a, b: torch.stack([x.max(1).values, x.min(1).values]) @ a + b,
        (F34, ("f", (3, 2)), ("f", (2,))),
    ),
}

# tolerances: float64 agrees to rounding; float32 to a few ulps of the output scale
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
# linear-algebra ops amplify float32 rounding by the matrix's condition number
TOL32_LOOSE = {"eigh_vectors": 2e-3, "svd": 1e-4, "det": 1e-4, "slogdet": 1e-4, "eigvalsh": 1e-4}


def _np(t):
    return t.detach().numpy()


def _close(a, b, tol, what):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs torch {b.shape}"
    scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    err = float(np.max(np.abs(a - b))) if b.size else 0.0
    assert err <= tol * scale, f"{what}: max |jax − torch| = {err:.3g} > {tol:g}·{scale:.3g}"


class _Case(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class _AllCases(nn.Module):
    """Every case as a submodule: one export holds them all, and each node's
    ``nn_module_stack`` tells which case produced it."""

    def __init__(self, names):
        super().__init__()
        self.names = list(names)
        self.cases = nn.ModuleDict({n: _Case(CASES[n][1]) for n in self.names})

    def forward(self, *args):
        outs, i = [], 0
        for n in self.names:
            k = len(CASES[n][2])
            outs.append(self.cases[n](*args[i : i + k]))
            i += k
        return tuple(outs)


def _run_cases(names, dtype, seed=0):
    """Export ``names`` together (once), evaluate value and VJP in torch and JAX.

    Returns {name: dict(ops, value_j, value_t, grads_j, grads_t)}. Inputs are drawn
    afresh after the export, so the lowering cannot depend on the example values; each
    case owns its inputs, so the VJP of the summed objective restricted to a case's
    inputs is that case's VJP.
    """
    gen = torch.Generator().manual_seed(seed)
    specs = [s for n in names for s in CASES[n][2]]
    example = [_make(s, dtype, gen) for s in specs]
    ef = export_function(_AllCases(names), example)
    ops = {n: set() for n in names}
    for node in ef.exported_program.graph.nodes:
        if node.op != "call_function":
            continue
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            parts = str(path).split(".")
            if len(parts) >= 2 and parts[-2] == "cases" and parts[-1] in ops:
                t = node.target
                ops[parts[-1]].add(
                    "getitem" if t.__name__ == "getitem" else f"aten.{t._opname}.{t._overloadname}"
                )
    args = [_make(s, dtype, gen) for s in specs]
    differentiable = [
        a.is_floating_point() and s[0] != "c" for a, s in zip(args, specs, strict=True)
    ]
    targs = [a.clone().requires_grad_(g) for a, g in zip(args, differentiable, strict=True)]
    jargs = [jnp.asarray(_np(a)) for a in args]
    outs_t, i = [], 0
    for n in names:
        k = len(CASES[n][2])
        outs_t.append(CASES[n][1](*targs[i : i + k]))
        i += k
    cots = [
        torch.randn(o.shape, generator=gen, dtype=dtype) if o.is_floating_point() else None
        for o in outs_t
    ]
    obj = sum((o * c).sum() for o, c in zip(outs_t, cots, strict=True) if c is not None)
    fl = [j for j, g in enumerate(differentiable) if g]
    grads_t = torch.autograd.grad(obj, [targs[j] for j in fl], allow_unused=True)
    grads_t = {
        j: (torch.zeros_like(args[j]) if g is None else g) for j, g in zip(fl, grads_t, strict=True)
    }
    jcots = [None if c is None else jnp.asarray(_np(c)) for c in cots]

    def scalar(fargs, rest):
        full = list(rest)
        for j, a in zip(fl, fargs, strict=True):
            full[j] = a
        outs = ef(*full)
        obj = sum(jnp.sum(o * c) for o, c in zip(outs, jcots, strict=True) if c is not None)
        return obj, outs

    # one jitted computation for all values and the VJP: op-by-op (eager) JAX would
    # compile every primitive separately, which is far slower for hundreds of tiny ops
    (_, outs_j), gj = jax.jit(jax.value_and_grad(scalar, has_aux=True))(
        [jargs[j] for j in fl], jargs
    )
    grads_j = dict(zip(fl, gj, strict=True))
    res, i = {}, 0
    for n, vj, vt in zip(names, outs_j, outs_t, strict=True):
        k = len(CASES[n][2])
        idx = [j for j in range(i, i + k) if j in grads_t]
        res[n] = dict(
            ops=ops[n],
            value_j=vj,
            value_t=vt,
            grads_j=[grads_j[j] for j in idx],
            grads_t=[grads_t[j] for j in idx],
        )
        i += k
    return res


def _assert_case(name, dtype, r):
    expected = CASES[name][0]
    for op in expected:
        full = op if op == "getitem" else f"aten.{op}"
        assert full in r["ops"], f"{name}: expected {full} in its export; got {sorted(r['ops'])}"
    tol = TOL[dtype] if dtype == torch.float64 else TOL32_LOOSE.get(name, TOL[dtype])
    vt = r["value_t"]
    _close(r["value_j"], _np(vt), tol, f"{name} value ({dtype})")
    assert np.asarray(r["value_j"]).dtype == np.dtype(str(vt.dtype).replace("torch.", ""))
    for k, (gj, gt) in enumerate(zip(r["grads_j"], r["grads_t"], strict=True)):
        _close(gj, _np(gt), tol, f"{name} gradient wrt float input {k} ({dtype})")


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["f64", "f32"])
def all_cases(request):
    # float32 runs without jax_enable_x64 (int64 indices become int32, as for users)
    with jax.enable_x64(request.param == torch.float64):
        return request.param, _run_cases(sorted(CASES), request.param)


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_value_and_grad(name, all_cases):
    """Value and VJP of each op vs torch (all cases exported together, per dtype)."""
    dtype, res = all_cases
    _assert_case(name, dtype, res[name])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_value_and_grad_isolated(name, dtype):
    """The same check with each case exported on its own (slow: one export per case)."""
    _assert_case(name, dtype, _run_cases([name], dtype, seed=1)[name])


def test_docs_list_every_op():
    """docs/export.md's op table names every op in the lowering table."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    missing = [op for op in supported_ops() if op.split(".")[-2 if "." in op else 0] not in doc]
    assert not missing, f"ops missing from docs/export.md: {missing}"


def test_every_table_op_is_tested():
    """Every op in the lowering table is the expected op of at least one case above."""
    tested = {op if op == "getitem" else f"aten.{op}" for exp, _, _ in CASES.values() for op in exp}
    untested = sorted(set(supported_ops()) - tested)
    assert not untested, f"ops in the table without a test case: {untested}"


# --------------------------------------------------------------------------- parity
class _Block(nn.Module):
    """One transformer block on token ids: embedding + position, pre-LN attention, GELU MLP."""

    def __init__(self, vocab=11, dm=8, heads=2, T=5, out=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dm)
        self.pos = nn.Parameter(0.1 * torch.randn(T, dm))
        self.ln1 = nn.LayerNorm(dm)
        self.attn = nn.MultiheadAttention(dm, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dm)
        self.mlp = nn.Sequential(nn.Linear(dm, 16), nn.GELU(), nn.Linear(16, dm))
        self.head = nn.Linear(dm, out)

    def forward(self, x):
        h = self.emb(x) + self.pos
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.SiLU()
        self.c2 = nn.Conv2d(4, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        h = self.act(self.bn(self.c1(x)))
        h = torch.tanh(self.c2(h))
        h = F.max_pool2d(h, 1)
        return self.fc(h.flatten(1))


def _declaration(kind, dtype, n=40):
    """A LocalPosterior with constraints from the catalogue, for the three architectures."""
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(
            nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 3)
        )
        x = torch.randn(n, 4)
    elif kind == "conv":
        net = _ConvNet()
        with torch.no_grad():
            net.bn.running_mean.uniform_(-0.5, 0.5)
            net.bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(n, 1, 8, 8)
    else:
        net = _Block()
        x = torch.randint(0, 11, (n, 5))
    y = torch.randint(0, 3, (n,))
    net = net.to(dtype).eval()
    x = x.to(dtype) if x.is_floating_point() else x
    post = cp.LocalPosterior(
        net, (x, y), cp.Categorical(), localization=2.0, dtype=dtype, check_center=False
    )
    p = x[:8]
    if kind == "mlp":
        cons = [
            cp.Activations("1", p, tolerance=0.1),
            cp.Activations("3", p, tolerance=0.1, measure="cka", name="cka"),
            cp.Activations("1", p, tolerance=0.1, side="upper", name="act_upper"),
            cp.CircuitMap("1", "3", p, interventions="resample", tolerance=0.1),
            cp.Outputs(p, kl=0.5),
            cp.ActivationSparsity("1", p, tolerance=0.05),
            cp.ActivationSparsity("3", p, surrogate="hoyer", tolerance=0.05, name="hoyer"),
            cp.ActivationSparsity("3", p, surrogate="l1", tolerance=0.05, name="l1"),
            cp.FiringPattern("1", p, tolerance=0.2),
            cp.WeightSparsity("0.weight", tolerance=0.5),
            cp.WeightSparsity("2.weight", form="smoothed_l0", eps=0.05, tolerance=0.5),
            cp.WeightSparsity("4.weight", form="zero_pattern", threshold=0.1, tolerance=0.05),
            cp.LowRank("2.weight", rank=2, tolerance=0.1),
            cp.LowRank("0.weight", form="nuclear", tolerance=0.1, name="nuc"),
            cp.LowRank("4.weight", form="effective_rank", tolerance=0.1, name="erank"),
            cp.Quantized("4.bias", step=0.1, tolerance=0.05),
            cp.LossLevel(0.01, tolerance=0.05),
            cp.Feature(lambda v: v.weight("0.weight").norm(), tolerance=0.1, name="norm"),
        ]
    elif kind == "conv":
        cons = [
            cp.Activations("bn", p, tolerance=0.1),
            cp.FiringPattern("c1", p, tolerance=0.2),
            cp.LowRank("c2.weight", form="nuclear", tolerance=0.1),
            cp.Outputs(p, kl=0.5),
        ]
    else:
        cons = [
            cp.Activations("ln2", p, tolerance=0.1),
            cp.Activations("mlp", p, tolerance=0.1, measure="cka", name="cka"),
            cp.LowRank("attn.out_proj.weight", rank=2, tolerance=0.1),
            cp.ActivationSparsity("mlp.1", p, tolerance=0.05),
            cp.WeightSparsity("mlp.0.weight", tolerance=0.5),
        ]
    for c in cons:
        post.preserve(c)
    return post


def _parity(post, jp, draws=20, scale=0.02, seed=0):
    """Max relative errors of U and ∇U (∞-norms) over ``draws`` random w near w*."""
    gen = torch.Generator().manual_seed(seed)
    W = post.center + scale * torch.randn(draws, post.d, generator=gen, dtype=post.dtype)
    u_t, g_t = [], []
    for w in W:
        w = w.clone().requires_grad_(True)
        u = post.potential(w)
        (g,) = torch.autograd.grad(u, w)
        u_t.append(u.item())
        g_t.append(_np(g))
    u_t, g_t = np.array(u_t), np.stack(g_t)
    vg = jax.jit(jax.vmap(jax.value_and_grad(jp.potential)))
    u_j, g_j = vg(jnp.asarray(_np(W)))
    u_j, g_j = np.asarray(u_j, np.float64), np.asarray(g_j, np.float64)
    assert u_j.dtype == np.float64 and np.asarray(u_j).shape == (draws,)
    err_u = float(np.max(np.abs(u_j - u_t) / np.abs(u_t)))
    err_g = float(np.max(np.max(np.abs(g_j - g_t), 1) / np.max(np.abs(g_t), 1)))
    return err_u, err_g


PARITY_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


# the default suite runs the MLP in both dtypes and the other two in float64; all six
# (the acceptance set) run with `pytest -m slow` too
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "kind,dtype",
    [
        ("mlp", torch.float64),
        ("mlp", torch.float32),
        ("conv", torch.float64),
        ("transformer", torch.float64),
        pytest.param("conv", torch.float32, marks=_SLOW),
        pytest.param("transformer", torch.float32, marks=_SLOW),
    ],
    ids=["mlp-f64", "mlp-f32", "conv-f64", "transformer-f64", "conv-f32", "transformer-f32"],
)
def test_potential_parity(kind, dtype):
    """Acceptance: U(w) and ∇U(w) from torch and from to_jax agree at 20 random w near w*."""
    post = _declaration(kind, dtype)
    # float32 must work without jax_enable_x64 (which another test may have switched on)
    with jax.enable_x64(dtype == torch.float64):
        _check_parity(post, kind, dtype)


def _check_parity(post, kind, dtype):
    jp = to_jax(post)
    assert jp.d == post.d and jp.dtype == np.dtype(str(dtype).replace("torch.", ""))
    np.testing.assert_array_equal(np.asarray(jp.center), _np(post.center))
    assert jp.export_seconds > 0 and "aten.addmm.default" in jp.ops
    err_u, err_g = _parity(post, jp)
    print(f"parity {kind} {dtype}: max rel err U {err_u:.2e}, grad {err_g:.2e}")
    assert err_u <= PARITY_RTOL[dtype] and err_g <= PARITY_RTOL[dtype], (err_u, err_g)
    # L_n too, at w*
    tol = PARITY_RTOL[dtype]
    assert abs(float(jp.loss(jp.center)) - post.loss(post.center).item()) <= tol * post.loss_center


@pytest.mark.parametrize(
    "likelihood",
    [
        cp.Gaussian(scale=0.7),
        cp.Bernoulli(),
        cp.CustomNLL(lambda out, y: ((out - y) ** 4).sum(-1)),
    ],
    ids=["gaussian", "bernoulli", "custom"],
)
def test_likelihood_parity(likelihood):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(30, 3, dtype=torch.float64)
    y = (torch.rand(30, 2) > 0.5).double() if isinstance(likelihood, cp.Bernoulli) else x[:, :2]
    post = cp.LocalPosterior(net, (x, y), likelihood, localization=1.0, check_center=False)
    err_u, err_g = _parity(post, to_jax(post), draws=5)
    assert err_u <= 1e-10 and err_g <= 1e-10, (err_u, err_g)


def test_dtype_override_and_x64():
    post = _post_with(nn.Tanh())
    jp32 = to_jax(post, dtype="float32")
    assert jp32.dtype == np.float32 and jp32.center.dtype == np.float32
    assert jp32.potential(jp32.center).dtype == np.float32
    post32 = post._replace(dtype=torch.float32)
    u = post32.potential(post32.center).item()
    assert abs(float(jp32.potential(jp32.center)) - u) <= 1e-4 * abs(u)
    to_jax(post)  # float64 export turns on x64
    assert jax.config.jax_enable_x64
    with pytest.raises(ValueError, match="'float32' or 'float64'"):
        to_jax(post, dtype="float16")
    with pytest.raises(TypeError, match="LocalPosterior"):
        to_jax(post.lifted.net)


class _Bessel(nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x)


class _I0(nn.Module):
    def forward(self, x):
        return torch.special.i0(x)


def _post_with(module):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), module, nn.Linear(4, 1)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    return cp.LocalPosterior(
        net, (x, x[:, :1]), cp.Gaussian(scale=1.0), localization=1.0, check_center=False
    )


def test_unsupported_op_names_op_and_location():
    # torch has no derivative for bessel_j0: the layer before it gets no gradient, which
    # the declaration reports
    with pytest.warns(cp.CondpostWarning, match="identically zero"):
        post = _post_with(_Bessel())
    with pytest.raises(UnsupportedOpError) as info:
        to_jax(post)
    err = info.value
    msg = str(err)
    assert isinstance(err, NotImplementedError)
    assert err.op == "aten.special_bessel_j0.default" and err.op in msg
    assert "module '1' (" in msg and "_Bessel" in msg  # the module path and class
    assert "test_export.py" in msg and "bessel_j0(x)" in msg  # the source line
    assert "extra_ops" in msg and "backend='pyro'" in msg  # how to proceed
    # a plain function: its name and file stand in for the module path
    with pytest.raises(UnsupportedOpError, match=r"special_bessel_j0.*\n.*test_export.py"):
        export_function(lambda t: torch.special.bessel_j0(t).sum(), torch.randn(3))


def test_extra_ops_extend_the_table():
    post = _post_with(_I0())
    with pytest.raises(UnsupportedOpError, match="aten.i0.default"):
        to_jax(post)
    jp = to_jax(post, extra_ops={aten.i0.default: jax.scipy.special.i0})
    err_u, err_g = _parity(post, jp, draws=3)
    assert err_u <= 1e-10 and err_g <= 1e-10
