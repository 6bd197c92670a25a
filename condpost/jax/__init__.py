"""condpost primitives for NumPyro scripts whose model is already written in JAX.

The same vocabulary as the Pyro side (``condpost.lift``, ``temper``, ``preserve``,
``capture``, ``init_to_center``), for a network given as a parameter pytree (a dict of
arrays, an Equinox module, Flax parameters) and a pure forward function:

```python
>>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
>>> import condpost.jax as cpj
>>> params = {"w1": jnp.full((3, 8), 0.1), "w2": jnp.full((8, 1), 0.1)}
>>> x, y = jnp.ones((50, 3)), jnp.zeros((50, 1))
>>> def forward(p, x):
...     h = cpj.site("hidden", jnp.tanh(x @ p["w1"]))
...     return h @ p["w2"]
>>> h_star = jnp.tanh(x[:5] @ params["w1"])               # the activations to preserve
>>> def model():
...     p = cpj.lift("net", params, localization=1.0)      # sites "net.w1", "net.w2"
...     out = forward(p, x)
...     with cpj.capture(["hidden"]) as acts:
...         forward(p, x[:5])                              # probes
...     with cpj.temper(nbeta="wbic", n=50), numpyro.plate("data", 50):
...         numpyro.sample("y", dist.Normal(out, 0.5).to_event(1), obs=y)
...     cpj.preserve("hidden", acts["hidden"], h_star, tolerance=0.05)
>>> tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace()
>>> [k for k, v in tr.items() if v["type"] == "sample"]
['net.w1', 'net.w2', 'y', 'constraint/hidden']
```

Importing ``condpost`` never imports JAX; this subpackage needs
``pip install condpost[jax]``.
"""

from __future__ import annotations

try:
    import jax as _jax  # noqa: F401
    import numpyro as _numpyro  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess without jax
    raise ImportError(
        "condpost.jax needs JAX and NumPyro: install them with `pip install condpost[jax]` "
        f"(import failed: {e})"
    ) from e

from .primitives import (
    TemperMessenger,
    capture,
    init_to_center,
    lift,
    preserve,
    site,
    site_names,
    temper,
)

__all__ = [
    "lift",
    "temper",
    "preserve",
    "capture",
    "site",
    "init_to_center",
    "site_names",
    "TemperMessenger",
]
