"""The probe's theory: infinite-width predictions per cut point, named as the measured fields.

For any model the theory engine covers (:mod:`isometry.theory`: dense, convolutional,
residual, normalized, attention and recurrent models written in plain ``nnx``),
:func:`theory` returns :func:`isometry.theory.profile`'s predictions under the names of
:class:`ProbeSignal`'s fields (and the cumulative Jacobian's mean squared singular value),
as absolute numbers. The toolkit's own scanned ``networks.MLP``/``ConvNet`` keep their
mean-field theory (:func:`isometry.signal.model_theory`, with the finite-width correction
of residual ReLU stacks), its gradients relative to the last layer.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from isometry import cuts
from isometry import signal as _signal
from isometry import theory as _theory
from isometry.cuts import ProbeError, is_stack

__all__ = ["theory"]

Array = jax.Array

FIELDS = (
    "mean_sq", "chan_sq_mean", "chan_var", "pair_cosine", "position_cosine",
    "grad_out_sq", "grad_param_sq", "grad_kernel_sq", "cumulative_mean",
)  # fmt: skip


def theory(
    model, x, *, at=None, variances=None, index: int = 0, activation=None, residual_scale=None
) -> dict:
    """Infinite-width predictions per cut point, matched to :class:`ProbeSignal` fields.

    Any ``nnx`` model: :func:`isometry.theory.profile` read from the model itself (no
    description of the architecture); each field an absolute prediction of the
    measured one (``"absolute": True``): ``mean_sq``, ``chan_sq_mean``, ``chan_var``,
    ``pair_cosine``, ``position_cosine``, ``grad_out_sq``, ``grad_param_sq``,
    ``grad_kernel_sq`` of :func:`signal` (random-projection loss) and
    ``cumulative_mean``, the mean squared singular value of the cumulative Jacobian of
    example ``index`` (:func:`jacobian_spectra`'s ``cumulative_summary["mean"]``).

    A toolkit ``networks.MLP``/``ConvNet`` (:func:`is_stack`): the curves of
    :func:`isometry.signal.model_theory` (``q^l``, ``c^l``, ``grad_preact_sq``,
    ``grad_weight_sq`` as ``mean_sq``, ``pair_cosine``, ``grad_out_sq``,
    ``grad_kernel_sq``; gradients relative to the last layer, ``"absolute": False``);
    it raises for normalizations without a theory (batch norm).

    Args:
        model, x: as :func:`signal`.
        at: cut points; default :func:`blocks`.
        variances: ``{path pattern: sigma^2}`` replacing variances read from the
            parameters (:func:`isometry.theory.nngp`).
        index: the example whose input Jacobian is followed.
        activation, residual_scale: no longer needed (the engine reads the activation
            and the residual paths off the model); accepted and ignored, with a warning.

    Returns:
        a dict of ``(K,)`` arrays named like the measured fields, ``"absolute"``, and
        ``"theory"``: the :class:`isometry.theory.Profile` (or, for a toolkit stack,
        the :class:`isometry.signal.Theory`).

    Raises:
        ProbeError: unknown cut points, an input that does not fit.
        isometry.theory.TheoryError: an operation of the model without a rule (the
            message names the operation and the module that used it).
    """
    if activation is not None or residual_scale is not None:
        warnings.warn(
            "probe.theory: activation= and residual_scale= are no longer needed (the theory "
            "engine reads them off the model) and are ignored",
            DeprecationWarning,
            stacklevel=2,
        )
    if is_stack(model):
        return _stack_theory(model, x, at)
    pr = _theory.profile(model, x, at=at, variances=variances, index=index)
    return {f: getattr(pr, f) for f in FIELDS} | {"absolute": True, "theory": pr}


def _stack_theory(model, x, at) -> dict:
    """:func:`theory` of a toolkit stack: :func:`isometry.signal.model_theory` at its layers."""
    _, idx, x, _ = cuts.prepare_stack(model, x, at)
    try:
        th = _signal.model_theory(model, x)
    except ValueError as err:
        raise ProbeError(f"probe.theory: {err}") from None
    sel = jnp.asarray(idx)
    return {
        "mean_sq": th.q[sel],
        "pair_cosine": th.c[sel],
        "grad_out_sq": th.grad_preact_sq[sel],
        "grad_kernel_sq": th.grad_weight_sq[sel],
        "absolute": False,
        "theory": th,
    }
