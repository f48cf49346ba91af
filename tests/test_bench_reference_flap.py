"""benchmarks/reference_flap.py: driving a FLAP-style ``lib/prune.py`` and comparing with hgsp.

The authors' code is not in the repository; each test writes a stand-in with the parts of its
interface the script relies on.
"""

import pytest
import torch
from conftest import VOCAB, load_script, tiny_model

PRUNE = '''
import torch
from .layerwrapper import BiasGPT
from .data import get_loaders


def compress(layer, attn_mask, mlp_mask, attn_mean_inp, mlp_mean_inp, device, bias=True,
             unstr=False):
    raise RuntimeError("multi-head attention only")


def prune_flap(args, model, tokenizer, device=None):
    loader, _ = get_loaders("wikitext2", nsamples=args.nsamples, seed=args.seed,
                            seqlen=model.seqlen, tokenizer=tokenizer)
    layers = model.model.layers
    ids = loader[0][0]
    x = model.model.embed_tokens(ids)
    # a layer called as FLAP's loop calls it: position_ids only, the result indexed
    out = layers[0](x, attention_mask=None, position_ids=torch.arange(ids.shape[1])[None])[0]
    assert out.shape == x.shape
    width = layers[0].self_attn.o_proj.in_features
    metric = torch.arange(float(len(layers) * width)).view(len(layers), width)
    attn_metric = metric.reshape(len(layers), -1, 128).mean(dim=2)
    count = max(1, round(args.pruning_ratio * attn_metric.numel()))
    cut = attn_metric.view(-1).sort().values[count - 1]
    for i, layer in enumerate(layers):
        compress(layer, attn_metric[i] > cut, None, None, None, device)
        keep = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
        compress(layer, None, keep, None, None, device)


def prune_wanda_sp(args, model, tokenizer, device=None):
    get_loaders("c4", nsamples=128, seed=args.seed, seqlen=model.seqlen, tokenizer=tokenizer)
    for layer in model.model.layers:
        W_metric = layer.self_attn.o_proj.weight.abs()
        heads = W_metric.mean(axis=0).reshape(-1, 128).sum(dim=1)
        cut = torch.sort(heads.cuda())[0][int(args.pruning_ratio * layer.self_attn.num_heads)]
        compress(layer, heads >= cut, None, None, None, device, bias=False)
        assert (layer.self_attn.o_proj.weight == 0).any()  # the removed group is gone
        channels = layer.mlp.down_proj.weight.abs().mean(axis=0)
        cut = torch.sort(channels.cuda())[0][int(channels.numel() * args.pruning_ratio)]
        compress(layer, None, channels >= cut, None, None, device, bias=False)
'''

LAYERWRAPPER = '''
import torch


class BiasGPT:
    def __init__(self, layer, metric):
        self.n, self.s, self.sq = 0, 0.0, 0.0

    def add_batch(self, inp, out):
        x = inp.reshape(-1, inp.shape[-1]).double()
        self.n += x.shape[0]
        self.s = self.s + x.sum(0)
        self.sq = self.sq + x.pow(2).sum(0)
        self.fluc_inp = (self.sq - self.s * self.s / self.n) / (self.n - 1)
'''


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/reference_flap.py")


def standin(folder, prune=PRUNE):
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "prune.py").write_text(prune)
    (folder / "lib" / "layerwrapper.py").write_text(LAYERWRAPPER)
    (folder / "lib" / "data.py").write_text("def get_loaders(*a, **k):\n    raise RuntimeError\n")
    return str(folder)


def test_masks_come_per_kv_group_and_are_compared(bench, tiny_model_dir, tmp_path):
    model = tiny_model("llama")
    d = model.config
    unit = d.num_attention_heads // d.num_key_value_heads * d.head_dim
    prune = bench.import_prune(standin(tmp_path / "FLAP"), unit)
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    result = bench.compare(prune, str(tiny_model_dir), ids, [0.3], 2)["flap"]["0.3"]
    theirs = result["kv_groups_removed_per_layer"]["flap_code"]
    assert len(theirs) == d.num_hidden_layers
    # the stand-in's metric grows with the layer: the lowest groups are those of layer 0
    assert theirs[0] >= 1 and theirs[-1] == 0
    assert result["channels_removed"]["flap_code"] == 0
    ours = result["kv_groups_removed"]
    assert ours["flap_code"] == sum(theirs) and ours["hgsp"] >= 1
    # the stand-in's variance is the exact one, so feeding it to hgsp changes nothing
    assert result["with_flap_variance"]["channels_removed"] == result["channels_removed"]
    assert result["with_flap_variance"]["kv_groups_removed"] == ours


def test_the_same_units_count_as_both_and_others_do_not(bench):
    from conftest import make_plan

    from hgsp.adapters import adapter_for

    d = adapter_for(tiny_model("llama").config).dims()
    plan = make_plan("llama", {1: ([0], [2, 5]), 3: ([], [7])})
    groups, channels = bench.removed_units(plan, d)
    keep_attn = [[True] * d.num_kv_heads for _ in range(d.num_layers)]
    keep_mlp = [[True] * d.intermediate for _ in range(d.num_layers)]
    keep_attn[1][0] = keep_mlp[1][2] = keep_mlp[1][5] = keep_mlp[3][7] = False
    same = bench.removed_by_masks(keep_attn, keep_mlp)
    assert bench.overlap(groups, same[0]) == {"hgsp": 1, "flap_code": 1, "both": 1,
                                              "jaccard": 1.0}
    assert bench.overlap(channels, same[1])["both"] == 3
    keep_mlp[3][7], keep_mlp[2][7] = True, False  # the same channel in another layer
    other = bench.removed_by_masks(keep_attn, keep_mlp)
    assert bench.overlap(channels, other[1]) == {"hgsp": 3, "flap_code": 3, "both": 2,
                                                 "jaccard": 0.5}


def test_wanda_sp_runs_at_one_ratio_and_hgsp_at_its_budget(bench, tiny_model_dir, tmp_path):
    d = tiny_model("llama").config
    unit = d.num_attention_heads // d.num_key_value_heads * d.head_dim
    prune = bench.import_prune(standin(tmp_path / "FLAP"), unit)
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    result = bench.compare(prune, str(tiny_model_dir), ids, [], 2, [0.5])["wanda_sp"]["0.5"]
    layers = d.num_hidden_layers
    heads, channels = int(0.5 * d.num_key_value_heads), int(0.5 * d.intermediate_size)
    for who in ("hgsp", "flap_code"):  # the single ratio's counts, in every layer, for both
        assert result["kv_groups_removed_per_layer"][who] == [heads] * layers
        assert result["channels_removed_per_layer"][who] == [channels] * layers
    assert result["hgsp_pruning_ratio"] == pytest.approx(result["budget"] / 27936, abs=1e-6)


def test_the_ratio_is_the_budget_in_flaps_unit_weights(bench):
    from hgsp.adapters import adapter_for

    adapter = adapter_for(tiny_model("llama").config)
    d = adapter.dims()
    channel = adapter.mlp_channel_cost()
    budget = 3 * channel * 10
    total_weights = d.num_layers * (d.num_kv_heads * 512 / 3 + d.intermediate)
    assert bench.flap_ratio(adapter, budget) == pytest.approx(30 / total_weights)


def test_a_clone_without_the_code_or_the_line_is_refused(bench, tmp_path, capsys):
    assert bench.main(["--flap_dir", str(tmp_path)]) == 2
    assert "has no lib/prune.py" in capsys.readouterr().err
    other = standin(tmp_path / "other", prune=PRUNE.replace("(len(layers), -1, 128)", "(-1, 64)"))
    assert bench.main(["--flap_dir", other]) == 2
    assert "does not contain 'reshape(len(layers), -1, 128)' once" in capsys.readouterr().err
