"""The parameterization tables in standard form: per kind and role, the initialization
variance and the learning-rate scale, with their sources.

Every kind is written in the *standard form*: forward multipliers 1, only the
initialization variance and a per-parameter learning-rate scale change. By the
abc-symmetry of Yang & Hu 2021 (Tensor Programs IV, "Feature learning in
infinite-width neural networks"): a weight ``W = n^{-a} w`` with
``w_ij ~ N(0, n^{-2b})`` and learning rate ``eta n^{-c}`` trains identically under
``a -> a + theta, b -> b - theta, c -> c - 2 theta`` (SGD) or
``c -> c - theta`` (Adam, whose update ignores the gradient's scale). Moving every
multiplier into the variance and the learning rate (``theta = -a``) gives a rule
that :func:`isometry.parameterization.apply` can use on any NNX model without
touching its forward pass.

Width multipliers are relative to a base width (mup's base shapes):
``m_in = fan_in / base fan_in``, ``m_out = fan_out / base fan_out``; at the base
width every kind is the model's own (standard) parameterization. Variances are
factors on the model's own initialization, taken to be standard
(``Var = sigma^2 / fan_in``: LeCun, He, Xavier on square layers, the toolkit's
defaults). Roles: :data:`isometry.parameterization.shapes.ROLES`. The rules::

    kind        role     Var factor   SGD lr factor   Adam lr factor   source
    standard    all      1            1               1                (PyTorch/Flax defaults)
    ntk         input    1            1               1                Jacot et al. 2018, in
                hidden   1            1/m_in          1/sqrt(m_in)     standard form by the
                output   1            1/m_in          1/sqrt(m_in)     abc-symmetry (TP4)
                fixed    1            1               1
    mup         input    1            m_out           1                Yang et al. 2022 (TP5),
                hidden   1            m_out/m_in      1/m_in           Table 3; microsoft/mup
                output   1/m_in       1/m_in          1/m_in           MuSGD/MuAdam/MuReadout
                fixed    1            1               1
    depth_mup   as mup, and for the parameters of the residual blocks  Yang et al. 2023 (TP6),
                Adam lr factor 1/sqrt(L) (SGD: 1); branch multiplier   Bordelon et al. 2023;
                1/sqrt(L) (a forward change)                           Dey et al. 2025 (norms,
                                                                       biases of blocks)

TP5's Table 3 reads, with ``fan_in``/``fan_out`` the infinite dimensions:
input weights and all biases ``Var 1/fan_in``, SGD ``eta fan_out``, Adam ``eta``;
output weights ``Var 1/fan_in^2``, SGD ``eta/fan_in``, Adam ``eta/fan_in``;
hidden weights ``Var 1/fan_in``, SGD ``eta``, Adam ``eta/fan_in``. Relative to a
base width these are the factors above (mup scales the SGD rate of a
hidden weight by ``m_out/m_in``, which is 1 when in and out grow together;
``MuReadout`` multiplies by ``1/m_in`` in the forward pass after scaling the
weights by ``sqrt(m_in)``: effective variance factor ``1/m_in``, the row above).

Forward changes a plain model makes itself (the toolkit's configs make them
under ``parameterization=``): muP's attention logits ``q.k / d`` instead of
``q.k / sqrt(d)`` (TP5: query and key become correlated in training, so
their product grows like ``d``); depth-muP's branch
multiplier ``a / sqrt(L)`` on each residual block (TP6's Depth-muP; Bordelon et
al. 2023, "Depthwise hyperparameter transfer in residual networks"). The
learning rates of depth-muP: SGD ``eta`` independent of ``L``, Adam
``eta / sqrt(L)`` (TP6's Depth-muP for SGD and for Adam); Dey et al. 2025
("Don't be lazy: CompleteP", its parameterization table at ``alpha = 1/2``) apply the
same Adam factor to the biases and norm gains of the blocks.
"""

from __future__ import annotations

import math

from isometry import validate
from isometry.networks.config import PARAMETERIZATIONS

__all__ = [
    "ATTENTION",
    "KINDS",
    "RULES",
    "attention_logit_scale",
    "branch_multiplier",
    "depth_lr_scale",
    "lr_scale",
    "variance_scale",
]

KINDS = PARAMETERIZATIONS
RULES = ("sgd", "adam")
ATTENTION = {"standard": "1/sqrt(d)", "ntk": "1/sqrt(d)", "mup": "1/d", "depth_mup": "1/d"}


def _width_kind(kind: str) -> str:
    return "mup" if kind == "depth_mup" else kind


def variance_scale(kind: str, role: str, m_in: float, m_out: float) -> float:
    """The factor on a parameter's standard initialization variance (module table).

    ``Var = Var_standard * factor``; muP's readout: ``factor = 1/m_in`` (TP5 Table 3,
    ``Var 1/fan_in^2``); every other entry 1.
    """
    validate.choice("kind", kind, KINDS)
    if _width_kind(kind) == "mup" and role == "output":
        return 1.0 / m_in
    return 1.0


def lr_scale(kind: str, role: str, rule: str, m_in: float, m_out: float) -> float:
    """The factor on the learning rate of a parameter (module table), for ``rule`` ``"sgd"``
    (SGD-like: the update is proportional to the gradient) or ``"adam"`` (Adam-like:
    the update is normalized entrywise)."""
    validate.choice("kind", kind, KINDS)
    validate.choice("rule", rule, RULES)
    kind = _width_kind(kind)
    if kind == "standard" or role in ("fixed",):
        return 1.0
    if kind == "ntk":
        if role == "input":
            return 1.0
        return 1.0 / m_in if rule == "sgd" else 1.0 / math.sqrt(m_in)
    table = {  # muP, TP5 Table 3 relative to the base width
        ("input", "sgd"): m_out,
        ("input", "adam"): 1.0,
        ("hidden", "sgd"): m_out / m_in,
        ("hidden", "adam"): 1.0 / m_in,
        ("output", "sgd"): 1.0 / m_in,
        ("output", "adam"): 1.0 / m_in,
    }
    return table[(role, rule)]


def depth_lr_scale(kind: str, rule: str, depth: int) -> float:
    """The learning-rate factor of a residual block's parameters with depth ``L``:
    ``1/sqrt(L)`` for depth-muP with Adam (TP6), else 1."""
    validate.choice("kind", kind, KINDS)
    validate.choice("rule", rule, RULES)
    if kind == "depth_mup" and rule == "adam":
        return validate.positive_int("depth", depth) ** -0.5
    return 1.0


def branch_multiplier(kind: str, depth: int | None) -> float:
    """The residual branch multiplier: ``1/sqrt(L)`` for depth-muP (TP6, ``a = 1``), else 1."""
    validate.choice("kind", kind, KINDS)
    if kind == "depth_mup":
        return validate.positive_int("depth", depth) ** -0.5
    return 1.0


def attention_logit_scale(kind: str, head_dim: int) -> float:
    """The attention logits' factor: ``1/d`` under muP and depth-muP (TP5), ``1/sqrt(d)``
    otherwise, for head dimension ``d``."""
    validate.choice("kind", kind, KINDS)
    d = validate.positive_int("head_dim", head_dim)
    return 1.0 / d if ATTENTION[kind] == "1/d" else d**-0.5
