"""Reliability of stored results (issue 11, point 8): run stores and ReferenceClass files.

* a resumed store, ``ReferenceClass.load(path, posterior=)``, ``attach`` and
  ``open_store(path, posterior=)`` refuse a declaration whose fingerprint differs;
* ``ReferenceClass.save`` is atomic (a save killed midway leaves the old file);
* ``meta.json`` is validated before anything is memory-mapped (a dtype "O" used to
  segfault: that case runs in a subprocess so a regression cannot kill pytest);
* CRC32 checksums per chunk of ``draws.bin``, and readable checkpoints;
* one writer per store (``writer.lock``), stale locks taken over;
* a store killed before ``meta.json`` is cleaned up and started afresh.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import condpost as cp
from condpost._errors import CondpostWarning
from condpost.store import StoreError, StoreLockedError, open_store

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
KW = dict(chains=2, warmup=5, step_size=1e-4, batch_size=16, seed=3, chunk_draws=4, progress=False)


# ---------------------------------------------------------------------------------------
# a small declaration: a trained 2-4-1 tanh MLP, float64, with one constraint
# ---------------------------------------------------------------------------------------


def _data(dy: float = 0.0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    return x, y + dy


_TRAINED: dict = {}


def _trained_state() -> dict:
    if not _TRAINED:
        x, y = _data()
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
        ).double()
        opt = torch.optim.LBFGS(
            net.parameters(), max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-14
        )

        def closure():
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        _TRAINED.update({k: v.detach().clone() for k, v in net.state_dict().items()})
    return _TRAINED


def make_post(act=torch.nn.Tanh, scale=0.5, dy=0.0, tolerance=0.05):
    """A fresh declaration (new module objects each call) from the same trained weights."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), act(), torch.nn.Linear(4, 1)).double()
    net.load_state_dict(_trained_state())
    x, y = _data(dy)
    post = cp.LocalPosterior(
        net, (x, y), cp.Gaussian(scale=scale), localization=10.0, check_center=False
    )
    post.preserve(cp.Activations("0", x[:4], tolerance=tolerance))
    return post


def _run(post, path=None, draws=12, **kw):
    return post.sample("sgld", draws=draws, store=path, **{**KW, **kw})


def _python(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that can import this module's helpers."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    prelude = "import warnings; warnings.simplefilter('ignore')\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(ROOT),
    )


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(path: Path, pid: int, host: str | None = None) -> None:
    info = {"pid": pid, "host": host or socket.gethostname(), "thread": 1, "token": "x"}
    (path / "writer.lock").write_text(json.dumps(info))


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def post():
    return make_post()


@pytest.fixture(scope="module")
def full(post):
    """The uninterrupted run every resumed run must equal bit for bit."""
    return _run(post, draws=12)


# ---------------------------------------------------------------------------------------
# 1. declaration fingerprints
# ---------------------------------------------------------------------------------------

CHANGES = {
    "targets": (dict(dy=1e-3), "the data"),
    "gaussian_scale": (dict(scale=0.6), "the likelihood"),
    "activation": (dict(act=torch.nn.ReLU), "architecture"),
    "constraint_tolerance": (dict(tolerance=0.06), "the constraints"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_resume_refuses_a_changed_declaration(post, tmp_path, change):
    kw, words = CHANGES[change]
    path = tmp_path / "run.cpst"
    _run(post, path, draws=8)
    before = _snapshot(path)
    other = make_post(**kw)
    with pytest.raises(ValueError) as err:
        _run(other, path, draws=12, resume=True)
    msg = str(err.value)
    assert str(path) in msg and "another declaration" in msg
    assert words in msg, msg
    assert "original declaration" in msg and "new store path" in msg
    assert _snapshot(path) == before  # nothing written, and no lock left behind
    # the original declaration still resumes the store
    ref = _run(post, path, draws=12, resume=True)
    assert ref.num_draws == 12


def test_resume_with_a_rebuilt_identical_declaration_is_bit_identical(full, tmp_path):
    path = tmp_path / "run.cpst"

    class Stop(Exception):
        pass

    def stop(state, draw):
        if draw == 6:
            raise Stop

    with pytest.raises(Stop) as failed:
        _run(make_post(), path, draws=12, callback=stop)
    # released when the run failed (not only when its frame, kept alive by the
    # traceback, is collected)
    assert failed.tb is not None and not (path / "writer.lock").exists()
    ref = _run(make_post(), path, draws=12, resume=True)  # new objects, same declaration
    assert not (path / "writer.lock").exists()  # released when the run finished
    np.testing.assert_array_equal(np.asarray(ref.flat()), full.flat())
    for k in ("loss", "virial", "dist2", "defect/activations:0"):
        np.testing.assert_array_equal(ref.stat(k), full.stat(k))


def test_open_store_load_and_attach_refuse_another_declaration(post, full, tmp_path):
    path = tmp_path / "run.cpst"
    _run(post, path)
    file = full.save(tmp_path / "ref.npz")
    other = make_post(scale=0.6)
    with pytest.raises(ValueError, match="another declaration") as err:
        open_store(path, posterior=other)
    assert str(path) in str(err.value) and "the likelihood" in str(err.value)
    with pytest.raises(ValueError, match="another declaration") as err:
        cp.ReferenceClass.load(file, posterior=other)
    assert str(file) in str(err.value) and "original declaration" in str(err.value)
    back = cp.ReferenceClass.load(file)
    with pytest.raises(ValueError, match="the constraints"):
        back.attach(make_post(tolerance=0.06))
    assert back.posterior is None
    # the original declaration (even rebuilt) attaches silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert back.attach(make_post()).posterior is not None
        assert open_store(path, posterior=post).posterior is post
        assert cp.ReferenceClass.load(file, posterior=post).posterior is post


def test_records_without_a_fingerprint_warn_instead(post, full, tmp_path):
    path = tmp_path / "run.cpst"
    _run(post, path, draws=8)
    meta = json.loads((path / "meta.json").read_text())
    del meta["config"]["fingerprint"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(CondpostWarning, match="without a declaration fingerprint"):
        open_store(path, posterior=post)
    with pytest.warns(CondpostWarning, match="without a declaration fingerprint"):
        ref = _run(post, path, draws=12, resume=True)
    np.testing.assert_array_equal(np.asarray(ref.flat()), full.flat())

    old = cp.ReferenceClass.load(full.save(tmp_path / "ref.npz"))
    old.config = {k: v for k, v in old.config.items() if k != "fingerprint"}
    file = old.save(tmp_path / "old.npz")
    with pytest.warns(CondpostWarning, match="without a declaration fingerprint"):
        cp.ReferenceClass.load(file, posterior=make_post(scale=0.6))


# ---------------------------------------------------------------------------------------
# 2. atomic save
# ---------------------------------------------------------------------------------------


def test_save_killed_midway_keeps_the_previous_file(tmp_path):
    target = tmp_path / "ref.npz"
    code = f"""
        import os
        import numpy as np
        import condpost as cp
        rng = np.random.default_rng(0)
        draws = rng.standard_normal((2, 7, 3))
        ref = cp.ReferenceClass(
            draws=draws,
            stats={{"loss": rng.standard_normal((2, 7)), "virial": np.ones((2, 7))}},
            center=np.zeros(3),
            config={{"d": 3, "nbeta": 1.0, "localization": 1.0, "constraints": []}},
            settings={{"method": "test"}},
        )
        ref.save({str(target)!r})
        np.save({str(tmp_path / "expected.npy")!r}, draws)

        def dying_savez(fh, **arrays):  # the writer dies after a few bytes
            fh.write(b"PK\\x03\\x04 half an archive")
            fh.flush()
            os._exit(1)

        np.savez = dying_savez
        ref._draws = draws + 1.0
        ref.save({str(target)!r})
        print("the second save returned")
    """
    res = _python(code)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "returned" not in res.stdout
    back = cp.ReferenceClass.load(target)
    np.testing.assert_array_equal(back.flat(), np.load(tmp_path / "expected.npy"))
    assert back.settings == {"method": "test"}


def test_load_names_a_damaged_file(full, tmp_path):
    file = full.save(tmp_path / "ref.npz")
    raw = bytearray(file.read_bytes())
    i = raw.index(b"draws.npy") + 200  # inside the draws member's data
    raw[i] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged") as err:
        cp.ReferenceClass.load(file)
    assert str(file) in str(err.value)


# ---------------------------------------------------------------------------------------
# 3. metadata validation
# ---------------------------------------------------------------------------------------


@pytest.fixture
def stored(post, tmp_path):
    path = tmp_path / "run.cpst"
    _run(post, path, draws=8)
    return path


def _edit_meta(path: Path, **fields) -> None:
    meta = json.loads((path / "meta.json").read_text())
    for k, v in fields.items():
        if v is KeyError:
            del meta[k]
        else:
            meta[k] = v
    (path / "meta.json").write_text(json.dumps(meta))


def test_object_dtype_is_refused_not_mapped(stored):
    """dtype "O" made np.memmap read raw bytes as object pointers (a segfault)."""
    _edit_meta(stored, dtype="O")
    code = f"""
        from test_store_reliability import make_post, _run
        from condpost.store import open_store, StoreError
        for how in ("open", "resume"):
            try:
                if how == "open":
                    open_store({str(stored)!r})
                else:
                    _run(make_post(), {str(stored)!r}, draws=12, resume=True)
            except StoreError as e:
                print(how, "REFUSED", e)
            else:
                print(how, "ACCEPTED")
    """
    res = _python(code)
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    lines = res.stdout.strip().splitlines()
    assert [ln.split()[:2] for ln in lines] == [["open", "REFUSED"], ["resume", "REFUSED"]], lines
    for ln in lines:
        assert "meta.json" in ln and "'dtype'" in ln and "'O'" in ln


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(format="something/else"), "format"),
        (dict(chains=KeyError), "chains"),
        (dict(identity=KeyError), "identity"),
        (dict(chains=0), "chains"),
        (dict(d=-6), "d"),
        (dict(draws="8"), "draws"),
        (dict(chains=2.0), "chains"),
        (dict(d=True), "d"),
        (dict(dtype="<U8"), "dtype"),
        (dict(dtype="int64"), "dtype"),
        (dict(dtype="complex128"), "dtype"),
        (dict(dtype="not a dtype"), "dtype"),
        (dict(dtype=8), "dtype"),
    ],
)
def test_bad_metadata_names_the_file_and_field(post, stored, fields, field):
    _edit_meta(stored, **fields)
    for attempt in (lambda: open_store(stored), lambda: _run(post, stored, resume=True)):
        with pytest.raises(StoreError) as err:
            attempt()
        msg = str(err.value)
        assert str(stored / "meta.json") in msg and field in msg, msg
    assert not (stored / "writer.lock").exists()


def test_unreadable_meta_json(post, stored):
    (stored / "meta.json").write_text('{"format": "condpost.RunStore/1", "chai')
    with pytest.raises(StoreError, match="not valid JSON") as err:
        open_store(stored)
    assert str(stored / "meta.json") in str(err.value)
    with pytest.raises(StoreError, match="meta.json"):
        _run(post, stored, resume=True)


# ---------------------------------------------------------------------------------------
# 4. checksums
# ---------------------------------------------------------------------------------------


def test_checkpoint_records_a_crc_per_chunk(stored):
    with np.load(stored / "checkpoint.npz") as z:
        chunks, done = z["chunks"], int(z["done"])
    row = 2 * open_store(stored).d * 8
    raw = (stored / "draws.bin").read_bytes()
    assert chunks[:, :2].tolist() == [[0, 4], [4, 4]] and done == 8
    for start, count, crc in chunks.tolist():
        assert zlib.crc32(raw[start * row : (start + count) * row]) == crc


def test_truncated_draws_bin(post, stored):
    f = stored / "draws.bin"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(StoreError, match="truncated") as err:
        open_store(stored)
    assert str(f) in str(err.value) and "8 draws" in str(err.value)
    with pytest.raises(StoreError, match="truncated"):
        _run(post, stored, resume=True)
    assert not (stored / "writer.lock").exists()


def test_flipped_byte_in_draws_bin(post, full, stored):
    f = stored / "draws.bin"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2 + 3] ^= 0x01  # one bit of one draw in the second chunk
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="CRC32") as err:
        open_store(stored)
    assert str(f) in str(err.value) and "draws 4..7" in str(err.value)
    with pytest.raises(StoreError, match="CRC32"):
        _run(post, stored, resume=True)
    # verify=False skips the checksums (a quick look), and shows the altered draw
    quick = open_store(stored, verify=False)
    assert not np.array_equal(np.asarray(quick.flat()), full.flat()[:, :8])


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_checkpoint(post, stored, damage):
    ck = stored / "checkpoint.npz"
    raw = bytearray(ck.read_bytes())
    if damage == "flip":
        i = raw.index(b"stat:virial.npy") + 150  # inside that member's data
        raw[i] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"\x93NUMPY garbage" * 10)
    ck.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="checkpoint") as err:
        open_store(stored)
    assert str(ck) in str(err.value)
    with pytest.raises(StoreError, match="checkpoint") as err:
        _run(post, stored, resume=True)
    assert str(ck) in str(err.value)


# ---------------------------------------------------------------------------------------
# 5. one writer
# ---------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_runs(post, full, tmp_path):
    path = tmp_path / "run.cpst"
    go = tmp_path / "go"
    code = f"""
        import os, time
        from pathlib import Path
        from test_store_reliability import make_post, _run

        def wait(state, draw):
            if draw == 5:  # the store holds 4 draws; hold the lock until told to go on
                Path({str(tmp_path / "ready")!r}).write_text(str(os.getpid()))
                t0 = time.time()
                while not Path({str(go)!r}).exists() and time.time() - t0 < 120:
                    time.sleep(0.05)

        _run(make_post(), {str(path)!r}, draws=12, callback=wait)
        print("finished")
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import warnings; warnings.simplefilter('ignore')\n" + textwrap.dedent(code),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
    try:
        import time

        t0 = time.time()
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() - t0 < 180, "the writer did not start"
            time.sleep(0.05)
        with pytest.raises(StoreLockedError) as err:
            _run(post, path, draws=12, resume=True)
        msg = str(err.value)
        assert str(path) in msg and f"pid {proc.pid}" in msg
        partial = open_store(path)  # readers need no lock
        assert partial.num_draws == 4
        np.testing.assert_array_equal(np.asarray(partial.flat()), full.flat()[:, :4])
    finally:
        go.write_text("")
        out, errs = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "finished" in out, errs
    assert not (path / "writer.lock").exists()
    np.testing.assert_array_equal(np.asarray(open_store(path).flat()), full.flat())


@pytest.mark.parametrize("holder", ["live_pid", "other_host"])
def test_a_held_lock_refuses_writers(post, tmp_path, holder):
    path = tmp_path / "run.cpst"
    _run(post, path, draws=8)
    if holder == "live_pid":
        pid = os.getppid()  # the process that started pytest: alive
        _write_lock(path, pid)
    else:
        pid = _dead_pid()  # alive or not, a process on another host cannot be checked
        _write_lock(path, pid, host="some-other-host.invalid")
    with pytest.raises(StoreLockedError) as err:
        _run(post, path, draws=12, resume=True)
    assert str(path) in str(err.value) and f"pid {pid}" in str(err.value)
    assert json.loads((path / "writer.lock").read_text())["pid"] == pid  # left alone
    assert open_store(path).num_draws == 8


def test_a_stale_lock_is_taken_over_with_a_warning(post, full, tmp_path):
    path = tmp_path / "run.cpst"
    _run(post, path, draws=8)
    pid = _dead_pid()
    _write_lock(path, pid)
    with pytest.warns(CondpostWarning, match=f"stale lock of pid {pid}"):
        ref = _run(post, path, draws=12, resume=True)
    np.testing.assert_array_equal(np.asarray(ref.flat()), full.flat())
    assert not (path / "writer.lock").exists()


def test_a_closed_writer_cannot_write(post, tmp_path):
    from condpost.store import RunStore

    path = tmp_path / "run.cpst"
    with RunStore.open(
        path,
        post=post,
        identity={"x": 1},
        settings={},
        chains=2,
        draws=4,
        keep_draws=True,
        stat_shapes={"virial": 4},
        resume=False,
    ) as rs:
        info = json.loads((path / "writer.lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert not (path / "writer.lock").exists()
    with pytest.raises(StoreLockedError, match="no longer holds"):
        rs.write_chunk(0, [], None, 0)
    # finish() marks the run complete and releases the lock (rs is still referenced)
    rs = RunStore.open(
        path,
        post=post,
        identity={"x": 1},
        settings={},
        chains=2,
        draws=4,
        keep_draws=True,
        stat_shapes={"virial": 4},
        resume=True,
    )
    assert (path / "writer.lock").exists()
    rs.finish({"done": True})
    assert not (path / "writer.lock").exists()
    assert json.loads((path / "meta.json").read_text())["complete"] is True


# ---------------------------------------------------------------------------------------
# 6. a run killed before meta.json
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [True, False])
def test_a_store_killed_before_meta_json_starts_afresh(post, full, tmp_path, resume):
    path = tmp_path / "run.cpst"
    path.mkdir()
    np.save(path / "center.npy", np.zeros(3))
    (path / "draws.bin").write_bytes(b"")
    (path / "meta.json.tmp").write_bytes(b'{"format": "condpost.Ru')
    (path / "writer.lock.0123456789ab.tmp").write_bytes(b"{}")  # a lock takeover's
    _write_lock(path, _dead_pid())
    with pytest.warns(CondpostWarning) as rec:
        ref = _run(post, path, draws=12, resume=resume)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert "killed before it wrote meta.json" in msgs[0] and "center.npy" in msgs[0]
    np.testing.assert_array_equal(np.asarray(ref.flat()), full.flat())
    assert sorted(p.name for p in path.iterdir()) == [
        "center.npy",
        "checkpoint.npz",
        "draws.bin",
        "meta.json",
    ]


@pytest.mark.parametrize("resume", [True, False])
@pytest.mark.parametrize("other", ["notes.txt", "draws.bin"])
def test_a_foreign_directory_is_not_a_store(post, tmp_path, resume, other):
    path = tmp_path / "run.cpst"
    path.mkdir()
    np.save(path / "center.npy", np.zeros(3))
    (path / other).write_bytes(b"data of something else")
    before = _snapshot(path)
    with pytest.raises(FileNotFoundError, match="not a condpost run store"):
        _run(post, path, resume=resume)
    assert _snapshot(path) == before
