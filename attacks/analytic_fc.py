"""Analytic recovery of the input to a fully-connected layer from one client's single-example update.

For ``y = W x + b`` and one example, ``dL/dW = (dL/db) xᵀ``: every row of the
weight gradient is the input scaled by that row's bias gradient, so
``x = dW[i] / db[i]`` wherever ``db[i] != 0``. The adversary needs only the
update it received and the global weights it sent; the ratio cancels the
learning rate and the sign. It even survives several local steps on the same
single example (with or without momentum): each step adds ``db_t[i] x`` to
row i, so the accumulated row is still a multiple of x. With more than one
example the rows mix several inputs and the ratio no longer isolates one.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from attacks.observed import NamedArrays, parameter_delta

# Rows whose bias moved least are the noisiest ratios; a few of the largest suffice.
DEFAULT_TOP_ROWS = 8


def recover_fc_input(weight_delta: np.ndarray, bias_delta: np.ndarray, *, top_rows: int = DEFAULT_TOP_ROWS
                     ) -> np.ndarray:
    """The input x of a linear layer from its weight and bias update (or gradient) for one example.

    Least squares over the ``top_rows`` rows with the largest |bias delta|:
    ``x = sum_i db_i dW_i / sum_i db_i^2``, i.e. each row's ratio weighted by db_i².
    """
    dw = np.asarray(weight_delta, dtype=np.float64)
    db = np.asarray(bias_delta, dtype=np.float64)
    if dw.ndim != 2 or db.shape != (dw.shape[0],):
        raise ValueError(f"weight delta {dw.shape} and bias delta {db.shape} do not form one linear layer")
    rows = np.argsort(-np.abs(db))[:top_rows]
    rows = rows[db[rows] != 0]
    if len(rows) == 0:
        raise ValueError("no row of the bias moved: the update carries no information about the input")
    return (db[rows] @ dw[rows]) / (db[rows] @ db[rows])


def fc_input_candidates(weight_delta: np.ndarray, bias_delta: np.ndarray, count: int, *,
                        pixel_range: tuple[float, float] = (0.0, 1.0), tolerance: float = 0.05) -> np.ndarray:
    """Up to ``count`` distinct row ratios ``dW[i] / db[i]`` that lie in the pixel range, largest |db| first.

    With N examples, a row whose unit was active for exactly one of them (ReLU)
    is that example exactly; the others are mixtures (convex when the examples'
    bias gradients share a sign). Used to start the optimization-based attack
    on an aggregate from images that already explain part of the update.
    """
    dw = np.asarray(weight_delta, dtype=np.float64)
    db = np.asarray(bias_delta, dtype=np.float64)
    lo, hi = pixel_range
    picked: list[np.ndarray] = []
    for i in np.argsort(-np.abs(db)):
        if abs(db[i]) <= 1e-9 * np.abs(db).max() or len(picked) == count:
            break
        x = dw[i] / db[i]
        if x.min() < lo - tolerance or x.max() > hi + tolerance:
            continue
        if any(np.abs(x - p).max() < tolerance for p in picked):
            continue  # the same example again
        picked.append(np.clip(x, lo, hi))
    return np.array(picked, dtype=np.float32).reshape(len(picked), dw.shape[1])


def first_linear_layer(model: nn.Module) -> tuple[str, bool]:
    """Name of the first ``nn.Linear`` and whether it sees the raw input (no parametric layer before it)."""
    seen_parametric = False
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return name, not seen_parametric
        # e.g. the convnet's conv: a linear layer after it sees features, not pixels
        seen_parametric |= any(True for _ in module.parameters(recurse=False))
    raise ValueError("model has no nn.Linear layer")


def input_layer_delta(model: nn.Module, global_params: dict[str, np.ndarray], new_params: dict[str, np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """(weight delta, bias delta) of the model's first layer if it is Linear on the input, else None."""
    try:
        layer, sees_input = first_linear_layer(model)
    except ValueError:
        return None
    if not sees_input:
        return None
    delta = parameter_delta(list(global_params.items()), list(new_params.items()))
    return delta[f"{layer}.weight"], delta[f"{layer}.bias"]


def analytic_fc_attack(model: nn.Module, global_params: NamedArrays, new_params: NamedArrays,
                       input_shape: tuple[int, ...], *, top_rows: int = DEFAULT_TOP_ROWS) -> np.ndarray:
    """The client's single input image, shaped ``input_shape``, from its update (attack ``analytic_fc``).

    Refuses models whose first parametric layer is not linear: there the
    same algebra recovers the layer's input features, not the image.
    """
    layer, sees_input = first_linear_layer(model)
    if not sees_input:
        raise ValueError(f"first linear layer {layer!r} is not the model's first layer; "
                         "use recover_fc_input to recover its input features")
    delta = parameter_delta(global_params, new_params)
    x = recover_fc_input(delta[f"{layer}.weight"], delta[f"{layer}.bias"], top_rows=top_rows)
    return x.reshape(input_shape).astype(np.float32)
