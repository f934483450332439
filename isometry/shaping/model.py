"""The subnetwork maximizing function of a researcher's own NNX model, read by the theory engine.

The engine (:mod:`isometry.theory`) interprets ``model(x)`` as a graph of
random fields: contractions with parameters, elementwise functions of them,
sums, and linear maps of the structure (pooling, reshapes, scalings). Under
DKS/TAT's premises (weights of variance 1, zero biases, inputs with ``||x||^2 /
N = 1``, every nonlinear layer fed at ``q = 1``) a pair of inputs is described by
one cosine ``c`` per node, and the graph maps it as

* the input (or a deterministic array made from it): ``c = x``; a contraction, a
  structure map, a gain: ``c`` unchanged;
* an elementwise function of one field (a nonlinear layer): ``c -> r_fn(c)``;
* a sum ``sum_i a_i t_i``: ``c = sum_i w_i c_i`` with ``w_i = a_i^2 q_i / sum_j a_j^2
  q_j`` (``q_i``: the summand's second moment; ``w x + sqrt(1 - w^2) f(x)`` gives
  ``w^2`` and ``1 - w^2``).

``M(x, r_fn)`` is the largest of the whole network's value and, for every sum,
each summand's value computed from the sum's fork (the deepest node all its
summands depend on, or the input of a nonlinear layer they share) set to ``x``,
where a nonlinear layer lies between the two: the residual branches alone (and
a projection shortcut's ``r_fn(x)``), as in dks's hand-written functions (Zhang,
Botev & Martens 2022, appendix B). A shortcut without a nonlinear layer is the
identity, ``x``, which never exceeds a branch in the quantities the conditions
bound (``mu(s) >= 1``, curvatures ``>= 0``, ``C_f(0) >= 0``), so it is left out.

The second moments ``q`` are tracked at their ideal values: 1 at the input (a
deterministic array made from it: its mean square relative to the input's),
unchanged by a contraction (weights of variance 1), 1 after a nonlinear layer; a
structure map or gain multiplies it by the engine's ratio of its output's to its
input's variance (a scaling by ``w``: ``w^2``); a map whose output the engine finds
at unit variance while its input is not (a normalization) resets it to 1. A
nonlinear layer fed at ``q != 1`` (an unnormalized sum such as ``x + f(x)``
upstream), a bias or added parameter of non-zero variance, or an elementwise
function of several fields (a gated unit) is a ``ValueError`` naming the module: the
local maps do not describe it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from isometry.theory import engine, values

__all__ = ["ModelMaxFunc", "subnet_max_func"]

Q_TOL = 1e-6  # |q - 1| accepted at a nonlinear layer's input, and for a normalization


@dataclasses.dataclass(frozen=True, eq=False)
class ModelMaxFunc:
    """``M(x, r_fn)`` of a model (dks's convention), from :func:`subnet_max_func`.

    Attributes:
        nodes: the graph, inputs first: ``(kind, inputs, weights, where)`` with kind
            ``"input"``, ``"same"`` (``c`` unchanged), ``"r"`` (a nonlinear layer) or
            ``"sum"`` (``weights`` per input).
        forks: ``(fork, summand)`` node pairs: the residual branches.
        name: the model's class name.
    """

    nodes: tuple
    forks: tuple
    name: str

    @property
    def nonlinear_layers(self) -> int:
        """The number of nonlinear layers (elementwise functions of a field)."""
        return sum(kind == "r" for kind, *_ in self.nodes)

    def network(self, x: float, r_fn, root: int | None = None, fork: int | None = None):
        """The whole network's value (or node ``root``'s, from ``fork`` set to ``x``)."""
        root = len(self.nodes) - 1 if root is None else root
        vals = []
        for i, (kind, inputs, weights, _) in enumerate(self.nodes[: root + 1]):
            if i == fork or kind == "input":
                vals.append(x)
            elif kind == "same":
                vals.append(vals[inputs[0]])
            elif kind == "r":
                vals.append(r_fn(vals[inputs[0]]))
            else:
                vals.append(sum(w * vals[j] for j, w in zip(inputs, weights, strict=True) if w))
        return vals[root]

    def __call__(self, x: float, r_fn) -> float:
        r_fn = _memo(r_fn)  # branches from their forks repeat the same values
        out = self.network(x, r_fn)
        for fork, term in self.forks:
            out = max(out, self.network(x, r_fn, root=term, fork=fork))
        return out

    def __repr__(self) -> str:
        return (
            f"ModelMaxFunc({self.name}: {self.nonlinear_layers} nonlinear layers, "
            f"{len(self.forks)} residual branches)"
        )


def _memo(r_fn):
    """``r_fn`` remembering its values at the numbers it has seen (arrays pass through)."""
    seen = {}

    def r(y):
        try:
            key = float(y)
        except TypeError:
            return r_fn(y)
        if key not in seen:
            seen[key] = r_fn(y)
        return seen[key]

    return r


class _Graph:
    """Walks the engine's output field, recording nodes and the variances to measure."""

    def __init__(self, alg):
        self.alg, self.nodes, self.ids, self.measure = alg, [], {}, []

    def keep(self, value) -> int:
        """Index of ``value`` among the arrays the run returns."""
        self.measure.append(jnp.asarray(value, self.alg.dtype))
        return len(self.measure) - 1

    def var(self, f) -> int:
        return self.keep(jnp.mean(self.alg.variances(f)))

    def add(self, f, kind, inputs, extra=None) -> int:
        self.nodes.append([kind, tuple(inputs), extra, f.where])
        self.ids[id(f)] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def visit(self, f) -> int:
        if id(f) in self.ids:
            return self.ids[id(f)]
        V = values
        if isinstance(f, V.Data):
            if f.det.zero:
                return self.add(f, "zero", ())
            return self.add(f, "input", (), (self.var(f),))
        if isinstance(f, V.Additive):
            return self.add(f, "bias", (), (self.var(f), f.param.path))
        if isinstance(f, V.Contraction):
            return self.add(f, "contraction", (self.visit(f.inp),))
        if isinstance(f, V.Pointwise):
            if len({id(leaf) for leaf in f.leaves}) != 1:
                raise ValueError(f"{f.where}: an elementwise function of several fields "
                                 f"({f.name}) has no local C-map")  # fmt: skip
            return self.add(f, "r", (self.visit(f.leaves[0]),))
        if isinstance(f, V.Sum):
            inputs = [self.visit(t) for t in f.terms]
            return self.add(f, "sum", inputs, tuple(self.keep(c) for c in f.coefs))
        inputs = getattr(f, "inputs", None) or (f.inp,)
        if len(inputs) != 1:
            raise ValueError(f"{f.where}: a structure map of several fields ({f.name}) "
                             "has no local C-map")  # fmt: skip
        j = self.visit(inputs[0])
        return self.add(f, "map", (j,), (self.var(f), self.var(inputs[0])))


def _ideal_q(nodes, measured, q_input: float) -> list:
    """The second moment of every node under DKS's premises (module docstring)."""
    q = []
    for kind, inputs, extra, where in nodes:
        if kind == "input":  # the input (or a scaling of it), relative to q = 1 at the input
            q.append(float(measured[extra[0]]) / q_input)
        elif kind == "contraction":  # weights of variance 1
            q.append(q[inputs[0]])
        elif kind == "zero":
            q.append(0.0)
        elif kind == "bias":
            v = float(measured[extra[0]])
            if v > 0:
                raise ValueError(
                    f"{where}: the parameter {extra[1]} is added with variance {v:.3g}; DKS "
                    "and TAT assume zero biases at initialization"
                )
            q.append(0.0)
        elif kind == "r":
            if abs(q[inputs[0]] - 1.0) > Q_TOL:
                raise ValueError(
                    f"{where}: a nonlinear layer is fed at q = {q[inputs[0]]:.6g}, not 1 (an "
                    "unnormalized sum upstream, e.g. x + f(x)); the local C-maps of DKS and "
                    "TAT hold at q = 1: use weighted sums w x + sqrt(1 - w^2) f(x)"
                )
            q.append(1.0)
        elif kind == "sum":
            q.append(sum(float(a) ** 2 * q[j] for a, j in zip(extra, inputs, strict=True)))
        else:  # a structure map: its variance ratio, or a normalization
            out, inp = (float(measured[k]) for k in extra)
            q.append(1.0 if abs(out - 1.0) <= Q_TOL < abs(inp - 1.0) else q[inputs[0]] * out / inp)
    return q


def _ancestors(nodes) -> list:
    anc = []
    for i, (_, inputs, _, _) in enumerate(nodes):
        anc.append(frozenset({i}).union(*(anc[j] for j in inputs)))
    return anc


def _forks(nodes, q) -> tuple:
    """``(fork, summand)`` for every summand, with a nonlinear layer between the two, of every
    sum of two or more non-zero terms."""
    anc, out = _ancestors(nodes), []
    for kind, inputs, extra, _ in nodes:
        live = [j for a, j in zip(extra or (), inputs, strict=False) if kind == "sum" and a * q[j]]
        if len(set(live)) < 2:
            continue
        common = frozenset.intersection(*(anc[j] for j in live))
        fork = max(common) if common else None  # None: they share only the input
        if fork is not None and nodes[fork][0] == "r":  # a shared nonlinear layer counts on each
            fork = nodes[fork][1][0]
        before = anc[fork] if fork is not None else frozenset()
        for j in live:  # a branch with a nonlinear layer of its own (not the shortcut)
            if any(nodes[k][0] == "r" for k in anc[j] - before):
                out.append((fork, j))
    return tuple(out)


def _simplify(nodes, q) -> tuple:
    """Nodes as :class:`ModelMaxFunc` keeps them: sums with their weights ``w_i``."""
    out = []
    for kind, inputs, extra, where in nodes:
        if kind == "sum":
            total = sum(float(a) ** 2 * q[j] for a, j in zip(extra, inputs, strict=True))
            w = tuple(float(a) ** 2 * q[j] / total for a, j in zip(extra, inputs, strict=True))
            out.append(("sum", inputs, w, where))
        elif kind in ("input", "r"):
            out.append((kind, inputs, None, where))
        elif kind in ("zero", "bias"):
            out.append(("input", (), None, where))  # weight 0 wherever it is summed
        else:
            out.append(("same", inputs, None, where))
    return tuple(out)


def subnet_max_func(model, x) -> ModelMaxFunc:
    """The subnetwork maximizing function ``M(x, r_fn)`` of an NNX model (dks's convention),
    derived from its computation by the theory engine, for
    ``shaping.dks(act, subnet_max_func=...)`` and ``shaping.tat(...)``.

    Args:
        model: any ``flax.nnx.Module`` the theory engine covers (left unmodified);
            its activation need not be the shaped one (only the graph and the scalings
            of its sums are read), but its sums must keep ``q = 1`` at every nonlinear
            layer's input (weighted residual blocks ``w x + sqrt(1 - w^2) f(x)``).
        x: an input batch the model takes (one example is enough; its values only
            fix the shapes and the variances of the structure maps).

    Returns:
        A :class:`ModelMaxFunc`: callable as ``M(x, r_fn)``; ``.network(x, r_fn)`` is
        the whole network alone; ``repr`` counts its nonlinear layers and branches.

    Raises:
        TheoryError: an operation the engine has no rule for (named, with its module).
        ValueError: a structure the local maps do not describe (see the module
            docstring), or a model with no nonlinear layer.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from isometry import networks, shaping
        >>> model = networks.WeightedResNet(4, 8, 2, "softplus", 2, rngs=nnx.Rngs(0))
        >>> m = shaping.subnet_max_func(model, jnp.ones((1, 4)))
        >>> m
        ModelMaxFunc(WeightedResNet: 5 nonlinear layers, 2 residual branches)
        >>> act = shaping.dks("softplus", subnet_max_func=m)
        >>> act.transform.max_residual < 1e-8
        True
    """
    graphs = []

    def read(run):
        g = _Graph(run.alg)
        if not hasattr(run.output, "width"):
            raise values.TheoryError("the model's output does not depend on its parameters")
        g.visit(run.output)
        graphs.append(g)
        return g.measure

    measured = [np.asarray(v) for v in engine.run(model, x, read)]
    nodes = [
        (k, i, tuple(float(measured[j]) for j in e) if k == "sum" else e, w)
        for k, i, e, w in graphs[-1].nodes
    ]
    q_input = float(np.mean(np.square(np.asarray(x, np.float64))))
    if not q_input > 0:
        raise ValueError("x must not be all zeros: its mean square sets the input's q")
    q = _ideal_q(nodes, measured, q_input)
    m = ModelMaxFunc(_simplify(nodes, q), _forks(nodes, q), type(model).__name__)
    if not m.nonlinear_layers:
        raise ValueError(f"{m.name}: the model has no nonlinear layer to shape")
    return m
