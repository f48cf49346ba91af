"""Recovery fine-tuning: Alpaca data and prompt masking, LoRA on a pruned model (merge, save,
reload), full fine-tuning, the ``--finetune`` stage of ``hgsp prune``, ``hgsp finetune``, and
bad input (one ``error:`` line, exit code 2, no results folder)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import synthetic_documents, tiny_model, write_data_dir
from hgsp.adapters import adapter_for
from hgsp.alpaca import (IGNORE_INDEX, PROMPT_NO_INPUT, PROMPT_WITH_INPUT, InstructionSet,
                         build_prompt, collate, encode, encode_all, load_instructions,
                         select_examples)
from hgsp.cli import main
from hgsp.errors import UserError
from hgsp.finetune import (FinetuneSettings, existing_targets, finetune, response_loss,
                           save_outputs)
from hgsp.plan import uniform_plan
from hgsp.surgery import apply_plan

# Tiny runs: a few optimizer steps, a high learning rate, no dropout.
QUICK = dict(lr=2e-2, micro_batch=4, grad_accum=1, cutoff_len=128, lora_dropout=0.0,
             gradient_checkpointing=True)
QUICK_FLAGS = ["--finetune_lr", "0.02", "--finetune_micro_batch", "4", "--finetune_grad_accum",
               "2", "--finetune_cutoff_len", "128", "--lora_dropout", "0", "--finetune_epochs",
               "1", "--finetune_samples", "8", "--finetune_val_samples", "4"]


def alpaca_tokenizer():
    """A BPE tokenizer that knows the Alpaca template words, so prompts stay short."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<pad>", "<s>", "</s>",
                                                                  "<unk>"])
    tok.train_from_iterator(synthetic_documents(50) + [PROMPT_WITH_INPUT, PROMPT_NO_INPUT] * 20,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def records(n: int = 40) -> list[dict]:
    """Instructions from synthetic sentences; the answers repeat, so a tiny model can learn."""
    docs = synthetic_documents(n, seed=3)
    answers = ("the river music", "a small house", "the north school")
    return [{"instruction": d.split(".")[0] + ".", "input": "" if i % 2 else d.split(".")[1],
             "output": answers[i % 3]} for i, d in enumerate(docs)]


def pruned_tiny(tok):
    """Layer 0 without attention, layer 1 narrower, layer 2 removed, layer 3 intact."""
    base = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256)
    plan = uniform_plan("llama", 4, 2, 24)
    plan.layers[0].kept_kv_heads = []
    plan.layers[1].kept_kv_heads, plan.layers[1].kept_channels = [1], list(range(0, 24, 3))
    plan.layers[2].kept_kv_heads, plan.layers[2].kept_channels = [], []
    return apply_plan(base, adapter_for(base.config), plan)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they spin-wait badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return alpaca_tokenizer()


@pytest.fixture(scope="module")
def data():
    return select_examples(InstructionSet(records(), "memory"), 16, 4, seed=0)


def train_examples(tok, data):
    return encode_all(tok, data.train, QUICK["cutoff_len"], "training")


# -- prompt format and masking -------------------------------------------------------------


def test_prompt_masking_hand_built(tok):
    record = {"instruction": "Name a river.", "input": "", "output": "the river music"}
    prompt = build_prompt(record)
    assert prompt == PROMPT_NO_INPUT.format(instruction="Name a river.")
    assert "### Input:\nthe city" in build_prompt({**record, "input": "the city"})
    ex = encode(tok, record, cutoff_len=200)
    prompt_ids = tok(prompt)["input_ids"]
    response_ids = tok(prompt + record["output"])["input_ids"][len(prompt_ids):]
    assert ex["input_ids"] == prompt_ids + response_ids + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]

    # The model's loss on this batch is the mean over the response tokens only.
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256)
    batch = collate([ex, encode(tok, {**record, "output": "a small house"}, 200)],
                    tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    everything = torch.nn.functional.cross_entropy(logits[batch["attention_mask"][:, 1:] == 1],
                                                   batch["input_ids"][:, 1:][
                                                       batch["attention_mask"][:, 1:] == 1])
    torch.testing.assert_close(out.loss, expected)
    assert not torch.isclose(out.loss, everything)
    assert response_loss(model, [ex]) == pytest.approx(
        torch.nn.functional.cross_entropy(logits[0][keep[0]], labels[0][keep[0]]).item(),
        rel=1e-5)


def test_cutoff_keeps_the_prompt_mask_and_drops_answerless_examples(tok):
    record = {"instruction": "Name a river.", "input": "", "output": "the river music " * 20}
    n_prompt = len(tok(build_prompt(record))["input_ids"])
    ex = encode(tok, record, cutoff_len=n_prompt + 3)
    assert len(ex["input_ids"]) == n_prompt + 3
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert encode(tok, record, cutoff_len=n_prompt) is None


# -- data ------------------------------------------------------------------------------------


def test_loads_json_and_jsonl_and_selects_disjoint_examples(tmp_path):
    recs = records(12)
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    for name in ("a.json", "a.jsonl"):
        loaded = load_instructions(str(tmp_path / name))
        assert [r["output"] for r in loaded.records] == [r["output"] for r in recs]
    picked = select_examples(loaded, 8, 3, seed=1)
    assert len(picked.train) == 8 and len(picked.val) == 3
    assert not set(picked.train_indices) & set(picked.val_indices)
    assert picked.train_indices == select_examples(loaded, 8, 3, seed=1).train_indices
    with pytest.raises(UserError, match="has 12 records"):
        select_examples(loaded, 10, 3, seed=1)


def test_default_data_is_the_local_demo_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HGSP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HGSP_DATA_DIR", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline"):
        load_instructions(None)
    (tmp_path / "d" / "alpaca").mkdir(parents=True)
    (tmp_path / "d" / "alpaca" / "alpaca_en_demo.json").write_text(json.dumps(records(5)))
    assert len(load_instructions(None, str(tmp_path / "d")).records) == 5


@pytest.mark.parametrize("content, message", [
    ("[{\"instruction\": \"x\", \"output\": \"y\"", "neither JSON nor JSON lines"),
    ("{\"a\": 1}\n{\"b\": 2}\n", "no text field 'instruction'"),
    ("[{\"instruction\": \"x\", \"output\": 3}]", "no text field 'output'"),
    ("[\"just text\"]", "not an object"),
    ("[]", "no records"),
    ("3", "must be a JSON list"),
])
def test_malformed_data_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_instructions(str(path))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_instructions(str(tmp_path / "nope.json"))


# -- training --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside peft
def test_lora_on_pruned_model_merges_saves_and_reloads(tok, data, tmp_path):
    from peft import PeftModel

    model = pruned_tiny(tok)
    before_model = copy.deepcopy(model)
    train = train_examples(tok, data)
    loss_before = response_loss(model, train)
    # Whole-set batches: six smooth steps (smaller batches make a tiny model's loss jumpy).
    settings = FinetuneSettings(method="lora", samples=16, val_samples=4, epochs=6,
                                **{**QUICK, "lr": 1e-2, "micro_batch": 16})
    result = finetune(model, tok, settings, data)
    merged = result.model
    assert response_loss(merged, train) < loss_before - 0.1
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert [v["when"] for v in result.log["validation"]][::len(result.log["validation"]) - 1] \
        == ["before", "after"]
    assert len(result.log["steps"]) == 6 and all("loss" in s for s in result.log["steps"])
    # The adapter went only where projections still exist (no attention in layer 0).
    assert not any("layers.0.self_attn" in k for k in result.adapter.state)
    assert any("layers.1.self_attn.q_proj.lora_A" in k for k in result.adapter.state)

    save_outputs(result, tok, tmp_path / "models", tmp_path, adapter_base=None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "models").eval()
    ids = torch.tensor([[5, 17, 42, 8, 91, 3, 60, 33], [9, 9, 50, 64, 4, 88, 21, 30]])
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5,
                                   rtol=1e-5)
        # The saved adapter on the un-fine-tuned model rebuilds the same function.
        with_adapter = PeftModel.from_pretrained(before_model, tmp_path / "models" /
                                                 "lora_adapter").eval()
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, expected, atol=1e-4,
                                   rtol=1e-4)
    assert json.loads((tmp_path / "finetune_log.json").read_text())["steps"]


def test_full_finetune_changes_weights_and_lowers_loss(tok, data):
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train = train_examples(tok, data)
    loss_before = response_loss(model, train)
    settings = FinetuneSettings(method="full", samples=16, val_samples=0, epochs=2,
                                **{**QUICK, "lr": 3e-3, "micro_batch": 16,
                                   "gradient_checkpointing": False})
    result = finetune(model, tok, settings, data)
    assert result.adapter is None
    assert result.log["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(v, start[k])]
    assert "model.layers.0.mlp.down_proj.weight" in changed
    assert "model.embed_tokens.weight" in changed
    assert response_loss(result.model, train) < loss_before


def test_lora_targets_skip_removed_projections(tok):
    model = pruned_tiny(tok)
    for layer in model.model.layers:  # drop the remaining attention blocks too
        layer.self_attn = torch.nn.Identity()
    assert existing_targets(model, ["q_proj", "up_proj"]) == ["up_proj"]
    with pytest.raises(UserError, match="none of"):
        existing_targets(model, ["q_proj", "o_proj"])


# -- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tok):
    """A tiny model folder, a data directory with an Alpaca file, and an isolated home."""
    root = tmp_path_factory.mktemp("ft")
    model_dir = root / "model"
    tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256).save_pretrained(
        model_dir)
    tok.save_pretrained(model_dir)
    data_dir = write_data_dir(root / "data")
    (data_dir / "alpaca").mkdir()
    (data_dir / "alpaca" / "alpaca_en_demo.json").write_text(json.dumps(records()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HGSP_HOME", str(root / "home"))
        mp.setenv("HGSP_DATA_DIR", "")
        yield {"root": root, "model": model_dir, "data": data_dir}


def prune_args(ws, name, *extra):
    return ["prune", "--base_model", str(ws["model"]), "--output_name", name,
            "--pruning_ratio", "0.3", "--dataset", "c4", "--num_examples", "4", "--seq_len",
            "16", "--gradient_batch_size", "2", "--analysis_samples", "2",
            "--data_dir", str(ws["data"]), "--results_dir", str(ws["root"] / "results"),
            *extra]


@pytest.fixture(scope="module")
def finetuned_run(workspace):
    args = prune_args(workspace, "ft", "--finetune", *QUICK_FLAGS, "--run_evaluation", "ppl",
                      "--eval_ppl_datasets", "wikitext2", "--eval_ppl_max_windows", "2")
    assert main(args) == 0
    return workspace["root"] / "results" / "ft"


def test_prune_with_finetune_writes_both_models_and_before_after(finetuned_run):
    run = finetuned_run
    for rel in ("models/config.json", "models/model.safetensors", "models/pruned_model.bin",
                "models/pruned_before_finetune/config.json",
                "models/pruned_before_finetune/model.safetensors",
                "models/lora_adapter/adapter_config.json",
                "models/lora_adapter/adapter_model.safetensors", "logs/finetune_log.json"):
        assert (run / rel).is_file(), rel
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finetune"]["method"] == "lora" and summary["finetune"]["examples"] == 8
    assert "finetune" in summary["timings_s"]
    doc = json.loads((run / "evaluation" / "evaluation_results.json").read_text())
    assert set(doc["models"]) == {"base", "pruned", "finetuned"}
    assert doc["models"]["pruned"]["source"].endswith("models/pruned_before_finetune")
    ppl = {m: doc["models"][m]["ppl"]["wikitext2"]["128"]["ppl"] for m in doc["models"]}
    assert ppl["finetuned"] != ppl["pruned"]
    assert doc["finetuned_ratios"]["vs_pruned"]["ppl"]["wikitext2"]["128"] == \
        pytest.approx(ppl["finetuned"] / ppl["pruned"])
    adapter_cfg = json.loads((run / "models/lora_adapter/adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(run / "models/pruned_before_finetune")
    pruned = AutoModelForCausalLM.from_pretrained(run / "models" / "pruned_before_finetune")
    tuned = AutoModelForCausalLM.from_pretrained(run / "models")
    assert tuned.config.to_dict()["hgsp_intermediate_sizes"] == \
        pruned.config.to_dict()["hgsp_intermediate_sizes"]
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(),
                                                    pruned.state_dict().values()))


def test_standalone_finetune_command(finetuned_run, workspace):
    results = workspace["root"] / "results"
    args = ["finetune", "--model", str(finetuned_run / "models" / "pruned_before_finetune"),
            "--output_name", "full", "--results_dir", str(results), "--finetune_method",
            "full", "--data_dir", str(workspace["data"]), "--no-finetune_gradient_checkpointing",
            "--no-save_bin", "--run_evaluation", "ppl", "--eval_ppl_datasets", "wikitext2",
            "--eval_ppl_max_windows", "2", *QUICK_FLAGS]
    assert main(args) == 0
    out = results / "full"
    assert (out / "models" / "config.json").is_file()
    assert not (out / "models" / "pruned_model.bin").exists()
    assert not (out / "models" / "lora_adapter").exists()
    log = json.loads((out / "logs" / "finetune_log.json").read_text())
    assert log["settings"]["method"] == "full" and log["data"]["train_examples"] == 8
    doc = json.loads((out / "evaluation" / "evaluation_results.json").read_text())
    assert set(doc["models"]) == {"pruned", "finetuned"} and "vs_pruned" in doc["finetuned_ratios"]


@pytest.mark.parametrize("case", ["missing", "malformed", "too_many", "bad_model", "results",
                                  "cutoff", "cutoff_finetune"])
def test_bad_input_exits_2_without_results(case, workspace, finetuned_run, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"instruction\": \"x\"}]")
    data_flag = {"missing": str(tmp_path / "missing.json"), "malformed": str(bad)}.get(case)
    extra = ["--finetune_data_path", data_flag] if data_flag else []
    if case == "too_many":
        extra = ["--finetune_samples", "1000"]
    if case == "cutoff":  # no response token fits: found before calibration, not after saving
        extra = ["--finetune_samples", "8", "--finetune_val_samples", "4",
                 "--finetune_cutoff_len", "3"]
    name = f"bad_{case}"
    if case in ("bad_model", "results", "cutoff_finetune"):
        model = {"bad_model": tmp_path, "results": finetuned_run}.get(
            case, finetuned_run / "models")
        args = ["finetune", "--model", str(model), "--output_name", name, "--results_dir",
                str(workspace["root"] / "results"), "--data_dir", str(workspace["data"]),
                *QUICK_FLAGS]
        if case == "cutoff_finetune":  # found before the "before" evaluation
            args += ["--finetune_cutoff_len", "3", "--run_evaluation", "ppl"]
    else:
        args = prune_args(workspace, name, "--finetune", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error: ")] == err[-1:], err
    assert not any("Traceback" in line for line in err)
    expected = {"missing": "does not exist", "malformed": "no text field 'output'",
                "too_many": "--finetune_samples 1000", "bad_model": "no config.json",
                "results": "is a results folder",
                "cutoff": "no training example keeps any response token",
                "cutoff_finetune": "no training example keeps any response token"}[case]
    assert expected in err[-1]
    assert not any("stage: calibration" in line or "perplexity" in line for line in err)
    leftovers = [p.name for p in (workspace["root"] / "results").iterdir() if name in p.name]
    assert leftovers == []


def test_a_local_sample_too_small_falls_back_to_the_hub(workspace, monkeypatch):
    """The usage document's `--finetune_samples 1000` needs more than the local demo file:
    online the Hub set is used; offline the error names --finetune_data_path."""
    from hgsp import finetune as ft
    from hgsp.alpaca import InstructionSet

    hub = InstructionSet([{"instruction": f"q{i}", "input": "", "output": f"a{i}"}
                          for i in range(2000)], "hub:yahma/alpaca-cleaned")
    asked = []
    real = ft.load_instructions

    def fake(spec, data_dir=None):
        asked.append(spec)
        return hub if spec == ft.DEFAULT_HUB_DATASET else real(spec, data_dir)

    monkeypatch.setattr(ft, "load_instructions", fake)
    settings = FinetuneSettings(samples=1000, val_samples=50, data_dir=str(workspace["data"]))
    monkeypatch.setattr(ft, "hub_offline", lambda: False)
    data = ft.prepare(settings)
    assert asked == [None, ft.DEFAULT_HUB_DATASET] and data.origin.startswith("hub:")
    assert len(data.train) == 1000 and len(data.val) == 50
    monkeypatch.setattr(ft, "hub_offline", lambda: True)
    with pytest.raises(UserError, match="--finetune_data_path with a larger"):
        ft.prepare(settings)
    def unreachable(spec, data_dir=None):  # online by the environment, but no network
        if spec == ft.DEFAULT_HUB_DATASET:
            raise UserError("cannot load fine-tuning data 'yahma/alpaca-cleaned' (no network)")
        return real(spec, data_dir)

    monkeypatch.setattr(ft, "load_instructions", unreachable)
    monkeypatch.setattr(ft, "hub_offline", lambda: False)
    with pytest.raises(UserError, match="--finetune_data_path with a larger"):
        ft.prepare(settings)  # the local sample's message, not the Hub's
    monkeypatch.setattr(ft, "load_instructions", fake)
    small = FinetuneSettings(samples=8, val_samples=4, data_dir=str(workspace["data"]))
    monkeypatch.setattr(ft, "hub_offline", lambda: False)
    asked.clear()
    assert not ft.prepare(small).origin.startswith("hub:") and asked == [None]
