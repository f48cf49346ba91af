"""Per-weight salience and its reduction to pruning groups: pure tensor math, no hooks.

A group's importance is the sum of the salience of all its weights (DESIGN.md §3). Weights
of q/k/v/gate/up belong to a group by output row, weights of o/down by input column, so each
matrix is first reduced to one number per row or per column, then rows/columns are summed in
contiguous blocks of the group's width.
"""

from __future__ import annotations

import math

import torch

METHODS = ("taylor", "taylor_2nd", "wanda", "magnitude")
GRADIENT_METHODS = ("taylor", "taylor_2nd")


def weight_salience(method: str, weight: torch.Tensor, grad: torch.Tensor | None = None,
                    fisher: torch.Tensor | None = None,
                    input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Salience of every weight of a matrix (or bias vector), in float32.

    Args:
        method: one of :data:`METHODS`.
        weight: the parameter.
        grad: summed gradient of the mean loss over batches (taylor methods).
        fisher: mean over batches of the squared per-batch gradient (taylor_2nd).
        input_norm: L2 norm of each input feature over all calibration tokens (wanda); for a
            bias, the norm of the constant input 1, i.e. ``sqrt(tokens)``, as a 0-d tensor.
    """
    w = weight.float()
    if method == "magnitude":
        return w.abs()
    if method == "taylor":
        return (w * grad.float()).abs()
    if method == "taylor_2nd":
        # Second-order Taylor expansion of the loss change when w is set to zero.
        return (w * grad.float() - 0.5 * w * w * fisher.float()).abs()
    if method == "wanda":
        norm = input_norm.float()
        return w.abs() * (norm if w.dim() == 1 or norm.dim() == 0 else norm.unsqueeze(0))
    raise ValueError(f"unknown importance method {method!r}")


def row_groups(salience: torch.Tensor, width: int) -> torch.Tensor:
    """Sum salience over output rows in blocks of ``width`` rows (q/k/v/gate/up and biases)."""
    per_row = salience.sum(dim=1) if salience.dim() == 2 else salience
    return per_row.view(-1, width).sum(dim=1)


def col_groups(salience: torch.Tensor, width: int) -> torch.Tensor:
    """Sum salience over input columns in blocks of ``width`` columns (o/down)."""
    return salience.sum(dim=0).view(-1, width).sum(dim=1)


def bias_input_norm(tokens: int) -> torch.Tensor:
    """Wanda's input norm for a bias: its input is the constant 1 at every token."""
    return torch.tensor(math.sqrt(tokens))
