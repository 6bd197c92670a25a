"""On-disk run store for long SG-MCMC runs: streamed draws, statistics and checkpoints.

A store is a directory (by convention named ``*.cpst``) holding

* ``meta.json`` — format tag, the posterior's configuration (with the declaration's
  fingerprint, see ``condpost.fingerprint``), the run's settings and the *identity* of
  the run (everything that determines the draws);
* ``center.npy`` — ``w*``;
* ``draws.bin`` — raw draws in draw-major layout ``[draw, chain, d]`` (so a run can be
  extended by appending), written chunk by chunk with positioned writes (no memory
  map while sampling, so the written pages do not count against the process);
* ``checkpoint.npz`` — the number of completed draws, the sampler state (weights,
  momenta, preconditioner, per-chain random-generator states, step counter), the
  per-draw statistics and a table of the chunks written to ``draws.bin`` with the
  CRC32 of each (start, count, crc);
* ``writer.lock`` — present while a run writes to the store (pid, host, thread).

Guarantees
----------
* **Crash safety.** ``meta.json``, ``center.npy`` and ``checkpoint.npz`` are replaced
  atomically (temporary file in the store, fsync, ``os.replace``). The checkpoint is
  written only *after* the chunk's draws are on disk, so it never refers to draws that
  were not written; draws past it are overwritten on resume. ``meta.json`` is written
  last when a store is created: a directory without it, holding only what a run killed
  during creation leaves (``center.npy``, an empty ``draws.bin``, ``*.tmp`` files, a
  stale lock), is cleaned up with a warning and the run starts afresh.
* **Exact resume.** ``resume=True`` reloads the checkpoint and continues with the same
  random streams, so the result equals an uninterrupted run with the same arguments.
* **Same declaration.** Resuming refuses a declaration whose fingerprint differs from
  the stored one (other data, likelihood, architecture, lifted weights, centre, nβ, γ
  or constraints), and so does ``open_store(path, posterior=post)``; an older store
  without a fingerprint gets a warning instead.
* **Validated metadata.** Opening or resuming checks ``meta.json`` (format tag,
  required fields, positive integer ``chains``/``d``/``draws``, a floating-point
  ``dtype``) and the checkpoint before any file is memory-mapped; errors name the file
  and the field.
* **Checksums.** Every chunk of ``draws.bin`` has a CRC32 in the checkpoint, and
  opening or resuming verifies them (streamed, a few MiB at a time) and that
  ``draws.bin`` is as long as the checkpoint says: a truncated or altered file is an
  error naming the file and the draws that fail (``open_store(..., verify=False)``
  skips the CRCs for a quick look).
* **One writer.** A run holds ``writer.lock`` (created with ``O_CREAT | O_EXCL``) while
  it writes; a second writer gets ``StoreLockedError`` naming the store and the holding
  pid. A lock whose process is gone (same host) is taken over with a warning; the lock
  is released when the run finishes or fails. Readers (``open_store``) take no lock.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import socket
import threading
import uuid
import weakref
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._atomic import atomic_write
from ._errors import CondpostWarning, warn
from .fingerprint import compare

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior
    from .reference import ReferenceClass

__all__ = ["RunStore", "open_store", "StoreError", "StoreLockedError"]

_FORMAT = "condpost.RunStore/1"
_LOCK = "writer.lock"
# what a run killed while creating its store (before meta.json) can leave behind
_LEFTOVERS = ("center.npy", "draws.bin", _LOCK)
_READ_BLOCK = 8 << 20  # bytes per read when verifying checksums
_FRESH_LOCK_S = 10.0  # an empty lock file younger than this is a writer starting up


class StoreError(ValueError):
    """A run store's files are missing, damaged or inconsistent."""


class StoreLockedError(RuntimeError):
    """Another live writer holds the run store."""


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


# ---------------------------------------------------------------------------------------
# the writer lock
# ---------------------------------------------------------------------------------------


def _read_lock(lock_path: Path) -> tuple[bytes, dict | None] | None:
    """(raw bytes, parsed holder or None if unparseable), or None when there is no lock."""
    try:
        raw = lock_path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw.decode())
        if not isinstance(info, dict):
            info = None
    except ValueError:
        info = None
    return raw, info


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:  # pragma: no cover
        return True
    return True


def _holder_words(info: dict | None) -> str:
    if info is None:
        return "an unknown writer (the lock file is empty or unreadable)"
    return (
        f"pid {info.get('pid')!r} on host {info.get('host')!r} (since {info.get('started', '?')})"
    )


def _lock_state(lock_path: Path, raw: bytes, info: dict | None) -> str:
    """'live', 'stale' (its process is gone) or 'ours' (left by this very thread/process)."""
    if info is None:
        try:
            age = _dt.datetime.now().timestamp() - lock_path.stat().st_mtime
        except FileNotFoundError:
            return "stale"
        return "live" if age < _FRESH_LOCK_S else "stale"
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return "stale"
    if host != socket.gethostname():
        return "live"  # cannot check a process on another machine
    if pid == os.getpid():
        thread = info.get("thread")
        if thread != threading.get_ident() and thread in {t.ident for t in threading.enumerate()}:
            return "live"  # another thread of this process is writing
        return "ours"  # an earlier run of this thread (or of a finished thread) failed
    return "live" if _pid_alive(pid) else "stale"


def _steal(lock_path: Path, raw: bytes) -> bool:
    """Remove a stale lock whose content is ``raw``; False if it changed meanwhile."""
    grab = lock_path.with_name(f"{_LOCK}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.rename(lock_path, grab)
    except FileNotFoundError:
        return False
    try:
        if grab.read_bytes() == raw:
            return True
        # another writer replaced the stale lock between our read and the rename: give
        # its lock back (os.link fails if yet another lock appeared meanwhile)
        try:
            os.link(grab, lock_path)
        except OSError:  # pragma: no cover
            pass
        return False
    finally:
        grab.unlink(missing_ok=True)


def _release(lock_path: Path, token: str, pid: int) -> None:
    if os.getpid() != pid:  # a forked child never releases its parent's lock
        return
    got = _read_lock(lock_path)
    if got is not None and got[1] is not None and got[1].get("token") == token:
        try:
            lock_path.unlink()
        except FileNotFoundError:  # pragma: no cover
            pass


class _Lock:
    """A held ``writer.lock``; released by ``release()``, at garbage collection or exit."""

    def __init__(self, lock_path: Path, token: str):
        self.path = lock_path
        self.token = token
        self._finalizer = weakref.finalize(self, _release, lock_path, token, os.getpid())

    def held(self) -> bool:
        got = _read_lock(self.path)
        return (
            self._finalizer.alive
            and got is not None
            and got[1] is not None
            and got[1].get("token") == self.token
        )

    def release(self) -> None:
        self._finalizer()

    @classmethod
    def acquire(cls, store: Path) -> tuple[_Lock, dict | None]:
        """Take the store's writer lock: (the lock, the stale holder taken over or None)."""
        lock_path = store / _LOCK
        stale = None
        for _ in range(5):
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                got = _read_lock(lock_path)
                if got is None:
                    continue  # released meanwhile
                raw, info = got
                state = _lock_state(lock_path, raw, info)
                if state == "live":
                    pid = info.get("pid") if info else None
                    raise StoreLockedError(
                        f"store {str(store)!r} is being written by another run: its lock "
                        f"{str(lock_path)!r} is held by {_holder_words(info)}. Only one run may "
                        f"write to a store; wait for it to finish, or read it meanwhile with "
                        f"condpost.open_store. If that process is gone (pid {pid} on another "
                        f"host, or a crash), delete the lock file."
                    ) from None
                if _steal(lock_path, raw):
                    stale = {"state": state, **(info or {})} if state == "stale" else stale
                continue
            token = uuid.uuid4().hex
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "thread": threading.get_ident(),
                "token": token,
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            try:
                os.write(fd, json.dumps(info).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return cls(lock_path, token), stale
        raise StoreLockedError(  # pragma: no cover
            f"store {str(store)!r}: could not take its lock {str(lock_path)!r}; other writers "
            f"keep contending for it"
        )


def _stale_words(stale: dict) -> str:
    if stale.get("pid") is None:
        return "an unreadable stale lock"
    return (
        f"the stale lock of pid {stale.get('pid')} (host {stale.get('host')!r}, no longer running)"
    )


# ---------------------------------------------------------------------------------------
# reading and validating the files
# ---------------------------------------------------------------------------------------


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


_REQUIRED = {
    "format": str,
    "identity": dict,
    "settings": dict,
    "config": dict,
    "chains": int,
    "d": int,
    "draws": int,
    "dtype": str,
    "keep_draws": bool,
    "complete": bool,
}


def _read_meta(path: Path) -> dict:
    """``meta.json``, validated (raises StoreError naming the file and the bad field)."""
    mp = path / "meta.json"
    try:
        text = mp.read_text(encoding="utf-8")
    except OSError as e:
        raise StoreError(f"{mp}: cannot read the store's metadata ({e})") from e
    except UnicodeDecodeError as e:
        raise StoreError(f"{mp}: damaged (not UTF-8 text: {e})") from e
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise StoreError(f"{mp}: damaged (not valid JSON: {e})") from e
    if not isinstance(meta, dict):
        raise StoreError(f"{mp}: damaged (holds a {type(meta).__name__}, not a JSON object)")
    if meta.get("format") != _FORMAT:
        raise StoreError(
            f"{mp}: unknown store format {meta.get('format')!r} (expected {_FORMAT!r})"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise StoreError(f"{mp}: damaged, missing field(s) {missing}")
    for k, typ in _REQUIRED.items():
        v = meta[k]
        if typ is int:
            if not _positive_int(v):
                raise StoreError(f"{mp}: field {k!r} is {v!r}; it must be a positive integer")
        elif not isinstance(v, typ):
            raise StoreError(
                f"{mp}: field {k!r} is {v!r}; it must be a {typ.__name__}"
                + (" (e.g. 'float64')" if k == "dtype" else "")
            )
    try:
        dt = np.dtype(meta["dtype"])
    except (TypeError, ValueError) as e:
        raise StoreError(f"{mp}: field 'dtype' is {meta['dtype']!r}, not a NumPy dtype") from e
    if dt.kind != "f":
        raise StoreError(
            f"{mp}: field 'dtype' is {meta['dtype']!r} (NumPy kind {dt.kind!r}); a run store "
            f"holds floating-point draws (float16/float32/float64). The file is damaged or "
            f"was not written by condpost; refusing to map draws.bin with this dtype."
        )
    return meta


def _row_bytes(meta: dict) -> int:
    return int(meta["chains"]) * int(meta["d"]) * np.dtype(meta["dtype"]).itemsize


def _read_center(path: Path, meta: dict) -> np.ndarray:
    cp = path / "center.npy"
    try:
        with open(cp, "rb") as fh:
            center = np.load(fh, allow_pickle=False)
    except Exception as e:
        raise StoreError(f"{cp}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(center, np.ndarray):
        raise StoreError(f"{cp}: not a NumPy .npy array")
    if center.shape != (meta["d"],) or center.dtype != np.dtype(meta["dtype"]):
        raise StoreError(
            f"{cp}: holds a {center.dtype} array of shape {center.shape}; meta.json says "
            f"({meta['d']},) {meta['dtype']}"
        )
    return center


def _read_checkpoint(path: Path, meta: dict, *, for_resume: bool) -> dict | None:
    """``checkpoint.npz`` as a dict of arrays, validated; None when there is none yet."""
    ck = path / "checkpoint.npz"
    if not ck.exists():
        return None
    try:
        # read the bytes first: no file handle can outlive a failed parse
        with np.load(io.BytesIO(ck.read_bytes()), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise StoreError(
            f"{ck}: unreadable ({type(e).__name__}: {e}); the checkpoint is damaged"
        ) from e

    def bad(what: str) -> StoreError:
        return StoreError(f"{ck}: damaged checkpoint: {what}")

    required = ["done", "step", "wall"]
    missing = [k for k in required if k not in arrays]
    if for_resume and "state:w" not in arrays and "w" not in arrays:
        missing.append("state:w")
    if missing:
        raise bad(f"missing entries {missing}")
    for k in ("done", "step", "wall", "adapt_steps", "adapting"):
        if k in arrays and arrays[k].shape != ():
            raise bad(f"{k!r} has shape {arrays[k].shape}, expected a scalar")
    done = arrays["done"]
    if done.dtype.kind not in "iu" or not 0 <= int(done) <= int(meta["draws"]):
        raise bad(f"'done' is {done!r}; expected an integer in [0, {meta['draws']}]")
    C, d = int(meta["chains"]), int(meta["d"])
    for k in ("w", "state:w"):
        if k in arrays and arrays[k].shape != (C, d):
            raise bad(f"{k!r} has shape {arrays[k].shape}, expected ({C}, {d})")
    for k, v in arrays.items():
        if k.startswith("stat:") and (v.ndim != 2 or v.shape[0] != C):
            raise bad(f"{k!r} has shape {v.shape}, expected ({C}, ·)")
    if "chunks" in arrays:
        ch = arrays["chunks"]
        if ch.ndim != 2 or ch.shape[1] != 3 or ch.dtype.kind not in "iu":
            raise bad(f"'chunks' has shape {ch.shape} and dtype {ch.dtype}, expected (k, 3) ints")
    return arrays


def _verify_draws(path: Path, meta: dict, done: int, chunks, *, crc: bool = True) -> None:
    """Check that draws.bin holds ``done`` draws and that each chunk's CRC32 matches."""
    if not meta["keep_draws"]:
        return
    f = path / "draws.bin"
    ck = path / "checkpoint.npz"
    row = _row_bytes(meta)
    try:
        size = f.stat().st_size
    except OSError as e:
        raise StoreError(f"{f}: missing or unreadable ({e})") from e
    if size < done * row:
        raise StoreError(
            f"{f}: truncated: it holds {size} bytes ({size // row} whole draws of "
            f"{meta['chains']} chains × d={meta['d']} {meta['dtype']}), but {ck.name} records "
            f"{done} draws ({done * row} bytes)"
        )
    if chunks is None or not crc:
        return
    expect = 0
    for start, count, _ in chunks:
        if start != expect or count <= 0:
            raise StoreError(
                f"{ck}: damaged checkpoint: its chunk table does not cover draws 0..{done - 1} "
                f"contiguously (chunk at {start} of {count} draws, expected one at {expect})"
            )
        expect += count
    if expect != done:
        raise StoreError(
            f"{ck}: damaged checkpoint: its chunk table covers {expect} draws but 'done' is {done}"
        )
    buf = bytearray(min(_READ_BLOCK, max(row, 1) * max(done, 1)))
    view = memoryview(buf)
    try:
        with open(f, "rb") as fh:
            for start, count, want in chunks:
                fh.seek(start * row)
                left, c = count * row, 0
                while left:
                    n = fh.readinto(view[: min(len(buf), left)])
                    if not n:
                        raise StoreError(f"{f}: truncated while reading draws {start}..")
                    c = zlib.crc32(view[:n], c)
                    left -= n
                if c != want:
                    raise StoreError(
                        f"{f}: draws {start}..{start + count - 1} fail their CRC32 check "
                        f"(recorded {want:08x}, read {c:08x}): the file changed after it was "
                        f"written (disk or copy error, or another program wrote to it)"
                    )
    except OSError as e:
        raise StoreError(f"{f}: unreadable ({e})") from e


def _crc_of(path: Path, meta: dict, done: int) -> int:
    row, c = _row_bytes(meta), 0
    with open(path / "draws.bin", "rb") as fh:
        left = done * row
        while left:
            b = fh.read(min(_READ_BLOCK, left))
            if not b:
                raise StoreError(f"{path / 'draws.bin'}: truncated")
            c = zlib.crc32(b, c)
            left -= len(b)
    return c


def _chunk_list(ckpt: dict | None) -> list[tuple[int, int, int]] | None:
    if ckpt is None:
        return []
    if "chunks" not in ckpt:
        return None  # written before checksums
    return [(int(a), int(b), int(c)) for a, b, c in ckpt["chunks"].tolist()]


def _warn_no_checksums(path: Path) -> None:
    warn(
        f"{path / 'checkpoint.npz'} records no checksums for draws.bin (written by an older "
        f"condpost); its draws cannot be verified",
        CondpostWarning,
    )


def _leftovers(path: Path) -> list[str]:
    """Files of a store killed before meta.json; raises if the directory holds others."""
    if not path.is_dir():
        raise FileExistsError(f"{str(path)!r} exists and is not a directory (a run store)")
    names, others = [], []
    for p in sorted(path.iterdir()):
        leftover = (
            p.is_file()
            and (p.name in _LEFTOVERS or p.name.endswith(".tmp"))
            and not (p.name == "draws.bin" and p.stat().st_size > 0)
        )
        (names if leftover else others).append(p.name)
    if others:
        raise FileNotFoundError(
            f"{str(path)!r} is not a condpost run store (no meta.json) and holds other files "
            f"({others[:5]}{'…' if len(others) > 5 else ''}); choose another store path"
        )
    return names


def _check_declaration(stored_config, post: LocalPosterior, where: str, remedy: str) -> None:
    """Refuse ``post`` when its fingerprint differs from the stored one (see module doc)."""
    stored = stored_config.get("fingerprint") if isinstance(stored_config, dict) else None
    current = post.fingerprint()
    if not stored:
        warn(
            f"{where} was written without a declaration fingerprint (by an older condpost): "
            f"condpost cannot check that this declaration is the one that produced it",
            CondpostWarning,
        )
        return
    if not isinstance(stored, dict) or stored.get("version") != current.get("version"):
        warn(
            f"{where} holds a declaration fingerprint of another version "
            f"({stored.get('version') if isinstance(stored, dict) else stored!r}, now "
            f"{current.get('version')!r}): condpost cannot check that this declaration is the "
            f"one that produced it",
            CondpostWarning,
        )
        return
    diffs = compare(stored, current)
    if diffs:
        raise ValueError(
            f"{where} was produced by another declaration; differences: {'; '.join(diffs)}. "
            f"{remedy}"
        )


# ---------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------


class RunStore:
    """A run directory being written (see the module docstring). Built by ``open``.

    Holds the store's writer lock until ``finish`` or ``close`` (also a context manager).
    """

    def __init__(
        self,
        path: Path,
        meta: dict,
        stats: dict,
        done: int,
        step: int,
        wall: float,
        chunks: list | None = None,
        lock: _Lock | None = None,
    ):
        self.path = path
        self.meta = meta
        self.stats = stats
        self.done_draws = done
        self.state_step = step
        self.previous_wall = wall
        self.chunks: list[tuple[int, int, int]] = list(chunks or [])
        self._lock = lock
        self._ckpt: dict | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path,
        *,
        post: LocalPosterior,
        identity: dict,
        settings: dict,
        chains: int,
        draws: int,
        keep_draws: bool,
        stat_shapes: dict[str, int],
        resume: bool,
    ) -> RunStore:
        path = Path(path)
        meta_path = path / "meta.json"
        ident = json.loads(json.dumps(identity, default=_json_default))
        if meta_path.exists() and not resume:
            raise FileExistsError(
                f"store={str(path)!r} already holds a run. Pass resume=True to continue it, or "
                f"choose a new path (or delete the directory) to start afresh; condpost never "
                f"silently reuses or overwrites stored draws."
            )
        if path.exists() and not meta_path.exists():
            _leftovers(path)  # refuse a foreign directory before writing a lock into it
        path.mkdir(parents=True, exist_ok=True)
        lock, stale = _Lock.acquire(path)
        try:
            if meta_path.exists():  # checked again under the lock
                if not resume:
                    raise FileExistsError(
                        f"store={str(path)!r} already holds a run (written while this one "
                        f"started). Pass resume=True to continue it, or choose a new path."
                    )
                if stale is not None:
                    warn(f"{path}: took over {_stale_words(stale)}", CondpostWarning)
                store = cls._resume(
                    path, post, ident, settings, chains, draws, keep_draws, stat_shapes
                )
            else:
                left = [n for n in _leftovers(path) if n != _LOCK]
                for n in left:
                    (path / n).unlink(missing_ok=True)
                if left or stale is not None:
                    what = ", ".join(left + ([_stale_words(stale)] if stale else []))
                    warn(
                        f"{path}: removed the leftovers of a run killed before it wrote "
                        f"meta.json ({what}); starting the run afresh"
                        if left
                        else f"{path}: took over {_stale_words(stale)}",
                        CondpostWarning,
                    )
                store = cls._create(path, post, ident, settings, chains, draws, keep_draws)
                store.stats = {k: np.zeros((chains, m)) for k, m in stat_shapes.items()}
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        return store

    @classmethod
    def _create(cls, path, post, ident, settings, chains, draws, keep_draws) -> RunStore:
        center = post.center.cpu().numpy()
        meta = {
            "format": _FORMAT,
            "identity": ident,
            "settings": json.loads(json.dumps(settings, default=_json_default)),
            "config": json.loads(json.dumps(post.config(), default=_json_default)),
            "chains": chains,
            "d": post.d,
            "draws": draws,
            "dtype": str(center.dtype),
            "keep_draws": bool(keep_draws),
            "complete": False,
        }
        atomic_write(path / "center.npy", lambda fh: np.save(fh, center))
        with open(path / "draws.bin", "wb") as fh:
            os.fsync(fh.fileno())
        # meta.json last: its presence means the store is complete
        atomic_write(path / "meta.json", lambda fh: fh.write(json.dumps(meta).encode()))
        return cls(path, meta, {}, 0, 0, 0.0)

    @classmethod
    def _resume(
        cls, path, post, ident, settings, chains, draws, keep_draws, stat_shapes
    ) -> RunStore:
        meta = _read_meta(path)
        _check_declaration(
            meta["config"],
            post,
            f"resume=True: the store {str(path)!r}",
            "Continuing it would mix draws of two different posteriors (a resume with a "
            "changed Gaussian scale once gave λ̂ = −14.0 against 1.52 fresh). Resume with the "
            "original declaration, or sample this one into a new store path.",
        )
        old = meta["identity"]
        diff = {
            k: (old.get(k), ident.get(k))
            for k in set(old) | set(ident)
            if old.get(k) != ident.get(k)
        }
        if diff:
            rows = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(
                f"resume=True: the arguments differ from the stored run, so the draws would "
                f"not continue the same chains ({rows}). Use the original arguments (only "
                f"draws may grow), or a new store path."
            )
        if meta["chains"] != chains or meta["d"] != post.d or meta["keep_draws"] != keep_draws:
            raise StoreError(
                f"{path / 'meta.json'}: chains={meta['chains']}, d={meta['d']}, keep_draws="
                f"{meta['keep_draws']} disagree with its own identity record; the file is damaged"
            )
        center = _read_center(path, meta)
        if not np.array_equal(center, post.center.cpu().numpy()):
            raise ValueError(
                "resume=True: the posterior's centre w* differs from the stored run's; "
                "resume with the same network and data"
            )
        done, step, wall = 0, 0, 0.0
        stats = {k: np.zeros((chains, m)) for k, m in stat_shapes.items()}
        ckpt = _read_checkpoint(path, meta, for_resume=True)
        if ckpt is not None:
            done = int(ckpt["done"])
            if done > draws:
                raise ValueError(
                    f"resume=True with draws={draws}, but the store already holds {done} "
                    f"draws per chain; pass draws ≥ {done}"
                )
            step, wall = int(ckpt["step"]), float(ckpt["wall"])
            for key in ckpt:
                if key.startswith("stat:") and key[5:] not in stats:
                    # a statistic the sampler found at run time (``sampler/<name>``): per draw
                    stats[key[5:]] = np.zeros((chains, draws))
            for k, m in ((k, v.shape[1]) for k, v in stats.items()):
                old_arr = ckpt.get(f"stat:{k}")
                if old_arr is not None:
                    k_copy = min(m, old_arr.shape[1])
                    stats[k][:, :k_copy] = old_arr[:, :k_copy]
        chunks = _chunk_list(ckpt)
        _verify_draws(path, meta, done, chunks)
        if chunks is None:  # an older store: checksum what is there from now on
            _warn_no_checksums(path)
            chunks = [(0, done, _crc_of(path, meta, done))] if keep_draws and done else []
        meta["settings"] = json.loads(json.dumps(settings, default=_json_default))
        meta["draws"] = draws
        meta["complete"] = False
        store = cls(path, meta, stats, done, step, wall, chunks)
        store._ckpt = ckpt
        atomic_write(path / "meta.json", lambda fh: fh.write(json.dumps(meta).encode()))
        return store

    # ------------------------------------------------------------------ lock
    def close(self) -> None:
        """Release the writer lock (idempotent). The store stays as last checkpointed."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_lock(self) -> None:
        if self._lock is None or not self._lock.held():
            raise StoreLockedError(
                f"store {str(self.path)!r}: this writer no longer holds its lock (it was closed, "
                f"or another run took the store over); not writing"
            )

    # ------------------------------------------------------------------ state
    def load_state(self) -> dict[str, np.ndarray] | None:
        """The sampler state saved with the last checkpoint, as named NumPy arrays (one
        per field of the kernel's state; the driver restores them onto a fresh state of
        the same kernel); None if there is none. The store does not import the sampler."""
        ck = self._ckpt
        if ck is None:
            return None
        saved = {k[6:]: v for k, v in ck.items() if k.startswith("state:")}
        if not saved:  # a checkpoint written before the generic state format
            legacy = ("w", "rng", "momentum", "sq_avg", "adapt_steps", "adapting")
            saved = {k: ck[k] for k in (*legacy, "thermostat", "batch_keys", "step") if k in ck}
        return saved

    # ------------------------------------------------------------------ writing
    def write_chunk(
        self,
        start: int,
        pending: list[np.ndarray],
        state: dict[str, np.ndarray] | None,
        done: int,
        step: int = 0,
    ) -> None:
        """Append draws ``start .. done−1`` (``pending``: one ``[C, d]`` array per draw),
        then atomically replace the checkpoint (``state``: the sampler state as named
        arrays, ``step``: the steps taken, the statistics and the chunk table with this
        chunk's CRC32, up to ``done``)."""
        self._check_lock()
        if pending:
            block = np.ascontiguousarray(np.stack(pending))  # [k, C, d]
            with open(self.path / "draws.bin", "r+b") as fh:
                fh.seek(start * block[0].nbytes)
                fh.write(memoryview(block).cast("B"))
                fh.flush()
                os.fsync(fh.fileno())
            self.chunks = [c for c in self.chunks if c[0] < start]
            self.chunks.append((start, len(pending), zlib.crc32(memoryview(block).cast("B"))))
        arrays = {
            "done": np.array(done),
            "step": np.array(int(step)),
            "wall": np.array(self.previous_wall),
            "chunks": np.array(self.chunks, dtype=np.int64).reshape(-1, 3),
        }
        for k, v in (state or {}).items():
            arrays[f"state:{k}"] = v
        for k, v in self.stats.items():
            arrays[f"stat:{k}"] = v
        atomic_write(self.path / "checkpoint.npz", lambda fh: np.savez(fh, **arrays))
        self.done_draws = done

    def finish(self, settings: dict) -> None:
        """Mark the run complete and release the writer lock."""
        try:
            self._check_lock()
            self.meta["settings"] = json.loads(json.dumps(settings, default=_json_default))
            self.meta["complete"] = True
            atomic_write(
                self.path / "meta.json", lambda fh: fh.write(json.dumps(self.meta).encode())
            )
        finally:
            self.close()

    def draws_view(self) -> np.ndarray:
        """Read-only memory map of the stored draws as ``[chain, draw, d]``."""
        return _draws_memmap(self.path, self.meta, self.done_draws)


def _draws_memmap(path: Path, meta: dict, done: int) -> np.ndarray | None:
    if not meta.get("keep_draws", True):
        return None
    C, d = int(meta["chains"]), int(meta["d"])
    dt = np.dtype(meta["dtype"])
    if dt.kind != "f":  # never map raw bytes as anything but floats (see _read_meta)
        raise StoreError(f"{path / 'meta.json'}: field 'dtype' is {meta['dtype']!r}")
    if done == 0:
        return np.zeros((C, 0, d), dtype=dt)
    mm = np.memmap(path / "draws.bin", dtype=dt, mode="r", shape=(done, C, d))
    return mm.transpose(1, 0, 2)


def open_store(
    path, *, posterior: LocalPosterior | None = None, verify: bool = True
) -> ReferenceClass:
    """Open a run store (complete, or interrupted: then the draws up to its checkpoint)
    as a file-backed ``ReferenceClass``.

    Pass ``posterior`` to enable analyses that need the network (activations,
    predictions); it must be the declaration that produced the run (its fingerprint is
    checked). The metadata and checkpoint are validated, and the CRC32 of every chunk
    of ``draws.bin`` is verified (one streamed pass; ``verify=False`` skips it, the
    length of ``draws.bin`` is still checked). Reading takes no lock: a store can be
    opened while its run is still writing.
    """
    from .reference import ReferenceClass

    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{str(path)!r} is not a condpost run store (no meta.json)")
    meta = _read_meta(path)
    ckpt = _read_checkpoint(path, meta, for_resume=False)
    if ckpt is None:
        raise StoreError(f"{path}: the run wrote no checkpoint yet (no draws to read)")
    done = int(ckpt["done"])
    chunks = _chunk_list(ckpt)
    if chunks is None and meta["keep_draws"] and done:
        _warn_no_checksums(path)
    _verify_draws(path, meta, done, chunks, crc=verify)
    stats = {k[len("stat:") :]: v for k, v in ckpt.items() if k.startswith("stat:")}
    stats = _trim_stats(stats, done, meta["settings"], int(meta["chains"]))
    settings = dict(meta["settings"])
    if not meta.get("complete", False):
        settings["interrupted_at_draw"] = done
    ref = ReferenceClass(
        draws=_draws_memmap(path, meta, done),
        stats=stats,
        center=_read_center(path, meta),
        config=meta["config"],
        settings=settings,
    )
    ref.store = str(path)
    from .infer.record import open_records

    ref.records = open_records(path, settings, int(meta["chains"]), done)
    if posterior is not None:
        ref.attach(posterior)
    return ref


def _trim_stats(stats: dict, done: int, settings: dict, chains: int) -> dict:
    """Cut statistics to the draws actually completed (an interrupted run)."""
    out = {}
    le = int(settings.get("loss_every") or 1)
    fe = settings.get("full_loss_every")
    for k, v in stats.items():
        if k == "loss":
            out[k] = v[:, : -(-done // le)]
        elif k == "loss_full" and fe:
            out[k] = v[:, : -(-done // int(fe))]
        else:
            out[k] = v[:, :done]
    out.setdefault("sampler/diverging", np.zeros((chains, done), bool))
    return out
