"""Reference infinite-width kernels from neural-tangents for the theory engine's tests.

Each case is a network of ``tests/theory_models.py`` rewritten in neural-tangents'
``stax`` language, every convention matched to the ``nnx`` model:

* ``Dense`` / ``Conv`` with ``W_std^2 = sigma_w^2`` and ``b_std^2 = sigma_b^2`` on every
  layer (the ``nnx`` layers all have a bias); ``nnx.Conv``'s 3x3 kernels, stride 1,
  ``SAME`` (zero padding, in both) or ``VALID``; neural-tangents' convolution is
  i.i.d. over taps, the ``nnx`` model's after ``uniform_taps``;
* the widths of the ``nnx`` model as ``out_dim`` / ``out_chan``: the ``"standard"``
  NTK (``s = (1, 1)``: a weight contributes its fan-in times its input's kernel,
  ``in_dim`` for ``Dense``, ``in_chan * 9`` for ``Conv``; a bias contributes 1)
  depends on them;
* ``nnx.avg_pool(x, (2, 2), strides=(2, 2))``: ``AvgPool((2, 2), (2, 2), "VALID")``,
  both dividing by the window size; ``jnp.mean`` over positions: ``GlobalAvgPool``;
  a reshape to ``(n, H * W * C)``: ``Flatten`` (its kernel, the mean over positions,
  is the per-unit covariance of a ``Dense`` readout of fan-in ``H * W * C``);
* ``nnx.LayerNorm(epsilon=1e-12)`` before each activation: ``LayerNorm(axis=-1,
  eps=1e-12)``. neural-tangents' layer norm has no learnable scale or bias: the
  ``nnx`` model's norms are built with ``use_scale=False, use_bias=False``;
* residual blocks ``x + f(x)``: ``serial(FanOut(2), parallel(Identity(), f), FanInSum())``.

No case had to be skipped: every layer of the test models has an exact
neural-tangents counterpart.

The kernels are ``kernel_fn(x, None, ("nngp", "ntk"))`` in float64 for both
parameterizations (the NNGP is the same in both; the script checks it). Values were
produced in a separate environment with jax 0.4.30 and neural-tangents 0.6.5;
regenerate them there from the repository root with::

    python tests/reference/neural_tangents_kernels.py

which rewrites ``tests/reference/neural_tangents_kernels.json``.
"""

import json
import warnings
from pathlib import Path

import jax
import numpy as np
from neural_tangents import stax

jax.config.update("jax_enable_x64", True)

OUT = Path(__file__).with_suffix(".json")
W_VAR, B_VAR = 1.7, 0.08
# The residual branch ends in a fresh Dense / Conv, so it is independent of the skip path.
warnings.filterwarnings("ignore", message="`FanIn` layers assume independent inputs")

CASES = {
    "mlp_relu": dict(model="MLP", d=5, width=32, depth=3, act="relu", norm=False),
    "mlp_erf": dict(model="MLP", d=5, width=32, depth=3, act="erf", norm=False),
    "mlp_layernorm": dict(model="MLP", d=5, width=32, depth=3, act="relu", norm=True),
    "resmlp_relu": dict(model="ResMLP", d=5, width=32, depth=2, act="relu"),
    "cnn_same_pool": dict(
        model="CNN", c_in=3, width=8, act="relu", padding="SAME", head="pool", size=8
    ),
    # VALID: the convolutions and the pool take 14x14 positions to 2x2 before the flatten
    "cnn_valid_flatten": dict(
        model="CNN", c_in=3, width=8, act="erf", padding="VALID", head="flatten", size=14
    ),
    "convresnet_relu": dict(model="ConvResNet", c_in=3, width=8, depth=2, act="relu", size=8),
}


def network(arch, parameterization):
    """The ``stax`` network of the ``nnx`` test model ``arch``."""
    w_std, b_std = W_VAR**0.5, B_VAR**0.5
    kw = dict(W_std=w_std, b_std=b_std, parameterization=parameterization)
    width = arch["width"]
    act = {"relu": stax.Relu, "erf": stax.Erf}[arch["act"]]

    def dense():
        return stax.Dense(width, **kw)

    def conv(padding="SAME"):
        return stax.Conv(width, (3, 3), padding=padding, **kw)

    def residual(f):
        return stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), f), stax.FanInSum())

    if arch["model"] == "MLP":
        layers = [dense()]
        for _ in range(arch["depth"] - 1):
            if arch["norm"]:
                layers.append(stax.LayerNorm(axis=-1, eps=1e-12))
            layers += [act(), dense()]
        return stax.serial(*layers)
    if arch["model"] == "ResMLP":
        blocks = [residual(stax.serial(dense(), act(), dense())) for _ in range(arch["depth"])]
        return stax.serial(dense(), *blocks)
    if arch["model"] == "CNN":
        p = arch["padding"]
        head = stax.GlobalAvgPool() if arch["head"] == "pool" else stax.Flatten()
        return stax.serial(
            conv(p), act(), stax.AvgPool((2, 2), strides=(2, 2), padding="VALID"),
            conv(p), act(), conv(p), act(), head, dense(),
        )  # fmt: skip
    if arch["model"] == "ConvResNet":
        blocks = [residual(stax.serial(conv(), act(), conv())) for _ in range(arch["depth"])]
        return stax.serial(conv(), *blocks, stax.GlobalAvgPool(), dense())
    raise ValueError(arch["model"])


def inputs(arch, seed):
    rng = np.random.default_rng(seed)
    if "d" in arch:
        return rng.standard_normal((3, arch["d"]))
    return rng.standard_normal((3, arch["size"], arch["size"], arch["c_in"]))


def main():
    cases = {}
    for seed, (name, arch) in enumerate(CASES.items()):
        x = inputs(arch, seed)
        kernels = {}
        for param in ("standard", "ntk"):
            _, _, kernel_fn = network(arch, param)
            nngp, ntk = kernel_fn(x, None, ("nngp", "ntk"))
            kernels[param] = np.asarray(nngp), np.asarray(ntk)
        nngp = kernels["ntk"][0]
        np.testing.assert_allclose(kernels["standard"][0], nngp, rtol=1e-12)
        cases[name] = dict(
            arch=arch,
            W_var=W_VAR,
            b_var=B_VAR,
            x=x.tolist(),
            nngp=nngp.tolist(),
            ntk_standard=kernels["standard"][1].tolist(),
            ntk_ntk=kernels["ntk"][1].tolist(),
        )
        print(f"{name}: nngp diag {np.diag(nngp)}")
    OUT.write_text(json.dumps({"neural_tangents": "0.6.5", "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
