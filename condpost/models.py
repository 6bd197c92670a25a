"""TransformerLens and Hugging Face networks: calling them, naming their sites and slices.

condpost lifts any ``torch.nn.Module``. Two families of networks need a little more than
``functional_call(net, params, (x,))``:

* a TransformerLens ``HookedTransformer`` (or any ``HookedRootModule``) takes token ids
  and returns logits; its hook points are modules, so a hook name such as
  ``"blocks.0.attn.hook_z"`` is a module path and a site;
* a Hugging Face causal LM (``GPT2LMHeadModel``, ...) returns a ``ModelOutput``; its
  blocks return tuples. condpost reads ``.logits`` from the model and the hidden state
  (the first element) from a tuple-returning module.

Neither library is imported here: networks are recognised by their classes' modules,
and both libraries stay optional extras (``pip install condpost[transformerlens]``,
``pip install condpost[hf]``).

Sites and parameters take an index suffix in NumPy syntax (``docs/models.md``):
``"blocks.0.attn.hook_z[:, -1, 1]"`` is head 1 at the last position, and
``"blocks.0.attn.W_Q[1]"`` in ``include=`` lifts head 1 of ``W_Q`` only.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "network_kind",
    "require",
    "site",
    "heads",
    "neurons",
    "causal_lm_data",
    "parse_index",
    "format_index",
    "split_indexed",
    "hooked_transformer",
    "gpt2_lm",
]

_EXTRAS = {
    "transformer_lens": ("transformerlens", "TransformerLens (HookedTransformer)"),
    "transformers": ("hf", "Hugging Face transformers"),
}


def require(module: str):
    """Import an optional dependency, or raise an ImportError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra, what = _EXTRAS.get(module, (None, module))
        how = (
            f"pip install condpost[{extra}] (or pip install {module})"
            if extra
            else f"pip install {module}"
        )
        raise ImportError(
            f"this needs {what}, which is not installed (import {module!r} failed: {e}). "
            f"Install the optional extra: {how}."
        ) from e


# ---------------------------------------------------------------------- network kinds
def network_kind(net: nn.Module) -> str:
    """``"transformerlens"``, ``"hf"`` or ``"torch"``, from the classes' modules (no import)."""
    for cls in type(net).__mro__:
        mod = getattr(cls, "__module__", "") or ""
        if mod.startswith("transformer_lens."):
            return "transformerlens"
        if mod.startswith("transformers.") and cls.__name__ == "PreTrainedModel":
            return "hf"
    return "torch"


def _unpack_tokens(x: torch.Tensor):
    """``x`` is ``input_ids [n, T]`` or ``input_ids`` and ``attention_mask`` stacked ``[n, 2, T]``."""
    if x.dim() == 3 and x.shape[1] == 2 and not x.is_floating_point():
        return x[:, 0], x[:, 1]
    return x, None


def call(net: nn.Module, kind: str, params: Mapping[str, torch.Tensor], x: torch.Tensor):
    """``net`` run on ``x`` with ``params`` substituted; one output tensor for known kinds."""
    if kind == "torch":
        return functional_call(net, params, (x,))
    ids, mask = _unpack_tokens(x)
    if kind == "transformerlens":
        kw = {} if mask is None else {"attention_mask": mask}
        cfg = getattr(net, "cfg", None)
        dtype = next((v.dtype for v in params.values() if v.is_floating_point()), None)
        old = getattr(cfg, "dtype", None)
        if dtype is None or not isinstance(old, torch.dtype) or old == dtype:
            return functional_call(net, params, (ids,), kw)
        # TransformerLens casts some activations to cfg.dtype (its LayerNorm output): a
        # float64 posterior of a float32 model computes in float64 only while cfg says so
        try:
            cfg.dtype = dtype
            return functional_call(net, params, (ids,), kw)
        finally:
            cfg.dtype = old
    kw = {"use_cache": False, "return_dict": True}
    if mask is not None:
        kw["attention_mask"] = mask
    accepted = _forward_keywords(type(net))
    if accepted is not None:
        kw = {k: v for k, v in kw.items() if k in accepted or k == "attention_mask"}
    out = functional_call(net, params, (ids,), kw)
    return module_output(out, kind)


_KEYWORDS: dict[type, frozenset | None] = {}


def _forward_keywords(cls: type) -> frozenset | None:
    """Keyword names ``cls.forward`` takes (None when it takes ``**kwargs``)."""
    if cls not in _KEYWORDS:
        import inspect

        try:
            ps = inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            _KEYWORDS[cls] = None
        else:
            var = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values())
            _KEYWORDS[cls] = None if var else frozenset(ps)
    return _KEYWORDS[cls]


def module_output(output: Any, kind: str):
    """A module's output as one tensor where the kind defines it (HF: logits / hidden state)."""
    if kind != "hf" or isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    to_tuple = getattr(output, "to_tuple", None)  # a ModelOutput: its first field
    if to_tuple is not None:
        t = to_tuple()
        if t and isinstance(t[0], torch.Tensor):
            return t[0]
    return output


def replace_output(output: Any, value: torch.Tensor, kind: str):
    """``output`` with its tensor part (as ``module_output`` reads it) replaced by ``value``."""
    if kind == "hf" and isinstance(output, tuple) and output:
        return (value,) + tuple(output[1:])
    return value


# ---------------------------------------------------------------------- index syntax
def _parse_item(s: str):
    s = s.strip()
    if s == "...":
        return Ellipsis
    if s.startswith("[") and s.endswith("]"):
        body = s[1:-1].strip()
        if not body:
            raise ValueError("an empty list selects nothing")
        return [int(v) for v in body.split(",")]
    if ":" in s:
        parts = s.split(":")
        if len(parts) > 3:
            raise ValueError(f"{s!r} is not a slice")
        vals = [int(p) if p.strip() else None for p in parts]
        return slice(*vals)
    return int(s)


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def parse_index(text: str) -> tuple:
    """``":, -1, 1"`` → ``(slice(None), -1, 1)``; items are ints, slices, ``...`` and int lists."""
    items = _split_top(text)
    if len(items) > 1 and not items[-1].strip():  # a trailing comma: "1,"
        items = items[:-1]
    try:
        return tuple(_parse_item(s) for s in items)
    except ValueError as e:
        raise ValueError(
            f"cannot read the index [{text}]: {e}. An index is NumPy-style: integers, "
            f"slices a:b:c, '...' and lists [i, j], separated by commas (e.g. [:, -1, 1])."
        ) from None


def as_index(idx) -> tuple:
    """A user index (int, slice, list, tuple, str, Ellipsis) as a tuple of index items."""
    if isinstance(idx, str):
        s = idx.strip()
        if s.startswith("[") and s.endswith("]") and _split_top(s[1:-1]) == [s[1:-1]]:
            if not s[1:-1].lstrip().startswith("["):
                s = s[1:-1]
        return parse_index(s)
    if not isinstance(idx, tuple):
        idx = (idx,)
    out = []
    for it in idx:
        if isinstance(it, torch.Tensor):
            it = it.tolist()
        if isinstance(it, range):
            it = slice(it.start, it.stop, it.step) if it.step > 0 else list(it)
        if isinstance(it, bool) or not (
            isinstance(it, (int, slice, list)) or it is Ellipsis or hasattr(it, "__index__")
        ):
            raise TypeError(
                f"an index item must be an int, a slice, a list of ints or '...'; got "
                f"{type(it).__name__} {it!r}"
            )
        if isinstance(it, slice):
            for v in (it.start, it.stop, it.step):
                if v is not None and not isinstance(v, int):
                    raise TypeError(f"slice bounds must be ints; got {it!r}")
        if isinstance(it, list):
            it = [int(v) for v in it]
        elif not isinstance(it, slice) and it is not Ellipsis:
            it = int(it)
        out.append(it)
    return tuple(out)


def format_index(idx: tuple) -> str:
    """Inverse of ``parse_index``: ``(slice(None), -1, 1)`` → ``":, -1, 1"``."""

    def one(it):
        if it is Ellipsis:
            return "..."
        if isinstance(it, list):
            return "[" + ", ".join(str(v) for v in it) + "]"
        if isinstance(it, slice):
            a = "" if it.start is None else str(it.start)
            b = "" if it.stop is None else str(it.stop)
            return f"{a}:{b}" if it.step is None else f"{a}:{b}:{it.step}"
        return str(it)

    return ", ".join(one(it) for it in idx)


def split_indexed(name: str) -> tuple[str, str | None]:
    """``"a.b[:, 1]"`` → ``("a.b", ":, 1")``; ``"a.b"`` → ``("a.b", None)``.

    The index is the bracket group that closes the name; a name that does not end in
    ``]`` (or whose brackets do not balance) has none.
    """
    if not name.endswith("]"):
        return name, None
    depth = 0
    for j in range(len(name) - 1, -1, -1):
        if name[j] == "]":
            depth += 1
        elif name[j] == "[":
            depth -= 1
            if depth == 0:
                return name[:j], name[j + 1 : -1]
    return name, None


# ---------------------------------------------------------------------- helpers
_HEAD_AXIS = {  # TransformerLens hook layouts: which axes hold the position and the head
    "hook_q": (1, 2),
    "hook_k": (1, 2),
    "hook_v": (1, 2),
    "hook_z": (1, 2),
    "hook_result": (1, 2),
    "hook_rot_q": (1, 2),
    "hook_rot_k": (1, 2),
    "hook_attn_scores": (2, 1),  # [batch, head, query_pos, key_pos]: pos is the query
    "hook_pattern": (2, 1),
}


def site(name: str, *, pos=None, head=None, unit=None) -> str:
    """A site string with a selection, e.g. ``site("blocks.0.attn.hook_z", pos=-1, head=1)``.

    Returns ``"blocks.0.attn.hook_z[:, -1, 1]"``: the batch axis is kept, ``pos`` picks
    the (query) position and ``head`` the head (TransformerLens layouts: ``hook_q/k/v/z``
    and ``hook_result`` are ``[batch, pos, head, d]``, ``hook_pattern`` and
    ``hook_attn_scores`` ``[batch, head, query_pos, key_pos]``); ``unit`` picks the last
    axis (a neuron of ``mlp.hook_post``, a direction of ``hook_resid_post``). Each may be
    an int, a slice or a list of ints.
    """
    leaf = name.rsplit(".", 1)[-1]
    items: dict[int, Any] = {}
    pos_axis, head_axis = _HEAD_AXIS.get(leaf, (1, None))
    if pos is not None:
        items[pos_axis] = pos
    if head is not None:
        if head_axis is None:
            raise ValueError(
                f"site({name!r}, head=...): {leaf!r} has no head axis; heads are an axis of "
                f"{sorted(_HEAD_AXIS)}"
            )
        items[head_axis] = head
    if not items and unit is None:
        return name
    k = max(items) if items else 0
    idx: list[Any] = [slice(None)] * (k + 1)
    for ax, v in items.items():
        idx[ax] = v
    if unit is not None:
        idx += [Ellipsis, unit]
    return f"{name}[{format_index(as_index(tuple(idx)))}]"


def heads(layer: int, head) -> dict[str, tuple]:
    """``include=`` selection of one head (or a list of heads) of a TransformerLens layer.

    ``W_Q``, ``W_K``, ``W_V`` ``[n_heads, d_model, d_head]``, ``W_O``
    ``[n_heads, d_head, d_model]`` and the biases ``b_Q``, ``b_K``, ``b_V``
    ``[n_heads, d_head]`` at that head; ``b_O`` is shared by all heads and stays out.
    """
    h = as_index(head)
    return {f"blocks.{layer}.attn.W_[QKVO]": h, f"blocks.{layer}.attn.b_[QKV]": h}


def neurons(layer: int, units) -> dict[str, tuple]:
    """``include=`` selection of MLP neurons of a TransformerLens layer.

    Column block ``units`` of ``W_in`` ``[d_model, d_mlp]``, those entries of ``b_in``
    and those rows of ``W_out`` ``[d_mlp, d_model]``.
    """
    idx = as_index(units)
    if len(idx) != 1:
        raise ValueError(f"neurons(units=...) takes one index (int, slice or list); got {units!r}")
    u = idx[0]
    return {
        f"blocks.{layer}.mlp.W_in": (slice(None), u),
        f"blocks.{layer}.mlp.b_in": (u,),
        f"blocks.{layer}.mlp.W_out": (u,),
    }


def causal_lm_data(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """``data=(x, y)`` for a causal LM with ``CausalLM()``: inputs and next-token labels.

    ``y`` is ``input_ids`` with ``ignore_index`` at padding (``attention_mask == 0``), the
    labels that ``CausalLM`` shifts by one. ``x`` is ``input_ids`` when the padding is on
    the right (a causal model's logits at real tokens do not see it); with padding before
    a real token (left padding) the mask is needed by the forward pass, and ``x`` is
    ``input_ids`` and ``attention_mask`` stacked ``[n, 2, T]``, which condpost unpacks
    for TransformerLens and Hugging Face models.
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"input_ids must be integer token ids [n, T]; got {tuple(ids.shape)}")
    if attention_mask is None:
        return ids, ids.clone()
    m = torch.as_tensor(attention_mask)
    if m.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(m.shape)}; input_ids have {tuple(ids.shape)}"
        )
    m = m.to(torch.long)
    y = torch.where(m.bool(), ids, torch.full_like(ids, ignore_index))
    # padding before a real token: the forward pass needs the mask
    later_real = torch.flip(torch.cummax(torch.flip(m, [1]), 1).values, [1])
    if bool(((m == 0) & (later_real == 1)).any()):
        return torch.stack([ids, m], 1), y
    return ids, y


def hooked_transformer(seed: int = 0, **cfg):
    """A randomly initialised ``HookedTransformer`` from config keywords (nothing downloaded)."""
    tl = require("transformer_lens")
    kw = dict(act_fn="relu", device="cpu", seed=seed)
    kw.update(cfg)
    net = tl.HookedTransformer(tl.HookedTransformerConfig(**kw))
    return net.eval()


def gpt2_lm(seed: int = 0, **cfg):
    """A randomly initialised ``GPT2LMHeadModel`` from ``GPT2Config`` keywords, in eval mode.

    Eager attention by default (it batches over chains with ``vmap``).
    """
    tr = require("transformers")
    cfg.setdefault("attn_implementation", "eager")
    cfg.setdefault("bos_token_id", None)
    cfg.setdefault("eos_token_id", None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = tr.GPT2LMHeadModel(tr.GPT2Config(**cfg))
    return net.eval()
