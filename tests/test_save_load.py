"""Saving and loading pruned models and plans (DESIGN.md §6, §7).

A pruned model must come back with identical logits from its folder (in this process, with hgsp
registered, and in a clean interpreter that has only transformers, via trust_remote_code),
from ``pruned_model.bin`` (read with ``weights_only=True``), and a saved plan must reproduce the
same pruned model bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ARCHS, make_plan, tiny_model
from hgsp.adapters import adapter_for
from hgsp.errors import UserError
from hgsp.modeling_hgsp import PRUNED_CLASSES
from hgsp.modelio import PRUNED_BIN, PRUNED_BIN_FORMAT, load_model
from hgsp.plan import PruningPlan
from hgsp.save import MODELING_FILE, save_pruned_model
from hgsp.surgery import apply_plan

N_LAYERS, N_KV, CHANNELS = 4, 2, 24
ALL_HEADS, ALL_CHANNELS = list(range(N_KV)), list(range(CHANNELS))
ATOL = 1e-5

# "uneven": per-layer widths, a removed attention block in layer 0 and a removed layer;
# "layers-only": whole layers removed, so a stock transformers class describes the result.
PLANS = {
    "uneven": {0: (ALL_HEADS, [0, 5, 23]), 1: ([1], list(range(0, CHANNELS, 3))),
               2: (ALL_HEADS, ALL_CHANNELS), 3: ([0], ALL_CHANNELS)},
    "layers-only": {1: (ALL_HEADS, ALL_CHANNELS), 2: (ALL_HEADS, ALL_CHANNELS)},
}
INPUT_IDS = [[5, 17, 42, 8, 91, 3, 60, 33, 12, 77], [9, 9, 50, 64, 4, 88, 21, 30, 46, 15]]


def prune(base, plan):
    return apply_plan(base, adapter_for(base.config), plan)


def logits(model, ids=None) -> torch.Tensor:
    ids = torch.tensor(INPUT_IDS) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def assert_same_logits(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every architecture x plan kind, pruned and saved (no tokenizer): name -> record."""
    root = tmp_path_factory.mktemp("pruned")
    out = {}
    for arch in ARCHS:
        base = tiny_model(arch)
        for kind, drops in PLANS.items():
            pruned = prune(base, make_plan(arch, drops))
            folder = root / f"{arch}_{kind}"
            save_pruned_model(pruned, None, folder)
            out[(arch, kind)] = {"folder": folder, "model": pruned, "logits": logits(pruned)}
    return out


# --------------------------------------------------------------------------- 1. folder, in process

@pytest.mark.parametrize("kind", list(PLANS))
def test_folder_layout(saved, arch, kind):
    folder = saved[(arch, kind)]["folder"]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", PRUNED_BIN} <= files
    assert not any(name.endswith((".pt", ".pkl")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    if kind == "uneven":
        assert "modeling_hgsp.py" in files
        assert (folder / "modeling_hgsp.py").read_text() == MODELING_FILE.read_text()
        config_cls, model_cls = PRUNED_CLASSES[arch]
        assert config["model_type"] == f"hgsp_{arch}"
        assert config["auto_map"] == {
            "AutoConfig": f"modeling_hgsp.{config_cls.__name__}",
            "AutoModelForCausalLM": f"modeling_hgsp.{model_cls.__name__}",
        }
        assert config["hgsp_num_key_value_heads"] == [0, 1, 1]
        assert config["hgsp_intermediate_sizes"] == [CHANNELS - 3, CHANNELS - 8, 0]
        assert config["hgsp_source_layers"] == [0, 1, 3]
        assert config["num_hidden_layers"] == 3
    else:
        assert "modeling_hgsp.py" not in files
        assert "auto_map" not in config
        assert config["model_type"] == arch
        assert config["num_hidden_layers"] == 2
        assert "hgsp_num_key_value_heads" not in config


@pytest.mark.parametrize("kind", list(PLANS))
def test_folder_loads_in_process(saved, arch, kind):
    record = saved[(arch, kind)]
    loaded = AutoModelForCausalLM.from_pretrained(record["folder"], dtype=torch.float32).eval()
    assert type(loaded) is type(record["model"])
    assert loaded.state_dict().keys() == record["model"].state_dict().keys()
    for name, tensor in record["model"].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert_same_logits(logits(loaded), record["logits"])


# --------------------------------------------------------------------------- 2. clean interpreter

REMOTE_CODE = textwrap.dedent("""
    import json, sys

    class NoHgsp:
        # Any attempt to import hgsp fails: loading must need transformers only.
        def find_spec(self, name, path=None, target=None):
            if name == "hgsp" or name.startswith("hgsp."):
                raise ImportError("hgsp was imported while loading a pruned model")
            return None

    sys.meta_path.insert(0, NoHgsp())
    import torch
    from transformers import AutoModelForCausalLM

    folders, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
    result = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                     dtype=torch.float32).eval()
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False).logits
        result[name] = {"logits": out.tolist(), "class": type(model).__name__,
                        "module": type(model).__module__}
    result["_hgsp_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "hgsp")
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def clean_interpreter_run(saved, tmp_path_factory):
    """One subprocess loads every saved folder (a fresh interpreter costs seconds)."""
    cwd = tmp_path_factory.mktemp("clean")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"),
               TOKENIZERS_PARALLELISM="false")
    folders = {f"{arch}/{kind}": str(rec["folder"]) for (arch, kind), rec in saved.items()}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE, json.dumps(folders), json.dumps(INPUT_IDS)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_clean_interpreter_did_not_need_hgsp(clean_interpreter_run):
    assert clean_interpreter_run["_hgsp_modules"] == []


@pytest.mark.parametrize("kind", list(PLANS))
def test_clean_interpreter_loads_with_transformers_only(saved, clean_interpreter_run, arch, kind):
    remote = clean_interpreter_run[f"{arch}/{kind}"]
    record = saved[(arch, kind)]
    assert remote["class"] == type(record["model"]).__name__
    if kind == "uneven":  # the class came from the folder's modeling_hgsp.py
        assert remote["module"].startswith("transformers_modules.")
        assert remote["module"].endswith("modeling_hgsp")
    else:
        assert remote["module"].startswith("transformers.models.")
    assert_same_logits(torch.tensor(remote["logits"]), record["logits"])


# --------------------------------------------------------------------------- 3. pruned_model.bin

@pytest.mark.parametrize("kind", list(PLANS))
def test_pruned_bin_roundtrip(saved, arch, kind):
    record = saved[(arch, kind)]
    path = record["folder"] / PRUNED_BIN
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == PRUNED_BIN_FORMAT
    n_layers = record["model"].config.num_hidden_layers
    assert json.loads(blob["config"])["num_hidden_layers"] == n_layers
    assert all(isinstance(t, torch.Tensor) for t in blob["state_dict"].values())
    loaded = load_model(str(path))
    assert loaded.kind == "pruned_bin"
    assert type(loaded.model) is type(record["model"])
    assert not loaded.model.training
    assert_same_logits(logits(loaded.model), record["logits"])


@pytest.mark.parametrize("kind", list(PLANS))
def test_pruned_bin_without_tokenizer_returns_none(saved, arch, kind):
    """No tokenizer was saved next to the .bin: the model loads and the tokenizer is None."""
    loaded = load_model(str(saved[(arch, kind)]["folder"] / PRUNED_BIN))
    assert loaded.model is not None
    assert loaded.tokenizer is None, f"got a tokenizer of {len(loaded.tokenizer)} entries"


def test_tied_embeddings_survive_save_and_load(arch, tmp_path):
    base = tiny_model(arch, tie_word_embeddings=True)
    pruned = prune(base, make_plan(arch, PLANS["uneven"]))
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    expected = logits(pruned)
    save_pruned_model(pruned, None, tmp_path / "m")
    blob = torch.load(tmp_path / "m" / PRUNED_BIN, weights_only=True)
    assert "lm_head.weight" not in blob["state_dict"]
    for model in (load_model(str(tmp_path / "m" / PRUNED_BIN)).model,
                  AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert_same_logits(logits(model.eval()), expected)


def _good_blob(saved):
    return torch.load(saved[("llama", "uneven")]["folder"] / PRUNED_BIN, weights_only=True)


@pytest.mark.parametrize("content", [
    "plain-dict", "wrong-format", "not-a-dict", "garbage-bytes", "unsafe-pickle",
    "missing-weight",
])
def test_foreign_or_tampered_bin_is_user_error(saved, tmp_path, content):
    path = tmp_path / "pruned_model.bin"
    if content == "plain-dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "config": "{}"}, path)
    elif content == "wrong-format":
        torch.save({**_good_blob(saved), "format": "something-else"}, path)
    elif content == "not-a-dict":
        torch.save([torch.zeros(2)], path)
    elif content == "garbage-bytes":
        path.write_bytes(b"\x00not a torch file\xff" * 8)
    elif content == "unsafe-pickle":  # needs weights_only=False to read: must be refused
        torch.save({**_good_blob(saved), "extra": argparse.Namespace(x=1)}, path)
    else:
        blob = _good_blob(saved)
        blob["state_dict"].pop("model.layers.0.mlp.down_proj.weight")
        torch.save(blob, path)
    with pytest.raises(UserError) as info:
        load_model(str(path))
    assert "weights_only" not in str(info.value)  # torch's unsafe workaround is not repeated
    if content == "unsafe-pickle":
        assert "pickled objects besides tensors" in str(info.value)


# --------------------------------------------------------------------------- 4. load_model errors

def test_load_model_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "no_such_model"))


def test_load_model_folder_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="config.json"):
        load_model(str(tmp_path))


def test_load_model_unsupported_architecture_lists_supported(tmp_path):
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                  n_positions=32)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError) as info:
        load_model(str(tmp_path / "gpt2"))
    message = str(info.value)
    assert "gpt2" in message
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in message


def test_load_model_unknown_model_type_is_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch_xyz"}))
    with pytest.raises(UserError, match="llama"):
        load_model(str(tmp_path))


def test_load_model_folder_without_tokenizer_is_user_error(saved, arch):
    """A model folder with weights but no tokenizer: a clean UserError, not a traceback and
    not a silently empty tokenizer (loading a base model needs its tokenizer)."""
    with pytest.raises(UserError):
        load_model(str(saved[(arch, "layers-only")]["folder"]))


# --------------------------------------------------------------------------- 5. plan JSON

def test_plan_json_roundtrip_reproduces_model(arch, tmp_path):
    base = tiny_model(arch)
    plan = make_plan(arch, {**PLANS["uneven"], 2: ([1], [4, 9])})
    plan.meta = {"pruning_ratio": 0.3, "epsilon": 0.15, "note": "hand-made"}
    path = tmp_path / "plan.json"
    plan.save(path)
    assert json.loads(path.read_text())["format"] == "hgsp-plan-v1"
    loaded = PruningPlan.load(path)
    assert loaded == plan
    assert loaded.to_dict() == plan.to_dict()
    first, second = prune(base, plan).state_dict(), prune(base, loaded).state_dict()
    assert list(first) == list(second)
    for name, tensor in first.items():
        assert tensor.dtype == second[name].dtype
        assert torch.equal(tensor, second[name]), name


@pytest.mark.parametrize("content", ['{"layers": []}', "{not json", None],
                         ids=["not-a-plan", "bad-json", "missing"])
def test_bad_plan_file_is_user_error(tmp_path, content):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError):
        PruningPlan.load(path)
