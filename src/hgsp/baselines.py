"""The metrics of the baseline methods, as pure tensor math (no hooks, no model).

References (each method is selected with ``--method``; see :mod:`hgsp.methods`):

- LLM-Pruner: Ma, Fang, Wang. "LLM-Pruner: On the Structural Pruning of Large Language
  Models", NeurIPS 2023. First-order Taylor importance summed over each coupled group; the
  group importance is :func:`hgsp.importance.compute_importance` with ``taylor``.
- Wanda-sp: the structured Wanda variant of An et al. (FLAP paper, below), after Sun et al.
  "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024.
- FLAP: An, Zhao, Yu, Tang, Wang. "Fluctuation-based Adaptive Structured Pruning for Large
  Language Models", AAAI 2024.
- ShortGPT: Men et al. "ShortGPT: Layers in Large Language Models are More Redundant Than You
  Expect", 2024.
"""

from __future__ import annotations

import torch


def block_influence(cosine_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """ShortGPT's BI of each layer: 1 - mean over tokens of cos(layer input, layer output)."""
    return 1 - cosine_sum.double() / tokens


def token_cosine_sum(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the cosine similarity of two ``(..., hidden)`` hidden states."""
    return torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1).sum()


def column_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of every input column of a ``(out, in)`` weight."""
    return weight.double().pow(2).sum(dim=0)


def fluctuation(variance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FLAP's WIFV metric of every input feature: Var(x_j) * ||W[:, j]||^2."""
    return variance.double() * column_sq_norms(weight)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (unbiased) standard deviation along the last dimension."""
    x = x.double()
    std = x.std(dim=-1, keepdim=True)
    return (x - x.mean(dim=-1, keepdim=True)) / std.clamp(min=torch.finfo(torch.float64).tiny)


def flap_scores(attn_fluct: torch.Tensor, mlp_fluct: torch.Tensor, group_width: int):
    """FLAP's comparable scores of KV groups and MLP channels.

    As in FLAP's AL-AM structure: the attention metric is squared, each module's metrics are
    standardized within the module (one row per layer), and a head's score is the mean of its
    features' standardized scores; here a head is a whole KV group (``group_width`` o_proj
    input features), the unit a GQA model can drop.

    Args:
        attn_fluct: ``(L, heads * head_dim)`` fluctuation of the o_proj inputs.
        mlp_fluct: ``(L, intermediate)`` fluctuation of the down_proj inputs.
    """
    attn = standardize(attn_fluct.double().pow(2))
    n_layers = attn.shape[0]
    attn = attn.view(n_layers, -1, group_width).mean(dim=2)
    return attn, standardize(mlp_fluct)


def wanda_sp_scores(weight: torch.Tensor, input_norm: torch.Tensor,
                    group_width: int) -> torch.Tensor:
    """Wanda-sp score of each unit fed by ``group_width`` input columns of ``weight``.

    The Wanda metric ``|W_ij| * ||X_j||`` of the o_proj / down_proj weights, averaged over the
    output rows and summed over the unit's input columns.
    """
    per_column = weight.double().abs().mean(dim=0) * input_norm.double()
    return per_column.view(-1, group_width).sum(dim=1)


def compensation_bias(weight: torch.Tensor, mean_input: torch.Tensor,
                      kept_columns: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: the average contribution of the removed input columns.

    With it, the pruned layer returns the same output as the full one when its input is the
    calibration mean: ``W[:, kept] @ mean[kept] + b == W @ mean``.
    """
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept_columns.to(weight.device)] = False
    w = weight.double()[:, removed]
    return (w @ mean_input.double()[removed]).to(weight.dtype)
