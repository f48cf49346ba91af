"""Importance of groups (DESIGN.md §3): the per-weight salience math on hand-computed cases,
and the calibration loops of :func:`hgsp.importance.compute_importance` against an
independent, deliberately naive re-computation on tiny models of every architecture."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import VOCAB, tiny_model
from hgsp.adapters import adapter_for
from hgsp.errors import UserError
from hgsp.importance import compute_importance
from hgsp.salience import bias_input_norm, col_groups, row_groups, weight_salience

# ---------------------------------------------------------------------------------------------
# Salience on a tiny explicit matrix. Every expected number below was worked out by hand from
# the formulas of DESIGN.md §3 (the arithmetic is in the comments).
# ---------------------------------------------------------------------------------------------

W = torch.tensor([[1.0, -2.0],
                  [3.0, 0.5],
                  [-1.0, 4.0],
                  [2.0, -3.0]])
G = torch.tensor([[0.5, 1.0],
                  [-2.0, 4.0],
                  [3.0, -0.5],
                  [1.0, 1.0]])
F = torch.tensor([[2.0, 1.0],
                  [0.5, 4.0],
                  [1.0, 0.0],
                  [0.25, 2.0]])
NORM = torch.tensor([2.0, 0.5])  # ||x_j||_2 of the two input features (columns)


def test_magnitude_salience():
    # s = |w|
    expected = torch.tensor([[1.0, 2.0], [3.0, 0.5], [1.0, 4.0], [2.0, 3.0]])
    assert torch.equal(weight_salience("magnitude", W), expected)


def test_taylor_salience():
    # s = |w * g|: 1*0.5, -2*1, 3*-2, 0.5*4, -1*3, 4*-0.5, 2*1, -3*1
    expected = torch.tensor([[0.5, 2.0], [6.0, 2.0], [3.0, 2.0], [2.0, 3.0]])
    assert torch.equal(weight_salience("taylor", W, grad=G), expected)


def test_taylor_2nd_salience():
    # s = |w*g - 0.5 * w^2 * F|
    #   (0,0):  0.5 - 0.5*1*2    = -0.5  -> 0.5    (0,1): -2 - 0.5*4*1    = -4    -> 4
    #   (1,0): -6   - 0.5*9*0.5  = -8.25 -> 8.25   (1,1):  2 - 0.5*0.25*4 = 1.5   -> 1.5
    #   (2,0): -3   - 0.5*1*1    = -3.5  -> 3.5    (2,1): -2 - 0.5*16*0   = -2    -> 2
    #   (3,0):  2   - 0.5*4*0.25 = 1.5   -> 1.5    (3,1): -3 - 0.5*9*2    = -12   -> 12
    expected = torch.tensor([[0.5, 4.0], [8.25, 1.5], [3.5, 2.0], [1.5, 12.0]])
    assert torch.equal(weight_salience("taylor_2nd", W, grad=G, fisher=F), expected)


def test_taylor_2nd_is_not_taylor_when_fisher_is_zero_only():
    # With F = 0 the second-order term vanishes and the two methods agree.
    zero = torch.zeros_like(W)
    assert torch.equal(weight_salience("taylor_2nd", W, grad=G, fisher=zero),
                       weight_salience("taylor", W, grad=G))


def test_wanda_salience_scales_columns_by_input_norm():
    # s = |w_ij| * ||x_j||: column 0 times 2, column 1 times 0.5
    expected = torch.tensor([[2.0, 1.0], [6.0, 0.25], [2.0, 2.0], [4.0, 1.5]])
    assert torch.equal(weight_salience("wanda", W, input_norm=NORM), expected)


def test_wanda_salience_of_a_bias():
    # A bias's input is the constant 1 at each of 16 tokens: norm sqrt(16) = 4.
    b = torch.tensor([1.0, -2.0, 0.5])
    assert float(bias_input_norm(16)) == 4.0
    s = weight_salience("wanda", b, input_norm=bias_input_norm(16))
    assert torch.equal(s, torch.tensor([4.0, 8.0, 2.0]))
    assert torch.equal(row_groups(s, 1), s)
    assert torch.equal(row_groups(s, 3), torch.tensor([14.0]))


def test_salience_is_float32_whatever_the_dtype():
    s = weight_salience("taylor", W.bfloat16(), grad=G.half())
    assert s.dtype == torch.float32
    assert torch.equal(s, torch.tensor([[0.5, 2.0], [6.0, 2.0], [3.0, 2.0], [2.0, 3.0]]))


def test_row_and_col_groups():
    s = weight_salience("magnitude", W)  # [[1,2],[3,.5],[1,4],[2,3]]
    # rows sum to 3, 3.5, 5, 5; blocks of two rows: 3+3.5 = 6.5, 5+5 = 10
    assert torch.equal(row_groups(s, 2), torch.tensor([6.5, 10.0]))
    assert torch.equal(row_groups(s, 1), torch.tensor([3.0, 3.5, 5.0, 5.0]))
    assert torch.equal(row_groups(s, 4), torch.tensor([16.5]))
    # columns sum to 1+3+1+2 = 7 and 2+0.5+4+3 = 9.5
    assert torch.equal(col_groups(s, 1), torch.tensor([7.0, 9.5]))
    assert torch.equal(col_groups(s, 2), torch.tensor([16.5]))
    # the transpose (an o/down-like matrix): its columns are W's rows
    assert torch.equal(col_groups(s.T, 2), torch.tensor([6.5, 10.0]))


# ---------------------------------------------------------------------------------------------
# compute_importance against a naive re-computation.
# ---------------------------------------------------------------------------------------------

BATCH = 2


@pytest.fixture
def windows():
    torch.manual_seed(5)
    return torch.randint(3, VOCAB, (6, 10))  # 3 batches of 2: sum vs mean over batches matters


def _linears(layer):
    """(name, module, axis) of every prunable linear; axis 'rows' or 'cols' as in DESIGN §2."""
    a, m = layer.self_attn, layer.mlp
    return [("q", a.q_proj, "rows"), ("k", a.k_proj, "rows"), ("v", a.v_proj, "rows"),
            ("o", a.o_proj, "cols"), ("gate", m.gate_proj, "rows"), ("up", m.up_proj, "rows"),
            ("down", m.down_proj, "cols")]


def _naive_group_importance(model, salience, positional=False):
    """Sum a per-parameter salience over each group's weights by explicit slicing.

    ``salience`` maps a parameter (by id) to its salience tensor. Attention group g owns q rows
    [g*r*d, (g+1)*r*d), k/v rows [g*d, (g+1)*d), o_proj columns [g*r*d, (g+1)*r*d) and the
    matching q/k/v bias entries; MLP channel j owns gate/up row j and down column j. With
    ``positional`` (LLM-Pruner's fold) the q rows / o columns scored with group g are those of
    query heads g, g+n_kv, g+2·n_kv, ... instead.
    """
    cfg = model.config
    n_kv, d = cfg.num_key_value_heads, cfg.head_dim
    r = cfg.num_attention_heads // n_kv
    layers = model.model.layers
    attn = torch.zeros(len(layers), n_kv, dtype=torch.float64)
    mlp = torch.zeros(len(layers), cfg.intermediate_size, dtype=torch.float64)
    for l, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        for g in range(n_kv):
            heads = [g + n_kv * j for j in range(r)] if positional else range(g * r, g * r + r)
            qs = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
            kvs = slice(g * d, (g + 1) * d)
            total = salience[id(a.q_proj.weight)][qs, :].double().sum()
            total += salience[id(a.k_proj.weight)][kvs, :].double().sum()
            total += salience[id(a.v_proj.weight)][kvs, :].double().sum()
            total += salience[id(a.o_proj.weight)][:, qs].double().sum()
            for proj, rows in ((a.q_proj, qs), (a.k_proj, kvs), (a.v_proj, kvs)):
                if proj.bias is not None:
                    total += salience[id(proj.bias)][rows].double().sum()
            attn[l, g] = total
        for j in range(cfg.intermediate_size):
            mlp[l, j] = (salience[id(m.gate_proj.weight)][j, :].double().sum()
                         + salience[id(m.up_proj.weight)][j, :].double().sum()
                         + salience[id(m.down_proj.weight)][:, j].double().sum())
    return attn, mlp


def _prunable_params(model):
    return [p for layer in model.model.layers for _, lin, _ in _linears(layer)
            for p in lin.parameters()]


def _naive_gradients(model, windows):
    """Per batch: the gradient of model(...).loss (a mean over the batch's tokens)."""
    params = _prunable_params(model)
    per_batch = []
    for start in range(0, windows.shape[0], BATCH):
        ids = windows[start:start + BATCH]
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        per_batch.append(torch.autograd.grad(loss, params))
    return params, per_batch


def _check(imp, model, expected_attn, expected_mlp):
    cfg = model.config
    assert imp.attn.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads) == (4, 2)
    assert imp.mlp.shape == (cfg.num_hidden_layers, cfg.intermediate_size) == (4, 24)
    torch.testing.assert_close(imp.attn.double(), expected_attn, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(imp.mlp.double(), expected_mlp, rtol=1e-4, atol=1e-7)


def test_taylor_importance_matches_naive(arch, windows):
    model = tiny_model(arch)
    params, per_batch = _naive_gradients(model, windows)
    # g = gradient of the mean loss, summed over the 3 batches (not averaged).
    salience = {id(p): (p.detach() * sum(gs[i] for gs in per_batch)).abs()
                for i, p in enumerate(params)}
    expected = _naive_group_importance(model, salience)
    imp = compute_importance(model, adapter_for(model.config), "taylor", windows, BATCH)
    assert imp.method == "taylor"
    assert imp.tokens == windows.numel()
    _check(imp, model, *expected)
    # Guard against a test that cannot fail: averaging over batches would be a different answer.
    assert not torch.allclose(imp.attn.double(), expected[0] / len(per_batch), rtol=1e-2)


def test_taylor_2nd_importance_matches_naive(arch, windows):
    model = tiny_model(arch)
    with torch.no_grad():
        # Sharpen the logits: on a random tiny model the second-order term is ~2e-4 of the
        # first-order one, too small to tell a Fisher mean from a sum; x100 makes it ~2%.
        model.lm_head.weight.mul_(100)
    params, per_batch = _naive_gradients(model, windows)
    n = len(per_batch)

    def expected(fisher_divisor):
        salience = {}
        for i, p in enumerate(params):
            w = p.detach()
            g = sum(gs[i] for gs in per_batch)  # summed over all batches
            # Fisher diagonal: mean over batches of the squared per-batch gradient
            fisher = sum(gs[i] ** 2 for gs in per_batch) / fisher_divisor
            salience[id(p)] = (w * g - 0.5 * w * w * fisher).abs()
        return _naive_group_importance(model, salience)

    imp = compute_importance(model, adapter_for(model.config), "taylor_2nd", windows, BATCH)
    _check(imp, model, *expected(n))
    # The test can tell a Fisher mean from a Fisher sum, and taylor_2nd from taylor.
    assert not torch.allclose(imp.mlp.double(), expected(1)[1], rtol=1e-3)
    taylor = compute_importance(model, adapter_for(model.config), "taylor", windows, BATCH)
    assert not torch.allclose(imp.mlp, taylor.mlp, rtol=1e-3)


def test_wanda_importance_matches_naive(arch, windows):
    model = tiny_model(arch)
    sq = {}
    handles = []
    for layer in model.model.layers:
        for _, lin, _ in _linears(layer):
            def hook(module, inputs, _out):
                x = inputs[0].detach().double()
                sq[id(module)] = sq.get(id(module), 0) + (x ** 2).sum(dim=(0, 1))
            handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=windows)  # all calibration tokens at once: same inputs, any batching
    for h in handles:
        h.remove()
    tokens = windows.numel()
    salience = {}
    for layer in model.model.layers:
        for _, lin, _ in _linears(layer):
            # down_proj's input is the SwiGLU product, caught by the hook on down_proj itself.
            salience[id(lin.weight)] = lin.weight.detach().double().abs() * sq[id(lin)].sqrt()
            if lin.bias is not None:  # a bias's input is the constant 1: norm sqrt(tokens)
                salience[id(lin.bias)] = lin.bias.detach().double().abs() * math.sqrt(tokens)
    expected = _naive_group_importance(model, salience)
    imp = compute_importance(model, adapter_for(model.config), "wanda", windows, BATCH)
    _check(imp, model, *expected)


def test_magnitude_importance_matches_naive(arch):
    model = tiny_model(arch)
    salience = {id(p): p.detach().abs() for p in _prunable_params(model)}
    expected = _naive_group_importance(model, salience)
    imp = compute_importance(model, adapter_for(model.config), "magnitude", None, BATCH)
    _check(imp, model, *expected)


@pytest.mark.parametrize("method", ["magnitude", "taylor"])
def test_positional_scoring_folds_query_heads_by_position(arch, windows, method):
    model = tiny_model(arch)
    adapter = adapter_for(model.config)
    if method == "magnitude":
        salience = {id(p): p.detach().abs() for p in _prunable_params(model)}
    else:
        params, per_batch = _naive_gradients(model, windows)
        salience = {id(p): (p.detach() * sum(gs[i] for gs in per_batch)).abs()
                    for i, p in enumerate(params)}
    expected = _naive_group_importance(model, salience, positional=True)
    imp = compute_importance(model, adapter, method, windows, BATCH,
                             kv_group_scoring="positional")
    _check(imp, model, *expected)
    shared = compute_importance(model, adapter, method, windows, BATCH)
    assert torch.equal(shared.mlp, imp.mlp)
    # 4 query heads over 2 KV heads: group 0 is scored with heads 0, 2 instead of 0, 1
    assert not torch.allclose(shared.attn, imp.attn, rtol=1e-3)


def test_qwen2_bias_enters_the_attention_group():
    # Only Qwen2 has q/k/v biases: its importance must differ from the bias-free sum.
    model = tiny_model("qwen2").requires_grad_(False)
    a = model.model.layers[0].self_attn
    assert a.q_proj.bias is not None and a.o_proj.bias is None
    imp = compute_importance(model, adapter_for(model.config), "magnitude", None, BATCH)
    d, r = 8, 2
    without_bias = (a.q_proj.weight[:r * d].abs().sum() + a.k_proj.weight[:d].abs().sum()
                    + a.v_proj.weight[:d].abs().sum() + a.o_proj.weight[:, :r * d].abs().sum())
    bias = (a.q_proj.bias[:r * d].abs().sum() + a.k_proj.bias[:d].abs().sum()
            + a.v_proj.bias[:d].abs().sum())
    assert float(imp.attn[0, 0]) == pytest.approx(float(without_bias + bias), rel=1e-5)


@pytest.mark.parametrize("method", ["taylor", "taylor_2nd"])
def test_gradient_methods_restore_flags_and_leave_no_grad(method, windows):
    model = tiny_model("llama")
    frozen = {"model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
              "model.layers.2.mlp.down_proj.weight", "model.norm.weight"}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    compute_importance(model, adapter_for(model.config), method, windows, BATCH)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, weights[name]), name
    assert not model.training


def test_unknown_method_is_a_user_error(windows):
    model = tiny_model("llama")
    with pytest.raises(UserError, match="unknown importance method"):
        compute_importance(model, adapter_for(model.config), "fisher", windows, BATCH)


def test_gradient_sums_on_cpu_give_the_same_importance(windows):
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    expected = compute_importance(model, adapter, "taylor_2nd", windows, BATCH)
    actual = compute_importance(model, adapter, "taylor_2nd", windows, BATCH, sums_on_cpu=True)
    assert torch.equal(actual.attn, expected.attn) and torch.equal(actual.mlp, expected.mlp)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["taylor", "taylor_2nd"])
def test_gradient_passes_give_the_same_importance(windows, arch, method):
    # One pass per group of layers: the gradients of a layer do not depend on which other
    # layers require them, so the importances match a single pass.
    model = tiny_model(arch)
    adapter = adapter_for(model.config)
    expected = compute_importance(model, adapter, method, windows, BATCH)
    actual = compute_importance(model, adapter, method, windows, BATCH, passes=3)
    torch.testing.assert_close(actual.attn, expected.attn, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(actual.mlp, expected.mlp, rtol=1e-5, atol=1e-9)
    assert (actual.mlp.abs().sum(dim=1) > 0).all()  # every layer's group was covered
    assert all(p.grad is None for p in model.parameters())


def test_layer_groups_cover_every_layer_once():
    from hgsp.importance import layer_groups

    groups = layer_groups(30, 4)
    assert [len(g) for g in groups] == [8, 7, 7, 8] and groups[0][-1] == 29
    assert sorted(i for g in groups for i in g) == list(range(30))
    assert layer_groups(3, 8) == [range(2, 3), range(1, 2), range(0, 1)]
    with pytest.raises(UserError, match="--gradient_passes"):
        layer_groups(30, 0)
