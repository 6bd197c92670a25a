"""A hand-written Pyro model with condpost's primitives, checked against the declarative API.

    python examples/pyro_primitives.py [--quick]

It lifts the hidden layer of a small MLP, tempers the likelihood, preserves the
hidden activations on probe inputs, runs Pyro NUTS from w*, and shows that the model's
log joint equals ``LocalPosterior.log_density`` at random weights.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

import condpost as cp


def main(quick: bool = False) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.rand(150, 2, dtype=torch.float64) * 4 - 2
    y = torch.sin(1.5 * x[:, :1]) * torch.cos(x[:, 1:]) + 0.1 * torch.randn(
        150, 1, dtype=torch.float64
    )
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
    ).double()
    opt = torch.optim.LBFGS(net.parameters(), max_iter=2000, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    n, probes = len(x), x[:8]
    with cp.capture(net, ["1"]) as acts_star, torch.no_grad():
        net(probes)

    def model():
        f = cp.lift("net", net, localization=10.0, include="0.*")
        with cp.capture(f, ["1"]) as acts:
            f(probes)
        with cp.temper(nbeta="wbic", n=n), pyro.plate("data", n):
            pyro.sample("y", dist.Normal(f(x), 0.1).to_event(1), obs=y)
        cp.preserve("hidden", acts["1"], acts_star["1"], tolerance=0.05)

    post = cp.LocalPosterior(net, (x, y), cp.Gaussian(scale=0.1), localization=10.0, include="0.*")
    post.preserve(cp.Activations("1", probes, tolerance=0.05, name="hidden"))
    worst = 0.0
    for _ in range(10):
        w = post.center + 0.05 * torch.randn(post.d, dtype=torch.float64)
        tr = poutine.trace(poutine.condition(model, data=post.flat_to_sites(w))).get_trace()
        worst = max(worst, abs(float(tr.log_prob_sum() - post.log_density(w))))
    print(f"max |log joint (hand-written Pyro) − log_density (declarative)| = {worst:.2e}")

    steps = 50 if quick else 500
    mcmc = pyro.infer.MCMC(
        pyro.infer.NUTS(model, init_strategy=cp.init_to_center()),
        num_samples=steps,
        warmup_steps=steps,
        disable_progbar=quick,
    )
    mcmc.run()
    w0 = mcmc.get_samples()["net.0.weight"]
    print("posterior sd of the first-layer weights:\n", w0.std(0))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
