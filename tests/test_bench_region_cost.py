"""benchmarks/region_cost.py: hybrids of a base model and its pruned run, on tiny models."""

import json

import pytest
import torch
from conftest import VOCAB, load_script, make_plan, tiny_model, write_tiny_model

from hgsp.adapters import adapter_for
from hgsp.config import PruneConfig
from hgsp.errors import UserError
from hgsp.pipeline import prune
from hgsp.surgery import apply_plan


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/region_cost.py")


def _pruned(arch):
    """Layer 1 removed whole, layer 0 and 3 thinned, layer 2 untouched."""
    base = tiny_model(arch)
    plan = make_plan(arch, {0: ([1], [0, 5, 7]), 1: ([0, 1], list(range(24))),
                            3: ([], [2, 3])})
    return base, apply_plan(base, adapter_for(base.config), plan), plan


def _logits(model):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_whole_region_is_the_pruned_model_and_empty_region_the_base(bench, arch):
    base, pruned, plan = _pruned(arch)
    whole = bench.hybrid_model(base, pruned, plan, list(range(4)))
    assert torch.allclose(_logits(whole), _logits(pruned), atol=1e-5)
    assert bench.removed_params(base, whole) == bench.removed_params(base, pruned)
    none = bench.hybrid_model(base, pruned, plan, [])
    assert torch.equal(_logits(none), _logits(base))
    assert bench.removed_params(base, none) == 0


def test_a_region_removes_only_its_own_layers_cuts(bench):
    base, pruned, plan = _pruned("llama")
    layer = sum(p.numel() for p in base.model.layers[1].parameters())
    dropped = bench.hybrid_model(base, pruned, plan, [1, 2])
    assert len(dropped.model.layers) == 3 and dropped.config.num_hidden_layers == 3
    assert bench.removed_params(base, dropped) == layer
    thinned = bench.hybrid_model(base, pruned, plan, [0])
    assert 0 < bench.removed_params(base, thinned) < layer
    assert not torch.allclose(_logits(thinned), _logits(base))
    # the base model is not touched
    assert len(base.model.layers) == 4


def test_parse_regions(bench):
    assert bench.parse_regions("0-1, 3", 4) == {"0-1": [0, 1], "3": [3]}
    for bad, words in [("0-4", "outside"), ("a-b", "not a layer range"), ("", "empty"),
                       ("2-1", "outside")]:
        with pytest.raises(UserError, match=words):
            bench.parse_regions(bad, 4)


def test_main_scores_every_region_of_a_run(bench, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HGSP_DATA_DIR", str(data_dir))
    model_dir = write_tiny_model(tmp_path / "model")
    result = prune(PruneConfig(base_model=str(model_dir), output_name="run", pruning_ratio=0.4,
                               data_dir=str(data_dir), results_dir=str(tmp_path / "results"),
                               num_examples=4, seq_len=16, gradient_batch_size=2,
                               analysis_samples=2, dataset="c4"))
    seen = []

    def fake_score(model, tokenizer, tasks, limit):
        seen.append(len(model.model.layers))
        return {"tasks": {}, "mean_acc": float(len(seen)), "seconds": 0.0}

    monkeypatch.setattr(bench, "score", fake_score)
    out = tmp_path / "out.json"
    assert bench.main(["--run", str(result.results_dir), "--regions", "0-1,2-3",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["regions"]) == ["none", "0-1", "2-3", "all"]
    removed = result.summary["parameters"]
    assert doc["regions"]["all"]["removed_params"] == removed["base_total"] - removed[
        "pruned_total"]
    assert doc["regions"]["none"]["removed_params"] == 0
    assert seen[-1] == len(result.plan.kept_layers)


def test_refuses_bad_input_without_writing(bench, tmp_path, capsys):
    out = tmp_path / "o.json"
    assert bench.main(["--run", str(tmp_path), "--regions", "0-1", "--out", str(out)]) == 2
    assert "not a results folder" in capsys.readouterr().err
    assert not out.exists()
