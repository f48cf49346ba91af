"""benchmarks/llm_pruner_grouping.py: hgsp's KV-group scoring against LLM-Pruner's fold."""

import pytest
import torch
from conftest import VOCAB, load_script, tiny_model


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/llm_pruner_grouping.py")


def test_query_heads_go_to_the_kv_head_they_share_or_by_position(bench):
    kv = torch.zeros(2)
    query = torch.tensor([3.0, 3.0, 0.0, 4.0])  # query heads 0,1 share KV head 0; 2,3 KV head 1
    assert bench.group_scores(kv, query, folded=False).tolist() == [6.0, 4.0]
    assert bench.group_scores(kv, query, folded=True).tolist() == [3.0, 7.0]  # heads 0,2 / 1,3


def test_compare_counts_layers_of_llm_pruners_range(bench):
    model = tiny_model("llama")  # GQA: more query heads than KV heads
    cfg = model.config
    assert cfg.num_attention_heads > cfg.num_key_value_heads > 1
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    result = bench.compare(model, ids, batch_size=2)
    start, last = result["layers"]
    assert set(result["differ"]) == {str(n) for n in range(1, cfg.num_key_value_heads)}
    assert all(start <= li <= last for where in result["differ"].values() for li in where)
    assert model.model.layers[start].self_attn.q_proj.weight.grad.abs().sum() > 0


def _llm_pruner_run(folder, model, scores, pick):
    """A results folder whose plan removes, in each scored layer, the group ``pick`` chooses."""
    from hgsp.plan import uniform_plan

    cfg = model.config
    plan = uniform_plan("llama", cfg.num_hidden_layers, cfg.num_key_value_heads,
                        cfg.intermediate_size)
    plan.meta = {"method": "llm_pruner", "pruning_ratio": 0.2}
    for li, groups in scores.items():
        gone = pick(groups)
        plan.layers[li].kept_kv_heads = [g for g in range(cfg.num_key_value_heads) if g != gone]
    (folder / "analysis").mkdir(parents=True)
    plan.save(folder / "analysis" / "pruning_plan.json")
    return folder


def test_evaluate_swaps_in_the_folded_choice_and_scores_both(bench, data_dir, tmp_path,
                                                            monkeypatch):
    from conftest import tiny_tokenizer

    monkeypatch.setenv("HGSP_DATA_DIR", str(data_dir))
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    scores = bench.compare(model, ids, batch_size=2)["scores"]
    run = _llm_pruner_run(tmp_path / "run", model, scores,
                          lambda g: int(torch.argmin(g[0])))
    model.zero_grad(set_to_none=True)
    result = bench.evaluate(model, tiny_tokenizer(), run, scores, max_windows=2)
    expect = [li for li, (shared, folded) in scores.items()
              if int(torch.argmin(shared)) != int(torch.argmin(folded))]
    assert expect, "these windows should make the two groupings differ somewhere"
    assert result["layers_with_other_groups"] == expect
    assert set(result["hgsp"]) == set(result["llm_pruner_folded"]) == {"wikitext2", "ptb"}
    assert result["hgsp"] != result["llm_pruner_folded"]  # other groups removed


def test_evaluate_refuses_a_run_these_scores_do_not_reproduce(bench, tmp_path):
    from hgsp.errors import UserError

    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    scores = bench.compare(model, ids, batch_size=2)["scores"]
    run = _llm_pruner_run(tmp_path / "run", model, scores,
                          lambda g: int(torch.argmax(g[0])))  # not the lowest group
    with pytest.raises(UserError, match="do not remove the run's KV groups"):
        bench.evaluate(model, None, run, scores, max_windows=2)
