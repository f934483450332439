"""Per-layer signal-propagation statistics of a scanned stack, and their mean-field theory.

Every function takes a network in scanned-stack form: a
:class:`~isometry.networks.Stack`, or any model with a ``stack()`` method
(:class:`~isometry.networks.MLP`, :class:`~isometry.networks.ConvNet`), and a
batch ``u`` of network inputs ``(B, ...)``, channels last. Statistics are
the per-layer outputs of one ``lax.scan`` over depth; arrays of per-layer
values have shape ``(L,)`` and entry ``l - 1`` belongs to layer ``l``.

Forward (:func:`forward`), for ``h^l`` the pre-activation and ``x^l`` the
layer output (the residual stream in residual networks)::

    q^l          = mean_{a,i} (h^l_{a,i})^2                    mean squared pre-activation
    c^l          = mean_pairs <h_a, h_b> / (|h_a| |h_b|)        pairs (a, b) = (0, 1), (2, 3), ...
    act_mean^l, act_var^l = mean and variance of phi over batch and units
    chan_sq_mean^l = mean_ch (mean_{batch, space} x^l)^2          average channel squared mean
    chan_var^l     = mean_ch  var_{batch, space} x^l              average channel variance
    branch_var^l   = chan_var of the residual branch (NaN without one)

The last three are the signal-propagation plots of Brock, De & Smith 2021
("Characterizing signal propagation to close the performance gap in
unnormalized ResNets").

Backward (:func:`backward`), for a scalar loss of the network's output (by
default a random projection ``Loss = sum_a <v_a, y_a> / B``, ``v ~ N(0, 1)``,
whose output gradient does not depend on the forward pass)::

    grad_preact_sq^l = ||dLoss/dh^l||_F^2      (zero probes added to h^l)
    grad_state_sq^l  = ||dLoss/dx^l||_F^2
    grad_weight_sq^l = ||dLoss/dW^l||_F^2      (the leaves named in ``Stack.weights``)

Theory (:func:`theory`, :func:`model_theory`), mean field for plain and
residual networks without normalization (Poole et al. 2016; Schoenholz et al.
2017; Yang & Schoenholz 2017) and for layer normalization before the
activation, from the stack input's mean square ``p^0``,
mean ``m^0`` and pair cosine ``c^0``::

    q^l  = sigma_w2 p^{l-1} + sigma_b2,   c^l = (sigma_w2 p12^{l-1} + sigma_b2) / q^l
    plain:     p^l = E[phi(h)^2],  p12^l = E[phi(h_a) phi(h_b)]       (the q- and c-maps)
    residual:  p^l = p^{l-1} + 2 alpha m^{l-1} E[phi(h)] + alpha^2 E[phi(h)^2]   (same for p12)
               m^l = m^{l-1} + alpha E[phi(h)]
    backward:  ||g_x^{l-1}||^2 = chi^l ||g_x^l||^2,
               chi^l = sigma_w2 mu1(q^l) (plain),  1 + alpha^2 sigma_w2 mu1(q^l) (residual)
               ||g_h^l||^2 = mu1(q^l) ||g_x^l||^2 (times alpha^2 if residual),
               ||g_W^l||^2 proportional to p^{l-1} ||g_h^l||^2

with ``mu1(q) = E[phi'(sqrt(q) z)^2]``. At the fixed point ``chi^l = chi1``:
gradients shrink (``chi1 < 1``, ordered) or grow (``chi1 > 1``, chaotic) by
``chi1`` per layer. Residual networks grow sub-exponentially when ``mu1``
decays with the growing ``q^l`` (bounded activations). The backward
recursions assume gradient independence (Schoenholz et al. 2017); they are
checked against measurement for plain tanh/ReLU/sigmoid and residual tanh
networks. Batch normalization's gradients explode at initialization (Yang et
al. 2019), which :func:`measure` shows; its rate ``lambda(B)`` is in
:mod:`isometry.batchnorm_theory` (:func:`model_theory` does not cover it).

Finite width (``theory(..., width=N)``; :func:`model_theory` by default), for
residual networks with a positively homogeneous activation (relu, leaky relu,
prelu, linear) and zero biases. The network above ``x^l`` is then homogeneous of
degree 1 in ``x^l``, so ``<dLoss/dx^l, x^l> = Loss`` at every layer (Euler):
the gradient's component along the stream, ``Loss / ||x^l||``, grows toward
the input as fast as the stream grows forward, ``rho^l = p^l / p^{l-1}``,
while the rest grows by ``chi^l``. For residual relu the stream's mean makes
``rho^l`` larger than ``chi^l`` (``rho -> 2.9``, ``chi = 2`` at ``alpha = 1``,
He init). Two channels, ``P^l`` along ``x^l`` and ``Q^l`` orthogonal to it
(taken uniform on the orthogonal complement), with ``A_l = I + alpha D^l W^l``::

    P^{l-1} = rho^l P^l                                  (exact, Euler)
    Q^{l-1} = (chi^l - delta^l / N) Q^l + lambda^l P^l   (leading order in 1/N)
    ||g_x^l||^2  proportional to  P^l + Q^l,   P^L = 1/N,  Q^L = 1 - 1/N

``lambda^l = E||A_l^T x^l||^2 / ||x^l||^2 - rho^l`` is the along-stream part
that the layer turns sideways, and ``delta^l / N`` what the orthogonal part
loses by being orthogonal to ``x^l`` (:func:`stream_channels` has the
formulas). At ``N -> infinity`` it is the mean-field recursion; the
correction is ``(1/N) prod_l (rho^l + ...)``, exponential in depth, so it
matters once ``(rho / chi)^L`` nears ``N`` (width 512, depth 16: 4.90 against
4.52 decades of mean-field growth; measured 4.89-4.97, seed sd 0.05-0.06;
width 128, depth 32: 12.68 against 9.33, measured 12.82 +- 0.13). The
correction is leading order in ``1/N``; at width 1,536, depth 16 it
overshoots (4.684 predicted, 4.633 +- 0.009 measured, 4.515 infinite width),
which is not resolved here.
For plain networks the same account gives no change at this order (``rho = chi``
and the sideways part balances the loss), as it must: ``E||J^T v||^2`` is
exactly ``chi^L N`` for ReLU (Hanin & Nica 2019). Biases break Euler's identity;
with ``sigma_b2 > 0`` the mean-field recursion is used.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> from isometry import networks, signal
    >>> model = networks.MLP(networks.MLPConfig(depth=10, width=128), rngs=nnx.Rngs(0))
    >>> u = jax.random.normal(jax.random.key(1), (32, 128))
    >>> fwd, bwd = signal.measure(model, u, key=jax.random.key(2))
    >>> fwd.q.shape, bwd.grad_preact_sq.shape
    ((10,), (10,))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isometry import gaussian as gs
from isometry import networks, validate
from isometry.activations import Activation
from isometry.activations import get as get_activation
from isometry.networks import Stack

__all__ = [
    "Backward",
    "Forward",
    "Theory",
    "as_stack",
    "backward",
    "channel_stats",
    "fit_decay_length",
    "forward",
    "gradient_profile",
    "input_statistics",
    "jit_once",
    "measure",
    "measure_with_theory",
    "model_theory",
    "pair_cosine",
    "pair_inputs",
    "random_projection_loss",
    "stream_channels",
    "theory",
]

Array = jax.Array


def as_stack(model) -> Stack:
    """A :class:`~isometry.networks.Stack` from a stack or a model with ``stack()``."""
    if isinstance(model, Stack):
        return model
    if hasattr(model, "stack") and callable(model.stack):
        return model.stack()
    raise TypeError(
        f"model must be a networks.Stack or have a stack() method, got {type(model).__name__}"
    )


# --------------------------------------------------------------------------- #
# Measurements.
# --------------------------------------------------------------------------- #


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Forward:
    """Per-layer forward statistics; every field ``(L,)`` (see the module docstring)."""

    q: Array
    c: Array
    act_mean: Array
    act_var: Array
    chan_sq_mean: Array
    chan_var: Array
    branch_var: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Backward:
    """Per-layer squared gradient norms ``(L,)``; ``grad_input_sq`` is at ``x^0``."""

    grad_preact_sq: Array
    grad_state_sq: Array
    grad_weight_sq: Array
    grad_input_sq: Array
    loss: Array


def pair_cosine(h: Array) -> Array:
    """Mean cosine of pairs ``(0, 1), (2, 3), ...`` along axis 0 (NaN if fewer than 2)."""
    b = h.shape[0] - h.shape[0] % 2
    if h.ndim < 2 or b < 2:
        return jnp.full((), jnp.nan, h.dtype)
    f = h[:b].reshape(b // 2, 2, -1)
    num = jnp.sum(f[:, 0] * f[:, 1], axis=-1)
    den = jnp.sqrt(jnp.sum(f[:, 0] ** 2, axis=-1) * jnp.sum(f[:, 1] ** 2, axis=-1))
    return jnp.mean(num / den)


def channel_stats(x: Array) -> tuple[Array, Array]:
    """``(chan_sq_mean, chan_var)`` of ``x`` (channels last): ``mean_ch (mean x)^2`` and
    ``mean_ch var x``, the mean and variance over every axis but the last (Brock et al. 2021).
    """
    axes = tuple(range(x.ndim - 1))
    return jnp.mean(jnp.mean(x, axis=axes) ** 2), jnp.mean(jnp.var(x, axis=axes))


def _layer_stats(x_new: Array, aux: dict) -> dict:
    h = aux.get("preact", x_new)
    post = aux.get("post", x_new)
    sq_mean, var = channel_stats(x_new)
    branch = aux.get("branch")
    return {
        "q": jnp.mean(h**2),
        "c": pair_cosine(h),
        "act_mean": jnp.mean(post),
        "act_var": jnp.var(post),
        "chan_sq_mean": sq_mean,
        "chan_var": var,
        "branch_var": (
            jnp.full((), jnp.nan, x_new.dtype) if branch is None else channel_stats(branch)[1]
        ),
    }


def _check_batch(u) -> Array:
    u = jnp.asarray(u)
    if u.ndim < 2 or u.shape[0] < 1:
        raise ValueError(f"u must be a batch (B, ...) with B >= 1, got shape {u.shape}")
    finite = jnp.all(jnp.isfinite(u))
    if validate.is_concrete(finite) and not bool(finite):
        raise ValueError("u must be finite")
    return u


def forward(model, u: Array) -> Forward:
    """Per-layer forward statistics for the batch ``u`` (``(B, ...)``; pairs for ``c``)."""
    s = as_stack(model)
    x0 = s.input_map(_check_batch(u))

    def body(x, p):
        x_new, aux = s.step(p, x, None)
        return x_new, _layer_stats(x_new, aux)

    return Forward(**lax.scan(body, x0, s.params)[1])


def random_projection_loss(key: Array, shape, dtype=jnp.float32) -> Callable[[Array], Array]:
    """``y -> sum_a <v_a, y_a> / B`` with ``v ~ N(0, 1)`` of ``shape`` (``(B, ...)``)."""
    validate.prng_key("key", key)
    v = jax.random.normal(key, shape, dtype)
    return lambda y: jnp.sum(v * y) / shape[0]


def _per_layer_sq(tree) -> Array:
    leaves = jax.tree.leaves(tree)
    return sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves)


def measure(
    model, u: Array, loss_fn: Callable[[Array], Array] | None = None, *, key: Array | None = None
) -> tuple[Forward, Backward]:
    """Forward statistics and squared gradient norms in one forward/backward pass.

    Args:
        model: a :class:`~isometry.networks.Stack` or a model with ``stack()``.
        u: network inputs ``(B, ...)``.
        loss_fn: ``loss_fn(y) -> scalar`` of the network output for the batch;
            default :func:`random_projection_loss` with ``key``.
        key: PRNG key of the random projection (needed without ``loss_fn``).

    Returns:
        ``(Forward, Backward)``; the gradients are those of ``loss_fn`` with
        respect to the pre-activations ``h^l``, layer outputs ``x^l``,
        per-layer weights and the stack input ``x^0``.
    """
    s = as_stack(model)
    u = _check_batch(u)
    x0 = s.input_map(u)
    if loss_fn is None:
        if key is None:
            raise ValueError("measure/backward: pass loss_fn, or key for the random projection")
        y_shape = jax.eval_shape(s, u)
        loss_fn = random_projection_loss(key, y_shape.shape, y_shape.dtype)
    elif not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")

    p0 = jax.tree.map(lambda a: a[0], s.params)
    out_shape, aux_shape = jax.eval_shape(lambda p, x: s.step(p, x, None), p0, x0)
    h_shape = aux_shape.get("preact", out_shape)
    L = s.depth
    probe_h = jnp.zeros((L, *h_shape.shape), h_shape.dtype)
    probe_x = jnp.zeros((L, *out_shape.shape), out_shape.dtype)

    def loss(params, ph, px, x0):
        def body(x, inp):
            p, dh, dx = inp
            x_new, aux = s.step(p, x, dh)
            x_new = x_new + dx
            return x_new, _layer_stats(x_new, aux)

        xL, stats = lax.scan(body, x0, (params, ph, px))
        return loss_fn(s.output_map(xL)), stats

    (value, stats), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        s.params, probe_h, probe_x, x0
    )
    g_params, g_h, g_x, g_x0 = grads
    weights = s.weight_params(g_params)
    bwd = Backward(
        grad_preact_sq=_per_layer_sq(g_h),
        grad_state_sq=_per_layer_sq(g_x),
        grad_weight_sq=_per_layer_sq(weights),
        grad_input_sq=jnp.sum(g_x0**2),
        loss=value,
    )
    return Forward(**stats), bwd


def backward(
    model, u: Array, loss_fn: Callable[[Array], Array] | None = None, *, key: Array | None = None
) -> Backward:
    """Per-layer squared gradient norms (see :func:`measure`)."""
    return measure(model, u, loss_fn, key=key)[1]


# --------------------------------------------------------------------------- #
# Theory.
# --------------------------------------------------------------------------- #


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Theory:
    """Mean-field predictions per layer, ``(L,)``.

    ``q``, ``c``: pre-activation mean square and pair correlation;
    ``chi``: the per-layer factor of ``||dLoss/dx||^2`` (``x^l -> x^{l-1}``);
    ``grad_preact_sq``, ``grad_state_sq``, ``grad_weight_sq``: squared
    gradient norms relative to their value at the last layer (1 there);
    ``grad_input_sq``: ``||dLoss/dx^0||^2`` relative to ``||dLoss/dx^L||^2``.
    """

    q: Array
    c: Array
    chi: Array
    grad_preact_sq: Array
    grad_state_sq: Array
    grad_weight_sq: Array
    grad_input_sq: Array


def theory(
    act: Activation | str,
    sigma_w2,
    sigma_b2,
    depth: int,
    q0,
    c0=None,
    *,
    m0=0.0,
    residual_scale: float | None = None,
    layer_norm: bool = False,
    width: int | None = None,
) -> Theory:
    """Mean-field per-layer statistics of a plain (or residual) network.

    Args:
        act: the activation (or its name).
        sigma_w2, sigma_b2: the effective weight and bias variances.
        depth: ``L``.
        q0: ``p^0``, the mean squared entry of the stack input ``x^0``
            (so ``q^1 = sigma_w2 q0 + sigma_b2``, Poole et al. 2016).
        c0: the cosine of the input pairs (default 0).
        m0: the mean entry of ``x^0`` (residual networks only).
        residual_scale: ``alpha`` for ``x^l = x^{l-1} + alpha phi(h^l)``;
            ``None`` for a plain network.
        layer_norm: layer normalization before the activation,
            ``x^l = phi(LN(h^l))`` (unit gain, zero offset): the activation
            always sees variance 1, so ``p^l = E[phi(z)^2]``, and the backward
            factor becomes ``chi^l = (1 - 2/N) sigma_w2 mu1(1) / q^l`` (the
            normalization divides by ``sqrt(q^l)`` and projects out the mean
            and the normalized direction).
        width: ``N``: needed with ``layer_norm``; with a residual branch, a
            positively homogeneous activation (relu, leaky relu, prelu,
            linear) and ``sigma_b2 = 0`` it adds the finite-width correction
            of the gradients (module docstring, :func:`stream_channels`);
            ``None``: the infinite-width limit.

    Returns:
        a :class:`Theory` (see the module docstring for the recursions).
    """
    _check_theory(depth, sigma_w2, sigma_b2, q0, c0, residual_scale, layer_norm, width)
    c0 = 0.0 if c0 is None else c0
    act = get_activation(act)
    dtype = jnp.result_type(q0, c0, m0, sigma_w2, sigma_b2, float)
    sw, sb, p0, c0, m0 = (jnp.asarray(v, dtype) for v in (sigma_w2, sigma_b2, q0, c0, m0))
    a = jnp.asarray(1.0 if residual_scale is None else residual_scale, dtype)
    finite = residual_scale is not None and width is not None and _homogeneous(act)
    n = jnp.asarray(width if finite else 1, dtype)
    ln_gain = jnp.asarray(1.0 - 2.0 / width if layer_norm else 1.0, dtype)
    kind = jnp.asarray([residual_scale is not None, layer_norm, finite])
    return _theory_arrays(act, depth, kind, sw, sb, p0, c0, m0, a, n, ln_gain)


def jit_once(fn: Callable, static_argnums: tuple[int, ...]) -> Callable:
    """``fn`` jitted for a program that runs once per compilation (a theory's recursion).

    Called with concrete arguments it is compiled at XLA's backend optimization
    level 0: about 40% less compile time, the same values to rounding (~1e-7
    relative in float32, ~1e-15 in float64). Called inside a trace (``jit``,
    ``vmap``) it is an ordinary nested ``jit``: compiler options apply only to
    top-level programs.
    """
    plain = jax.jit(fn, static_argnums=static_argnums)
    level0 = jax.jit(
        fn, static_argnums=static_argnums, compiler_options={"xla_backend_optimization_level": 0}
    )

    @functools.wraps(fn)
    def call(*args):
        traced = any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(args))
        return (plain if traced else level0)(*args)

    return call


def _theory_recursion(act, depth, kind, sw, sb, p0, c0, m0, a, n, ln_gain) -> Theory:
    """The recursions of :func:`theory`; ``kind = [residual, layer_norm, finite]`` (bool).

    Compiled once per (activation, depth): the kind of network is traced, not static.
    """
    residual, layer_norm, finite = kind[0], kind[1], kind[2]
    body = _theory_layer(act, sw, sb, a, residual, layer_norm, ln_gain)
    _, (q, c, chi, gh, p_prev, m_prev) = lax.scan(body, (p0, c0 * p0, m0), None, length=depth)
    g_state, g_pre, g_w = gradient_profile(chi, gh, p_prev)
    g_in = jnp.prod(chi)
    if _homogeneous(act):
        channels = stream_channels(act, sw, a, p_prev, m_prev)
        fw_state, fw_pre, fw_in = _two_channel_profile(chi, gh, *channels, n)
        fw_w = p_prev * fw_pre / (p_prev[-1] * fw_pre[-1])
        exact = finite & (sb == 0)  # Euler's identity needs zero biases
        fw, mf = (fw_state, fw_pre, fw_w, fw_in), (g_state, g_pre, g_w, g_in)
        g_state, g_pre, g_w, g_in = (jnp.where(exact, f, m) for f, m in zip(fw, mf, strict=True))
    return Theory(
        q=q,
        c=c,
        chi=chi,
        grad_preact_sq=g_pre,
        grad_state_sq=g_state,
        grad_weight_sq=g_w,
        grad_input_sq=g_in,
    )


_theory_arrays = jit_once(_theory_recursion, static_argnums=(0, 1))


def _homogeneous(act: Activation) -> bool:
    """``phi(s h) = s phi(h)`` for ``s > 0``: piecewise linear with its only kink at 0."""
    return act.piecewise_linear and all(k == 0.0 for k in act.kinks)


def stream_channels(act, sigma_w2, alpha, p, m) -> tuple[Array, Array, Array, Array]:
    """Per-layer factors of the finite-width gradient channels of a residual network.

    For ``x^l = x^{l-1} + alpha phi(W^l x^{l-1})`` with a positively homogeneous
    ``phi`` (slopes ``s+`` above 0 and ``s-`` below), zero biases and ``W_ij ~ N(0,
    sigma_w2 / N)``, the layer's Jacobian is ``A_l = I + alpha D^l W^l`` and ``x^l =
    A_l x^{l-1}``. With ``p, m`` the mean square and mean of ``x^{l-1}``, ``q = sigma_w2 p``
    and the Gaussian moments at ``q`` (closed forms, ``z ~ N(0, 1)``, ``h = sqrt(q) z``)

        e1 = E phi = sqrt(q / 2 pi) (s+ - s-),          e2 = E phi^2 = q (s+^2 + s-^2) / 2,
        f1 = E phi'^2 phi = sqrt(q / 2 pi) (s+^3 - s-^3), f2 = E phi'^2 phi^2 = q (s+^4 + s-^4) / 2,
        mu1 = E phi'^2 = (s+^2 + s-^2) / 2,

    to leading order in ``1/N``::

        c = m e1 / p,   t = c + alpha e2 / p,   rho = 1 + 2 alpha c + alpha^2 e2 / p
        d = (mu1 p + 2 alpha m f1 + alpha^2 f2) / p              (= ||D A x||^2 / ||x||^2)
        lambda = (rho + 2 alpha (1 + alpha c) t + alpha^2 (t^2 + sigma_w2 d)) / rho - rho
        delta = alpha^2 (sigma_w2 d / rho + e2 / p - t^2 / rho)
        gain_par = alpha^2 d / rho

    ``rho = ||x^l||^2 / ||x^{l-1}||^2`` (the forward growth), ``lambda`` the part of
    ``||A_l^T x^l||^2 / ||x^l||^2`` off the direction ``x^{l-1}``, ``delta / N``
    the deficit of ``E||A_l^T g||^2 / ||g||^2`` below ``chi`` for ``g`` uniform on the
    complement of ``x^l``, and ``gain_par`` the factor ``||dLoss/dh^l||^2 /
    ||dLoss/dx^l||^2`` of the along-stream component (derived by writing
    ``W = W x^ x^T + G (I - x^ x^T)`` with ``G`` independent of ``h = W x``).

    Args:
        act: the activation (positively homogeneous: relu, leaky relu, prelu, linear).
        sigma_w2, alpha: weight variance and residual scale (scalars).
        p, m: ``(L,)`` mean square and mean of each layer's input ``x^{l-1}``.

    Returns:
        ``(rho, lambda, delta, gain_par)``, ``(L,)`` each.
    """
    act = get_activation(act)
    if not _homogeneous(act):
        raise ValueError(
            f"stream_channels: act must be positively homogeneous (relu, leaky_relu, prelu, "
            f"linear), got {act.name!r}"
        )
    with jax.ensure_compile_time_eval():
        sp, sn = (float(act.dphi(jnp.asarray(v))) for v in (1.0, -1.0))
    p, m = jnp.asarray(p), jnp.asarray(m)
    q = sigma_w2 * p
    root = jnp.sqrt(q / (2.0 * math.pi))
    e1, f1 = root * (sp - sn), root * (sp**3 - sn**3)
    e2, f2, mu1 = q * (sp**2 + sn**2) / 2, q * (sp**4 + sn**4) / 2, (sp**2 + sn**2) / 2
    c, e2n = m * e1 / p, e2 / p
    t = c + alpha * e2n
    rho = 1.0 + 2.0 * alpha * c + alpha**2 * e2n
    d = (mu1 * p + 2.0 * alpha * m * f1 + alpha**2 * f2) / p
    turned = (rho + 2.0 * alpha * (1.0 + alpha * c) * t + alpha**2 * (t * t + sigma_w2 * d)) / rho
    delta = alpha**2 * (sigma_w2 * d / rho + e2n - t * t / rho)
    return rho, turned - rho, delta, alpha**2 * d / rho


def _two_channel_profile(chi, gain, rho, leak, delta, gain_par, width):
    """Backward pass of the channels ``(P, Q)`` (module docstring): relative
    ``||g_x^l||^2``, ``||g_h^l||^2`` per layer ``(L,)`` and ``||g_x^0||^2 / ||g_x^L||^2``."""
    n = jnp.asarray(width, chi.dtype)

    def back(carry, layer):
        P, Q = carry
        chi_l, gain_l, rho_l, leak_l, delta_l, gp_l = layer
        out = (P + Q, gain_l * Q + gp_l * P)
        return (rho_l * P, (chi_l - delta_l / n) * Q + leak_l * P), out

    layers = tuple(v[::-1] for v in (chi, gain, rho, leak, delta, gain_par))
    (P0, Q0), (state, pre) = lax.scan(back, (1.0 / n, 1.0 - 1.0 / n), layers)
    state, pre = state[::-1], pre[::-1]
    return state, pre / pre[-1], P0 + Q0


def _check_theory(depth, sigma_w2, sigma_b2, q0, c0, residual_scale, layer_norm, width):
    validate.positive_int("depth", depth)
    validate.real_array("sigma_w2", sigma_w2, minimum=0.0, strict=True)
    validate.real_array("sigma_b2", sigma_b2, minimum=0.0)
    validate.real_array("q0", q0, minimum=0.0)
    c0 = 0.0 if c0 is None else c0
    validate.real_array("c0", c0, minimum=-1.0 - 1e-6, maximum=1.0 + 1e-6)
    if residual_scale is not None:
        validate.real_array("residual_scale", residual_scale, minimum=0.0, strict=True)
    if layer_norm:
        if residual_scale is not None:
            raise ValueError("theory: layer_norm with a residual branch is not covered")
        validate.positive_int("width", width, minimum=3)
    elif width is not None:
        validate.positive_int("width", width, minimum=2)


def _theory_layer(act, sw, sb, alpha, residual, layer_norm, ln_gain):
    """One layer of :func:`theory` for ``lax.scan``:
    ``(p, p12, m) -> next, (q, c, chi, gain, p, m)`` (``p, m`` of the layer's input).

    ``residual``, ``layer_norm`` (traced bools): a residual branch of scale
    ``alpha``; layer normalization before the activation, whose backward
    factor carries ``ln_gain = 1 - 2/N``. Every kind evaluates the same
    Gaussian expectations (at ``q``, or at 1 after the normalization), so one
    program serves them all.
    """

    def body(carry, _):
        p, p12, m = carry
        q = sw * p + sb
        q12 = sw * p12 + sb
        safe = jnp.where(q > 0, q, 1.0)
        c = jnp.where(q > 0, jnp.clip(q12 / safe, -1.0, 1.0), 1.0)
        # The activation sees variance 1 after the normalization, q otherwise.
        qa = jnp.where(layer_norm, jnp.ones_like(safe), safe)
        on = layer_norm | (q > 0)
        e2 = gs.second_moment(act, qa) * on
        k = gs.phi_kernel(act, qa, qa, c) * on
        mu1 = gs.dphi_moment(act, qa, 1)
        e1 = gs.expect(act.phi, qa, kinks=act.kinks) * on
        a = alpha
        gh = jnp.where(layer_norm, ln_gain * mu1 / safe, jnp.where(residual, a * a * mu1, mu1))
        chi = jnp.where(residual, 1.0 + a * a * sw * mu1, sw * gh)
        res = (p + 2 * a * m * e1 + a * a * e2, p12 + 2 * a * m * e1 + a * a * k, m + a * e1)
        new = tuple(jnp.where(residual, r, v) for r, v in zip(res, (e2, k, m), strict=True))
        return new, (q, c, chi, gh, p, m)

    return body


def gradient_profile(chi: Array, gain: Array, p_prev: Array) -> tuple[Array, Array, Array]:
    """Mean-field squared gradient norms per layer from the per-layer factors (backward pass).

        ||g_x^l||^2 / ||g_x^L||^2 = prod_{k=l+1}^{L} chi^k
        ||g_h^l||^2  proportional to  gain^l ||g_x^l||^2
        ||g_W^l||^2  proportional to  p^{l-1} ||g_h^l||^2

    with ``chi^l`` the factor of ``||dLoss/dx||^2`` from ``x^l`` to ``x^{l-1}``
    (plain: ``sigma_w2 mu1(q^l)``), ``gain^l`` that from ``x^l`` to ``h^l``
    (plain: ``mu1(q^l)``) and ``p^{l-1}`` the mean square of the layer's
    input (Schoenholz et al. 2017, gradient independence).

    Args:
        chi, gain, p_prev: ``(L,)`` each; entry ``l - 1`` belongs to layer ``l``.

    Returns:
        ``(grad_state_sq, grad_preact_sq, grad_weight_sq)``, ``(L,)`` each,
        relative to the last layer (1 there).
    """
    chi, gain, p_prev = (jnp.asarray(v) for v in (chi, gain, p_prev))
    tail = jnp.concatenate([chi[1:], jnp.ones((1,), chi.dtype)])
    g_state = jnp.cumprod(tail[::-1])[::-1]
    g_pre = gain * g_state
    g_w = p_prev * g_pre
    return g_state, g_pre / g_pre[-1], g_w / g_w[-1]


def input_statistics(model, u: Array) -> tuple[Array, Array, Array]:
    """``(p^0, c^0, m^0)``: mean square, pair cosine and mean of the stack input ``x^0``."""
    s = as_stack(model)
    x0 = s.input_map(_check_batch(u))
    c0 = pair_cosine(x0)
    return jnp.mean(x0**2), jnp.where(jnp.isnan(c0), 0.0, c0), jnp.mean(x0)


def model_theory(model, u: Array, *, finite_width: bool = True) -> Theory:
    """:func:`theory` for an :class:`~isometry.networks.MLP` (plain or residual, no
    normalization or layer normalization before the activation) or a
    :class:`~isometry.networks.ConvNet`, at the statistics of its stack input
    for the batch ``u``.

    ``finite_width``: include the finite-width correction of residual networks
    with a positively homogeneous activation and no biases at the MLP's width
    (module docstring); ``False``: the infinite-width limit.

    Raises:
        ValueError: the MLP normalizes otherwise (no mean-field theory here; measure it).
        TypeError: not an MLP or ConvNet (call :func:`theory` directly).
    """
    if not isinstance(model, (networks.MLP, networks.ConvNet)):
        raise TypeError(
            f"model_theory needs a networks.MLP or networks.ConvNet, got {type(model).__name__}; "
            "call signal.theory with the layer's variances"
        )
    cfg = model.config
    if not isinstance(finite_width, bool):
        raise TypeError(f"finite_width must be True or False, got {finite_width!r}")
    alpha, ln = None, False
    if isinstance(cfg, networks.MLPConfig):
        ln = cfg.norm == "layer" and cfg.norm_position == "pre" and not cfg.residual
        if cfg.norm != "none" and not ln:
            raise ValueError(
                f"model_theory: no mean-field theory here for norm={cfg.norm!r} "
                f"(position {cfg.norm_position!r}, residual {cfg.residual}); "
                "compare measured statistics instead"
            )
    alpha = cfg.branch_scale if cfg.residual else None
    sw, sb = cfg.variances()
    p0, c0, m0 = input_statistics(model, u)
    return theory(
        cfg.act, sw, sb, cfg.depth, p0, c0, m0=m0, residual_scale=alpha, layer_norm=ln,
        width=cfg.width if ln or (finite_width and alpha is not None) else None,
    )  # fmt: skip


def pair_inputs(key: Array, batch: int, width: int, correlation: float = 0.5) -> Array:
    """``(batch, width)`` standard normal inputs in pairs ``(0, 1), (2, 3), ...`` of the
    given correlation ``c``: ``u_b = c u_a + sqrt(1 - c^2) z`` (the pairs of :func:`forward`).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2 or batch % 2:
        raise ValueError(f"batch must be an even integer >= 2, got {batch!r}")
    width = validate.positive_int("width", width)
    validate.real_array("correlation", correlation, minimum=-1.0, maximum=1.0)
    z = jax.random.normal(key, (batch // 2, 2, width))
    u = jnp.stack([z[:, 0], correlation * z[:, 0] + math.sqrt(1.0 - correlation**2) * z[:, 1]], 1)
    return u.reshape(batch, width)


def fit_decay_length(
    c, c_star, floor=1e-9, *, ceiling: float = 1e-2, min_layers: int = 6
) -> np.ndarray:
    """Decay length ``xi`` of ``|c^l - c*| ~ exp(-l / xi)``: ``(...,)`` from ``c (..., L)``.

    ``c[..., l - 1]`` is the cosine of two signals at layer ``l`` (e.g. of the
    pre-activations of :func:`isometry.jacobian.pair_on_sphere` inputs) and
    ``c_star`` (broadcast against ``c[..., 0]``) its fixed point. A least-squares
    line::

        log |c^l - c*| = a - l / xi

    through the layers with ``floor < |c^l - c*| < ceiling`` (past the nonlinear
    transient, above the rounding floor; ``floor`` broadcasts like ``c_star``),
    as Schoenholz et al. 2017 measure ``xi_c``. NaN where fewer than
    ``min_layers`` layers qualify or the distance does not fall (slope ``>= 0``);
    NaN entries of ``c`` never qualify. NumPy, float64.
    """
    validate.real_array("floor", floor, minimum=0.0)
    validate.real_array("ceiling", ceiling, minimum=0.0, strict=True)
    min_layers = validate.positive_int("min_layers", min_layers, 2)
    if np.any(np.asarray(floor) >= ceiling):
        raise ValueError(f"floor must be below ceiling ({ceiling}), got {floor}")
    c = np.asarray(c, np.float64)
    if c.ndim < 1 or c.shape[-1] < 1:
        raise ValueError(f"c must have a last axis over layers, got shape {c.shape}")
    dist = np.abs(c - np.asarray(c_star)[..., None])
    layers = np.arange(1, c.shape[-1] + 1, dtype=float)
    with np.errstate(invalid="ignore"):
        use = (dist < ceiling) & (dist > np.asarray(floor)[..., None])
    n = use.sum(-1)
    logd = np.log(np.where(use, dist, 1.0))
    lbar = (layers * use).sum(-1) / np.maximum(n, 1)
    ybar = (logd * use).sum(-1) / np.maximum(n, 1)
    dl = (layers - lbar[..., None]) * use
    slope = (dl * (logd - ybar[..., None])).sum(-1) / np.maximum((dl * dl).sum(-1), 1e-300)
    fit = (n >= min_layers) & (slope < 0)
    return np.where(fit, -1.0 / np.where(slope < 0, slope, -1.0), np.nan)


def measure_with_theory(model, u: Array, *, key: Array) -> dict[str, Array]:
    """:func:`measure` (jitted, random-projection loss with ``key``) and, where it exists,
    :func:`model_theory`: the fields of :class:`Forward` and :class:`Backward` by
    name, and the fields of :class:`Theory` as ``theory_<name>`` (absent for
    models without a mean-field theory here, e.g. batch normalization).
    """
    s = as_stack(model)
    fwd, bwd = jax.jit(lambda u: measure(s, u, key=key))(u)
    out = {**vars(fwd), **vars(bwd)}
    try:
        th = model_theory(model, u)
    except ValueError:
        return out  # no mean-field theory for this normalization
    return out | {f"theory_{k}": v for k, v in vars(th).items()}
