"""``condpost run experiment.toml [--quick] [--resume]`` and ``condpost report RUN_DIR``.

An experiment file declares the model (an importable ``module:function`` returning
``(net, (x, y))`` or ``(net, (x, y), probes)``), the likelihood, ``(nβ, γ)``, the lifted
selection, the constraints, the sampler and the analyses; ``docs/cli.md`` lists every
key. ``run`` writes a run folder:

* ``experiment.toml`` (the declaration as run) and ``stages.json`` (one record per
  finished stage: what ``--resume`` skips);
* ``draws/``: the stored draws of every reference class (a run store for SG-MCMC,
  resumed mid-run by ``--resume``; an ``.npz`` file otherwise);
* ``results.json``, ``tables/*.csv``, ``figures/*.png`` and ``report.html`` (self-contained:
  every figure embedded as base64).

Stages: ``model``, then per reference class ``calibrate:<class>`` (when a constraint asks
for a calibrated tolerance), ``sample:<class>``, ``analyse:<class>`` and one
``sweep:<class>:<knob>=<value>`` per setting, then ``report``. A line is printed per
finished stage.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import importlib
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["main", "load_experiment", "ExperimentError", "run_experiment"]

_STAGES = "stages.json"


class ExperimentError(ValueError):
    """An invalid experiment file: the message names the key, its line and valid keys."""


class StageError(RuntimeError):
    """A stage of a run failed; the finished stages are kept for ``--resume``."""


# --------------------------------------------------------------------------- schema
_CALIBRATE = {
    "target_binding": float,
    "keep": str,
    "pilot": str,
    "chains": int,
    "warmup": int,
    "draws": int,
    "refine": int,
    "max_steps": int,
    "seed": int,
}
_CONSTRAINT = {
    "type": str,
    "name": str,
    "site": str,
    "source": str,
    "target": str,
    "probes": str,
    "tolerance": float,
    "strength": float,
    "calibrate": _CALIBRATE,
    "measure": str,
    "interventions": str,
    "side": str,
    "margin": float,
    "seed": int,
}
_SAMPLER = {
    "method": str,
    "chains": int,
    "warmup": int,
    "draws": int,
    "seed": int,
    "scale_step_size": bool,
    "max_step_size": float,
    "options": dict,
}
_MI = {
    "name": str,
    "a": str,
    "b": str,
    "probes": str,
    "target": str,
    "estimator": str,
    "bootstrap": int,
    "draws": int,
    "pairs": int,
    "seed": int,
}
_OBSERVABLE = {"name": str, "function": str, "unit": str, "args": dict}
_SWEEP = {
    "knob": str,
    "values": list,
    "constraint": str,
    "classes": list,
    "observables": list,
}
_ANALYSES = {
    "summary": bool,
    "llc": bool,
    "preservation": bool,
    "loo": bool,
    "traces": {"coordinates": list, "rank": bool},
    "mi": [_MI],
    "observables": [_OBSERVABLE],
    "sweeps": [_SWEEP],
}
_POSTERIOR = {
    "likelihood": str,
    "scale": float,
    "nbeta": (float, str),
    "localization": float,
    "include": (str, list),
    "exclude": (str, list),
    "dtype": str,
    "check_center": bool,
}
_CLASS = {
    "name": str,
    "description": str,
    "constraints": list,
    "nbeta": (float, str),
    "localization": float,
    "include": (str, list),
    "exclude": (str, list),
    "sampler": _SAMPLER,
}
_TOP: dict[str, Any] = {
    "title": str,
    "threads": int,
    "description": str,
    "model": {"function": str, "args": dict, "path": str},
    "posterior": _POSTERIOR,
    "constraints": [_CONSTRAINT],
    "sampler": _SAMPLER,
    "classes": [_CLASS],
    "analyses": _ANALYSES,
}
_TOP["quick"] = {k: v for k, v in _TOP.items() if k not in ("title", "description")}
_FREE = {"args", "options"}  # tables whose keys are passed through
_REQUIRED = {("model", "function"), ("posterior", "localization"), ("posterior", "likelihood")}
_CONSTRAINT_TYPES = ("Activations", "CircuitMap", "Outputs", "LossLevel")
_KNOBS = ("nbeta", "localization", "tolerance")


def _line_of(text: str, path: list) -> int | None:
    """The line (1-based) of the key ``path`` (table names, array indices, key) in ``text``."""
    keys = [p for p in path if isinstance(p, str)]
    idx = [p for p in path if isinstance(p, int)]
    if not keys:
        return None
    table: list[str] = []
    counts: dict[tuple, int] = {}
    best = None
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        m = re.match(r"^\[\[\s*([^\]]+?)\s*\]\]$", line) or re.match(r"^\[\s*([^\]]+?)\s*\]$", line)
        if m:
            table = [t.strip().strip('"') for t in m.group(1).split(".")]
            if line.startswith("[["):
                counts[tuple(table)] = counts.get(tuple(table), -1) + 1
            if table == keys:
                best = best or i
            continue
        m = re.match(r'^"?([A-Za-z0-9_\-.]+)"?\s*=', line)
        if not m:
            # inline tables: key = { a = 1, b = 2 }
            if keys[-1] and re.search(rf"\b{re.escape(keys[-1])}\s*=", line) and best is None:
                best = i
            continue
        full = table + [k.strip().strip('"') for k in m.group(1).split(".")]
        if full == keys:
            arr = tuple(table) if tuple(table) in counts else None
            if not idx or arr is None or counts[arr] == idx[-1]:
                return i
            best = best or i
        elif full[: len(keys) - 1] == keys[:-1] and re.search(
            rf"\b{re.escape(keys[-1])}\s*=", line
        ):
            best = best or i
    return best


def _where(path: list) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _check(node, schema, path: list, text: str, src: str) -> None:
    def fail(msg: str, at: list) -> None:
        line = _line_of(text, at)
        where = f"{src}:{line}" if line else src
        raise ExperimentError(f"{where}: {msg}")

    if isinstance(schema, list):
        if not isinstance(node, list):
            fail(f"{_where(path)} must be an array of tables ([[{_where(path)}]])", path)
        for i, item in enumerate(node):
            _check(item, schema[0], path + [i], text, src)
        return
    if isinstance(schema, dict):
        if not isinstance(node, dict):
            fail(f"{_where(path)} must be a table", path)
        for k, v in node.items():
            if k not in schema:
                near = difflib.get_close_matches(k, list(schema), n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
                fail(
                    f"unknown key {_where(path + [k])!r}{hint} Valid keys here: "
                    f"{', '.join(sorted(schema))}",
                    path + [k],
                )
            if k in _FREE:
                if not isinstance(v, dict):
                    fail(f"{_where(path + [k])} must be a table", path + [k])
                continue
            _check(v, schema[k], path + [k], text, src)
        return
    types = schema if isinstance(schema, tuple) else (schema,)
    ok = any(
        (t is float and isinstance(node, (int, float)) and not isinstance(node, bool))
        or (t is int and isinstance(node, int) and not isinstance(node, bool))
        or (t not in (float, int) and isinstance(node, t))
        for t in types
    )
    if not ok:
        want = " or ".join({float: "a number", int: "an integer"}.get(t, t.__name__) for t in types)
        fail(f"{_where(path)} must be {want}; got {node!r}", path)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _FREE:
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_experiment(path: str | Path, *, quick: bool = False) -> dict:
    """Read and check an experiment file; ``quick`` merges its ``[quick]`` tables in."""
    import tomllib

    path = Path(path)
    text = path.read_text()
    try:
        exp = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{path}: not valid TOML: {e}") from None
    _check(exp, _TOP, [], text, str(path))
    for sec, key in sorted(_REQUIRED):
        if key not in exp.get(sec, {}):
            line = _line_of(text, [sec])
            raise ExperimentError(
                f"{path}{':' + str(line) if line else ''}: missing key {sec}.{key}"
            )
    names = []
    for i, c in enumerate(exp.get("constraints", [])):
        if c.get("type") not in _CONSTRAINT_TYPES:
            near = difflib.get_close_matches(str(c.get("type")), _CONSTRAINT_TYPES, n=2)
            line = _line_of(text, ["constraints", i, "type"])
            raise ExperimentError(
                f"{path}:{line}: constraints[{i}].type = {c.get('type')!r} is not one of "
                f"{', '.join(_CONSTRAINT_TYPES)}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
            )
        given = [k for k in ("tolerance", "strength", "calibrate") if k in c]
        if len(given) != 1:
            line = _line_of(text, ["constraints", i, "type"])
            raise ExperimentError(
                f"{path}:{line}: constraints[{i}] needs exactly one of tolerance, strength, "
                f"calibrate; got {given or 'none'}"
            )
        names.append(c.get("name") or f"c{i}")
        c.setdefault("name", names[-1])
    for i, cl in enumerate(exp.get("classes", [])):
        for nm in cl.get("constraints", []):
            if nm not in names:
                near = difflib.get_close_matches(str(nm), names, n=2)
                line = _line_of(text, ["classes", i, "constraints"])
                raise ExperimentError(
                    f"{path}:{line}: classes[{i}].constraints names {nm!r}, not a declared "
                    f"constraint ({names})" + (f"; did you mean {near[0]!r}?" if near else "")
                )
    for i, sw in enumerate(exp.get("analyses", {}).get("sweeps", [])):
        if sw.get("knob") not in _KNOBS:
            line = _line_of(text, ["analyses", "sweeps", i, "knob"])
            near = difflib.get_close_matches(str(sw.get("knob")), _KNOBS, n=1)
            raise ExperimentError(
                f"{path}:{line}: analyses.sweeps[{i}].knob = {sw.get('knob')!r} is not one of "
                f"{_KNOBS}" + (f" (did you mean {near[0]!r}?)" if near else "")
            )
    quick_over = exp.pop("quick", {})
    if quick:
        exp = _merge(exp, quick_over)
    exp["_text"] = text
    exp["_path"] = str(path.resolve())
    exp["_quick"] = bool(quick)
    return exp


# --------------------------------------------------------------------------- stages
class _Stages:
    """The stage record ``stages.json``: finished stages and their results."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / _STAGES
        self.done: dict[str, Any] = {}
        if self.path.exists():
            self.done = json.loads(self.path.read_text())

    def finish(self, name: str, result: Any, wall: float) -> None:
        from ._atomic import atomic_write

        self.done[name] = {"result": result, "wall_s": round(wall, 3)}
        data = json.dumps(self.done, indent=1, default=_json).encode()
        atomic_write(self.path, lambda fh: fh.write(data))


def _json(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _clean(v):
    """JSON-safe floats (NaN/inf → None) throughout."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    try:
        import numpy as np

        if isinstance(v, np.generic):
            return _clean(v.item())
    except ImportError:  # pragma: no cover
        pass
    return v


def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _captured(sink: list):
    """Record warnings (plain words for the report) instead of raising or printing them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue  # about library versions, not about the draws
        msg = str(w.message)
        if msg not in sink:
            sink.append(msg)


def _import(spec: str, exp: dict):
    if ":" not in spec:
        raise ExperimentError(f"{exp['_path']}: {spec!r} must be 'module:function'")
    mod, fn = spec.split(":", 1)
    base = Path(exp["_path"]).parent
    extra = exp.get("model", {}).get("path")
    for p in (base / extra if extra else None, base):
        if p is not None and str(p) not in sys.path:
            sys.path.insert(0, str(p))
    try:
        m = importlib.import_module(mod)
    except ImportError as e:
        raise ExperimentError(f"cannot import {mod!r} for {spec!r}: {e}") from e
    try:
        return getattr(m, fn)
    except AttributeError:
        near = difflib.get_close_matches(fn, [n for n in dir(m) if not n.startswith("_")], n=3)
        raise ExperimentError(
            f"{mod!r} has no function {fn!r}" + (f"; did you mean {near}?" if near else "")
        ) from None


class _Run:
    def __init__(self, exp: dict, run_dir: Path, *, resume: bool, quiet: bool, progress: bool):
        self.exp, self.dir, self.quiet, self.progress = exp, run_dir, quiet, progress
        self.stages = _Stages(run_dir)
        self.resume = resume
        self.results: dict[str, Any] = {}
        self.refs: dict[str, Any] = {}
        self.posts: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.n_stage = 0

    # -- helpers -----------------------------------------------------------------
    def stage(self, name: str, fn, *, always: bool = False):
        rec = self.stages.done.get(name)
        self.n_stage += 1
        if rec is not None and not always:
            _say(f"[{self.n_stage:2d}] {name}: done earlier (skipped)", self.quiet)
            return rec["result"]
        t = time.perf_counter()
        try:
            result = fn()
        except ExperimentError:
            raise
        except Exception as e:
            raise StageError(
                f"stage {name!r} failed: {type(e).__name__}: {e}\nFinished stages are kept in "
                f"{self.stages.path}; fix the cause and continue with --resume."
            ) from e
        wall = time.perf_counter() - t
        if not always:
            self.stages.finish(name, _clean(result), wall)
        _say(
            f"[{self.n_stage:2d}] {name}: finished in {wall:.1f} s "
            f"(total {time.perf_counter() - self.t0:.1f} s)",
            self.quiet,
        )
        return result

    # -- model ----------------------------------------------------------------------
    def build_model(self):
        import torch

        spec = self.exp["model"]
        fn = _import(spec["function"], self.exp)
        out = fn(**spec.get("args", {}))
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise ExperimentError(
                f"{spec['function']} must return (net, (x, y)) or (net, (x, y), probes); got "
                f"{type(out).__name__}"
            )
        net, data = out[0], out[1]
        probes = out[2] if len(out) == 3 else {}
        if isinstance(probes, torch.Tensor):
            probes = {"probes": probes}
        probes = dict(probes)
        probes.setdefault("data", data[0])
        self.net, self.data, self.probes = net, data, probes
        n_par = sum(p.numel() for p in net.parameters())
        return {"parameters": int(n_par), "n": int(data[0].shape[0]), "probes": list(probes)}

    def _probes(self, name: str | None, where: str):
        name = name or "probes"
        if name not in self.probes:
            near = difflib.get_close_matches(name, list(self.probes), n=2)
            raise ExperimentError(
                f"{where}: probes {name!r} not returned by the model function; have "
                f"{list(self.probes)}" + (f" (did you mean {near[0]!r}?)" if near else "")
            )
        return self.probes[name]

    # -- declarations ------------------------------------------------------------------
    def classes(self) -> list[dict]:
        cls = self.exp.get("classes") or [
            {"name": "main", "constraints": [c["name"] for c in self.exp.get("constraints", [])]}
        ]
        return cls

    def declare(self, cl: dict, strengths: dict | None = None):
        import torch

        import condpost as cp

        P = self.exp["posterior"]
        lik = P["likelihood"].lower()
        if lik == "gaussian":
            if "scale" not in P:
                raise ExperimentError("posterior.likelihood = 'gaussian' needs posterior.scale")
            likelihood = cp.Gaussian(scale=P["scale"])
        elif lik in ("categorical", "bernoulli"):
            likelihood = cp.Categorical() if lik == "categorical" else cp.Bernoulli()
        else:
            raise ExperimentError(
                f"posterior.likelihood must be 'categorical', 'gaussian' or 'bernoulli'; got "
                f"{P['likelihood']!r}"
            )
        dtype = getattr(torch, P["dtype"]) if "dtype" in P else None
        post = cp.LocalPosterior(
            self.net,
            self.data,
            likelihood,
            nbeta=cl.get("nbeta", P.get("nbeta", "wbic")),
            localization=float(cl.get("localization", P["localization"])),
            include=cl.get("include", P.get("include")),
            exclude=cl.get("exclude", P.get("exclude")),
            dtype=dtype,
            check_center=bool(P.get("check_center", True)) and cl is self.classes()[0],
        )
        wanted = cl.get("constraints", [])
        strengths = strengths or {}
        for c in self.exp.get("constraints", []):
            if c["name"] not in wanted:
                continue
            if c.get("calibrate", {}).get("keep", "strength") == "tolerance" and strengths:
                tol = strengths[f"{c['name']}:tolerance_at_nbeta"]
                post.preserve(self.constraint(c, None, tolerance=tol))
            else:
                post.preserve(self.constraint(c, strengths.get(c["name"])))
        return post

    def constraint(self, c: dict, strength: float | None, tolerance: float | None = None):
        import condpost as cp

        kw: dict[str, Any] = {"name": c["name"]}
        if tolerance is not None:
            kw["tolerance"] = float(tolerance)
        elif strength is not None:
            kw["strength"] = float(strength)
        elif "calibrate" in c:
            kw["tolerance"] = 1.0  # replaced by the calibration
        elif "tolerance" in c:
            kw["tolerance"] = c["tolerance"]
        else:
            kw["strength"] = c["strength"]
        where = f"constraint {c['name']!r}"
        t = c["type"]
        if t == "Activations":
            return cp.Activations(
                c["site"],
                self._probes(c.get("probes"), where),
                measure=c.get("measure", "mse"),
                side=c.get("side", "two"),
                margin=c.get("margin", 0.0),
                **kw,
            )
        if t == "CircuitMap":
            return cp.CircuitMap(
                c["source"],
                c["target"],
                self._probes(c.get("probes"), where),
                interventions=c.get("interventions", "clean"),
                seed=c.get("seed", 0),
                side=c.get("side", "two"),
                **kw,
            )
        if t == "Outputs":
            return cp.Outputs(self._probes(c.get("probes"), where), **kw)
        return cp.LossLevel(c.get("margin", 0.0), **kw)

    def sampler(self, cl: dict) -> dict:
        s = _merge(self.exp.get("sampler", {}), cl.get("sampler", {}))
        s.setdefault("method", "nuts")
        return s

    # -- sampling --------------------------------------------------------------------
    def sample(self, post, s: dict, key: str, *, seed_offset: int = 0, base_nbeta=None):
        """Sample into the run folder (a resumable store for SG-MCMC), or load it back."""
        import condpost as cp
        from condpost.infer import registry

        method = s["method"]
        opts = dict(s.get("options", {}))
        if s.get("scale_step_size") and "step_size" in opts and base_nbeta:
            opts["step_size"] = float(opts["step_size"]) * base_nbeta / post.nbeta
        if "max_step_size" in s and "step_size" in opts:
            opts["step_size"] = min(float(opts["step_size"]), float(s["max_step_size"]))
        draws_dir = self.dir / "draws"
        draws_dir.mkdir(exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", key)
        sg = registry.get(method).kind == "sgmcmc"
        common = dict(
            chains=int(s.get("chains", 4)),
            warmup=int(s.get("warmup", 500)),
            draws=int(s.get("draws", 500)),
            seed=int(s.get("seed", 0)) + seed_offset,
            progress=self.progress,
        )
        if sg:
            path = draws_dir / f"{safe}.cpst"
            done = self.stages.done.get(f"stored:{key}")
            if done is not None and path.exists():
                return cp.open_store(path, posterior=post)
            resume = path.exists() and (path / "meta.json").exists()
            if path.exists() and not resume:
                import shutil

                shutil.rmtree(path)  # a store that never wrote its metadata: start over
            ref = post.sample(method, store=str(path), resume=resume, **common, **opts)
        else:
            path = draws_dir / f"{safe}.npz"
            if self.stages.done.get(f"stored:{key}") is not None and path.exists():
                return cp.ReferenceClass.load(path, posterior=post)
            ref = post.sample(method, **common, **opts)
            ref.save(path)
        self.stages.finish(f"stored:{key}", {"path": str(path.relative_to(self.dir))}, 0.0)
        return ref

    # -- measurements ------------------------------------------------------------------
    def observables(self, cl: dict, post) -> dict:
        """name → callable(ref) for the sweeps (and the base analyses)."""
        from condpost.info.ensemble import mutual_information

        A = self.exp.get("analyses", {})
        obs: dict[str, Any] = {}
        units: dict[str, str] = {}
        if A.get("llc", True):
            obs["llc"] = lambda ref: ref.llc(warn_user=False)
            units["llc"] = "λ̂ (learning coefficient)"
        for b in post.constraints:
            nm = f"binding[{b.name}]"

            def _bind(ref, _n=b.name):
                row = ref.preservation(warn_user=False)[_n]
                return row.get("binding", float("nan")), row.get("binding_se", float("nan"))

            obs[nm] = _bind
            units[nm] = "binding ratio"
        for m in A.get("mi", []):
            kw = {k: v for k, v in m.items() if k not in ("name", "probes")}
            kw.setdefault("progress", False)
            pr = self._probes(m.get("probes"), f"analyses.mi {m.get('name')!r}")
            nm = m.get("name") or f"mi[{m.get('a')};{m.get('b')}]"

            def _mi(ref, _kw=kw, _pr=pr):
                return mutual_information(ref, probes=_pr, **_kw)

            obs[nm] = _mi
            units[nm] = "nats"
        for o in A.get("observables", []):
            fn = _import(o["function"], self.exp)
            args = dict(o.get("args", {}))
            obs[o["name"]] = lambda ref, _f=fn, _a=args: _f(ref, **_a)
            if "unit" in o:
                units[o["name"]] = o["unit"]
        return obs, units

    def measure(self, ref, obs: dict, notes: list) -> dict:
        from condpost.sweep import _value_se

        out = {}
        for nm, fn in obs.items():
            try:
                with _captured(notes):
                    v, se = _value_se(fn(ref))
            except Exception as e:  # noqa: BLE001 - one failed observable must not end the run
                notes.append(f"{nm}: could not be measured ({type(e).__name__}: {e})")
                v, se = float("nan"), float("nan")
            out[nm] = [v, se]
        return out

    def analyse(self, cl: dict, post, ref) -> dict:
        from . import plots

        A = self.exp.get("analyses", {})
        name = cl["name"]
        rec = self.stages.done.get(f"sample:{name}", {}).get("result") or {}
        notes: list[str] = list(rec.get("warnings", []))
        res: dict[str, Any] = {"nbeta": post.nbeta, "localization": post.localization}
        res["constraints"] = [
            {"name": b.name, "tolerance": b.tolerance, "strength": b.strength, "rho": b.rho}
            for b in post.constraints
        ]
        res["settings"] = {
            k: v
            for k, v in ref.settings.items()
            if isinstance(v, (int, float, str, bool)) or v is None
        }
        if A.get("summary", True):
            with _captured(notes):
                summ = ref.summary(warn_user=False)
            res["summary"] = summ.to_dict()
            notes.extend(summ.warnings)
        if A.get("llc", True):
            with _captured(notes):
                llc = ref.llc(warn_user=True)
            res["llc"] = {"mean": llc.mean, "stderr": llc.stderr, "std": llc.std}
        if A.get("preservation", True) and post.constraints:
            with _captured(notes):
                rep = ref.preservation(warn_user=False)
            res["preservation"] = rep.rows
            notes.extend(rep.warnings)
        if A.get("loo", False):
            import arviz as az

            with _captured(notes):
                idata = ref.to_arviz()
                if "log_likelihood" in idata.groups():
                    lo = az.loo(idata)
                    res["loo"] = {"elpd_loo": float(lo.elpd_loo), "se": float(lo.se)}
        obs, _ = self.observables(cl, post)
        res["observables"] = self.measure(ref, obs, notes)
        figs = self.dir / "figures"
        figs.mkdir(exist_ok=True)
        tr = A.get("traces", {})
        coords = [int(c) for c in tr.get("coordinates", [])]
        with _figure(figs / f"{name}_loss_trace.png"):
            plots.loss_trace(ref)
        with _captured(notes):
            with _figure(figs / f"{name}_trace.png"):
                plots.trace(ref, coords)
            if tr.get("rank", True) and ref.chains > 1:
                with _figure(figs / f"{name}_rank.png"):
                    plots.rank(ref, coords)
        if post.constraints and "preservation" in res:
            with _figure(figs / f"{name}_preservation.png"):
                plots.preservation(ref.preservation(warn_user=False))
        res["warnings"] = list(dict.fromkeys(notes))
        return res

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        import torch

        threads = self.exp.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        info = self.stage("model", self.build_model, always=True)
        self.results["model"] = info
        classes = self.classes()
        self.results["classes"] = {}
        self.results["sweeps"] = {}
        for cl in classes:
            name = cl["name"]
            strengths = (
                self.stage(f"calibrate:{name}", lambda cl=cl: self.calibrate(cl))
                if any(
                    "calibrate" in c and c["name"] in cl.get("constraints", [])
                    for c in self.exp.get("constraints", [])
                )
                else {}
            )
            post = self.declare(cl, strengths)
            self.posts[name] = post
            s = self.sampler(cl)

            def _sample(post=post, s=s, name=name):
                notes: list[str] = []
                with _captured(notes):
                    ref = self.sample(post, s, name, base_nbeta=post.nbeta)
                self.refs[name] = ref
                return {"chains": ref.chains, "draws": ref.num_draws, "d": ref.d, "warnings": notes}

            self.stage(f"sample:{name}", _sample)
            if name not in self.refs:
                self.refs[name] = self.sample(post, s, name, base_nbeta=post.nbeta)
            res = self.stage(
                f"analyse:{name}",
                lambda cl=cl, post=post, name=name: self.analyse(cl, post, self.refs[name]),
            )
            res["description"] = cl.get("description", "")
            self.results["classes"][name] = res
            for sw in self.exp.get("analyses", {}).get("sweeps", []):
                if sw.get("classes") and name not in sw["classes"]:
                    continue
                self.results["sweeps"].setdefault(_sweep_key(sw), {})[name] = self.sweep(
                    cl, post, s, sw
                )
        self.results["wall_s"] = time.perf_counter() - self.t0
        return self.results

    def calibrate(self, cl: dict) -> dict:
        import condpost as cp

        post = self.declare(cl)
        s = self.sampler(cl)
        out = {}
        for c in self.exp.get("constraints", []):
            if c["name"] not in cl.get("constraints", []) or "calibrate" not in c:
                continue
            k = dict(c["calibrate"])
            target = float(k.pop("target_binding", 0.5))
            keep = k.pop("keep", "strength")
            if keep not in ("strength", "tolerance"):
                raise ExperimentError(
                    f"constraint {c['name']!r}: calibrate.keep must be 'strength' (relative: "
                    f"ρ follows nβ) or 'tolerance' (absolute σ, fixed across nβ); got {keep!r}"
                )
            pilot = k.pop("pilot", None)
            if pilot is not None:
                if pilot not in self.refs:
                    raise ExperimentError(
                        f"constraint {c['name']!r}: calibrate.pilot = {pilot!r} must name a "
                        f"reference class declared (and so sampled) before {cl['name']!r}; "
                        f"sampled so far: {list(self.refs)}"
                    )
                k["pilot"] = self.refs[pilot]
            opts = dict(s.get("options", {}))
            opts.pop("step_size", None) if s["method"] == "nuts" else None
            cal = cp.calibrate(
                post,
                target,
                constraints=[c["name"]],
                method=s["method"],
                sample_kwargs=opts,
                progress=self.progress,
                **k,
            )
            b = next(b for b in cal.constraints if b.name == c["name"])
            out[c["name"]] = b.strength
            out[f"{c['name']}:tolerance_at_nbeta"] = b.tolerance or math.sqrt(b.k / (2 * b.rho))
        return out

    def sweep(self, cl: dict, post, s: dict, sw: dict) -> dict:
        from condpost.sweep import sweep as run_sweep

        knob = sw["knob"]
        name = cl["name"]
        obs, units = self.observables(cl, post)
        if sw.get("observables"):
            keep = set(sw["observables"])
            obs = {k: v for k, v in obs.items() if k in keep or k.split("[")[0] in keep}
        values = [float(v) for v in sw["values"]]
        rows = []
        for i, v in enumerate(values):
            stage = f"sweep:{name}:{knob}={v:g}"

            def _one(v=v, i=i):
                notes: list[str] = []
                kwargs: dict[str, Any] = {}
                if knob == "tolerance":
                    cname = sw.get("constraint") or post.constraints[0].name
                    if cname not in [b.name for b in post.constraints]:
                        return {"skipped": f"class {name!r} has no constraint {cname!r}"}
                    kwargs["tolerance"] = {cname: [v]}
                else:
                    kwargs[knob] = [v]
                base = knob == "nbeta" and math.isclose(v, post.nbeta, rel_tol=1e-9)
                base = base or (knob == "localization" and math.isclose(v, post.localization))

                def method(p, *, chains, warmup, draws, seed, progress, **kw):
                    if base and name in self.refs:
                        return self.refs[name]
                    return self.sample(
                        p, s, f"{name}-{knob}={v:g}", seed_offset=i + 1, base_nbeta=post.nbeta
                    )

                def guard(fn, nm):
                    def g(ref):
                        try:
                            return fn(ref)
                        except Exception as e:  # noqa: BLE001 - recorded, as in analyse
                            notes.append(f"{nm}: could not be measured ({type(e).__name__}: {e})")
                            return float("nan"), float("nan")

                    return g

                with _captured(notes):
                    res = run_sweep(
                        post,
                        **kwargs,
                        method=method,
                        observables={nm: guard(fn, nm) for nm, fn in obs.items()},
                        keep=False,
                        progress=False,
                    )
                return {
                    "value": v,
                    "observables": {k: list(x[0]) for k, x in res.observables.items()},
                    "settings": res.settings[0],
                    "warnings": notes,
                }

            rows.append(self.stage(stage, _one))
        rows = [r for r in rows if "skipped" not in r]
        return {
            "knob": knob
            if knob != "tolerance"
            else f"tolerance:{sw.get('constraint') or (post.constraints[0].name if post.constraints else '')}",
            "rows": rows,
            "units": units,
        }


def _sweep_key(sw: dict) -> str:
    return sw["knob"] + (f":{sw['constraint']}" if sw.get("constraint") else "")


@contextlib.contextmanager
def _figure(path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")
    try:
        yield
        fig = plt.gcf()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close("all")


def run_experiment(
    path: str | Path,
    *,
    out: str | Path | None = None,
    quick: bool = False,
    resume: bool = False,
    quiet: bool = False,
    progress: bool | None = None,
) -> Path:
    """Run an experiment file and write its run folder; returns the folder's path."""
    from . import report as _report

    exp = load_experiment(path, quick=quick)
    stem = Path(path).stem + ("-quick" if quick else "")
    run_dir = Path(out) if out else Path("runs") / stem
    if run_dir.exists() and (run_dir / _STAGES).exists() and not resume:
        raise ExperimentError(
            f"{run_dir} holds an earlier run; pass --resume to continue it, or --out another folder"
        )
    if resume and (run_dir / "experiment.toml").exists():
        before = (run_dir / "experiment.toml").read_text()
        if before != exp["_text"]:
            raise ExperimentError(
                f"--resume: {path} differs from the declaration of the run in {run_dir} "
                f"(experiment.toml there); resume with the same file or start a new folder"
            )
        meta = (
            json.loads((run_dir / "run.json").read_text())
            if (run_dir / "run.json").exists()
            else {}
        )
        if meta.get("quick", quick) != quick:
            raise ExperimentError(
                f"--resume: the run in {run_dir} was {'' if meta.get('quick') else 'not '}"
                f"started with --quick; give the same flags"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "experiment.toml").write_text(exp["_text"])
    (run_dir / "run.json").write_text(
        json.dumps({"experiment": exp["_path"], "quick": quick, "argv": sys.argv[1:]}, indent=1)
    )
    if progress is None:
        progress = (not quiet) and sys.stderr.isatty()
    r = _Run(exp, run_dir, resume=resume, quiet=quiet, progress=progress)
    results = r.run()
    t = time.perf_counter()
    results["experiment"] = {
        "path": exp["_path"],
        "quick": quick,
        "title": exp.get("title", Path(path).stem),
        "description": exp.get("description", ""),
    }
    results["stages"] = {k: v["wall_s"] for k, v in r.stages.done.items() if "wall_s" in v}
    from ._version import __version__

    results["versions"] = {"condpost": __version__, "python": sys.version.split()[0]}
    (run_dir / "results.json").write_text(json.dumps(_clean(results), indent=1, default=_json))
    _report.build(run_dir, quiet=quiet)
    r.n_stage += 1
    _say(
        f"[{r.n_stage:2d}] report: finished in {time.perf_counter() - t:.1f} s "
        f"(total {time.perf_counter() - r.t0:.1f} s) → {run_dir / 'report.html'}",
        quiet,
    )
    return run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="condpost", description="Run a condpost experiment file, or rebuild its report."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run experiment.toml and write a run folder")
    p_run.add_argument("experiment", help="the experiment file (TOML)")
    p_run.add_argument("--quick", action="store_true", help="merge the file's [quick] tables")
    p_run.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p_run.add_argument("--out", default=None, help="run folder (default runs/<file stem>)")
    p_run.add_argument("--quiet", action="store_true", help="no progress lines")
    p_rep = sub.add_parser("report", help="rebuild report.html (and figures) of a run folder")
    p_rep.add_argument("run_dir")
    p_chk = sub.add_parser("check", help="check an experiment file without running it")
    p_chk.add_argument("experiment")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            run_experiment(
                args.experiment,
                out=args.out,
                quick=args.quick,
                resume=args.resume,
                quiet=args.quiet,
            )
        elif args.cmd == "report":
            from . import report as _report

            path = _report.build(Path(args.run_dir))
            print(path)
        else:
            load_experiment(args.experiment)
            print(f"{args.experiment}: ok")
    except (ExperimentError, FileNotFoundError) as e:
        print(f"condpost: error: {e}", file=sys.stderr)
        return 2
    except StageError as e:
        import traceback

        traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"condpost: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
