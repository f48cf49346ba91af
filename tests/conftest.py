"""Tiny, seeded, randomly initialised models of every supported architecture (GQA on)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

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
