"""Pruning methods: each turns measured statistics into a group table and a selection.

``hgsp`` is the global H-GSP selection (DESIGN.md §5–6); the others are the baselines users
compare it with, on the same group layout, parameter budget and saved-model format (metrics and
paper references in :mod:`hgsp.baselines`):

- ``llm_pruner``: the same KV-group and MLP-channel fraction removed in every layer of a range
  that spares the first and last layers, lowest Taylor importance first;
- ``wanda_sp``: the same fraction removed in every layer, lowest Wanda-sp score first, each
  layer scored on the output of the layers before it already pruned (as in FLAP's code);
- ``flap``: globally, lowest standardized fluctuation first, with bias compensation;
- ``shortgpt``: whole layers, lowest Block Influence first.

The uniform methods remove whole KV groups, so a model with few KV heads can only approach a
fraction in steps of one group. Their original code prunes ``int(r * groups)`` groups and the
fraction r of the channels; the group count here is the one such a run has at the size nearest
the budget, and the MLP takes up the rest so that the total meets the budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .activations import ActivationStats, prune_layers_sequentially
from .adapters import Adapter
from .analysis import RemovalAnalysis
from .baselines import block_influence, flap_scores, fluctuation, wanda_sp_scores
from .errors import UserError
from .importance import Importance, onloaded
from .scoring import ATTN, MLP, MODE_LAYER, MODE_NONE, GroupTable, ScoreInfo, hgsp_scores, layout
from .selection import FixedCosts, Selection, select, selection_from_mask

log = logging.getLogger(__name__)

METHODS = ("hgsp", "llm_pruner", "wanda_sp", "flap", "shortgpt")
#: methods whose decision needs the activation statistics of the calibration windows
ACTIVATION_METHODS = ("flap", "shortgpt")
#: methods that rank by the gradient importance of ``--importance_method``
IMPORTANCE_METHODS = ("hgsp", "llm_pruner")


@dataclass
class Measurements:
    """What the calibration stage measured (each None when the method does not need it)."""

    importance: Importance | None = None
    analysis: RemovalAnalysis | None = None
    stats: ActivationStats | None = None
    # the calibration windows themselves, for the refit of the output projections and for
    # Wanda-sp's layer-by-layer pass
    calibration: torch.Tensor | None = None


def fixed_costs(adapter: Adapter) -> FixedCosts:
    return FixedCosts(adapter.attn_fixed_cost(), adapter.mlp_fixed_cost())


def _no_score_info(n_layers: int) -> ScoreInfo:
    return ScoreInfo(tau=None, temperature=0.0, modes=[MODE_NONE] * n_layers)


def _table(attn: torch.Tensor, mlp: torch.Tensor, adapter: Adapter,
           per_parameter: bool) -> GroupTable:
    """Group table whose score is the metric itself, or the metric per parameter."""
    table = layout(attn, mlp, adapter.attn_group_cost(), adapter.mlp_channel_cost())
    if not per_parameter:
        table.score = table.importance.clone()
    return table


def select_hgsp(m: Measurements, adapter: Adapter, cfg, budget: int):
    table = _table(m.importance.attn, m.importance.mlp, adapter, per_parameter=True)
    deltas = {} if m.analysis is None else {f"delta_{k}": m.analysis.deltas(k, cfg.delta_metric)
                                            for k in ("layer", "attn", "mlp")}
    info = hgsp_scores(table, cfg.temperature, tau=cfg.tau, tau_quantile=cfg.tau_quantile,
                       block_floor=cfg.block_floor, norm=cfg.resolved_importance_norm,
                       block_delta=cfg.block_delta, **deltas)
    collapsible = None
    if cfg.collapse_scope == "layer_dominant" and info.tau is not None:
        collapsible = torch.tensor([mode == MODE_LAYER for mode in info.modes])
    return table, info, select(table, budget, fixed_costs(adapter), cfg.epsilon, cfg.round_to,
                               collapsible)


def warn_kept_below_epsilon(selection, epsilon: float) -> None:
    """Say so when the budget kept a layer below ε: the layers collapse would remove whole
    held more than the budget (a high ε at a light ratio), so the emptiest stayed thinned."""
    if selection.kept_below_epsilon:
        log.warning("layers %s keep less than --epsilon %.2f of their parameters but stay "
                    "thinned: removing them whole as well would remove more than "
                    "--pruning_ratio; raise --pruning_ratio to remove them whole, or lower "
                    "--epsilon to accept them thinned",
                    selection.kept_below_epsilon, epsilon)


def llm_pruner_range(n_layers: int) -> tuple[int, int]:
    """LLM-Pruner's default ``range(4, 30)`` of LLaMA-7B's 32 layers, scaled to ``n_layers``."""
    return round(4 * n_layers / 32), n_layers - round(2 * n_layers / 32)


def uniform_counts(dims, attn_cost: int, ch_cost: int, n_layers: int, budget: int,
                   round_to: int) -> tuple[int, int]:
    """KV groups and MLP channels to remove from each of ``n_layers`` layers.

    The original tools prune one ratio r of every module: ``int(r * groups)`` whole groups and
    r of the channels. No single r meets an arbitrary budget, so the group count is the one
    such a run would have at the size nearest the budget; the channels then make up the rest
    of the budget exactly, rounded so the kept width is a multiple of ``round_to``.
    """
    groups, width = dims.num_kv_heads, dims.intermediate
    per_layer = groups * attn_cost + width * ch_cost
    target = budget / n_layers
    if target >= per_layer:
        raise UserError(f"the budget needs {target / per_layer:.0%} of the {n_layers} layers this "
                        "method prunes: use a lower --pruning_ratio")
    heads = min(range(groups), key=lambda h: _gap(target, h, groups, attn_cost, width * ch_cost))
    # the nearest run can lie above the budget; its groups alone must not exceed it
    while heads > 0 and heads * attn_cost > target:
        heads -= 1
    channels = (target - heads * attn_cost) / ch_cost
    kept = round((width - channels) / round_to) * round_to
    kept = min(max(kept, round_to), width)
    return heads, width - kept


def _gap(target: float, heads: int, groups: int, attn_cost: int, mlp_cost: int) -> float:
    """How far ``target`` lies from the per-layer sizes a single ratio r can give with
    ``int(r * groups) == heads``, i.e. r in [heads/groups, (heads+1)/groups)."""
    low = heads * attn_cost + heads / groups * mlp_cost
    high = heads * attn_cost + (heads + 1) / groups * mlp_cost
    return max(low - target, target - high, 0.0)


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` lowest scores (ties in index order)."""
    return torch.sort(scores, stable=True).indices[:count]


def _uniform_mask(table: GroupTable, layers: range, heads: int, channels: int) -> torch.Tensor:
    """Select, in every layer of ``layers``, the lowest-scoring groups of each kind."""
    selected = torch.zeros(len(table), dtype=torch.bool)
    for layer in layers:
        for kind, count in ((ATTN, heads), (MLP, channels)):
            rows = torch.nonzero((table.layer == layer) & (table.kind == kind)).flatten()
            selected[rows[lowest(table.score[rows], count)]] = True
    return selected


def _uniform_counts(adapter: Adapter, layers: range, budget: int, round_to: int):
    return uniform_counts(adapter.dims(), adapter.attn_group_cost(), adapter.mlp_channel_cost(),
                          len(layers), budget, round_to)


def select_uniform(attn: torch.Tensor, mlp: torch.Tensor, adapter: Adapter, layers: range,
                   heads: int, channels: int):
    """The lowest ``heads`` KV groups and ``channels`` MLP channels of every layer of ``layers``."""
    table = _table(attn, mlp, adapter, per_parameter=False)
    log.info("uniform pruning of layers %d..%d: %d KV groups and %d MLP channels each",
             layers.start, layers.stop - 1, heads, channels)
    selection = selection_from_mask(table, fixed_costs(adapter),
                                    _uniform_mask(table, layers, heads, channels))
    return table, _no_score_info(attn.shape[0]), selection


def select_llm_pruner(m: Measurements, adapter: Adapter, cfg, budget: int):
    layers = range(*llm_pruner_range(m.importance.attn.shape[0]))
    return select_uniform(m.importance.attn, m.importance.mlp, adapter, layers,
                          *_uniform_counts(adapter, layers, budget, cfg.round_to))


def _projection_metrics(model, adapter: Adapter, metric):
    """``metric(kind, layer index, weight)`` of every layer's o_proj ("attn") and down_proj
    ("mlp"), stacked per kind; offloaded weights are read back one layer at a time."""
    attn, mlp = [], []
    for i, layer in enumerate(adapter.layers(model)):
        o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
        with onloaded([o_proj, down_proj]):
            attn.append(metric("attn", i, o_proj.weight.detach().cpu()))
            mlp.append(metric("mlp", i, down_proj.weight.detach().cpu()))
    return torch.stack(attn), torch.stack(mlp)


def _keep_mask(units: int, removed: torch.Tensor, unit_width: int) -> torch.Tensor:
    """Keep-mask of the ``units * unit_width`` input features, False for the removed units."""
    keep = torch.ones(units, unit_width, dtype=torch.bool)
    keep[removed] = False
    return keep.flatten()


def wanda_sp_metrics(model, adapter: Adapter, windows: torch.Tensor, batch_size: int,
                     heads: int, channels: int):
    """Wanda-sp scores of every KV group and MLP channel, each layer measured with the layers
    before it pruned (``heads`` groups and ``channels`` channels each, lowest score first)."""
    d = adapter.dims()
    group_width = d.gqa_ratio * d.head_dim
    attn_rows, mlp_rows = [], []

    def prune_layer(i, attn_norm, mlp_norm):
        layer = adapter.layers(model)[i]
        o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
        with onloaded([o_proj, down_proj]):
            attn = wanda_sp_scores(o_proj.weight.detach().cpu(), attn_norm, group_width)
            mlp = wanda_sp_scores(down_proj.weight.detach().cpu(), mlp_norm, 1)
        attn_rows.append(attn)
        mlp_rows.append(mlp)
        return (_keep_mask(attn.numel(), lowest(attn, heads), group_width),
                _keep_mask(mlp.numel(), lowest(mlp, channels), 1))

    prune_layers_sequentially(model, adapter, windows, batch_size, prune_layer)
    return torch.stack(attn_rows), torch.stack(mlp_rows)


def select_wanda_sp(m: Measurements, adapter: Adapter, cfg, budget: int, model):
    layers = range(adapter.dims().num_layers)
    heads, channels = _uniform_counts(adapter, layers, budget, cfg.round_to)
    attn, mlp = wanda_sp_metrics(model, adapter, m.calibration, cfg.gradient_batch_size, heads,
                                 channels)
    # the same lowest-first choice as in the pass, now on the stacked scores
    return select_uniform(attn, mlp, adapter, layers, heads, channels)


def flap_metrics(model, adapter: Adapter, stats: ActivationStats):
    d = adapter.dims()
    attn, mlp = _projection_metrics(model, adapter, lambda kind, i, w: fluctuation(
        stats.variance(kind)[i], w))
    return flap_scores(attn, mlp, d.gqa_ratio * d.head_dim)


def select_flap(m: Measurements, adapter: Adapter, cfg, budget: int, model):
    attn, mlp = flap_metrics(model, adapter, m.stats)
    table = _table(attn, mlp, adapter, per_parameter=False)
    # FLAP ranks the standardized scores of all modules together and counts each unit at its
    # parameter cost; it never removes a layer as such (epsilon 0).
    selection = select(table, budget, fixed_costs(adapter), 0.0, cfg.round_to)
    return table, _no_score_info(attn.shape[0]), selection


def shortgpt_layers(bi: torch.Tensor, layer_params: int, budget: int) -> list[int]:
    """The layers ShortGPT removes: as many lowest-BI layers as come closest to the budget."""
    n_layers = bi.numel()
    count = min(max(round(budget / layer_params), 1), n_layers - 1)
    return sorted(torch.sort(bi, stable=True).indices[:count].tolist())


def select_shortgpt(m: Measurements, adapter: Adapter, cfg, budget: int, model):
    d = adapter.dims()
    bi = block_influence(m.stats.cosine_sum, m.stats.tokens)
    table = _table(bi.unsqueeze(1).expand(-1, d.num_kv_heads),
                   bi.unsqueeze(1).expand(-1, d.intermediate), adapter, per_parameter=False)
    layer_params = sum(p.numel() for p in adapter.layers(model)[0].parameters())
    removed = shortgpt_layers(bi, layer_params, budget)
    log.info("Block Influence per layer: %s; removing layers %s",
             [round(v, 4) for v in bi.tolist()], removed)
    mask = torch.isin(table.layer, torch.tensor(removed, dtype=torch.long))
    return table, _no_score_info(bi.numel()), selection_from_mask(table, fixed_costs(adapter),
                                                                   mask)


def choose(method: str, m: Measurements, adapter: Adapter, cfg, budget: int, model
           ) -> tuple[GroupTable, ScoreInfo, Selection]:
    """Group table, scoring info and selection of ``method`` for a removal ``budget``."""
    if method == "hgsp":
        return select_hgsp(m, adapter, cfg, budget)
    if method == "llm_pruner":
        return select_llm_pruner(m, adapter, cfg, budget)
    chooser = {"wanda_sp": select_wanda_sp, "flap": select_flap, "shortgpt": select_shortgpt}
    if method not in chooser:
        raise UserError(f"unknown --method '{method}': use one of {', '.join(METHODS)}")
    return chooser[method](m, adapter, cfg, budget, model)
