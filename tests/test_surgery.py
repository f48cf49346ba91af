"""Structural surgery (DESIGN.md §2, §6, §7): ``hgsp.surgery.apply_plan`` on tiny models.

Every test compares the physically pruned model with an independent reference built from the
*unpruned* base model (groups zeroed, blocks replaced by zero branches, layers skipped by a
hook, a no-cache greedy decode), so a slicing, renumbering or cache bug shows up as a
numerical mismatch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig

from conftest import make_plan, tiny_model
from hgsp.adapters import adapter_for
from hgsp.modeling_hgsp import PRUNED_CLASSES, ZeroAttention, ZeroMLP
from hgsp.plan import PruningPlan, uniform_plan
from hgsp.surgery import apply_plan

N_LAYERS, N_KV, GQA, HEAD_DIM, CHANNELS = 4, 2, 2, 8, 24
ATOL = 1e-5


# --------------------------------------------------------------------------- helpers

ALL_HEADS = list(range(N_KV))
ALL_CHANNELS = list(range(CHANNELS))

# Uneven widths: every layer differs, both KV heads lose a group somewhere, channels are
# dropped non-contiguously (first, last, strided) so an off-by-one or wrong axis shows.
UNEVEN_DROPS = {
    0: ([1], [0, 5, 23]),
    1: ([0], list(range(0, CHANNELS, 2))),
    2: ([], [7, 8, 9, 10, 11, 12]),
    3: ([0], [1, 22]),
}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def prune(base, plan: PruningPlan):
    return apply_plan(base, adapter_for(base.config), plan)


def zeroed_copy(base, drops):
    """A deep copy of ``base`` whose dropped groups have all their weights set to zero."""
    model = copy.deepcopy(base)
    q_rows, kv_rows = GQA * HEAD_DIM, HEAD_DIM
    with torch.no_grad():
        for layer, (heads, channels) in drops.items():
            attn = model.model.layers[layer].self_attn
            mlp = model.model.layers[layer].mlp
            for g in heads:
                q = slice(g * q_rows, (g + 1) * q_rows)  # query heads g*r .. g*r+r-1
                kv = slice(g * kv_rows, (g + 1) * kv_rows)
                attn.q_proj.weight[q] = 0
                attn.k_proj.weight[kv] = 0
                attn.v_proj.weight[kv] = 0
                for proj, rows in ((attn.q_proj, q), (attn.k_proj, kv), (attn.v_proj, kv)):
                    if proj.bias is not None:
                        proj.bias[rows] = 0
                attn.o_proj.weight[:, q] = 0
            for j in channels:
                mlp.gate_proj.weight[j] = 0
                mlp.up_proj.weight[j] = 0
                mlp.down_proj.weight[:, j] = 0
                for proj in (mlp.gate_proj, mlp.up_proj):
                    if proj.bias is not None:
                        proj.bias[j] = 0
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once


@pytest.fixture
def base(arch):
    return tiny_model(arch)


# --------------------------------------------------------------------------- 1. zero then remove

@pytest.mark.parametrize("drops", [
    UNEVEN_DROPS,
    {1: ([1], [3])},  # a single group and a single channel in one layer
    {0: ([0], []), 2: ([], ALL_CHANNELS[1:])},  # one channel left in a block
], ids=["uneven", "single", "one-channel-left"])
def test_zero_then_remove_matches(base, tokens, drops):
    plan = make_plan(base.config.model_type, drops)
    pruned = prune(base, plan)
    reference = zeroed_copy(base, drops)
    # the zeroed groups really matter: the reference differs from the base model
    assert not torch.allclose(logits(reference, tokens), logits(base, tokens), atol=1e-4)
    torch.testing.assert_close(logits(pruned, tokens), logits(reference, tokens),
                               atol=ATOL, rtol=1e-5)


def test_pruned_tensors_have_sliced_shapes(base):
    plan = make_plan(base.config.model_type, UNEVEN_DROPS)
    pruned = prune(base, plan)
    h = base.config.hidden_size
    for new, lp in enumerate(plan.kept_layers):
        attn, mlp = pruned.model.layers[new].self_attn, pruned.model.layers[new].mlp
        n_kv, m = len(lp.kept_kv_heads), len(lp.kept_channels)
        assert attn.q_proj.weight.shape == (n_kv * GQA * HEAD_DIM, h)
        assert attn.k_proj.weight.shape == (n_kv * HEAD_DIM, h)
        assert attn.v_proj.weight.shape == (n_kv * HEAD_DIM, h)
        assert attn.o_proj.weight.shape == (h, n_kv * GQA * HEAD_DIM)
        assert mlp.gate_proj.weight.shape == (m, h)
        assert mlp.up_proj.weight.shape == (m, h)
        assert mlp.down_proj.weight.shape == (h, m)
        # the kept rows are the base rows, in order
        src = base.model.layers[lp.index]
        g = lp.kept_kv_heads[-1]
        torch.testing.assert_close(attn.k_proj.weight[-HEAD_DIM:],
                                   src.self_attn.k_proj.weight[g * HEAD_DIM:(g + 1) * HEAD_DIM],
                                   atol=0, rtol=0)
        torch.testing.assert_close(mlp.down_proj.weight,
                                   src.mlp.down_proj.weight[:, lp.kept_channels], atol=0, rtol=0)


# --------------------------------------------------------------------------- 2. blocks and layers

def _skip_layer_hook(module, args, kwargs, output):
    return args[0] if args else kwargs["hidden_states"]


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_removed_attention_block_is_zero_branch(base, tokens, layer):
    plan = make_plan(base.config.model_type, {layer: (ALL_HEADS, [])})
    pruned = prune(base, plan)
    reference = copy.deepcopy(base)
    reference.model.layers[layer].self_attn = ZeroAttention()
    assert isinstance(pruned.model.layers[layer].self_attn, ZeroAttention)
    torch.testing.assert_close(logits(pruned, tokens), logits(reference, tokens),
                               atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_removed_mlp_block_is_zero_branch(base, tokens, layer):
    plan = make_plan(base.config.model_type, {layer: ([], ALL_CHANNELS)})
    pruned = prune(base, plan)
    reference = copy.deepcopy(base)
    reference.model.layers[layer].mlp = ZeroMLP()
    assert isinstance(pruned.model.layers[layer].mlp, ZeroMLP)
    torch.testing.assert_close(logits(pruned, tokens), logits(reference, tokens),
                               atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("removed", [[0], [3], [1, 2]], ids=["first", "last", "middle-two"])
def test_removed_layer_is_skipped(base, tokens, removed):
    plan = make_plan(base.config.model_type, {l: (ALL_HEADS, ALL_CHANNELS) for l in removed})
    pruned = prune(base, plan)
    assert len(pruned.model.layers) == N_LAYERS - len(removed)
    handles = [base.model.layers[l].register_forward_hook(_skip_layer_hook, with_kwargs=True)
               for l in removed]
    try:
        expected = logits(base, tokens)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(logits(pruned, tokens), expected, atol=ATOL, rtol=1e-5)


def test_mixed_removals_and_widths(base, tokens):
    """Layer 0 loses attention, layer 1 is gone, layer 2 loses its MLP, layer 3 is narrower."""
    arch = base.config.model_type
    plan = make_plan(arch, {0: (ALL_HEADS, [4]), 1: (ALL_HEADS, ALL_CHANNELS),
                            2: ([1], ALL_CHANNELS), 3: ([0], [0, 1, 2])})
    pruned = prune(base, plan)
    reference = zeroed_copy(base, {0: ([], [4]), 2: ([1], []), 3: ([0], [0, 1, 2])})
    reference.model.layers[0].self_attn = ZeroAttention()
    reference.model.layers[2].mlp = ZeroMLP()
    handle = reference.model.layers[1].register_forward_hook(_skip_layer_hook, with_kwargs=True)
    torch.testing.assert_close(logits(pruned, tokens), logits(reference, tokens),
                               atol=ATOL, rtol=1e-5)
    handle.remove()


# --------------------------------------------------------------------------- 3. parameter count

@pytest.mark.parametrize("drops", [
    UNEVEN_DROPS,
    {0: (ALL_HEADS, [1, 2]), 1: ([0], ALL_CHANNELS), 3: (ALL_HEADS, ALL_CHANNELS)},
], ids=["uneven", "blocks-and-layer"])
def test_parameter_count_matches_group_costs(base, drops):
    adapter = adapter_for(base.config)
    plan = make_plan(base.config.model_type, drops)
    expected = n_params(base)
    for lp in plan.layers:
        expected -= (N_KV - len(lp.kept_kv_heads)) * adapter.attn_group_cost()
        expected -= (CHANNELS - len(lp.kept_channels)) * adapter.mlp_channel_cost()
        if lp.attn_removed:
            expected -= adapter.attn_fixed_cost()
        if lp.mlp_removed:
            expected -= adapter.mlp_fixed_cost()
    assert n_params(prune(base, plan)) == expected


def test_group_costs_cover_a_whole_layer(base):
    """Independent check of the adapter costs: a layer = its groups plus the fixed costs."""
    adapter = adapter_for(base.config)
    layer_params = n_params(base.model.layers[0])
    assert layer_params == (N_KV * adapter.attn_group_cost() + adapter.attn_fixed_cost()
                            + CHANNELS * adapter.mlp_channel_cost() + adapter.mlp_fixed_cost())


# --------------------------------------------------------------------------- 4. model classes

def test_layer_only_plan_gives_stock_class(base, tokens):
    plan = make_plan(base.config.model_type, {1: (ALL_HEADS, ALL_CHANNELS),
                                              3: (ALL_HEADS, ALL_CHANNELS)})
    pruned = prune(base, plan)
    assert type(pruned) is type(base)
    assert not type(pruned).__name__.startswith("Hgsp")
    assert pruned.config.model_type == base.config.model_type
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    assert not hasattr(pruned.config, "hgsp_num_key_value_heads")
    assert not getattr(pruned.config, "auto_map", None)
    if getattr(pruned.config, "layer_types", None) is not None:
        assert len(pruned.config.layer_types) == 2


def test_uneven_plan_gives_hgsp_class(base):
    arch = base.config.model_type
    plan = make_plan(arch, {**UNEVEN_DROPS, 2: (ALL_HEADS, [7]), 1: (ALL_HEADS, ALL_CHANNELS)})
    pruned = prune(base, plan)
    config_cls, model_cls = PRUNED_CLASSES[arch]
    assert type(pruned) is model_cls and type(pruned).__name__.startswith("Hgsp")
    assert isinstance(pruned, type(base))
    assert isinstance(pruned.config, config_cls)
    assert pruned.config.model_type == f"hgsp_{arch}"
    assert pruned.config.num_hidden_layers == 3
    # kept layers 0, 2, 3
    assert pruned.config.hgsp_num_key_value_heads == [1, 0, 1]
    assert pruned.config.hgsp_intermediate_sizes == [21, 23, 22]
    assert pruned.config.hgsp_source_layers == [0, 2, 3]
    assert pruned.config.architectures == [model_cls.__name__]
    assert set(pruned.config.auto_map) >= {"AutoConfig", "AutoModelForCausalLM"}


# --------------------------------------------------------------------------- 5. generate + cache

GEN_PLANS = {
    "layer-removed": {1: (ALL_HEADS, ALL_CHANNELS)},
    "layer0-attn-removed": {0: (ALL_HEADS, [])},
    "mixed": {0: (ALL_HEADS, ALL_CHANNELS), 1: (ALL_HEADS, [2, 3]), 2: ([1], [5]),
              3: ([], ALL_CHANNELS)},
}
NEW_TOKENS = 6


def greedy_no_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        nxt = logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("plan_name", list(GEN_PLANS))
def test_generate_with_cache_matches_no_cache_greedy(base, tokens, plan_name):
    pruned = prune(base, make_plan(base.config.model_type, GEN_PLANS[plan_name]))
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                                  bos_token_id=1, use_cache=True)
    with torch.no_grad():
        out = pruned.generate(tokens, generation_config=gen_config,
                              attention_mask=torch.ones_like(tokens))
    expected = greedy_no_cache(pruned, tokens, NEW_TOKENS)
    assert out.shape == expected.shape
    assert torch.equal(out, expected), f"cached generate {out[:, -NEW_TOKENS:].tolist()} != " \
                                       f"no-cache greedy {expected[:, -NEW_TOKENS:].tolist()}"


def test_generate_left_padded_batch_after_attention_removal(base):
    """Padding makes generate() build real masks from the cache sizes (slot 0 must be used)."""
    pruned = prune(base, make_plan(base.config.model_type, GEN_PLANS["layer0-attn-removed"]))
    torch.manual_seed(3)
    long, short = torch.randint(3, 96, (1, 10)), torch.randint(3, 96, (1, 6))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = (torch.arange(10) >= torch.tensor([[0], [4]])).long()
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS,
                                  eos_token_id=None, pad_token_id=0, use_cache=True)
    with torch.no_grad():
        out = pruned.generate(ids, attention_mask=mask, generation_config=gen_config)
    assert torch.equal(out[0, 10:], greedy_no_cache(pruned, long, NEW_TOKENS)[0, 10:])
    assert torch.equal(out[1, 10:], greedy_no_cache(pruned, short, NEW_TOKENS)[0, 6:])


@pytest.mark.parametrize("plan_name", ["layer0-attn-removed", "mixed"])
def test_incremental_cache_logits_match_full_forward(base, tokens, plan_name):
    """Prefill + one step with the cache gives the logits of a full no-cache forward."""
    pruned = prune(base, make_plan(base.config.model_type, GEN_PLANS[plan_name]))
    full = logits(pruned, tokens)
    with torch.no_grad():
        pre = pruned(input_ids=tokens[:, :-3], use_cache=True)
        cache = pre.past_key_values
        assert cache.get_seq_length() == tokens.shape[1] - 3
        steps = [pre.logits]
        for t in range(tokens.shape[1] - 3, tokens.shape[1]):
            step = pruned(input_ids=tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------- 6. base untouched

@pytest.mark.parametrize("drops", [UNEVEN_DROPS, GEN_PLANS["mixed"]], ids=["uneven", "mixed"])
def test_base_model_unchanged(base, tokens, drops):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    before_config = base.config.to_dict()
    before_logits = logits(base, tokens)
    pruned = prune(base, make_plan(base.config.model_type, drops))
    after = base.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert base.config.to_dict() == before_config
    assert all(type(layer.self_attn).__name__ != "ZeroAttention" for layer in base.model.layers)
    assert len(base.model.layers) == N_LAYERS
    torch.testing.assert_close(logits(base, tokens), before_logits, atol=0, rtol=0)
    # the pruned model owns its tensors: changing it in place leaves the base alone
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(1.0)
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} shares storage with the pruned model"


def test_plan_for_other_depth_is_rejected(base):
    plan = uniform_plan(base.config.model_type, N_LAYERS + 1, N_KV, CHANNELS)
    with pytest.raises(ValueError, match="layers"):
        prune(base, plan)
    empty = make_plan(base.config.model_type, {l: (ALL_HEADS, ALL_CHANNELS)
                                               for l in range(N_LAYERS)})
    with pytest.raises(ValueError, match="every layer"):
        prune(base, empty)


@pytest.mark.parametrize("removed_attn", [
    None,  # controls: no attention removed, or removed after every sliding slot's type lines up
    3,
    0,
    1,
])
def test_generate_with_mixed_sliding_layers_after_attention_removal(arch, removed_attn):
    """Qwen2/Qwen3 with use_sliding_window: layers >= max_window_layers use a sliding window
    (4 tokens here, so the cached decode of 16 tokens really slides)."""
    if arch not in ("qwen2", "qwen3"):
        pytest.skip("layer_types are uniform for this architecture")
    base = tiny_model(arch, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert base.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    drops = {0: ([], [3])} if removed_attn is None else {removed_attn: (ALL_HEADS, [])}
    pruned = prune(base, make_plan(arch, drops))
    torch.manual_seed(4)
    ids = torch.randint(3, 96, (1, 10))
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS,
                                  eos_token_id=None, pad_token_id=0, use_cache=True)
    with torch.no_grad():
        out = pruned.generate(ids, generation_config=gen_config)
    assert torch.equal(out, greedy_no_cache(pruned, ids, NEW_TOKENS))
