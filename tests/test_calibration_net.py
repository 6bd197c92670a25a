"""The test network of issue 12 (no tests here): an MLP on (a + b) mod p, about 10⁴ weights.

One-hot inputs of both summands (2p), two ReLU hidden layers, p logits. With p = 23,
h1 = 96, h2 = 40 it has 9,335 weights, and its middle layer ``"2"`` (96·40 + 40 = 3,880
weights) is the ~4k-weight block the calibration tests lift. Full-batch Adam on all 529
pairs reaches 100% accuracy in a few seconds on one CPU thread.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mod_data(p: int = 23):
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], 1).double()
    return x, (a + b) % p


def mod_mlp(p: int = 23, h1: int = 96, h2: int = 40, steps: int = 400, seed: int = 0):
    """``(net, x, y)``: the trained network and its full dataset."""
    x, y = mod_data(p)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(2 * p, h1),
        torch.nn.ReLU(),
        torch.nn.Linear(h1, h2),
        torch.nn.ReLU(),
        torch.nn.Linear(h2, p),
    ).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, x, y
