"""condpost: conditioned, tempered local posteriors of trained neural networks.

A trained network ``w*`` is one deterministic program. condpost samples the
*reference class* of programs near it — the tempered local posterior
``π(w) ∝ exp(−nβ L_n(w) − γ/2‖w − w*‖² − Σ_c ρ_c D_c(w))`` — conditioned on the
features to preserve, and analyses it.

Importing condpost never imports jax.
"""

from . import (
    distributed,  # imports no jax until init_jax() is called
    info,  # imports no jax
    models,
)
from ._errors import CenterWarning, CondpostWarning, ConstraintWarning, SamplerWarning
from ._version import __version__
from .auto import estimate_llc, sample_auto
from .calibration import Sensitivity, calibrate, sensitivity
from .constraints import (
    Activations,
    ActivationSparsity,
    CircuitMap,
    Constraint,
    Feature,
    FiringPattern,
    LossLevel,
    LowRank,
    Outputs,
    Quantized,
    WeightSparsity,
    WeightZeroPattern,
)
from .data import DataNotInMemoryError
from .lifting import LiftedNetwork
from .likelihoods import Bernoulli, Categorical, CausalLM, CustomNLL, Gaussian, Likelihood
from .posterior import LocalPosterior
from .primitives import capture, init_to_center, lift, preserve, temper
from .reference import ReferenceClass
from .slt import LLC, WBIC, refined_llc, wbic
from .stepsize import StepSizeCalibration, calibrate_step_size
from .store import open_store
from .sweep import SweepResult, sweep

__all__ = [
    "__version__",
    "DataNotInMemoryError",
    "LocalPosterior",
    "ReferenceClass",
    "LiftedNetwork",
    "Likelihood",
    "Categorical",
    "Gaussian",
    "Bernoulli",
    "CustomNLL",
    "CausalLM",
    "models",
    "distributed",
    "estimate_llc",
    "sample_auto",
    "Constraint",
    "Activations",
    "WeightZeroPattern",
    "CircuitMap",
    "Outputs",
    "ActivationSparsity",
    "FiringPattern",
    "WeightSparsity",
    "LowRank",
    "Quantized",
    "LossLevel",
    "Feature",
    "calibrate",
    "sensitivity",
    "Sensitivity",
    "LLC",
    "WBIC",
    "refined_llc",
    "wbic",
    "calibrate_step_size",
    "StepSizeCalibration",
    "open_store",
    "sweep",
    "SweepResult",
    "info",
    "lift",
    "temper",
    "preserve",
    "capture",
    "init_to_center",
    "CondpostWarning",
    "CenterWarning",
    "SamplerWarning",
    "ConstraintWarning",
]
