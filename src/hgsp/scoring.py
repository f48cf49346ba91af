"""The H-GSP score of every group (DESIGN.md §5): pure tensor math on a flat group table.

The table is a set of parallel 1-D tensors (one entry per group) rather than a list of
objects, so that a 70B model's ~2.3 M groups are scored and sorted in a few vector operations.
Groups are ordered layer by layer, attention groups before MLP channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ATTN, MLP = 0, 1
KIND_NAMES = {ATTN: "attn", MLP: "mlp"}
MODE_NONE, MODE_LAYER, MODE_BLOCK = "none", "layer", "block"


@dataclass
class GroupTable:
    """One entry per group. ``delta`` is the Δ that entered the score (0 when T = 0)."""

    layer: torch.Tensor  # int64
    kind: torch.Tensor  # int64, ATTN or MLP
    index: torch.Tensor  # int64, KV group or channel index within the layer
    importance: torch.Tensor  # float64
    cost: torch.Tensor  # int64 parameters
    delta: torch.Tensor  # float64
    score: torch.Tensor  # float64

    def __len__(self) -> int:
        return self.layer.numel()


@dataclass
class ScoreInfo:
    """How each layer was scored: the threshold used and each layer's mode."""

    tau: float | None
    temperature: float
    modes: list[str]


def layout(attn_importance: torch.Tensor, mlp_importance: torch.Tensor,
           attn_cost: int, mlp_cost: int) -> GroupTable:
    """Flatten per-layer importances into a table with zero delta and score = I / cost."""
    n_layers, n_groups = attn_importance.shape
    n_channels = mlp_importance.shape[1]
    per_layer = n_groups + n_channels
    layer = torch.arange(n_layers).repeat_interleave(per_layer)
    kind = torch.cat([torch.full((n_groups,), ATTN), torch.full((n_channels,), MLP)]).repeat(n_layers)
    index = torch.cat([torch.arange(n_groups), torch.arange(n_channels)]).repeat(n_layers)
    importance = torch.cat([attn_importance, mlp_importance], dim=1).reshape(-1).double()
    cost = torch.where(kind == ATTN, attn_cost, mlp_cost).long()
    return GroupTable(layer, kind, index, importance, cost,
                      torch.zeros(layer.numel(), dtype=torch.float64), importance / cost)


def auto_tau(delta_layer: torch.Tensor, quantile: float = 0.25) -> float:
    """The default threshold: a percentile (the 25th) of the layer-removal increments."""
    return float(torch.quantile(delta_layer.double(), quantile))


BLOCK_DELTAS = ("alone", "shapley")


def shapley_block_deltas(delta_layer: torch.Tensor, delta_attn: torch.Tensor,
                         delta_mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's Δ raised to at least its Shapley share of its layer's removal.

    Removing a layer's two blocks together usually costs more than the sum of removing each
    alone (Δ_layer > Δ_attn + Δ_mlp), and the single-block Δ leaves that joint cost to
    nobody. In the two-player game with v(attn) = Δ_attn, v(mlp) = Δ_mlp, v(both) = Δ_layer,
    the Shapley value of the attention block is ½(Δ_attn + Δ_layer − Δ_mlp) (and alike for
    the MLP): the two shares add up to Δ_layer. The share is only a lower bound, because when
    the joint cost is *smaller* than a block alone (Δ_mlp > Δ_layer, as in the first layer of
    some models) the share of the other block would drop below what removing it alone measured.
    """
    share_attn = 0.5 * (delta_attn + delta_layer - delta_mlp)
    share_mlp = 0.5 * (delta_mlp + delta_layer - delta_attn)
    return torch.maximum(delta_attn, share_attn), torch.maximum(delta_mlp, share_mlp)


NORMS = ("none", "layer", "block")


def normalized_density(table: GroupTable, norm: str = "none") -> torch.Tensor:
    """``I / cost`` of every group, divided by the importance per parameter of its whole layer
    (``layer``) or block (``block``): ``none`` leaves it as is.

    Taylor importances are first-order estimates for one group removed alone; their scale
    differs between layers far more than the harm of thinning those layers does. Normalized,
    the density only ranks groups *within* a layer or block, and the ranking *across* layers is
    left to the measured removal increments Δ of the H-GSP score.
    """
    base = table.importance / table.cost
    if norm == "none" or len(table) == 0:
        return base
    if norm not in NORMS:
        raise ValueError(f"unknown importance normalization {norm!r}")
    slot = table.layer if norm == "layer" else table.layer * 2 + table.kind
    n = int(slot.max()) + 1
    importance = torch.bincount(slot, weights=table.importance, minlength=n)
    cost = torch.bincount(slot, weights=table.cost.double(), minlength=n)
    density = importance / cost
    density = torch.where(density > 0, density, torch.ones_like(density))  # all-zero slot
    return base / density[slot]


def hgsp_scores(table: GroupTable, temperature: float, delta_layer: torch.Tensor | None = None,
                delta_attn: torch.Tensor | None = None, delta_mlp: torch.Tensor | None = None,
                tau: float | None = None, tau_quantile: float = 0.25,
                block_floor: bool = False, norm: str = "none",
                block_delta: str = "alone") -> ScoreInfo:
    """Fill ``table.delta`` and ``table.score`` with ``S = I / cost * ln(1 + Δ)^T``.

    A layer whose Δ_layer is below τ is Layer-Dominant (all its groups use Δ_layer); the others
    are Block-Dominant (attention groups use Δ_attn, MLP channels Δ_mlp). With ``T = 0`` the
    deltas are not needed and the score is the plain importance per parameter.

    With ``block_floor`` a block of a Block-Dominant layer counts at least τ: such a layer was
    judged too sensitive to remove whole, so none of its blocks may look cheaper than the
    Layer-Dominant layers the gate marked as removable.

    ``block_delta="shapley"`` scores the blocks of Block-Dominant layers with
    :func:`shapley_block_deltas` instead of their single-removal Δ.

    ``norm`` (see :func:`normalized_density`) applies to the hybrid score only: T = 0 stays
    the plain importance per parameter.
    """
    base = table.importance / table.cost
    n_layers = int(table.layer.max()) + 1 if len(table) else 0
    if temperature == 0:
        table.delta.zero_()
        table.score = base
        return ScoreInfo(tau=None, temperature=0.0, modes=[MODE_NONE] * n_layers)
    if delta_layer is None or delta_attn is None or delta_mlp is None:
        raise ValueError("T > 0 needs the layer and block removal deltas")
    delta_layer, delta_attn, delta_mlp = (d.double().clamp(min=0) for d in
                                          (delta_layer, delta_attn, delta_mlp))
    if block_delta not in BLOCK_DELTAS:
        raise ValueError(f"unknown block delta {block_delta!r}")
    if block_delta == "shapley":
        delta_attn, delta_mlp = shapley_block_deltas(delta_layer, delta_attn, delta_mlp)
    if tau is None:
        tau = auto_tau(delta_layer, tau_quantile)
    layer_dominant = delta_layer < tau
    block_delta = torch.where(table.kind == ATTN, delta_attn[table.layer], delta_mlp[table.layer])
    if block_floor and math.isfinite(tau):
        block_delta = block_delta.clamp(min=tau)
    table.delta = torch.where(layer_dominant[table.layer], delta_layer[table.layer], block_delta)
    table.score = normalized_density(table, norm) * torch.log1p(table.delta).pow(temperature)
    modes = [MODE_LAYER if d else MODE_BLOCK for d in layer_dominant.tolist()]
    return ScoreInfo(tau=float(tau), temperature=float(temperature), modes=modes)
