"""Activation statistics over the calibration windows, for the activation-based methods.

One forward pass (no gradients) with hooks gathers what FLAP, ShortGPT and bias compensation
need:

- for the input of every ``o_proj`` and ``down_proj`` (the features a KV group or MLP channel
  owns), the per-feature sum and sum of squares: mean (bias compensation) and variance (FLAP's
  fluctuation) follow from them;
- for every decoder layer, the summed cosine similarity of its input and output hidden state
  per token (ShortGPT's Block Influence; the last layer's output after the final norm).

Wanda-sp measures layer after layer instead (:func:`prune_layers_sequentially`), each layer on
the output of the layers before it already pruned, as its reference implementation does.

Sums are kept in float64 so that millions of tokens add up without loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tqdm.auto import tqdm

from .adapters import Adapter
from .analysis import only_layers
from .baselines import token_cosine_sum
from .importance import forward_windows, input_device


@dataclass
class ActivationStats:
    """Per-layer sums over ``tokens`` calibration tokens (rows are base-model layers)."""

    attn_sum: torch.Tensor  # (L, heads * head_dim): input of o_proj
    attn_sumsq: torch.Tensor
    mlp_sum: torch.Tensor  # (L, intermediate): input of down_proj
    mlp_sumsq: torch.Tensor
    cosine_sum: torch.Tensor  # (L,): sum over tokens of cos(layer input, layer output)
    # (the last layer's output after the final norm, see collect_activation_stats)
    tokens: int

    def mean(self, kind: str) -> torch.Tensor:
        return getattr(self, f"{kind}_sum") / self.tokens

    def variance(self, kind: str) -> torch.Tensor:
        """Unbiased per-feature variance over the tokens."""
        s, sq, n = getattr(self, f"{kind}_sum"), getattr(self, f"{kind}_sumsq"), self.tokens
        return ((sq - s * s / n) / max(n - 1, 1)).clamp(min=0)


def _sums_hook(sums: dict, key, with_sum: bool = True):
    """Forward pre-hook adding the per-feature sum (unless ``with_sum`` is False) and sum of
    squares of a linear's input to ``sums[key]`` (float64, on the CPU)."""
    def hook(_module, inputs):
        x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
        acc = sums.setdefault(key, [0.0, 0.0])
        if with_sum:
            acc[0] = acc[0] + x.sum(dim=0).cpu()
        acc[1] = acc[1] + x.pow(2).sum(dim=0).cpu()
    return hook


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

    final_norm = model.model.norm

    def layer_hook(index):
        def hook(_module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = _first_tensor(output)
            if index == n - 1:
                # ShortGPT's reference code (icip-cas/ShortGPT) compares the model's
                # hidden_states[i] and [i+1]; in transformers the last of them is after the
                # final norm. (With a device_map the norm may sit on another device.)
                x_out = final_norm(x_out).to(x_in.device)
            cosine[index] += token_cosine_sum(x_in, x_out).cpu()
        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            _sums_hook(sums, ("attn", index))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            _sums_hook(sums, ("mlp", index))))
        handles.append(layer.register_forward_hook(layer_hook(index), with_kwargs=True))
    forward_windows(model, windows, batch_size, handles, "activation statistics")

    def stack(kind, which):
        return torch.stack([sums[(kind, i)][which] for i in range(n)])

    return ActivationStats(stack("attn", 0), stack("attn", 1), stack("mlp", 0), stack("mlp", 1),
                           cosine, windows.numel())


def _run_layer(model, adapter: Adapter, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """Output of decoder layer ``index`` (before any final norm) for its input ``hidden``, on
    the CPU (the windows' hidden states wait there between layers)."""
    out = []
    handle = adapter.layers(model)[index].register_forward_hook(
        lambda _m, _args, output: out.append(_first_tensor(output).detach().cpu()))
    try:
        with only_layers(model, adapter, index, index + 1):
            model.model(inputs_embeds=hidden.to(input_device(model)), use_cache=False)
    finally:
        handle.remove()
    return out[0]


def _masking_hook(keep: torch.Tensor):
    def hook(_module, inputs):
        return (inputs[0] * keep.to(inputs[0].device, inputs[0].dtype),) + tuple(inputs[1:])
    return hook


@contextmanager
def _pre_hooks(pairs):
    """Register ``(module, pre-hook)`` pairs for the duration of the block."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _layer_input_norms(model, adapter: Adapter, index: int, hidden: list) -> tuple:
    """L2 norm of every o_proj and down_proj input feature of layer ``index`` over ``hidden``."""
    layer = adapter.layers(model)[index]
    sums = {}
    # Only the squares: the norms need no per-feature sum.
    with _pre_hooks([(layer.self_attn.o_proj, _sums_hook(sums, "attn", with_sum=False)),
                     (layer.mlp.down_proj, _sums_hook(sums, "mlp", with_sum=False))]):
        for h in hidden:
            _run_layer(model, adapter, index, h)
    return sums["attn"][1].sqrt(), sums["mlp"][1].sqrt()


@torch.no_grad()
def prune_layers_sequentially(model: nn.Module, adapter: Adapter, windows: torch.Tensor,
                              batch_size: int, prune_layer) -> None:
    """Wanda-sp's pass: decide each layer's pruning on the output of the earlier layers pruned.

    For each layer i in order, the L2 norm of every o_proj and down_proj input feature is
    measured on the calibration windows as they come out of layers 0..i-1 *already pruned* (and
    layer i whole: its MLP sees its own attention unpruned, as in FLAP's code);
    ``prune_layer(i, attn_norm, mlp_norm)`` decides and returns the boolean keep-masks of those
    features, and layer i's output is recomputed with the removed features zeroed (the same as
    removing them) to feed layer i+1. The model's weights are not changed; the hidden states of
    all windows wait on the CPU between layers.
    """
    dev = input_device(model)
    hidden = [model.get_input_embeddings()(ids.to(dev)).cpu()
              for ids in torch.split(windows, batch_size)]
    layers = adapter.layers(model)
    for i in tqdm(range(len(layers)), desc="Wanda-sp layer by layer", leave=False):
        keep_attn, keep_mlp = prune_layer(i, *_layer_input_norms(model, adapter, i, hidden))
        if i == len(layers) - 1:
            break  # nothing reads the last layer's output
        with _pre_hooks([(layers[i].self_attn.o_proj, _masking_hook(keep_attn)),
                         (layers[i].mlp.down_proj, _masking_hook(keep_mlp))]):
            hidden = [_run_layer(model, adapter, i, h) for h in hidden]
