"""A fingerprint of a declaration: what must match for two sets of draws to mix.

A resumed run store, ``ReferenceClass.load(path, posterior=post)`` and ``attach(post)``
must belong to the *same* posterior. Matching the lifted names and ``d`` is not enough:
new targets ``y``, another Gaussian scale, another activation function or a changed
constraint tolerance give another posterior with the same shapes. The fingerprint
records, per component, a hash (or for floats the value) of

* ``data``: the inputs ``x`` and targets ``y`` (dtype, shape, bytes);
* ``likelihood``: its configuration (the Gaussian scale included) and, for a custom
  per-sample NLL, the function's compiled code;
* ``architecture``: every module's class, its ``repr`` and the compiled code of its
  ``forward`` (so changing ``torch.relu`` to ``torch.tanh`` inside ``forward`` counts,
  editing a comment does not), plus the network's response at ``w*`` on a few inputs;
* ``lifted``: the lifted parameter names and shapes, and the unlifted weights;
* ``center``: ``w*``;
* ``nbeta``, ``localization``;
* ``constraints``: each constraint's configuration (tolerance, strength, sites, …) and
  its probes and targets.

``compare`` lists the components that differ, in words, for the error message.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior

__all__ = ["fingerprint", "compare", "FINGERPRINT_VERSION"]

FINGERPRINT_VERSION = 1

# components compared as numbers, with a relative tolerance (floating-point
# reductions differ slightly between devices and thread counts)
_NUMERIC = {"nbeta": 1e-9, "localization": 1e-9, "loss_center": 1e-5, "response": 1e-4}

_WHAT = {
    "data": "the data (x, y)",
    "likelihood": "the likelihood (its kind or parameters, e.g. a Gaussian scale)",
    "architecture": "the network's architecture or forward code (e.g. an activation function)",
    "response": "the network's outputs at w* (architecture, buffers or unlifted weights)",
    "loss_center": "L_n(w*)",
    "lifted": "the lifted parameter selection (include/exclude) or the unlifted weights",
    "center": "the centre w*",
    "nbeta": "nβ",
    "localization": "the localization γ",
    "constraints": "the constraints (their kind, tolerance, strength, sites, probes or targets)",
    "dtype": "the computation dtype",
}


def _h() -> Any:
    return hashlib.sha256()


def _update_tensor(h, t) -> None:
    a = t.detach().cpu() if isinstance(t, torch.Tensor) else np.asarray(t)
    a = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


def _update_code(h, fn) -> None:
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        code = getattr(vars(type(fn)).get("__call__"), "__code__", None)
    if code is None:
        h.update(repr(fn).encode())
        return
    stack = [code]
    while stack:  # the function and the functions defined inside it
        c = stack.pop()
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        for k in c.co_consts:
            if hasattr(k, "co_code"):
                stack.append(k)
            else:
                h.update(repr(k).encode())


def _update_obj(h, obj, depth: int = 0) -> None:
    """Hash a configuration object: tensors by bytes, containers recursively."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        _update_tensor(h, obj)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _update_obj(h, obj[k], depth + 1)
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for v in obj:
            _update_obj(h, v, depth + 1)
    elif isinstance(obj, (str, int, float, bool, type(None))):
        h.update(repr(obj).encode())
    elif callable(obj):
        _update_code(h, obj)
    elif depth < 3 and hasattr(obj, "__dict__"):
        h.update(type(obj).__qualname__.encode())
        _update_obj(h, vars(obj), depth + 1)
    else:
        h.update(type(obj).__qualname__.encode())


def fingerprint(post: LocalPosterior) -> dict:
    """The fingerprint of a declaration (a JSON-able dict of component → hash or value)."""
    out: dict[str, Any] = {"version": FINGERPRINT_VERSION}
    h = _h()
    if post.data.in_memory:
        _update_tensor(h, post.x)
        _update_tensor(h, post.y)
    else:  # a streamed source: the hash of its batches, taken in the declaration's pass
        h.update(f"{post.data.kind}:{post.n}:{post.data.digest}".encode())
    out["data"] = h.hexdigest()[:32]

    h = _h()
    lik = post.likelihood
    h.update(type(lik).__qualname__.encode())
    _update_obj(h, lik.to_config())
    fn = getattr(lik, "fn", None)
    if fn is not None:
        _update_code(h, fn)
    scale = getattr(lik, "scale", None)
    if isinstance(scale, torch.Tensor):
        _update_tensor(h, scale)
    out["likelihood"] = h.hexdigest()[:32]

    net = post.lifted.net
    h = _h()
    seen = set()
    for name, mod in net.named_modules():
        h.update(f"{name}:{type(mod).__module__}.{type(mod).__qualname__}".encode())
        h.update(mod.extra_repr().encode())
        if type(mod) not in seen:
            seen.add(type(mod))
            _update_code(h, type(mod).forward)
    out["architecture"] = h.hexdigest()[:32]

    with torch.no_grad():
        k = min(8, post.n)
        resp = post.lifted.forward(post.center, post.data.head(k)[0])
    resp = (
        resp.detach().reshape(-1)[:64].cpu().double().numpy()
        if isinstance(resp, torch.Tensor)
        else np.zeros(0)
    )
    out["response"] = [float(v) for v in resp]
    out["loss_center"] = float(post.loss_center)

    h = _h()
    h.update(json.dumps([list(post.lifted.names), [list(s) for s in post.lifted.shapes]]).encode())
    for name, t in sorted(_unlifted(post).items()):
        h.update(name.encode())
        _update_tensor(h, t)
    out["lifted"] = h.hexdigest()[:32]

    h = _h()
    _update_tensor(h, post.center)
    out["center"] = h.hexdigest()[:32]
    out["nbeta"] = float(post.nbeta)
    out["localization"] = float(post.localization)
    out["dtype"] = str(post.dtype).replace("torch.", "")

    h = _h()
    for b in post.constraints:
        _update_obj(h, b.to_config())
        for t in (b.target, b.probes):
            if t is not None:
                _update_tensor(h, t)
        _update_obj(h, {k: v for k, v in vars(b.spec).items() if not k.startswith("_")})
    out["constraints"] = h.hexdigest()[:32]
    return out


def _unlifted(post) -> dict[str, torch.Tensor]:
    """The weights and buffers that stay at their values (frozen copies), and the full
    w* of every parameter lifted only in part (its unlifted entries stay there)."""
    out = dict(post.lifted.frozen)
    out.update({f"base:{k}": v for k, v in getattr(post.lifted, "bases", {}).items()})
    return out


def _close(a, b, rtol: float) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
            return False
        return all(_close(x, y, rtol) for x, y in zip(a, b, strict=True))
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    if math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12) + 1e-12


def compare(stored: dict | None, current: dict) -> list[str]:
    """Components in which two fingerprints differ, each in words ([] when they match).

    A stored record without a fingerprint (written before fingerprints existed) is
    reported as such: it cannot be shown to match.
    """
    if not stored:
        return ["the stored run has no declaration fingerprint (written by an older condpost)"]
    out = []
    for k in sorted(set(stored) | set(current)):
        if k == "version":
            continue
        a, b = stored.get(k), current.get(k)
        same = _close(a, b, _NUMERIC[k]) if k in _NUMERIC else a == b
        if not same:
            what = _WHAT.get(k, k)
            if k in ("nbeta", "localization", "loss_center"):
                out.append(f"{what}: stored {a!r}, now {b!r}")
            else:
                out.append(f"{what} differ(s)")
    return out
