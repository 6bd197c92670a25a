"""The CLI: experiment files (errors with line and nearest keys), run folders, resume,
report rebuild, and the precision-scale example with --quick."""

from __future__ import annotations

import base64
import csv
import json
import math
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from condpost import cli

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = """
import os
import torch


def model(n=40, hidden=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.tanh(2 * x[:, :1]) + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    ).double()
    opt = torch.optim.LBFGS(net.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return net, (x, y), {"probes": x[:6]}


def weight_norm(ref, fail_flag=""):
    if fail_flag and os.path.exists(fail_flag):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C here
    W = ref.flat()
    v = (W**2).sum(-1)
    return float(v.mean()), float(v.std() / v.size**0.5)
"""

TINY_TOML = """
title = "tiny"
threads = 1

[model]
function = "tinymodel:model"

[posterior]
likelihood = "gaussian"
scale = 0.1
nbeta = 20.0
localization = 10.0

[[constraints]]
type = "Activations"
name = "hidden"
site = "1"
probes = "probes"
tolerance = 0.1

[sampler]
method = "sgld"
chains = 2
warmup = 40
draws = 40
scale_step_size = true
options = {{ step_size = 1e-3, batch_size = 20 }}

[[classes]]
name = "free"

[[classes]]
name = "held"
constraints = ["hidden"]

[analyses]
traces = {{ coordinates = [0] }}

[[analyses.observables]]
name = "norm"
function = "tinymodel:weight_norm"
unit = "squared norm"
args = {{ fail_flag = "{flag}" }}

[[analyses.sweeps]]
knob = "nbeta"
values = [20.0, 80.0]
"""


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "tinymodel.py").write_text(TINY_MODEL)
    flag = tmp_path / "fail.flag"
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML.format(flag=flag))
    return path, flag


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in ("href", "src"):
            if k in a and tag != "img":
                self.links.append(a[k])

    def handle_data(self, data):
        self.text.append(data)


def check_run_folder(run: Path) -> dict:
    """The run folder's contents; report.html self-contained; tables hold results.json."""
    for p in ("experiment.toml", "stages.json", "results.json", "report.html", "draws"):
        assert (run / p).exists(), p
    results = json.loads((run / "results.json").read_text())
    figs = sorted((run / "figures").glob("*.png"))
    assert figs
    for f in figs:
        data = f.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", f
    page = _Refs()
    page.feed((run / "report.html").read_text())
    assert not page.links, page.links  # no link or script to any other file
    assert len(page.imgs) == len(figs)
    for src in page.imgs:  # every image embedded, and a PNG
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = " ".join(page.text)
    for f in figs:  # each figure named in the report
        assert f"figures/{f.name}" in text
    # the tables hold the results: classes.csv and the HTML table against results.json
    with open(run / "tables" / "classes.csv") as fh:
        rows = {r["class"]: r for r in csv.DictReader(fh)}
    assert set(rows) == set(results["classes"])
    for cname, res in results["classes"].items():
        for nm, (v, _) in res["observables"].items():
            if v is None:
                continue
            assert float(rows[cname][nm]) == pytest.approx(v, rel=1e-12), (cname, nm)
            assert f"{v:.4g}" in text, (cname, nm, v)
    assert "Declaration" in text and "[posterior]" in text
    return results


def test_invalid_file_names_key_line_and_nearest(tmp_path, tiny):
    path, _ = tiny
    text = path.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("chains = 2", "chians = 2"))
    line = text.splitlines().index("chains = 2") + 1
    with pytest.raises(cli.ExperimentError) as e:
        cli.load_experiment(bad)
    msg = str(e.value)
    assert f"bad.toml:{line}:" in msg and "'sampler.chians'" in msg
    assert "did you mean 'chains'" in msg and "warmup" in msg
    bad.write_text(text.replace('type = "Activations"', 'type = "Activation"'))
    with pytest.raises(cli.ExperimentError, match=r"bad.toml:\d+:.*did you mean 'Activations'"):
        cli.load_experiment(bad)
    bad.write_text(text.replace("localization = 10.0", 'localization = "ten"'))
    with pytest.raises(
        cli.ExperimentError, match=r"bad.toml:\d+: posterior.localization must be a number"
    ):
        cli.load_experiment(bad)
    bad.write_text(text.replace('knob = "nbeta"', 'knob = "nbta"'))
    with pytest.raises(cli.ExperimentError, match="did you mean 'nbeta'"):
        cli.load_experiment(bad)
    bad.write_text(text.replace('constraints = ["hidden"]', 'constraints = ["hiden"]'))
    with pytest.raises(cli.ExperimentError, match="did you mean 'hidden'"):
        cli.load_experiment(bad)
    # through the command line: exit status 2 and the message on stderr
    assert cli.main(["check", str(bad)]) == 2


def test_run_resume_and_report(tmp_path, tiny, capsys):
    path, flag = tiny
    ref_run = cli.run_experiment(path, out=tmp_path / "whole", progress=False)
    full = check_run_folder(ref_run)
    assert set(full["classes"]) == {"free", "held"}
    assert full["classes"]["held"]["preservation"][0]["constraint"] == "hidden"
    assert [r["value"] for r in full["sweeps"]["nbeta"]["held"]["rows"]] == [20.0, 80.0]
    err = capsys.readouterr().err
    assert "sample:free: finished" in err and "report: finished" in err
    # interrupted (Ctrl-C) in the first class's analysis, after its draws were stored
    flag.write_text("")
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        cli.run_experiment(out=out, path=path, quiet=True, progress=False)
    stages = json.loads((out / "stages.json").read_text())
    assert "sample:free" in stages and "analyse:free" not in stages
    assert not (out / "results.json").exists()
    # without --resume an existing run is refused
    with pytest.raises(cli.ExperimentError, match="--resume"):
        cli.run_experiment(path, out=out, progress=False)
    flag.unlink()
    cli.run_experiment(path, out=out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "done earlier (skipped)" in err
    resumed = check_run_folder(out)
    for r in (resumed, full):
        for res in r["classes"].values():
            for k in ("wall_time_s", "num_threads"):  # how it ran, not what it found
                res["settings"].pop(k, None)
    assert json.dumps(resumed["classes"], sort_keys=True) == json.dumps(
        full["classes"], sort_keys=True
    )
    assert resumed["sweeps"] == full["sweeps"]
    # condpost report rebuilds the report from the folder alone
    (out / "report.html").unlink()
    assert cli.main(["report", str(out)]) == 0
    check_run_folder(out)


def test_precision_scale_example_quick(tmp_path):
    """`condpost run examples/precision_scale.toml --quick` (the CI run) end to end."""
    t = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "condpost",
            "run",
            str(ROOT / "examples" / "precision_scale.toml"),
            "--quick",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = check_run_folder(tmp_path / "run")
    assert set(results["classes"]) == {"unconditioned", "conditioned", "wide"}
    for res in results["classes"].values():
        for nm in ("llc", "accuracy", "embed_fourier", "neuron_fourier", "mi_attn_mlp"):
            v, se = res["observables"][nm]
            assert v is not None and math.isfinite(v), nm
    assert "binding[neurons]" in results["classes"]["conditioned"]["observables"]
    figs = {f.name for f in (tmp_path / "run" / "figures").glob("sweep_nbeta_*.png")}
    assert {
        "sweep_nbeta_accuracy.png",
        "sweep_nbeta_llc.png",
        "sweep_nbeta_mi_attn_mlp.png",
    } <= figs
    assert proc.stderr.count("finished in") >= 14
    print(f"precision_scale --quick: {wall:.1f} s")
