"""The analysis files of a run, in the usage document's layout (``analysis/*.json|csv``)."""

from __future__ import annotations

from pathlib import Path

from .analysis import RemovalAnalysis
from .plan import PruningPlan
from .save import write_csv, write_json
from .scoring import KIND_NAMES, GroupTable, ScoreInfo
from .selection import Selection

GROUP_COLUMNS = ["layer", "type", "index", "importance", "cost", "delta", "score", "selected"]


def write_removal_analysis(folder: Path, analysis: RemovalAnalysis | None, info: ScoreInfo,
                           windows: list[int] | None, metric: str = "ppl") -> None:
    """``layer_removal_ppl.json`` and ``block_removal_ppl.json`` (marked skipped when T = 0).

    The ``delta`` fields are in ``metric`` (``--delta_metric``), the unit τ and the modes were
    decided in, so that τ compares with them; the perplexities are always there too.
    """
    if analysis is None:
        skipped = {"skipped": True, "reason": "temperature 0: the score does not use Δ"}
        write_json(folder / "layer_removal_ppl.json", skipped)
        write_json(folder / "block_removal_ppl.json", skipped)
        return
    common = {"base_ppl": analysis.base_ppl, "seq_len": analysis.seq_len,
              "tokens": analysis.tokens, "analysis_windows": windows, "delta_metric": metric}
    d_layer, d_attn, d_mlp = (analysis.deltas(k, metric).tolist()
                              for k in ("layer", "attn", "mlp"))
    write_json(folder / "layer_removal_ppl.json", {
        **common, "tau": info.tau,
        "layers": [{"layer": i, "ppl": p, "delta": d, "mode": m} for i, (p, d, m) in
                   enumerate(zip(analysis.layer_ppl, d_layer, info.modes))]})
    write_json(folder / "block_removal_ppl.json", {
        **common,
        "layers": [{"layer": i, "attn_ppl": pa, "attn_delta": da, "mlp_ppl": pm,
                    "mlp_delta": dm} for i, (pa, da, pm, dm) in
                   enumerate(zip(analysis.attn_ppl, d_attn, analysis.mlp_ppl, d_mlp))]})


def _group_rows(table: GroupTable, selected, rows=None):
    cols = [table.layer.tolist(), table.kind.tolist(), table.index.tolist(),
            table.importance.tolist(), table.cost.tolist(), table.delta.tolist(),
            table.score.tolist(), selected.tolist()]
    for i in (range(len(table)) if rows is None else rows):
        yield [cols[0][i], KIND_NAMES[cols[1][i]], cols[2][i], f"{cols[3][i]:.6g}", cols[4][i],
               f"{cols[5][i]:.6g}", f"{cols[6][i]:.6g}", int(cols[7][i])]


def write_group_tables(folder: Path, table: GroupTable, selection: Selection) -> None:
    """Every group (``global_group_table.csv``) and the removed ones (``groups_to_prune.csv``).

    In ``groups_to_prune.csv`` the last column says why: ``score`` (chosen by the global
    ranking) or ``collapse`` (its layer fell below ε and went whole).
    """
    selected = selection.selected
    write_csv(folder / "global_group_table.csv", GROUP_COLUMNS, _group_rows(table, selected))
    collapsed = set(selection.collapsed_layers)
    chosen = selected.nonzero().flatten().tolist()
    order = sorted(chosen, key=lambda i: float(table.score[i]))
    rows = (row[:-1] + ["collapse" if row[0] in collapsed else "score"]
            for row in _group_rows(table, selected, order))
    write_csv(folder / "groups_to_prune.csv", GROUP_COLUMNS[:-1] + ["reason"], rows)


LAYER_COLUMNS = ["layer", "kv_heads_before", "kv_heads_after", "q_heads_before", "q_heads_after",
                 "channels_before", "channels_after", "attn_removed", "mlp_removed",
                 "layer_removed", "collapsed", "mode", "params_before", "params_after"]


def layer_summary(plan: PruningPlan, gqa_ratio: int, info: ScoreInfo, selection: Selection,
                  layer_params: list[tuple[int, int]]) -> list[dict]:
    """One dict per base layer: sizes before and after, what was removed, and why."""
    collapsed = set(selection.collapsed_layers)
    rows = []
    for lp, mode, (before, after) in zip(plan.layers, info.modes, layer_params):
        rows.append({
            "layer": lp.index,
            "kv_heads_before": plan.num_kv_heads, "kv_heads_after": len(lp.kept_kv_heads),
            "q_heads_before": plan.num_kv_heads * gqa_ratio,
            "q_heads_after": len(lp.kept_kv_heads) * gqa_ratio,
            "channels_before": plan.intermediate_size, "channels_after": len(lp.kept_channels),
            "attn_removed": lp.attn_removed, "mlp_removed": lp.mlp_removed,
            "layer_removed": lp.removed, "collapsed": lp.index in collapsed, "mode": mode,
            "params_before": before, "params_after": after,
        })
    return rows


def write_layer_summary(folder: Path, rows: list[dict]) -> None:
    write_csv(folder / "layer_summary.csv", LAYER_COLUMNS,
              ([r[c] for c in LAYER_COLUMNS] for r in rows))
