"""A model dispatched by accelerate (``--device_map``) prunes exactly like a model in one piece.

A model larger than one GPU is split over devices, or part of it offloaded to the CPU or disk.
Offloaded weights are meta tensors between forwards (accelerate swaps a real copy in for each
forward), which is what can break gradients, state dicts and slicing. A CPU-only machine has no
second device, but it can offload: ``SPLIT`` keeps half the decoder layers on the CPU and
offloads the other half to disk (read back from the model's own safetensors file, so no offload
folder is needed). On a GPU, CPU offload goes through the same accelerate code path
(``AlignDevicesHook`` with ``offload=True``), only with another execution device.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import write_tiny_model
from hgsp.adapters import adapter_for
from hgsp.analysis import removal_analysis
from hgsp.config import PruneConfig
from hgsp.importance import compute_importance
from hgsp.modelio import load_model
from hgsp.pipeline import prune

# Layers 1 and 3 are offloaded to disk; the rest stays on the CPU.
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
         "model.rotary_emb": "cpu", "lm_head": "cpu"}
OFFLOADED = ("model.layers.1.", "model.layers.3.")
FAST = dict(num_examples=4, seq_len=16, gradient_batch_size=2, analysis_samples=2,
            dataset="c4", log_level="WARNING")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_llama_dm"))


def load_split(model_dir):
    model = load_model(str(model_dir), device_map=SPLIT).model
    # The test means nothing unless the weights really are offloaded.
    assert "disk" in model.hf_device_map.values()
    offloaded = [n for n, p in model.named_parameters() if p.is_meta]
    assert offloaded and all(n.startswith(OFFLOADED) for n in offloaded)
    return model


@pytest.fixture
def windows():
    torch.manual_seed(3)
    return torch.randint(3, 90, (6, 12))


@pytest.mark.parametrize("method,checkpointing", [
    ("taylor", False), ("taylor", True), ("taylor_2nd", False), ("wanda", False),
    ("magnitude", False)])
def test_importance_under_offload_matches(model_dir, windows, method, checkpointing):
    plain = load_model(str(model_dir)).model
    split = load_split(model_dir)
    flags = {n: p.requires_grad for n, p in split.named_parameters()}
    hooks = [m._hf_hook for m in split.modules() if hasattr(m, "_hf_hook")]
    expected = compute_importance(plain, adapter_for(plain.config), method, windows, 2,
                                  checkpointing)
    actual = compute_importance(split, adapter_for(split.config), method, windows, 2,
                                checkpointing)
    # Offloaded weights get their gradients from the copies accelerate materialises.
    torch.testing.assert_close(actual.attn, expected.attn, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(actual.mlp, expected.mlp, rtol=1e-5, atol=1e-8)
    assert actual.attn[[1, 3]].abs().sum() > 0 and actual.mlp[[1, 3]].abs().sum() > 0
    # Left as found: flags (the offloaded parameter objects are new ones), hooks, no grads.
    assert {n: p.requires_grad for n, p in split.named_parameters()} == flags
    assert all("post_forward" not in vars(h) for h in hooks)
    assert all(p.grad is None for p in split.parameters())
    assert all(p.is_meta == n.startswith(OFFLOADED) for n, p in split.named_parameters())


def test_removal_analysis_under_offload_matches(model_dir, windows):
    plain = load_model(str(model_dir)).model
    split = load_split(model_dir)
    expected = removal_analysis(plain, adapter_for(plain.config), windows, 4)
    actual = removal_analysis(split, adapter_for(split.config), windows, 4)
    assert actual.base_ppl == pytest.approx(expected.base_ppl, rel=1e-6)
    for kind in ("layer_ppl", "attn_ppl", "mlp_ppl"):
        assert getattr(actual, kind) == pytest.approx(getattr(expected, kind), rel=1e-6), kind


@pytest.mark.parametrize("method", ["hgsp", "flap", "wanda_sp"])
def test_prune_with_offload_gives_the_same_plan_and_model(method, model_dir, data_dir, tmp_path):
    common = dict(base_model=str(model_dir), pruning_ratio=0.3, data_dir=str(data_dir),
                  results_dir=str(tmp_path), cache=False, method=method,
                  **FAST)  # no cache: compute both
    prune(PruneConfig(output_name="plain", **common))
    result = prune(PruneConfig(output_name="split", device_map=SPLIT, **common))
    plans = [json.loads((tmp_path / name / "analysis" / "pruning_plan.json").read_text())
             for name in ("plain", "split")]
    assert plans[0] == plans[1]
    assert any(lp.removed or lp.kept_channels != list(range(24)) for lp in result.plan.layers)
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = []
    for name in ("plain", "split"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name / "models").eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids, use_cache=False).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text())
                 for name in ("plain", "split")]
    assert summaries[1]["parameters"] == summaries[0]["parameters"]
