"""isometry: dynamical isometry in JAX.

Theory (mean field, free probability) and measurement (Jacobian spectra,
signal propagation, training) of how signals and gradients propagate through
deep networks.
"""

from isometry import (
    activations,
    data,
    finite_width,
    freeprob,
    gaussian,
    initializers,
    jacobian,
    networks,
    parameterization,
    probe,
    runtime,
    shaping,
    signal,
    spectra,
    sweep,
    training,
    transformer_theory,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "activations",
    "data",
    "finite_width",
    "freeprob",
    "gaussian",
    "initializers",
    "jacobian",
    "networks",
    "parameterization",
    "probe",
    "runtime",
    "shaping",
    "signal",
    "spectra",
    "sweep",
    "training",
    "transformer_theory",
]
