"""The report of a run folder: CSV tables, sweep figures and a self-contained ``report.html``.

``build(run_dir)`` reads ``results.json`` and ``experiment.toml`` (written by
``condpost run``), draws the figures over the precision scale (one observable per
figure, every reference class on it), writes ``tables/*.csv`` and ``report.html`` with
every PNG of ``figures/`` embedded as base64 (no file or network reference). It needs no
draws and no network: ``condpost report RUN_DIR`` rebuilds a report from the folder.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["build", "sweep_results"]


def _num(v) -> str:
    if v is None:
        return "nan"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def _write_csv(path: Path, rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return cols


def sweep_results(results: dict) -> dict[str, dict[str, Any]]:
    """``{sweep key: {class: SweepResult}}`` rebuilt from ``results.json``."""
    from .sweep import SweepResult

    out: dict[str, dict[str, Any]] = {}
    for key, per_class in results.get("sweeps", {}).items():
        for cname, sw in per_class.items():
            rows = sw["rows"]
            if not rows:
                continue
            names = list(rows[0]["observables"])
            obs = {
                nm: [
                    tuple(float("nan") if x is None else float(x) for x in r["observables"][nm])
                    for r in rows
                ]
                for nm in names
            }
            out.setdefault(key, {})[cname] = SweepResult(
                knob=sw["knob"],
                values=[float(r["value"]) for r in rows],
                observables=obs,
                results={},
                settings=[r.get("settings", {}) for r in rows],
                units=dict(sw.get("units", {})),
            )
    return out


def _tables(run_dir: Path, results: dict) -> dict[str, tuple[list[str], list[dict]]]:
    """Every table of the report: name → (columns, rows); also written as CSV."""
    tables: dict[str, tuple[list[str], list[dict]]] = {}
    out = run_dir / "tables"
    out.mkdir(exist_ok=True)
    classes = results.get("classes", {})
    # one row per reference class
    rows = []
    for name, res in classes.items():
        row: dict[str, Any] = {
            "class": name,
            "nbeta": res.get("nbeta"),
            "localization": res.get("localization"),
        }
        for c in res.get("constraints", []):
            row[f"tolerance[{c['name']}]"] = c.get("tolerance")
            row[f"strength[{c['name']}]"] = c.get("strength")
        for nm, (v, se) in res.get("observables", {}).items():
            row[nm] = v
            row[f"{nm}_se"] = se
        rows.append(row)
    if rows:
        tables["classes"] = (_write_csv(out / "classes.csv", rows), rows)
    for name, res in classes.items():
        if "summary" in res:
            rs = res["summary"]["rows"]
            tables[f"summary_{name}"] = (_write_csv(out / f"summary_{name}.csv", rs), rs)
        if res.get("preservation"):
            rp = res["preservation"]
            tables[f"preservation_{name}"] = (_write_csv(out / f"preservation_{name}.csv", rp), rp)
    for key, per_class in results.get("sweeps", {}).items():
        rows = []
        for cname, sw in per_class.items():
            for r in sw["rows"]:
                row = {"class": cname, sw["knob"]: r["value"]}
                st = r.get("settings", {})
                row.setdefault("nbeta", st.get("nbeta"))
                row.setdefault("localization", st.get("localization"))
                for nm, (v, se) in r["observables"].items():
                    row[nm] = v
                    row[f"{nm}_se"] = se
                rows.append(row)
        if rows:
            safe = key.replace(":", "_")
            tables[f"sweep_{safe}"] = (_write_csv(out / f"sweep_{safe}.csv", rows), rows)
    return tables


def _sweep_figures(run_dir: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import plots

    figs = run_dir / "figures"
    figs.mkdir(exist_ok=True)
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    names = list(results.get("classes", {}))
    for per_class in results.get("sweeps", {}).values():
        names += [c for c in per_class if c not in names]
    colors = {c: cycle[i % len(cycle)] for i, c in enumerate(names)}
    for key, per_class in sweep_results(results).items():
        names: list[str] = []
        for res in per_class.values():
            names += [n for n in res.observables if n not in names]
        safe = key.replace(":", "_")
        for nm in names:
            plt.close("all")
            try:
                ax = plots.precision_curve(per_class, nm, colors=colors)
                if nm.startswith("binding"):
                    for lvl in (0.05, 0.95):
                        ax.axhline(lvl, color="grey", ls=":", lw=1)
                fname = nm.replace("[", "_").replace("]", "").replace(":", "_").replace("/", "_")
                ax.figure.tight_layout()
                ax.figure.savefig(figs / f"sweep_{safe}_{fname}.png", dpi=110)
            finally:
                plt.close("all")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.4em .8em;margin:.3em 0}
.ok{background:#eef8ee;border-left:4px solid #3a3;padding:.4em .8em}
figure{display:inline-block;margin:.5em;vertical-align:top}figure img{max-width:520px}
figcaption{font-size:.8em;color:#555}
"""


def _html_table(cols: list[str], rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_num(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
        f"<figcaption>figures/{html.escape(path.name)}</figcaption></figure>"
    )


def build(run_dir: str | Path, *, quiet: bool = True) -> Path:
    """Write ``tables/*.csv``, the sweep figures and ``report.html`` of a run folder."""
    run_dir = Path(run_dir)
    rpath = run_dir / "results.json"
    if not rpath.exists():
        raise FileNotFoundError(f"{run_dir} is not a finished condpost run (no results.json)")
    results = json.loads(rpath.read_text())
    decl = (
        (run_dir / "experiment.toml").read_text() if (run_dir / "experiment.toml").exists() else ""
    )
    _sweep_figures(run_dir, results)
    tables = _tables(run_dir, results)
    exp = results.get("experiment", {})
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(str(exp.get('title', 'condpost run')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(str(exp.get('title', 'condpost run')))}</h1>",
    ]
    if exp.get("description"):
        parts.append(f"<p>{html.escape(exp['description'])}</p>")
    model = results.get("model", {})
    parts.append(
        f"<p>Model: {model.get('parameters', '?')} parameters, n = {model.get('n', '?')} "
        f"training samples. Run {'with --quick ' if exp.get('quick') else ''}in "
        f"{results.get('wall_s', float('nan')):.1f} s; condpost "
        f"{html.escape(str(results.get('versions', {}).get('condpost', '?')))}.</p>"
    )
    # diagnostics first: what a reader must know before reading numbers
    parts.append("<h2>Diagnostics</h2>")
    for name, res in results.get("classes", {}).items():
        parts.append(f"<h3>{html.escape(name)}</h3>")
        if res.get("description"):
            parts.append(f"<p>{html.escape(res['description'])}</p>")
        s = res.get("settings", {})
        parts.append(
            f"<p>{html.escape(str(s.get('method', '?')))}: {s.get('chains', '?')} chains × "
            f"{s.get('draws', '?')} draws; nβ = {_num(res.get('nbeta'))}, γ = "
            f"{_num(res.get('localization'))}"
            + "".join(
                f"; {html.escape(c['name'])}: "
                + (
                    f"tolerance σ = {_num(c.get('tolerance'))}"
                    if c.get("tolerance") is not None
                    else f"strength α = {_num(c.get('strength'))}"
                )
                + f" (ρ = {_num(c.get('rho'))})"
                for c in res.get("constraints", [])
            )
            + "</p>"
        )
        if "llc" in res:
            ll = res["llc"]
            parts.append(f"<p>λ̂ = {_num(ll.get('mean'))} ± {_num(ll.get('stderr'))} (MC s.e.)</p>")
        if "summary" in res:
            sm = res["summary"]
            parts.append(
                f"<p>virial ratio {_num(sm.get('virial_ratio'))} ± "
                f"{_num(sm.get('virial_stderr'))} (expect 1); {sm.get('divergences', 0)} "
                f"divergent transition(s)</p>"
            )
        warns = res.get("warnings", [])
        if warns:
            parts += [f"<div class='warn'>⚠ {html.escape(w)}</div>" for w in warns]
        else:
            parts.append("<div class='ok'>no warnings</div>")
    for key, per_class in results.get("sweeps", {}).items():
        for cname, sw in per_class.items():
            for r in sw["rows"]:
                for w in r.get("warnings", []):
                    parts.append(
                        f"<div class='warn'>⚠ sweep {html.escape(key)}, {html.escape(cname)} at "
                        f"{_num(r['value'])}: {html.escape(w)}</div>"
                    )
    parts.append("<h2>Figures</h2>")
    figs = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").exists() else []
    sweep_figs = [f for f in figs if f.name.startswith("sweep_")]
    other = [f for f in figs if f not in sweep_figs]
    if sweep_figs:
        parts.append("<h3>Over the precision scale</h3>")
        parts += [_img(f) for f in sweep_figs]
    if other:
        parts.append("<h3>Per reference class</h3>")
        parts += [_img(f) for f in other]
    parts.append("<h2>Tables</h2>")
    for tname, (cols, rows) in tables.items():
        parts.append(f"<h3 id='table-{html.escape(tname)}'>{html.escape(tname)}</h3>")
        parts.append(f"<p>tables/{html.escape(tname)}.csv</p>")
        parts.append(_html_table(cols, rows))
    parts.append("<h2>Declaration</h2>")
    parts.append(f"<pre>{html.escape(decl)}</pre>")
    stages = results.get("stages", {})
    if stages:
        parts.append("<h2>Stages</h2>")
        srows = [
            {"stage": k, "wall_s": v} for k, v in stages.items() if not k.startswith("stored:")
        ]
        parts.append(_html_table(["stage", "wall_s"], srows))
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
    return out
