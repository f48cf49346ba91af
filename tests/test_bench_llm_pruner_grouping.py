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
