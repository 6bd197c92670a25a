"""``data=`` beyond tensors: DataLoaders, map-style and token datasets, iterables of batches.

Ground truth is the in-memory declaration on the same rows: the same seed draws the
same row indices, and a map-style source gathers exactly those rows, so SG-MCMC draws and
the gradient-batch statistics are equal bit for bit; full-data losses (L_n(w*), the
ℓ_i(w*) of the paired estimator, post.loss, evaluate) are computed batch by batch, equal
to the in-memory value to 1e-12 (float64; other block sizes round differently).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import condpost as cp
from condpost.data import Batches, DataNotInMemoryError, MapRows, Tensors

SG = dict(chains=3, warmup=20, draws=30, seed=7, progress=False, step_size=1e-4)


def _xy(n=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :2]) + 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, y


_TRAINED: dict = {}


def _mlp():
    """A small tanh network trained to a minimum of the squared error on ``_xy()``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double().eval()
    if not _TRAINED:
        x, y = _xy()
        opt = torch.optim.LBFGS(net.parameters(), max_iter=500, tolerance_grad=1e-12)

        def closure():
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        _TRAINED.update({k: v.clone() for k, v in net.state_dict().items()})
    net.load_state_dict(_TRAINED)
    return net


def _post(data, net=None, **kw):
    kw.setdefault("check_center", False)
    return cp.LocalPosterior(
        _mlp() if net is None else net, data, cp.Gaussian(scale=0.5), localization=10.0, **kw
    )


@pytest.fixture(scope="module")
def xy():
    return _xy()


@pytest.fixture(scope="module")
def mem(xy):
    return _post(xy)


@pytest.fixture(scope="module")
def loader(xy):
    # shuffle and drop_last are the loader's, not condpost's: rows are gathered by index
    return DataLoader(TensorDataset(*xy), batch_size=64, shuffle=True, drop_last=True)


@pytest.fixture(scope="module")
def streamed(loader):
    return _post(loader)


def test_sources_and_center_loss(mem, streamed, xy):
    assert isinstance(mem.data, Tensors) and isinstance(streamed.data, MapRows)
    assert streamed.n == mem.n == 300 and streamed.data.pass_rows == 64
    assert streamed.nbeta == mem.nbeta
    assert abs(streamed.loss_center - mem.loss_center) <= 1e-12 * abs(mem.loss_center)
    w = mem.center + 0.05 * torch.randn(mem.d, dtype=torch.float64)
    assert abs(float(streamed.loss(w)) - float(mem.loss(w))) <= 1e-12 * abs(float(mem.loss(w)))
    W = mem.center + 0.05 * torch.randn(5, mem.d, dtype=torch.float64)
    a, b = mem.evaluate(W), streamed.evaluate(W)
    assert set(a) == set(b) == {"loss", "virial"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-12)
    # a list of (x, y) batches: full passes only, the same L_n
    x, y = xy
    it = _post([(x[i : i + 70], y[i : i + 70]) for i in range(0, 300, 70)])
    assert isinstance(it.data, Batches) and it.n == 300
    assert abs(it.loss_center - mem.loss_center) <= 1e-12 * abs(mem.loss_center)
    # the data enter the fingerprint (streamed: the hash of the batches)
    other = _post(DataLoader(TensorDataset(x, y + 1e-9), batch_size=64))
    assert other.fingerprint()["data"] != streamed.fingerprint()["data"]
    # ... not how they are split into batches
    again = _post(DataLoader(TensorDataset(x, y), batch_size=32))
    assert again.fingerprint()["data"] == streamed.fingerprint()["data"]


def test_center_check_streams(xy):
    # the centre check (gradient and Hessian-vector products) summed batch by batch
    a = _post(xy, check_center=True).center_check
    b = _post(DataLoader(TensorDataset(*xy), batch_size=50), check_center=True).center_check
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-10 * a["grad_norm"]
    assert abs(a["lambda_shift"] - b["lambda_shift"]) <= 1e-8 * max(1, abs(a["lambda_shift"]))


@pytest.mark.parametrize("method", ["sgld", "sghmc"])
def test_dataloader_draws_equal_in_memory_bit_for_bit(mem, streamed, method):
    opts = dict(SG, batch_size=32, full_loss_every=10)
    a = mem.sample(method, **opts)
    b = streamed.sample(method, **opts)
    # the same indices gather the same rows: draws and the gradient-batch statistics are
    # equal bit for bit
    np.testing.assert_array_equal(b.flat(), a.flat())
    for k in ("virial", "batch_loss", "dist2"):
        np.testing.assert_array_equal(b.stat(k), a.stat(k))
    # the paired loss L_n(w*) + L_B(w) − L_B(w*) uses L_n(w*) and ℓ_i(w*) from a pass in
    # the loader's batches of 64 rows (in memory: one block), which round differently in
    # the last bit: equal to 1e-12
    np.testing.assert_allclose(b.stat("loss"), a.stat("loss"), rtol=1e-12)
    la, lb = a.llc(warn_user=False).mean, b.llc(warn_user=False).mean
    assert abs(lb - la) <= 1e-12 * streamed.nbeta * abs(mem.loss_center)
    # the full-data statistics are streamed: equal to 1e-12
    np.testing.assert_allclose(b.stat("loss_full"), a.stat("loss_full"), rtol=1e-12)
    fa, fb = (r.llc(estimator="full", warn_user=False).mean for r in (a, b))
    assert abs(fb - fa) <= 1e-8


def test_full_loss_estimator_streams(mem, streamed):
    opts = dict(SG, batch_size=32, loss="full", draws=10)
    a, b = mem.sample("sgld", **opts), streamed.sample("sgld", **opts)
    np.testing.assert_array_equal(b.flat(), a.flat())
    np.testing.assert_allclose(b.loss(), a.loss(), rtol=1e-12)


def test_resume_with_a_dataloader_continues_exactly(streamed, mem, tmp_path):
    opts = dict(SG, batch_size=32, draws=24, chunk_draws=5)
    full = streamed.sample("sgld", **opts)

    class Stop(Exception):
        pass

    def stop(state, draw):
        if draw == 12:
            raise Stop

    path = tmp_path / "run.cpst"
    with pytest.raises(Stop):
        streamed.sample("sgld", store=str(path), callback=stop, **opts)
    # a fresh loader over the same rows: the same declaration
    again = _post(DataLoader(TensorDataset(*_xy()), batch_size=64))
    ref = again.sample("sgld", store=str(path), resume=True, **opts)
    np.testing.assert_array_equal(np.asarray(ref.flat()), full.flat())
    for k in ("loss", "virial", "dist2"):
        np.testing.assert_array_equal(ref.stat(k), full.stat(k))
    np.testing.assert_array_equal(full.flat(), mem.sample("sgld", **opts).flat())


# ---------------------------------------------------------------------- token datasets
V, T = 11, 6


class TinyLM(nn.Module):
    """Token ids [m, T] -> logits [m, T, V]; position t sees tokens ≤ t (a causal mean)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(V, 4)
        self.out = nn.Linear(4, V)

    def forward(self, ids):
        h = self.emb(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return self.out(torch.tanh(h))


class TokenRows(Dataset):
    """``{"input_ids": [T'], "attention_mask": [T']}`` rows, right-padded to ``T + pad``."""

    def __init__(self, ids, pad=0):
        self.ids, self.pad = ids, pad

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        ids = self.ids[i].tolist()
        mask = [1] * len(ids)
        fill = [0] * self.pad
        return {"input_ids": ids + fill, "attention_mask": mask + fill}


def _token_ids(n=40, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (n, T), generator=g)


def _lm_post(data):
    return cp.LocalPosterior(
        TinyLM().double(), data, cp.CausalLM(), localization=10.0, check_center=False
    )


def test_token_dataset_masks_padding():
    ids = _token_ids()
    plain = _lm_post(TokenRows(ids))
    padded = _lm_post(TokenRows(ids, pad=3))
    # in memory, the causal_lm_data convention: the same L_n
    mem = _lm_post(cp.models.causal_lm_data(ids))
    assert plain.n == padded.n == mem.n == 40
    tokens = ids.numel() - ids.shape[0]  # predicted tokens: T − 1 per sequence
    per_token = plain.loss_center * plain.n / tokens
    assert abs(padded.loss_center * padded.n / tokens - per_token) <= 1e-12 * per_token
    assert abs(mem.loss_center - plain.loss_center) <= 1e-12 * mem.loss_center
    # a token mapping held in memory, padded: labels at padding are ignore_index
    enc = {
        "input_ids": torch.cat([ids, torch.zeros(40, 3, dtype=torch.long)], 1),
        "attention_mask": torch.cat([torch.ones(40, T), torch.zeros(40, 3)], 1).long(),
    }
    inmem = _lm_post(enc)
    assert inmem.data.in_memory and int((inmem.y == -100).sum()) == 40 * 3
    assert abs(inmem.loss_center - plain.loss_center) <= 1e-12 * plain.loss_center
    # SG-MCMC on the padded and the unpadded dataset: the same λ̂ (the same rows drawn;
    # padding adds no term), equal to rounding
    a = plain.sample("sgld", **SG)
    b = padded.sample("sgld", **SG)
    np.testing.assert_allclose(b.flat(), a.flat(), rtol=1e-10, atol=1e-12)
    la, lb = (r.llc(warn_user=False).mean for r in (a, b))
    assert abs(lb - la) <= 1e-8 * max(1.0, abs(la))


def test_token_batches_from_a_dataloader():
    ids = _token_ids()

    def collate(rows):
        return {
            "input_ids": torch.tensor([r["input_ids"] for r in rows]),
            "attention_mask": torch.tensor([r["attention_mask"] for r in rows]),
        }

    ld = DataLoader(TokenRows(ids, pad=2), batch_size=16, collate_fn=collate)
    post = _lm_post(ld)
    ref = _lm_post(TokenRows(ids))
    assert abs(post.loss_center - ref.loss_center) <= 1e-12 * ref.loss_center
    with pytest.raises(TypeError, match=r"data= is a token mapping.*CausalLM"):
        _post({"input_ids": ids})


# ---------------------------------------------------------------------- what needs memory
def test_streamed_data_refuses_full_batch_methods(streamed):
    for method in ("nuts", "mala"):
        with pytest.raises(DataNotInMemoryError, match=rf"method='{method}'.*data=\(x, y\)"):
            streamed.sample(method, chains=1, warmup=5, draws=5, progress=False)
    with pytest.raises(DataNotInMemoryError, match=r"fit\(method='svi'\)"):
        streamed.fit("svi", steps=2, progress=False)
    with pytest.raises(DataNotInMemoryError, match=r"post\.x"):
        streamed.x  # noqa: B018
    with pytest.raises(DataNotInMemoryError, match="record_losses"):
        streamed.sample("sgld", record_losses=True, **SG)


class _Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


def test_iterable_source_refuses_sgmcmc_with_what_to_pass(xy, mem):
    post = _post(DataLoader(_Stream(*xy), batch_size=50))
    assert isinstance(post.data, Batches)
    assert abs(post.loss_center - mem.loss_center) <= 1e-12 * abs(mem.loss_center)
    with pytest.raises(ValueError, match=r"method='sgld'.*random access.*map-style dataset"):
        post.sample("sgld", **SG)


# ---------------------------------------------------------------------- bad input
def test_bad_data_gets_a_clear_error(xy):
    x, y = xy
    with pytest.raises(ValueError, match=r"data= is empty.*DataLoader"):
        _post(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=8))
    with pytest.raises(ValueError, match=r"data= is empty"):
        _post(DataLoader(_Stream(x[:0], y[:0]), batch_size=8))
    # batches that are not (x, y) pairs
    with pytest.raises(TypeError, match=r"data=: a batch is .*pair \(x, y\).*collate_fn"):
        _post(DataLoader(TensorDataset(x, y), batch_size=8, collate_fn=lambda r: r[0][0]))
    with pytest.raises(TypeError, match=r"data=: a batch is a list of length 3"):
        _post(DataLoader(TensorDataset(x, y, y), batch_size=8))
    # inconsistent shapes: between batches, and between x and y of a batch
    with pytest.raises(ValueError, match=r"data=: batch 1 has rows x \(4,\).*batch 0 had x \(3,\)"):
        _post([(x[:10], y[:10]), (torch.randn(10, 4, dtype=torch.float64), y[:10])])
    with pytest.raises(ValueError, match=r"data=: batch 0 has 10 inputs but 9 targets"):
        _post([(x[:10], y[:9])])
    with pytest.raises(ValueError, match=r"data=: reading or collating rows.*pad sequences"):
        _lm_post(_Ragged())
    with pytest.raises(TypeError, match=r"one-shot iterator.*re-iterable"):
        _post((x[i : i + 10], y[i : i + 10]) for i in range(0, 30, 10))
    with pytest.raises(TypeError, match=r"data must be a pair \(x, y\) of tensors"):
        _post(x)


class _Ragged(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"input_ids": list(range(1, 3 + i))}
