"""The theory engine against neural-tangents' analytic kernels, to 1e-8.

The reference values in ``tests/reference/neural_tangents_kernels.json`` are
neural-tangents 0.6.5's ``kernel_fn(x, None, ("nngp", "ntk"))`` of each test model
of ``tests/theory_models.py`` rewritten in its ``stax`` language (the conventions
matched are listed in the generating script). The project does not depend on
neural-tangents: regenerate the file in a separate environment with jax 0.4.30 and
neural-tangents 0.6.5, from the repository root::

    python tests/reference/neural_tangents_kernels.py

Here each case's ``nnx`` model is built at the reference's widths (the standard NTK
depends on them), its convolutions made i.i.d. over taps (``uniform_taps``), every
weight and bias given the reference's variances, and :func:`theory.nngp` and
:func:`theory.ntk` (both parameterizations) compared relative to the kernel's
largest entry.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from theory_models import CNN, F64, MLP, ConvResNet, ResMLP, uniform_taps

from isometry import theory

jax.config.update("jax_enable_x64", True)

REFERENCE = json.loads(
    (Path(__file__).parent / "reference" / "neural_tangents_kernels.json").read_text()
)["cases"]
TOL = 1e-8
ACTS = {"relu": jax.nn.relu, "erf": jax.scipy.special.erf}


def build(arch):
    """The ``nnx`` test model of ``arch``, as neural-tangents sees it."""
    rngs, act = nnx.Rngs(0), ACTS[arch["act"]]
    kind = arch["model"]
    if kind == "MLP":
        model = MLP(arch["d"], arch["width"], arch["depth"], rngs, act=act, norm=arch["norm"])
        if arch["norm"]:  # neural-tangents' layer norm has no learnable scale or bias
            model.norms = nnx.List(
                [nnx.LayerNorm(arch["width"], epsilon=1e-12, use_scale=False, use_bias=False,
                               rngs=rngs, param_dtype=F64, dtype=F64)
                 for _ in model.norms]
            )  # fmt: skip
        return model
    if kind == "ResMLP":
        return ResMLP(arch["d"], arch["width"], arch["depth"], rngs, act=act)
    if kind == "CNN":
        model = CNN(arch["c_in"], arch["width"], rngs, act=act, padding=arch["padding"],
                    head=arch["head"], size=arch["size"])  # fmt: skip
    elif kind == "ConvResNet":
        model = ConvResNet(arch["c_in"], arch["width"], arch["depth"], rngs, act=act)
    else:
        raise ValueError(kind)
    uniform_taps(model)
    return model


def rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


SLOW = {"convresnet_relu"}  # its residual sums and convolutions are each checked by default


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(REFERENCE)]
)
def test_kernels_match_neural_tangents(name):
    case = REFERENCE[name]
    model = build(case["arch"])
    x = np.asarray(case["x"], np.float64)
    variances = {"*kernel": case["W_var"], "*bias": case["b_var"]}
    got = {
        "nngp": theory.nngp(model, x, variances=variances),
        "ntk_standard": theory.ntk(model, x, "standard", variances=variances),
        "ntk_ntk": theory.ntk(model, x, "ntk", variances=variances),
    }
    errors = {k: rel_err(v, np.asarray(case[k])) for k, v in got.items()}
    assert all(e < TOL for e in errors.values()), errors
