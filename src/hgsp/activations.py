"""Activation statistics over the calibration windows, for the activation-based methods.

One forward pass (no gradients) with hooks gathers what Wanda-sp, FLAP, ShortGPT and bias
compensation need:

- for the input of every ``o_proj`` and ``down_proj`` (the features a KV group or MLP channel
  owns), the per-feature sum and sum of squares: mean (bias compensation), variance (FLAP's
  fluctuation) and L2 norm (Wanda) all follow from them;
- for every decoder layer, the summed cosine similarity of its input and output hidden state
  per token (ShortGPT's Block Influence).

Sums are kept in float64 so that millions of tokens add up without loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter
from .baselines import token_cosine_sum
from .importance import forward_windows


@dataclass
class ActivationStats:
    """Per-layer sums over ``tokens`` calibration tokens (rows are base-model layers)."""

    attn_sum: torch.Tensor  # (L, heads * head_dim): input of o_proj
    attn_sumsq: torch.Tensor
    mlp_sum: torch.Tensor  # (L, intermediate): input of down_proj
    mlp_sumsq: torch.Tensor
    cosine_sum: torch.Tensor  # (L,): sum over tokens of cos(layer input, layer output)
    tokens: int

    def mean(self, kind: str) -> torch.Tensor:
        return getattr(self, f"{kind}_sum") / self.tokens

    def variance(self, kind: str) -> torch.Tensor:
        """Unbiased per-feature variance over the tokens."""
        s, sq, n = getattr(self, f"{kind}_sum"), getattr(self, f"{kind}_sumsq"), self.tokens
        return ((sq - s * s / n) / max(n - 1, 1)).clamp(min=0)

    def norm(self, kind: str) -> torch.Tensor:
        """Per-feature L2 norm over all tokens (Wanda's ``||X_j||``)."""
        return getattr(self, f"{kind}_sumsq").sqrt()


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def collect_activation_stats(model: nn.Module, adapter: Adapter, windows: torch.Tensor,
                             batch_size: int) -> ActivationStats:
    """Run the calibration windows through ``model`` once and return the sums above."""
    layers = adapter.layers(model)
    n = len(layers)
    sums: dict[tuple[str, int], list[torch.Tensor]] = {}
    cosine = torch.zeros(n, dtype=torch.float64)

    def feature_hook(kind, index):
        def hook(_module, inputs):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            acc = sums.setdefault((kind, index), [0.0, 0.0])
            acc[0] = acc[0] + x.sum(dim=0).cpu()
            acc[1] = acc[1] + x.pow(2).sum(dim=0).cpu()
        return hook

    def layer_hook(index):
        def hook(_module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = _first_tensor(output)
            cosine[index] += token_cosine_sum(x_in, x_out).cpu()
        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(feature_hook("attn", index)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(feature_hook("mlp", index)))
        handles.append(layer.register_forward_hook(layer_hook(index), with_kwargs=True))
    forward_windows(model, windows, batch_size, handles, "activation statistics")

    def stack(kind, which):
        return torch.stack([sums[(kind, i)][which] for i in range(n)])

    return ActivationStats(stack("attn", 0), stack("attn", 1), stack("mlp", 0), stack("mlp", 1),
                           cosine, windows.numel())
