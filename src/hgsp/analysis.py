"""Depth sensitivity: perplexity with each layer, attention block or MLP block removed (§4).

Removing part of layer ``l`` leaves the hidden states before ``l`` unchanged, so they are
computed once (one base forward with a pre-hook on every layer) and each variant runs only
layers ``l..L-1`` from the cached input of layer ``l``. A removed block is swapped for a module
that adds zero to the residual stream, in place and restored afterwards: no model copies.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .importance import input_device
from .modeling_hgsp import ZeroAttention, ZeroMLP

log = logging.getLogger(__name__)


@dataclass
class RemovalAnalysis:
    """Perplexities of the base model and of every single-removal variant.

    ``delta_*`` are the increments over ``base_ppl`` clamped at 0, as used by the score.
    """

    base_ppl: float
    layer_ppl: list[float]
    attn_ppl: list[float]
    mlp_ppl: list[float]
    tokens: int
    seq_len: int

    def deltas(self, kind: str, metric: str = "ppl") -> torch.Tensor:
        """Increments of one kind of removal: in perplexity (``P - P0``) or, with ``loss``,
        in mean next-token loss (``ln P - ln P0``, nats per token)."""
        values = {"layer": self.layer_ppl, "attn": self.attn_ppl, "mlp": self.mlp_ppl}[kind]
        values = torch.tensor(values, dtype=torch.float64)
        if metric == "loss":
            return (values.log() - math.log(self.base_ppl)).clamp(min=0.0)
        return (values - self.base_ppl).clamp(min=0.0)


@contextmanager
def _removed(layer: nn.Module, kind: str):
    """Temporarily replace the attention or MLP block of ``layer`` by a zero branch."""
    name = "self_attn" if kind == "attn" else "mlp"
    original = getattr(layer, name)
    setattr(layer, name, ZeroAttention() if kind == "attn" else ZeroMLP())
    try:
        yield
    finally:
        setattr(layer, name, original)


@contextmanager
def only_layers(model: nn.Module, adapter: Adapter, start: int, stop: int | None = None):
    """Make the decoder run layers ``start..stop-1`` only (same module objects, no copy); fed
    ``inputs_embeds`` = the input of layer ``start``, it returns what the model would return
    after them (through the final norm)."""
    inner = model.model
    layers, config = inner.layers, inner.config
    stop = len(layers) if stop is None else stop
    saved = (config.num_hidden_layers, getattr(config, "layer_types", None))
    inner.layers = nn.ModuleList(list(layers)[start:stop])
    config.num_hidden_layers = stop - start
    if saved[1] is not None:
        config.layer_types = saved[1][start:stop]  # Qwen2/3 pick each layer's mask by position
    try:
        yield
    finally:
        inner.layers = layers
        config.num_hidden_layers = saved[0]
        if saved[1] is not None:
            config.layer_types = saved[1]


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed next-token cross-entropy: position t predicts ``labels[:, t + 1]``."""
    logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
        reduction="sum").item()


# Vocabulary rows per step when scoring from hidden states. Sweeping the vocabulary in slices
# keeps each slice of the head and its logits in cache, and never writes out a (tokens, vocab)
# tensor, which would dominate the memory and the time of the removal analysis (the vocabulary
# is far wider than the hidden size). 1024 was fastest of 1k-16k on the demo model.
VOCAB_CHUNK = 1024


def head_nll(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed next-token NLL from the decoder's final (normed) hidden states: position t
    predicts ``labels[:, t + 1]``; the last position, which predicts nothing, is skipped.

    Computed as logsumexp(logits) - target logit, the logsumexp accumulated over vocabulary
    slices. A head that is not a plain resident linear (offloaded, quantized) is called as a
    module on a few tokens at a time instead.
    """
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    weight = getattr(lm_head, "weight", None)
    if type(lm_head) is not nn.Linear or weight is None or weight.is_meta:
        return _module_head_nll(lm_head, hidden, targets)
    hidden = hidden.to(weight.device, weight.dtype)
    targets = targets.to(weight.device)
    bias = lm_head.bias
    target_logit = (hidden * weight[targets]).sum(-1).float()
    if bias is not None:
        target_logit += bias[targets].float()
    lse = None
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        rows = slice(start, start + VOCAB_CHUNK)
        logits = torch.nn.functional.linear(
            hidden, weight[rows], None if bias is None else bias[rows]).float()
        part = torch.logsumexp(logits, dim=-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
    return (lse - target_logit).sum().item()


def _module_head_nll(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                     tokens: int = 256) -> float:
    total = 0.0
    for start in range(0, hidden.shape[0], tokens):
        logits = lm_head(hidden[start:start + tokens]).float()
        picked = logits.gather(-1, targets[start:start + tokens, None].to(logits.device))
        total += (torch.logsumexp(logits, dim=-1) - picked.squeeze(-1)).sum().item()
    return total


def _nll(model, hidden: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed next-token NLL of ``labels`` when the decoder starts from ``hidden``."""
    out = model.model(inputs_embeds=hidden, use_cache=False)
    return head_nll(model.lm_head, out.last_hidden_state, labels)


@torch.no_grad()
def _layer_inputs(model, adapter, ids: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """Inputs of every decoder layer for one batch, and the base model's summed NLL."""
    captured: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append(
            (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
        for layer in adapter.layers(model)]
    try:
        dev = input_device(model)
        final = model.model(input_ids=ids.to(dev), use_cache=False).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    return captured, head_nll(model.lm_head, final, ids)


@torch.no_grad()
def removal_analysis(model: nn.Module, adapter: Adapter, windows: torch.Tensor,
                     batch_size: int) -> RemovalAnalysis:
    """Perplexity of the base model and of the 3L single-removal variants on ``windows``."""
    layers = adapter.layers(model)
    n = len(layers)
    base, layer_nll, attn_nll, mlp_nll = 0.0, [0.0] * n, [0.0] * n, [0.0] * n
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    batch_list = list(torch.split(windows, batch_size))
    progress = tqdm(total=len(batch_list) * (3 * n + 1), desc="layer/block removal", leave=False)
    for ids in batch_list:
        inputs, base_nll = _layer_inputs(model, adapter, ids)
        base += base_nll
        progress.update(1)
        for l in range(n):
            # Skipping layer l = running layers l+1.. on the input of layer l.
            with only_layers(model, adapter, l + 1):
                layer_nll[l] += _nll(model, inputs[l], ids)
            for kind, acc in (("attn", attn_nll), ("mlp", mlp_nll)):
                with _removed(layers[l], kind), only_layers(model, adapter, l):
                    acc[l] += _nll(model, inputs[l], ids)
            progress.update(3)
    progress.close()

    def ppl(nll):
        return math.exp(nll / predicted)

    return RemovalAnalysis(
        base_ppl=ppl(base), layer_ppl=[ppl(v) for v in layer_nll],
        attn_ppl=[ppl(v) for v in attn_nll], mlp_ppl=[ppl(v) for v in mlp_nll],
        tokens=windows.numel(), seq_len=windows.shape[1])
