"""Refit of the narrowed output projections (``--refit_outputs``).

When a block loses KV groups or MLP channels, its output projection (o_proj / down_proj) loses
the input columns of what was removed. Bias compensation (FLAP) puts back only their
calibration-mean contribution. The refit goes one step further: the kept columns and the bias
are fitted by ridge regression so that the narrowed projection reproduces the full one on the
calibration tokens::

    min_{A, b}  E || W x - A x_S - b ||^2  +  λ || A - W_S ||^2,     λ = damp · mean(diag G_SS)

with ``x`` the projection's input, ``S`` the kept columns and ``G = E[x xᵀ]``. The penalty pulls
``A`` toward the original columns, not toward zero: a few thousand calibration tokens do not
pin down a 1,536-wide regression, and the unpenalized fit generalizes worse than the bias alone
(benchmarks/README.md, screen 18). The bias is not penalized, so the refit keeps the property of
bias compensation: on the calibration mean input the output is unchanged. As λ grows the refit
becomes bias compensation exactly.

The statistics are the base model's, gathered in one extra pass over the calibration windows
for the narrowed blocks only (in several passes when their Gram matrices would not fit in
:data:`GRAM_BUDGET_BYTES`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .adapters import Adapter
from .importance import forward_windows, onloaded
from .plan import PruningPlan
from .surgery import narrowed_blocks, out_projection

log = logging.getLogger(__name__)

# float64 Gram accumulators held at once; more narrowed blocks take more passes
GRAM_BUDGET_BYTES = 4 << 30


def refit_projection(weight: torch.Tensor, gram: torch.Tensor, mean: torch.Tensor,
                     kept: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept columns and bias of a narrowed projection, fitted as the module docstring says.

    Args:
        weight: ``(out, in)`` full projection weight ``W``.
        gram: ``(in, in)`` ``E[x xᵀ]`` of its input over the calibration tokens.
        mean: ``(in,)`` ``E[x]``.
        kept: indices ``S`` of the kept input columns.
        damp: ridge strength relative to the mean of ``diag(G_SS)``; must be > 0.

    Returns:
        ``(A, b)``: the ``(out, |S|)`` new columns and the ``(out,)`` bias to add.
    """
    if damp <= 0:
        raise ValueError(f"damp must be > 0, got {damp}")
    w, g, m = weight.double(), gram.double(), mean.double()
    kept = kept.to(g.device)
    k = len(kept)
    g_ss = g[kept][:, kept]
    lam = damp * g_ss.diagonal().mean().clamp(min=torch.finfo(torch.float64).tiny)
    # normal equations in z = [x_S; 1]: E[z zᵀ] + λ·diag(1..1, 0), right side E[z xᵀ] Wᵀ + λ W_Sᵀ
    lhs = torch.empty(k + 1, k + 1, dtype=torch.float64, device=g.device)
    lhs[:k, :k] = g_ss
    lhs[:k, k] = m[kept]
    lhs[k, :k] = m[kept]
    lhs[k, k] = 1.0
    lhs[:k, :k] += lam * torch.eye(k, dtype=torch.float64, device=g.device)
    w = w.to(g.device)
    rhs = torch.cat([g[kept] @ w.T + lam * w[:, kept].T, (m @ w.T).unsqueeze(0)])
    solution = torch.linalg.solve(lhs, rhs)
    return solution[:k].T.to(weight.dtype), solution[k].to(weight.dtype)


def _passes(keys: list, widths: dict, budget: int) -> list[list]:
    """Split ``keys`` into groups whose float64 Gram matrices fit in ``budget`` bytes (a block
    bigger than the budget gets a pass of its own)."""
    passes, current, used = [], [], 0
    for key in keys:
        size = 8 * widths[key] ** 2
        if current and used + size > budget:
            passes.append(current)
            current, used = [], 0
        current.append(key)
        used += size
    return passes + ([current] if current else [])


@torch.no_grad()
def collect_grams(model: nn.Module, adapter: Adapter, windows: torch.Tensor, batch_size: int,
                  keys: list[tuple[str, int]],
                  budget: int = GRAM_BUDGET_BYTES) -> dict[tuple[str, int], torch.Tensor]:
    """``E[x xᵀ]`` (float64, CPU) of the o_proj / down_proj input of each ``(kind, layer)``."""
    layers = adapter.layers(model)
    widths = {key: out_projection(layers[key[1]], key[0]).in_features for key in keys}
    grams: dict = {}

    def hook(key):
        def pre_hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            # float32 per batch on the activation's device, summed in float64 on the CPU
            grams[key] = grams.get(key, 0) + (x.T @ x).double().cpu()
        return pre_hook

    passes = _passes(keys, widths, budget)
    for i, group in enumerate(passes):
        handles = [out_projection(layers[key[1]], key[0]).register_forward_pre_hook(hook(key))
                   for key in group]
        forward_windows(model, windows, batch_size, handles,
                        f"refit statistics {i + 1}/{len(passes)}")
    return {key: g / windows.numel() for key, g in grams.items()}


@torch.no_grad()
def refit_outputs(model: nn.Module, adapter: Adapter, plan: PruningPlan, windows: torch.Tensor,
                  batch_size: int, attn_mean: torch.Tensor, mlp_mean: torch.Tensor,
                  damp: float) -> tuple[dict, dict]:
    """Refitted kept columns and biases of every narrowed block of ``plan``.

    Returns:
        ``(weights, biases)``, each ``{layer: {"attn"|"mlp": tensor}}``: the new kept columns
        of o_proj / down_proj (in plan order) and the bias to add, as
        :func:`hgsp.surgery.apply_plan` takes them.
    """
    d = adapter.dims()
    blocks = narrowed_blocks(plan, d.gqa_ratio * d.head_dim)
    grams = collect_grams(model, adapter, windows, batch_size, list(blocks))
    layers = adapter.layers(model)
    weights: dict = {}
    biases: dict = {}
    for (kind, index), kept in blocks.items():
        proj = out_projection(layers[index], kind)
        mean = (attn_mean if kind == "attn" else mlp_mean)[index]
        with onloaded([proj]):
            a, b = refit_projection(proj.weight.detach().cpu(), grams[(kind, index)], mean,
                                    kept, damp)
        weights.setdefault(index, {})[kind] = a
        biases.setdefault(index, {})[kind] = b
    log.info("refitted %d narrowed output projections (damp %g)", len(blocks), damp)
    return weights, biases
