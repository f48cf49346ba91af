"""Tiny, seeded, randomly initialised models of every supported architecture (GQA on)."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets an empty result cache: tests must not see each other's entries."""
    monkeypatch.setenv("HGSP_CACHE_DIR", str(tmp_path / "hgsp-cache"))


@pytest.fixture(autouse=True)
def _package_logger():
    """The CLI gives the ``hgsp`` logger its own stderr handler and stops propagation (also in
    module-scoped fixtures, before any test's own fixtures run); each test starts and ends with
    the logger as the library leaves it, so ``caplog`` sees the package's records and no
    handler writes to an earlier test's closed stderr."""
    def reset():
        pkg = logging.getLogger("hgsp")
        pkg.handlers[:] = []
        pkg.setLevel(logging.NOTSET)
        pkg.propagate = True

    reset()
    yield
    reset()

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """Import one of the repository's scripts (``benchmarks/...``, ``scripts/...``) as a module:
    they are files, not part of the installed package."""
    spec = importlib.util.spec_from_file_location(Path(relative).stem, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 96


def tiny_config(arch: str, **overrides):
    """4 layers, 4 query heads over 2 KV heads (GQA ratio 2), head_dim 8, 24 MLP channels."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if arch == "qwen3":
        kwargs["attention_bias"] = False
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so slicing bugs show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12))


WORDS = ("the of and to in is was for on that with as by at from his her it an were are "
         "which this be or has had first one their its new after who they two time year "
         "city river music film team game people world water house school north south "
         "small large early later known during between under").split()


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Deterministic English-like documents for calibration and evaluation corpora."""
    import random

    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize()
                     + "." for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(sentences))
    return docs


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A BPE tokenizer trained on the synthetic corpus, with exactly ``vocab_size`` entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>",
                                                                         "<unk>"])
    tok.train_from_iterator(synthetic_documents(50), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def write_tiny_model(folder, arch: str = "llama", seed: int = 0):
    """Save a tiny model and its tokenizer as a Hugging Face folder; returns the folder."""
    tok = tiny_tokenizer()
    model = tiny_model(arch, seed=seed, vocab_size=len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data_dir(folder, n_docs: int = 300):
    """A local data directory with a C4-style JSONL, a WikiText-2 style test file and PTB
    style test and validation files."""
    import json

    docs = synthetic_documents(n_docs, seed=1)
    (folder / "c4").mkdir(parents=True, exist_ok=True)
    with (folder / "c4" / "c4_demo.jsonl").open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    (folder / "wikitext2").mkdir(exist_ok=True)
    (folder / "wikitext2" / "wiki.test.raw").write_text("\r\n".join(docs[:40]) + "\r\n")
    (folder / "ptb").mkdir(exist_ok=True)
    (folder / "ptb" / "ptb.test.txt").write_text("\n".join(docs[40:80]) + "\n")
    (folder / "ptb" / "ptb.valid.txt").write_text("\n".join(docs[80:120]) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_data_dir(tmp_path_factory.mktemp("data"))


def make_plan(arch: str, drops, n_layers: int = 4, n_kv: int = 2, channels: int = 24):
    """Identity plan of a tiny model minus, per layer, the listed KV heads and MLP channels.

    ``drops`` maps a layer index to ``(heads, channels)`` to remove from it.
    """
    from hgsp.plan import uniform_plan

    plan = uniform_plan(arch, n_layers, n_kv, channels)
    for layer, (heads, chans) in drops.items():
        lp = plan.layers[layer]
        lp.kept_kv_heads = [g for g in lp.kept_kv_heads if g not in heads]
        lp.kept_channels = [j for j in lp.kept_channels if j not in chans]
    return plan


def assert_saved_logits_match(pruned, folder) -> None:
    """Save ``pruned``, load it back through transformers and compare logits."""
    from hgsp.save import save_pruned_model

    save_pruned_model(pruned, tiny_tokenizer(), folder, write_bin=False)
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, pruned(ids).logits, atol=1e-5)
