"""Mean-field theory of transformer blocks at initialization: token Gram matrices through depth.

The state of a transformer (:class:`~isometry.networks.Transformer`) is a set of
tokens ``x_a in R^N``. For ``S`` sequences of ``T`` tokens (``n = S T``) the
theory follows their Gram matrix, per feature,

    G_ab = x_a . x_b / N        (n, n),

through each block, and summarizes it by the mean squared token norm
``mean_a G_aa``, the mean cosine between tokens of one sequence (rank
collapse: it tends to 1; Dong, Cordonnier & Loukas 2021) and the mean cosine
between tokens of different sequences. Its maps, in the wide limit
``N, d = N / heads -> infinity`` with Gaussian (or orthogonal) weights of
variance ``sigma^2 / N``::

    attention  (uniform A):   G -> s_V s_O  A G A^T           A = I_S (x) A_T
    MLP:                      G -> s_2 K_phi(s_1 G + s_b)
                              K_phi(Q)_ab = E[phi(u_a) phi(u_b)],  u ~ N(0, Q)
    residual:                 G -> G + alpha^2 B              (B the branch's map of G)
    layer norm:               G -> G_ab / sqrt(G_aa G_bb)
    placement:  pre  x + alpha f(LN x);  post  LN(x + alpha f(x));  none  x + alpha f(x);
                without residual f(LN x), LN(f(x)), f(x)

with ``s_V = s_O = s_2 =`` ``value_sigma_w2`` and ``s_1, s_b`` the MLP's first
layer variances. ``A_T`` is uniform attention, ``1/T`` (or ``1/t`` below
and on the diagonal when causal).

Assumptions, and where they stop holding:

* **Uniform attention** (Noci et al. 2022). The logits ``Q K^T / sqrt(d)``
  have variance about ``qk_sigma_w2^2 G_aa G_bb``; the maps above are the
  limit ``qk_sigma_w2 -> 0`` and are off by ``O(qk_sigma_w2)`` otherwise. In
  that limit non-causal attention without a residual path makes every token of
  a sequence equal after ONE block (cosine exactly 1): rank collapse is
  immediate, and only the ``O(qk_sigma_w2)`` non-uniformity delays it (Dong et
  al.'s doubly exponential rate); causal attention converges geometrically
  (``A_T``'s eigenvalues are ``1/t``).
* **Independent branches.** Every branch ends in a fresh zero-mean matrix
  (``W_O``, ``W_2``), so ``x . f(x) / N -> 0`` and residual Grams add. At
  width ``N`` each entry of ``G`` fluctuates by ``O(N^{-1/2})`` per block;
  these add up over depth, so at fixed ``N`` the theory holds for
  ``depth << N`` and fails first where the map is expanding, e.g. post-LN
  stacks at large depth, whose gradients also violate the next assumption.
* **Layer norm** with unit gain and zero offset: the token means over
  features vanish at initialization (``O(N^{-1/2})``), ``eps`` is ignored.
* **Gradients** (:func:`profile`'s backward half) use gradient independence
  (Schoenholz et al. 2017; Yang 2019): the backward Gram ``Gamma_ab = g_a . g_b``
  passes through the transposed maps with weights independent of the
  forward pass, attention's derivative through the softmax is dropped
  (``O(qk_sigma_w2)``), and layer norm divides by ``sqrt(G_aa G_bb)``. It is
  exact in the wide limit for the plain and pre-LN stacks; for post-LN the
  projections of the normalization compound over depth and the prediction is
  only qualitative (Xiong et al. 2020).

Predictions: :func:`collapse_depth` (the block at which the token cosine
reaches ``1 - eps``), :func:`qk_value_ratio` (``||dL/dW_Q||^2 / ||dL/dW_V||^2``,
which vanishes as ``(1 - rho)^2`` as the token cosine ``rho -> 1``; Noci et al.
2022), the per-block weight gradients of :func:`profile` (post-LN vs pre-LN,
Xiong et al. 2020) and the per-block relative update ``||x^l - x^{l-1}||^2 /
||x^{l-1}||^2``, which is ``O(1/L)`` at every block under ``alpha = 1/sqrt(L)``
so that ``L`` times it is a function of ``l / L`` alone (Bordelon et al. 2023;
Yang et al. 2023).

Example:
    >>> import jax.numpy as jnp
    >>> from isometry import networks, transformer_theory as tt
    >>> cfg = networks.TransformerConfig(depth=8, width=256, residual=False, causal=True)
    >>> G0 = 0.5 * jnp.eye(8) + 0.5  # one sequence of 8 tokens, cosine 0.5
    >>> tt.profile(cfg, G0, seq_len=8).cosine.shape
    (8,)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isometry import gaussian as gs
from isometry import networks, signal, validate
from isometry.activations import Activation

__all__ = [
    "GramStatistics",
    "Profile",
    "attention_gram",
    "collapse_depth",
    "exchangeable_qk_value_ratio",
    "gram_statistics",
    "layer_norm_gram",
    "mlp_gram",
    "profile",
    "qk_value_ratio",
    "token_gram",
    "uniform_attention",
]

Array = jax.Array


# --------------------------------------------------------------------------- #
# Gram matrices and their summaries (theory and measurement alike).
# --------------------------------------------------------------------------- #


def _check_seq_len(seq_len, n=None) -> int:
    seq_len = validate.positive_int("seq_len", seq_len, minimum=2)
    if n is not None and n % seq_len:
        raise ValueError(f"seq_len={seq_len} must divide the number of tokens {n}")
    return seq_len


def token_gram(x: Array) -> Array:
    """``G = x x^T / N`` of the tokens ``x (S, T, N)`` (or ``(T, N)``): ``(S T, S T)``."""
    x = jnp.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"x must have shape (T, N) or (S, T, N), got {x.shape}")
    _check_seq_len(x.shape[-2])
    flat = x.reshape(-1, x.shape[-1])
    return flat @ flat.T / x.shape[-1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GramStatistics:
    """``norm = mean_a G_aa``; ``cosine``: mean over pairs ``a != b`` of one sequence of
    ``G_ab / sqrt(G_aa G_bb)``; ``cross_cosine``: the same over pairs from different
    sequences (NaN with one sequence). Leading axes are those of ``G``."""

    norm: Array
    cosine: Array
    cross_cosine: Array


def gram_statistics(G: Array, seq_len: int) -> GramStatistics:
    """Summaries of Gram matrices ``G (..., n, n)`` of ``n / seq_len`` sequences.

    Raises:
        ValueError: ``seq_len < 2`` (no pairs), or ``seq_len`` does not divide ``n``.
    """
    G = jnp.asarray(G)
    n = G.shape[-1]
    T = _check_seq_len(seq_len, n)
    d = jnp.diagonal(G, axis1=-2, axis2=-1)
    r = jnp.sqrt(d)  # sqrt(d_a) sqrt(d_b), not sqrt(d_a d_b): no overflow for large norms
    cos = G / (r[..., :, None] * r[..., None, :])
    seq = jnp.arange(n) // T
    same = (seq[:, None] == seq[None, :]) & ~jnp.eye(n, dtype=bool)
    other = seq[:, None] != seq[None, :]
    cross = (
        jnp.sum(cos * other, axis=(-2, -1)) / jnp.sum(other)
        if n > T
        else jnp.full(G.shape[:-2], jnp.nan, G.dtype)
    )
    return GramStatistics(
        jnp.mean(d, axis=-1), jnp.sum(cos * same, axis=(-2, -1)) / jnp.sum(same), cross
    )


# --------------------------------------------------------------------------- #
# The maps of one block.
# --------------------------------------------------------------------------- #


def uniform_attention(seq_len: int, causal: bool = False, dtype=None) -> Array:
    """Uniform attention ``A_T (T, T)``: ``1/T`` everywhere, or ``1/t`` for ``s <= t`` (causal)."""
    T = _check_seq_len(seq_len)
    dtype = jnp.result_type(float) if dtype is None else dtype
    mask = jnp.tril(jnp.ones((T, T), dtype)) if causal else jnp.ones((T, T), dtype)
    return mask / jnp.sum(mask, axis=1, keepdims=True)


def attention_gram(G: Array, A: Array, sigma_v2=1.0) -> Array:
    """``sigma_v2 A G A^T``: the Gram of ``A x W_V W_O`` (``sigma_v2 = s_V s_O``)."""
    return sigma_v2 * A @ G @ A.T


def layer_norm_gram(G: Array) -> Array:
    """``G_ab / sqrt(G_aa G_bb)``: layer norm at initialization (unit gain, zero mean)."""
    d = jnp.sqrt(jnp.diagonal(G))
    return G / (d[:, None] * d[None, :])


def _preact(G, sigma_w2, sigma_b2):
    Q = sigma_w2 * G + sigma_b2
    q = jnp.diagonal(Q)
    q1, q2 = jnp.broadcast_arrays(q[:, None], q[None, :])
    return q1, q2, jnp.clip(Q / jnp.sqrt(q1 * q2), -1.0, 1.0)


def mlp_gram(act, G: Array, sigma_w2, sigma_b2=0.0, sigma_out2=1.0) -> Array:
    """``sigma_out2 K_phi(sigma_w2 G + sigma_b2)``: the Gram of ``phi(x W_1 + b_1) W_2``."""
    return sigma_out2 * gs.phi_kernel(act, *_preact(G, sigma_w2, sigma_b2))


def _mlp_backward_kernel(act, G, sigma_w2, sigma_b2):
    """``E[phi'(u_a) phi'(u_b)]`` at the MLP's pre-activation covariance."""
    return gs.deriv_kernel(act, *_preact(G, sigma_w2, sigma_b2))


# --------------------------------------------------------------------------- #
# A block, forward and backward.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class _Maps:
    """The block's constants: the activation, full attention ``A = I_S (x) A_T``, the
    variances, and the placement as traced flags (``pre``, ``post``: where the layer norm
    is; ``res``: a residual path), so that one compiled program serves every placement
    and branch scale."""

    act: Activation
    A: Array
    sw: Array
    sb: Array
    alpha: Array
    sv: Array
    qk: Array
    pre: Array
    post: Array
    res: Array


def _ln_where(flag, Gamma, G_ln):
    """:func:`_ln_linear` where ``flag`` (a traced bool), else ``Gamma`` unchanged."""
    return jnp.where(flag, _ln_linear(Gamma, G_ln), Gamma)


def _sublayer_forward(m: _Maps, branch, tangent, G, Theta):
    """One residual sublayer on the Gram ``G`` and the tangent Gram ``Theta`` (module doc).

    ``branch(z)``: the branch's output Gram; ``tangent(z, Theta)``: its
    linearization's map of the tangent Gram. Returns ``(G_out, Theta_out,
    saved, carry)``: ``saved`` the branch input ``z`` and the layer norm's
    input Gram (read only where there is a layer norm); ``carry (n,)`` the
    ``c_a`` of ``x_out_a = c_a x_a + (independent of x)``.
    """
    a2 = m.alpha**2
    z = jnp.where(m.pre, layer_norm_gram(G), G)
    Tz = _ln_where(m.pre, Theta, G)
    b, t = branch(z), tangent(z, Tz)
    y = jnp.where(m.res, G + a2 * b, b)
    Ty = jnp.where(m.res, Theta + a2 * t, t)
    carry = jnp.where(m.res, jnp.ones(G.shape[:1], G.dtype), jnp.zeros(G.shape[:1], G.dtype))
    carry = jnp.where(m.post, carry / jnp.sqrt(jnp.diagonal(y)), carry)
    out = jnp.where(m.post, layer_norm_gram(y), y)
    return out, _ln_where(m.post, Ty, y), (z, jnp.where(m.post, y, G)), carry


def _block_forward(m: _Maps, G, Theta):
    def attn(z):
        return attention_gram(z, m.A, m.sv * m.sv)

    def attn_tangent(z, T):
        return attention_gram(T, m.A, m.sv * m.sv)

    def mlp(z):
        return mlp_gram(m.act, z, m.sw, m.sb, m.sv)

    def mlp_tangent(z, T):
        return m.sw * m.sv * T * _mlp_backward_kernel(m.act, z, m.sw, m.sb)

    Gy, Ty, (z1, ln1), c1 = _sublayer_forward(m, attn, attn_tangent, G, Theta)
    Go, To, (z2, ln2), c2 = _sublayer_forward(m, mlp, mlp_tangent, Gy, Ty)
    carry = c1 * c2
    d_in, d_out = jnp.diagonal(G), jnp.diagonal(Go)
    update = jnp.sum(d_out + d_in - 2 * carry * d_in) / jnp.sum(d_in)
    saved = {"z1": z1, "z2": z2, "ln1": ln1, "ln2": ln2}
    return Go, To, saved, update


def _ln_linear(Gamma, G_ln):
    """The layer norm's linear map on a tangent or gradient Gram: ``Gamma_ab / sqrt(G_aa G_bb)``."""
    d = jnp.sqrt(jnp.diagonal(G_ln))
    return Gamma / (d[:, None] * d[None, :])


def _sublayer_backward(m: _Maps, f_back, Gamma, G_ln):
    """``(Gamma_in, Gamma_f)``: backward Grams at the sublayer's input and branch output."""
    s = jnp.where(m.res, m.alpha**2, jnp.ones_like(m.alpha))
    Gamma = _ln_where(m.post, Gamma, G_ln)
    back = _ln_where(m.pre, f_back(Gamma), G_ln)
    return jnp.where(m.res, Gamma + s * back, s * back), s * Gamma


def _block_backward(m: _Maps, saved, Gamma):
    """Backward Grams and the squared weight-gradient norms of one block (per ``N``)."""
    sv, A, act = m.sv, m.A, m.act
    Dk = _mlp_backward_kernel(act, saved["z2"], m.sw, m.sb)

    def mlp_back(g):
        return m.sw * sv * g * Dk

    def attn_back(g):
        return sv * sv * A.T @ g @ A

    Gamma_y, Gf2 = _sublayer_backward(m, mlp_back, Gamma, saved["ln2"])
    Gamma_x, Gf1 = _sublayer_backward(m, attn_back, Gamma_y, saved["ln1"])
    z1, z2 = saved["z1"], saved["z2"]
    value = sv * jnp.sum(z1 * (A.T @ Gf1 @ A))
    K = mlp_gram(act, z2, m.sw, m.sb, 1.0)
    grads = {
        "value": value,
        "query": value * qk_value_ratio(z1, Gf1, A, m.qk, sv),
        "out": sv * jnp.sum((A @ z1 @ A.T) * Gf1),
        "mlp_in": jnp.sum(z2 * sv * Gf2 * Dk),
        "mlp_out": jnp.sum(K * Gf2),
    }
    grads["key"] = grads["query"]
    return Gamma_x, grads


# --------------------------------------------------------------------------- #
# Predictions.
# --------------------------------------------------------------------------- #


def qk_value_ratio(G: Array, Gamma: Array, A: Array, qk_sigma_w2, value_sigma_w2=1.0) -> Array:
    """``E||dL/dW_Q||^2 / E||dL/dW_V||^2`` of one attention layer (equal for ``W_K``).

    With ``G`` the Gram of the layer's input tokens, ``Gamma`` that of the
    gradients at its output, ``A`` the (uniform) attention and ``H = G * Gamma``
    (elementwise), gradient independence and ``d -> infinity`` give

        ratio = s_V s_QK  sum_{ii'jj'} H_ii' A_ij A_i'j' C_{ii'jj'} G_jj' / <G, A^T Gamma A>,
        C_{ii'jj'} = G_jj' - (AG)_ij' - (AG)_i'j + (A G A^T)_ii'

    (``C``: the covariance of ``V_j - sum_k A_ik V_k``, the value's deviation
    from the row's average that the softmax derivative multiplies). It
    vanishes with the token spread: for uniform non-causal attention,
    exchangeable tokens and independent gradients see
    :func:`exchangeable_qk_value_ratio` (Noci et al. 2022: vanishing query/key
    gradients under rank collapse).

    Args:
        G, Gamma, A: ``(n, n)`` each.
        qk_sigma_w2, value_sigma_w2: ``N Var(W_Q) = N Var(W_K)`` and ``N Var(W_V)``.
    """
    AG = A @ G
    AGA = AG @ A.T
    H = G * Gamma
    num = (
        jnp.sum(H * (A @ (G * G) @ A.T))
        - jnp.sum(H * ((AG * AG) @ A.T))
        - jnp.sum(H * (A @ (AG * AG).T))
        + jnp.sum(H * AGA * AGA)
    )
    return value_sigma_w2 * qk_sigma_w2 * num / jnp.sum(G * (A.T @ Gamma @ A))


def exchangeable_qk_value_ratio(q, rho, seq_len: int, qk_sigma_w2, value_sigma_w2=1.0) -> Array:
    """:func:`qk_value_ratio` in closed form for uniform non-causal attention over ``T`` tokens
    of mean square ``q`` and pair cosine ``rho``, with independent output gradients::

        ratio = s_V s_QK q^2 (1 - rho)^2 (T - 1) / (T (1 + (T - 1) rho)).
    """
    T = _check_seq_len(seq_len)
    validate.real_array("rho", rho, minimum=-1.0 / (T - 1), maximum=1.0)
    q, rho = jnp.asarray(q), jnp.asarray(rho)
    return (
        value_sigma_w2 * qk_sigma_w2 * q**2 * (1 - rho) ** 2 * (T - 1) / (T * (1 + (T - 1) * rho))
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Profile:
    """Predictions per block, ``(L,)`` (``gram``: ``(L, n, n)``) for blocks ``1..L``.

    ``norm``, ``cosine``, ``cross_cosine``: :class:`GramStatistics` of the
    block outputs; ``update``: ``||x^l - x^{l-1}||^2 / ||x^{l-1}||^2``;
    ``jacobian_sq``: the mean squared singular value ``tr(J_l^T J_l) / (n N)``
    of the Jacobian ``J_l = dx^l / dx^0`` of the ``n`` tokens (forward tangent
    Gram ``Theta``, from ``Theta^0 = I``, through the linearized maps);
    ``grad_state``: ``||dL/dx^{l-1}||^2`` (the block's input) relative to
    ``||dL/dx^L||^2``; ``grad_weights``: the squared weight-gradient norms
    ``query, key, value, out, mlp_in, mlp_out`` relative to ``||dL/dx^L||^2
    / N`` (the loss gradient's Gram at the top is ``Gamma_L``); ``qk_value``:
    their ratio ``query / value``.
    """

    gram: Array
    norm: Array
    cosine: Array
    cross_cosine: Array
    update: Array
    jacobian_sq: Array
    grad_state: Array
    grad_weights: dict
    qk_value: Array


def profile(config: networks.TransformerConfig, G0: Array, seq_len: int, Gamma_L=None) -> Profile:
    """Mean-field profile of a :class:`~isometry.networks.Transformer` from the Gram ``G0``
    of its stack input (``x^0``: embedded tokens).

    Args:
        config: the network's :class:`~isometry.networks.TransformerConfig`
            (its ``depth``, placement, residual scale, causal mask, variances).
        G0: ``(n, n)`` input Gram of ``n / seq_len`` sequences (:func:`token_gram`).
        seq_len: ``T >= 2``.
        Gamma_L: the gradient Gram ``g_a . g_b`` at the top (default the
            identity: independent unit gradients per token, e.g. a random
            projection of every token), ``(n, n)``.

    Returns:
        a :class:`Profile` (assumptions: the module docstring).

    Raises:
        ValueError: ``G0`` not square, with NaN/inf entries or a diagonal entry
            ``<= 0`` (a zero token has no cosine: the profile would be NaN
            everywhere); ``Gamma_L`` not ``(n, n)`` or not finite. The values are
            checked where concrete (not under ``jit``).
    """
    if not isinstance(config, networks.TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    G0 = jnp.asarray(G0, jnp.result_type(G0, float))
    if G0.ndim != 2 or G0.shape[0] != G0.shape[1]:
        raise ValueError(f"G0 must be a square (n, n) Gram matrix, got shape {G0.shape}")
    n = G0.shape[0]
    seq_len = _check_seq_len(seq_len, n)
    _check_gram(G0)
    Gamma_L = jnp.eye(n, dtype=G0.dtype) if Gamma_L is None else jnp.asarray(Gamma_L, G0.dtype)
    if Gamma_L.shape != (n, n):
        raise ValueError(f"Gamma_L must have the shape of G0 {(n, n)}, got {Gamma_L.shape}")
    validate.finite_values("Gamma_L", Gamma_L)
    sw, sb = config.variances()
    alpha = config.branch_scale if config.residual else 1.0
    nums = jnp.asarray([sw, sb, alpha, config.value_sigma_w2, config.qk_sigma_w2], G0.dtype)
    pos = config.norm_position
    flags = jnp.asarray([pos == "pre", pos == "post", config.residual])
    return _profile(config.act, config.causal, config.depth, seq_len, G0, Gamma_L, nums, flags)


def _check_gram(G0) -> None:
    """A concrete input Gram is finite with a positive diagonal: ``G0[i, i] = |x_i|^2 / N > 0``."""
    if not validate.is_concrete(G0):
        return
    validate.finite_values("G0", G0)
    diag = np.diagonal(np.asarray(G0))
    bad = np.flatnonzero(~(diag > 0))
    if bad.size:
        raise ValueError(
            "G0 must be a Gram matrix with a positive diagonal (every token a nonzero vector), "
            f"got G0[i, i] = {diag[bad[:4]].tolist()} at i = {bad[:4].tolist()}"
            + (f" ({bad.size} in all)" if bad.size > 4 else "")
        )


def _profile_recursion(act, causal, depth, seq_len, G0, Gamma_L, nums, flags) -> Profile:
    """The recursions of :func:`profile`; ``nums = [sw, sb, alpha, sv, qk]``,
    ``flags = [pre, post, residual]``. Compiled once per (activation, mask, depth,
    sequence length): the placement, the residual path and the variances are traced, so
    every variant of a sweep shares it."""
    n = G0.shape[0]
    A_T = uniform_attention(seq_len, causal, G0.dtype)
    A = jnp.kron(jnp.eye(n // seq_len, dtype=G0.dtype), A_T)
    m = _Maps(act, A, *(nums[i] for i in range(5)), *(flags[i] for i in range(3)))

    def fwd(carry, _):
        Go, To, saved, update = _block_forward(m, *carry)
        return (Go, To), (Go, jnp.trace(To), saved, update)

    eye = jnp.eye(n, dtype=G0.dtype)
    _, (grams, jac, saved, update) = lax.scan(fwd, (G0, eye), None, length=depth)

    def bwd(Gamma, saved_l):
        Gamma_x, grads = _block_backward(m, saved_l, Gamma)
        return Gamma_x, (jnp.trace(Gamma_x), grads)

    _, (g_state, grads) = lax.scan(bwd, Gamma_L, saved, reverse=True)
    st = gram_statistics(grams, seq_len)
    top = jnp.trace(Gamma_L)
    return Profile(
        gram=grams, norm=st.norm, cosine=st.cosine, cross_cosine=st.cross_cosine, update=update,
        jacobian_sq=jac / n,
        grad_state=g_state / top, grad_weights={k: v / top for k, v in grads.items()},
        qk_value=grads["query"] / grads["value"],
    )  # fmt: skip


_profile = signal.jit_once(_profile_recursion, static_argnums=(0, 1, 2, 3))


def collapse_depth(cosine: Array, eps: float = 1e-3) -> Array:
    """The first block ``l`` (1-based) whose token cosine is ``>= 1 - eps``; 0 if none.

    ``cosine``: ``(L,)`` per-block cosines (of :func:`profile` or measured).
    """
    validate.real_array("eps", eps, minimum=0.0, strict=True, maximum=1.0)
    hit = jnp.asarray(cosine) >= 1.0 - eps
    return jnp.where(jnp.any(hit), jnp.argmax(hit) + 1, 0)
