import numpy as np
import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_reset():
    """Seed every test and clear Pyro's global state (as NumPyro/Pyro test suites do)."""
    torch.manual_seed(0)
    np.random.seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


# Small test problems run faster (and far more predictably on a shared 2-core machine)
# on one intra-op thread.
torch.set_num_threads(1)
