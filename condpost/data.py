"""Data sources: what ``data=`` accepts, and how rows are gathered and streamed.

A declaration's data is a ``DataSource``: ``n`` rows ``(x_i, y_i)`` that define
``L_n``. Three kinds exist (docs/data.md):

* ``Tensors``: the pair ``(x, y)`` in memory (``data=(x, y)``, or a token mapping
  ``{"input_ids": [n, T], "attention_mask": [n, T]}``). Rows are gathered with
  ``index_select`` and full passes are slices, exactly what condpost did before sources
  existed, so this path is bit for bit unchanged.
* ``MapRows``: a map-style dataset (``__len__`` and ``__getitem__``), bare or the
  ``.dataset`` of a ``torch.utils.data.DataLoader``. ``gather(idx)`` fetches only the
  rows ``idx`` and collates them (the loader's ``collate_fn``), so a minibatch costs
  ``m`` row reads whatever ``n`` is. The loader's sampler, shuffling and ``drop_last``
  are not used: condpost draws its own indices.
* ``Batches``: an iterable of batches without random access (a ``DataLoader`` over an
  ``IterableDataset``, a list of ``(x, y)`` batches). It supports full passes (``L_n``,
  ``post.loss``, ``post.evaluate``) but not minibatch sampling, which needs rows at
  random: SG-MCMC refuses it with an error saying what to pass instead.

A batch is a pair ``(x, y)``, or, for a token dataset (``likelihood=CausalLM()``), a
mapping with ``input_ids`` and optionally ``attention_mask``: the labels are
``input_ids`` with the likelihood's ``ignore_index`` at padding (as
``condpost.models.causal_lm_data`` makes them), and the inputs are ``input_ids``, or
``input_ids`` and the mask stacked ``[m, 2, T]`` for Hugging Face and TransformerLens
networks, which attend only to real tokens.

Every batch goes through the declaration's ``prepare(x, y)`` (dtype, device, target
encoding), so a gathered batch equals the same rows of the in-memory tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

__all__ = [
    "DataSource",
    "Tensors",
    "MapRows",
    "Batches",
    "DataNotInMemoryError",
    "as_source",
    "tokens_to_pair",
]

#: rows per batch of a full pass over a streamed source, unless the loader sets one
PASS_ROWS = 256


class DataNotInMemoryError(ValueError):
    """An operation needs the whole dataset in memory, and ``data=`` streams it."""


def _describe(obj) -> str:
    return type(obj).__name__


def tokens_to_pair(
    batch: Mapping, ignore_index: int = -100, mask_in_x: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a token batch ``{"input_ids": [m, T], "attention_mask": [m, T]}``.

    ``y`` is ``input_ids`` with ``ignore_index`` where ``attention_mask == 0`` (the labels
    ``CausalLM`` shifts by one); ``x`` is ``input_ids``, or ``input_ids`` and the mask
    stacked ``[m, 2, T]`` when ``mask_in_x`` (networks that take a mask).
    """
    if "input_ids" not in batch:
        raise ValueError(
            f"data=: a token batch needs the key 'input_ids'; got keys {sorted(map(str, batch))}"
        )
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            f"data=: input_ids must be integer token ids [m, T]; got shape {tuple(ids.shape)} "
            f"and dtype {ids.dtype}"
        )
    ids = ids.long()
    mask = batch.get("attention_mask")
    if mask is None:
        return ids, ids.clone()
    m = torch.as_tensor(mask)
    if m.dim() == 1:
        m = m.unsqueeze(0)
    if m.shape != ids.shape:
        raise ValueError(
            f"data=: attention_mask has shape {tuple(m.shape)} but input_ids have "
            f"{tuple(ids.shape)}; they must match (one mask entry per token)"
        )
    m = m.long()
    y = torch.where(m.bool(), ids, torch.full_like(ids, ignore_index))
    return (torch.stack([ids, m], 1) if mask_in_x else ids), y


def _stack_rows(rows: list):
    """Collate rows ``(x_i, y_i)`` or token mappings without torch's default_collate
    (which would turn lists of token ids into lists of tensors)."""
    r0 = rows[0]
    if isinstance(r0, Mapping):
        return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in r0}
    if isinstance(r0, (tuple, list)) and len(r0) == 2:
        return (
            torch.stack([torch.as_tensor(r[0]) for r in rows]),
            torch.stack([torch.as_tensor(r[1]) for r in rows]),
        )
    raise TypeError(
        f"data=: row 0 of the dataset is a {_describe(r0)}; each row must be a pair "
        f"(x_i, y_i) or, for a token dataset, a mapping with 'input_ids'. Return (x, y) from "
        f"__getitem__, or pass a DataLoader whose collate_fn builds (x, y) batches."
    )


class DataSource:
    """``n`` rows ``(x_i, y_i)``: ``gather(idx)``, ``batches(rows)``, ``head(k)``.

    Attributes
    ----------
    n : int
        Number of rows (for ``Batches``, counted by the declaration's first pass).
    kind : str
        ``"tensors"``, ``"map"`` or ``"iterable"``.
    in_memory : bool
        The whole data set is held as tensors (``x``, ``y``).
    random_access : bool
        ``gather`` works (minibatch sampling).
    digest : str or None
        A hash of every prepared batch, in order (the fingerprint of streamed data).
    """

    kind = "source"
    in_memory = False
    random_access = False

    def __init__(self, prepare: Callable, to_pair: Callable) -> None:
        self.prepare = prepare
        self.to_pair = to_pair
        self.n = 0
        self.digest: str | None = None
        self.x_like: torch.Tensor | None = None  # one prepared row of x, [1, ...]
        self.y_like: torch.Tensor | None = None
        self.pass_rows = PASS_ROWS

    # -- to override
    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise self._no_random_access("minibatch sampling")

    def _raw_batches(self, rows: int) -> Iterator:
        raise NotImplementedError

    # -- shared
    def describe(self) -> str:
        return self.kind

    def _pair(self, batch, b: int):
        try:
            x, y = self.to_pair(batch)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (batch {b} of data=, a {self.describe()})") from e
        return self.prepare(x, y)

    def batches(self, rows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A full pass in order: prepared ``(x, y)`` batches of about ``rows`` rows."""
        rows = self.pass_rows if rows is None else int(rows)
        for b, raw in enumerate(self._raw_batches(rows)):
            yield self._pair(raw, b)

    def head(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``min(k, n)`` rows (at least one batch's worth for ``Batches``)."""
        k = max(1, min(int(k), self.n)) if self.n else max(1, int(k))
        if self.random_access:
            return self.gather(torch.arange(k))
        xs, ys, got = [], [], 0
        for xb, yb in self.batches(k):
            xs.append(xb)
            ys.append(yb)
            got += xb.shape[0]
            if got >= k:
                break
        return torch.cat(xs)[:k], torch.cat(ys)[:k]

    def scan(self, rows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The declaration's checked pass: like ``batches``, but every batch is checked
        (a pair, x and y of equal length, rows shaped like the first batch's, at least
        one row in all), ``n`` is counted and ``digest`` computed."""
        hx, hy = hashlib.sha256(), hashlib.sha256()  # x and y apart: split-invariant
        n = 0
        ref = None
        for b, (x, y) in enumerate(self.batches(rows)):
            if x.dim() == 0 or y.dim() == 0:
                raise ValueError(
                    f"data=: batch {b} has inputs of shape {tuple(x.shape)} and targets of "
                    f"shape {tuple(y.shape)}; each batch needs a leading row dimension "
                    f"(x [m, ...], y [m, ...])"
                )
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"data=: batch {b} has {x.shape[0]} inputs but {y.shape[0]} targets; "
                    f"x and y of a batch must have the same number of rows"
                )
            sig = (tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]), y.dtype)
            if ref is None:
                ref = sig
                self.x_like, self.y_like = x[:1].clone(), y[:1].clone()
            elif sig != ref:
                raise ValueError(
                    f"data=: batch {b} has rows x {sig[0]} ({sig[1]}) and y {sig[2]} "
                    f"({sig[3]}), but batch 0 had x {ref[0]} ({ref[1]}) and y {ref[2]} "
                    f"({ref[3]}); every row must have the same shape and dtype. Pad "
                    f"sequences to one length (a token dataset masks the padding with "
                    f"attention_mask)."
                )
            if ref is sig:  # dtype and row shape once, then the rows' bytes
                hx.update(f"{x.dtype}{sig[0]}".encode())
                hy.update(f"{y.dtype}{sig[2]}".encode())
            for t, h in ((x, hx), (y, hy)):
                a = t.detach().cpu().contiguous()
                h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
            n += int(x.shape[0])
            yield x, y
        if n == 0:
            raise ValueError(
                f"data= is empty: the {self.describe()} gave no rows, so there are no "
                f"samples to define L_n. Pass a DataLoader or dataset with at least one row "
                f"(n ≥ 2 for nbeta='wbic'), or data=(x, y) tensors."
            )
        if self.random_access and n != self.n:
            raise ValueError(
                f"data=: the {self.describe()} has len() = {self.n} but a pass over it gave "
                f"{n} rows; __len__ must count the rows __getitem__ serves"
            )
        self.n = n
        self.digest = hx.hexdigest()[:32] + hy.hexdigest()[:32]

    def _no_random_access(self, what: str) -> ValueError:
        return ValueError(
            f"{what} draws rows at random, which needs random access to the data; data= is "
            f"a {self.describe()} (an iterable of batches, no __len__/__getitem__ over "
            f"rows). Pass a map-style dataset (len(ds) and ds[i] -> (x_i, y_i) or a token "
            f"mapping), a DataLoader over one, or data=(x, y) tensors."
        )

    def require_random_access(self, what: str) -> None:
        if not self.random_access:
            raise self._no_random_access(what)

    def require_memory(self, what: str) -> None:
        """Raise ``DataNotInMemoryError`` naming ``what`` unless the data are tensors."""
        if not self.in_memory:
            raise DataNotInMemoryError(
                f"{what} needs the whole data set in memory (full-batch gradients or a "
                f"compiled/exported potential over all rows), but data= is a "
                f"{self.describe()} (n = {self.n}, streamed in batches). If the data fit in "
                f"memory, pass data=(x, y) tensors; otherwise use an SG-MCMC method "
                f"('sgld', 'rmsprop_sgld', 'sghmc', 'sgnht'), which gathers only each "
                f"minibatch's rows, and post.loss / post.evaluate, which stream."
            )


class Tensors(DataSource):
    """The data in memory: prepared tensors ``x [n, ...]`` and ``y [n, ...]``."""

    kind = "tensors"
    in_memory = True
    random_access = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(lambda a, b: (a, b), lambda b: b)
        self.x, self.y = x, y
        self.n = int(x.shape[0])
        self.x_like, self.y_like = x[:1], y[:1]

    def describe(self) -> str:
        return "pair of tensors"

    def gather(self, idx):
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

    def batches(self, rows=None):
        rows = self.n if rows is None else int(rows)
        for i in range(0, self.n, rows):
            yield self.x[i : i + rows], self.y[i : i + rows]

    def head(self, k):
        return self.x[:k], self.y[:k]


class MapRows(DataSource):
    """A map-style dataset: ``len(ds)`` rows, ``ds[i]`` (or ``ds.__getitems__``) fetched
    on demand and collated by ``collate``."""

    kind = "map"
    random_access = True

    def __init__(self, dataset, collate, prepare, to_pair, *, loader=None) -> None:
        super().__init__(prepare, to_pair)
        self.dataset, self.collate, self.loader = dataset, collate, loader
        self.n = int(len(dataset))
        bs = getattr(loader, "batch_size", None)
        if isinstance(bs, int) and bs > 0:
            self.pass_rows = bs
        self._many = getattr(dataset, "__getitems__", None)

    def describe(self) -> str:
        inner = _describe(self.dataset)
        return f"DataLoader over {inner}" if self.loader is not None else inner

    def _fetch(self, idx: list[int]):
        try:
            rows = self._many(idx) if self._many else [self.dataset[i] for i in idx]
            return self.collate(rows)
        except (TypeError, ValueError, RuntimeError) as e:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ValueError(
                f"data=: reading or collating rows of the {self.describe()} failed "
                f"({type(e).__name__}: {msg}). Every row must be a pair (x_i, y_i) of "
                f"equal-shaped tensors (or a token mapping with 'input_ids' of one length); "
                f"pad sequences to one length or pass a collate_fn that builds (x, y)."
            ) from e

    def gather(self, idx):
        flat = idx.reshape(-1).tolist()
        x, y = self._pair(self._fetch(flat), 0)
        return x, y

    def _raw_batches(self, rows):
        workers = getattr(self.loader, "num_workers", 0) or 0
        if workers > 0:  # the loader's worker processes, in order, every row once
            from torch.utils.data import DataLoader

            yield from DataLoader(
                self.dataset,
                batch_size=rows,
                shuffle=False,
                drop_last=False,
                collate_fn=self.collate,
                num_workers=workers,
            )
            return
        for i in range(0, self.n, rows):
            yield self._fetch(list(range(i, min(i + rows, self.n))))


class Batches(DataSource):
    """An iterable of batches (no random access): full passes only."""

    kind = "iterable"

    def __init__(self, iterable, prepare, to_pair) -> None:
        super().__init__(prepare, to_pair)
        self.iterable = iterable

    def describe(self) -> str:
        return f"iterable of batches ({_describe(self.iterable)})"

    def _raw_batches(self, rows):
        yield from self.iterable


# ---------------------------------------------------------------------- dispatch
def _is_array(v) -> bool:
    return isinstance(v, torch.Tensor) or (
        hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (str, bytes))
    )


def _is_batch(v) -> bool:
    """A batch ``(x, y)`` of arrays, or a token mapping: an item of an iterable of batches."""
    if isinstance(v, Mapping):
        return True
    return isinstance(v, (tuple, list)) and len(v) == 2 and _is_array(v[0])


def is_pair(data) -> bool:
    """``data=(x, y)``: two arrays or nested lists (not a list of two batches)."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and not all(_is_batch(v) for v in data)
        and not any(isinstance(v, (Mapping, str, bytes)) for v in data)
        and not any(_map_style(v) or _is_loader(v) for v in data)
    )


def _is_loader(v) -> bool:
    from torch.utils.data import DataLoader

    return isinstance(v, DataLoader)


def is_token_mapping(data) -> bool:
    return isinstance(data, Mapping) and "input_ids" in data


def _pair_of(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        keys = sorted(map(str, batch))
        raise TypeError(
            f"data=: a batch is a mapping with keys {keys}, not a pair (x, y). A token batch "
            f"('input_ids', optional 'attention_mask') needs likelihood=cp.CausalLM(); "
            f"otherwise make the collate_fn return (x, y)."
        )
    n = len(batch) if isinstance(batch, (tuple, list)) else None
    what = f"a {type(batch).__name__} of length {n}" if n is not None else _describe(batch)
    raise TypeError(
        f"data=: a batch is {what}; each batch must be a pair (x, y) of tensors "
        f"[m, ...] (a DataLoader over a TensorDataset(x, y) gives them), or for a token "
        f"dataset a mapping with 'input_ids'. Fix the dataset's __getitem__ or the "
        f"loader's collate_fn to return (x, y)."
    )


def as_source(
    data, prepare: Callable, *, tokens: tuple[int, bool] | None = None
) -> DataSource | tuple:
    """The ``DataSource`` of ``data=``, or the raw pair ``(x, y)`` for in-memory data.

    ``prepare(x, y) -> (x, y)`` converts a batch (dtype, device, targets). ``tokens`` is
    ``(ignore_index, mask_in_x)`` when the likelihood is ``CausalLM`` (token batches
    allowed), else None. Returns ``(x, y)`` (unprepared) for ``data=(x, y)`` and for an
    in-memory token mapping: the declaration checks and wraps those itself.
    """
    from torch.utils.data import DataLoader

    def to_pair(batch):
        if isinstance(batch, Mapping) and "input_ids" in batch and tokens is not None:
            return tokens_to_pair(batch, *tokens)
        return _pair_of(batch)

    if _is_array(data):
        raise TypeError(
            f"data must be a pair (x, y) of tensors (or a DataLoader, a dataset, a token "
            f"mapping, an iterable of (x, y) batches); got one {_describe(data)} of shape "
            f"{tuple(data.shape)}"
        )
    if is_pair(data):
        return data[0], data[1]
    if is_token_mapping(data):
        if tokens is None:
            raise TypeError(
                "data= is a token mapping (it has 'input_ids'): it needs "
                "likelihood=cp.CausalLM(), the per-token next-token likelihood that masks "
                "padding"
            )
        ids = data["input_ids"]
        if _is_array(ids) and getattr(ids, "ndim", 1) == 2:  # the whole set in memory
            return tokens_to_pair(data, *tokens)
        raise TypeError(
            "data=: a token mapping must hold input_ids as one [n, T] tensor (and "
            "attention_mask [n, T]); for rows of different lengths pad them, or pass a "
            "Dataset whose items are {'input_ids': [T], 'attention_mask': [T]}"
        )
    if isinstance(data, DataLoader):
        ds = data.dataset
        if _map_style(ds):
            return MapRows(ds, data.collate_fn, prepare, to_pair, loader=data)
        return Batches(data, prepare, to_pair)
    if _map_style(data):
        return MapRows(data, _stack_rows, prepare, to_pair)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        if iter(data) is data:
            raise TypeError(
                f"data= is a one-shot iterator ({_describe(data)}, e.g. a generator): condpost "
                f"passes over the data more than once (L_n(w*), every full-data loss). Pass a "
                f"re-iterable: a list of (x, y) batches, a DataLoader, or an object whose "
                f"__iter__ returns a fresh iterator each time."
            )
        return Batches(data, prepare, to_pair)
    raise TypeError(
        f"data= must be a pair (x, y) of tensors, a torch DataLoader, a map-style dataset "
        f"(len and [i]), a token mapping/dataset with 'input_ids' (with cp.CausalLM()), or "
        f"a re-iterable of (x, y) batches; got {_describe(data)}"
    )


def _map_style(ds) -> bool:
    from torch.utils.data import IterableDataset

    if isinstance(ds, IterableDataset) or isinstance(ds, (str, bytes, Mapping)) or _is_array(ds):
        return False
    if isinstance(ds, (list, tuple)):  # a list is read as batches, not rows
        return False
    try:
        len(ds)
    except TypeError:
        return False
    return callable(getattr(ds, "__getitem__", None))
