"""The training loop's probe: :func:`isometry.probe.monitor` of the model in evaluation mode.

Every model :func:`isometry.training.train` trains is probed by the same
monitor a researcher calls from an own loop, at its cut points
(:func:`isometry.probe.blocks`; the layers ``"layer.l"`` of the toolkit's
stacks), on the ``P = probe_inputs`` held-out inputs ``u``. Logged:

    jac_sv2_mean, jac_sv2_var, jac_sv2_max
        the mean and variance (each averaged over the P inputs) and the
        largest (over the inputs) squared singular value of the cumulative
        Jacobian at the last cut point: ``J = dx^L/dx^0`` of a toolkit stack
        (``x^0 = input_map(u)``), ``d y^K / d u`` of any other model;
    block_mean_sq, block_grad_out_sq, block_grad_param_sq
        per cut point (lists of ``K``): the mean square of the block output and
        the squared gradient norms at it and of its parameters, for the
        random-projection loss (:func:`isometry.probe.signal`).

Dynamical isometry: mean near 1, small variance and maximum (Pennington,
Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep learning through
dynamical isometry"). The Jacobian numbers are the monitor's
(:data:`MONITOR_OPTIONS`): the mean and variance by Hutchinson's trace estimator,
exact up to a width of 512; the largest by Lanczos, exact up to a width of 64 and a
lower bound converging in the steps beyond. The probe's key is
``fold_in(fold_in(key(seed), PROBE_TAG), step)``: it consumes none of the training's
randomness, and the model is measured on a copy, so the training is the same with the
probe on or off.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from flax import nnx

from isometry import probe
from isometry.cuts import ProbeError

__all__ = ["MONITOR_OPTIONS", "PROBE_FIELDS", "PROBE_TAG", "monitor_probe"]

MONITOR_OPTIONS = {"n_probes": 512, "lanczos_steps": 64}
"""Hutchinson probes and Lanczos steps of the training probe's Jacobian (per held-out input):
the mean and the variance are exact up to a width of 512 (the probes are the unit vectors),
the largest value up to 64, at the cost of the dense Jacobian the probe used to compute."""
PROBE_TAG = 0x70726F62
"""Folded into ``key(seed)`` for the probe's own key."""
PROBE_FIELDS = ("jac_sv2_mean", "jac_sv2_var", "jac_sv2_max",
                "block_mean_sq", "block_grad_out_sq", "block_grad_param_sq")  # fmt: skip
"""The record fields the probe adds at its steps."""


def monitor_probe(graphdef_eval, state: dict, u, seed: int):
    """``probe(params, batch_stats, rest, step) -> dict`` of :data:`PROBE_FIELDS`, or ``None``.

    ``graphdef_eval``/``state``: the model in evaluation mode (``nnx.split`` into
    params, batch stats, the rest) and its training state; ``u (P, *in)``: the
    probe inputs. ``None`` (with a note on stderr) when the model's cut points
    cannot be found (no ``nnx.Sequential``, no ``blocks``/``layers`` list).
    The monitor is compiled on the first call.
    """
    model = nnx.merge(graphdef_eval, state["params"], state["batch_stats"], state["rest"])
    try:
        paths = probe.blocks(model)
    except ProbeError as err:
        print(f"[train] no Jacobian probe: {str(err).splitlines()[0]}", file=sys.stderr)
        return None
    P = u.shape[0]
    fn = probe.monitor_fn(
        model, u, jacobian_at=paths[-1], examples=P, jacobian_batch=P, **MONITOR_OPTIONS
    )
    key = jax.random.fold_in(jax.random.key(seed), PROBE_TAG)

    def run(params, batch_stats, rest, step: int) -> dict:
        m = nnx.merge(graphdef_eval, params, batch_stats, rest)
        s = jax.device_get(fn(m, u, jax.random.fold_in(key, step)))
        out = {
            f"jac_sv2_{k}": float(getattr(s, f"jac_sv2_{k}")[-1]) for k in ("mean", "var", "max")
        }
        for k in ("mean_sq", "grad_out_sq", "grad_param_sq"):
            out[f"block_{k}"] = np.asarray(getattr(s, k), np.float64).tolist()
        return out

    return run
