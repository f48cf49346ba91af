"""Perplexity, efficiency and the `hgsp eval` command on tiny models."""

from __future__ import annotations

import json
import shutil
import math

import pytest
import torch

from hgsp.adapters import adapter_for
from hgsp.cli import main
from hgsp.efficiency import (efficiency, macs_per_token, median_of_passes, parameter_counts,
                             ratios)
from hgsp.evaluate import compare, parse_settings
from hgsp.perplexity import (logits_nll, nll_function, perplexity, perplexity_of_ids,
                             sliced_nll)
from hgsp.plan import uniform_plan
from hgsp.surgery import apply_plan

from conftest import tiny_model, tiny_tokenizer


def test_perplexity_is_exp_mean_cross_entropy(arch):
    model = tiny_model(arch)
    torch.manual_seed(3)
    ids = torch.randint(3, 96, (3 * 8 + 5,))  # 3 full windows of 8 and a dropped tail of 5
    result = perplexity_of_ids(model, ids, seq_len=8, batch_tokens=16)  # batches of 2, then 1
    windows = ids[:24].view(3, 8)
    with torch.no_grad():
        logits = model(windows).logits
    # Hand computation: mean next-token cross-entropy over all 3 x 7 predictions.
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -log_probs.gather(-1, windows[:, 1:, None]).sum().item()
    assert result["windows"] == 3 and result["available_windows"] == 3
    assert result["predicted_tokens"] == 3 * 7
    assert result["ppl"] == pytest.approx(math.exp(nll / 21), rel=1e-5)
    assert result["capped"] is False and result["seq_len"] == 8


def test_perplexity_of_a_wrapped_model_uses_its_own_forward():
    # A PEFT wrapper is scored from its logits (its .model is not a decoder), and its LoRA
    # layers, initialized to a no-op, leave the number equal to the plain model's.
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (40,))
    plain = perplexity_of_ids(model, ids, seq_len=8)
    assert nll_function(model) is sliced_nll
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert nll_function(wrapped) is logits_nll
    assert perplexity_of_ids(wrapped, ids, seq_len=8)["ppl"] == pytest.approx(plain["ppl"],
                                                                              rel=1e-6)


def test_capped_perplexity_records_the_cap():
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (80,))
    capped = perplexity_of_ids(model, ids, seq_len=10, max_windows=3)
    first3 = perplexity_of_ids(model, ids[:30], seq_len=10)
    assert capped["windows"] == 3 and capped["available_windows"] == 8
    assert capped["capped"] is True and capped["max_windows"] == 3
    assert capped["ppl"] == pytest.approx(first3["ppl"], rel=1e-6)


def test_perplexity_reads_local_splits(data_dir):
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    result = perplexity(model, tok, "wikitext2", 16, data_dir=str(data_dir))
    assert result["split"] == "test" and str(data_dir) in result["source"]
    c4 = perplexity(model, tok, "c4", 16, max_windows=2, data_dir=str(data_dir))
    assert c4["split"] == "validation" and "documents 200-end" in c4["source"]


def _pruned_with_removed_layer(model):
    plan = uniform_plan("llama", 4, 2, 24)
    plan.layers[1].kept_kv_heads, plan.layers[1].kept_channels = [], []
    plan.layers[2].kept_channels = list(range(10))
    plan.layers[3].kept_kv_heads = [1]
    return apply_plan(model, adapter_for(model.config), plan)


def test_efficiency_figures_and_fewer_macs():
    base = tiny_model("llama")
    pruned = _pruned_with_removed_layer(base)
    kwargs = dict(prompt_len=8, new_tokens=4, batch_sizes=(1, 2), repeats=1)
    eb, ep = efficiency(base, **kwargs), efficiency(pruned, **kwargs)
    for e in (eb, ep):
        assert e["parameters"]["total"] > e["parameters"]["non_embedding"] > 0
        assert e["weight_bytes"] > 0 and e["peak_memory"]["peak_bytes"] > 0
        for batch in ("batch1", "batch2"):
            assert e["speed"][batch]["prefill_latency_s"] > 0
            assert e["speed"][batch]["decode_tokens_per_s"] > 0
    assert ep["macs_per_token"]["linear"] < eb["macs_per_token"]["linear"]
    assert ep["macs_per_token"]["attention"] < eb["macs_per_token"]["attention"]
    r = ratios(ep, eb)
    assert 0 < r["parameters"] < 1 and 0 < r["macs_per_token"] < 1
    # the compared memory is each model's own: at least its weights, and the process peak
    # (which holds both models here) is not what the ratio uses
    for e in (eb, ep):
        mem = e["peak_memory"]
        assert e["weight_bytes"] <= mem["model_bytes"]
        assert mem["model_bytes"] - e["weight_bytes"] == max(0, mem["peak_bytes"]
                                                             - mem["start_bytes"])
    assert r["model_memory"] == ep["peak_memory"]["model_bytes"] / eb["peak_memory"]["model_bytes"]
    assert "peak_memory" not in r


def _pass(decode: float, prefill: float, peak: int) -> dict:
    return {"parameters": {"total": 10}, "speed": {"repeats": 3, "batch1": {
        "prefill_latency_s": prefill, "decode_tokens_per_s": decode}},
        "peak_memory": {"peak_bytes": peak, "kind": "process_rss"}}


def test_median_of_passes_takes_each_speed_figure_alone():
    out = median_of_passes([_pass(10.0, 0.3, 5), _pass(30.0, 0.1, 9), _pass(20.0, 0.2, 7)])
    assert out["speed"]["batch1"] == {"decode_tokens_per_s": 20.0, "prefill_latency_s": 0.2}
    assert [p["batch1"]["decode_tokens_per_s"] for p in out["speed"]["passes"]] == [10, 30, 20]
    assert out["peak_memory"]["peak_bytes"] == 9 and out["parameters"] == {"total": 10}
    assert out["speed"]["repeats"] == 3
    with pytest.raises(ValueError, match="at least one pass"):
        median_of_passes([])


def test_macs_count_every_linear_once():
    model = tiny_model("llama")
    linear = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, torch.nn.Linear))
    macs = macs_per_token(model, context=10)
    # 4 layers x 2 (QK^T and AV) x 4 heads x head_dim 8 x 10 positions
    assert macs["linear"] == linear and macs["attention"] == 4 * 2 * 32 * 10
    counts = parameter_counts(model)
    assert counts["total"] - counts["non_embedding"] == 2 * 96 * 32  # untied embed + lm_head


def test_compare_gives_ratios():
    pruned = {"ppl": {"wikitext2": {"128": {"ppl": 30.0}}}, "zeroshot": {"mean_acc": 0.5}}
    base = {"ppl": {"wikitext2": {"128": {"ppl": 20.0}}}, "zeroshot": {"mean_acc": 0.6}}
    out = compare(pruned, base)
    assert out["ppl"]["wikitext2"]["128"] == pytest.approx(1.5)
    assert out["zeroshot_mean_acc_difference"] == pytest.approx(-0.1)


@pytest.mark.parametrize("kinds,datasets,lens,message", [
    ("speed", "wikitext2", "128", "unknown evaluation 'speed'"),
    ("ppl", "imagenet", "128", "unknown perplexity dataset 'imagenet'"),
    ("ppl", "wikitext2", "12x", "must be integers"),
])
def test_settings_errors(kinds, datasets, lens, message):
    from hgsp.errors import UserError

    with pytest.raises(UserError, match=message):
        parse_settings(kinds, datasets, lens, "default")


def test_hgsp_eval_end_to_end(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--base_model", str(tiny_model_dir),
                 "--run", "ppl", "--eval_ppl_datasets", "wikitext2,c4", "--eval_ppl_seq_len",
                 "8,16", "--eval_ppl_max_windows", "4", "--data_dir", str(data_dir),
                 "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["schema"] == "hgsp-evaluation-v1"
    assert set(doc["models"]) == {"base", "pruned"}
    assert set(doc["models"]["base"]["ppl"]["wikitext2"]) == {"8", "16"}
    assert doc["models"]["base"]["ppl"]["c4"]["8"]["windows"] == 4
    # the same model on both sides: every ratio is exactly 1
    assert doc["ratios"]["ppl"]["wikitext2"]["16"] == pytest.approx(1.0)
    assert doc["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
    (["--eval_ppl_datasets", "imagenet"], "unknown perplexity dataset 'imagenet'"),
    (["--eval_ppl_datasets", "ptb", "--data_dir", "/nonexistent"], "ptb/test is not in the local"),
    (["--run", "zeroshot", "--eval_zeroshot_tasks", "no_such_task"], "no_such_task"),
    (["--eval_ppl_max_windows", "0"], "--eval_ppl_max_windows must be a positive integer"),
    (["--output", ".", "--overwrite"], "--output '.' is a folder: name the results file"),
    (["--run", "zeroshot", "--eval_zeroshot_limit", "-3"],
     "--eval_zeroshot_limit must be a positive integer"),
])
def test_hgsp_eval_bad_input(args, message, tiny_model_dir, data_dir, tmp_path, capsys,
                             monkeypatch):
    monkeypatch.setenv("HGSP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HGSP_DATA_DIR", "")
    base = ["eval", "--model", str(tiny_model_dir), "--output", str(tmp_path / "e.json"),
            "--data_dir", str(data_dir)]  # a later --data_dir in args wins
    code = main(base + args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "e.json").exists()


def test_base_results_are_cached_per_dtype(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """A float32 perplexity is not reused for the same model in bfloat16."""
    from hgsp.evaluate import evaluate_model
    from hgsp.modelio import load_model

    monkeypatch.setenv("HGSP_CACHE_DIR", str(tmp_path / "cache"))
    settings = parse_settings("ppl", "wikitext2", "16", "default", ppl_max_windows=2,
                              data_dir=str(data_dir))
    loaded = load_model(str(tiny_model_dir), torch.float32, "cpu")
    first = evaluate_model(loaded.model, loaded.tokenizer, settings, fingerprint="fp")
    again = evaluate_model(loaded.model, loaded.tokenizer, settings, fingerprint="fp")
    assert first["cached"] == [] and again["cached"] == ["ppl"]
    half = evaluate_model(loaded.model.to(torch.bfloat16), loaded.tokenizer, settings,
                          fingerprint="fp")
    assert half["cached"] == []
    assert half["ppl"]["wikitext2"]["16"]["ppl"] != first["ppl"]["wikitext2"]["16"]["ppl"]


def test_ptb_validation_is_its_own_evaluation_set(tiny_model_dir, data_dir):
    """DESIGN.md §8 asks for PTB test and validation: ``ptb_val`` scores the validation text."""
    from hgsp.data import load_corpus
    from hgsp.modelio import load_model
    from hgsp.perplexity import perplexity

    settings = parse_settings("ppl", "ptb,ptb_val", "16", "default", ppl_max_windows=2,
                              data_dir=str(data_dir))
    assert settings.ppl_datasets == ["ptb", "ptb_val"]
    loaded = load_model(str(tiny_model_dir), torch.float32, "cpu")
    test = perplexity(loaded.model, loaded.tokenizer, "ptb", 16, 2, str(data_dir))
    val = perplexity(loaded.model, loaded.tokenizer, "ptb_val", 16, 2, str(data_dir))
    assert (test["split"], val["split"]) == ("test", "validation")
    assert val["dataset"] == "ptb_val" and val["ppl"] != test["ppl"]
    assert load_corpus("ptb", "validation", str(data_dir)).documents != \
        load_corpus("ptb", "test", str(data_dir)).documents


def test_base_results_are_cached_per_evaluation_text(tiny_model_dir, data_dir, tmp_path,
                                                     monkeypatch):
    """Another data folder with other text: no cache hit, although nothing else changed."""
    from hgsp.evaluate import evaluate_model
    from hgsp.modelio import load_model

    monkeypatch.setenv("HGSP_CACHE_DIR", str(tmp_path / "cache"))
    other = shutil.copytree(data_dir, tmp_path / "other")
    text = (other / "wikitext2" / "wiki.test.raw").read_text()
    (other / "wikitext2" / "wiki.test.raw").write_text(text[len(text) // 2:])
    loaded = load_model(str(tiny_model_dir), torch.float32, "cpu")
    for folder, cached in ((data_dir, []), (data_dir, ["ppl"]), (other, [])):
        settings = parse_settings("ppl", "wikitext2", "16", "default", ppl_max_windows=2,
                                  data_dir=str(folder))
        out = evaluate_model(loaded.model, loaded.tokenizer, settings, fingerprint="fp")
        assert out["cached"] == cached, folder


def test_median_of_passes_keeps_the_largest_pass_memory_together():
    passes = [_pass(10.0, 0.3, 5), _pass(30.0, 0.1, 9), _pass(20.0, 0.2, 7)]
    for p, (start, own) in zip(passes, ((1, 50), (2, 40), (3, 60))):
        p["peak_memory"].update(start_bytes=start, model_bytes=own)
    mem = median_of_passes(passes)["peak_memory"]
    assert mem["peak_bytes"] == 9 and mem["start_bytes"] == 2 and mem["model_bytes"] == 60
