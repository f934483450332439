"""Flax NNX networks built as scanned layer stacks.

A deep network here is three pieces (see the design's "a deep network is a
scanned stack"):

    u  --input_map-->  x^0  --layer(params_1)--> x^1 ... --layer(params_L)--> x^L  --output_map--> y

The ``L`` hidden layers share one pure step function and their parameters
carry a leading depth axis, so the stack runs as one ``jax.lax.scan``
(compile time does not grow with depth) and every depth-wise tool
(Jacobians at every depth, signal-propagation statistics, mean-field theory)
works on the same representation.

Models:

* :class:`MLP` (:class:`MLPConfig`): fully connected, mean-field convention
  ``h^l = W^l x^{l-1} + b^l`` with ``Var(W_ij) = sigma_w2 / N`` and
  ``b_i ~ N(0, sigma_b2)``; ``x^l = phi(h^l)``, or with options

      normalization before the activation:  x^l = phi(norm(h^l))
      normalization after the activation:   x^l = norm(phi(h^l))
      residual connection:                  x^l = x^{l-1} + alpha * branch(x^{l-1})

  Any activation of :mod:`isometry.activations`; ``"prelu"`` gets a learnable
  channel-wise slope (He et al. 2015). Normalization ``"batch"`` (Ioffe &
  Szegedy 2015; running statistics in ``nnx.BatchStat``) or ``"layer"`` (Ba
  et al. 2016). Initializers of :mod:`isometry.initializers`, or the critical
  point of a chosen ``q_star`` (Pennington et al. 2017) via ``q_star=``.
* :class:`ConvNet` (:class:`ConvConfig`): a deep vanilla CNN (Xiao et al.
  2018) with delta-orthogonal (or any) initialization, circular or same
  padding, and an optional global-average-pooling head.

The scanned-stack view. ``model.stack()`` returns a :class:`Stack`:

    stack.layer(params_l, x) -> x           # one hidden layer, pure
    stack.params                             # pytree, leaves (L, ...)
    stack.input_map(u) -> x^0,  stack.output_map(x^L) -> y
    stack.step(params_l, x, probe) -> (x, aux)

``step`` is ``layer`` with instrumentation: ``probe`` (an array shaped like
the pre-activation, or ``None``) is added to the pre-activation ``h^l``, so
the gradient of a loss with respect to ``probe`` is ``dLoss/dh^l``; ``aux``
holds ``"preact"`` (``h^l``), ``"post"`` (the activation ``phi``) and, for
residual networks, ``"branch"`` (``alpha * branch``). Any user network in
this form is wrapped with :meth:`Stack.from_layer`.

``layer`` accepts a single example (``(N,)``; ``(*spatial, C)`` for
convolutions) or a batch (leading batch axes), except batch normalization in
training mode, which needs the batch.

Differentiation. Calling an :class:`MLP` whose stack is plain (no
normalization, no learnable slope; residual or not) runs the same scan, but
its JVP is written with the weight tangents taken out of the scan: ``u^l =
x^{l-1} dW^l + db^l`` for all layers in one batched contraction, then a scan
whose only matmul is ``dx W``. Forward mode, reverse mode and higher orders
all work; in reverse mode every ``dW^l`` is one batched product after the
backward scan, which makes the training step of
``benchmarks/bench_training.py`` about 10% faster on a CPU. The ``Stack``
view keeps the plain scan.

``nnx.split(model)`` gives ``(graphdef, state)`` for ``jit``, ``vmap`` over
seeds and training; ``model.train()`` / ``model.eval()`` switch batch
normalization between batch statistics and running statistics.

The package, one concern a module: ``stack`` (the representation, the plain
dense stack's JVP), ``config`` (what the configs share: branch scales, dtypes,
initialization options), ``build`` (drawing parameters; ``ScannedNet``, the one
construction path of ``MLP`` and ``ConvNet``), ``mlp``, ``convnet`` and
``transformer``, and ``blocks`` (:class:`WeightedResidual`, the normalized residual
block of DKS/TAT for a researcher's own NNX model, and :class:`WeightedResNet`, a dense
network of them); every public name is re-exported here.

Example:
    >>> from flax import nnx
    >>> from isometry import networks
    >>> cfg = networks.MLPConfig(depth=20, width=256, activation="tanh", q_star=0.5)
    >>> model = networks.MLP(cfg, rngs=nnx.Rngs(0))
    >>> s = model.stack()
    >>> s.params["kernel"].shape
    (20, 256, 256)

References:
    Poole et al. 2016; Schoenholz et al. 2017 (mean-field convention).
    Pennington, Schoenholz & Ganguli 2017 (critical point for a chosen q*).
    Xiao, Bahri, Sohl-Dickstein, Schoenholz & Pennington 2018, "Dynamical
    isometry and a mean field theory of CNNs" (delta-orthogonal kernels).
    He, Zhang, Ren & Sun 2015 (PReLU, He initialization).
    Ioffe & Szegedy 2015 (batch normalization); Ba, Kiros & Hinton 2016
    (layer normalization); He et al. 2016 (residual connections).
"""

from isometry.networks.blocks import WeightedResidual, WeightedResNet
from isometry.networks.config import BRANCH_SCALES, branch_scale, check_branch_scale, forward_config
from isometry.networks.config import DTYPES as DTYPES  # public, not in __all__
from isometry.networks.convnet import PADDINGS, ConvConfig, ConvNet, conv
from isometry.networks.mlp import MLP, NORM_POSITIONS, NORMS, MLPConfig
from isometry.networks.stack import Stack, StackedBatchStat, StackedParam
from isometry.networks.transformer import POOLS as POOLS  # public, not in __all__
from isometry.networks.transformer import (
    TRANSFORMER_NORMS,
    Transformer,
    TransformerConfig,
    attention,
    transformer_params,
)

__all__ = [
    "BRANCH_SCALES",
    "MLP",
    "NORMS",
    "NORM_POSITIONS",
    "PADDINGS",
    "TRANSFORMER_NORMS",
    "ConvConfig",
    "ConvNet",
    "MLPConfig",
    "Stack",
    "StackedBatchStat",
    "StackedParam",
    "Transformer",
    "TransformerConfig",
    "WeightedResNet",
    "WeightedResidual",
    "attention",
    "branch_scale",
    "check_branch_scale",
    "conv",
    "forward_config",
    "transformer_params",
]
