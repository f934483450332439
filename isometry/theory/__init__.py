"""The theory engine: infinite-width theory read from any Flax NNX model.

neural-tangents computes infinite-width kernels of a network rewritten in its
own layer language; this engine reads them off the researcher's own ``nnx``
model. It traces ``model(x)`` to a jaxpr and interprets every operation in the
infinite-width limit with one small rule per kind of operation
(:mod:`isometry.theory.interpret`): a contraction with a parameter is a fresh
Gaussian field whose covariance is the parameter's variance, read from its
values (``fan_in * mean(W^2)``; ``mean(b^2)`` for a bias; a norm's gain its
mean square) or given by ``variances=``; an elementwise function takes the
Gaussian expectations of :mod:`isometry.gaussian`; sums, scalings, pooling,
reshapes and products with deterministic matrices are linear maps of the Gram;
reductions over the width (layer norm's statistics, attention logits) take their
deterministic limit. An operation without a rule raises :class:`TheoryError`
naming it and the module that used it; nothing is guessed.

* :func:`nngp`: the covariance of the outputs over a fresh draw of the weights
  (Lee et al. 2018; Matthews et al. 2018; Novak et al. 2019).
* :func:`ntk`: the neural tangent kernel, every parameter trained (Jacot et al.
  2018), in the standard or the NTK parameterization.
* :func:`profile`: per cut point (as :func:`isometry.probe.blocks`), the
  forward statistics, the gradient norms and the mean squared singular value
  of the cumulative Jacobian, named as the probe's measurements.

The engine's equations are in :mod:`isometry.theory.algebra`,
:mod:`isometry.theory.contractions` and :mod:`isometry.theory.expectations`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from isometry import theory
    >>> model = nnx.Sequential(nnx.Linear(8, 64, rngs=nnx.Rngs(0)), jax.nn.relu,
    ...                        nnx.Linear(64, 4, rngs=nnx.Rngs(1)))
    >>> x = jax.random.normal(jax.random.key(0), (3, 8))
    >>> theory.nngp(model, x).shape
    (3, 3)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from isometry import validate
from isometry.theory import engine
from isometry.theory.algebra import Kind
from isometry.theory.profile import Profile, read_profile
from isometry.theory.values import TheoryError

__all__ = ["PARAMETERIZATIONS", "Profile", "TheoryError", "grams", "nngp", "ntk", "profile"]

PARAMETERIZATIONS = ("standard", "ntk")


def _output_gram(run, kind=None):
    y = run.output
    if not hasattr(y, "width"):
        raise TheoryError("the model's output does not depend on its parameters")
    if kind is None:
        return run.alg.gram(y, y)
    return run.alg.tangent(y, y, (kind,))[..., 0]


def _check_finite(name, value):
    a = np.asarray(value)
    if not np.all(np.isfinite(a)):
        raise TheoryError(
            f"theory.{name}: the result is not finite (a parameter, an input or a variance is "
            "not finite, or a variance is zero where it divides)"
        )
    return jnp.asarray(value)


def nngp(model, x, *, variances: dict | None = None):
    """The NNGP kernel of ``model`` on the batch ``x``: the covariance of its outputs over a
    fresh draw of the weights, per output unit, in the infinite-width limit.

    ``K[a, b] = lim E[y_a,c y_b,c]`` (Neal 1996; Lee et al. 2018). Each parameter is
    taken as a fresh zero-mean draw of its own variance (``fan_in * mean(W^2)`` of a
    weight, per tap for a convolution; ``mean(b^2)`` of an added parameter).

    Args:
        model: any ``flax.nnx.Module`` (left unmodified).
        x: inputs ``(n, ...)`` as the model takes them.
        variances: ``{path pattern: sigma^2}`` (``fnmatch`` patterns over parameter
            paths such as ``"blocks.*.mlp.kernel"``) replacing the variances read from
            the parameters: ``fan_in E[W^2]`` of a weight, ``E[b^2]`` of an added one.

    Returns:
        ``(n, n)`` for outputs ``(n, C)``; ``(n, *pos, n, *pos)`` for outputs with
        positions ``(n, *pos, C)``.

    Raises:
        TheoryError: an operation of the model without a rule (named, with its module),
            an input that does not fit the model, or a non-finite result.
    """
    return _check_finite("nngp", engine.run(model, x, _output_gram, variances=variances))


def ntk(model, x, parameterization: str = "standard", *, variances: dict | None = None):
    """The neural tangent kernel ``sum_theta J_theta J_theta^T`` of ``model`` on ``x``, every
    parameter trained, in the infinite-width limit (Jacot et al. 2018; Lee et al. 2019).

    ``parameterization="standard"``: the gradient with respect to the parameters as
    stored (a weight contributes ``fan_in`` times its input's Gram, so the kernel
    grows with the widths: it is the prediction at the model's own widths, as
    neural-tangents' ``"standard"`` with ``s = 1``). ``"ntk"``: each parameter is
    ``theta = s omega`` with ``omega`` trained and ``s^2`` its variance per entry
    (``mean(W^2)``), the recursion ``Theta' = K' + sigma^2 Kdot * Theta`` of a dense
    stack. Shapes and errors as :func:`nngp`.
    """
    validate.choice("parameterization", parameterization, PARAMETERIZATIONS)
    ntk_param = parameterization == "ntk"

    def read(run):
        kind = Kind("ntk", params=frozenset(p.key for p in run.params), ntk=ntk_param)
        return _output_gram(run, kind)

    return _check_finite("ntk", engine.run(model, x, read, variances=variances))


def grams(model, x, at=None, *, variances: dict | None = None) -> list:
    """The forward Gram of every cut point's output, in the infinite-width limit.

    For cut point ``l`` with output ``y^l (B, *pos, C)``: ``G^l[(a, p), (b, q)] =
    lim (1/C) sum_c y^l[a, p, c] y^l[b, q, c]``, shape ``(B, *pos, B, *pos)`` (the
    token Gram of a transformer, the pixel Gram of a CNN). ``at``, ``variances`` as
    :func:`profile`.
    """
    paths = engine.resolve_cuts(model, at)

    def read(run):
        return [run.alg.gram(v, v) for v in _fields(run.cuts)]

    return [_check_finite("grams", G) for G in engine.run(model, x, read, at=paths,
                                                             variances=variances)]  # fmt: skip


def _fields(values) -> list:
    for v in values:
        if not hasattr(v, "width"):
            raise TheoryError("a cut point whose output does not depend on the parameters")
    return list(values)


def profile(
    model,
    x,
    at=None,
    *,
    index: int = 0,
    gradients: bool = True,
    jacobian: bool = True,
    variances: dict | None = None,
) -> Profile:
    """Infinite-width predictions per cut point, named as the probe's measurements.

    Fields (``(K,)`` for ``K`` cut points): ``mean_sq``, ``chan_sq_mean``,
    ``chan_var``, ``pair_cosine``, ``position_cosine`` of each block's output;
    ``grad_out_sq``, ``grad_param_sq``, ``grad_kernel_sq`` of the probe's random
    projection loss (:func:`isometry.probe.signal`), ``grad_input_sq`` at the
    input; ``cumulative_mean``, the mean squared singular value of the Jacobian
    ``d y^l_index / d x_index`` (:func:`isometry.probe.jacobian_spectra`'s
    ``cumulative_summary["mean"]``). Equations: :mod:`isometry.theory.profile`.

    Args:
        model, x, variances: as :func:`nngp`.
        at: cut points (module paths); default :func:`isometry.probe.blocks`.
        index: the example whose input Jacobian is followed.
        gradients, jacobian: compute those fields (else NaN); each perturbation
            is one more tangent Gram per cut point.
    """
    paths = engine.resolve_cuts(model, at)
    depth = model.config.depth if engine.is_stack(model) else None

    def read(run):
        return read_profile(run, paths, gradients=gradients, jacobian=jacobian, depth=depth)

    out = engine.run(
        model, x, read, at=paths, variances=variances, probes=gradients,
        index=index if jacobian else None,
    )  # fmt: skip
    for k in ("mean_sq", "grad_out_sq", "cumulative_mean"):
        v = np.asarray(out[k])
        if np.any(np.isinf(v)) or (k == "mean_sq" and np.any(np.isnan(v))):
            raise TheoryError(f"theory.profile: {k} is not finite ({v.tolist()})")
    shapes = engine.cut_shapes(model, x, paths)
    return Profile(**out, paths=tuple(paths), shapes=shapes)
