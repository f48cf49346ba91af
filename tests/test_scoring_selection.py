"""H-GSP scores (DESIGN.md §5) and global selection with collapse (§6), checked against
naive re-implementations, brute force on small instances, and a 70B-sized table."""

from __future__ import annotations

import itertools
import math
import random
import time

import numpy as np
import pytest
import torch

from conftest import tiny_model
from hgsp.adapters import adapter_for
from hgsp.config import PruneConfig
from hgsp.scoring import ATTN, MLP, MODE_BLOCK, MODE_LAYER, MODE_NONE, hgsp_scores, layout, \
    normalized_density, shapley_block_deltas
from hgsp.selection import FixedCosts, greedy_knapsack, prunable_params, select

# ---------------------------------------------------------------------------------------------
# layout + hgsp_scores
# ---------------------------------------------------------------------------------------------

L, NKV, M = 6, 2, 5
ATTN_COST, MLP_COST = 7, 3


@pytest.fixture
def importances():
    g = torch.Generator().manual_seed(0)
    return torch.rand(L, NKV, generator=g) * 10, torch.rand(L, M, generator=g)


@pytest.fixture
def deltas():
    # Δ_layer has distinct values so that the 25th percentile splits the layers.
    layer = torch.tensor([0.5, 9.0, 3.0, 0.1, 4.0, 12.0], dtype=torch.float64)
    attn = torch.tensor([0.2, 1.0, 0.7, 0.05, 2.0, 0.3], dtype=torch.float64)
    mlp = torch.tensor([0.4, 5.0, 0.9, 0.02, 1.5, 6.0], dtype=torch.float64)
    return layer, attn, mlp


def test_layout_order_and_base_score(importances):
    attn, mlp = importances
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    assert len(t) == L * (NKV + M)
    row = 0
    for l in range(L):  # layer by layer, attention groups before MLP channels
        for kind, n, imp, cost in ((ATTN, NKV, attn, ATTN_COST), (MLP, M, mlp, MLP_COST)):
            for i in range(n):
                assert (int(t.layer[row]), int(t.kind[row]), int(t.index[row])) == (l, kind, i)
                assert int(t.cost[row]) == cost
                assert float(t.importance[row]) == float(imp[l, i])
                assert float(t.score[row]) == float(imp[l, i].double()) / cost  # S0 = I / cost
                assert float(t.delta[row]) == 0.0
                row += 1


def _expected_scores(attn, mlp, d_layer, d_attn, d_mlp, tau, temperature):
    """Naive §5: per layer, per group, with math.log."""
    scores, used = [], []
    for l in range(L):
        for kind, n, imp, cost in ((ATTN, NKV, attn, ATTN_COST), (MLP, M, mlp, MLP_COST)):
            for i in range(n):
                if d_layer[l] < tau:  # Layer-Dominant
                    d = d_layer[l]
                else:  # Block-Dominant
                    d = d_attn[l] if kind == ATTN else d_mlp[l]
                d = max(float(d), 0.0)
                used.append(d)
                scores.append(float(imp[l, i]) / cost * math.log(1 + d) ** temperature)
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(used, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_hgsp_scores_with_explicit_tau(importances, deltas, temperature):
    attn, mlp = importances
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    tau = 3.0  # layers 0 (0.5) and 3 (0.1) are Layer-Dominant; 2 (Δ = 3.0 = τ) is Block
    info = hgsp_scores(t, temperature, *deltas, tau=tau)
    assert info.tau == tau and info.temperature == temperature
    assert info.modes == [MODE_LAYER, MODE_BLOCK, MODE_BLOCK, MODE_LAYER, MODE_BLOCK, MODE_BLOCK]
    exp_score, exp_delta = _expected_scores(attn, mlp, *deltas, tau, temperature)
    torch.testing.assert_close(t.delta, exp_delta, rtol=0, atol=0)
    torch.testing.assert_close(t.score, exp_score, rtol=1e-12, atol=0)


def test_layer_dominant_uses_delta_layer_for_all_groups(importances, deltas):
    attn, mlp = importances
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    hgsp_scores(t, 1.0, *deltas, tau=3.0)
    d_layer, d_attn, d_mlp = deltas
    for l, dominant in ((0, "layer"), (1, "block"), (3, "layer"), (5, "block")):
        rows = t.layer == l
        if dominant == "layer":
            assert torch.all(t.delta[rows] == d_layer[l])
        else:
            assert torch.all(t.delta[rows & (t.kind == ATTN)] == d_attn[l])
            assert torch.all(t.delta[rows & (t.kind == MLP)] == d_mlp[l])


def test_temperature_zero_is_base_score_and_needs_no_deltas(importances):
    attn, mlp = importances
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    s0 = t.importance / t.cost
    info = hgsp_scores(t, 0.0)  # no deltas at all
    assert torch.equal(t.score, s0)
    assert torch.equal(t.delta, torch.zeros_like(t.delta))
    assert info.modes == [MODE_NONE] * L


def test_temperature_zero_ignores_deltas_even_when_given(importances, deltas):
    attn, mlp = importances
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    hgsp_scores(t, 0.0, *deltas)
    assert torch.equal(t.score, t.importance / t.cost)


def test_auto_tau_is_the_25th_percentile(importances, deltas):
    attn, mlp = importances
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    d_layer = deltas[0]
    info = hgsp_scores(t, 1.0, *deltas)  # tau=None
    tau = float(np.percentile(d_layer.numpy(), 25))
    assert info.tau == pytest.approx(tau, rel=1e-12)
    assert info.modes == [MODE_LAYER if d < tau else MODE_BLOCK for d in d_layer.tolist()]
    exp_score, _ = _expected_scores(attn, mlp, *deltas, tau, 1.0)
    torch.testing.assert_close(t.score, exp_score, rtol=1e-12, atol=0)


def test_tau_inf_all_layer_dominant_tau_zero_all_block(importances, deltas):
    attn, mlp = importances
    d_layer, d_attn, d_mlp = deltas
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    info = hgsp_scores(t, 1.0, *deltas, tau=float("inf"))
    assert info.modes == [MODE_LAYER] * L
    assert torch.equal(t.delta, d_layer[t.layer])
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    info = hgsp_scores(t, 1.0, *deltas, tau=0.0)
    assert info.modes == [MODE_BLOCK] * L
    assert torch.equal(t.delta, torch.where(t.kind == ATTN, d_attn[t.layer], d_mlp[t.layer]))


def test_negative_deltas_are_clamped(importances, deltas):
    attn, mlp = importances
    d_layer, d_attn, d_mlp = (d.clone() for d in deltas)
    d_layer[2], d_attn[1], d_mlp[4] = -0.3, -2.0, -0.01
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    info = hgsp_scores(t, 1.0, d_layer, d_attn, d_mlp, tau=3.0)
    assert torch.all(t.delta >= 0)
    assert torch.all(torch.isfinite(t.score)) and torch.all(t.score >= 0)
    exp_score, exp_delta = _expected_scores(attn, mlp, d_layer, d_attn, d_mlp, 3.0, 1.0)
    torch.testing.assert_close(t.delta, exp_delta, rtol=0, atol=0)
    torch.testing.assert_close(t.score, exp_score, rtol=1e-12, atol=0)
    # layer 2 (Δ_layer clamped to 0 < τ) is Layer-Dominant, its score is 0 (ln 1 = 0)
    assert info.modes[2] == MODE_LAYER
    assert torch.all(t.score[t.layer == 2] == 0)
    # the automatic τ sees the clamped values
    t2 = layout(attn, mlp, ATTN_COST, MLP_COST)
    info2 = hgsp_scores(t2, 1.0, d_layer, d_attn, d_mlp)
    assert info2.tau == pytest.approx(float(np.percentile(d_layer.clamp(min=0).numpy(), 25)))


# ---------------------------------------------------------------------------------------------
# greedy_knapsack
# ---------------------------------------------------------------------------------------------


def _naive_greedy(score, cost, budget):
    """The literal §6 algorithm: sort by score ascending (stable), take each item that fits."""
    order = sorted(range(len(score)), key=lambda i: score[i])  # Python's sort is stable
    chosen, used = set(), 0
    for i in order:
        if used + cost[i] <= budget:
            chosen.add(i)
            used += cost[i]
    return chosen


def _instances(n_instances=120, seed=0):
    rng = random.Random(seed)
    for _ in range(n_instances):
        n = rng.randint(10, 12)
        costs = rng.sample([1, 2, 3, 5, 7, 11], rng.choice([2, 3]))
        cost = [rng.choice(costs) for _ in range(n)]
        # Small integer scores: plenty of ties, so the stable order matters.
        score = [float(rng.randint(0, 5)) for _ in range(n)]
        budget = rng.randint(0, sum(cost) + 3)
        yield score, cost, budget


def test_greedy_knapsack_against_naive_and_brute_force():
    for score, cost, budget in _instances():
        sel = greedy_knapsack(torch.tensor(score, dtype=torch.float64),
                              torch.tensor(cost, dtype=torch.long), budget)
        assert sel.dtype == torch.bool and sel.numel() == len(score)
        chosen = set(torch.nonzero(sel).flatten().tolist())
        used = sum(cost[i] for i in chosen)
        assert used <= budget  # (a) fits
        assert chosen == _naive_greedy(score, cost, budget), (score, cost, budget)  # (b)
        leftover = budget - used
        # maximal: no unselected item fits in what is left
        assert all(cost[i] > leftover for i in range(len(score)) if i not in chosen)
        if sum(cost) >= budget:  # (c) within one item's cost of the budget
            assert leftover < max(cost)
        else:
            assert len(chosen) == len(score)
        # brute force: the only feasible superset of the greedy selection is itself
        others = [i for i in range(len(score)) if i not in chosen]
        for k in range(1, len(others) + 1):
            for extra in itertools.combinations(others, k):
                assert used + sum(cost[i] for i in extra) > budget


def test_greedy_knapsack_edges():
    score = torch.tensor([3.0, 1.0, 2.0])
    cost = torch.tensor([4, 4, 4])
    assert not greedy_knapsack(score, cost, 0).any()
    assert not greedy_knapsack(score, cost, 3).any()
    assert greedy_knapsack(score, cost, 4).tolist() == [False, True, False]
    assert greedy_knapsack(score, cost, 8).tolist() == [False, True, True]
    assert greedy_knapsack(score, cost, 12).all()
    assert greedy_knapsack(score, cost, 100).all()
    # skip an overshooting group and continue with a smaller one
    sel = greedy_knapsack(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5, 10, 3]), 9)
    assert sel.tolist() == [True, False, True]


# ---------------------------------------------------------------------------------------------
# select with collapse
# ---------------------------------------------------------------------------------------------

C_ATTN, C_MLP = 10, 3
FIXED = FixedCosts(attn=2, mlp=1)
N_LAYERS, N_KV, N_CH = 5, 2, 6
LAYER_TOTAL = N_KV * C_ATTN + N_CH * C_MLP + FIXED.attn + FIXED.mlp  # 41


def _collapse_table():
    """Layer 2 is nearly worthless except for MLP channel 5; other layers' attention groups are
    precious and their MLP channels have distinct middling scores."""
    g = torch.Generator().manual_seed(3)
    attn = 50 * C_ATTN + torch.rand(N_LAYERS, N_KV, generator=g)  # scores ~50
    mlp = C_MLP * (1 + torch.rand(N_LAYERS, N_CH, generator=g))  # scores in (1, 2)
    attn[2] = 1e-3 * C_ATTN
    mlp[2] = 1e-3 * C_MLP
    mlp[2, 5] = 100 * C_MLP  # the one group of layer 2 that greedy keeps
    return layout(attn, mlp, C_ATTN, C_MLP)


def _recount(table, selected):
    """Removed parameters: selected groups plus the fixed part of every wholly selected block."""
    removed = int(table.cost[selected].sum())
    for l in range(int(table.layer.max()) + 1):
        for kind, fixed in ((ATTN, FIXED.attn), (MLP, FIXED.mlp)):
            rows = (table.layer == l) & (table.kind == kind)
            if bool(selected[rows].all()):
                removed += fixed
    return removed


def test_collapse_removes_the_layer_and_gives_back_the_overshoot():
    t = _collapse_table()
    # Greedy: layer 2 minus channel 5 (2*10 + 5*3 = 35), then the 7 cheapest other channels
    # (21) = 56 <= 57; nothing else fits in the last 1.
    budget = 57
    greedy = greedy_knapsack(t.score, t.cost, budget)
    in2 = t.layer == 2
    assert int(greedy[in2].sum()) == N_KV + N_CH - 1 and not greedy[in2 & (t.index == 5)
                                                                   & (t.kind == MLP)].any()
    # precondition: layer 2 keeps channel 5 + its MLP fixed part: 4 / 41 < 0.15
    retained = (LAYER_TOTAL - (_recount(t, greedy & in2))) / LAYER_TOTAL
    assert retained < 0.15

    sel = select(t, budget, FIXED, epsilon=0.15)
    assert sel.collapsed_layers == [2]
    assert bool(sel.selected[in2].all())
    assert sel.attn_removed[2] and sel.mlp_removed[2] and sel.layers_removed[2]
    assert sel.layers_removed == [l == 2 for l in range(N_LAYERS)]
    assert sel.removed_params == _recount(t, sel.selected)
    # After collapse: 56 + attn fixed 2 + channel 5 (3) + MLP fixed 1 = 62, 5 over budget; one
    # channel (3) is given back: 59.
    assert sel.removed_params >= budget
    assert sel.removed_params - budget < C_MLP + FIXED.attn + FIXED.mlp
    assert sel.removed_params == 59
    # The given-back groups are the highest-scoring ones selected outside the collapsed layer.
    before = greedy & ~in2
    given_back = before & ~sel.selected
    kept = before & sel.selected
    assert int(given_back.sum()) == 1
    assert not (sel.selected & ~greedy & ~in2).any()  # nothing new selected elsewhere
    assert float(t.score[given_back].min()) > float(t.score[kept].max())


def test_no_collapse_with_epsilon_zero_and_fixed_costs_counted():
    t = _collapse_table()
    budget = 57
    greedy = greedy_knapsack(t.score, t.cost, budget)
    sel = select(t, budget, FIXED, epsilon=0.0)
    assert sel.collapsed_layers == []
    assert torch.equal(sel.selected, greedy)  # overshoot 1 (attn fixed 2 - leftover 1) < 3
    assert sel.attn_removed[2] and not sel.mlp_removed[2] and not sel.layers_removed[2]
    assert sel.attn_removed == [l == 2 for l in range(N_LAYERS)]
    # 56 from groups + the fixed part of layer 2's wholly removed attention block
    assert sel.removed_params == 56 + FIXED.attn == _recount(t, sel.selected)


def _random_tables(n=60, eps_seed=7):
    rng = torch.Generator().manual_seed(eps_seed)
    for trial in range(n):
        attn = torch.rand(N_LAYERS, N_KV, generator=rng) * C_ATTN
        mlp = torch.rand(N_LAYERS, N_CH, generator=rng) * C_MLP
        # a few weak layers, to make collapse (and wholly removed layers) likely
        weak = torch.rand(N_LAYERS, generator=rng) < 0.4
        attn[weak] *= 0.05
        mlp[weak] *= 0.05
        t = layout(attn, mlp, C_ATTN, C_MLP)
        budget = int(torch.randint(0, N_LAYERS * LAYER_TOTAL, (1,), generator=rng))
        yield trial, t, budget


def test_select_accounting_on_random_tables():
    """Random small tables: the accounting is exact, collapsed layers are wholly selected, and
    the budget is met (within one group's cost without collapse, at or above it with)."""
    for trial, t, budget in _random_tables():
        sel = select(t, budget, FIXED, epsilon=0.3)
        assert sel.removed_params == _recount(t, sel.selected), trial
        for l in sel.collapsed_layers:
            assert bool(sel.selected[t.layer == l].all()), trial
            assert sel.layers_removed[l], trial
        assert sel.removed_params > budget - C_ATTN, trial
        if sel.collapsed_layers:
            assert sel.removed_params >= budget, trial
        # collapse never takes more than the budget can give back (DESIGN.md §6)
        assert sel.removed_params < budget + C_ATTN + FIXED.attn + FIXED.mlp, trial
        blocks = [(sel.attn_removed[l], sel.mlp_removed[l]) for l in range(N_LAYERS)]
        for l, (a, m) in enumerate(blocks):
            rows = t.layer == l
            assert a == bool(sel.selected[rows & (t.kind == ATTN)].all()), trial
            assert m == bool(sel.selected[rows & (t.kind == MLP)].all()), trial


def test_no_layer_is_left_below_epsilon_after_fixed_cost_give_back():
    # Layers 0 and 1 are worthless; layer 0's channel 5 is the highest-scoring of their groups.
    attn = torch.full((3, N_KV), 50.0 * C_ATTN)
    mlp = torch.full((3, N_CH), 50.0 * C_MLP)
    attn[:2] = 1e-3 * C_ATTN
    mlp[:2] = 1e-3 * C_MLP
    mlp[0, 5] = 2e-3 * C_MLP
    t = layout(attn, mlp, C_ATTN, C_MLP)
    budget = 2 * (N_KV * C_ATTN + N_CH * C_MLP)  # 76: exactly the groups of layers 0 and 1
    # Greedy takes layers 0 and 1 whole; their fixed parts (2 * 3) overshoot the budget by 6,
    # and giving back layer 0's channel 5 (3 + its MLP fixed 1) leaves layer 0 at 4/41 < 0.15.
    sel = select(t, budget, FIXED, epsilon=0.15)
    assert sel.removed_params >= budget
    for l in range(3):
        removed = _recount(t, sel.selected & (t.layer == l))
        assert sel.layers_removed[l] or (LAYER_TOTAL - removed) / LAYER_TOTAL >= 0.15, \
            (l, removed, sel.collapsed_layers)


def test_no_layer_is_left_below_epsilon_on_random_tables():
    """Only a layer the budget could not take whole stays below ε, and it is reported."""
    eps = 0.3
    reported = 0
    for trial, t, budget in _random_tables():
        sel = select(t, budget, FIXED, epsilon=eps)
        whole = sum(sel.layers_removed) * LAYER_TOTAL
        for l in range(N_LAYERS):
            removed = _recount(t, sel.selected & (t.layer == l))
            if not sel.layers_removed[l] and (LAYER_TOTAL - removed) / LAYER_TOTAL < eps:
                assert l in sel.kept_below_epsilon, (trial, l)
                assert whole + LAYER_TOTAL > budget + C_ATTN, (trial, l)
        for l in sel.kept_below_epsilon:
            assert not sel.layers_removed[l], (trial, l)
        reported += bool(sel.kept_below_epsilon)
    assert reported > 0  # the tables reach the case where the budget wins


# ---------------------------------------------------------------------------------------------
# prunable_params and scale
# ---------------------------------------------------------------------------------------------


def test_prunable_params_is_every_decoder_layer_parameter(arch):
    model = tiny_model(arch)
    adapter = adapter_for(model.config)
    d = adapter.dims()
    t = layout(torch.zeros(d.num_layers, d.num_kv_heads), torch.zeros(d.num_layers, d.intermediate),
               adapter.attn_group_cost(), adapter.mlp_channel_cost())
    fixed = FixedCosts(adapter.attn_fixed_cost(), adapter.mlp_fixed_cost())
    expected = sum(p.numel() for p in model.model.layers.parameters())
    assert prunable_params(t, fixed) == expected
    # and per block: one layer's attention + MLP parameters
    layer = model.model.layers[0]
    attn_params = sum(p.numel() for p in layer.self_attn.parameters()) \
        + layer.input_layernorm.weight.numel()
    mlp_params = sum(p.numel() for p in layer.mlp.parameters()) \
        + layer.post_attention_layernorm.weight.numel()
    assert attn_params == d.num_kv_heads * adapter.attn_group_cost() + fixed.attn
    assert mlp_params == d.intermediate * adapter.mlp_channel_cost() + fixed.mlp


def test_select_scales_to_llama3_70b():
    n_layers, n_kv, n_ch = 80, 8, 28672
    hidden, head_dim, ratio = 8192, 128, 8
    attn_cost = hidden * head_dim * (2 * ratio + 2)
    mlp_cost = 3 * hidden
    fixed = FixedCosts(attn=hidden, mlp=hidden)
    g = torch.Generator().manual_seed(0)
    # importances proportional to cost so that attention groups and channels interleave
    attn = torch.rand(n_layers, n_kv, generator=g) * attn_cost
    mlp = torch.rand(n_layers, n_ch, generator=g) * mlp_cost
    d_layer = torch.rand(n_layers, generator=g, dtype=torch.float64) * 10
    d_attn = torch.rand(n_layers, generator=g, dtype=torch.float64)
    d_mlp = torch.rand(n_layers, generator=g, dtype=torch.float64)

    start = time.perf_counter()
    t = layout(attn, mlp, attn_cost, mlp_cost)
    hgsp_scores(t, 1.0, d_layer, d_attn, d_mlp)
    total = prunable_params(t, fixed)
    budget = total // 2
    sel = select(t, budget, fixed, epsilon=0.15)
    elapsed = time.perf_counter() - start
    print(f"70B-shaped table: {len(t)} groups, layout+score+select {elapsed:.2f} s")

    assert len(t) == n_layers * (n_kv + n_ch) == 2_294_400
    assert total == n_layers * (n_kv * attn_cost + n_ch * mlp_cost + 2 * hidden)
    assert elapsed < 20
    assert abs(sel.removed_params - budget) <= attn_cost
    assert sel.removed_params == int(t.cost[sel.selected].sum()) + sum(
        hidden * (a + m) for a, m in zip(sel.attn_removed, sel.mlp_removed))


def test_tau_quantile_moves_the_automatic_threshold(importances, deltas):
    attn, mlp = importances
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    info = hgsp_scores(t, 1.0, *deltas, tau_quantile=0.75)
    assert info.tau == pytest.approx(float(np.percentile(deltas[0].numpy(), 75)), rel=1e-12)


def test_block_floor_lifts_block_deltas_to_tau(importances, deltas):
    attn, mlp = importances
    d_layer, d_attn, d_mlp = deltas
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    info = hgsp_scores(t, 1.0, *deltas, tau=3.0, block_floor=True)
    block = torch.tensor([m == MODE_BLOCK for m in info.modes])
    expected = torch.where(t.kind == ATTN, d_attn[t.layer], d_mlp[t.layer]).double().clamp(min=3.0)
    expected = torch.where(block[t.layer], expected, d_layer[t.layer].double())
    torch.testing.assert_close(t.delta, expected)
    assert torch.all(t.delta[block[t.layer]] >= 3.0)
    # tau = inf has no Block-Dominant layer, so the floor changes nothing
    t2 = layout(attn, mlp, ATTN_COST, MLP_COST)
    hgsp_scores(t2, 1.0, *deltas, tau=float("inf"), block_floor=True)
    torch.testing.assert_close(t2.delta, d_layer[t2.layer].double())


def test_collapse_only_where_allowed():
    # two layers, each: 1 attention group (cost 10) + 4 channels (cost 1); a budget that
    # thins layer 0 to 1 of 14 parameters, below ε = 0.15
    attn = torch.tensor([[1.0], [50.0]])
    mlp = torch.tensor([[0.1, 0.2, 0.3, 5.0], [40.0, 41.0, 42.0, 43.0]])
    fixed = FixedCosts(0, 0)
    t = layout(attn, mlp, 10, 1)
    everywhere = select(t, 13, fixed, 0.15)
    assert everywhere.collapsed_layers == [0]
    kept = select(t, 13, fixed, 0.15, collapsible=torch.tensor([False, True]))
    assert kept.collapsed_layers == []
    assert not kept.layers_removed[0] and kept.removed_params == 13


def test_importance_norm_divides_by_the_layer_or_block_density():
    # 2 layers, 1 KV group (cost 10) + 2 channels (cost 2) each.
    attn = torch.tensor([[4.0], [40.0]])
    mlp = torch.tensor([[1.0, 3.0], [10.0, 30.0]])
    table = layout(attn, mlp, attn_cost=10, mlp_cost=2)
    # layer density: (4 + 1 + 3) / 14 in layer 0, 10x that in layer 1: both normalize alike.
    layer = normalized_density(table, "layer")
    expected0 = torch.tensor([0.4, 0.5, 1.5], dtype=torch.float64) / (8 / 14)
    torch.testing.assert_close(layer[:3], expected0)
    torch.testing.assert_close(layer[3:], expected0)
    # block density: attention 0.4 (layer 0), MLP (1 + 3) / 4 = 1.
    block = normalized_density(table, "block")
    torch.testing.assert_close(block[:3], torch.tensor([1.0, 0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(normalized_density(table, "none"), table.importance / table.cost)


def test_importance_norm_leaves_ranking_across_layers_to_delta():
    attn = torch.tensor([[4.0], [40.0]])
    mlp = torch.tensor([[1.0, 3.0], [10.0, 30.0]])
    table = layout(attn, mlp, attn_cost=10, mlp_cost=2)
    d = torch.tensor([5.0, 1.0])
    hgsp_scores(table, 1.0, d, d, d, tau=math.inf, norm="layer")
    # Layer 1 has 10x the importance but the smaller Δ: its groups now rank below layer 0's.
    assert (table.score[3:] < table.score[:3]).all()
    hgsp_scores(table, 0.0, norm="layer")  # T = 0 stays the plain importance per parameter
    torch.testing.assert_close(table.score, table.importance / table.cost)


def test_shapley_block_deltas_by_hand():
    # layer 0: joint cost 10 > 1 + 3 → shares ½(1 + 10 − 3) = 4 and ½(3 + 10 − 1) = 6;
    # layer 1: the MLP alone (50) costs more than the whole layer (20): its share
    # ½(50 + 20 − 2) = 34 is below 50, and the attention's ½(2 + 20 − 50) < 0 is below 2,
    # so both keep what removing them alone measured.
    layer = torch.tensor([10.0, 20.0], dtype=torch.float64)
    attn = torch.tensor([1.0, 2.0], dtype=torch.float64)
    mlp = torch.tensor([3.0, 50.0], dtype=torch.float64)
    a, m = shapley_block_deltas(layer, attn, mlp)
    torch.testing.assert_close(a, torch.tensor([4.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(m, torch.tensor([6.0, 50.0], dtype=torch.float64))
    assert float(a[0] + m[0]) == 10.0  # the shares add up to Δ_layer


def test_shapley_option_scores_block_dominant_layers_only(importances, deltas):
    attn, mlp = importances
    d_layer, d_attn, d_mlp = deltas
    t = layout(attn, mlp, ATTN_COST, MLP_COST)
    info = hgsp_scores(t, 1.0, *deltas, tau=3.0, block_delta="shapley")
    block = torch.tensor([m == MODE_BLOCK for m in info.modes])
    s_attn, s_mlp = shapley_block_deltas(d_layer, d_attn, d_mlp)
    expected = torch.where(t.kind == ATTN, s_attn[t.layer], s_mlp[t.layer])
    expected = torch.where(block[t.layer], expected, d_layer[t.layer])
    torch.testing.assert_close(t.delta, expected)
    # layer 1 (Δ 9 ≥ τ): attention ½(1 + 9 − 5) = 2.5 instead of 1.0 alone
    assert float(t.delta[(t.layer == 1) & (t.kind == ATTN)][0]) == 2.5
    with pytest.raises(ValueError, match="unknown block delta"):
        hgsp_scores(layout(attn, mlp, ATTN_COST, MLP_COST), 1.0, *deltas, block_delta="sum")


@pytest.mark.parametrize("ratio, expected", [(0.1, "layer"), (0.2, "layer"), (0.3, "layer"),
                                             (0.31, "block"), (0.5, "block"), (0.8, "block")])
def test_auto_importance_norm_follows_the_pruning_ratio(ratio, expected):
    cfg = PruneConfig(base_model="m", output_name="o", pruning_ratio=ratio)
    assert cfg.importance_norm == "auto" and cfg.resolved_importance_norm == expected
    for given in ("block", "layer", "none"):  # an explicit choice is kept at every ratio
        explicit = PruneConfig(base_model="m", output_name="o", pruning_ratio=ratio,
                               importance_norm=given)
        assert explicit.resolved_importance_norm == given


def test_budget_wins_over_epsilon_and_the_thinned_layer_is_reported(caplog):
    """Layers 0 and 1 fall below a high ε, but removing both whole is more than the budget:
    the emptiest is removed whole, the other stays thinned, the budget is met within one
    group's cost, and the run names the layer and the fix."""
    from hgsp.methods import warn_kept_below_epsilon

    attn = torch.full((3, N_KV), 50.0 * C_ATTN)
    mlp = torch.full((3, N_CH), 50.0 * C_MLP)
    attn[:2] = 1e-3 * C_ATTN
    mlp[0] = 1.5e-3 * C_MLP
    mlp[1] = 2e-3 * C_MLP
    t = layout(attn, mlp, C_ATTN, C_MLP)
    # the ranking takes both attention blocks and four of layer 0's channels: layer 0 keeps
    # 7 of 41 parameters, layer 1 keeps 19 of 41, both below ε = 0.9
    budget = 2 * (N_KV * C_ATTN) + 4 * C_MLP  # 52
    assert LAYER_TOTAL < budget < 2 * LAYER_TOTAL - C_ATTN  # two are over by more than a group
    sel = select(t, budget, FIXED, epsilon=0.9)
    assert sel.collapsed_layers == [0] and sel.layers_removed[0]  # the emptier one
    assert sel.kept_below_epsilon == [1] and not sel.layers_removed[1]
    kept_1 = LAYER_TOTAL - _recount(t, sel.selected & (t.layer == 1))
    assert 0 < kept_1 / LAYER_TOTAL < 0.9
    assert budget <= sel.removed_params <= budget + C_ATTN + FIXED.attn  # a group and its block
    with caplog.at_level("WARNING", logger="hgsp.methods"):
        warn_kept_below_epsilon(sel, 0.9)
    assert "[1]" in caplog.text and "raise --pruning_ratio to remove them whole" in caplog.text
    caplog.clear()
    # a budget that holds both layers: both go whole, nothing is reported
    roomy = select(t, 2 * LAYER_TOTAL - C_ATTN, FIXED, epsilon=0.9)
    assert roomy.layers_removed[:2] == [True, True] and roomy.collapsed_layers
    assert roomy.kept_below_epsilon == []
    with caplog.at_level("WARNING", logger="hgsp.methods"):
        warn_kept_below_epsilon(roomy, 0.9)
    assert caplog.text == ""
