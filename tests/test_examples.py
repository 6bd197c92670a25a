"""The README demo and the examples run end to end (quick settings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_quick():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "condpost.demo",
            "--quiet",
            "--chains",
            "1",
            "--warmup",
            "100",
            "--draws",
            "60",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "λ̂" in r.stdout and "binding" in r.stdout and "R-hat" not in r.stderr


def test_pyro_primitives_example_parity():
    r = subprocess.run(
        [sys.executable, "examples/pyro_primitives.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("max |log joint"))
    assert float(line.split("=")[-1]) < 1e-8


def test_circuit_preservation_example_quick(tmp_path):
    out = tmp_path / "plot.png"
    r = subprocess.run(
        [sys.executable, "examples/circuit_preservation.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shrinkage" in r.stdout and "achieved binding" in r.stdout
    assert out.stat().st_size > 1000


def test_information_flow_example_quick(tmp_path):
    out = tmp_path / "flow.png"
    r = subprocess.run(
        [sys.executable, "examples/information_flow.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "d[input]/d log nβ" in r.stdout
    assert out.stat().st_size > 1000
