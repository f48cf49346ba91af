"""Global selection under one parameter budget, and layer collapse (DESIGN.md §6).

Pure functions on a :class:`~hgsp.scoring.GroupTable`. The bookkeeping that matters: a block
whose groups are all selected also loses the parameters no group owns (its norm, biases), and
a layer whose two blocks are gone is gone whole; every count of removed parameters here
includes those, so the achieved ratio is the one the saved model has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .scoring import ATTN, MLP, GroupTable


@dataclass(frozen=True)
class FixedCosts:
    """Parameters of a block that belong to no group (its norm, o/down biases, q/k norms)."""

    attn: int
    mlp: int


@dataclass
class Selection:
    """Which groups go, and what that removes."""

    selected: torch.Tensor  # bool, one per table row
    removed_params: int
    collapsed_layers: list[int]
    attn_removed: list[bool]
    mlp_removed: list[bool]
    # layers left below ε because removing them whole would remove more than the budget
    kept_below_epsilon: list[int] = field(default_factory=list)

    @property
    def layers_removed(self) -> list[bool]:
        return [a and m for a, m in zip(self.attn_removed, self.mlp_removed)]


class _Blocks:
    """Per-(layer, kind) counts of the table, to tell when a block is wholly selected."""

    def __init__(self, table: GroupTable, fixed: FixedCosts):
        self.n_layers = int(table.layer.max()) + 1
        self.slot = table.layer * 2 + table.kind  # block id of every group
        self.size = torch.bincount(self.slot, minlength=2 * self.n_layers)
        self.fixed = torch.tensor([fixed.attn, fixed.mlp]).repeat(self.n_layers)
        self.cost = table.cost

    def removed_blocks(self, selected: torch.Tensor) -> torch.Tensor:
        count = torch.bincount(self.slot[selected], minlength=2 * self.n_layers)
        return count == self.size

    def removed_params(self, selected: torch.Tensor) -> int:
        groups = int(self.cost[selected].sum())
        return groups + int(self.fixed[self.removed_blocks(selected)].sum())

    def layer_removed_params(self, selected: torch.Tensor) -> torch.Tensor:
        per_block = torch.bincount(self.slot[selected], weights=self.cost[selected].double(),
                                   minlength=2 * self.n_layers)
        per_block += self.fixed * self.removed_blocks(selected)
        return per_block.view(self.n_layers, 2).sum(dim=1)

    def layer_totals(self) -> torch.Tensor:
        per_block = torch.bincount(self.slot, weights=self.cost.double(),
                                   minlength=2 * self.n_layers) + self.fixed
        return per_block.view(self.n_layers, 2).sum(dim=1)


def prunable_params(table: GroupTable, fixed: FixedCosts) -> int:
    """Every decoder-layer parameter: what removing all layers would remove."""
    blocks = _Blocks(table, fixed)
    return int(blocks.layer_totals().sum())


def greedy_knapsack(score: torch.Tensor, cost: torch.Tensor, budget: int) -> torch.Tensor:
    """Take groups lowest score first while they fit; skip one that overshoots, go on.

    The prefix that fits is found with one cumulative sum; after it, only groups small enough
    for the remaining budget are visited, and the walk stops once nothing can fit.
    """
    order = torch.sort(score, stable=True).indices
    sorted_cost = cost[order]
    cumulative = torch.cumsum(sorted_cost, 0)
    take = int(torch.searchsorted(cumulative, torch.tensor(budget), right=True))
    selected = torch.zeros(score.numel(), dtype=torch.bool)
    selected[order[:take]] = True
    remaining = budget - (int(cumulative[take - 1]) if take else 0)
    if take == score.numel():
        return selected
    rest = order[take:]
    rest_cost = sorted_cost[take:]
    smallest = int(rest_cost.min())
    for pos in torch.nonzero(rest_cost <= remaining).flatten().tolist():
        if remaining < smallest:
            break
        c = int(rest_cost[pos])
        if c <= remaining:
            selected[rest[pos]] = True
            remaining -= c
    return selected


def _give_back(table: GroupTable, blocks: _Blocks, selected: torch.Tensor, budget: int,
               frozen_layers: torch.Tensor) -> None:
    """Un-select the highest-scoring selected groups (outside collapsed layers) while the
    removal stays at or above the budget."""
    removed = blocks.removed_params(selected)
    candidates = torch.nonzero(selected & ~frozen_layers[table.layer]).flatten()
    if removed <= budget or candidates.numel() == 0:
        return
    candidates = candidates[torch.sort(table.score[candidates], descending=True, stable=True).indices]
    smallest = int(table.cost[candidates].min())
    block_selected = torch.bincount(blocks.slot[selected], minlength=blocks.size.numel())
    for g in candidates.tolist():
        over = removed - budget
        if over < smallest:
            break
        slot = int(blocks.slot[g])
        # Un-selecting one group of a wholly removed block brings its fixed part back too.
        release = int(table.cost[g]) + (int(blocks.fixed[slot])
                                        if block_selected[slot] == blocks.size[slot] else 0)
        if release <= over:
            selected[g] = False
            block_selected[slot] -= 1
            removed -= release


def select(table: GroupTable, budget: int, fixed: FixedCosts, epsilon: float,
           round_to: int = 1, collapsible: torch.Tensor | None = None) -> Selection:
    """Greedy global selection, then collapse of nearly empty layers.

    Args:
        budget: parameters to remove from the decoder layers.
        epsilon: a layer keeping less than this fraction of its parameters is removed whole;
            what that removes beyond the budget is given back elsewhere. A layer whose removal
            could not be given back (the whole layers would exceed the budget) stays thinned
            and is listed in ``kept_below_epsilon``. 0 disables collapse.
        round_to: keep every MLP width a multiple of this (see :mod:`hgsp.rounding`).
        collapsible: bool per layer, the layers collapse may remove (default: all).
    """
    if round_to <= 1:
        return _select(table, budget, fixed, epsilon, collapsible)
    from .rounding import chunk_mlp_channels

    chunking = chunk_mlp_channels(table, round_to)
    result = _select(chunking.table, budget, fixed, epsilon, collapsible)
    result.selected = chunking.expand(result.selected)
    return result


def _select(table: GroupTable, budget: int, fixed: FixedCosts, epsilon: float,
            collapsible: torch.Tensor | None = None) -> Selection:
    blocks = _Blocks(table, fixed)
    if collapsible is None:
        collapsible = torch.ones(blocks.n_layers, dtype=torch.bool)
    selected = greedy_knapsack(table.score, table.cost, budget)
    totals = blocks.layer_totals()
    collapsed = torch.zeros(blocks.n_layers, dtype=torch.bool)
    refused = torch.zeros(blocks.n_layers, dtype=torch.bool)
    while True:
        # Give back what wholly removed blocks (their fixed part) and collapsed layers removed
        # beyond the budget; then check again, since a give-back can leave a layer below ε.
        _give_back(table, blocks, selected, budget, collapsed)
        if epsilon <= 0:
            break
        retained, gone = _layer_state(blocks, selected, totals)
        below = (retained < epsilon) & ~gone & ~collapsed & ~refused & collapsible
        if not below.any():
            break
        grow, refuse = _collapse_within_budget(below, retained, totals, collapsed | gone,
                                               budget + int(blocks.cost.max()))
        collapsed |= grow  # every pass collapses or refuses at least one layer: the loop ends
        refused |= refuse
        selected |= grow[table.layer]
    retained, gone = _layer_state(blocks, selected, totals)
    still_below = refused & (retained < epsilon) & ~gone
    return selection_from_mask(table, fixed, selected, torch.nonzero(collapsed).flatten().tolist(),
                               torch.nonzero(still_below).flatten().tolist())


def _layer_state(blocks: _Blocks, selected: torch.Tensor,
                 totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: the fraction of its parameters kept, and whether both its blocks are gone."""
    retained = 1 - blocks.layer_removed_params(selected) / totals
    return retained, blocks.removed_blocks(selected).view(-1, 2).all(dim=1)


def _collapse_within_budget(below: torch.Tensor, retained: torch.Tensor, totals: torch.Tensor,
                            gone: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the layers ``below`` ε into those to remove whole and those to leave thinned;
    ``gone``: the layers already removed whole (collapsed, or wholly selected).

    The budget wins over ε (DESIGN.md §6: the achieved ratio lands within one group's cost of
    the target). What collapse removes beyond the budget is given back from the other layers,
    which is only possible while the whole layers removed fit in the budget (``limit``: the
    budget plus the largest group); a layer that would break that stays thinned. The emptiest
    go first.
    """
    layers = torch.nonzero(below).flatten()
    layers = layers[torch.sort(retained[layers], stable=True).indices]
    grow = torch.zeros_like(below)
    refuse = torch.zeros_like(below)
    whole = float(totals[gone].sum())
    for layer in layers.tolist():
        if whole + float(totals[layer]) <= limit:
            grow[layer] = True
            whole += float(totals[layer])
        else:
            refuse[layer] = True
    return grow, refuse


def selection_from_mask(table: GroupTable, fixed: FixedCosts, selected: torch.Tensor,
                        collapsed_layers: list[int] | None = None,
                        kept_below_epsilon: list[int] | None = None) -> Selection:
    """The :class:`Selection` of the groups ``selected`` marks, with what that removes."""
    blocks = _Blocks(table, fixed)
    removed_blocks = blocks.removed_blocks(selected).view(-1, 2)
    return Selection(
        selected=selected,
        removed_params=blocks.removed_params(selected),
        collapsed_layers=collapsed_layers or [],
        kept_below_epsilon=kept_below_epsilon or [],
        attn_removed=removed_blocks[:, ATTN].tolist(),
        mlp_removed=removed_blocks[:, MLP].tolist(),
    )
