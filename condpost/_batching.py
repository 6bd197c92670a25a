"""One helper for "vmap, else loop": batch a per-draw function over a leading axis.

``torch.func.vmap`` fails on modules it cannot trace (data-dependent control flow,
in-place updates of captured tensors, ops without a batching rule). Then the function
runs draw by draw. Only vmap's own failures are caught (``RuntimeError`` and
``NotImplementedError`` raised while tracing), each function falls back once, with one
warning naming it, and the fallback is remembered by that wrapper so its later calls
do not retry (another wrapper, e.g. for another network of the same class, tries vmap
itself; the warning is not repeated for the same name).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import vmap

from ._errors import CondpostWarning, warn

__all__ = ["batched"]

_WARNED: set[str] = set()


def batched(fn: Callable, name: str, *, in_dims=0) -> Callable:
    """``fn`` over a leading batch axis: vmapped, or a Python loop where vmap fails.

    ``fn`` maps one draw to a tensor or a tuple/dict of tensors; the result stacks them.
    ``name`` identifies the function for the warning and the remembered failure.
    """
    vm = vmap(fn, in_dims=in_dims)

    def loop(*args):
        n = args[0].shape[0]
        rows = [fn(*(a[i] for a in args)) for i in range(n)]
        return _stack(rows)

    failed = []

    def call(*args):
        if not failed:
            try:
                return vm(*args)
            except (RuntimeError, NotImplementedError) as e:
                failed.append(True)
                if name in _WARNED:
                    return loop(*args)
                _WARNED.add(name)
                warn(
                    f"{name}: torch.func.vmap cannot batch this network "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); evaluating draw by "
                    f"draw instead (slower, same values).",
                    CondpostWarning,
                )
        return loop(*args)

    call.failed = failed  # type: ignore[attr-defined]  # [True] once it fell back
    return call


def _stack(rows):
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(rows)
    if isinstance(first, dict):
        return {k: _stack([r[k] for r in rows]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([r[i] for r in rows]) for i in range(len(first)))
    return rows
