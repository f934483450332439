"""Probe any Flax NNX model: per-block signal propagation, gradients and Jacobian spectra.

The other measurement modules take a network as a scanned stack. This one
takes the researcher's own ``flax.nnx`` model as written (a ResNet with batch
norm, a pre-LN transformer, blocks of different widths) and measures it at
*cut points*: module paths such as ``"layers.3"`` or ``"stages.1.blocks.0"``.

* :func:`blocks` finds the cut points: the direct children of an
  ``nnx.Sequential``, or the items of a list / ``nnx.List`` attribute named
  ``blocks`` or ``layers`` (searched through nested modules and lists, in
  definition order). Any list of module paths may be passed as ``at=``.
* :func:`signal` (-> :class:`ProbeSignal`): per cut point the forward
  statistics of the block's output ``y^l`` (batch first, channels last)::

      mean_sq^l      = mean (y^l)^2
      chan_sq_mean^l = mean_ch (mean_{batch, positions} y^l)^2
      chan_var^l     = mean_ch  var_{batch, positions} y^l
      branch_var^l   = chan_var of ``block.branch(input)`` when the block has a
                       ``branch`` method (residual blocks), else NaN
      pair_cosine^l  = mean cosine of the example pairs (0, 1), (2, 3), ...
      position_cosine^l = mean cosine between distinct positions (tokens,
                       pixels) of one example, averaged over examples (NaN for
                       ``(B, N)`` outputs); 1 is rank collapse

  (the signal-propagation plots of Brock, De & Smith 2021, "Characterizing
  signal propagation to close the performance gap in unnormalized ResNets",
  with the definitions of :mod:`isometry.signal`), and for a scalar
  ``loss(model(x))`` (default: the random projection of
  :func:`isometry.signal.random_projection_loss`) the squared gradient norms

      grad_out_sq^l    = ||dLoss/dy^l||_F^2          (zero probes added to y^l)
      grad_param_sq^l  = ||dLoss/dtheta^l||_F^2     (every nnx.Param of the block)
      grad_kernel_sq^l = the same over its parameters of rank >= 2 (kernels)

  from one forward and one backward pass.
* :func:`jacobian_spectra` (-> :class:`ProbeSpectra`): for one example ``x_i``
  of the batch (the others held fixed, so batch norm in training mode is
  included), the squared singular values of the cumulative Jacobian
  ``d y^l_i / d x_i`` and of each block on its own, ``d y^l_i / d u^l_i`` at
  its input ``u^l`` of the same forward pass; dense (``jax.jacfwd``, exact)
  or matrix-free stochastic Lanczos quadrature (:func:`isometry.spectra.slq`).
* :func:`theory`: the infinite-width prediction of every measured field, read by
  the theory engine (:mod:`isometry.theory`) from the model itself: dense,
  convolutional, residual, normalized, attention and recurrent models in plain
  ``nnx`` (an operation without a rule is named); the toolkit's
  ``networks.MLP``/``ConvNet`` keep their mean-field theory
  (:func:`isometry.signal.model_theory`).

The toolkit's own scanned stacks (``networks.MLP``, ``networks.ConvNet``,
:func:`is_stack`) hold their layers in stacked parameters, so there is no
module to cut: their cut points are the layers ``"layer.0"`` ..
``"layer.{L-1}"``, measured by the stack tools themselves.
:func:`signal` returns :func:`isometry.signal.measure`'s numbers: ``mean_sq``,
``pair_cosine``, ``position_cosine`` and ``grad_out_sq`` are those of the
pre-activation ``h^l`` (``q^l``, ``c^l``, ``grad_preact_sq``), ``chan_*`` and
``branch_var`` those of the layer output ``x^l``, ``grad_kernel_sq`` is
``grad_weight_sq``, ``grad_param_sq`` counts every stacked parameter of the
layer, and ``grad_input_sq`` is at the stack input ``x^0`` (after the input
map). :func:`jacobian_spectra` gives the spectra of ``d x^l / d u`` (through
the input map) and ``d x^l / d x^{l-1}``, by
:func:`isometry.jacobian.stack_jacobians` (dense) or SLQ.
* :func:`plot`: all of it per block in one figure (PNG + PDF).

The model is never modified: every pass runs on a copy
(``nnx.merge(..., copy=True)``), in training or evaluation mode as the user
set it (batch norm in training mode normalizes with batch statistics; the
copy's running statistics are discarded). Everything is jittable
(``jax.jit(lambda x: probe.signal(model, x, key=key))``); the non-finite checks
(of the input batch before measuring, of the results after) run when the values
are concrete.

The package, one concern a module (each function is re-exported here, and
shadows the submodule of its name: ``probe.signal`` is the function):

* ``probe.signal``: :class:`ProbeSignal`, :func:`signal`, :func:`position_cosine`;
* ``probe.spectra``: :class:`ProbeSpectra`, :func:`jacobian_spectra`, :func:`slq_w1_bound`;
* ``probe.theory``: :func:`theory`;
* ``probe.coord``: :class:`CoordCheck`, :func:`coord_check` (microsoft/mup's coordinate
  check over width or depth, for any NNX model);
* ``probe.plot``: :func:`plot`, :func:`coord_plot`;
* ``probe.files``: :func:`save`, :func:`load_factory`;
* ``probe.monitor``: :class:`MonitorSummary`, :func:`monitor`, :func:`monitor_fn`: a
  few per-block summaries (mean square, gradient norms, the cumulative Jacobian's mean
  and largest squared singular value by SLQ) cheap enough for a training loop;
* ``probe.history``: :class:`MonitorLog` (the monitor's JSON lines), :func:`read_history`,
  :func:`plot_history` (its figure over training steps);

and the cut points themselves are :mod:`isometry.cuts`.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> from isometry import probe
    >>> model = nnx.Sequential(*[nnx.Linear(16, 16, rngs=nnx.Rngs(i)) for i in range(4)])
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))
    >>> probe.blocks(model)
    ['layers.0', 'layers.1', 'layers.2', 'layers.3']
    >>> probe.signal(model, x, key=jax.random.key(1)).grad_out_sq.shape
    (4,)
    >>> probe.jacobian_spectra(model, x).cumulative[3].shape
    (16,)
"""

from isometry.cuts import ProbeError, blocks, is_stack
from isometry.probe.coord import CoordCheck, coord_check
from isometry.probe.files import load_factory, save
from isometry.probe.history import MonitorLog, plot_history, read_history
from isometry.probe.monitor import MonitorSummary, monitor, monitor_fn
from isometry.probe.plot import coord_plot, plot
from isometry.probe.signal import ProbeSignal, position_cosine, signal
from isometry.probe.spectra import METHODS as METHODS
from isometry.probe.spectra import ProbeSpectra, jacobian_spectra, slq_w1_bound
from isometry.probe.theory import theory

__all__ = [
    "CoordCheck",
    "MonitorLog",
    "MonitorSummary",
    "ProbeError",
    "ProbeSignal",
    "ProbeSpectra",
    "blocks",
    "coord_check",
    "coord_plot",
    "is_stack",
    "jacobian_spectra",
    "load_factory",
    "monitor",
    "monitor_fn",
    "plot",
    "plot_history",
    "position_cosine",
    "read_history",
    "save",
    "signal",
    "slq_w1_bound",
    "theory",
]
