"""--round_to: MLP widths stay multiples of N and the budget is still met."""

from __future__ import annotations

import pytest
import torch

from hgsp.cli import main
from hgsp.rounding import chunk_mlp_channels
from hgsp.scoring import ATTN, MLP, hgsp_scores, layout
from hgsp.selection import FixedCosts, select

C_ATTN, C_MLP = 40, 6
FIXED = FixedCosts(attn=4, mlp=4)


def synthetic_table(n_layers=5, n_kv=3, channels=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(n_layers, n_kv, generator=g) * C_ATTN
    mlp = torch.rand(n_layers, channels, generator=g) * C_MLP
    table = layout(attn, mlp, C_ATTN, C_MLP)
    hgsp_scores(table, 0.0)
    return table


def test_chunks_bundle_lowest_scores_with_remainder_first():
    table = synthetic_table(n_layers=2, channels=10)
    chunking = chunk_mlp_channels(table, 4)  # 10 = 2 + 4 + 4 per layer
    t = chunking.table
    assert int((t.kind == ATTN).sum()) == 6 and int((t.kind == MLP).sum()) == 6
    for layer in range(2):
        rows = torch.nonzero((table.layer == layer) & (table.kind == MLP)).flatten()
        by_score = rows[torch.argsort(table.score[rows], stable=True)]
        chunk_of = chunking.row_to_chunk[by_score].tolist()
        sizes = [chunk_of.count(c) for c in dict.fromkeys(chunk_of)]
        assert sizes == [2, 4, 4]  # lowest scores in the first, smaller chunk
        assert chunk_of == sorted(chunk_of)
    assert int(t.cost.sum()) == int(table.cost.sum())
    assert float(t.importance.sum()) == pytest.approx(float(table.importance.sum()))


@pytest.mark.parametrize("n", [2, 4, 5, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_widths_are_multiples_and_budget_met(n, seed):
    table = synthetic_table(seed=seed)
    total = int(table.cost.sum()) + 5 * (FIXED.attn + FIXED.mlp)
    budget = int(0.45 * total)
    sel = select(table, budget, FIXED, epsilon=0.1, round_to=n)
    for layer in range(5):
        kept = int(((table.layer == layer) & (table.kind == MLP) & ~sel.selected).sum())
        assert kept % n == 0 or kept == 20, (layer, kept)
    assert abs(sel.removed_params - budget) <= n * C_MLP + FIXED.attn + FIXED.mlp


def test_round_to_one_is_plain_selection():
    table = synthetic_table()
    a = select(table, 300, FIXED, 0.1)
    b = select(table, 300, FIXED, 0.1, round_to=1)
    assert torch.equal(a.selected, b.selected)


def test_cli_round_to(tiny_model_dir, data_dir, tmp_path):
    import json

    args = ["prune", "--base_model", str(tiny_model_dir), "--output_name", "r",
            "--pruning_ratio", "0.3", "--data_dir", str(data_dir), "--results_dir",
            str(tmp_path), "--num_examples", "4", "--seq_len", "16", "--analysis_samples", "2",
            "--dataset", "c4", "--round_to", "8", "--epsilon", "0"]
    assert main(args) == 0
    plan = json.loads((tmp_path / "r" / "analysis" / "pruning_plan.json").read_text())
    for layer in plan["layers"]:
        assert len(layer["kept_channels"]) % 8 == 0
