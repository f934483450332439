"""Parameterizations under which the best learning rate stays put as width and depth grow.

Standard, NTK, muP (Yang & Hu 2021, "Tensor Programs IV"; Yang et al. 2022,
"Tensor Programs V") and depth-muP (Yang et al. 2023, "Tensor Programs VI";
Bordelon et al. 2023) for any Flax NNX model, in the standard form (forward
multipliers 1; only initialization variances and per-parameter learning rates
change), so the model's forward pass is not touched:

* :func:`infer` (``shapes``): build ``factory(width, rngs)`` at two widths
  (abstractly) and find, per parameter, the dimensions that grow and its role
  (``input``, ``hidden``, ``output``, ``fixed``), as mup's base shapes do.
* :func:`apply` (``apply``): rescale the model's parameters to the kind's
  initialization variances and return a :class:`Parameterization` with the
  per-parameter learning-rate scales (SGD or Adam), the branch multiplier of
  depth-muP and the attention scaling of muP.
* :meth:`Parameterization.tx` / :func:`optimizer` (``optim``): SGD, Adam, AdamW
  with the per-parameter scales as one optax transformation (learning rates may
  be traced, so runs at several learning rates can be ``vmap``-ped).
* ``table``: the rules, each entry with its source.

Forward changes a plain model makes itself: muP's attention logits ``1/d``
(``Parameterization.attention``) and depth-muP's branch multiplier ``1/sqrt(L)``
(``Parameterization.branch_scale``). The toolkit's ``MLPConfig`` and
``TransformerConfig`` make them under ``parameterization=``.

Example:
    >>> import optax
    >>> from flax import nnx
    >>> from isometry import networks, parameterization
    >>> def factory(width, rngs):
    ...     cfg = networks.MLPConfig(depth=2, width=width, in_dim=8, out_dim=2,
    ...                              parameterization="mup")
    ...     return networks.MLP(cfg, rngs=rngs)
    >>> shapes = parameterization.infer(factory, (64, 128))
    >>> model = factory(256, nnx.Rngs(0))
    >>> p = parameterization.apply(model, "mup", shapes, optimizer="adam")
    >>> p.lr_scale["kernel"], p.lr_scale["embed"], p.variance_scale["readout"]
    (0.25, 1.0, 0.25)
    >>> opt = nnx.Optimizer(model, p.tx(1e-3), wrt=nnx.Param)
"""

from isometry.parameterization.apply import Parameterization, apply, block_params
from isometry.parameterization.optim import OPTIMIZERS, optimizer, scale_by_path
from isometry.parameterization.shapes import ROLES, ParamShape, Shapes, infer
from isometry.parameterization.table import KINDS

__all__ = [
    "KINDS",
    "OPTIMIZERS",
    "ROLES",
    "ParamShape",
    "Parameterization",
    "Shapes",
    "apply",
    "block_params",
    "infer",
    "optimizer",
    "scale_by_path",
]
