"""What the pruning code needs to know about one architecture, and nothing more.

Every supported family names its modules the LLaMA way (``model.layers[i].self_attn.q_proj``,
``mlp.gate_proj``...), so the adapters differ only in the few facts below. Code elsewhere
asks the adapter instead of testing ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ATTN_ROW_PROJS = ("q_proj", "k_proj", "v_proj")  # sliced by output rows
MLP_ROW_PROJS = ("gate_proj", "up_proj")  # sliced by output rows


@dataclass(frozen=True)
class Dims:
    """Sizes of one unpruned decoder layer."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    num_layers: int

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads


class Adapter:
    """Base adapter: LLaMA conventions. Subclasses override the class attributes."""

    model_type = "llama"
    #: q/k/v carry biases whatever the config says (Qwen2).
    always_qkv_bias = False
    #: per-head RMSNorm on q and k (Qwen3): shared by all heads, never sliced.
    has_qk_norm = False

    def __init__(self, config):
        self.config = config

    def dims(self) -> Dims:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return Dims(
            hidden=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
            head_dim=head_dim,
            intermediate=c.intermediate_size,
            num_layers=c.num_hidden_layers,
        )

    @property
    def qkv_bias(self) -> bool:
        return self.always_qkv_bias or bool(getattr(self.config, "attention_bias", False))

    @property
    def o_bias(self) -> bool:
        # Qwen2 has q/k/v biases but none on o_proj; attention_bias covers all four.
        return bool(getattr(self.config, "attention_bias", False))

    @property
    def mlp_bias(self) -> bool:
        return bool(getattr(self.config, "mlp_bias", False))

    @staticmethod
    def layers(model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def attn_group_cost(self) -> int:
        """Parameters in one KV group: its k/v heads, r query heads and their o_proj columns."""
        d = self.dims()
        cost = d.hidden * d.head_dim * (2 * d.gqa_ratio + 2)
        if self.qkv_bias:
            cost += d.head_dim * (d.gqa_ratio + 2)
        return cost

    def mlp_channel_cost(self) -> int:
        """Parameters in one MLP channel: a row of gate and up, a column of down."""
        d = self.dims()
        return 3 * d.hidden + (2 if self.mlp_bias else 0)

    def attn_fixed_cost(self) -> int:
        """Parameters of an attention block that no group owns (norms, o_proj bias)."""
        d = self.dims()
        cost = d.hidden  # input_layernorm
        if self.o_bias:
            cost += d.hidden
        if self.has_qk_norm:
            cost += 2 * d.head_dim
        return cost

    def mlp_fixed_cost(self) -> int:
        """Parameters of an MLP block that no channel owns (post-attention norm, down bias)."""
        d = self.dims()
        return d.hidden + (d.hidden if self.mlp_bias else 0)
