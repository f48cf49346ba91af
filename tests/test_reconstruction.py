"""Refit of the narrowed output projections (``--refit_outputs``).

The ridge solution is checked against its defining properties (exact fit when the removed
inputs are linear in the kept ones, bias compensation in the strong-ridge limit, unchanged
output on the mean input), then on tiny models: the saved model gives the in-memory logits and
the refit reproduces the full block better than the bias alone on the calibration tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, assert_saved_logits_match, make_plan, tiny_model

from hgsp.adapters import adapter_for
from hgsp.baselines import compensation_bias
from hgsp.config import BEFORE_OPTION, PruneConfig
from hgsp.errors import UserError
from hgsp.reconstruction import _passes, collect_grams, refit_outputs, refit_projection
from hgsp.surgery import apply_plan, narrowed_blocks


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    return x.T @ x / len(x), x.mean(dim=0)


def test_refit_is_exact_when_removed_inputs_are_linear_in_kept_ones():
    torch.manual_seed(0)
    kept_x = torch.randn(400, 3) + 0.5
    # columns 3 and 4 are an affine function of the kept columns 0-2
    x = torch.cat([kept_x, kept_x @ torch.randn(3, 2) + 1.5], dim=1).double()
    weight = torch.randn(4, 5).double()
    gram, mean = _moments(x)
    a, b = refit_projection(weight, gram, mean, torch.arange(3), damp=1e-9)
    assert torch.allclose(x[:, :3] @ a.T + b, x @ weight.T, atol=1e-5)


def test_refit_keeps_output_at_the_mean_and_beats_bias_alone():
    torch.manual_seed(1)
    x = torch.randn(300, 6) @ torch.randn(6, 6) + torch.randn(6)
    weight = torch.randn(5, 6)
    gram, mean = _moments(x)
    kept = torch.tensor([0, 2, 5])
    a, b = refit_projection(weight, gram, mean, kept, damp=0.5)
    assert torch.allclose(a @ mean[kept].float() + b, weight @ mean.float(), atol=1e-4)
    bias = compensation_bias(weight, mean.float(), kept)
    err_refit = (x[:, kept] @ a.T + b - x @ weight.T).pow(2).mean()
    err_bias = (x[:, kept] @ weight[:, kept].T + bias - x @ weight.T).pow(2).mean()
    assert err_refit < 0.9 * err_bias


def test_strong_ridge_gives_bias_compensation():
    torch.manual_seed(2)
    x = torch.randn(200, 6) + 1.0
    weight = torch.randn(3, 6)
    gram, mean = _moments(x)
    kept = torch.tensor([1, 3])
    a, b = refit_projection(weight, gram, mean, kept, damp=1e9)
    assert torch.allclose(a, weight[:, kept], atol=1e-5)
    assert torch.allclose(b, compensation_bias(weight, mean.float(), kept), atol=1e-5)


def test_refit_rejects_non_positive_damp():
    with pytest.raises(ValueError, match="damp"):
        refit_projection(torch.eye(2), torch.eye(2), torch.zeros(2), torch.tensor([0]), 0.0)


def test_config_checks_damp_and_replays_old_configs_without_refit():
    with pytest.raises(UserError, match="--refit_damp"):
        PruneConfig(base_model="m", output_name="o", refit_damp=0.0).validate()
    assert BEFORE_OPTION["refit_outputs"] is False


def test_passes_respect_the_memory_budget():
    widths = {"a": 10, "b": 10, "c": 30}
    # 800 bytes per 10-wide Gram, 7,200 for the 30-wide one (alone, over budget)
    assert _passes(["a", "b", "c"], widths, 1600) == [["a", "b"], ["c"]]
    assert _passes(["a", "b", "c"], widths, 1000) == [["a"], ["b"], ["c"]]


def test_grams_in_several_passes_equal_one_pass(arch):
    model = tiny_model(arch)
    adapter = adapter_for(model.config)
    windows = torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(7))
    keys = [("attn", 0), ("mlp", 1), ("mlp", 3)]
    one = collect_grams(model, adapter, windows, 2, keys)
    several = collect_grams(model, adapter, windows, 2, keys, budget=1)
    assert set(one) == set(keys)
    for key in keys:
        assert torch.allclose(one[key], several[key], atol=1e-6)
    d = adapter.dims()
    assert one[("mlp", 1)].shape == (d.intermediate, d.intermediate)


def _mlp_inputs(model, layer, windows):
    seen = []
    handle = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda _m, inputs: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1])))
    with torch.no_grad():
        model(windows)
    handle.remove()
    return torch.cat(seen)


def test_refitted_model_saves_loads_and_fits_better_than_bias(arch, tmp_path):
    model = tiny_model(arch)
    adapter = adapter_for(model.config)
    plan = make_plan(arch, {0: ([1], list(range(0, 24, 3))), 2: ([], [1, 2, 3]), 3: ([0], [])})
    windows = torch.randint(3, VOCAB, (6, 12), generator=torch.Generator().manual_seed(8))
    x = _mlp_inputs(model, 0, windows)
    d = adapter.dims()
    attn_mean = torch.zeros(4, d.num_heads * d.head_dim)
    mlp_mean = torch.zeros(4, d.intermediate)
    mlp_mean[0] = x.double().mean(dim=0).float()
    weights, biases = refit_outputs(model, adapter, plan, windows, 3, attn_mean, mlp_mean, 0.1)
    blocks = narrowed_blocks(plan, d.gqa_ratio * d.head_dim)
    assert set(blocks) == {("attn", 0), ("mlp", 0), ("mlp", 2), ("attn", 3)}
    assert {(k, i) for i, e in weights.items() for k in e} == set(blocks)
    pruned = apply_plan(model, adapter, plan, biases, weights)

    full = model.model.layers[0].mlp.down_proj
    small = pruned.model.layers[0].mlp.down_proj
    kept = torch.tensor(plan.layers[0].kept_channels)
    bias = compensation_bias(full.weight, mlp_mean[0], kept)
    with torch.no_grad():
        target = full(x)
        err_refit = (small(x[:, kept]) - target).pow(2).mean()
        err_bias = (x[:, kept] @ full.weight[:, kept].T + bias + (full.bias if full.bias
                    is not None else 0) - target).pow(2).mean()
    assert err_refit < err_bias

    assert_saved_logits_match(pruned, tmp_path / "saved")


def test_apply_plan_refuses_a_refit_of_the_wrong_shape(arch):
    model = tiny_model(arch)
    adapter = adapter_for(model.config)
    plan = make_plan(arch, {1: ([0, 1], [0, 1, 2])})
    with pytest.raises(ValueError, match="refitted"):
        apply_plan(model, adapter, plan, None, {1: {"mlp": torch.zeros(32, 5)}})
