"""Layer and block removal analysis (DESIGN.md §4) against naive full forwards of edited
copies of tiny models of every architecture."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import VOCAB, tiny_model
from hgsp.adapters import adapter_for
from hgsp.analysis import RemovalAnalysis, removal_analysis
from hgsp.modeling_hgsp import ZeroAttention, ZeroMLP


@pytest.fixture
def windows():
    torch.manual_seed(11)
    return torch.randint(3, VOCAB, (5, 10))  # batch_size 2: batches of 2, 2 and 1


@torch.no_grad()
def _ppl(model, windows):
    """exp(mean next-token CE) of one plain full forward over all windows at once."""
    loss = model(input_ids=windows, labels=windows, use_cache=False).loss
    return math.exp(float(loss))


def _without_layer(model, l):
    m = copy.deepcopy(model)
    del m.model.layers[l]
    m.config.num_hidden_layers -= 1
    if getattr(m.config, "layer_types", None) is not None:
        m.config.layer_types = [t for i, t in enumerate(m.config.layer_types) if i != l]
    return m


def _without_block(model, l, kind):
    m = copy.deepcopy(model)
    layer = m.model.layers[l]
    if kind == "attn":
        layer.self_attn = ZeroAttention()
    else:
        layer.mlp = ZeroMLP()
    return m


def test_removal_analysis_matches_naive_forwards(arch, windows):
    model = tiny_model(arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    layers = model.model.layers
    modules = list(layers)
    n_layers = model.config.num_hidden_layers
    layer_types = copy.copy(getattr(model.config, "layer_types", None))

    res = removal_analysis(model, adapter_for(model.config), windows, batch_size=2)

    assert res.seq_len == 10 and res.tokens == windows.numel()
    assert res.base_ppl == pytest.approx(_ppl(model, windows), rel=1e-4)
    for l in range(n_layers):
        assert res.layer_ppl[l] == pytest.approx(_ppl(_without_layer(model, l), windows),
                                                 rel=1e-4), ("layer", l)
        assert res.attn_ppl[l] == pytest.approx(_ppl(_without_block(model, l, "attn"), windows),
                                                rel=1e-4), ("attn", l)
        assert res.mlp_ppl[l] == pytest.approx(_ppl(_without_block(model, l, "mlp"), windows),
                                               rel=1e-4), ("mlp", l)
    # The variants differ from each other and from the base (the comparison can fail).
    assert len({round(v, 6) for v in res.layer_ppl + res.attn_ppl + res.mlp_ppl}) == 3 * n_layers

    # Nothing changed: same weights, same layer list and modules, same config.
    after = model.state_dict()
    assert after.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(after[k], v), k
    assert model.model.layers is layers and list(model.model.layers) == modules
    for layer in layers:
        assert not isinstance(layer.self_attn, ZeroAttention)
        assert not isinstance(layer.mlp, ZeroMLP)
    assert model.config.num_hidden_layers == n_layers
    assert getattr(model.config, "layer_types", None) == layer_types
    assert _ppl(model, windows) == pytest.approx(res.base_ppl, rel=1e-4)


def test_deltas_are_increments_clamped_at_zero():
    res = RemovalAnalysis(base_ppl=10.0, layer_ppl=[12.5, 9.0, 10.0], attn_ppl=[30.0, 9.99, 11.0],
                          mlp_ppl=[5.0, 10.25, 100.0], tokens=30, seq_len=10)
    expected = {"layer": [2.5, 0.0, 0.0], "attn": [20.0, 0.0, 1.0], "mlp": [0.0, 0.25, 90.0]}
    for kind, values in expected.items():
        d = res.deltas(kind)
        assert d.dtype == torch.float64
        assert d.tolist() == pytest.approx(values, abs=1e-12)
        assert torch.all(d >= 0)
    # in loss units: ln(P / P0), still clamped at zero
    assert res.deltas("layer", "loss").tolist() == pytest.approx([math.log(1.25), 0.0, 0.0])
    assert res.deltas("mlp", "loss")[2].item() == pytest.approx(math.log(10.0))


def test_deltas_of_a_real_analysis_are_non_negative(windows):
    model = tiny_model("llama")
    res = removal_analysis(model, adapter_for(model.config), windows, batch_size=5)
    for kind, values in (("layer", res.layer_ppl), ("attn", res.attn_ppl), ("mlp", res.mlp_ppl)):
        d = res.deltas(kind)
        assert torch.all(d >= 0)
        for v, dv in zip(values, d.tolist()):
            assert dv == pytest.approx(max(v - res.base_ppl, 0.0), abs=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_head_nll_matches_cross_entropy_across_vocabulary_slices(monkeypatch, bias):
    import hgsp.analysis as analysis

    monkeypatch.setattr(analysis, "VOCAB_CHUNK", 7)  # 50 rows: 8 slices, the last one short
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden, labels = torch.randn(3, 9, 16), torch.randint(0, 50, (3, 9))
    logits = head(hidden)[:, :-1]
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum").item()
    with torch.no_grad():
        assert analysis.head_nll(head, hidden, labels) == pytest.approx(expected, rel=1e-5)
        # Any other head module is called as a module, a few tokens at a time.
        wrapped = torch.nn.Sequential(head)
        assert analysis.head_nll(wrapped, hidden, labels) == pytest.approx(expected, rel=1e-5)
