"""Model classes for LLaMA-family models whose layers have been pruned unevenly.

A structurally pruned model keeps the architecture of its base model, but each decoder layer
has its own number of KV groups (and therefore query heads) and its own MLP width, and some
layers have lost their attention or MLP block. Stock transformers configs hold one size for
every layer, so these classes read the per-layer sizes from three extra config fields and
shrink each layer right after the base class has built it:

- ``hgsp_num_key_value_heads``: KV heads kept in each layer (0: attention block removed);
- ``hgsp_intermediate_sizes``: MLP channels kept in each layer (0: MLP block removed);
- ``hgsp_source_layers``: the index each layer had in the base model (for reports only);
- ``hgsp_out_biases`` (optional): per layer, ``[attention, mlp]`` flags; a flagged o_proj or
  down_proj has a bias holding the average contribution of the pruned heads or channels (bias
  compensation, as in FLAP). A flagged block with no heads or channels left is a constant: its
  removed units' average contribution, which FLAP's code keeps where it empties a block.

Removed whole layers are simply absent (``num_hidden_layers`` counts the kept ones), except a
layer whose two blocks are constants.

This file is copied next to the weights of every saved model whose layers differ, so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it with nothing
but transformers installed. It must therefore import only torch and transformers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


class ZeroAttention(nn.Module):
    """Stands in for a removed attention block: it adds nothing to the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    """Stands in for a removed MLP block: it adds nothing to the residual stream."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


class ConstantAttention(ZeroAttention):
    """Stands in for an attention block whose every head was removed with bias compensation:
    it adds the constant ``bias`` (the removed heads' calibration-mean contribution)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden_states, *args, **kwargs):
        return self.bias.to(hidden_states.dtype).expand_as(hidden_states), None


class ConstantMLP(ZeroMLP):
    """Stands in for an MLP block whose every channel was removed with bias compensation."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden_states):
        return self.bias.to(hidden_states.dtype).expand_as(hidden_states)


def _linear_like(old: nn.Linear, in_features: int, out_features: int,
                 bias: bool | None = None) -> nn.Linear:
    return nn.Linear(
        in_features,
        out_features,
        bias=old.bias is not None if bias is None else bias,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def shrink_attention(attn: nn.Module, num_kv_heads: int, gqa_ratio: int, head_dim: int) -> None:
    """Resize q/k/v/o of one attention module to ``num_kv_heads`` whole GQA groups."""
    q_rows = num_kv_heads * gqa_ratio * head_dim
    kv_rows = num_kv_heads * head_dim
    attn.q_proj = _linear_like(attn.q_proj, attn.q_proj.in_features, q_rows)
    attn.k_proj = _linear_like(attn.k_proj, attn.k_proj.in_features, kv_rows)
    attn.v_proj = _linear_like(attn.v_proj, attn.v_proj.in_features, kv_rows)
    attn.o_proj = _linear_like(attn.o_proj, q_rows, attn.o_proj.out_features)


def shrink_mlp(mlp: nn.Module, channels: int) -> None:
    """Resize gate/up/down of one SwiGLU MLP to ``channels`` intermediate channels."""
    mlp.gate_proj = _linear_like(mlp.gate_proj, mlp.gate_proj.in_features, channels)
    mlp.up_proj = _linear_like(mlp.up_proj, mlp.up_proj.in_features, channels)
    mlp.down_proj = _linear_like(mlp.down_proj, channels, mlp.down_proj.out_features)


def _with_bias(old: nn.Linear) -> nn.Linear:
    return old if old.bias is not None else _linear_like(old, old.in_features,
                                                         old.out_features, bias=True)


def shrink_layers(model: nn.Module, config) -> None:
    """Give every decoder layer the sizes listed in ``config``'s ``hgsp_*`` fields."""
    kv_heads = list(config.hgsp_num_key_value_heads)
    channels = list(config.hgsp_intermediate_sizes)
    layers = model.model.layers
    if len(kv_heads) != len(layers) or len(channels) != len(layers):
        raise ValueError(
            f"config lists sizes for {len(kv_heads)}/{len(channels)} layers, model has {len(layers)}"
        )
    gqa_ratio = config.num_attention_heads // config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out_biases = getattr(config, "hgsp_out_biases", None) or [[False, False]] * len(layers)
    attn_index = 0
    for layer, n_kv, width, (attn_bias, mlp_bias) in zip(layers, kv_heads, channels, out_biases):
        if n_kv == 0:
            # Norm and attention go together: the norm only feeds the removed branch.
            layer.self_attn = (ConstantAttention(config.hidden_size) if attn_bias
                               else ZeroAttention())
            layer.input_layernorm = nn.Identity()
        else:
            if n_kv != config.num_key_value_heads:
                shrink_attention(layer.self_attn, n_kv, gqa_ratio, head_dim)
            # The KV cache holds one slot per layer that attends; numbering them densely keeps
            # slot 0 (which generate() reads for the sequence length) always in use.
            layer.self_attn.layer_idx = attn_index
            attn_index += 1
        if width == 0:
            layer.mlp = ConstantMLP(config.hidden_size) if mlp_bias else ZeroMLP()
            layer.post_attention_layernorm = nn.Identity()
        elif width != config.intermediate_size:
            shrink_mlp(layer.mlp, width)
        if n_kv and attn_bias:
            layer.self_attn.o_proj = _with_bias(layer.self_attn.o_proj)
        if width and mlp_bias:
            layer.mlp.down_proj = _with_bias(layer.mlp.down_proj)


class _HgspMixin:
    """Builds the stock model at full width, then shrinks it per layer.

    Built under ``from_pretrained`` the full-width tensors live on the meta device, so the
    temporary full size costs no memory.
    """

    def __init__(self, config):
        super().__init__(config)
        shrink_layers(self, config)
        self.post_init()

    def _attention_cache(self):
        """A KV cache with one slot per attending layer, typed like that layer.

        transformers types cache slot i after ``config.layer_types[i]``; with the slots
        renumbered densely (see :func:`shrink_layers`) that is the wrong layer as soon as an
        attention block is gone and full and sliding layers are mixed (Qwen2/3 with
        ``use_sliding_window``). Returns None where the default cache is already right.
        """
        kv_heads = self.config.hgsp_num_key_value_heads
        types = getattr(self.config, "layer_types", None)
        if all(kv_heads) or not types or len(set(types)) == 1:
            return None
        attending = [i for i, n in enumerate(kv_heads) if n > 0]
        config = copy.copy(self.config)
        config.layer_types = [types[i] for i in attending]
        config.num_hidden_layers = len(attending)
        return DynamicCache(config=config)

    def forward(self, *args, past_key_values=None, use_cache=None, **kwargs):
        if past_key_values is None and (use_cache if use_cache is not None
                                        else self.config.use_cache):
            past_key_values = self._attention_cache()
        return super().forward(*args, past_key_values=past_key_values, use_cache=use_cache,
                               **kwargs)

    def generate(self, *args, **kwargs):
        if kwargs.get("past_key_values") is None:
            cache = self._attention_cache()
            if cache is not None:
                kwargs["past_key_values"] = cache
        return super().generate(*args, **kwargs)


class HgspLlamaConfig(LlamaConfig):
    model_type = "hgsp_llama"


class HgspLlamaForCausalLM(_HgspMixin, LlamaForCausalLM):
    config_class = HgspLlamaConfig


class HgspMistralConfig(MistralConfig):
    model_type = "hgsp_mistral"


class HgspMistralForCausalLM(_HgspMixin, MistralForCausalLM):
    config_class = HgspMistralConfig


class HgspQwen2Config(Qwen2Config):
    model_type = "hgsp_qwen2"


class HgspQwen2ForCausalLM(_HgspMixin, Qwen2ForCausalLM):
    config_class = HgspQwen2Config


class HgspQwen3Config(Qwen3Config):
    model_type = "hgsp_qwen3"


class HgspQwen3ForCausalLM(_HgspMixin, Qwen3ForCausalLM):
    config_class = HgspQwen3Config


# base model_type -> (config class, model class) of its pruned form
PRUNED_CLASSES = {
    "llama": (HgspLlamaConfig, HgspLlamaForCausalLM),
    "mistral": (HgspMistralConfig, HgspMistralForCausalLM),
    "qwen2": (HgspQwen2Config, HgspQwen2ForCausalLM),
    "qwen3": (HgspQwen3Config, HgspQwen3ForCausalLM),
}
