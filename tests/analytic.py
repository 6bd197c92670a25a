"""Closed-form ground truth (docs/theory.md §4.1–4.2), computed from scratch with NumPy.

Nothing here calls condpost: these are the exact answers the library is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LinearGaussianProblem:
    X: torch.Tensor  # [n, din]
    Y: torch.Tensor  # [n, k]
    s: float
    nbeta: float
    gamma: float
    w_star: np.ndarray  # flat, row-major vec(W) of shape [k*din]
    constraints: list  # list of (C [kc, d], target t [kc], sigma)

    @property
    def n(self):
        return self.X.shape[0]

    @property
    def k(self):
        return self.Y.shape[1]

    @property
    def din(self):
        return self.X.shape[1]

    @property
    def d(self):
        return self.k * self.din

    def design(self):
        """Φ_i = I_k ⊗ x_iᵀ stacked: returns G = Σ Φ_iᵀΦ_i and Σ Φ_iᵀ y_i."""
        X = self.X.numpy()
        Y = self.Y.numpy()
        XtX = X.T @ X
        G = np.kron(np.eye(self.k), XtX)
        b = (Y.T @ X).reshape(-1)  # row-major vec of Yᵀ X
        return G, b

    def A(self):
        G, _ = self.design()
        beta = self.nbeta / self.n
        return beta / self.s**2 * G

    def grad_at_star(self):
        """g* = ∇_w[nβ L_n](w*) = (β/s²)(G w* − Σ Φᵢᵀ yᵢ)."""
        G, b = self.design()
        beta = self.nbeta / self.n
        return beta / self.s**2 * (G @ self.w_star - b)

    def posterior(self):
        """Exact N(μ, Σ) of exp(−nβL − γ/2‖w−w*‖² − Σ_c ‖C_c w − t_c‖²/(2σ_c²))."""
        A = self.A()
        P = A + self.gamma * np.eye(self.d)
        grad = self.grad_at_star().copy()
        for C, t, sig in self.constraints:
            P += C.T @ C / sig**2
            grad += C.T @ (C @ self.w_star - t) / sig**2
        Sigma = np.linalg.inv(P)
        mu = self.w_star - Sigma @ grad
        return mu, Sigma

    def expected_nbeta_dL(self):
        """E[nβ(L_n(w) − L_n(w*))] = ½tr(AΣ) + ½δᵀAδ + g*ᵀδ with δ = μ − w*."""
        mu, Sigma = self.posterior()
        A = self.A()
        delta = mu - self.w_star
        g = self.grad_at_star()
        return 0.5 * np.trace(A @ Sigma) + 0.5 * delta @ A @ delta + g @ delta

    def expected_sq(self, C, t):
        """E‖Cw − t‖² under the exact posterior."""
        mu, Sigma = self.posterior()
        r = C @ mu - t
        return float(np.trace(C @ Sigma @ C.T) + r @ r)

    def nbeta_L(self, w):
        """nβ·L_n(w) for a flat w (Gaussian NLL with constants), in float64."""
        W = w.reshape(self.k, self.din)
        X, Y = self.X.numpy(), self.Y.numpy()
        r = Y - X @ W.T
        nll = 0.5 * (r**2).sum(1) / self.s**2 + self.k * (
            math.log(self.s) + 0.5 * math.log(2 * math.pi)
        )
        return self.nbeta * nll.mean()


def make_problem(n=200, din=3, k=2, s=0.5, gamma=1.0, seed=0, perturb=0.0, nbeta=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, din, generator=g, dtype=torch.float64)
    W_true = torch.randn(k, din, generator=g, dtype=torch.float64)
    Y = X @ W_true.T + s * torch.randn(n, k, generator=g, dtype=torch.float64)
    W_ols = torch.linalg.lstsq(X, Y).solution.T
    w_star = W_ols.reshape(-1).numpy().copy()
    if perturb:
        w_star = w_star + perturb * torch.randn(k * din, generator=g, dtype=torch.float64).numpy()
    nb = n / math.log(n) if nbeta is None else nbeta
    return LinearGaussianProblem(X, Y, s, nb, gamma, w_star, [])


def linear_net(prob: LinearGaussianProblem):
    net = torch.nn.Linear(prob.din, prob.k, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.as_tensor(prob.w_star.reshape(prob.k, prob.din)))
    return net


def whitened_problem(n=1000, din=3, k=2, s=1.0, gamma=1.0, seed=0):
    """docs/theory.md §4.2 worked example: XᵀX/n = I exactly, s = 1, nβ = n/log n."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, din, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(Z)
    X = Q * math.sqrt(n)
    W_true = torch.randn(k, din, generator=g, dtype=torch.float64)
    Y = X @ W_true.T + s * torch.randn(n, k, generator=g, dtype=torch.float64)
    W_ols = torch.linalg.lstsq(X, Y).solution.T
    return LinearGaussianProblem(X, Y, s, n / math.log(n), gamma, W_ols.reshape(-1).numpy(), [])
