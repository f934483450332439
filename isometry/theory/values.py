"""The values the theory engine computes with: deterministic arrays, parameters, random fields.

Interpreting a model's computation in the infinite-width limit, every
intermediate array is one of three kinds:

* :class:`Det` -- deterministic: the input batch, constants, buffers, and
  everything computed from them alone (masks, attention weights whose logits
  have a deterministic limit, layer-norm statistics). Evaluated exactly.
* :class:`Param` -- a parameter of the model (an ``nnx.Param`` leaf, a view
  of one, or a slice of a stacked one), read for its variance only: the
  engine treats it as a fresh zero-mean draw whose second moment is its own
  mean square.
* :class:`Field` -- a random field: an array with one *width axis* (the
  channels, features or hidden units, whose count is taken to infinity)
  whose coordinates are, in the limit, independent and identically
  distributed given the structure (batch, positions, tokens, heads). A
  field is known through its cross-Gram matrices with other fields,

      cross(a, b)[s, t] = lim (1 / C) sum_c a[s, c] b[t, c],

  an array of shape ``a.struct + b.struct`` (the structure axes of ``a`` then
  of ``b``; the width axis removed), and its width mean ``mean(a)[s] =
  lim (1 / C) sum_c a[s, c]``. These are computed lazily by
  :mod:`isometry.theory.algebra`.

Fields are built as an expression graph over a few *atoms* (a deterministic
array seen as a field, a parameter added as a field, the contraction of a
field with a parameter, an elementwise function of a Gaussian field) and a
few *composites* (linear structural maps, sums, products with a per-channel
gain, the width axis merged with or split into structure axes). Each class
below says what its cross-Gram is; the equations are in the algebra.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "Additive",
    "Contraction",
    "Data",
    "Det",
    "Failed",
    "Field",
    "Gain",
    "Linear",
    "Merge",
    "Param",
    "Pointwise",
    "Split",
    "Sum",
    "TheoryError",
]

Array = jax.Array


class TheoryError(ValueError):
    """An operation of a model the theory engine has no rule for (the message names the
    operation and the module path that used it), or an input it cannot take."""


@dataclasses.dataclass(eq=False)
class Failed:
    """The value of an operation without a rule: raises its error where it is used, so
    that computations the outputs do not need (a buffer's update) never matter."""

    error: TheoryError


# --------------------------------------------------------------------------- #
# Deterministic arrays and parameters.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(eq=False)
class Det:
    """A deterministic array.

    Attributes:
        value: the array.
        zero: structurally zero (the width mean of a zero-mean Gaussian field);
            kept through operations that map zero to zero, so that ``x - mean(x)``
            of a Gaussian ``x`` stays Gaussian.
        noise: the variance, per entry, of the fluctuation the infinite-width
            limit drops (the ``O(1)`` part of ``q . k / sqrt(d)`` logits whose mean
            is taken); ``None`` when there is none. Checked where a nonlinearity
            meets it.
        jac: the Jacobian of ``value`` with respect to the perturbed input example,
            ``value.shape + (n,)``, when the input Jacobian is followed; else ``None``.
        source: the tangent source this array injects (a cut point's zero probe),
            or ``None``.
    """

    value: Array
    zero: bool = False
    noise: Array | None = None
    jac: Array | None = None
    source: object = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(jnp.shape(self.value))


@dataclasses.dataclass(eq=False)
class Param:
    """A parameter (or a view of one: reshaped, transposed, cast, scaled, sliced).

    Attributes:
        key: identity of the underlying draw: ``(path, slice)``; two views of
            the same array share it.
        path: the parameter's path in the model (``"blocks.0.mlp.kernel"``).
        value: the array as the computation sees it.
        scale: a deterministic factor applied to the parameter (``W * c``); the
            variance read is that of ``value`` (which includes it).
    """

    key: tuple
    path: str
    value: Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(jnp.shape(self.value))

    def view(self, value) -> Param:
        return Param(self.key, self.path, value)


# --------------------------------------------------------------------------- #
# Fields.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(eq=False)
class Field:
    """A random field of shape ``shape`` with width axis ``axis`` (see the module docstring).

    ``axis is None``: a single coordinate (e.g. a one-unit output indexed out);
    every axis is then a structure axis.

    Derived attributes (set by each class)::

        params: keys of the parameters the field depends on.
        sources: tangent sources (input, cut probes) it depends on.
        gaussian: the field is jointly Gaussian with every other Gaussian field
            (a linear combination of parameter contractions and additions).
        zero_mean: its width mean is structurally zero.
        data: it has a deterministic atom whose coordinates are not i.i.d.
        coupled: it depends on a sum over the batch axis (batch statistics).
    """

    shape: tuple[int, ...]
    axis: int | None
    where: str

    def __post_init__(self):
        self.params = frozenset()
        self.sources = frozenset()
        self.gaussian = False
        self.zero_mean = False
        self.data = False
        self.coupled = False

    @property
    def struct(self) -> tuple[int, ...]:
        """The structure shape: ``shape`` without the width axis."""
        if self.axis is None:
            return tuple(self.shape)
        return tuple(self.shape[: self.axis] + self.shape[self.axis + 1 :])

    @property
    def width(self) -> int:
        return 1 if self.axis is None else self.shape[self.axis]

    def _inherit(self, *inputs: Field) -> None:
        self.params = frozenset().union(*(i.params for i in inputs))
        self.sources = frozenset().union(*(i.sources for i in inputs))
        self.data = any(i.data for i in inputs)
        self.coupled = any(i.coupled for i in inputs)


@dataclasses.dataclass(eq=False)
class Data(Field):
    """A deterministic array seen as a field along ``axis``: ``cross(a, b) = (1/C) a . b``
    exactly, ``mean = mean over the width``. Its tangent sources: the input example (via
    ``det.jac``) or a cut probe (``det.source``, identity covariance)."""

    det: Det = None

    def __post_init__(self):
        super().__post_init__()
        d = self.det
        self.zero_mean = d.zero
        self.gaussian = d.zero  # a zero probe adds nothing forward
        self.data = not self.gaussian
        src = set()
        if d.jac is not None:
            src.add("input")
        if d.source is not None:
            src.add(d.source)
        self.sources = frozenset(src)


@dataclasses.dataclass(eq=False)
class Additive(Field):
    """A parameter added to a field (bias, positional embedding), taken as a fresh
    zero-mean Gaussian: ``cross = mean(P^2)`` where the two structure positions read the
    same entries of ``P``, 0 elsewhere. ``param`` is laid out as ``shape`` (broadcast
    afterwards by a :class:`Linear` map)."""

    param: Param = None

    def __post_init__(self):
        super().__post_init__()
        self.params = frozenset([self.param.key])
        self.gaussian = True
        self.zero_mean = True


@dataclasses.dataclass(eq=False)
class Contraction(Field):
    """``u`` contracted with a parameter over the width (a dense layer, a convolution, a
    multi-head projection): a fresh Gaussian field. ``rule`` maps ``cross(u_a, u_b)`` to
    ``cross(out_a, out_b)`` for unit variance per entry (see :mod:`isometry.theory.contractions`);
    ``variance`` is ``fan_in * mean(W^2)`` (per tap for convolutions, inside ``rule``)."""

    param: Param = None
    inp: Field = None
    rule: object = None

    def __post_init__(self):
        super().__post_init__()
        self._inherit(self.inp)
        self.params = self.params | {self.param.key}
        self.gaussian = self.rule.gaussian
        self.zero_mean = True
        self.data = False


@dataclasses.dataclass(eq=False)
class Pointwise(Field):
    """An elementwise function ``f(leaves...)`` of fields of this shape and width axis.

    ``fn(*leaf_values) -> value`` is the composed function (constants inside);
    ``name`` names it; ``product``: ``f`` is the product of two leaves (or a square),
    whose width mean is an aligned cross-Gram and needs no Gaussian law.
    """

    fn: Callable = None
    leaves: tuple = ()
    name: str = ""
    product: bool = False
    act: object = None  # the Activation of a function of one Gaussian leaf (set lazily)
    sig: object = None  # a hashable description of fn (None when it has traced constants)

    def __post_init__(self):
        super().__post_init__()
        self._inherit(*self.leaves)

    @property
    def univariate(self) -> bool:
        """A function of one Gaussian field: the expectations of :mod:`isometry.gaussian`."""
        return len(self.leaves) == 1 and self.leaves[0].gaussian


@dataclasses.dataclass(eq=False)
class Sum(Field):
    """``sum_i coefs[i] * terms[i]`` (add, subtract, negate, scale by a number)."""

    terms: tuple = ()
    coefs: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        self._inherit(*self.terms)
        self.gaussian = all(t.gaussian for t in self.terms)
        self.zero_mean = all(t.zero_mean for t in self.terms)


@dataclasses.dataclass(eq=False)
class Linear(Field):
    """A linear map of the structure that treats every width coordinate alike (transpose,
    reshape of structure axes, broadcast, slice, pad, concatenate, pooling, a product
    with a deterministic array that is constant over the width). ``apply(side, grams)``
    maps the inputs' cross-Grams (structure first) to the output's."""

    inputs: tuple = ()
    apply: Callable = None
    name: str = ""

    def __post_init__(self):
        super().__post_init__()
        self._inherit(*self.inputs)
        self.gaussian = all(t.gaussian for t in self.inputs)
        self.zero_mean = all(t.zero_mean for t in self.inputs)


@dataclasses.dataclass(eq=False)
class Gain(Field):
    """``inp * g`` with ``g`` a vector over the width (a norm's scale, a per-channel
    deterministic factor): ``cross(g a, g b) = mean(g^2) cross(a, b)``,
    ``cross(g a, b) = mean(g) cross(a, b)``. ``gain`` is a :class:`Param` or a
    :class:`Det` of the field's width."""

    inp: Field = None
    gain: object = None

    def __post_init__(self):
        super().__post_init__()
        self._inherit(self.inp)
        if isinstance(self.gain, Param):
            self.params = self.params | {self.gain.key}
        self.gaussian = self.inp.gaussian  # exact for a constant gain; checked at run time
        self.zero_mean = self.inp.zero_mean


@dataclasses.dataclass(eq=False)
class Merge(Field):
    """Structure axes ``merged`` (of ``inp``) folded into the width (a flatten): its
    cross-Gram is the average over the merged positions of ``cross(inp_a, inp_b)`` at
    equal positions."""

    inp: Field = None
    merged: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        self._inherit(self.inp)
        self.zero_mean = self.inp.zero_mean
        self.data = True  # coordinates are not identically distributed


@dataclasses.dataclass(eq=False)
class Split(Field):
    """The width split into ``heads`` (a structure axis at ``head_axis`` of the output)
    times a new width: distinct heads are distinct coordinates, so
    ``cross = delta_{h h'} cross(inp_a, inp_b)`` (plus the product of the means off the
    diagonal)."""

    inp: Field = None
    head_axis: int = 0

    def __post_init__(self):
        super().__post_init__()
        self._inherit(self.inp)
        self.gaussian = self.inp.gaussian
        self.zero_mean = self.inp.zero_mean


def struct_size(f: Field) -> int:
    return math.prod(f.struct)
