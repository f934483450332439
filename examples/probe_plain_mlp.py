"""Probe an MLP written with plain ``nnx.Linear`` and ``nnx.tanh`` (no toolkit classes).

The cut points are the ``nnx.Linear`` outputs (the pre-activations ``h^l``).
The weights are copied from the equivalent :class:`isometry.networks.MLP`,
so ``probe.signal`` must agree with ``signal.measure`` on it (printed), and the
mean-field theory (``probe.theory``, the numbers of ``signal.theory``) is
drawn over the measurement. The toolkit's ``networks.MLP`` itself is probed
too (cut points ``layer.0``, ``layer.1``, ...; its theory is
``signal.model_theory``): the two runs lie on each other in the signal and
gradient panels; in the Jacobian panels they differ by one factor
``phi'(h^l)``, as the toolkit's layer ends at ``x^l = phi(h^l)`` and the
plain cut point at ``h^l``.

    python examples/probe_plain_mlp.py [--tiny] [--out examples/out]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import networks, probe, signal


class PlainMLP(nnx.Module):
    """``x^l = tanh(W^l x^{l-1} + b^l)``, ``l = 1..depth``, with plain flax layers."""

    def __init__(self, width: int, depth: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.layers = nnx.List(
            [nnx.Linear(width, width, rngs=rngs, param_dtype=dtype) for _ in range(depth)]
        )

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.tanh(layer(x))
        return x


def build(width: int = 256, depth: int = 20, seed: int = 0, dtype: str = "float32"):
    """``(plain, reference)``: a :class:`PlainMLP` holding the weights of a ``networks.MLP``
    (parameters of ``dtype``; ``"float64"`` needs ``jax_enable_x64``)."""
    cfg = networks.MLPConfig(
        depth=depth, width=width, activation="tanh", sigma_w2=1.5, sigma_b2=0.05, dtype=dtype
    )
    ref = networks.MLP(cfg, rngs=nnx.Rngs(seed))
    plain = PlainMLP(width, depth, rngs=nnx.Rngs(seed), dtype=ref.kernel[...].dtype)
    for l, layer in enumerate(plain.layers):
        layer.kernel[...] = ref.kernel[...][l]
        layer.bias[...] = ref.bias[...][l]
    return plain, ref


def main(out: str = "examples/out", tiny: bool = False) -> dict:
    width, depth, batch = (16, 4, 8) if tiny else (256, 20, 64)
    plain, ref = build(width, depth)
    x = signal.pair_inputs(jax.random.key(1), batch, width, 0.5)
    key = jax.random.key(2)
    got = probe.signal(plain, x, key=key)
    fwd, bwd = signal.measure(ref, x, key=key)
    pairs = {"mean_sq": fwd.q, "pair_cosine": fwd.c, "grad_out_sq": bwd.grad_preact_sq,
             "grad_kernel_sq": bwd.grad_weight_sq}  # fmt: skip
    rel = {k: float(jnp.max(jnp.abs(getattr(got, k) - v) / jnp.abs(v))) for k, v in pairs.items()}
    spec = probe.jacobian_spectra(plain, x)
    th = probe.theory(plain, x)
    run = {"signal": got, "spectra": spec, "theory": th, "label": "plain nnx.Linear + tanh"}
    toolkit = {
        "signal": probe.signal(ref, x, key=key),
        "spectra": probe.jacobian_spectra(ref, x),
        "theory": probe.theory(ref, x),
        "label": "networks.MLP",
    }
    title = f"plain tanh MLP, width {width}, depth {depth} (sigma_w2 = 1.5, sigma_b2 = 0.05)"
    probe.plot(run, toolkit, path=f"{out}/probe_plain_mlp", title=title)
    print("max relative difference to signal.measure on networks.MLP:", rel)
    print(
        "cumulative mean s^2 per block:", np.round(np.asarray(spec.cumulative_summary["mean"]), 3)
    )
    return {"relative_difference": rel, "figure": f"{out}/probe_plain_mlp.png"}


if __name__ == "__main__":
    from common import cli

    cli(main, __doc__)
