"""Reference activation transforms from DeepMind's dks 0.1.2 for the shaping tests.

dks (Martens et al. 2021; Zhang, Botev & Martens 2022) computes DKS and TAT
transforms ``phi_hat(x) = output_scale (phi(input_scale x + input_shift) +
output_shift)`` (leaky ReLU: ``negative_slope`` in place of ``input_scale``) from a
"subnetwork maximizing function" ``M(x, r_fn)``. The cases are those of dks's own
test (``tests/test_activation_transform.py``): its modified ResNet with shortcut
weight 0.6, blocks ``(3, 4, 23, 3)`` and three nonlinear layers per residual
branch, DKS with ``c_slope_1_target = 1.2``, TAT with ``c_val_0_target = 0.75`` and
``c_curve_target = 0.2``; plus a plain chain of 20 nonlinear layers
(``M(x, r) = r^20(x)``) with dks's defaults (``zeta = 1.5``; ``eta = 0.9``, ``tau =
0.3``), which ``isometry.shaping``'s ``depth=`` route must reproduce.

For every activation dks covers that the toolkit's catalog also has (dks's
``gelu_exact`` is the toolkit's ``gelu``; dks's ``swish`` is ``x sigmoid(x)``), the
parameters and the transformed function's values on ``X`` are stored. dks runs only
on an old JAX: the values were produced in a separate environment with jax 0.4.30,
numpy 1.26 and dks 0.1.2; regenerate them there from the repository root with::

    python tests/reference/dks_transforms.py

which rewrites ``tests/reference/dks_transforms.json``. The project never imports dks.
"""

import json
import logging
from pathlib import Path

import numpy as np
from dks.base import activation_transform as at

logging.disable(logging.WARNING)

X = np.linspace(-4.0, 4.0, 33)

DKS = ("tanh", "softplus", "relu", "leaky_relu", "gelu_exact", "elu", "selu", "swish",
       "sigmoid", "erf")  # fmt: skip
TAT = ("tanh", "softplus", "leaky_relu", "gelu_exact", "elu", "swish", "sigmoid", "erf")
NAMES = {"gelu_exact": "gelu"}  # dks name -> toolkit name


def resnet_max_func(x, r_fn, shortcut_weight=0.6):
    """dks's test function, verbatim in substance: the modified ResNet-101."""
    blocks_per_group = (3, 4, 23, 3)
    res_branch = r_fn(r_fn(r_fn(x)))
    for i in range(4):
        for j in range(blocks_per_group[i]):
            res_x = r_fn(r_fn(r_fn(x)))
            shortcut_x = r_fn(x) if j == 0 else x
            x = shortcut_weight**2 * shortcut_x + (1.0 - shortcut_weight**2) * res_x
    x = r_fn(x)
    return max(x, res_branch)


def chain_max_func(x, r_fn, depth=20):
    for _ in range(depth):
        x = r_fn(x)
    return x


CASES = {
    "resnet": (resnet_max_func, {"c_slope_1_target": 1.2},
               {"c_val_0_target": 0.75, "c_curve_target": 0.2}),
    "chain20": (chain_max_func, {"c_slope_1_target": 1.5},
                {"c_val_0_target": 0.9, "c_curve_target": 0.3}),
}  # fmt: skip


def main():
    out = {"x": X.tolist(), "cases": {}}
    for case, (fn, dks_params, tat_params) in CASES.items():
        rows = {}
        for method, names in (("DKS", DKS), ("TAT", TAT)):
            for name in names:
                params = at._get_activations_params(
                    [name], method=method, dks_params=dict(dks_params),
                    tat_params=dict(tat_params), subnet_max_func=fn,
                )[name]  # fmt: skip
                act = at._transform_activation(at._get_numpy_activation_function(name), params)
                key = f"{method.lower()}:{NAMES.get(name, name)}"
                rows[key] = {
                    "params": {k: float(v) for k, v in params.items()},
                    "values": [float(act(float(x))) for x in X],
                }
                print(case, key, rows[key]["params"], flush=True)
        out["cases"][case] = {"dks_params": dks_params, "tat_params": tat_params, "rows": rows}
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
