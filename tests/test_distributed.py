"""condpost.distributed: SG-MCMC chain groups over torch.distributed processes.

The central check launches two gloo processes with torchrun on this machine and
compares the merged draws with a one-process run of the same seed, bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import condpost as cp
from condpost import distributed as cpd

ROOT = Path(__file__).resolve().parents[1]

# the declaration, written once: the test process and the torchrun workers build it alike
PROBLEM = textwrap.dedent(
    """
    import torch
    import condpost as cp

    def problem():
        g = torch.Generator().manual_seed(11)
        net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        net.eval()
        x = torch.randn(64, 3, generator=g)
        y = torch.randint(0, 2, (64,), generator=g)
        return cp.LocalPosterior(net, (x, y), cp.Categorical(), localization=1.0,
                                 check_center=False)

    KW = dict(warmup=10, draws=15, seed=7, step_size=1e-3, batch_size=16, num_threads=1,
              record_losses=True, chunk_draws=6)
    """
)

WORKER = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    from problem import problem, KW
    from condpost import distributed as cpd

    ref = cpd.sample(problem(), "sgld", chains=4, store=sys.argv[1] + "/run", **KW)
    ctx = cpd.context()
    if ctx.rank == 0:
        np.savez(sys.argv[1] + "/merged.npz", draws=ref.flat(), loss=ref.stat("loss"),
                 virial=ref.stat("virial"), dist2=ref.stat("dist2"),
                 records=ref.records["losses"], world=ref.settings["distributed"]["world_size"])
    else:
        assert ref is None
    """
)


def _problem(tmp_path):
    (tmp_path / "problem.py").write_text(PROBLEM)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        import problem as mod

        importlib.reload(mod)
    finally:
        sys.path.remove(str(tmp_path))
    return mod.problem, mod.KW


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_torchrun(tmp_path, nproc: int):
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(tmp_path / "worker.py"), str(tmp_path), str(tmp_path),
    ]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return dict(np.load(tmp_path / "merged.npz")), wall


def test_two_gloo_processes_equal_one_process_bit_for_bit(tmp_path):
    problem, kw = _problem(tmp_path)
    post = problem()
    one = post.sample("sgld", chains=4, progress=False, **kw)
    got, wall = _run_torchrun(tmp_path, 2)
    assert int(got["world"]) == 2
    np.testing.assert_array_equal(got["draws"], one.flat())
    for k in ("loss", "virial", "dist2"):
        np.testing.assert_array_equal(got[k], one.stat(k))
    np.testing.assert_array_equal(got["records"], one.records["losses"])
    # the run directory: a manifest and one store per rank, each with its chains
    run = tmp_path / "run"
    man = json.loads((run / cpd.MANIFEST).read_text())
    assert man["world_size"] == 2 and man["chain_ids"] == [[0, 1], [2, 3]]
    part = cp.open_store(run / "rank001")
    assert part.settings["chain_ids"] == [2, 3]
    np.testing.assert_array_equal(part.flat(), one.flat()[2:])
    # merged after the fact, with the declaration attached
    merged = cpd.merge_stores(run, posterior=post)
    np.testing.assert_array_equal(merged.flat(), one.flat())
    assert merged.posterior is post and merged.chains == 4
    assert merged.settings["chain_seeds"] == one.settings["chain_seeds"]
    print(f"2-process torchrun wall time {wall:.1f} s")


def test_one_process_sample_and_uneven_groups_merge(tmp_path):
    problem, kw = _problem(tmp_path)
    post = problem()
    full = post.sample("sgld", chains=5, progress=False, **kw)
    # a plain call (no launcher) is rank 0 of 1: one store, merged
    ref = cpd.sample(post, "sgld", chains=5, store=tmp_path / "solo", progress=False, **kw)
    np.testing.assert_array_equal(ref.flat(), full.flat())
    np.testing.assert_array_equal(ref.stat("virial"), full.stat("virial"))
    assert ref.settings["distributed"]["world_size"] == 1
    # groups of 3 and 2 chains, run apart and merged given in reverse order
    for ids, name in (([3, 4], "b"), ([0, 1, 2], "a")):
        post.sample("sgld", chains=len(ids), chain_ids=ids, store=tmp_path / name,
                    progress=False, **kw)  # fmt: skip
    m = cpd.merge_stores([tmp_path / "b", tmp_path / "a"])
    np.testing.assert_array_equal(m.flat(), full.flat())
    np.testing.assert_array_equal(m.stat("loss"), full.stat("loss"))
    np.testing.assert_array_equal(m.records["losses"], full.records["losses"])
    assert m.settings["chains"] == 5 and "chain_ids" not in m.settings


FAILING = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from problem import problem, KW
    from condpost import distributed as cpd

    def build(device):  # rank 1 cannot build its declaration
        if cpd.context().rank == 1:
            raise MemoryError("no room for the network")
        return problem()

    cpd.sample(build, "sgld", chains=4, store=sys.argv[1] + "/run", **KW)
    """
)


def test_a_failing_rank_stops_every_rank_with_its_reason(tmp_path):
    _problem(tmp_path)
    (tmp_path / "worker.py").write_text(FAILING)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(tmp_path / "worker.py"), str(tmp_path), str(tmp_path),
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "1 of 2 rank(s) failed: rank 1" in out and "no room for the network" in out, out[-4000:]


def test_chain_slice_is_contiguous_and_balanced():
    assert [cpd.chain_slice(7, 3, r) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert cpd.chain_slice(4, 1, 0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"world size 3 > chains=2.*--nproc_per_node"):
        cpd.chain_slice(2, 3, 0)


def test_bad_input_names_the_argument_and_the_fix(tmp_path, monkeypatch):
    problem, kw = _problem(tmp_path)
    post = problem()
    with pytest.raises(ValueError, match="store= is required"):
        cpd.sample(post, "sgld", chains=4, store=None, **kw)
    with pytest.raises(ValueError, match="cannot be split over processes"):
        cpd.sample(post, "nuts", chains=4, store=tmp_path / "x")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"world size 8 > chains=4"):
        cpd.sample(post, "sgld", chains=4, store=tmp_path / "x", **kw)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    # an existing run is never overwritten; resume needs one
    cpd.sample(post, "sgld", chains=2, store=tmp_path / "r", progress=False, **kw)
    with pytest.raises(FileExistsError, match="resume=True"):
        cpd.sample(post, "sgld", chains=2, store=tmp_path / "r", progress=False, **kw)
    with pytest.raises(FileNotFoundError, match="no distributed run"):
        cpd.sample(post, "sgld", chains=2, store=tmp_path / "none", resume=True, **kw)
    # resume extends the same chains exactly
    longer = dict(kw, draws=kw["draws"] + 5)
    ext = cpd.sample(post, "sgld", chains=2, store=tmp_path / "r", resume=True, progress=False,
                     **longer)  # fmt: skip
    fresh = post.sample("sgld", chains=2, progress=False, **longer)
    np.testing.assert_array_equal(ext.flat(), fresh.flat())
    with pytest.raises(FileNotFoundError, match="no distributed run"):
        cpd.merge_stores(tmp_path / "none")


def test_merge_refuses_stores_of_other_runs_or_declarations(tmp_path):
    problem, kw = _problem(tmp_path)
    post = problem()
    post.sample("sgld", chains=2, chain_ids=[0, 1], store=tmp_path / "a", progress=False, **kw)
    post.sample("sgld", chains=2, chain_ids=[1, 2], store=tmp_path / "dup", progress=False, **kw)
    with pytest.raises(ValueError, match=r"chain\(s\) \[1\] appear in more than one store"):
        cpd.merge_stores([tmp_path / "a", tmp_path / "dup"])
    other = dict(kw, seed=8)
    post.sample("sgld", chains=2, chain_ids=[2, 3], store=tmp_path / "s", progress=False, **other)
    with pytest.raises(ValueError, match=r"not parts of one run.*seed"):
        cpd.merge_stores([tmp_path / "a", tmp_path / "s"])
    hot = post.with_nbeta(2 * post.nbeta)
    hot.sample("sgld", chains=2, chain_ids=[2, 3], store=tmp_path / "h", progress=False, **kw)
    with pytest.raises(ValueError, match="different declarations"):
        cpd.merge_stores([tmp_path / "a", tmp_path / "h"])


def test_on_device_keeps_the_declaration():
    post = cp.LocalPosterior(
        torch.nn.Linear(2, 1), (torch.randn(8, 2), torch.randn(8, 1)), cp.Gaussian(1.0),
        localization=1.0, check_center=False,
    )  # fmt: skip
    assert cpd.on_device(post, "cpu") is post
    assert cpd.local_device(0).type == ("cuda" if torch.cuda.is_available() else "cpu")


CHEES = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    from condpost import distributed as cpd
    cpd.init_jax()
    import jax
    from problem import problem

    ref = problem().sample("chees", chains=4, warmup=30, draws=10, seed=3, progress=False)
    assert jax.process_count() == int(sys.argv[3]), jax.process_count()
    if jax.process_index() == 0:
        np.savez(sys.argv[1], draws=ref.flat(), loss=ref.stat("loss"), virial=ref.stat("virial"),
                 devices=np.array(ref.settings["jax_devices"]))
    """
)


@pytest.mark.slow  # about 100 s on two shared cores (three JAX processes compile ChEES)
def test_chees_over_two_jax_processes_equals_one_process_with_two_devices(tmp_path):
    """ChEES shards its chains over a global mesh of both processes' CPU devices
    (``init_jax``: jax.distributed with gloo collectives); the draws equal, bit for bit,
    a one-process run sharded over two (forced) host devices."""
    pytest.importorskip("jax")
    _problem(tmp_path)
    (tmp_path / "chees.py").write_text(CHEES)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    script = str(tmp_path / "chees.py")
    one = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(tmp_path / "two.npz"), str(tmp_path), "2"],
            env=dict(
                env, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port - 1)
            ),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    r1 = subprocess.run(
        [sys.executable, script, str(tmp_path / "one.npz"), str(tmp_path), "1"],
        env=one, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    two, one_ = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert len(two["devices"]) == 2 and len(one_["devices"]) == 2
    for k in ("draws", "loss", "virial"):
        np.testing.assert_array_equal(two[k], one_[k])
