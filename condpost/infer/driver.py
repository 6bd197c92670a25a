"""The one driver for torch kernels: every torch sampler's loop, store and resume.

A kernel (after BlackJAX's ``SamplingAlgorithm``) is an object with

* ``init(...) -> State`` (called by the kernel's runner, which hands the driver the
  initial state) and
* ``step(key, state, batch=None) -> (State, Info)``,

``State`` and ``Info`` NamedTuples, ``State.w`` the ``[C, d]`` positions of all chains
at once. ``Info.potential`` ``[C]``, when present, is ``U`` at the step's *input*
weights. A kernel that adapts during warmup has a ``freeze(state) -> State``, called
once when warmup ends. ``key`` is an integer (``step_key(seed, t)``): a step is a pure
function of ``(key, state)``. A kernel whose state carries its own random streams (the
SG-MCMC kernels keep one torch generator per chain, so chain ``c`` does not depend on
how many chains run beside it) takes ``key=None``.

Optionally, for speed, ``kernel.live(state) -> (step, sync)``: a stepping function that
may keep mutable scratch (live random generators) between calls, and ``sync(state)``,
which writes that scratch back into a state before it is handed out (checkpoint,
callback, result). The draws are those of ``kernel.step``.

``run_chains`` runs ``warmup + draws·thin`` steps and owns, for every torch kernel:

* **thinning and warmup**: draw ``s`` is the state *entering* step
  ``warmup + s·thin`` (so ``Info`` of that step describes the draw: its gradient, its
  minibatch loss);
* **windows**: the per-step tensors it must check or record are kept by reference and
  checked and copied to NumPy once per window (every chunk, at most 1024 steps), so no
  step waits on the device;
* **faults**: a non-finite ``Info.potential`` or draw, or a draw with
  ``‖w − w*‖² > blowup`` (10⁴·d/γ by default: far outside any localized posterior),
  stops the run; the draws before it are returned with the fault marked (and a
  ``SamplerWarning``), and a run with no complete draw raises ``FloatingPointError``;
* **statistics**: ``dist2`` = ``‖w − w*‖²`` of every draw, the virial term
  ``(w − w*)·∇U(w)`` when the kernel's ``Info`` has ``grad`` (∇U at the step's input,
  e.g. a minibatch gradient: then an unbiased estimate), the kernel's ``Info`` fields
  named in ``kernel.info_stats`` (default: every ``[C]`` field) as ``sampler/<name>``,
  and whatever the ``recorders`` compute per window (the SG-MCMC losses and virial, the
  per-sample losses of ``condpost.influence``);
* **store and resume**: with ``store=``, draws and statistics are appended in chunks,
  each followed by an atomic checkpoint of the kernel state (any NamedTuple of tensors,
  numbers and tuples of them); ``resume=True`` continues the same chains exactly;
* progress (a tqdm bar, silenced by ``progress=False``), callbacks and settings.

A recorder is an object with ``shapes() -> {name: e}`` (the statistic is measured at
every ``e``-th draw: ``⌈draws/e⌉`` entries per chain),
``select(s, state, info)`` (called at every kept draw with the state entering the step
and the step's ``Info``; what it returns is kept until the window is flushed) and
``window(S, W, selected) -> {name: (first index, tensor [k, C])}`` (``S`` the draw
indices of the window, ``W`` their weights, a list of ``[C, d]`` tensors: a recorder
stacks only what it needs).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._errors import SamplerWarning, warn
from .base import SampleResult, chain_seeds

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    from ..posterior import LocalPosterior

__all__ = ["run_chains", "run_kernel", "step_key", "encode_state", "decode_state"]

#: the longest run of steps whose per-step tensors are buffered before a check
MAX_WINDOW = 1024


def step_key(seed: int, t: int) -> int:
    """The key of step ``t`` of a run seeded with ``seed`` (SeedSequence, 63 bits)."""
    ss = np.random.SeedSequence([int(seed), int(t)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------
# kernel state <-> checkpoint arrays
# ---------------------------------------------------------------------------------------


def encode_state(state) -> dict[str, np.ndarray]:
    """A kernel state (NamedTuple) as named NumPy arrays for a checkpoint.

    Tensors, numbers, booleans and tuples of tensors or of integers are stored; ``None``
    fields are skipped (the template state of a resumed run supplies them)."""
    out: dict[str, np.ndarray] = {}
    for name, v in state._asdict().items():
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            out[name] = v.detach().cpu().numpy()
        elif isinstance(v, (bool, np.bool_)):
            out[name] = np.array(bool(v))
        elif isinstance(v, (int, np.integer)):
            out[name] = np.array(int(v), dtype=np.int64)
        elif isinstance(v, (float, np.floating)):
            out[name] = np.array(float(v))
        elif isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
            out[name] = np.stack([x.detach().cpu().numpy() for x in v])
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, np.integer)) for x in v):
            out[name] = np.array([int(x) for x in v], dtype=np.int64)
        else:
            raise TypeError(
                f"cannot checkpoint field {name!r} of {type(state).__name__} "
                f"({type(v).__name__}); a kernel state holds tensors, numbers and tuples of them"
            )
    return out


def decode_state(template, saved: dict[str, np.ndarray]):
    """The state ``template`` (a fresh ``init`` of the same kernel) with every field found
    in ``saved`` restored, each to the type, dtype and device of the template's field."""
    fields = {}
    for name, ref in template._asdict().items():
        if name not in saved:
            continue
        a = saved[name]
        if isinstance(ref, torch.Tensor):
            fields[name] = torch.as_tensor(np.asarray(a)).to(dtype=ref.dtype, device=ref.device)
        elif isinstance(ref, (bool, np.bool_)):
            fields[name] = bool(a)
        elif isinstance(ref, (int, np.integer)):
            fields[name] = int(a)
        elif isinstance(ref, (float, np.floating)):
            fields[name] = float(a)
        elif isinstance(ref, (tuple, list)) and ref and isinstance(ref[0], torch.Tensor):
            fields[name] = tuple(torch.as_tensor(np.asarray(r)).to(ref[0].device) for r in a)
        elif isinstance(ref, (tuple, list)):
            fields[name] = tuple(int(x) for x in np.asarray(a).tolist())
        elif ref is None:  # a field the template leaves empty: keep the stored tensor
            fields[name] = torch.as_tensor(np.asarray(a))
    return template._replace(**fields)


# ---------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------


def centred_dots(ws: list[torch.Tensor], center: torch.Tensor, others=None):
    """``‖w_k − w*‖²`` and, with ``others``, ``(w_k − w*)·o_k`` for draws ``w_k`` ``[C, d]``,
    as ``[K, C]`` tensors, through one reused difference buffer and batched dot products
    (no ``[K, C, d]`` stack, no temporary per draw: at large ``d`` these reductions are
    memory-bound). A window of at most 2²⁴ numbers is stacked and reduced in one call
    instead (small networks: one call rather than a few per draw); with two or more
    chains both give the same values bit for bit."""
    C, d = ws[0].shape
    if len(ws) * C * d <= 1 << 24:
        B = torch.stack(ws).sub_(center).view(-1, 1, d)  # [K·C, 1, d]
        d2 = torch.bmm(B, B.view(-1, d, 1)).view(len(ws), C)
        if others is None:
            return d2, None
        O = torch.stack(others).view(-1, d, 1)
        return d2, torch.bmm(B, O).view(len(ws), C)
    buf = torch.empty_like(ws[0])
    d2, dots = [], []
    for k, w in enumerate(ws):
        torch.sub(w, center, out=buf)
        b = buf.unsqueeze(1)  # [C, 1, d]
        d2.append(torch.bmm(b, buf.unsqueeze(2)).view(-1))
        if others is not None:
            dots.append(torch.bmm(b, others[k].unsqueeze(2)).view(-1))
    return torch.stack(d2), (torch.stack(dots) if others is not None else None)


def _fault_text(method, step_size, chains_bad, step, warmup, thin, where) -> str:
    phase = (
        f"warmup step {step}" if step < warmup else f"step {step} (draw {(step - warmup) // thin})"
    )
    hint = (
        f"Use a smaller step_size (now {step_size:g}; try {step_size / 10:g}), or run "
        f"condpost.calibrate_step_size(post, method={method!r}) to pick one."
        if step_size is not None
        else "Lower the step size or raise target_accept."
    )
    return f"{method}: chain(s) {chains_bad[:8]} diverged ({where}) at {phase}: {hint}"


def run_chains(
    post: LocalPosterior,
    kernel,
    init_state: Callable[[], Any],
    *,
    method: str,
    chains: int,
    warmup: int,
    draws: int,
    key: Callable[[int], Any] | None = None,
    thin: int = 1,
    progress: bool = True,
    recorders: tuple = (),
    keep_draws: bool = True,
    store=None,
    resume: bool = False,
    identity: dict | None = None,
    settings: dict | None = None,
    chunk_draws: int | None = None,
    callback: Callable | None = None,
    freeze: Callable | None = None,
    blowup: float | None = None,
    step_size: float | None = None,
    finalize: Callable[[dict], None] | None = None,
) -> SampleResult:
    """Run ``kernel`` from ``init_state()`` (see the module doc) and return the result.

    ``key(t)`` gives the key of step ``t`` (None: the kernel's state carries its random
    streams). ``identity`` is what a resumed store must match (the run's arguments);
    ``settings`` are recorded with the result. ``freeze`` overrides ``kernel.freeze``.
    ``blowup`` bounds ``‖w − w*‖²`` (default ``10⁴·d/γ``; ``inf`` disables the check).
    ``step_size`` only words the fault message. ``finalize(settings)`` adds what is
    known only after the run (before the store records the settings).
    """
    from ..store import RunStore

    C, d = int(chains), post.d
    thin = int(thin)
    total = warmup + draws * thin
    settings = dict(settings or {})
    center = post.center
    if blowup is None:
        gam = float(post.localization)
        blowup = 1e4 * d / gam if gam > 0 else math.inf
    freeze = freeze if freeze is not None else getattr(kernel, "freeze", None)
    wanted = getattr(kernel, "info_stats", None)
    every = {"dist2": 1}  # statistic -> kept at every how-many-th draw (others: 1)
    for r in recorders:
        every.update(r.shapes())
    widths = {name: -(-draws // e) for name, e in every.items()}

    for r in recorders:
        if hasattr(r, "describe"):
            settings[f"record_{r.kind}"] = r.describe()
            identity = {**(identity or {}), "record": r.describe()}
    template = init_state()
    state, t, done, rs = template, 0, 0, None
    if store is not None:
        rs = RunStore.open(
            store,
            post=post,
            identity={**(identity or {}), "d": d, "n": post.n},
            settings=settings,
            chains=C,
            draws=draws,
            keep_draws=keep_draws,
            stat_shapes=widths,
            resume=resume,
        )
        saved = rs.load_state()
        if saved is not None:
            state = decode_state(template, saved)
            t = rs.state_step
        done = rs.done_draws
        stats = rs.stats
        draws_buf = None
    else:
        stats = {k: np.zeros((C, m)) for k, m in widths.items()}
        dt = torch.empty((), dtype=post.dtype).numpy().dtype
        draws_buf = np.zeros((C, draws, d), dtype=dt) if keep_draws else None
    for r in recorders:
        if hasattr(r, "open"):
            r.open(C, draws, store)
    if chunk_draws is None:
        per_draw = C * d * center.element_size()
        chunk_draws = max(1, min(draws, (64 << 20) // max(per_draw, 1), 1000))
    # a window holds at most chunk_draws draws, and less when a recorder's output per
    # draw is large (per-sample losses of a big query set)
    window = min(
        [chunk_draws] + [r.window_draws(C) for r in recorders if hasattr(r, "window_draws")]
    )

    live = getattr(kernel, "live", None)
    step, sync = live(state) if live is not None else (kernel.step, lambda s: s)

    # the window: per-step potentials, and the kept draws with what recorders selected
    win_t: list[int] = []
    win_u: list[torch.Tensor] = []
    kept_t: list[int] = []
    kept_s: list[int] = []
    kept_w: list[torch.Tensor] = []
    kept_grad: list[torch.Tensor] = []  # Info.grad of the kept draws, when the kernel has it
    kept_sel: list[list] = [[] for _ in recorders]
    kept_info: dict[str, list[torch.Tensor]] = {}
    pending: list[np.ndarray] = []  # draws flushed but not yet written to the store
    fault: list[str | None] = [None]
    recorded = [done]  # draws whose weights and statistics are recorded

    def check(dist2: torch.Tensor | None) -> tuple[int, str] | None:
        """The first bad step of the window and what went wrong, or None."""
        t_u = t_w = None
        if win_u:
            bad = ~torch.isfinite(torch.stack(win_u))  # [S, C]
            rows = bad.any(1).nonzero()
            if rows.numel():
                r = int(rows[0])
                t_u, ch_u = win_t[r], bad[r].nonzero().flatten().tolist()
        if dist2 is not None:
            bad = ~torch.isfinite(dist2) | (dist2 > blowup)  # [K, C]
            rows = bad.any(1).nonzero()
            if rows.numel():
                r = int(rows[0])
                t_w, row = kept_t[r], dist2[r]
        if t_u is not None and (t_w is None or t_u <= t_w):
            return t_u, _fault_text(
                method, step_size, ch_u, t_u, warmup, thin, "non-finite loss or weights"
            )
        if t_w is not None:
            nonfin = (~torch.isfinite(row)).nonzero().flatten().tolist()
            where = "non-finite weights"
            if not nonfin:
                nonfin = (row > blowup).nonzero().flatten().tolist()
                where = f"‖w − w*‖² > {blowup:.3g} = 10⁴·d/γ, far outside the localized posterior"
            return t_w, _fault_text(method, step_size, nonfin, t_w, warmup, thin, where)
        return None

    def flush() -> None:
        """Check the window; record its good draws; set ``fault`` at a bad step."""
        # ‖w − w*‖² of each draw and, when the kernel reports ∇U at the draw (Info.grad),
        # the virial term (w − w*)·∇U, in one pass over the draws
        grads = kept_grad if len(kept_grad) == len(kept_w) and kept_grad else None
        dist2, virial = centred_dots(kept_w, center, grads) if kept_w else (None, None)
        bad = check(dist2)
        k = len(kept_s)
        if bad is not None:
            t_bad, fault[0] = bad
            k = sum(1 for tt in kept_t if tt < t_bad)
        if k:
            s0 = kept_s[0]
            S = kept_s[:k]
            W = kept_w[:k]  # a list of [C, d]: recorders stack only what they need
            out = {"dist2": (s0, dist2[:k])}
            if virial is not None:
                out["virial"] = (s0, virial[:k])
            for name, xs in kept_info.items():
                out[f"sampler/{name}"] = (s0, torch.stack(xs[:k]))
            for r, sel in zip(recorders, kept_sel, strict=True):
                out.update(r.window(S, W, sel[:k]))
            for name, (j0, v) in out.items():
                a = v.detach().T.cpu().numpy()  # [C, k']
                if name not in stats:  # a sampler statistic first seen now
                    stats[name] = np.zeros((C, draws), dtype=np.float64)
                stats[name][:, j0 : j0 + a.shape[1]] = a
            if keep_draws:
                for j, w in enumerate(W):
                    wn = w.detach().cpu().numpy()  # [C, d]
                    if draws_buf is not None:
                        draws_buf[:, s0 + j] = wn
                    else:
                        pending.append(wn.copy())
            recorded[0] = s0 + k
        win_t.clear()
        win_u.clear()
        for xs in (kept_t, kept_s, kept_w, kept_grad, *kept_sel, *kept_info.values()):
            xs.clear()

    bar = tqdm(
        total=total,
        initial=min(t, total),
        desc=f"{method} · {C} chains",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    chunk_start = done
    t0 = time.perf_counter()
    try:
        while t < total and fault[0] is None:
            if t == warmup and freeze is not None:
                state = freeze(state)
            keep = t >= warmup and (t - warmup) % thin == 0
            before = state
            state, info = step(None if key is None else key(t), state)
            u = getattr(info, "potential", None)
            if isinstance(u, torch.Tensor):
                win_t.append(t)
                win_u.append(u)
            if keep:
                s = (t - warmup) // thin
                kept_t.append(t)
                kept_s.append(s)
                kept_w.append(before.w)
                g = getattr(info, "grad", None)
                if isinstance(g, torch.Tensor) and g.shape == before.w.shape:
                    kept_grad.append(g)
                for r, sel in zip(recorders, kept_sel, strict=True):
                    sel.append(r.select(s, before, info))
                if wanted != ():
                    for name, v in info._asdict().items():
                        if (wanted is None or name in wanted) and isinstance(v, torch.Tensor):
                            if v.shape == (C,):
                                kept_info.setdefault(name, []).append(v)
                boundary = rs is not None and (s + 1 - chunk_start >= chunk_draws or s + 1 == draws)
                if boundary or callback is not None or len(kept_s) >= window:
                    flush()
                if fault[0] is not None:
                    break
                if boundary:
                    state = sync(state)
                    rs.write_chunk(chunk_start, pending, encode_state(state), s + 1, step=t + 1)
                    pending = []
                    chunk_start = s + 1
                if callback is not None:
                    state = sync(state)
                    callback(state, s)
            elif len(win_t) >= MAX_WINDOW:
                flush()
            if progress:
                if t % 20 == 0 or t == total - 1:
                    post_fix = {"draws": f"{max((t - warmup) // thin + 1, 0)}/{draws}"}
                    acc = getattr(info, "accept_prob", None)
                    lo = getattr(info, "loss", None)
                    if isinstance(acc, torch.Tensor):
                        post_fix["acc"] = f"{float(acc.float().mean()):.2f}"
                    elif isinstance(lo, torch.Tensor):
                        post_fix["loss"] = f"{float(lo.mean()):.5g}"
                    bar.set_postfix(post_fix, refresh=False)
                bar.update(1)
            t += 1
        if fault[0] is None:
            flush()
    except BaseException:
        if rs is not None:
            rs.close()  # release the writer lock (its last checkpoint stays)
        raise
    finally:
        bar.close()
    state = sync(state)
    wall = time.perf_counter() - t0
    settings["wall_time_s"] = wall + (rs.previous_wall if rs is not None else 0.0)
    if finalize is not None:
        finalize(settings)
    good = rs.done_draws if (rs is not None and fault[0] is not None) else recorded[0]
    if fault[0] is not None:
        msg = fault[0]
        if good == 0:
            if rs is not None:
                rs.close()
            raise FloatingPointError(msg + " No draw was completed before it.")
        settings["draws_requested"] = draws
        settings["draws"] = good
        settings["fault"] = msg
        lost = recorded[0] - good
        warn(
            f"{msg} The {good} draw(s) per chain completed before it are kept "
            f"(ref.settings['fault'])"
            + (
                f"; the {lost} draw(s) after the store's last checkpoint are not, since the "
                f"chains cannot be resumed from them. The store {str(store)!r} can be "
                f"resumed from its last checkpoint with a smaller step size."
                if rs is not None
                else "."
            ),
            SamplerWarning,
        )
    stats_out = {}
    for name, v in stats.items():
        stats_out[name] = np.asarray(v)[:, : -(-good // every.get(name, 1))]
    if "sampler/diverging" in stats_out:
        stats_out["sampler/diverging"] = stats_out["sampler/diverging"].astype(bool)
    if rs is not None:
        if fault[0] is None:
            rs.finish(settings)
        else:
            rs.close()
        draws_arr = rs.draws_view() if keep_draws else None
    else:
        draws_arr = draws_buf[:, :good] if draws_buf is not None else None
    records = {r.kind: r.result(good) for r in recorders if hasattr(r, "result")}
    return SampleResult(
        draws=draws_arr,
        stats=stats_out,
        settings=settings,
        fault=fault[0],
        store=str(store) if store is not None else None,
        records=records,
    )


# ---------------------------------------------------------------------------------------
# the runner of registered kernels
# ---------------------------------------------------------------------------------------


def run_kernel(
    post: LocalPosterior,
    make,
    *,
    method: str,
    chains: int,
    warmup: int,
    draws: int,
    seed: int,
    progress: bool,
    thin: int = 1,
    init_jitter: float = 0.0,
    store=None,
    resume: bool = False,
    chunk_draws: int | None = None,
    callback: Callable | None = None,
    keep_draws: bool = True,
    record_losses=None,
    record_every: int = 1,
    **options,
) -> SampleResult:
    """Run the kernel ``make(post, **options)`` through ``run_chains``.

    The kernel starts at ``w*`` (plus ``init_jitter``·N(0, I)) with
    ``kernel.init(position [C, d], key)``; step ``t`` gets ``step_key(seed', t + 1)``.
    ``store=``, ``resume=``, ``chunk_draws=``, ``callback=``, ``keep_draws=``,
    ``record_losses=`` and ``record_every=`` work as for the SG-MCMC methods. The
    declaration's per-draw statistics (``L_n``, the virial term, the defects) are
    evaluated on the full data per window of draws while the chains run, so the draws
    need not be kept for ``llc()`` or the preservation report.
    """
    if int(thin) != thin or thin < 1:
        raise ValueError(f"thin must be an integer ≥ 1; got {thin!r}")
    if not init_jitter >= 0:
        raise ValueError(f"init_jitter must be ≥ 0; got {init_jitter!r}")
    if resume and store is None:
        raise ValueError("resume=True needs store=<path> of the interrupted run")
    kernel = make(post, **options)
    C, d = chains, post.d
    base = chain_seeds(seed, 1)[0]

    def init_state():
        w0 = post.center.detach().clone().expand(C, d).clone()
        if init_jitter > 0:
            g = torch.Generator(device="cpu").manual_seed(step_key(base, -1))
            noise = torch.randn(C, d, generator=g, dtype=w0.dtype).to(w0.device)
            w0 = w0 + init_jitter * noise
        return kernel.init(w0, step_key(base, 0))

    ksettings = dict(getattr(kernel, "settings", {}))
    settings = {
        "method": method,
        "backend": "torch",
        "chains": C,
        "warmup": warmup,
        "draws": draws,
        "thin": int(thin),
        "seed": int(seed),
        "init_jitter": float(init_jitter),
        "keep_draws": bool(keep_draws),
        **ksettings,
    }
    identity = {
        "method": method,
        "chains": C,
        "warmup": warmup,
        "thin": int(thin),
        "seed": int(seed),
        "init_jitter": float(init_jitter),
        "keep_draws": bool(keep_draws),
        "options": {k: options[k] for k in sorted(options)},
    }
    return run_chains(
        post,
        kernel,
        init_state,
        method=method,
        chains=C,
        warmup=warmup,
        draws=draws,
        key=lambda t: step_key(base, t + 1),
        thin=thin,
        progress=progress,
        store=store,
        resume=resume,
        identity=identity,
        settings=settings,
        chunk_draws=chunk_draws,
        callback=callback,
        step_size=ksettings.get("step_size"),
        recorders=(_Declaration(post), *_loss_recorders(post, record_losses, record_every)),
        keep_draws=keep_draws,
    )


def _loss_recorders(post, record_losses, record_every) -> tuple:
    """The per-sample loss recorder of ``record_losses=`` (none when it is None/False)."""
    if record_losses is None or record_losses is False:
        if record_every != 1:
            raise ValueError("record_every= needs record_losses= (True or a query (x, y))")
        return ()
    from .record import LossRecorder

    return (LossRecorder(post, record_losses, record_every),)


class _Declaration:
    """The declaration's per-draw statistics, full data, per window (a recorder): ``loss``
    = ``L_n(w)``, ``virial`` = ``(w − w*)·∇U(w)``, ``defect/<name>`` and ``exact/...``."""

    def __init__(self, post) -> None:
        self.post = post

    def shapes(self) -> dict[str, int]:
        return {"loss": 1, "virial": 1}

    def select(self, s, state, info):
        return None

    def window(self, S, W, sel) -> dict:
        K, (C, d) = len(W), W[0].shape
        flat = torch.stack(W).reshape(K * C, d)
        ev = self.post.evaluate(flat, grad=True, loss=True, defects=True)
        return {k: (S[0], v.reshape(K, C)) for k, v in ev.items()}
