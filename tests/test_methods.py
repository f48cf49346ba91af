"""Baseline methods (LLM-Pruner, Wanda-sp, FLAP, ShortGPT) and bias compensation.

Metrics are checked against numbers computed by hand; each method is then run end to end on
tiny GQA models of every architecture: the budget is met as closely as its granularity
allows, and the saved model loads and gives the logits of the in-memory pruned model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import VOCAB, assert_saved_logits_match, make_plan, tiny_model, \
    write_tiny_model
from transformers import AutoModelForCausalLM

from hgsp.activations import collect_activation_stats
from hgsp.adapters import adapter_for
from hgsp.baselines import block_influence, compensation_bias, flap_scores, fluctuation, \
    standardize, token_cosine_sum, wanda_sp_scores
from hgsp.config import PruneConfig
from hgsp.errors import UserError
from hgsp.methods import llm_pruner_range, lowest, shortgpt_layers, uniform_counts, \
    wanda_sp_metrics
from hgsp.pipeline import prune
from hgsp.surgery import apply_plan, compensation_biases

FAST = dict(num_examples=4, seq_len=16, gradient_batch_size=2, analysis_samples=2,
            dataset="c4")


# ---- metrics against hand-computed cases -------------------------------------------------

def test_block_influence_hand_case():
    # token 1: same direction (cos 1); token 2: orthogonal (cos 0); token 3: opposite (cos -1)
    x_in = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    x_out = torch.tensor([[3.0, 0.0], [0.0, 5.0], [0.0, -1.0]])
    total = token_cosine_sum(x_in, x_out)
    assert total.item() == pytest.approx(0.0)
    assert block_influence(torch.tensor([total, 3.0]), 3).tolist() == pytest.approx([1.0, 0.0])


def test_block_influence_compares_the_models_hidden_states(arch):
    """As in ShortGPT's reference code: layer i compares hidden_states[i] and [i+1] of the
    transformers output, the last of which is after the final norm."""
    model = tiny_model(arch)
    adapter = adapter_for(model.config)
    windows = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    stats = collect_activation_stats(model, adapter, windows, batch_size=2)
    with torch.no_grad():
        hs = model(windows, output_hidden_states=True).hidden_states
    expected = torch.stack([token_cosine_sum(hs[i], hs[i + 1]) for i in range(len(hs) - 1)])
    assert torch.allclose(stats.cosine_sum, expected)


def test_fluctuation_hand_case():
    # inputs of 2 features over 3 tokens: feature 0 = 1, 2, 3 (var 1); feature 1 = 5, 5, 5
    x = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    weight = torch.tensor([[1.0, 2.0], [2.0, 0.0]])  # column norms^2: 5, 4
    assert fluctuation(x.var(dim=0), weight).tolist() == pytest.approx([5.0, 0.0])


def test_activation_variance_matches_torch(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = adapter_for(model.config)
    windows = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, inp: seen.append(inp[0].reshape(-1, inp[0].shape[-1]).double()))
    stats = collect_activation_stats(model, adapter, windows, batch_size=2)
    handle.remove()
    x = torch.cat(seen)
    assert stats.tokens == 30
    assert torch.allclose(stats.variance("mlp")[1], x.var(dim=0))
    assert torch.allclose(stats.mean("mlp")[1], x.mean(dim=0))
    assert ((stats.cosine_sum > -30) & (stats.cosine_sum < 30)).all()


def test_flap_scores_standardize_per_layer_and_average_groups():
    attn = torch.tensor([[1.0, 1.0, 2.0, 2.0], [0.0, 1.0, 0.0, 3.0]])  # 2 groups of width 2
    mlp = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    a, m = flap_scores(attn, mlp, group_width=2)
    sq = attn.double().pow(2)
    z = (sq - sq.mean(1, keepdim=True)) / sq.std(1, keepdim=True)
    assert torch.allclose(a, z.view(2, 2, 2).mean(2))
    # standardizing makes a layer's scale irrelevant: both MLP rows score alike
    assert torch.allclose(m[0], m[1]) and m[0].tolist() == pytest.approx([-1.0, 0.0, 1.0])
    z2 = standardize(torch.tensor([[2.0, 4.0]]))
    assert z2.tolist()[0] == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_wanda_sp_hand_case():
    weight = torch.tensor([[1.0, -2.0, 0.0, 4.0], [3.0, 2.0, 2.0, 0.0]])
    norm = torch.tensor([1.0, 0.5, 2.0, 1.0])
    # per column: mean |W| * norm = 2*1, 2*0.5, 1*2, 2*1 -> units of width 2: 3, 4
    assert wanda_sp_scores(weight, norm, 2).tolist() == pytest.approx([3.0, 4.0])


@pytest.mark.parametrize("sliding", [False, True])
def test_wanda_sp_scores_each_layer_after_the_earlier_layers_are_pruned(arch, sliding):
    """Layer 0 is scored on the full model; layer i on the model with layers 0..i-1 pruned as
    the scores chose, which is checked against that model built by surgery."""
    if sliding and arch not in ("qwen2", "qwen3"):
        pytest.skip("layer_types are uniform for this architecture")
    extra = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2) if sliding \
        else {}
    model = tiny_model(arch, **extra)
    adapter = adapter_for(model.config)
    d = adapter.dims()
    width = d.gqa_ratio * d.head_dim
    windows = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(windows[:1]).logits
    attn, mlp = wanda_sp_metrics(model, adapter, windows, 2, heads=1, channels=5)
    with torch.no_grad():  # hooks removed and layers restored
        assert torch.equal(model(windows[:1]).logits, before)

    def scores(m, layer):  # the Wanda-sp scores of one layer from its own input norms
        lay = adapter.layers(m)[layer]
        seen = {}
        hooks = [mod.register_forward_pre_hook(lambda _m, x, k=k: seen.setdefault(k, []).append(
            x[0].reshape(-1, x[0].shape[-1]))) for k, mod in
            (("attn", lay.self_attn.o_proj), ("mlp", lay.mlp.down_proj))]
        with torch.no_grad():
            m(windows)
        for h in hooks:
            h.remove()
        norm = {k: torch.cat(v).double().pow(2).sum(dim=0).sqrt() for k, v in seen.items()}
        return (wanda_sp_scores(lay.self_attn.o_proj.weight, norm["attn"], width),
                wanda_sp_scores(lay.mlp.down_proj.weight, norm["mlp"], 1))

    a0, m0 = scores(model, 0)
    assert torch.allclose(attn[0], a0) and torch.allclose(mlp[0], m0)
    for layer in range(1, d.num_layers):
        drops = {i: (lowest(attn[i], 1).tolist(), lowest(mlp[i], 5).tolist())
                 for i in range(layer)}
        pruned = apply_plan(model, adapter, make_plan(arch, drops))
        a, m = scores(pruned, layer)
        assert torch.allclose(attn[layer], a) and torch.allclose(mlp[layer], m), layer
        assert not torch.allclose(mlp[layer], scores(model, layer)[1])  # the pruning mattered


def test_compensation_bias_keeps_output_at_the_mean():
    torch.manual_seed(0)
    weight, mean = torch.randn(5, 6), torch.randn(6)
    kept = torch.tensor([0, 2, 5])
    b = compensation_bias(weight, mean, kept)
    assert torch.allclose(weight[:, kept] @ mean[kept] + b, weight @ mean, atol=1e-5)


# ---- selection rules --------------------------------------------------------------------

def test_llm_pruner_range_scales_with_depth():
    assert llm_pruner_range(32) == (4, 30)  # the paper's LLaMA-7B setting
    assert llm_pruner_range(30) == (4, 28)
    assert llm_pruner_range(80) == (10, 75)


class _Dims:
    num_kv_heads, intermediate = 4, 100


def test_uniform_counts_meet_the_budget():
    attn_cost, ch_cost, n = 50, 3, 10
    budget = n * 1 * attn_cost + n * 47 * ch_cost  # one group, 47 channels
    assert uniform_counts(_Dims, attn_cost, ch_cost, n, budget, 1) == (1, 47)
    heads, channels = uniform_counts(_Dims, attn_cost, ch_cost, n, budget, 8)
    assert heads == 1 and (_Dims.intermediate - channels) % 8 == 0 and abs(channels - 47) <= 4


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.45, 0.6, 0.8])
def test_uniform_counts_match_a_single_ratio_run(ratio):
    """The original tools remove int(r * groups) groups and r of the channels of every layer:
    at the size such a run has, the counts are that run's."""
    attn_cost, ch_cost, n = 50, 3, 10
    groups = int(ratio * _Dims.num_kv_heads)
    channels = round(ratio * _Dims.intermediate)
    budget = n * (groups * attn_cost + channels * ch_cost)
    assert uniform_counts(_Dims, attn_cost, ch_cost, n, budget, 1) == (groups, channels)


def test_uniform_counts_between_runs_take_the_nearest_group_count():
    # per layer, 0 groups reach at most 75, 1 group starts at 125 (50 + 25 channels * 3)
    attn_cost, ch_cost, n = 50, 3, 10
    assert uniform_counts(_Dims, attn_cost, ch_cost, n, n * 90, 1)[0] == 0
    assert uniform_counts(_Dims, attn_cost, ch_cost, n, n * 110, 1) == (1, 20)
    with pytest.raises(UserError, match="lower --pruning_ratio"):
        uniform_counts(_Dims, attn_cost, ch_cost, n, n * 500, 1)


def test_shortgpt_removes_lowest_influence_layers_closest_to_budget():
    bi = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.3])
    assert shortgpt_layers(bi, layer_params=100, budget=240) == [1, 3]
    assert shortgpt_layers(bi, layer_params=100, budget=260) == [1, 3, 4]
    assert shortgpt_layers(bi, layer_params=100, budget=10) == [3]  # at least one layer


# ---- end to end on tiny models -----------------------------------------------------------

def _run(model_dir, data_dir, results, method, ratio=0.3, **extra):
    cfg = PruneConfig(base_model=str(model_dir), output_name=f"{method}", pruning_ratio=ratio,
                      method=method, data_dir=str(data_dir), results_dir=str(results),
                      **FAST, **extra)
    return prune(cfg)


@pytest.mark.parametrize("method", ["llm_pruner", "wanda_sp", "flap", "shortgpt"])
def test_method_meets_budget_and_saved_model_matches(method, arch, data_dir, tmp_path):
    model_dir = write_tiny_model(tmp_path / "model", arch)
    result = _run(model_dir, data_dir, tmp_path / "results", method)
    params = result.summary["parameters"]
    assert result.summary["method"] == method
    # only FLAP compensates, whatever --bias_compensation says (it is an H-GSP option)
    assert result.summary["bias_compensation"] == (method == "flap")
    layer_params = params["base_decoder"] // 4
    # Whole layers (ShortGPT) reach the budget to within half a layer; width methods closer.
    slack = layer_params / 2 if method == "shortgpt" else 0.05 * params["target_removed"]
    assert abs(params["removed"] - params["target_removed"]) <= slack
    folder = result.results_dir / "models"
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert sum(p.numel() for p in loaded.parameters()) == params["pruned_total"]
    plan = json.loads((result.results_dir / "analysis" / "pruning_plan.json").read_text())
    assert plan["meta"]["method"] == method
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.isfinite(logits).all()
    if method == "shortgpt":
        for lp in plan["layers"]:  # each layer kept whole or removed whole
            sizes = (len(lp["kept_kv_heads"]), len(lp["kept_channels"]))
            assert sizes in ((0, 0), (plan["num_kv_heads"], plan["intermediate_size"]))
        assert result.summary["layers"]["removed"]
    if method in ("llm_pruner", "wanda_sp"):  # the same widths in every pruned layer
        start, stop = llm_pruner_range(4) if method == "llm_pruner" else (0, 4)
        widths = {len(lp["kept_channels"]) for lp in plan["layers"][start:stop]}
        assert len(widths) == 1


def test_saved_logits_equal_in_memory_pruned_model_with_compensation(arch, tmp_path):
    model = tiny_model(arch)
    adapter = adapter_for(model.config)
    plan = make_plan(arch, {0: ([1], list(range(0, 24, 3))), 2: ([], [1, 2, 3]), 3: ([0], [])})
    d = adapter.dims()
    torch.manual_seed(5)
    attn_mean = torch.randn(4, d.num_heads * d.head_dim)
    mlp_mean = torch.randn(4, d.intermediate)
    biases = compensation_biases(model, adapter, plan, attn_mean, mlp_mean)
    pruned = apply_plan(model, adapter, plan, biases)
    assert_saved_logits_match(pruned, tmp_path / "saved")


def test_compensated_mlp_output_unchanged_on_calibration_mean(arch):
    """The pruned down_proj (with its new bias) maps the mean input as the full one does."""
    model = tiny_model(arch)
    adapter = adapter_for(model.config)
    plan = make_plan(arch, {1: ([1], [0, 5, 7, 11])})
    d = adapter.dims()
    torch.manual_seed(6)
    attn_mean = torch.randn(4, d.num_heads * d.head_dim)
    mlp_mean = torch.randn(4, d.intermediate)
    pruned = apply_plan(model, adapter, plan,
                        compensation_biases(model, adapter, plan, attn_mean, mlp_mean))
    kept_ch = torch.tensor(plan.layers[1].kept_channels)
    full, small = model.model.layers[1].mlp.down_proj, pruned.model.layers[1].mlp.down_proj
    with torch.no_grad():
        assert torch.allclose(small(mlp_mean[1][kept_ch]), full(mlp_mean[1]), atol=1e-5)
        width = d.gqa_ratio * d.head_dim
        cols = torch.cat([torch.arange(h * width, (h + 1) * width)
                          for h in plan.layers[1].kept_kv_heads])
        o_full, o_small = model.model.layers[1].self_attn.o_proj, \
            pruned.model.layers[1].self_attn.o_proj
        assert torch.allclose(o_small(attn_mean[1][cols]), o_full(attn_mean[1]), atol=1e-5)


def test_hgsp_with_bias_compensation_meets_budget(tiny_model_dir, data_dir, tmp_path):
    result = _run(tiny_model_dir, data_dir, tmp_path, "hgsp", bias_compensation=True)
    params = result.summary["parameters"]
    assert result.summary["bias_compensation"] is True
    assert result.summary["refit_outputs"] is True  # the default
    assert abs(params["removed"] - params["target_removed"]) <= 0.02 * params["target_removed"]
    config = json.loads((result.results_dir / "models" / "config.json").read_text())
    assert any(any(flags) for flags in config["hgsp_out_biases"])
    assert math.isfinite(params["achieved_ratio_total"])


def test_refit_changes_only_the_kept_output_columns(tiny_model_dir, data_dir, tmp_path):
    """Same plan with and without --refit_outputs; only o_proj/down_proj weights and the
    compensation biases differ."""
    refit = _run(tiny_model_dir, data_dir, tmp_path / "a", "hgsp")
    bias = _run(tiny_model_dir, data_dir, tmp_path / "b", "hgsp", refit_outputs=False)
    assert bias.summary["refit_outputs"] is False
    assert refit.plan.layers == bias.plan.layers
    a = AutoModelForCausalLM.from_pretrained(refit.results_dir / "models",
                                             trust_remote_code=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(bias.results_dir / "models",
                                             trust_remote_code=True).state_dict()
    assert a.keys() == b.keys()
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ, "the refit changed nothing"
    assert all(k.endswith(("o_proj.weight", "down_proj.weight", "o_proj.bias",
                           "down_proj.bias")) for k in differ)


@pytest.mark.parametrize("ratio, norm", [(0.2, "layer"), (0.5, "block")])
def test_auto_importance_norm_prunes_as_the_resolved_norm(ratio, norm, tiny_model_dir, data_dir,
                                                          tmp_path):
    """The default picks per-layer normalization for light pruning and per-block for heavy;
    the run records which, and prunes exactly as that explicit choice would."""
    auto = _run(tiny_model_dir, data_dir, tmp_path / "auto", "hgsp", ratio=ratio)
    given = _run(tiny_model_dir, data_dir, tmp_path / "given", "hgsp", ratio=ratio,
                 importance_norm=norm)
    assert auto.summary["score"]["importance_norm"] == norm
    assert json.loads((auto.results_dir / "analysis" / "pruning_plan.json").read_text())[
        "meta"]["importance_norm"] == norm
    assert auto.plan.layers == given.plan.layers
    scores = {name: (tmp_path / name / "hgsp" / "analysis" / "global_group_table.csv")
              .read_text() for name in ("auto", "given")}
    assert scores["auto"] == scores["given"]
    other = _run(tiny_model_dir, data_dir, tmp_path / "other", "hgsp", ratio=ratio,
                 importance_norm="block" if norm == "layer" else "layer")
    assert other.summary["score"]["importance_norm"] != norm
    # the other normalization scores the groups differently, so the match is no coincidence
    assert (tmp_path / "other" / "hgsp" / "analysis" / "global_group_table.csv").read_text() \
        != scores["auto"]


def test_emptied_block_constant_is_its_output_on_the_calibration_mean(arch, tmp_path):
    """With ``emptied``, a block that loses every unit becomes a constant: the full block's
    output projection of the calibration mean (its bias included). A layer emptied whole stays
    as two constants; the saved model loads with the same logits."""
    model = tiny_model(arch)
    adapter = adapter_for(model.config)
    plan = make_plan(arch, {1: ([0, 1], [2]), 2: ([0, 1], list(range(24))),
                            3: ([0], list(range(24)))})
    d = adapter.dims()
    torch.manual_seed(7)
    attn_mean = torch.randn(4, d.num_heads * d.head_dim)
    mlp_mean = torch.randn(4, d.intermediate)
    biases = compensation_biases(model, adapter, plan, attn_mean, mlp_mean, emptied=True)
    pruned = apply_plan(model, adapter, plan, biases)
    assert pruned.config.hgsp_source_layers == [0, 1, 2, 3]
    assert pruned.config.hgsp_num_key_value_heads == [2, 0, 0, 1]
    assert pruned.config.hgsp_intermediate_sizes == [24, 23, 0, 0]
    layers, base = pruned.model.layers, model.model.layers
    x = torch.randn(1, 5, d.hidden)
    with torch.no_grad():
        for i in (1, 2):
            want = base[i].self_attn.o_proj(attn_mean[i])
            assert type(layers[i].self_attn).__name__ == "ConstantAttention"
            assert torch.allclose(layers[i].self_attn(x)[0], want.expand(1, 5, -1), atol=1e-5)
        for i in (2, 3):
            want = base[i].mlp.down_proj(mlp_mean[i])
            assert type(layers[i].mlp).__name__ == "ConstantMLP"
            assert torch.allclose(layers[i].mlp(x), want.expand(1, 5, -1), atol=1e-5)
    assert_saved_logits_match(pruned, tmp_path / "saved")
    # without ``emptied`` (H-GSP's compensation) the same plan drops the blocks and layer 2
    dropped = apply_plan(model, adapter, plan,
                         compensation_biases(model, adapter, plan, attn_mean, mlp_mean))
    assert dropped.config.hgsp_source_layers == [0, 1, 3]
    assert type(dropped.model.layers[1].self_attn).__name__ == "ZeroAttention"
    assert sum(p.numel() for p in pruned.parameters()) - \
        sum(p.numel() for p in dropped.parameters()) == 4 * d.hidden


def test_flap_keeps_emptied_blocks_as_constants_and_counts_them(caplog):
    """``--method flap`` gives emptied blocks their constant (and counts it in the budget);
    H-GSP with bias compensation drops them."""
    from hgsp.methods import Measurements, fixed_costs
    from hgsp.pipeline import bias_overhead, build_pruned
    from hgsp.scoring import GroupTable
    from hgsp.selection import selection_from_mask

    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    measured = Measurements(stats=collect_activation_stats(model, adapter, ids, 2))
    emptied = make_plan("llama", {1: ([0, 1], [2]), 3: ([0], list(range(24)))})
    flap = PruneConfig(base_model="-", output_name="-", method="flap")
    hgsp = PruneConfig(base_model="-", output_name="-", method="hgsp", refit_outputs=False)
    with caplog.at_level("INFO", logger="hgsp"):
        kept = build_pruned(model, adapter, emptied, flap, measured)
    assert "FLAP removed every unit of 2 block(s) (1.attn, 3.mlp)" in caplog.text
    assert type(kept.model.layers[1].self_attn).__name__ == "ConstantAttention"
    assert type(kept.model.layers[3].mlp).__name__ == "ConstantMLP"
    dropped = build_pruned(model, adapter, emptied, hgsp, measured)
    assert type(dropped.model.layers[1].self_attn).__name__ == "ZeroAttention"
    assert type(dropped.model.layers[3].mlp).__name__ == "ZeroMLP"
    # the budget counts one hidden-size vector per emptied block for FLAP only
    d = adapter.dims()
    n = d.num_layers
    kinds = [0] * d.num_kv_heads + [1] * d.intermediate
    rows = n * len(kinds)
    table = GroupTable(layer=torch.arange(n).repeat_interleave(len(kinds)),
                       kind=torch.tensor(kinds * n),
                       index=torch.cat([torch.arange(d.num_kv_heads),
                                        torch.arange(d.intermediate)]).repeat(n),
                       importance=torch.zeros(rows, dtype=torch.float64),
                       cost=torch.ones(rows, dtype=torch.long),
                       delta=torch.zeros(rows, dtype=torch.float64),
                       score=torch.zeros(rows, dtype=torch.float64))
    mask = (table.layer == 1) & (table.kind == 0)
    selection = selection_from_mask(table, fixed_costs(adapter), mask)
    assert bias_overhead(table, selection, adapter, constants=True) == d.hidden
    assert bias_overhead(table, selection, adapter) == 0


def test_emptied_block_constant_includes_the_projection_bias():
    """On a model whose o_proj / down_proj have biases, the constant is the whole projection
    of the mean input: weight times mean plus that bias."""
    model = tiny_model("llama", attention_bias=True, mlp_bias=True)
    adapter = adapter_for(model.config)
    plan = make_plan("llama", {0: ([0, 1], []), 2: ([], list(range(24)))})
    d = adapter.dims()
    torch.manual_seed(8)
    attn_mean = torch.randn(4, d.num_heads * d.head_dim)
    mlp_mean = torch.randn(4, d.intermediate)
    biases = compensation_biases(model, adapter, plan, attn_mean, mlp_mean, emptied=True)
    o_proj, down_proj = model.model.layers[0].self_attn.o_proj, model.model.layers[2].mlp.down_proj
    assert o_proj.bias is not None and down_proj.bias is not None
    with torch.no_grad():
        assert torch.allclose(biases[0]["attn"], o_proj(attn_mean[0]), atol=1e-5)
        assert torch.allclose(biases[2]["mlp"], down_proj(mlp_mean[2]), atol=1e-5)
        assert not torch.allclose(biases[0]["attn"], o_proj.weight @ attn_mean[0], atol=1e-5)


@pytest.mark.parametrize("method, constants", [("flap", True), ("hgsp", False)])
def test_budget_counts_constants_for_flap_only(method, constants, tiny_model_dir, data_dir,
                                               tmp_path, monkeypatch):
    import hgsp.pipeline as pipeline

    seen = []
    real = pipeline.bias_overhead

    def recording(*args, **kwargs):
        seen.append(kwargs.get("constants", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "bias_overhead", recording)
    _run(tiny_model_dir, data_dir, tmp_path, method, ratio=0.5)
    assert seen == [constants]


def test_a_plan_of_constants_only_still_builds_a_model():
    """FLAP may empty every block; its constants still make a model (H-GSP's plan would not)."""
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    plan = make_plan("llama", {i: ([0, 1], list(range(24))) for i in range(4)})
    d = adapter.dims()
    attn_mean, mlp_mean = torch.ones(4, d.num_heads * d.head_dim), torch.ones(4, d.intermediate)
    constants = compensation_biases(model, adapter, plan, attn_mean, mlp_mean, emptied=True)
    pruned = apply_plan(model, adapter, plan, constants)
    assert pruned.config.hgsp_source_layers == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="removes every layer"):
        apply_plan(model, adapter, plan,
                   compensation_biases(model, adapter, plan, attn_mean, mlp_mean))


def test_positional_kv_scoring_has_its_own_cached_importance(data_dir, tmp_path):
    """LLM-Pruner's folded scoring must not reuse (or overwrite) the shared scoring's cache."""
    model_dir = write_tiny_model(tmp_path / "model", "llama")

    def kept(name, **extra):
        result = _run(model_dir, data_dir, tmp_path / name, "llm_pruner", ratio=0.4, **extra)
        plan = json.loads((result.results_dir / "analysis" / "pruning_plan.json").read_text())
        return [lp["kept_kv_heads"] for lp in plan["layers"]], result.summary

    shared, _ = kept("shared")
    cached, summary = kept("cached", kv_group_scoring="positional")
    fresh, _ = kept("fresh", kv_group_scoring="positional", cache=False)
    assert cached == fresh
    assert kept("again")[0] == shared  # the shared entry is still the shared scoring's
    assert any(len(k) < 2 for k in fresh)  # groups are removed, so the scoring decides which
    assert fresh != shared  # on this model the fold changes the choice (layer 0): a cache
    # keyed without the scoring would have handed the positional runs the shared choice


def test_positional_kv_scoring_is_llm_pruners_only():
    cfg = PruneConfig(base_model="m", output_name="o", kv_group_scoring="positional")
    with pytest.raises(UserError, match="--method llm_pruner"):
        cfg.validate()
    PruneConfig(base_model="m", output_name="o", method="llm_pruner",
                kv_group_scoring="positional").validate()


def test_high_epsilon_keeps_to_the_budget_end_to_end(tiny_model_dir, data_dir, tmp_path, caplog):
    """ε=0.95 with every layer collapsible puts every touched layer below ε; the layers the
    budget cannot hold whole stay thinned, are named, and the ratio is met."""
    with caplog.at_level("WARNING", logger="hgsp"):
        result = _run(tiny_model_dir, data_dir, tmp_path, "hgsp", epsilon=0.95,
                      collapse_scope="all")
    params, layers = result.summary["parameters"], result.summary["layers"]
    layer_params = params["base_decoder"] // 4
    assert layers["removed"] and layers["kept_below_epsilon"]
    assert not set(layers["removed"]) & set(layers["kept_below_epsilon"])
    assert len(layers["removed"]) * layer_params <= params["target_removed"] + layer_params // 4
    assert abs(params["removed"] - params["target_removed"]) <= layer_params // 4
    rows = (result.results_dir / "analysis" / "layer_summary.csv").read_text().splitlines()
    for line in rows[1:]:
        cells = line.split(",")
        if int(cells[0]) in layers["kept_below_epsilon"]:
            assert 0 < int(cells[-1]) < 0.95 * int(cells[-2])
    assert f"layers {layers['kept_below_epsilon']} keep less than --epsilon 0.95" in caplog.text
