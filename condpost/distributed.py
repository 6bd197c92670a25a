"""SG-MCMC chain groups across processes, GPUs and machines (``torch.distributed``).

``sample(post, method, chains=C, ...)`` is called by every process of a run launched
with ``torchrun`` (or ``srun`` setting ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT``). Process ``r`` of ``W`` runs the contiguous slice of chains
``chain_slice(C, W, r)`` with the SG-MCMC runner's ``chain_ids=`` option, on
``cuda:LOCAL_RANK`` when GPUs are visible, and writes its own run store
``<store>/rank{r:03d}``. When every rank is done, rank 0 merges the rank stores into
one ``ReferenceClass`` (chains in global order) and returns it; the other ranks return
None. Chain ``c`` is seeded from ``(seed, c)`` alone and draws its minibatches from its
own stream, so its draws do not depend on how many processes ran (docs/distributed.md
says when they agree bit for bit).

``merge_stores`` merges rank stores after the fact (a run whose rank 0 died, stores
copied from machines without a shared file system). ``init_jax`` joins a process to a
multi-process JAX run, over which ChEES shards its chains. Only ``init_jax`` imports jax.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._errors import CondpostWarning, SamplerWarning, warn

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable, Sequence

    from .posterior import LocalPosterior
    from .reference import ReferenceClass

__all__ = [
    "Context",
    "context",
    "chain_slice",
    "local_device",
    "on_device",
    "rank_store",
    "sample",
    "merge_stores",
    "init_jax",
    "MANIFEST",
]

#: the file, in a distributed run's store directory, that describes the run
MANIFEST = "distributed.json"
_FORMAT = "condpost.distributed/1"
#: the methods whose runner takes ``chain_ids=`` (one random stream per chain)
METHODS = ("sgld", "rmsprop_sgld", "sghmc", "sgnht")
# settings that legitimately differ between the rank stores of one run
_PER_RANK = ("chains", "chain_ids")


class Context:
    """Where this process stands in a launch: ``rank``, ``world_size``, ``local_rank``
    (its index on its machine) and ``initialized`` (a ``torch.distributed`` process
    group exists)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, initialized: bool):
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_rank, self.initialized = int(local_rank), bool(initialized)

    def __repr__(self) -> str:
        return (
            f"Context(rank={self.rank}, world_size={self.world_size}, "
            f"local_rank={self.local_rank}, initialized={self.initialized})"
        )


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise ValueError(f"environment variable {n}={v!r} is not an integer") from None
    return None


def context() -> Context:
    """This process's rank, world size and local rank.

    From the process group when one is initialized, else from ``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK`` (set by ``torchrun``), else from ``SLURM_PROCID``/``SLURM_NTASKS``/
    ``SLURM_LOCALID`` (set by ``srun``); a plain ``python script.py`` is rank 0 of 1.
    """
    import torch.distributed as dist

    local = _env_int("LOCAL_RANK", "SLURM_LOCALID")
    if dist.is_available() and dist.is_initialized():
        r, w = dist.get_rank(), dist.get_world_size()
        return Context(r, w, r if local is None else local, True)
    r = _env_int("RANK", "SLURM_PROCID")
    w = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    r, w = (0 if r is None else r), (1 if w is None else w)
    if w < 1 or not 0 <= r < w:
        raise ValueError(
            f"the launcher set rank {r} of world size {w}; a rank must lie in [0, world size). "
            f"Launch with torchrun (it sets RANK, WORLD_SIZE and LOCAL_RANK), or set them so."
        )
    return Context(r, w, r if local is None else local, False)


def chain_slice(chains: int, world_size: int, rank: int) -> list[int]:
    """The chains rank ``rank`` of ``world_size`` runs: a contiguous slice, the first
    ``chains % world_size`` ranks one chain more than the others."""
    for name, v, lo in (("chains", chains, 1), ("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(v, bool) or int(v) != v or v < lo:
            raise ValueError(f"{name} must be an integer ≥ {lo}; got {v!r}")
    chains, world_size, rank = int(chains), int(world_size), int(rank)
    if world_size > chains:
        raise ValueError(
            f"world size {world_size} > chains={chains}: every process needs at least one "
            f"chain. Pass chains ≥ {world_size} (≥ {2 * world_size} keeps every rank "
            f"vectorized), or launch fewer processes (torchrun --nproc_per_node)."
        )
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not below world_size={world_size}")
    base, extra = divmod(chains, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def local_device(local_rank: int | None = None) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA GPUs are visible, else the CPU.

    Raises when more processes run on this machine than it has GPUs (two processes on
    one GPU would contend for it; launch ``--nproc_per_node`` ≤ the GPU count, or
    ``--nproc_per_node=gpu``)."""
    if local_rank is None:
        local_rank = context().local_rank
    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ValueError(
            f"local rank {local_rank} has no GPU of its own: this machine shows {n} CUDA "
            f"device(s). Launch at most {n} processes per node (torchrun --nproc_per_node={n} "
            f"or --nproc_per_node=gpu), or pass device='cpu'."
        )
    return torch.device("cuda", local_rank)


def rank_store(store, rank: int) -> Path:
    """The run store of rank ``rank`` in the distributed run directory ``store``."""
    return Path(store) / f"rank{int(rank):03d}"


# ---------------------------------------------------------------------------------------
# placing a declaration on a device
# ---------------------------------------------------------------------------------------


def _same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    return (a.index or 0) == (b.index or 0)


def on_device(post: LocalPosterior, device) -> LocalPosterior:
    """``post`` on ``device``: itself when it is there already, else the same declaration
    re-made from a copy of its network moved there (data, centre, likelihood, nβ, γ,
    include/exclude and constraints kept; the fingerprint is the same)."""
    import copy
    import warnings

    from .posterior import _REDECLARING, LocalPosterior

    device = torch.device(device)
    if _same_device(post.device, device):
        return post
    if not isinstance(getattr(post, "x", None), torch.Tensor):
        raise TypeError(
            f"on_device: this declaration's data are not in-memory tensors, so it cannot be "
            f"moved to {device}; pass a function device -> LocalPosterior that builds it "
            f"there (condpost.distributed.sample(lambda device: ..., ...)), or device=None"
        )
    net = copy.deepcopy(post.lifted.net).to(device)
    _REDECLARING.append(True)  # the network's checks already ran for this declaration
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-floating parameter")
            new = LocalPosterior(
                net,
                (post.x.to(device), post.y.to(device)),
                post.likelihood,
                nbeta=post.nbeta_spec,
                localization=post.localization,
                include=post.include,
                exclude=post.exclude,
                dtype=post.dtype,
                center=post.lifted.center.to(device),
                check_center=False,
            )
    finally:
        _REDECLARING.pop()
    for c in post._specs:
        new.preserve(c)
    new.center_check = dict(post.center_check)
    new.calibration = dict(post.calibration)
    return new


# ---------------------------------------------------------------------------------------
# collectives (no-ops in a single process)
# ---------------------------------------------------------------------------------------


def _gather(obj, ctx: Context) -> list:
    if ctx.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj, ctx: Context):
    if ctx.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _init_group(ctx: Context, device: torch.device, timeout) -> Context:
    """Initialize the default process group when the launch has several processes and
    none exists yet (NCCL for CUDA devices, gloo otherwise)."""
    if ctx.world_size == 1 or ctx.initialized:
        return ctx
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover
        raise RuntimeError("this torch build has no torch.distributed; run one process")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(
            f"world size {ctx.world_size} but {missing} not set: the processes cannot find "
            f"each other. Launch with torchrun (it sets them), or under SLURM export "
            f"MASTER_ADDR=<first node's hostname> and MASTER_PORT=<free port> (docs/distributed.md)."
        )
    if not isinstance(timeout, _dt.timedelta):
        timeout = _dt.timedelta(seconds=float(timeout))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw: dict[str, Any] = {}
    if device.type == "cuda":
        kw["device_id"] = device
    dist.init_process_group(
        backend, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout, **kw
    )
    return Context(ctx.rank, ctx.world_size, ctx.local_rank, True)


# ---------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------


def _check_store_dir(path: Path, resume: bool) -> dict | None:
    """The manifest of an existing run directory (resume), or None for a fresh one."""
    if (path / "meta.json").exists():
        raise FileExistsError(
            f"store={str(path)!r} is a single-process run store, not a distributed run "
            f"directory; choose a new path (each rank writes <store>/rankNNN under it)"
        )
    man = path / MANIFEST
    if man.exists():
        if not resume:
            raise FileExistsError(
                f"store={str(path)!r} already holds a distributed run ({MANIFEST}). Pass "
                f"resume=True to continue it, merge it with condpost.distributed.merge_stores, "
                f"or choose a new path; condpost never overwrites stored draws."
            )
        return json.loads(man.read_text(encoding="utf-8"))
    if resume:
        raise FileNotFoundError(
            f"resume=True but store={str(path)!r} holds no distributed run (no {MANIFEST}); "
            f"pass the store directory of the interrupted run"
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"store={str(path)!r} exists and is not an empty directory; choose a new path"
        )
    return None


def sample(
    post: LocalPosterior | Callable[[torch.device], LocalPosterior],
    method: str = "sgld",
    *,
    chains: int,
    warmup: int = 1000,
    draws: int = 1000,
    seed: int = 0,
    store,
    resume: bool = False,
    device="auto",
    progress: bool | None = None,
    timeout: float | _dt.timedelta = 7 * 24 * 3600.0,
    **options,
) -> ReferenceClass | None:
    """Run ``chains`` SG-MCMC chains spread over the processes of a launch.

    Call it from every process of a ``torchrun`` launch (one process: a plain call,
    no process group). Rank ``r`` of ``W`` runs the chains ``chain_slice(chains, W, r)``
    with ``post.sample(method, chains=len(ids), chain_ids=ids, store=<store>/rankNNN,
    ...)``; then the ranks wait for each other, and rank 0 merges the rank stores.

    Parameters
    ----------
    post : LocalPosterior or callable
        The declaration, the same on every rank; or ``device -> LocalPosterior``, called
        with this rank's device (builds a large model where it runs).
    method : {"sgld", "rmsprop_sgld", "sghmc", "sgnht"}
        An SG-MCMC method: each chain has its own random streams.
    chains, warmup, draws, seed :
        As for ``LocalPosterior.sample``; ``chains`` counts all ranks' chains.
    store : str or path
        Required: a directory on a file system every rank sees (created). It holds
        ``distributed.json`` and one run store per rank, ``rank000``, ``rank001``, ...
    resume : bool
        Continue an interrupted distributed run in ``store`` (same world size and
        arguments; ``draws`` may grow).
    device : "auto", str or torch.device
        ``"auto"``: ``cuda:LOCAL_RANK`` when CUDA GPUs are visible, else the CPU; the
        declaration is moved there if it is elsewhere (``on_device``). None keeps it
        where it is.
    progress : bool, optional
        Progress bars (default: on rank 0 only).
    timeout : float (seconds) or timedelta
        How long a rank waits for the others at the end (default 7 days; only used when
        this call creates the process group, NCCL on GPUs, gloo on CPUs). A group this
        call creates is destroyed before it returns; one the caller made is left as is.
    **options :
        The method's options (``step_size=``, ``batch_size=``, ``num_threads=``,
        ``record_losses=``, ...), the same on every rank.

    Returns
    -------
    ReferenceClass or None
        On rank 0 the merged reference class (chains in global order, draws in memory;
        ``settings["distributed"]`` records the world size, each rank's chains, host,
        device and store); None on the other ranks, whose part is
        ``condpost.open_store(rank_store(store, rank))``.
    """
    from .infer.sgmcmc import _check_method

    if store is None:
        raise ValueError(
            "store= is required: every rank writes its own run store under it "
            "(store='run.dist' gives run.dist/rank000, run.dist/rank001, ...), on a file "
            "system all ranks see, so that rank 0 can merge them"
        )
    if str(method).lower() not in METHODS:
        raise ValueError(
            f"method={method!r} cannot be split over processes: condpost.distributed runs "
            f"the SG-MCMC methods {list(METHODS)}, whose chains have random streams of their "
            f"own. NUTS/HMC/MALA share one key across chains; ChEES adapts across chains "
            f"(docs/distributed.md)."
        )
    method = _check_method(method)
    for bad in ("chain_ids", "store", "chains"):
        if bad in options:  # pragma: no cover - 'store'/'chains' are named parameters
            raise TypeError(
                f"{bad}= is set by condpost.distributed.sample for each rank; do not pass it"
            )
    if isinstance(chains, bool) or int(chains) != chains or chains < 1:
        raise ValueError(f"chains must be a positive integer; got {chains!r}")
    chains = int(chains)
    ctx = context()
    ids = chain_slice(chains, ctx.world_size, ctx.rank)  # raises: world size > chains
    if device == "auto":
        dev = local_device(ctx.local_rank)
    elif device is None:
        dev = post.device if hasattr(post, "lifted") else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    made = _init_group(ctx, dev, timeout)
    try:
        return _sample_in_group(
            post, method, made, ids, dev, chains=chains, warmup=warmup, draws=draws,
            seed=seed, store=store, resume=resume, device=device, progress=progress,
            options=options,
        )  # fmt: skip
    finally:
        # a group this call created is torn down here, on every rank after the last
        # collective: a gloo group left to the interpreter's exit can abort the process
        # ("terminate called without an active exception") after all draws are written
        if made.initialized and not ctx.initialized:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _sample_in_group(
    post, method, ctx: Context, ids, dev, *, chains, warmup, draws, seed, store, resume,
    device, progress, options,
) -> ReferenceClass | None:  # fmt: skip
    root = Path(store)

    # rank 0 checks the directory and writes the manifest; every rank must see it
    # (a shared file system), which the token proves
    status: dict[str, Any] = {"ok": True}
    manifest = None
    if ctx.rank == 0:
        try:
            old = _check_store_dir(root, resume)
            slices = [chain_slice(chains, ctx.world_size, r) for r in range(ctx.world_size)]
            if old is not None and (
                old.get("world_size") != ctx.world_size or old.get("chain_ids") != slices
            ):
                raise ValueError(
                    f"resume=True: the run in {str(root)!r} ran on {old.get('world_size')} "
                    f"process(es) with chains {old.get('chain_ids')}; now {ctx.world_size} "
                    f"with {slices}. Resume with the same number of processes, or merge what "
                    f"is there with condpost.distributed.merge_stores({str(root)!r})."
                )
            manifest = {
                "format": _FORMAT,
                "token": uuid.uuid4().hex,
                "world_size": ctx.world_size,
                "chains": chains,
                "chain_ids": slices,
                "stores": [rank_store(".", r).name for r in range(ctx.world_size)],
                "method": method,
                "seed": int(seed),
                "warmup": int(warmup),
                "draws": int(draws),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            root.mkdir(parents=True, exist_ok=True)
            from ._atomic import atomic_write

            text = json.dumps(manifest, indent=1).encode()
            atomic_write(root / MANIFEST, lambda fh: fh.write(text))
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            status = {"ok": False, "error": f"{type(e).__name__}: {e}", "exc": e}
    first = _broadcast({k: v for k, v in status.items() if k != "exc"}, ctx)
    if not first["ok"]:
        if "exc" in status:
            raise status["exc"]
        raise RuntimeError(f"rank 0 could not set up the run directory: {first['error']}")
    token = _broadcast(manifest["token"] if manifest else None, ctx)
    try:
        seen = json.loads((root / MANIFEST).read_text(encoding="utf-8")).get("token")
    except OSError:
        seen = None
    sees = _gather((socket.gethostname(), seen == token), ctx)
    blind = [r for r, (_, ok) in enumerate(sees) if not ok]
    if blind:
        raise RuntimeError(
            f"store={str(root)!r} is not on a file system all ranks share: rank(s) {blind} "
            f"(host(s) {sorted({sees[r][0] for r in blind})}) do not see the {MANIFEST} rank 0 "
            f"wrote. Pass a path on a shared file system (NFS, Lustre, GPFS), or a local path "
            f"with one machine; to merge stores copied together later use merge_stores."
        )

    # every rank samples its chains into its own store
    if progress is None:
        progress = ctx.rank == 0
    mine = rank_store(root, ctx.rank)
    info: dict[str, Any] = {
        "rank": ctx.rank,
        "host": socket.gethostname(),
        "device": str(dev),
        "chain_ids": ids,
        "store": mine.name,
    }
    err: BaseException | None = None
    try:
        p = post if hasattr(post, "lifted") else post(dev)
        if device is not None:
            p = on_device(p, dev)
        if ctx.rank == 0 and len(ids) == 1 and chains > 1:
            warn(
                f"condpost.distributed: {ctx.world_size} processes for {chains} chains leave "
                f"some rank(s) one chain, which runs without vmap: its draws follow the same "
                f"law and seed but differ from a one-process run in the last bits. Use "
                f"chains ≥ 2 × processes for runs that agree bit for bit.",
                CondpostWarning,
            )
        p.sample(
            method,
            chains=len(ids),
            chain_ids=ids,
            warmup=warmup,
            draws=draws,
            seed=seed,
            store=str(mine),
            resume=resume,
            progress=progress,
            **options,
        )
        if ctx.rank == 0:
            post = p
    except Exception as e:  # noqa: BLE001 - every rank learns of it below
        err = e
        info["error"] = f"{type(e).__name__}: {e}"
    infos = _gather(info, ctx)
    failed = [i for i in infos if "error" in i]
    if failed:
        words = "; ".join(f"rank {i['rank']} ({i['host']}): {i['error']}" for i in failed)
        msg = (
            f"condpost.distributed.sample: {len(failed)} of {ctx.world_size} rank(s) failed: "
            f"{words}. The rank stores under {str(root)!r} keep their last checkpoints; "
            f"fix the cause and rerun with resume=True."
        )
        if err is not None:
            raise RuntimeError(msg) from err
        raise RuntimeError(msg)
    if ctx.rank != 0:
        return None
    ref = merge_stores(root, posterior=post if hasattr(post, "lifted") else None)
    ref.settings["distributed"]["ranks"] = infos
    return ref


# ---------------------------------------------------------------------------------------
# JAX: one global device mesh over the processes (ChEES)
# ---------------------------------------------------------------------------------------


def init_jax(*, port: int | None = None, cpu_collectives: str = "gloo") -> Context:
    """Join this process to a multi-process JAX run (``jax.distributed.initialize``).

    Call it first thing, before any JAX computation, in every process of a launch
    (``torchrun``, ``srun``): the rank, world size and coordinator come from the same
    variables as for torch (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``, or SLURM's). The
    coordinator listens on ``port`` (default ``MASTER_PORT + 1``: torch's rendezvous may
    hold ``MASTER_PORT`` itself). On CPUs the cross-process collectives use
    ``cpu_collectives`` (gloo). Afterwards ``jax.devices()`` lists every process's
    devices, and ``post.sample("chees", ...)`` shards its chains over all of them
    (chains must be a multiple of the device count); every process gets the whole
    result. One process (no launcher): nothing to do.
    """
    ctx = context()
    if ctx.world_size == 1:
        return ctx
    import jax

    if port is None:
        base = os.environ.get("MASTER_PORT")
        if not base:
            raise RuntimeError(
                "init_jax: MASTER_PORT is not set; pass port=<free port> (the same on every "
                "process) or launch with torchrun"
            )
        port = int(base) + 1
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        raise RuntimeError(
            "init_jax: MASTER_ADDR is not set: export MASTER_ADDR=<hostname of rank 0> on "
            "every process (torchrun sets it)"
        )
    if cpu_collectives:  # affects only CPU devices; GPUs use their own collectives
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=f"{addr}:{int(port)}",
        num_processes=ctx.world_size,
        process_id=ctx.rank,
    )
    return Context(ctx.rank, ctx.world_size, ctx.local_rank, True)


# ---------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------


def _parts(paths) -> tuple[list[Path], dict | None]:
    """The rank stores of ``paths`` (a run directory or a list of stores), and the
    run's manifest when there is one."""
    if isinstance(paths, (str, os.PathLike)):
        root = Path(paths)
        man = root / MANIFEST
        if man.exists():
            manifest = json.loads(man.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
                raise ValueError(f"{man}: not a condpost distributed-run manifest")
            return [root / s for s in manifest["stores"]], manifest
        if (root / "meta.json").exists():
            return [root], None
        found = sorted(p for p in root.glob("rank*") if (p / "meta.json").exists())
        if not found:
            raise FileNotFoundError(
                f"{str(root)!r} holds no distributed run ({MANIFEST}) and no rank stores "
                f"(rankNNN/meta.json); pass the run directory or a list of run stores"
            )
        return found, None
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError("merge_stores: no stores given")
    return out, None


def merge_stores(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    posterior: LocalPosterior | None = None,
    *,
    verify: bool = True,
) -> ReferenceClass:
    """Merge the run stores of chain groups into one ``ReferenceClass``.

    ``paths``: a distributed run directory (its ``distributed.json`` lists the rank
    stores; without it every ``rank*`` store in it), or a list of run stores written
    with ``chain_ids=`` (a store without them counts as chains ``0 … C−1``). The
    stores must hold disjoint chains of the same run: the same declaration (their
    fingerprints agree) and the same arguments apart from the chains. The chains are
    put in global chain order, statistics and recorded per-sample losses
    (``ref.records``) concatenated along the chains. Stores with different numbers of
    completed draws (an interrupted rank) are cut to the shortest, with a warning.
    ``posterior`` attaches the declaration (its fingerprint is checked).
    """
    from .fingerprint import compare
    from .reference import ReferenceClass
    from .store import _read_meta, open_store

    stores, manifest = _parts(paths)
    refs, metas = [], []
    for p in stores:
        if not (p / "meta.json").exists():
            raise FileNotFoundError(
                f"{str(p)!r} is not a run store (no meta.json): a rank of the run did not "
                f"start, or its store was not copied here"
            )
        refs.append(open_store(p, verify=verify))
        metas.append(_read_meta(p))
    ids = []
    for ref, meta in zip(refs, metas, strict=True):
        c = ref.settings.get("chain_ids")
        ids.append([int(x) for x in c] if c is not None else list(range(int(meta["chains"]))))
    # one declaration, one run
    fp0 = refs[0].config.get("fingerprint")
    for p, ref in zip(stores[1:], refs[1:], strict=True):
        diffs = compare(fp0, ref.config.get("fingerprint") or {})
        if diffs:
            raise ValueError(
                f"{str(p)!r} and {str(stores[0])!r} were produced by different declarations "
                f"({'; '.join(diffs)}); merging them would mix two posteriors"
            )
        if not np.array_equal(ref.center, refs[0].center):
            raise ValueError(f"{str(p)!r} and {str(stores[0])!r} have different centres w*")
    id0 = {k: v for k, v in metas[0]["identity"].items() if k not in _PER_RANK}
    for p, meta in zip(stores[1:], metas[1:], strict=True):
        idr = {k: v for k, v in meta["identity"].items() if k not in _PER_RANK}
        diff = sorted(k for k in set(id0) | set(idr) if id0.get(k) != idr.get(k))
        if diff:
            rows = "; ".join(f"{k}: {id0.get(k)!r} vs {idr.get(k)!r}" for k in diff)
            raise ValueError(
                f"{str(p)!r} and {str(stores[0])!r} are not parts of one run: their arguments "
                f"differ ({rows}). Merge only the rank stores of one run."
            )
    flat = [c for part in ids for c in part]
    dup = sorted({c for c in flat if flat.count(c) > 1})
    if dup:
        raise ValueError(
            f"chain(s) {dup} appear in more than one store ({[str(p) for p in stores]}); "
            f"each chain of a run must come from exactly one store"
        )
    # draws: cut to the shortest part
    S = min(r.num_draws for r in refs)
    short = [str(p) for p, r in zip(stores, refs, strict=True) if r.num_draws > S]
    if short:
        warn(
            f"merge_stores: the stores hold different numbers of draws "
            f"({[r.num_draws for r in refs]}); all chains are cut to the {S} draws of the "
            f"shortest (an interrupted or faulted rank; resume it to complete the run)",
            SamplerWarning,
        )
    order = np.argsort(np.asarray(flat), kind="stable")
    keep_draws = all(r._draws is not None for r in refs)
    draws = None
    if keep_draws:
        draws = np.concatenate([np.asarray(r._draws[:, :S]) for r in refs])[order]
    names = set(refs[0]._stats)
    for p, r in zip(stores[1:], refs[1:], strict=True):
        if set(r._stats) != names:
            raise ValueError(
                f"{str(p)!r} records statistics {sorted(set(r._stats) ^ names)} that "
                f"{str(stores[0])!r} does not (or the other way round); not parts of one run"
            )
    stats = {}
    for k in sorted(names):
        width = min(r._stats[k].shape[1] for r in refs)
        stats[k] = np.concatenate([r._stats[k][:, :width] for r in refs])[order]
    records = {}
    for k in refs[0].records:
        if all(k in r.records for r in refs):
            width = min(r.records[k].shape[1] for r in refs)
            records[k] = np.concatenate([np.asarray(r.records[k][:, :width]) for r in refs])[order]

    settings = dict(refs[0].settings)
    seeds = [s for r in refs for s in (r.settings.get("chain_seeds") or [])]
    gl = sorted(flat)
    settings["chains"] = len(gl)
    settings.pop("chain_ids", None)
    settings.pop("interrupted_at_draw", None)
    if len(seeds) == len(flat):
        settings["chain_seeds"] = [seeds[i] for i in order]
    if gl != list(range(len(gl))):
        settings["chain_ids"] = gl
        warn(
            f"merge_stores: the merged chains {gl[:12]}{'…' if len(gl) > 12 else ''} are not "
            f"chains 0 … {len(gl) - 1} of one run (a rank store is missing); settings"
            f"['chain_ids'] records which they are",
            CondpostWarning,
        )
    walls = [float(r.settings.get("wall_time_s") or 0.0) for r in refs]
    settings["wall_time_s"] = max(walls)
    grads = [r.settings.get("gradient_evaluations") for r in refs]
    if all(isinstance(g, (int, float)) for g in grads):
        settings["gradient_evaluations"] = sum(grads)
    settings["vectorized"] = [bool(r.settings.get("vectorized")) for r in refs]
    threads = {r.settings.get("num_threads") for r in refs}
    if len(threads) > 1:
        settings["num_threads"] = [r.settings.get("num_threads") for r in refs]
    if S < max(r.num_draws for r in refs) or any(not r.settings.get("draws") for r in refs):
        settings["draws"] = S
    faults = [
        f"store {p.name}: {r.settings['fault']}"
        for p, r in zip(stores, refs, strict=True)
        if r.settings.get("fault")
    ]
    if faults:
        settings["fault"] = " | ".join(faults)
    interrupted = [
        p.name for p, r in zip(stores, refs, strict=True) if "interrupted_at_draw" in r.settings
    ]
    settings["distributed"] = {
        "world_size": len(stores) if manifest is None else int(manifest["world_size"]),
        "chain_ids": ids,
        "stores": [str(p) for p in stores],
        "wall_time_s": walls,
        **({"interrupted": interrupted} if interrupted else {}),
    }
    ref = ReferenceClass(
        draws=draws,
        stats=stats,
        center=refs[0].center,
        config=refs[0].config,
        settings=settings,
    )
    ref.records = records
    if posterior is not None:
        ref.attach(posterior)
    return ref
